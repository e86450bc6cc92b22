"""Device compute in full-model-step equivalents: what a local step of a ``d``-layer submodel costs.

Wall seconds on a shared 2-core machine swing 10-100x with whatever else runs, so comparing
methods by wall time alone is fragile. Device compute is counted instead as the number of local
training steps, each weighted by the cost of a step of its submodel's depth relative to a step of
the full model: ``cost(d) = (a + b d) / (a + b L)``. The constant ``a`` is the part that does not
shrink with depth (embedding, final norm, LM head and the loss over the vocabulary: on SmolLM2 28M
of its 135M parameters), ``b`` one decoder block.

Where a model's costs were measured on an idle machine (``benchmarks/step_cost.py``), the affine fit
of those timings is used (:data:`MEASURED`); otherwise the FLOP count of
:func:`devft_edge.memory.step_flops`, which is machine-independent but ignores that small matrix
products run less efficiently than large ones. Both come with where they came from
(:attr:`StepCostModel.source`).
"""

from __future__ import annotations

from dataclasses import dataclass

from devft_edge.errors import ConfigError
from devft_edge.memory import ModelShape, StepConfig, step_flops

__all__ = ["MEASURED", "StepCostModel", "step_cost_model"]


MEASURED: dict[tuple[str, int, int], dict[int, float]] = {
    # benchmarks/results/step_cost/smollm2-b4-s64.json (2026-11-29, idle 2-core x86-64, torch 2.13
    # CPU, 2 threads, 12 timed steps x 3 rotating repeats, medians; tests/test_step_cost.py checks
    # they agree): fit intercept 0.211, so cost(4) = 0.32, cost(8) = 0.42, cost(15) = 0.61.
    ("smollm2", 4, 64): {
        1: 0.39465,
        2: 0.49122,
        4: 0.51404,
        6: 0.66383,
        8: 0.72004,
        12: 0.89403,
        15: 1.14768,
        20: 1.35639,
        30: 1.70266,
    },
}
"""Median step seconds per submodel depth, measured on an idle machine, by (model, batch, seq)."""


@dataclass(frozen=True)
class StepCostModel:
    """Relative cost of one local step of a ``d``-layer submodel; 1.0 is a full-model step."""

    total_layers: int
    intercept: float
    """``a / (a + b L)``: the share of a full step that does not depend on depth."""
    source: str
    """``measured (...)`` or ``flops``."""

    def __call__(self, layers: int) -> float:
        """``cost(layers)`` in full-model-step equivalents."""
        if not 1 <= layers <= self.total_layers:
            raise ConfigError(f"layers must be in 1..{self.total_layers}, got {layers}")
        return self.intercept + (1.0 - self.intercept) * layers / self.total_layers


def _affine_fit(points: dict[int, float]) -> tuple[float, float]:
    """Least-squares ``seconds = a + b d`` over the measured depths."""
    xs, ys = list(points), list(points.values())
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if n < 2 or sxx == 0:
        raise ConfigError("a step-cost fit needs measurements at two or more depths")
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return my - b * mx, b


def step_cost_model(model: str, shape: ModelShape, batch: int, seq: int, rank: int = 8) -> StepCostModel:
    """The step-cost model of ``model``'s submodels at ``batch x seq`` (measured, else FLOPs)."""
    total = shape.num_layers
    points = MEASURED.get((model, batch, seq))
    if points:
        a, b = _affine_fit(points)
        return StepCostModel(total, a / (a + b * total), f"measured ({model}, batch {batch}, seq {seq})")
    full = step_flops(shape, StepConfig(layers=total, batch=batch, seq=seq, rank=rank))
    one = step_flops(shape, StepConfig(layers=1, batch=batch, seq=seq, rank=rank))
    per_block = (full - one) / (total - 1) if total > 1 else 0.0
    return StepCostModel(total, (one - per_block) / full, "flops")
