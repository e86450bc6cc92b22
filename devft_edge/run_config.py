"""One run configuration: what a federated run is, whoever runs it.

:class:`RunConfig` composes the core's settings — LoRA (:class:`~devft_edge.lora.LoraSettings`),
local training (:class:`~devft_edge.training.TrainSettings`), the stage recipe with its variants
(:class:`~devft_edge.stage.StageRecipe`, healing included) — with the schedule, the method, the
data and the evaluation. The simulator's, the aggregator's and the demo's configs extend it and
add only what their engine needs (clients, broker, state directory, devices). Every default is
stated once, on its field; the YAML keys are the field names and the CLI options are made from
the same fields (:mod:`devft_edge.cli.config_options`), so an option added here exists in
``simulate``, ``serve`` and ``demo`` at once.

The config is data (pydantic, frozen, unknown keys refused), validated on construction; the core
settings validate themselves (their ``__post_init__``), so a YAML file and a CLI line get the same
checks as code.
"""

from __future__ import annotations

from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from devft_edge.configfile import config_problems
from devft_edge.errors import ConfigError
from devft_edge.lora import LoraSettings
from devft_edge.methods import METHODS, rule_of, uses_devft
from devft_edge.profiles import Quantization
from devft_edge.run_loop import EvalPolicy, ExactMatch, FullEval
from devft_edge.schedule import DEFAULT_MIN_DELTA, Plateau, StageSchedule
from devft_edge.stage import StageRecipe
from devft_edge.training import TrainSettings

__all__ = ["ConfigModel", "RunConfig"]


class ConfigModel(BaseModel):
    """A validated, frozen config: unknown keys are refused, fields document themselves."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    def __init__(self, **data: Any) -> None:
        """Validate ``data``; a :class:`ConfigError` lists every problem (as the YAML loader's do)."""
        try:
            super().__init__(**data)
        except ValidationError as error:
            raise ConfigError(config_problems(error)) from None

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` applied, validated like a new config (``dataclasses.replace``)."""
        return type(self)(**{**self.model_dump(), **changes})


class RunConfig(ConfigModel):
    """Everything a federated run's numbers depend on; equal configs give equal numbers."""

    model: str = "smollm2"
    """``smollm2``, ``tiny[-family]`` or a local model directory."""
    method: str = "devft"
    """``devft`` (= devft+fedit), ``fedit``, ``fedsa``, ``flora``, ``devft+fedsa`` or ``devft+flora``."""
    per_round: int = Field(2, ge=1)
    """Clients (devices) selected per round, K."""
    seed: int = 0
    """Seeds data, client selection, LoRA init and training."""
    stages: int = Field(4, ge=1)
    """DevFT stages S (1 for methods without devft)."""
    rounds: int = Field(12, ge=1)
    """Total round budget, split over the stages per ``round_split``."""
    round_split: Literal["depth", "equal"] = "depth"
    """Rounds per stage: in proportion to stage depth, or the paper's ``equal``. On SmolLM2-135M the
    depth split ended 0.19 +- 0.05 lower in eval loss over 3 seeds at the same budget (docs/results.md)."""
    capacities: tuple[int, ...] | None = None
    """Stage depths instead of the doubling rule (e.g. ``8,15,30``); sets the number of stages."""
    stage_steps: Literal["fixed", "compute"] = "fixed"
    """Local steps per stage round: the same in every stage, or ``steps / cost(depth)`` so that a
    round of every stage costs what a full-depth round costs."""
    stop_after: int | None = Field(None, ge=1)
    """End the run after this stage's transfer (screening what early stages hand over, or trying a
    fleet on the first stage only); None: every stage."""
    adaptive_patience: int = Field(0, ge=0)
    """Leave a stage once its eval loss has not improved by ``adaptive_min_delta`` for this many
    evaluations; its unused rounds carry over. 0: fixed rounds."""
    adaptive_min_delta: float = Field(DEFAULT_MIN_DELTA, ge=0)
    """Smallest eval-loss decrease that counts as progress for the adaptive stage advance."""
    train: TrainSettings = TrainSettings()
    """Local training of one client round."""
    lora: LoraSettings = LoraSettings()
    """LoRA rank, alpha, targets."""
    recipe: StageRecipe = StageRecipe()
    """How each stage is built: similarity, grouping, fusion, transfer rule, kept ends, healing."""
    quant: Quantization = "int4"
    """Pack quantization: what devices download and the base weights they train on."""
    delivery: Literal["stage_packs", "full_pack"] = "stage_packs"
    """A pack per stage, or the full pack once plus a signed stage plan per stage (devices fuse)."""
    examples_per_client: int = Field(48, ge=1)
    """Synthetic training examples per client (before the non-IID split)."""
    data_alpha: float | None = Field(0.5, gt=0)
    """Dirichlet alpha over task families for the non-IID split; None (or 0) = IID."""
    eval_examples: int = Field(48, ge=0)
    """Held-out examples for eval loss and exact match (0: no evaluation; the aggregator only)."""
    eval_every: int = Field(EvalPolicy.every, ge=1)
    """Evaluate every this many rounds (and always after the last)."""
    full_eval: FullEval = EvalPolicy.full_eval
    """Evaluate the full model with the transferred LoRA after each ``stage``, every ``round``, or ``off``."""
    exact_match: ExactMatch = EvalPolicy.exact_match
    """Measure greedy exact match at every evaluation, or only at each stage's end (eval loss always)."""
    export_merged: bool = False
    """Also save the base model with the final LoRA merged in."""

    @field_validator("data_alpha", mode="before")
    @classmethod
    def _zero_is_iid(cls, value: object) -> object:
        return None if value in (0, "0") else value

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(METHODS)}")
        if self.devft and self.rounds < self.stage_count:
            raise ValueError(f"rounds {self.rounds} < stages {self.stage_count}: every stage needs a round")
        return self

    @property
    def devft(self) -> bool:
        """Whether the DevFT stage schedule is on (else one full-depth stage)."""
        return uses_devft(self.method)

    @property
    def rule(self) -> str:
        """The in-stage aggregation rule's name."""
        return rule_of(self.method)

    @property
    def stage_count(self) -> int:
        """Stages of the run: one without DevFT, else one per capacity (or ``stages``)."""
        if not self.devft:
            return 1
        return len(self.capacities) if self.capacities else self.stages

    def schedule(self, total_layers: int) -> StageSchedule:
        """The stage schedule of this run for a ``total_layers``-layer model."""
        capacities = self.capacities if self.devft else None
        return StageSchedule(total_layers, self.stage_count, self.rounds, capacities, round_split=self.round_split)

    def plateau(self) -> Plateau:
        """The adaptive stage advance's tracker, fresh for a stage."""
        return Plateau(self.adaptive_patience, self.adaptive_min_delta)

    def eval_policy(self) -> EvalPolicy:
        """When the round loop evaluates."""
        return EvalPolicy(self.eval_every, self.exact_match, self.full_eval)

    def run_fields(self) -> dict[str, Any]:
        """This config's :class:`RunConfig` part, as plain data (what another engine's config takes)."""
        return self.model_dump(mode="json", include=set(RunConfig.model_fields))
