"""Validation of a device's LoRA update before it may touch the global state.

A federated aggregator must assume updates can be wrong: a buggy or tampered agent, a device
whose training diverged, a file mixed up between stages. An update is accepted only if it has
exactly the task's tensors with the task's shapes, every value is finite, and its distance from
the LoRA the device started from is within a norm bound. Each failure maps to a protocol reason
code, so the device and the log say the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from devft_edge.protocol import ProtocolError, Reason

DEFAULT_MAX_UPDATE_NORM = 100.0
"""Bound on ``||update - start||`` (all factors together). A round of a few AdamW steps at
lr 3e-4 moves SmolLM2's LoRA by well under 10; a diverged run goes to inf quickly."""


def check_update(
    update: Mapping[str, Tensor],
    start: Mapping[str, Tensor],
    max_norm: float | None = DEFAULT_MAX_UPDATE_NORM,
) -> float:
    """Raise :class:`ProtocolError` unless ``update`` is a sane successor of ``start``; returns the norm.

    Reasons: ``shape`` (missing or extra tensors, other shapes, non-float dtypes), ``not_finite``
    (NaN or inf anywhere), ``norm`` (``||update - start||`` above ``max_norm``).
    """
    missing, extra = sorted(set(start) - set(update)), sorted(set(update) - set(start))
    if missing or extra:
        raise ProtocolError(Reason.SHAPE, f"tensors missing {missing[:5]}, unexpected {extra[:5]}")
    wrong = [
        f"{k}: {tuple(update[k].shape)} {update[k].dtype}"
        for k in sorted(start)
        if update[k].shape != start[k].shape or not update[k].is_floating_point()
    ]
    if wrong:
        raise ProtocolError(Reason.SHAPE, f"expected the task's float tensors; got {', '.join(wrong[:5])}")
    squared = 0.0
    for key in sorted(start):
        tensor = update[key].float()
        if not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(Reason.NOT_FINITE, f"{key} contains NaN or inf")
        squared += float((tensor - start[key].float()).pow(2).sum())
    norm = math.sqrt(squared)
    if max_norm is not None and norm > max_norm:
        raise ProtocolError(Reason.NORM, f"update moves the LoRA by {norm:.3g} > bound {max_norm:.3g}")
    return norm
