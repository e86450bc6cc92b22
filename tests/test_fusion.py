"""Tests of the layer-fusion variants and of fusing whole layer state dicts."""

from __future__ import annotations

import logging

import pytest
import torch

from devft_edge.errors import ConfigError
from devft_edge.fusion import DBLF, FUSIONS, fuse_layers


def _t(*values: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def test_registry_names_and_default_beta() -> None:
    assert FUSIONS.names() == ["dblf", "mean", "one", "sum"]
    dblf = FUSIONS.get("dblf")
    assert isinstance(dblf, DBLF) and dblf.beta == 0.1


def test_dblf_hand_computed() -> None:
    # [1,2] + 0.1 * (([3,4]-[1,2]) + ([5,8]-[1,2])) = [1,2] + 0.1 * [6,8] = [1.6, 2.8]
    out = FUSIONS.get("dblf", beta=0.1).fuse([_t(1, 2), _t(3, 4), _t(5, 8)])
    torch.testing.assert_close(out, _t(1.6, 2.8), rtol=0, atol=1e-6)
    assert out.dtype == torch.float32
    assert FUSIONS.get("dblf", beta=0.1).coefficients(3) == pytest.approx([0.8, 0.1, 0.1])


def test_dblf_matches_coefficients_on_random_tensors() -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, 4, generator=gen, dtype=torch.float64) for _ in range(4)]
    fusion = FUSIONS.get("dblf", beta=0.15)
    expected = sum(c * t for c, t in zip(fusion.coefficients(4), tensors, strict=True))
    torch.testing.assert_close(fusion.fuse(tensors), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_singleton_is_exact_copy(dtype: torch.dtype) -> None:
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1)).to(dtype)
    for name in FUSIONS.names():
        out = FUSIONS.get(name).fuse([x])
        assert torch.equal(out, x) and out.dtype == dtype
        assert out.data_ptr() != x.data_ptr()


def test_auto_beta() -> None:
    auto = FUSIONS.get("dblf", beta="auto")
    assert auto.beta_for(3) == pytest.approx(0.1)
    assert auto.beta_for(20) == pytest.approx(0.05)
    assert auto.coefficients(20) == pytest.approx([0.05] * 20)
    capped = FUSIONS.get("dblf", beta="auto", beta_cap=0.4)
    assert capped.beta_for(2) == pytest.approx(0.4) and capped.beta_for(5) == pytest.approx(0.2)
    out = capped.fuse([_t(0, 0), _t(5, 10)])
    torch.testing.assert_close(out, _t(2.0, 4.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("beta", [0, -1, 1.5, "half", True])
def test_beta_out_of_range(beta: object) -> None:
    with pytest.raises(ConfigError, match=r"beta must be in \(0, 1\]"):
        FUSIONS.get("dblf", beta=beta)


def test_beta_cap_validated() -> None:
    with pytest.raises(ConfigError, match="beta_cap"):
        DBLF(beta="auto", beta_cap=0.0)


def test_warning_when_anchor_weight_not_positive(caplog: pytest.LogCaptureFixture) -> None:
    fusion = FUSIONS.get("dblf", beta=0.1)
    tensors = [torch.full((2,), float(i)) for i in range(12)]  # anchor weight 1 - 1.1 < 0
    with caplog.at_level(logging.WARNING, logger="devft_edge.fusion"):
        out = fusion.fuse(tensors)
        fusion.fuse(tensors)  # warned once per group size
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "anchor weight" in warnings[0].getMessage()
    torch.testing.assert_close(out, torch.full((2,), 6.6), rtol=0, atol=1e-5)  # 0.1 * 66
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="devft_edge.fusion"):
        FUSIONS.get("dblf", beta=0.1).fuse(tensors[:10])  # anchor weight 0.1 > 0
        FUSIONS.get("dblf", beta="auto").fuse(tensors)
    assert not caplog.records


def test_one_sum_mean() -> None:
    tensors = [_t(1, 2), _t(3, 4), _t(5, 9)]
    torch.testing.assert_close(FUSIONS.get("one").fuse(tensors), _t(1, 2), rtol=0, atol=0)
    torch.testing.assert_close(FUSIONS.get("sum").fuse(tensors), _t(9, 15), rtol=0, atol=0)
    torch.testing.assert_close(FUSIONS.get("mean").fuse(tensors), _t(3, 5), rtol=0, atol=1e-6)
    assert FUSIONS.get("one").coefficients(3) == [1.0, 0.0, 0.0]
    assert FUSIONS.get("sum").coefficients(2) == [1.0, 1.0]
    assert FUSIONS.get("mean").coefficients(4) == [0.25] * 4


def test_fuse_rejects_shape_mismatch() -> None:
    with pytest.raises(ConfigError, match="member 1 has shape"):
        FUSIONS.get("mean").fuse([_t(1, 2), _t(1, 2, 3)])
    with pytest.raises(ConfigError):
        FUSIONS.get("dblf").fuse([])


def test_fuse_layers_groups_and_anchor_order() -> None:
    layers = [{"w": _t(float(i), 2.0 * i), "b": _t(float(i))} for i in range(5)]
    fused = fuse_layers(layers, [[0], [3, 1, 2], [4]], FUSIONS.get("dblf", beta=0.5))
    assert len(fused) == 3
    assert torch.equal(fused[0]["w"], layers[0]["w"]) and torch.equal(fused[2]["b"], layers[4]["b"])
    # anchor = layer 1: 1 + 0.5 * ((2-1) + (3-1)) = 2.5
    torch.testing.assert_close(fused[1]["b"], _t(2.5), rtol=0, atol=1e-6)
    torch.testing.assert_close(fused[1]["w"], _t(2.5, 5.0), rtol=0, atol=1e-6)
    assert set(fused[1]) == {"w", "b"}


def test_fuse_layers_rejects_mismatches_all_at_once() -> None:
    layers = [
        {"w": torch.zeros(2, 3), "b": torch.zeros(3)},
        {"w": torch.zeros(3, 2), "b": torch.zeros(3)},
        {"w": torch.zeros(2, 3)},
        {"w": torch.zeros(2, 3), "b": torch.zeros(3)},
    ]
    with pytest.raises(ConfigError) as info:
        fuse_layers(layers, [[0, 1], [2, 3]], FUSIONS.get("mean"))
    assert len(info.value.problems) == 2
    assert "'w' has shape (3, 2) in layer 1" in str(info.value)
    assert "layer 3 keys differ from anchor layer 2: has extra ['b']" in str(info.value)


def test_fuse_layers_rejects_bad_indices() -> None:
    with pytest.raises(ConfigError, match="outside 0..1"):
        fuse_layers([{"w": _t(1)}, {"w": _t(2)}], [[0, 2], []], FUSIONS.get("one"))
