"""Layer fusion: collapse each group of decoder layers into one representative layer.

Differential-based layer fusion (DBLF, DevFT Sec. 3) keeps the group's shallowest layer as the
anchor and adds a fraction of every member's difference from it::

    rep(g) = theta_anchor + beta * sum_{j in g} (theta_j - theta_anchor)

applied to every parameter tensor of the block (attention, MLP, norms) and, for the
representative's initial LoRA, to A and B separately. The weights sum to one with anchor weight
``1 - beta (n - 1)``, which reaches zero or below once a group has ``n >= 1 + 1/beta`` members
(11 at the paper's beta = 0.1): the literal formula stays the default but logs a warning, and
``beta="auto"`` uses ``min(beta_cap, 1/n)`` instead. The paper's ablations are variants: anchor
only (``one``) and plain sum (``sum``); ``mean`` (uniform average) is the sensible reading of
"plain" merging, offered for comparison.

Tensors are combined in at least float32 (float64 stays float64) and cast back to the input
dtype; every variant returns a new tensor. A shape or key mismatch between members is an error.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor

from devft_edge.errors import ConfigError, raise_if
from devft_edge.registry import Registry

__all__ = ["DBLF", "FUSIONS", "AnchorOnly", "Fusion", "Mean", "PlainSum", "fuse_layers"]

logger = logging.getLogger(__name__)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class Fusion:
    """Base of the fusion variants; ``tensors[0]`` is always the anchor (shallowest member)."""

    name: ClassVar[str]
    paper: ClassVar[str]

    def coefficients(self, n: int) -> list[float]:
        """Weight of each of ``n`` members in the fused tensor, anchor first."""
        raise NotImplementedError

    def fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        """Fuse same-shape, same-dtype member tensors into a new tensor of that shape and dtype."""
        if len(tensors) == 0:
            raise ConfigError(f"fusion {self.name!r} needs at least one tensor")
        anchor = tensors[0]
        problems = [
            f"member {i} has shape {tuple(t.shape)} and dtype {t.dtype}, "
            f"anchor has {tuple(anchor.shape)} and {anchor.dtype}"
            for i, t in enumerate(tensors)
            if t.shape != anchor.shape or t.dtype != anchor.dtype
        ]
        raise_if(problems)
        return self._fuse(tensors)

    def _fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _check_n(n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"group size must be a positive int, got {n!r}")


FUSIONS: Registry[Fusion] = Registry("fusion")


@FUSIONS.register("dblf", params=("beta",), beta=0.1)
class DBLF(Fusion):
    """Differential-based layer fusion: ``theta_anchor + beta * sum_j (theta_j - theta_anchor)``.

    ``beta`` is the paper's coefficient (0.1 for 7B/8B, 0.15 for 13B), in ``(0, 1]``, or
    ``"auto"`` for ``beta_eff = min(beta_cap, 1/n)``, which keeps the anchor weight positive
    (at ``n > 1/beta_cap`` it becomes the uniform mean). The formula is evaluated as written, not
    through :meth:`coefficients`, so a singleton group returns exactly its input.
    """

    name = "dblf"
    paper = "DevFT (Wu et al., ICLR 2026), DBLF: rep = theta_a + beta * sum_j (theta_j - theta_a)"

    def __init__(self, beta: float | Literal["auto"] = 0.1, beta_cap: float = 0.1) -> None:
        problems: list[str] = []
        if beta != "auto" and (isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 < beta <= 1):
            problems.append(f"beta must be in (0, 1] or 'auto', got {beta!r}")
        if isinstance(beta_cap, bool) or not isinstance(beta_cap, int | float) or not 0 < beta_cap <= 1:
            problems.append(f"beta_cap must be in (0, 1], got {beta_cap!r}")
        raise_if(problems)
        self.beta = beta
        self.beta_cap = float(beta_cap)
        self._warned: set[int] = set()

    def beta_for(self, n: int) -> float:
        """Effective beta for a group of ``n`` members."""
        self._check_n(n)
        if self.beta == "auto":
            return min(self.beta_cap, 1.0 / n)
        return float(self.beta)

    def coefficients(self, n: int) -> list[float]:
        """``[1 - beta (n-1), beta, ..., beta]``."""
        beta = self.beta_for(n)
        return [1.0 - beta * (n - 1)] + [beta] * (n - 1)

    def _fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        n = len(tensors)
        beta = self.beta_for(n)
        anchor_weight = 1.0 - beta * (n - 1)
        if anchor_weight <= 0 and n not in self._warned:
            self._warned.add(n)
            logger.warning(
                "DBLF with beta=%s on a group of %d layers gives the anchor weight %.3f <= 0; consider beta='auto'",
                beta,
                n,
                anchor_weight,
            )
        anchor = tensors[0]
        cd = _compute_dtype(anchor.dtype)
        base = anchor.detach().to(cd)
        out = base.clone()
        if n > 1:
            diff = torch.zeros_like(base)
            for t in tensors[1:]:
                diff += t.detach().to(cd) - base
            out += beta * diff
        return out.to(anchor.dtype)


@FUSIONS.register("one")
class AnchorOnly(Fusion):
    """Ablation (paper: anchor only): the representative is a copy of the shallowest member."""

    name = "one"
    paper = "DevFT ablation: anchor layer only"

    def coefficients(self, n: int) -> list[float]:
        """``[1, 0, ..., 0]``."""
        self._check_n(n)
        return [1.0] + [0.0] * (n - 1)

    def _fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        return tensors[0].detach().clone()


@FUSIONS.register("sum")
class PlainSum(Fusion):
    """Ablation (paper: plain sum), literal: ``rep = sum_j theta_j`` (weights do not sum to one)."""

    name = "sum"
    paper = "DevFT ablation: plain sum of the group's layers"

    def coefficients(self, n: int) -> list[float]:
        """``[1, ..., 1]``."""
        self._check_n(n)
        return [1.0] * n

    def _fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        cd = _compute_dtype(tensors[0].dtype)
        out = tensors[0].detach().to(cd).clone()
        for t in tensors[1:]:
            out += t.detach().to(cd)
        return out.to(tensors[0].dtype)


@FUSIONS.register("mean")
class Mean(Fusion):
    """Uniform average ``rep = (1/n) sum_j theta_j``: the scale-preserving reading of "plain" merging."""

    name = "mean"
    paper = "DevFT ablation (plain merging), read as a uniform average; project choice"

    def coefficients(self, n: int) -> list[float]:
        """``[1/n, ..., 1/n]``."""
        self._check_n(n)
        return [1.0 / n] * n

    def _fuse(self, tensors: Sequence[Tensor]) -> Tensor:
        cd = _compute_dtype(tensors[0].dtype)
        out = torch.stack([t.detach().to(cd) for t in tensors]).mean(dim=0)
        return out.to(tensors[0].dtype)


def fuse_layers(
    layer_states: Sequence[Mapping[str, Tensor]],
    groups: list[list[int]],
    fusion: Fusion,
) -> list[dict[str, Tensor]]:
    """Fuse each group of layers into one state dict, tensor name by tensor name.

    ``layer_states[i]`` maps names (relative to the layer) to layer ``i``'s tensors. For each group
    the members are taken in ascending order, so the shallowest is the anchor. Returns one dict per
    group, in the order of ``groups``. All problems (bad indices, differing key sets, differing
    shapes) are collected and raised together as one :class:`ConfigError`.
    """
    problems: list[str] = []
    n_layers = len(layer_states)
    for g, members in enumerate(groups):
        if not members:
            problems.append(f"group {g} is empty")
        bad = [m for m in members if not 0 <= m < n_layers]
        if bad:
            problems.append(f"group {g} has layer indices {bad} outside 0..{n_layers - 1}")
    raise_if(problems)
    for g, members in enumerate(groups):
        ordered = sorted(members)
        keys = set(layer_states[ordered[0]])
        for m in ordered[1:]:
            other = set(layer_states[m])
            if other != keys:
                diff = [f"lacks {sorted(keys - other)}"] if keys - other else []
                diff += [f"has extra {sorted(other - keys)}"] if other - keys else []
                problems.append(f"group {g}: layer {m} keys differ from anchor layer {ordered[0]}: {', '.join(diff)}")
                continue
            for key in sorted(keys):
                a, b = layer_states[ordered[0]][key], layer_states[m][key]
                if a.shape != b.shape:
                    problems.append(
                        f"group {g}: {key!r} has shape {tuple(b.shape)} in layer {m} "
                        f"but {tuple(a.shape)} in anchor layer {ordered[0]}"
                    )
    raise_if(problems)
    fused: list[dict[str, Tensor]] = []
    for members in groups:
        ordered = sorted(members)
        fused.append({key: fusion.fuse([layer_states[m][key] for m in ordered]) for key in layer_states[ordered[0]]})
    return fused
