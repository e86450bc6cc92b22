"""Resource planning: which device classes can train which DevFT stage, and at what cost.

For every stage of the schedule the planner counts the submodel (layers, parameters, LoRA size),
the bytes a device receives once per stage (the pack) and per round (the global LoRA) and sends
back per round (its update), and for every device profile predicts the peak memory of a local
training step (:mod:`devft_edge.memory`), whether it fits the profile's budget, the largest batch
that fits and the step time. When a stage does not fit a device it says what would make it fit,
and it derives a schedule capped to the weakest device.

A plan is data (frozen dataclasses) that renders as text or as a JSON document; nothing here
trains or measures. ``--check`` (in the CLI) measures the plan's predictions with
:mod:`devft_edge.memcheck`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

from devft_edge.errors import ConfigError
from devft_edge.handover import cost_warning, early_rounds
from devft_edge.memory import (
    FLOAT,
    ModelShape,
    StepConfig,
    base_weight_bytes,
    estimate_memory,
    estimate_step_seconds,
    gib,
    max_batch,
    max_layers,
    on_device,
)
from devft_edge.profiles import DeviceProfile
from devft_edge.schedule import StageSchedule
from devft_edge.step_cost import step_cost_model

CHECK_FIELDS = ("measured_peak_bytes", "predicted_local_bytes")
"""Stage fields present only in a checked plan."""

STRONGER = {
    "none": ("bf16", "fp16", "int8", "int4", "nf4"),
    "fp16": ("int8", "int4", "nf4"),
    "bf16": ("int8", "int4", "nf4"),
    "int8": ("int4", "nf4"),
    "int4": (),
    "nf4": (),
}
"""Quantizations that store base weights in fewer bytes than the key, weakest first."""


@dataclass(frozen=True)
class PlanSettings:
    """What the plan is for: the schedule and the local training step."""

    stages: int = 4
    """DevFT stages S (doubling depths, the last at full depth)."""
    rank: int = 8
    """LoRA rank."""
    batch: int = 4
    """Examples per local step."""
    seq: int = 64
    """Tokens per example."""
    quant: str = "none"
    """Base-weight quantization of the packs."""
    quant_embeddings: bool = True
    """Quantize the embedding/head too (ignored for ``none``)."""
    checkpointing: bool = False
    """Gradient checkpointing on the devices."""
    tokenizer_bytes: int = 0
    """Tokenizer files shipped in every pack."""
    rounds: int = 12
    """Round budget of the run (for the predicted cost against FedIT)."""
    round_split: str = "depth"
    """How the rounds are shared out over the stages (``depth`` or ``equal``)."""

    def step(self, layers: int) -> StepConfig:
        """The local training step these settings describe, on a ``layers``-block submodel."""
        return StepConfig(
            layers=layers,
            batch=self.batch,
            seq=self.seq,
            rank=self.rank,
            quant=self.quant,
            quant_embeddings=self.quant_embeddings,
            checkpointing=self.checkpointing,
        )


@dataclass(frozen=True)
class DeviceFit:
    """One profile against one stage."""

    peak_bytes: int
    budget_bytes: int
    fits: bool
    max_batch: int
    """Largest batch that fits at the planned seq and quantization (0: none)."""
    step_seconds: float
    parts: dict[str, int]
    """The predicted peak by part (see :mod:`devft_edge.memory`)."""
    advice: tuple[str, ...] = ()
    """What to change when it does not fit, cheapest first."""
    pack_seconds: float = 0.0
    """Downloading the stage's pack at the profile's downlink speed (once per stage)."""
    round_transfer_seconds: float = 0.0
    """Per round: the global LoRA down and the update up at the profile's link speeds."""


@dataclass(frozen=True)
class StagePlan:
    """One stage: the submodel, its traffic, and every profile's fit."""

    stage: int
    layers: int
    params_total: int
    params_trainable: int
    pack_bytes: int
    """Base weights at the planned quantization + starting LoRA (fp32) + tokenizer."""
    bytes_down: int
    """Per device and round: the global LoRA the device starts from (the pack comes once per stage)."""
    bytes_up: int
    """Per device and round: the trained LoRA (FedIT; FedSA-LoRA sends only A, about half)."""
    profiles: dict[str, DeviceFit]
    measured_peak_bytes: int | None = None
    """``--check``: measured peak of a training step of this stage on the planning machine."""
    predicted_local_bytes: int | None = None
    """``--check``: the model's prediction for the planning machine (CPU backend), to compare."""


