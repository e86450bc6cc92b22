"""Heal a fused stage submodel on the server: distil it toward the full model before devices train it.

Why: fusing a group of layers into one (:mod:`devft_edge.fusion`) breaks a small model. On SmolLM2
the 4-layer stage submodel starts at eval loss 18.75 against 2.93 for the full model, so the first
rounds of a stage spend their work repairing the fusion through the task LoRA, and that repair is
what the transfer then copies into the full model, where it does not belong. Offsite-tuning's
emulator (Xiao et al., 2023) answers the same problem for its compressed middle: distil the
compressed model toward the full one on text the server holds. Here the student is the fused
submodel, the teacher the full base model (without the task LoRA: the emulator must stand for the
base, and the task LoRA is trained on top of it), the data :mod:`devft_edge.server_text`.

Loss: ``KL(teacher || student)`` of the next-token distributions at the answer positions of the
server text, plus optionally ``hidden_weight`` times the normalised MSE between the student's
block outputs and the teacher's hidden states at the matching group boundaries (measured on
SmolLM2: with weight 1 the boundary MSE did not fall while the KL did, so the default is 0).

What is trained (``mode``):

- ``bake``: every parameter of the fused blocks (linear weights and norms); the healed weights
  replace the fused ones in the stage pack.
- ``adapter``: a rank-``rank`` low-rank update of each fused linear weight plus the norm weights,
  merged into the blocks afterwards; its factors are what a device that fuses the stage itself
  from the full pack needs besides the fusion coefficients (``HealResult.adapter``).

The teacher's final hidden states at the loss positions are computed once per text (a few MiB);
its logits are recomputed from them per step with the shared, frozen LM head, which is exact and
avoids holding ``positions x vocab`` floats. Memory: the student's trainable block weights with
AdamW's moments (16 bytes per parameter) plus one batch's activations.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedModel

from devft_edge.errors import raise_if
from devft_edge.layers import decoder_layers
from devft_edge.peak_memory import peak_bytes
from devft_edge.server_text import ServerText

__all__ = ["HealResult", "HealSettings", "Teacher", "heal_submodel"]

logger = logging.getLogger(__name__)

HEAL_MODES = ("bake", "adapter")


@dataclass(frozen=True)
class HealSettings:
    """Server-side distillation of each fused stage submodel toward the full model."""

    steps: int = 300
    """AdamW steps per stage submodel."""
    lr: float = 3e-4
    """Learning rate (bake: of the block weights; adapter: of the low-rank factors)."""
    batch: int = 4
    """Server-text sequences per step."""
    prompts: int = 256
    """Server-text sequences (prompts answered by the base model)."""
    new_tokens: int = 40
    """Longest sampled answer per prompt."""
    hidden_weight: float = 0.0
    """Weight of the normalised hidden-state MSE at group boundaries (0: logit KL only)."""
    mode: Literal["bake", "adapter"] = "bake"
    """``bake``: train the fused blocks' weights; ``adapter``: a low-rank update of them."""
    rank: int = 64
    """Rank of the heal adapter (``mode = adapter``)."""
    seed: int = 0
    """Seeds the server text and the batch order (not the run's seed: a heal is reusable)."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("steps", "batch", "prompts", "new_tokens", "rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"heal {name} must be an int >= 1, got {value!r}")
        if not self.lr > 0:
            problems.append(f"heal lr must be > 0, got {self.lr}")
        if not self.hidden_weight >= 0:
            problems.append(f"heal hidden_weight must be >= 0, got {self.hidden_weight}")
        if self.mode not in HEAL_MODES:
            problems.append(f"heal mode must be one of {', '.join(HEAL_MODES)}, got {self.mode!r}")
        raise_if(problems)


@dataclass(frozen=True)
class HealResult:
    """What healing one stage submodel cost the server and achieved."""

    seconds: float
    """Server wall time of the distillation (the teacher's states excluded: they are shared)."""
    peak_rss_bytes: int
    """The server process's high-water mark after healing."""
    kl_before: float
    """Mean KL on the first step's batch, before any update."""
    kl_after: float
    """Mean KL over the last 10% of steps."""
    trained_params: int
    adapter: dict[str, Tensor] = field(default_factory=dict)
    """``mode = adapter``: ``layers.{g}.{module}.heal_A`` / ``heal_B`` factors (the update is
    ``heal_B @ heal_A``) and ``layers.{g}.{norm}.weight_delta``; empty for ``bake``."""


class Teacher:
    """The full model's next-token targets on one :class:`ServerText`, computed once."""

    def __init__(self, full: PreTrainedModel, text: ServerText, boundaries: bool = False) -> None:
        self.text = text
        self.head = full.get_output_embeddings()
        self.layers = len(decoder_layers(full))
        finals, inner = [], []
        with torch.no_grad():
            for start in range(0, text.input_ids.shape[0], 16):
                out = full.base_model(input_ids=text.input_ids[start : start + 16], output_hidden_states=boundaries)
                mask = text.loss_mask[start : start + 16]
                finals.append(out.last_hidden_state[mask])
                if boundaries:  # hidden_states[k + 1] = output of block k (the last one is normed)
                    inner.append(torch.stack([h[mask] for h in out.hidden_states[1:-1]]))
        self.final = torch.cat(finals)
        """``[P, hidden]``: the full model's final (normed) hidden state at every loss position."""
        self.boundary = torch.cat(inner, dim=1) if boundaries else None
        """``[L - 1, P, hidden]``: output of block ``k`` (``k < L - 1``) at every loss position;
        only kept when asked for (``L x`` the memory of :attr:`final`)."""
        counts = text.loss_mask.sum(dim=1)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        """Row ``i``'s loss positions are ``final[offsets[i]:offsets[i + 1]]``."""

    def rows(self, index: Tensor) -> Tensor:
        """Indices into the position axis for the sequences ``index``, in mask order."""
        return torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in index.tolist()])


