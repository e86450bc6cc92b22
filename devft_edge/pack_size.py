"""Bytes the real system sends for model weights, so the simulator counts what devices download.

The simulator runs without a network, but its byte counts must be the deployment's: a device
downloads a signed pack (:mod:`devft_edge.pack`) of the stage submodel at the run's quantization,
once per stage in which it is selected (it caches packs by hash). :class:`PackSizes` measures a
pack by writing the real one (from a copy of the submodel, so the caller's model stays fp32) and
remembers the size per stage.

Deliveries (how weights reach a device):

- ``stage_packs`` (today's aggregator): every stage is a self-contained pack (embeddings, fused
  blocks, tokenizer, starting LoRA).
- ``full_pack``: the device downloads the full model's pack once and builds each stage's fused
  submodel itself from a small signed stage plan (the groups, the fusion coefficients and, with
  healing, what the device cannot derive: the heal adapter, or the healed blocks themselves for
  a baked heal), so the weights of the full model cross the network once.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

from transformers import PreTrainedModel

from devft_edge.fusion import Fusion
from devft_edge.lora import LoraSettings, LoraState
from devft_edge.pack import write_pack
from devft_edge.quantization import QuantSpec
from devft_edge.stage import Stage
from devft_edge.stage_plan import write_stage_plan
from devft_edge.training import TrainSettings

__all__ = ["DELIVERIES", "pack_file_bytes", "plan_file_bytes"]

DELIVERIES = ("stage_packs", "full_pack")


def pack_file_bytes(
    model: PreTrainedModel,
    start: LoraState,
    groups: list[list[int]],
    *,
    model_name: str,
    lora: LoraSettings,
    quant: str,
    tokenizer_dir: Path,
) -> int:
    """Size of the (unsigned: a signature adds 64 bytes) pack of ``model`` at ``quant``."""
    with tempfile.TemporaryDirectory(prefix="devft-packsize-") as tmp:
        path = Path(tmp) / "stage.devpack"
        write_pack(
            path,
            copy.deepcopy(model),
            start,
            model_name=model_name,
            stage=1,
            stages=1,
            groups=groups,
            lora=lora,
            quant=QuantSpec(quant),
            training=TrainSettings(),
            tokenizer_dir=tokenizer_dir,
            created="1970-01-01T00:00:00Z",
        )
        return path.stat().st_size + 64


def plan_file_bytes(stage: Stage, fusion: Fusion, *, model_name: str, lora: LoraSettings, quant: str) -> int:
    """Size of the signed plan of ``stage`` (``full_pack`` delivery), written as the aggregator does."""
    with tempfile.TemporaryDirectory(prefix="devft-plansize-") as tmp:
        path = Path(tmp) / "stage.plan"
        write_stage_plan(
            path,
            stage,
            fusion,
            base_pack="0" * 64,
            quant=QuantSpec(quant),
            lora=lora,
            model_name=model_name,
            stages=stage.number,  # a plan's stage lies within its stages; the count does not change the size
            training=TrainSettings(),
            created="1970-01-01T00:00:00Z",
        )
        return path.stat().st_size + 64
