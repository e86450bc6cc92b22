"""Knowledge transfer between stages (DevFT, Sec. "knowledge transfer"): a small rule registry.

A transfer rule maps LoRA states both ways between the full model and a stage submodel whose block
``g`` stands for the original layers ``groups[g]``:

- ``expand`` (end of a stage): the representatives' trained LoRA -> every member layer;
- ``contract`` (start of the next stage): the full model's LoRA -> the new representatives'
  starting LoRA.

Rules:

``copy`` (the paper): ``LoRA_j <- LoRA(rep(g))`` for every member ``j`` (A and B copied), and the
representative starts from the fusion of its members' A and B (separately). A change ``dW = s B A``
learned once in the submodel is then applied ``n`` times in the full model (once per member), and
the next stage fuses ``n`` identical copies back into one, so each stage multiplies the effect of
what earlier stages learned by the group size.

``inv_n`` (project choice, beside the paper): every member gets ``(A, B / n)``, so in the residual
stream the group adds ``sum_j dW / n = dW``: the learned change is applied once, as in the
submodel (to first order: the members see slightly different inputs than the representative did).
The contraction is consistent with it: the representative of a new group of ``n'`` members starts
from ``(fuse(A), n' * fuse(B))``, which for identical members ``(A, B / n)`` is ``(A, (n'/n) B)``,
i.e. exactly the sum of those members' changes; re-fusing never doubles an effect.

Both rules return new tensors (clones) and agree on singleton groups, where they are exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

from torch import Tensor

from devft_edge.errors import ConfigError
from devft_edge.fusion import Fusion, fuse_layers
from devft_edge.lora import LoraState, join_layers, split_layers
from devft_edge.registry import Registry

__all__ = ["TRANSFERS", "CopyTransfer", "InverseGroupSize", "Transfer", "transfer_lora"]

Groups = Sequence[Sequence[int]]


class Transfer:
    """Base of the transfer rules; ``expand`` and ``contract`` are each other's counterpart."""

    name: ClassVar[str]
    paper: ClassVar[str]

    def member_scale(self, n: int) -> float:
        """Factor on B when a representative of ``n`` members is expanded to each member."""
        raise NotImplementedError

    def expand(self, stage_state: Mapping[str, Tensor], groups: Groups) -> LoraState:
        """Stage submodel LoRA -> full-model LoRA (layer ``j`` in group ``g`` from representative ``g``)."""
        reps = split_layers(stage_state)
        if sorted(reps) != list(range(len(groups))):
            raise ConfigError(f"stage LoRA has layers {sorted(reps)} but the group map has {len(groups)} groups")
        full: dict[int, dict[str, Tensor]] = {}
        for g, members in enumerate(groups):
            scale = self.member_scale(len(members))
            for j in members:
                full[j] = {name: t * scale if _output_side(name) else t.clone() for name, t in reps[g].items()}
        return join_layers(full)

    def contract(self, full_state: Mapping[str, Tensor], groups: Groups, fusion: Fusion) -> LoraState:
        """Full-model LoRA -> the representatives' starting LoRA: fuse A and B per group, then
        multiply B (or a dense delta) by ``1 / member_scale(n)``, undoing what :meth:`expand` divided."""
        layers = split_layers(full_state)
        ordered = [layers[j] for j in range(len(layers))]
        fused = fuse_layers(ordered, [list(g) for g in groups], fusion)
        for members, rep in zip(groups, fused, strict=True):
            scale = 1.0 / self.member_scale(len(members))
            for name in rep:
                if _output_side(name) and scale != 1.0:
                    rep[name] = rep[name] * scale
        return join_layers(dict(enumerate(fused)))


def _output_side(name: str) -> bool:
    """Whether a state entry scales the layer's output change linearly: LoRA's B, or a dense
    update (FLoRA's merged ``delta``, which transfers like a LoRA product)."""
    return name.endswith(("lora_B", ".delta"))


TRANSFERS: Registry[Transfer] = Registry("transfer rule")


@TRANSFERS.register("copy")
class CopyTransfer(Transfer):
    """The paper: each member gets the representative's A and B unchanged."""

    name = "copy"
    paper = "DevFT (Wu et al., ICLR 2026): LoRA_j <- LoRA(rep(g)) for every j in g"

    def member_scale(self, n: int) -> float:
        """Always 1: a copy."""
        return 1.0


@TRANSFERS.register("inv_n")
class InverseGroupSize(Transfer):
    """Each member gets ``(A, B / n)``: the group applies the learned change once, not ``n`` times."""

    name = "inv_n"
    paper = "project choice (docs/method.md): function-preserving transfer for residual blocks"

    def member_scale(self, n: int) -> float:
        """``1 / n``."""
        if n < 1:
            raise ConfigError(f"group size must be >= 1, got {n}")
        return 1.0 / n


def transfer_lora(stage_state: Mapping[str, Tensor], groups: Groups, rule: str = "copy") -> LoraState:
    """Expand a stage submodel's LoRA to the full model with the transfer rule called ``rule``."""
    return TRANSFERS.get(rule).expand(stage_state, groups)
