"""Tests of the layer-grouping variants: planted blocks, exact DP optimality, baselines, errors."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from devft_edge.errors import ConfigError
from devft_edge.grouping import GROUPINGS, even_sizes

BLOCKS = [[0, 1, 2], [3, 4, 5, 6], [7, 8, 9, 10, 11]]


def _planted(blocks: list[list[int]], seed: int = 0) -> torch.Tensor:
    n = sum(len(b) for b in blocks)
    w = np.full((n, n), 0.1)
    for b in blocks:
        w[np.ix_(b, b)] = 0.9
    noise = np.random.default_rng(seed).uniform(-0.03, 0.03, (n, n))
    w = w + (noise + noise.T) / 2
    np.fill_diagonal(w, 1.0)
    return torch.from_numpy(w)


def _ratio_cut(w: np.ndarray, groups: list[list[int]]) -> float:
    total = 0.0
    for g in groups:
        rest = [j for j in range(len(w)) if j not in g]
        total += sum(w[i, j] for i in g for j in rest) / len(g)
    return total


def _is_canonical_partition(groups: list[list[int]], n: int, k: int) -> bool:
    return (
        len(groups) == k
        and all(g and g == sorted(g) for g in groups)
        and [g[0] for g in groups] == sorted(g[0] for g in groups)
        and sorted(m for g in groups for m in g) == list(range(n))
        and all(type(m) is int for g in groups for m in g)
    )


def test_registry_names() -> None:
    assert GROUPINGS.names() == ["contiguous", "contiguous_ratiocut", "even", "random", "spectral"]
    assert GROUPINGS.get("contiguous_ratiocut").name == "contiguous_ratiocut"
    assert GROUPINGS.get("contiguous").name == "contiguous"
    with pytest.raises(ConfigError, match="objective"):
        GROUPINGS.get("contiguous_ratiocut", objective="ncut")


@pytest.mark.parametrize("name", ["contiguous_ratiocut", "contiguous", "spectral"])
def test_planted_contiguous_blocks_recovered(name: str) -> None:
    for seed in range(3):
        assert GROUPINGS.get(name).group(_planted(BLOCKS, seed), 3, seed=seed) == BLOCKS


def test_spectral_recovers_non_contiguous_blocks() -> None:
    blocks = [[0, 4, 8], [1, 3, 5, 9], [2, 6, 7, 10, 11]]
    assert GROUPINGS.get("spectral").group(_planted(blocks), 3, seed=0) == blocks
    contiguous = GROUPINGS.get("contiguous_ratiocut").group(_planted(blocks), 3)
    assert all(g == list(range(g[0], g[-1] + 1)) for g in contiguous)


def _neg_ratio_association(w: np.ndarray, groups: list[list[int]]) -> float:
    return -sum(sum(w[i, j] for i in g for j in g) / len(g) for g in groups)


@pytest.mark.parametrize(
    ("name", "objective"), [("contiguous_ratiocut", _ratio_cut), ("contiguous", _neg_ratio_association)]
)
@pytest.mark.parametrize("seed", [7, 8])
def test_contiguous_dp_matches_brute_force(name: str, objective: object, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 1, (8, 8))
    w = (a + a.T) / 2
    np.fill_diagonal(w, 1.0)
    best_cost, best_groups = np.inf, None
    for c1, c2 in itertools.combinations(range(1, 8), 2):
        groups = [list(range(c1)), list(range(c1, c2)), list(range(c2, 8))]
        cost = objective(w, groups)  # type: ignore[operator]
        if cost < best_cost - 1e-12:
            best_cost, best_groups = cost, groups
    got = GROUPINGS.get(name).group(torch.from_numpy(w), 3)
    assert objective(w, got) == pytest.approx(best_cost, abs=1e-12)  # type: ignore[operator]
    assert got == best_groups


def test_objectives_differ_on_a_similarity_chain() -> None:
    # W_ij = exp(-|i - j| / 2): the end layers have the lowest degree; RatioCut isolates one,
    # ratio association keeps the three segments balanced
    idx = np.arange(8)
    w = torch.from_numpy(np.exp(-np.abs(np.subtract.outer(idx, idx)) / 2.0))
    assert GROUPINGS.get("contiguous_ratiocut").group(w, 3) == [[0, 1], [2, 3, 4, 5, 6], [7]]
    assoc = GROUPINGS.get("contiguous").group(w, 3)
    assert sorted(len(g) for g in assoc) == [2, 3, 3]


@pytest.mark.parametrize("name", ["contiguous_ratiocut", "contiguous", "spectral", "random", "even"])
@pytest.mark.parametrize("k", [1, 2, 5, 12])
def test_every_variant_returns_canonical_partition(name: str, k: int) -> None:
    groups = GROUPINGS.get(name).group(_planted(BLOCKS), k, seed=3)
    assert _is_canonical_partition(groups, 12, k)
    if k == 12:
        assert groups == [[i] for i in range(12)]
    if k == 1:
        assert groups == [list(range(12))]


def test_even_sizes_larger_last() -> None:
    assert even_sizes(30, 4) == [7, 7, 8, 8]
    assert GROUPINGS.get("even").group(torch.eye(10, dtype=torch.float64), 4) == [[0, 1], [2, 3], [4, 5, 6], [7, 8, 9]]


def test_random_is_seeded_partition() -> None:
    grouping = GROUPINGS.get("random")
    w = torch.eye(16)
    a = grouping.group(w, 5, seed=11)
    assert _is_canonical_partition(a, 16, 5)
    assert sorted(len(g) for g in a) == sorted(even_sizes(16, 5))
    assert grouping.group(w, 5, seed=11) == a
    assert any(grouping.group(w, 5, seed=s) != a for s in range(12, 15))


@pytest.mark.parametrize("k", [0, 13, -1])
def test_n_groups_out_of_range(k: int) -> None:
    with pytest.raises(ConfigError, match=f"n_groups={k} must be between 1 and L=12"):
        GROUPINGS.get("contiguous_ratiocut").group(_planted(BLOCKS), k)


def test_non_square_and_non_finite_rejected() -> None:
    with pytest.raises(ConfigError, match="square"):
        GROUPINGS.get("even").group(torch.zeros(3, 4), 2)
    w = torch.eye(4)
    w[0, 1] = float("nan")
    with pytest.raises(ConfigError, match="non-finite"):
        GROUPINGS.get("spectral").group(w, 2)


def test_spectral_empty_cluster_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.cluster

    class CollapsingKMeans:
        """Stands in for a k-means run that puts every layer in one cluster."""

        def __init__(self, **_: object) -> None:
            pass

        def fit(self, x: np.ndarray) -> CollapsingKMeans:
            self.labels_ = np.array([0, 0, 1, 1, 1, 0])
            return self

    monkeypatch.setattr(sklearn.cluster, "KMeans", CollapsingKMeans)
    with pytest.raises(ConfigError, match="left 1 of 3 clusters empty"):
        GROUPINGS.get("spectral").group(torch.eye(6), 3, seed=0)