@dataclass(frozen=True)
class Plan:
    """A whole plan: one :class:`StagePlan` per stage plus the capped schedule."""

    model: str
    settings: PlanSettings
    stages: list[StagePlan]
    max_layers: dict[str, int] = field(default_factory=dict)
    """Deepest submodel each profile can train with the planned settings."""
    capped_capacities: tuple[int, ...] | None = None
    """Stage depths capped to the weakest profile, when it cannot train every stage."""
    cost_warning: str | None = None
    """When DevFT is predicted to cost more device compute than FedIT (:mod:`devft_edge.handover`)."""

    def to_json(self) -> dict[str, object]:
        """The machine-readable document of ``devft-edge plan --json``."""
        return {
            "model": self.model,
            "settings": asdict(self.settings),
            "stages": [
                {
                    **{
                        k: v
                        for k, v in asdict(s).items()
                        if k != "profiles" and (v is not None or k not in CHECK_FIELDS)
                    },
                    "profiles": {name: asdict(fit) for name, fit in s.profiles.items()},
                }
                for s in self.stages
            ],
            "max_layers": self.max_layers,
            "capped_capacities": list(self.capped_capacities) if self.capped_capacities else None,
            "cost_warning": self.cost_warning,
        }


def _advice(shape: ModelShape, step: StepConfig, profile: DeviceProfile) -> tuple[str, ...]:
    """Changes that make ``step`` fit ``profile``, cheapest first; empty when nothing does."""
    budget = profile.budget_bytes
    fits = lambda s: estimate_memory(shape, s).peak_bytes <= budget  # noqa: E731
    advice = []
    batch = max_batch(shape, step, budget)
    if batch >= 1:
        advice.append(f"lower --batch to {batch}")
    if not step.checkpointing and fits(replace(step, checkpointing=True)):
        advice.append("enable gradient checkpointing (--checkpointing)")
    for quant in STRONGER[step.quant]:
        if quant in profile.quantizations and fits(replace(step, quant=quant)):
            advice.append(f"quantize base weights stronger (--quant {quant})")
            break
    if step.quant != "none" and not step.quant_embeddings and fits(replace(step, quant_embeddings=True)):
        advice.append("quantize the embeddings too")
    seqs = [q for q in (512, 384, 256, 192, 128, 96, 64, 48, 32, 16) if q < step.seq and fits(replace(step, seq=q))]
    if seqs:
        advice.append(f"shorten --seq to {seqs[0]}")
    cap = max_layers(shape, step, budget)
    if cap >= 1:
        advice.append(f"cap this device class at {cap} layers (it skips deeper stages)")
    return tuple(advice) or ("nothing in reach: this device cannot train even one block at batch 1",)


def step_seconds(shape: ModelShape, model_name: str, step: StepConfig, profile: DeviceProfile) -> float:
    """Step time on ``profile``: the FLOP estimate, rescaled by a step measured on that device class
    (``profile.measured_step``) when one was measured for the same model."""
    estimate = estimate_step_seconds(shape, step, profile.compute.sustained_gflops)
    measured = profile.measured_step
    if measured is None or measured.model != model_name:
        return estimate
    at_measured = StepConfig(
        layers=measured.layers,
        batch=measured.batch,
        seq=measured.seq,
        rank=step.rank,
        quant=measured.quant,
        backend=step.backend,
    )
    return (
        estimate * measured.step_seconds / estimate_step_seconds(shape, at_measured, profile.compute.sustained_gflops)
    )


def fit_profile(shape: ModelShape, step: StepConfig, profile: DeviceProfile, model_name: str = "") -> DeviceFit:
    """Predict ``step`` on ``profile``."""
    step = on_device(step, profile)
    estimate = estimate_memory(shape, step)
    budget = profile.budget_bytes
    supported = step.quant in profile.quantizations
    fits = supported and estimate.peak_bytes <= budget
    advice: tuple[str, ...] = ()
    if not supported:
        advice = (
            f"this device cannot compute with {step.quant} weights; use one of {', '.join(profile.quantizations)}",
        )
    elif not fits:
        advice = _advice(shape, step, profile)
    return DeviceFit(
        peak_bytes=estimate.peak_bytes,
        budget_bytes=budget,
        fits=fits,
        max_batch=max_batch(shape, step, budget) if supported else 0,
        step_seconds=round(step_seconds(shape, model_name, step, profile), 4),
        parts=estimate.parts,
        advice=advice,
    )


def _with_transfer(fit: DeviceFit, profile: DeviceProfile, pack_bytes: int, lora_bytes: int) -> DeviceFit:
    down, up = profile.network.downlink_mbps * 1e6 / 8, profile.network.uplink_mbps * 1e6 / 8
    return replace(
        fit,
        pack_seconds=round(pack_bytes / down, 2),
        round_transfer_seconds=round(lora_bytes / down + lora_bytes / up, 2),
    )


def capped_capacities(capacities: Sequence[int], cap: int) -> tuple[int, ...] | None:
    """Stage depths with every stage at most ``cap`` layers (duplicates dropped); None if no cap is needed.

    The last stage then trains a submodel rather than the full model; its LoRA reaches the full
    model by the ordinary stage transfer.
    """
    if cap >= max(capacities):
        return None
    capped = sorted({min(c, cap) for c in capacities if cap >= 1})
    return tuple(capped) or None


