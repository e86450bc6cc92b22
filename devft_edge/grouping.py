"""Layer grouping: partition the ``L`` decoder layers into ``L_s`` groups, one per fused layer.

Deconfliction-guided layer grouping (DGLG, DevFT Sec. 3) puts layers that are alike in the same
group, so that fusing each group into one representative loses little. The paper cuts the layer
graph ``W`` with spectral clustering: unnormalised Laplacian ``Lap = D - W``, embedding by the
eigenvectors of the ``L_s`` smallest eigenvalues, k-means on the rows. That is the relaxation of
the RatioCut objective ``sum_g cut(g, V \\ g) / |g|``. The groups shown in the paper are
contiguous, and a submodel is easiest to reason about when they are, so the default here
(``contiguous``) solves the ratio-association objective (maximise within-segment similarity)
*exactly* over contiguous segmentations by dynamic programming. ``contiguous_ratiocut`` solves
RatioCut the same way; on SmolLM2's CKA matrix it isolates the weakly linked first and last layers
as singletons and fuses a 21-layer middle group, which DBLF cannot fuse sensibly, so it is not the
default. The paper-literal spectral variant and the paper's ablation baselines (``random``,
``even``) are options.

Every variant returns a partition of ``range(L)`` into exactly ``n_groups`` non-empty groups, each
group's members ascending, groups ordered by their first (shallowest) member, which is the
anchor of differential-based layer fusion. The result is deterministic for a given seed: only
local ``numpy.random.default_rng(seed)`` / ``random_state=seed`` generators are used.
The similarity matrix is symmetrised, ``(W + W^T) / 2``, before use.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from devft_edge.errors import ConfigError, raise_if
from devft_edge.registry import Registry

__all__ = [
    "GROUPINGS",
    "ContiguousSegmentation",
    "EvenGrouping",
    "Grouping",
    "RandomGrouping",
    "SpectralGrouping",
    "even_groups",
    "even_sizes",
]


def even_sizes(n_layers: int, n_groups: int) -> list[int]:
    """Near-equal segment sizes (differ by at most 1), the larger ones last (deepest)."""
    base, extra = divmod(n_layers, n_groups)
    return [base] * (n_groups - extra) + [base + 1] * extra


def even_groups(n_layers: int, n_groups: int) -> list[list[int]]:
    """Contiguous groups of :func:`even_sizes`: layers ``0..n_layers-1`` in order."""
    groups, start = [], 0
    for size in even_sizes(n_layers, n_groups):
        groups.append(list(range(start, start + size)))
        start += size
    return groups


def _canonical(groups: list[list[int]]) -> list[list[int]]:
    """Members ascending, groups ordered by their first member; plain Python ints."""
    return sorted(([int(m) for m in sorted(g)] for g in groups), key=lambda g: g[0])


class Grouping:
    """Base of the grouping variants: validates input, then calls :meth:`_partition`."""

    name: str
    paper: str

    def group(self, similarity: Tensor, n_groups: int, seed: int = 0) -> list[list[int]]:
        """Partition ``range(L)`` into ``n_groups`` groups using the ``[L, L]`` ``similarity``."""
        w = torch.as_tensor(similarity).detach().to("cpu", torch.float64)
        problems: list[str] = []
        if w.dim() != 2 or w.shape[0] != w.shape[1]:
            raise ConfigError(f"similarity must be a square [L, L] matrix, got shape {tuple(w.shape)}")
        n_layers = w.shape[0]
        if n_layers < 1:
            problems.append("similarity is empty (L = 0)")
        if not torch.isfinite(w).all():
            problems.append("similarity has non-finite entries")
        if isinstance(n_groups, bool) or not isinstance(n_groups, int):
            problems.append(f"n_groups must be an int, got {n_groups!r}")
        elif not 1 <= n_groups <= n_layers:
            problems.append(f"n_groups={n_groups} must be between 1 and L={n_layers}")
        raise_if(problems)
        arr = w.numpy()
        groups = _canonical(self._partition((arr + arr.T) / 2, n_groups, seed))
        assert len(groups) == n_groups and sorted(m for g in groups for m in g) == list(range(n_layers))
        return groups

    def _partition(self, w: np.ndarray, n_groups: int, seed: int) -> list[list[int]]:
        raise NotImplementedError


GROUPINGS: Registry[Grouping] = Registry("grouping")


@GROUPINGS.register("contiguous", objective="association")
@GROUPINGS.register("contiguous_ratiocut", objective="ratiocut")
class ContiguousSegmentation(Grouping):
    """Exact optimal segmentation of the layer sequence into contiguous groups (default).

    ``objective="ratiocut"`` (``contiguous_ratiocut``) minimises
    ``sum_g cut(g, V \\ g) / |g|`` with ``cut(g, V \\ g) = sum_{i in g, j not in g} W_ij``, the
    objective whose relaxation is DGLG's spectral step, but over contiguous segments only, where it
    can be solved exactly. For a segment ``[a, b)``,
    ``cut = sum_{i in [a,b)} d_i - sum_{i,j in [a,b)} W_ij`` with ``d_i = sum_j W_ij``.

    ``objective="association"`` (``contiguous``, the default) instead minimises
    ``-sum_g W(g, g) / |g|`` (maximises ratio association, i.e. the kernel k-means objective with
    kernel ``W``: "maximise within-segment similarity"). The two agree when all degrees are equal;
    RatioCut rewards isolating weakly connected layers (low degree) as singletons, which on real
    CKA matrices leaves one very large middle group, while ratio association gives more balanced
    groups.

    1-D and 2-D prefix sums make each segment's cost O(1) and the DP ``O(n_groups * L^2)``. Ties go
    to the earliest cut point (strict ``<`` while scanning ascending), so the answer is
    deterministic. The seed is unused.
    """

    name = "contiguous"
    paper = "DevFT DGLG objective (RatioCut / ratio association), solved exactly over contiguous segments"

    def __init__(self, objective: Literal["ratiocut", "association"] = "association") -> None:
        if objective not in ("ratiocut", "association"):
            raise ConfigError(f"objective must be 'ratiocut' or 'association', got {objective!r}")
        self.objective = objective
        self.name = "contiguous_ratiocut" if objective == "ratiocut" else "contiguous"

    def _partition(self, w: np.ndarray, n_groups: int, seed: int) -> list[list[int]]:
        n = w.shape[0]
        block = np.zeros((n + 1, n + 1))
        block[1:, 1:] = w.cumsum(0).cumsum(1)
        degree = np.concatenate([[0.0], w.sum(1).cumsum()])

        def cost(a: int, b: int) -> float:
            within = block[b, b] - block[a, b] - block[b, a] + block[a, a]
            if self.objective == "association":
                return float(-within / (b - a))
            return float((degree[b] - degree[a] - within) / (b - a))

        best = np.full((n_groups + 1, n + 1), np.inf)
        back = np.zeros((n_groups + 1, n + 1), dtype=int)
        best[0, 0] = 0.0
        for k in range(1, n_groups + 1):
            for b in range(k, n - (n_groups - k) + 1):
                for a in range(k - 1, b):
                    value = best[k - 1, a] + cost(a, b)
                    if value < best[k, b]:
                        best[k, b], back[k, b] = value, a
        cuts, b = [], n
        for k in range(n_groups, 0, -1):
            a = int(back[k, b])
            cuts.append(list(range(a, b)))
            b = a
        return cuts


@GROUPINGS.register("spectral")
class SpectralGrouping(Grouping):
    """Paper-literal DGLG: unnormalised spectral clustering of the layer graph; may be non-contiguous.

    ``Lap = D - W`` with ``D = diag(sum_j W_ij)``; rows of the eigenvectors of the ``n_groups``
    smallest eigenvalues (``numpy.linalg.eigh``, float64) embed the layers; k-means
    (``KMeans(n_clusters=n_groups, n_init=10, random_state=seed)``) clusters them. The diagonal of
    ``W`` is zeroed first for clarity; it cancels in ``D - W`` and so has no effect. ``n_groups = L``
    gives singletons and ``n_groups = 1`` one group without clustering. If k-means returns fewer
    than ``n_groups`` distinct clusters (e.g. duplicate embedding rows), a :class:`ConfigError` is
    raised rather than silently returning fewer groups.
    """

    name = "spectral"
    paper = "DevFT (Wu et al., ICLR 2026), DGLG: Laplacian eigenvectors + k-means"

    def _partition(self, w: np.ndarray, n_groups: int, seed: int) -> list[list[int]]:
        n = w.shape[0]
        if n_groups == n:
            return [[i] for i in range(n)]
        if n_groups == 1:
            return [list(range(n))]
        from sklearn.cluster import KMeans  # type: ignore[import-untyped]

        w = w.copy()
        np.fill_diagonal(w, 0.0)
        lap = np.diag(w.sum(1)) - w
        _, vectors = np.linalg.eigh(lap)
        embedding = vectors[:, :n_groups]
        labels = KMeans(n_clusters=n_groups, n_init=10, random_state=seed).fit(embedding).labels_
        groups = [np.flatnonzero(labels == c).tolist() for c in range(n_groups)]
        empty = sum(1 for g in groups if not g)
        if empty:
            raise ConfigError(
                f"spectral grouping: k-means left {empty} of {n_groups} clusters empty; "
                "the similarity graph does not separate that many groups"
            )
        return groups


@GROUPINGS.register("random")
class RandomGrouping(Grouping):
    """Ablation baseline (paper: random grouping): a seeded permutation cut into ``even`` sizes."""

    name = "random"
    paper = "DevFT ablation: random layer grouping"

    def _partition(self, w: np.ndarray, n_groups: int, seed: int) -> list[list[int]]:
        order = np.random.default_rng(seed).permutation(w.shape[0]).tolist()
        groups, start = [], 0
        for size in even_sizes(w.shape[0], n_groups):
            groups.append(order[start : start + size])
            start += size
        return groups


@GROUPINGS.register("even")
class EvenGrouping(Grouping):
    """Ablation baseline (paper: even grouping): contiguous near-equal segments, larger ones last."""

    name = "even"
    paper = "DevFT ablation: even layer grouping"

    def _partition(self, w: np.ndarray, n_groups: int, seed: int) -> list[list[int]]:
        return even_groups(w.shape[0], n_groups)