def _trainable(model: PreTrainedModel, settings: HealSettings) -> tuple[list[nn.Parameter], dict[str, Tensor]]:
    """Switch on what ``settings.mode`` trains; returns the parameters and, for the adapter, its factors."""
    params: list[nn.Parameter] = []
    factors: dict[str, Tensor] = {}
    gen = torch.Generator().manual_seed(settings.seed)
    for g, block in enumerate(decoder_layers(model)):
        for name, module in block.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter):
                continue
            if settings.mode == "bake" or weight.dim() == 1:
                weight.requires_grad_(True)
                params.append(weight)
            elif isinstance(module, nn.Linear):
                out_f, in_f = weight.shape
                a = nn.Parameter((torch.rand(settings.rank, in_f, generator=gen) * 2 - 1) / in_f**0.5)
                b = nn.Parameter(torch.zeros(out_f, settings.rank))
                module.register_parameter("heal_A", a)
                module.register_parameter("heal_B", b)
                module.register_forward_hook(_low_rank_hook)
                factors[f"layers.{g}.{name}.heal_A"], factors[f"layers.{g}.{name}.heal_B"] = a, b
                params += [a, b]
    return params, factors


def _low_rank_hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
    return output + (inputs[0] @ module.heal_A.T) @ module.heal_B.T  # type: ignore[operator]


def _merge_adapter(model: PreTrainedModel, factors: dict[str, Tensor]) -> None:
    """Fold the low-rank factors into the weights and remove them (hooks included)."""
    blocks = decoder_layers(model)
    with torch.no_grad():
        for key in [k for k in factors if k.endswith(".heal_A")]:
            index, _, rest = key[len("layers.") :].partition(".")
            module = blocks[int(index)].get_submodule(rest[: -len(".heal_A")])
            module.weight.add_(module.heal_B @ module.heal_A)
            del module.heal_A, module.heal_B
            module._forward_hooks.clear()


def heal_submodel(
    submodel: PreTrainedModel, groups: list[list[int]], teacher: Teacher, settings: HealSettings
) -> HealResult:
    """Distil ``submodel`` (fused blocks of ``groups``) toward the teacher, in place.

    The embeddings, final norm and LM head are the full model's own frozen tensors and stay
    untouched; only the fused blocks (or their low-rank update) learn.
    """
    problems = []
    if teacher.layers != sum(len(g) for g in groups):
        problems.append(f"teacher has {teacher.layers} layers, the groups cover {sum(map(len, groups))}")
    if settings.hidden_weight > 0 and teacher.boundary is None:
        problems.append("hidden_weight > 0 needs a Teacher built with boundaries=True")
    raise_if(problems)
    started = time.perf_counter()
    originals = {n: p.detach().clone() for n, p in submodel.named_parameters() if p.dim() == 1 and "layers" in n}
    params, factors = _trainable(submodel, settings)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    text, gen = teacher.text, torch.Generator().manual_seed(settings.seed + 1)
    ends = [g[-1] for g in groups[:-1]]  # block g's output stands for the teacher's after layer ends[g]
    head = submodel.get_output_embeddings()
    kls: list[float] = []
    submodel.train()
    for _ in range(settings.steps):
        index = torch.randint(0, text.input_ids.shape[0], (settings.batch,), generator=gen)
        rows = teacher.rows(index)
        mask = text.loss_mask[index]
        out = submodel.base_model(input_ids=text.input_ids[index], output_hidden_states=settings.hidden_weight > 0)
        student = F.log_softmax(head(out.last_hidden_state[mask]), dim=-1)
        with torch.no_grad():
            target = F.log_softmax(teacher.head(teacher.final[rows]), dim=-1)
        loss = F.kl_div(student, target, log_target=True, reduction="batchmean")
        kls.append(float(loss.detach()))
        if settings.hidden_weight > 0 and ends and teacher.boundary is not None:
            mse = sum(
                ((out.hidden_states[g + 1][mask] - teacher.boundary[end][rows]) ** 2).mean()
                / (teacher.boundary[end][rows] ** 2).mean()
                for g, end in enumerate(ends)
            )
            loss = loss + settings.hidden_weight * mse / len(ends)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    submodel.eval()
    adapter: dict[str, Tensor] = {}
    if settings.mode == "adapter":
        adapter = {k: v.detach().clone() for k, v in factors.items()}
        for name, p in submodel.named_parameters():
            if name in originals:
                adapter[f"layers.{_block_key(name)}.weight_delta"] = (p.detach() - originals[name]).clone()
        _merge_adapter(submodel, factors)
    submodel.requires_grad_(False)
    tail = kls[-max(1, len(kls) // 10) :]
    result = HealResult(
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_bytes(),
        kl_before=kls[0],
        kl_after=sum(tail) / len(tail),
        trained_params=sum(p.numel() for p in params),
        adapter=adapter,
    )
    logger.info(
        "healed %d-block submodel: KL %.3f -> %.3f in %.1f s (%d parameters)",
        len(groups),
        result.kl_before,
        result.kl_after,
        result.seconds,
        result.trained_params,
    )
    return result


def _block_key(param_name: str) -> str:
    """``model.layers.3.input_layernorm.weight`` -> ``3.input_layernorm``."""
    _, _, rest = param_name.partition("layers.")
    return rest.removesuffix(".weight")
