"""Federated methods: the names a run is configured with, and what a device needs to run one.

A method is an optional DevFT stage schedule around an in-stage aggregation rule
(:data:`devft_edge.aggregation.RULES`): ``devft+fedsa`` is DevFT's stages with FedSA-LoRA's rounds,
``devft`` alone means ``devft+fedit``. The simulator and the aggregator parse the name the same way
(:func:`uses_devft`, :func:`rule_of`), so every method runs in both.

A rule has a client half (:meth:`AggregationRule.client_start`, :meth:`~AggregationRule.uplink`).
In the simulator it runs beside the server; over the network it runs on the device, which needs
the stage's map between the full model and the submodel for FedSA-LoRA's private B (kept in
full-model space across rounds and stages, as the server keeps the shared A). A task carries that
map as a :class:`ClientMethod`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from devft_edge.errors import ConfigError

if TYPE_CHECKING:  # the CLI imports this module to list the methods: no torch at import time
    from devft_edge.lora import LoraState

METHODS = ("devft", "fedit", "fedsa", "flora", "devft+fedit", "devft+fedsa", "devft+flora")


def check_method(method: str) -> str:
    """``method`` if known.

    Raises:
        ConfigError: naming the known methods.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    return method


def uses_devft(method: str) -> bool:
    """Whether ``method`` runs DevFT's stage schedule (else one full-depth stage)."""
    return method.startswith("devft")


def rule_of(method: str) -> str:
    """The in-stage aggregation rule's name (``devft`` alone: ``fedit``)."""
    return method.partition("+")[2] or "fedit" if uses_devft(method) else method


@dataclass(frozen=True)
class ClientMethod:
    """What a device needs to run a rule's client half in one stage (the ``method`` of a task)."""

    rule: str
    """Aggregation rule name (:data:`devft_edge.aggregation.RULES`)."""
    groups: tuple[tuple[int, ...], ...]
    """``groups[g]`` = original layers fused into submodel block g."""
    fusion: str
    beta: float | str
    """The fusion's beta (DBLF), or ``auto``."""
    transfer: str
    """Knowledge-transfer rule (:data:`devft_edge.transfer.TRANSFERS`)."""

    MAX_LAYERS = 4096
    """At most this many layers in ``groups`` (a task is signed, but parsed with bounds anyway)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "groups": [list(g) for g in self.groups],
            "fusion": self.fusion,
            "beta": self.beta,
            "transfer": self.transfer,
        }

    @classmethod
    def from_json(cls, data: object) -> ClientMethod:
        """Parse and check a task's ``method`` object.

        Raises:
            ConfigError: naming what is wrong (an unknown rule, fusion or transfer, bad groups).
        """
        from devft_edge.aggregation import RULES
        from devft_edge.fusion import FUSIONS
        from devft_edge.transfer import TRANSFERS

        if not isinstance(data, Mapping):
            raise ConfigError("the task's 'method' must be an object")
        groups = data.get("groups")
        layers = [j for g in groups for j in g] if _int_lists(groups) else None
        if layers is None or not layers or len(layers) > cls.MAX_LAYERS or sorted(layers) != list(range(len(layers))):
            raise ConfigError("method.groups must partition the layers 0..L-1 into lists of integers")
        beta = data.get("beta")
        if beta != "auto" and (type(beta) not in (int, float) or not 0 < beta <= 1):
            raise ConfigError(f"method.beta must be in (0, 1] or 'auto', got {str(beta)[:40]}")
        for registry, key in ((RULES, "rule"), (FUSIONS, "fusion"), (TRANSFERS, "transfer")):
            if not isinstance(data.get(key), str) or data[key] not in registry:
                known = ", ".join(registry.names())
                raise ConfigError(f"method.{key} {str(data.get(key))[:40]!r} is not one of {known}")
        return cls(
            rule=data["rule"],
            groups=tuple(tuple(g) for g in groups),
            fusion=data["fusion"],
            beta=beta,
            transfer=data["transfer"],
        )

    def to_stage(self, full_state: LoraState) -> LoraState:
        """Full-model state -> this stage's space (the transfer rule's contraction, as the server does)."""
        from devft_edge.stage import StageRecipe
        from devft_edge.submodel import stage_lora

        fusion = StageRecipe(fusion=self.fusion, beta=self.beta).build_fusion()
        return stage_lora(full_state, [list(g) for g in self.groups], fusion, self.transfer)

    def to_full(self, stage_state: LoraState) -> LoraState:
        """This stage's state -> the full model (knowledge transfer)."""
        from devft_edge.transfer import TRANSFERS

        return TRANSFERS.get(self.transfer).expand(stage_state, [list(g) for g in self.groups])


def _int_lists(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(g, list) and g and all(type(j) is int for j in g) for g in value)
