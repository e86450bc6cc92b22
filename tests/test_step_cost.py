"""Step cost in full-model-step equivalents: the measured table, its fit, the FLOP fallback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from devft_edge.errors import ConfigError
from devft_edge.memory import model_shape
from devft_edge.models import load_config
from devft_edge.step_cost import MEASURED, _affine_fit, step_cost_model

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "step_cost"


def test_measured_table_is_the_benchmarks_result():
    for (model, batch, seq), points in MEASURED.items():
        data = json.loads((RESULTS / f"{model}-b{batch}-s{seq}.json").read_text())
        assert {int(k): v for k, v in data["median_seconds"].items()} == points


def test_affine_fit_recovers_a_line():
    a, b = _affine_fit({1: 3.0, 2: 5.0, 10: 21.0})
    assert a == pytest.approx(1.0) and b == pytest.approx(2.0)
    with pytest.raises(ConfigError):
        _affine_fit({4: 1.0})


def test_smollm2_costs_from_measurement_agree_with_flops():
    shape = model_shape(load_config("smollm2"))
    measured = step_cost_model("smollm2", shape, 4, 64)
    flops = step_cost_model("other", shape, 4, 64)
    assert measured.source.startswith("measured") and flops.source == "flops"
    assert measured(30) == pytest.approx(1.0) and flops(30) == pytest.approx(1.0)
    assert 0.25 < measured(4) < 0.35  # the 28M-parameter embedding/head does not shrink with depth
    for depth in (1, 4, 8, 15):
        assert measured(depth) < measured(depth + 1)
        assert measured(depth) == pytest.approx(flops(depth), abs=0.05)
    with pytest.raises(ConfigError):
        measured(31)
    # another batch or sequence length is not what was measured: the FLOP model is used
    assert step_cost_model("smollm2", shape, 8, 64).source == "flops"