def plan(shape: ModelShape, model_name: str, profiles: Sequence[DeviceProfile], settings: PlanSettings) -> Plan:
    """Plan every stage against every profile."""
    if not profiles:
        raise ConfigError("plan needs at least one device profile (--profile NAME)")
    schedule = StageSchedule(
        num_layers=shape.num_layers,
        num_stages=settings.stages,
        total_rounds=max(settings.rounds, settings.stages),
        round_split=settings.round_split,
    )
    stages = []
    for number, layers in enumerate(schedule.capacities, start=1):
        step = settings.step(layers)
        lora_bytes = FLOAT * shape.lora_params(layers, settings.rank)
        pack_bytes = (
            base_weight_bytes(shape, layers, settings.quant, settings.quant_embeddings)
            + lora_bytes
            + settings.tokenizer_bytes
        )
        stages.append(
            StagePlan(
                stage=number,
                layers=layers,
                params_total=shape.params_total(layers),
                params_trainable=shape.lora_params(layers, settings.rank),
                pack_bytes=pack_bytes,
                bytes_down=lora_bytes,
                bytes_up=lora_bytes,
                profiles={
                    p.name: _with_transfer(fit_profile(shape, step, p, model_name), p, pack_bytes, lora_bytes)
                    for p in profiles
                },
            )
        )
    top = settings.step(1)
    deepest = {
        p.name: max_layers(shape, on_device(top, p), p.budget_bytes) if settings.quant in p.quantizations else 0
        for p in profiles
    }
    weakest = min(deepest.values())
    cost = step_cost_model(model_name, shape, settings.batch, settings.seq, settings.rank)
    return Plan(
        model=model_name,
        settings=settings,
        stages=stages,
        max_layers=deepest,
        capped_capacities=capped_capacities(schedule.capacities, weakest) if weakest >= 1 else None,
        cost_warning=cost_warning(model_name, early_rounds(schedule.capacities, schedule.rounds_per_stage, cost)),
    )


def with_measurements(plan_: Plan, shape: ModelShape, measured_peaks: Sequence[int]) -> Plan:
    """The plan with each stage's measured peak and the prediction for the measuring (CPU) machine."""
    stages = []
    for stage, measured in zip(plan_.stages, measured_peaks, strict=True):
        step = plan_.settings.step(stage.layers)
        stages.append(
            replace(stage, measured_peak_bytes=measured, predicted_local_bytes=estimate_memory(shape, step).peak_bytes)
        )
    return replace(plan_, stages=stages)


def render(plan_: Plan) -> str:
    """The human-readable plan ``devft-edge plan`` prints."""
    s = plan_.settings
    lines = [
        f"plan for {plan_.model}: S={s.stages} stages, LoRA r={s.rank}, batch {s.batch} x seq {s.seq}, "
        f"weights {s.quant}{'' if s.quant == 'none' or s.quant_embeddings else ' (embeddings fp32)'}"
        f"{', gradient checkpointing' if s.checkpointing else ''}",
        "",
        "stage  layers  params    trainable  pack       down/round  up/round",
    ]
    for st in plan_.stages:
        lines.append(
            f"{st.stage:>5}  {st.layers:>6}  {st.params_total / 1e6:>6.1f} M  {st.params_trainable / 1e6:>7.2f} M  "
            f"{gib(st.pack_bytes):>9}  {gib(st.bytes_down):>10}  {gib(st.bytes_up):>8}"
        )
    names = list(plan_.stages[0].profiles)
    width = max(len(n) for n in names)
    for st in plan_.stages:
        lines += ["", f"stage {st.stage} ({st.layers} layers):"]
        for name in names:
            fit = st.profiles[name]
            lines.append(
                f"  {name:<{width}}  peak {gib(fit.peak_bytes):>9} of {gib(fit.budget_bytes):>9}  "
                f"{'fits' if fit.fits else 'DOES NOT FIT':<12}  max batch {fit.max_batch:>4}  "
                f"step {fit.step_seconds:.2f} s  pack {fit.pack_seconds:.0f} s"
            )
            lines += [f"  {'':<{width}}  -> {a}" for a in fit.advice]
    lines += ["", "deepest submodel per profile: " + ", ".join(f"{n} {k}" for n, k in plan_.max_layers.items())]
    if plan_.capped_capacities:
        caps = ",".join(map(str, plan_.capped_capacities))
        lines.append(
            f"schedule capped to the weakest profile: stage depths {caps} "
            "(the last stage's LoRA is transferred to the full model)"
        )
    if plan_.cost_warning:
        lines += ["", f"warning: {plan_.cost_warning}"]
    checked = [st for st in plan_.stages if st.measured_peak_bytes and st.predicted_local_bytes]
    if checked:
        lines += ["", "predicted vs measured peak of a training step on this machine (fresh process per stage):"]
        for st in checked:
            error = 100.0 * (st.predicted_local_bytes - st.measured_peak_bytes) / st.measured_peak_bytes  # type: ignore[operator]
            lines.append(
                f"  stage {st.stage} ({st.layers:>2} layers): predicted {gib(st.predicted_local_bytes)}, "  # type: ignore[arg-type]
                f"measured {gib(st.measured_peak_bytes)}, error {error:+.1f}%"
            )  # type: ignore[arg-type]
    return "\n".join(lines)
