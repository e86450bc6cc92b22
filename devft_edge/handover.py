"""What DevFT's stages below full depth are worth, as measured, and the cost prediction built on it.

A stage below full depth spends device compute; what it hands over is the full model with the
transferred LoRA (``full_eval_loss``). Its *hand-over efficiency* is the FedIT compute that reaches
the same full-model eval loss, divided by the compute the stages so far cost. Above 1 the early
stages are cheaper than FedIT's own first rounds and DevFT can pay off; below 1 every step spent
below full depth is more than FedIT needs to get as far, so reaching FedIT's quality costs DevFT
more device compute than FedIT, with the same fleet.

The efficiencies are measured by ``benchmarks/payoff.py`` (``docs/results.md``); :func:`cost_warning`
turns them into the warning ``plan`` and ``simulate`` print for a DevFT schedule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["MEASURED", "Handover", "cost_warning", "early_rounds"]


@dataclass(frozen=True)
class Handover:
    """The best hand-over efficiency measured for a model, and where it was measured."""

    efficiency: float
    source: str


MEASURED: dict[str, Handover] = {
    "smollm2": Handover(
        efficiency=0.26,
        source="docs/results.md (issue 13): best of every configuration measured, the healed 15-layer stage of "
        "--heal bake --capacities 15,30 in the mixed fleet (int4 packs, 3 seeds; 0.22 in the homogeneous one)",
    ),
}


def early_rounds(
    capacities: Sequence[int], rounds_per_stage: Sequence[int], cost: object, step_ratio: Sequence[float] | None = None
) -> float:
    """Device compute of the stages below full depth, in FedIT rounds (a full-depth round = 1).

    ``cost`` maps a depth to its step cost (:class:`devft_edge.step_cost.StepCostModel`);
    ``step_ratio[s]`` is stage ``s``'s local steps per round over a full-depth round's (default 1).
    """
    total = max(capacities)
    ratios = step_ratio or [1.0] * len(capacities)
    return sum(
        r * k * cost(c)  # type: ignore[operator]
        for c, r, k in zip(capacities, rounds_per_stage, ratios, strict=True)
        if c < total
    )


def cost_warning(model: str, early: float) -> str | None:
    """The warning for a DevFT schedule whose stages below full depth cost ``early`` FedIT rounds of
    device compute, or None when there is nothing to warn about."""
    if early <= 0:
        return None
    measured = MEASURED.get(model)
    if measured is None:
        return (
            f"DevFT's stages below full depth cost {early:.1f} FedIT rounds of device compute and what they hand "
            f"over was never measured for {model!r}; on SmolLM2 they were worth at most "
            f"{MEASURED['smollm2'].efficiency:.2f} of their compute (docs/results.md): measure before relying on "
            "DevFT to cost less than FedIT (benchmarks/payoff.py)"
        )
    if measured.efficiency >= 1:
        return None
    return (
        f"DevFT is predicted to cost more device compute than FedIT to reach FedIT's quality with the same fleet: "
        f"its stages below full depth cost {early:.1f} FedIT rounds of compute and, measured on {model}, hand over "
        f"at most {measured.efficiency:.2f} of that ({measured.source}), so about "
        f"{early * (1 - measured.efficiency):.1f} rounds more than FedIT; DevFT pays where devices cannot train the "
        "full model (docs/results.md)"
    )
