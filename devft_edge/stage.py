"""The DevFT stage pipeline, written once for the simulator and the aggregator.

``open``: group the full model's layers (similarity of the LoRA-adapted layers), fuse each group
into one block, heal the fused submodel on the server when asked, and contract the full LoRA into
the submodel's starting LoRA. ``close``: expand the submodel's trained LoRA back to every layer
(knowledge transfer). The variant choices are one validated :class:`StageRecipe`; the paper's
literal reading is :data:`PAPER_RECIPE`.

Healing is the expensive step (minutes of server time per stage on 2 cores), so healed blocks are
cached on disk under a key of everything they depend on (model, groups, fusion, heal settings):
the aggregator resumes after ``kill -9`` without healing again, and benchmark runs of other seeds
reuse a heal of the same groups. The result records the seconds of the heal that produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from devft_edge.errors import ConfigError, raise_if
from devft_edge.fusion import FUSIONS, Fusion
from devft_edge.grouping import GROUPINGS
from devft_edge.healing import HealResult, HealSettings, Teacher, heal_submodel
from devft_edge.layers import decoder_layers, num_layers
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.server_text import ServerText, server_text
from devft_edge.similarity import SIMILARITIES
from devft_edge.submodel import build_submodel, stage_groups, stage_lora
from devft_edge.transfer import TRANSFERS

__all__ = ["PAPER_RECIPE", "Stage", "StageBuilder", "StageRecipe"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageRecipe:
    """How each DevFT stage is built from the full model (every choice the paper leaves open)."""

    similarity: str = "cka"
    """Layer similarity for grouping (``cka`` or the paper's ``weights``)."""
    grouping: str = "contiguous"
    """Grouping algorithm (``contiguous``, ``contiguous_ratiocut``, ``spectral``, ``random``, ``even``)."""
    fusion: str = "dblf"
    """Layer fusion (``dblf``, ``one``, ``sum``, ``mean``)."""
    beta: float | Literal["auto"] = FUSIONS.params("dblf")["beta"]
    """DBLF beta in (0, 1], or ``auto`` = min(0.1, 1/n)."""
    transfer: str = "copy"
    """Knowledge-transfer rule (``copy``: the paper; ``inv_n``: the group applies the change once)."""
    keep_ends: int = 0
    """Keep the first and last ``k`` layers unfused in every stage below full depth."""
    heal: HealSettings | None = None
    """Distil each fused submodel toward the full model on the server before its stage; None = off."""

    def __post_init__(self) -> None:
        problems = []
        for registry, name in (
            (SIMILARITIES, self.similarity),
            (GROUPINGS, self.grouping),
            (FUSIONS, self.fusion),
            (TRANSFERS, self.transfer),
        ):
            if name not in registry:
                problems.append(f"unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")
        if self.fusion in FUSIONS:
            try:  # the variant validates its own parameters
                self.build_fusion()
            except ConfigError as err:
                problems.extend(err.problems)
        if isinstance(self.keep_ends, bool) or not isinstance(self.keep_ends, int) or self.keep_ends < 0:
            problems.append(f"keep_ends must be an int >= 0, got {self.keep_ends!r}")
        raise_if(problems)

    def build_fusion(self) -> Fusion:
        """The fusion variant, with the parameters it declares taken from this recipe (DBLF's ``beta``)."""
        return FUSIONS.get(self.fusion, **{name: getattr(self, name) for name in FUSIONS.params(self.fusion)})


PAPER_RECIPE = StageRecipe()
"""The paper's literal reading (CKA similarity and contiguous groups are this project's documented
defaults where the paper's weight cosine carries no signal; docs/method.md)."""


@dataclass
class Stage:
    """One opened stage: what the server trains, packs and evaluates."""

    number: int
    """1-based stage number."""
    groups: list[list[int]]
    """``groups[g]`` = original layers fused into block g (singletons at full depth)."""
    model: PreTrainedModel
    """The fused (and, with healing, healed) submodel; no LoRA attached."""
    start: LoraState
    """The submodel's starting LoRA: the transfer rule's contraction of the full LoRA."""
    heal: HealResult | None = None
    """What healing cost and achieved (None: not healed, e.g. the full-depth stage)."""
    heal_cached: bool = False
    """The healed blocks came from the cache (``heal.seconds`` is the original heal's)."""


class StageBuilder:
    """Opens and closes the stages of one run; holds the server text and teacher once built."""

    def __init__(
        self,
        base: PreTrainedModel,
        tokenizer: object,
        lora: LoraSettings,
        recipe: StageRecipe,
        calibration: torch.Tensor,
        model_name: str,
        seed: int,
        cache_dir: Path | None = None,
    ) -> None:
        self.base, self.tokenizer, self.lora, self.recipe = base, tokenizer, lora, recipe
        self.calibration, self.model_name, self.seed = calibration, model_name, seed
        self.cache_dir = cache_dir
        self.fusion = recipe.build_fusion()
        self.similarity = SIMILARITIES.get(recipe.similarity)
        self.grouping = GROUPINGS.get(recipe.grouping)
        self.transfer = TRANSFERS.get(recipe.transfer)
        self.total = num_layers(base.config)
        self._teacher: Teacher | None = None
        first, last = decoder_layers(base)[0], decoder_layers(base)[-1]
        probe = b"".join(p.detach().contiguous().numpy().tobytes() for p in (*first.parameters(), *last.parameters()))
        self.fingerprint = hashlib.sha256(model_name.encode() + probe).hexdigest()[:16]
        """Identifies the base weights (a tiny model's depend on the seed) in cache keys."""

    def groups(self, number: int, capacity: int, full_lora: LoraState) -> list[list[int]]:
        """The groups of stage ``number`` with ``capacity`` blocks."""
        return stage_groups(
            self.base,
            capacity,
            self.similarity,
            self.grouping,
            self.lora,
            full_lora,
            self.calibration,
            self.seed + number,
            keep_ends=self.recipe.keep_ends if capacity < self.total else 0,
        )

    def open(self, number: int, capacity: int, full_lora: LoraState, groups: list[list[int]] | None = None) -> Stage:
        """Build stage ``number``: groups (unless given, e.g. on a resume), fused and healed
        submodel, starting LoRA."""
        groups = groups if groups is not None else self.groups(number, capacity, full_lora)
        model, heal, cached = self.submodel(groups)
        start = self.contract(full_lora, groups)
        return Stage(number=number, groups=groups, model=model, start=start, heal=heal, heal_cached=cached)

    def submodel(self, groups: list[list[int]]) -> tuple[PreTrainedModel, HealResult | None, bool]:
        """The fused submodel of ``groups``, healed when the recipe asks (from the cache when there),
        with the heal's result and whether it came from the cache."""
        model = build_submodel(self.base, groups, self.fusion).model
        if self.recipe.heal is None or len(groups) == self.total:
            return model, None, False
        heal, cached = self._heal(model, groups, self.recipe.heal)
        return model, heal, cached

    def contract(self, full_state: LoraState, groups: list[list[int]]) -> LoraState:
        """Full-model state -> a stage's space (the transfer rule's contraction)."""
        return stage_lora(full_state, groups, self.fusion, self.recipe.transfer)

    def expand(self, stage_state: LoraState, groups: list[list[int]]) -> LoraState:
        """A stage's state -> the full model (knowledge transfer)."""
        return self.transfer.expand(stage_state, groups)

    def _heal(self, model: PreTrainedModel, groups: list[list[int]], settings: HealSettings) -> tuple[HealResult, bool]:
        key = self._heal_key(groups, settings)
        cached = self._cache_path(f"heal-{key}.safetensors")
        blocks = decoder_layers(model)
        meta = _cached_meta(cached)
        if cached is not None and meta is not None:
            tensors = load_file(cached)
            with torch.no_grad():
                for name, tensor in tensors.items():
                    if name.startswith("block."):
                        index, _, rest = name[len("block.") :].partition(".")
                        blocks[int(index)].get_parameter(rest).copy_(tensor)
            adapter = {k[len("adapter.") :]: v for k, v in tensors.items() if k.startswith("adapter.")}
            return HealResult(**meta, adapter=adapter), True
        started = time.perf_counter()
        teacher = self.teacher(settings)  # built once (server text, teacher states): billed to the first heal
        result = heal_submodel(model, groups, teacher, settings)
        result = replace(result, seconds=time.perf_counter() - started)
        if cached is not None:
            tensors = {
                f"block.{g}.{n}": p.detach().contiguous() for g, b in enumerate(blocks) for n, p in b.named_parameters()
            }
            tensors.update({f"adapter.{k}": v.contiguous() for k, v in result.adapter.items()})
            cached.parent.mkdir(parents=True, exist_ok=True)
            meta = {k: v for k, v in asdict(result).items() if k != "adapter"}
            tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # runs side by side may heal at once
            save_file(tensors, tmp, metadata={"heal": json.dumps(meta)})  # one file, renamed whole: never torn
            tmp.replace(cached)
        return result, False

    def teacher(self, settings: HealSettings) -> Teacher:
        """The full model's targets on the server text (built once per builder)."""
        if self._teacher is None:
            self._teacher = Teacher(self.base, self._server_text(settings), boundaries=settings.hidden_weight > 0)
        return self._teacher

    def _server_text(self, settings: HealSettings) -> ServerText:
        key = hashlib.sha256(
            json.dumps([self.fingerprint, settings.prompts, settings.new_tokens, settings.seed]).encode()
        ).hexdigest()[:16]
        path = self._cache_path(f"server-text-{key}.safetensors")
        if path is not None and path.exists():
            tensors = load_file(path)
            return ServerText(input_ids=tensors["input_ids"], loss_mask=tensors["loss_mask"].bool())
        text = server_text(self.base, self.tokenizer, settings.prompts, settings.new_tokens, settings.seed)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            save_file({"input_ids": text.input_ids, "loss_mask": text.loss_mask.to(torch.uint8)}, tmp)
            tmp.replace(path)
        return text

    def _heal_key(self, groups: list[list[int]], settings: HealSettings) -> str:
        spec = [self.fingerprint, groups, self.recipe.fusion, str(self.recipe.beta), asdict(settings)]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def _cache_path(self, name: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / name


def _cached_meta(path: Path | None) -> dict[str, Any] | None:
    """The heal figures stored in a cached heal's own metadata; None when there is no usable entry
    (absent, or written by an older version that kept them in a separate file)."""
    if path is None or not path.exists():
        return None
    with safe_open(path, framework="pt") as handle:
        text = (handle.metadata() or {}).get("heal")
    return None if text is None else json.loads(text)
