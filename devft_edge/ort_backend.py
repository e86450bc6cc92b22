"""ONNX Runtime training backend (optional extra ``ort``): train a pack's LoRA with ``onnxruntime.training``.

For devices that run ONNX Runtime rather than PyTorch training. From a verified pack it builds
the ORT training artifacts (training, eval and optimizer models plus a checkpoint) in which only
the LoRA factors require gradients, and trains with ``onnxruntime.training.api``; the result is
the same canonical LoRA state the torch backend returns.

Export route (what ``onnxruntime-training`` 1.19.2, the last release, accepts): the pack's base is
dequantized to fp32 ``nn.Linear`` layers, LoRA is attached with peft, and a wrapper whose only
output is the scalar loss (labels shifted by hand, ``ignore_index=-100``, so no ORT loss block is
needed) is exported with the legacy TorchScript exporter (``dynamo=False``) with an explicit
attention mask, eager attention and constant folding off, so every LoRA factor stays an
initializer under its own name. ``onnxruntime-training`` needs ``onnx==1.17.0`` and must never
share an environment with plain ``onnxruntime``: it lives in its own virtualenv (``make venv-ort``).

Differences to the torch backend, by construction of ORT's artifacts: AdamW as ORT builds it
(no gradient clipping), and the frozen weights are fp32 in the artifacts, so the ORT path does
not get the quantized base's memory savings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from devft_edge.backends import TRAINERS, Stream, Trainer, TrainResult
from devft_edge.data import Example
from devft_edge.errors import ConfigError, DevFTError
from devft_edge.lora import LoraState
from devft_edge.pack import VerifiedPack
from devft_edge.training import TrainSettings

try:
    import onnxruntime
    from onnxruntime.training import api as ort_api
except ImportError as error:  # pragma: no cover - exercised where the extra is absent
    raise DevFTError(
        "the ort backend needs onnxruntime-training (and onnx==1.17.0) in its own environment: "
        f"run `make venv-ort` and use .venv-ort/bin/devft-edge ({error})"
    ) from None

onnxruntime.set_default_logger_severity(3)  # errors only: its info/warning stream is per graph pass

ARTIFACTS = "ort-artifacts"
NAMES_FILE = "lora_names.json"
"""ONNX initializer name -> canonical LoRA key, written next to the artifacts."""
OPSET = 17


def build_artifacts(pack: VerifiedPack, directory: str | Path) -> Path:
    """Export the pack's submodel with LoRA and generate ORT training artifacts in ``directory``."""
    import onnx
    import torch
    import torch.nn.functional as F
    from onnxruntime.training import artifacts
    from torch import nn

    from devft_edge.lora import attach_lora, lora_modules, set_lora_state
    from devft_edge.pack import load_pack
    from devft_edge.quantization import dequantize_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model, lora_state = load_pack(pack)
    dequantize_model(model)
    model.set_attn_implementation("eager")
    model.config.use_cache = False
    settings = pack.manifest.lora
    peft_model = attach_lora(model, settings)
    set_lora_state(peft_model, lora_state)
    for module in peft_model.modules():  # dropout is identity in eval; export the deterministic graph
        if isinstance(module, nn.Dropout):
            module.p = 0.0

    class LossModel(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            logits = self.inner(input_ids=input_ids, attention_mask=attention_mask).logits
            vocab = logits.shape[-1]
            return F.cross_entropy(
                logits[:, :-1].reshape(-1, vocab).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )

    wrapper = LossModel(peft_model).eval()
    names_by_param = {id(p): n for n, p in wrapper.named_parameters()}
    lora_names = {}
    for key, module in lora_modules(peft_model).items():
        lora_names[names_by_param[id(module.lora_A["default"].weight)]] = f"{key}.lora_A"
        lora_names[names_by_param[id(module.lora_B["default"].weight)]] = f"{key}.lora_B"
    example = torch.ones(2, 16, dtype=torch.long)
    onnx_path = directory / "model.onnx"
    torch.onnx.export(
        wrapper,
        (example, torch.ones_like(example), example),
        str(onnx_path),
        input_names=["input_ids", "attention_mask", "labels"],
        output_names=["loss"],
        dynamic_axes={name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask", "labels")},
        opset_version=OPSET,
        # TRAINING mode: initializers are deduplicated by identity only, not by value; in EVAL mode
        # every all-zero LoRA B (B starts at zero) would collapse into one shared initializer.
        training=torch.onnx.TrainingMode.TRAINING,
        do_constant_folding=False,
        export_params=True,
        dynamo=False,
    )
    proto = onnx.load(str(onnx_path))
    initializers = {init.name for init in proto.graph.initializer}
    missing = sorted(set(lora_names) - initializers)
    if missing:
        raise DevFTError(f"ONNX export lost LoRA parameters (renamed or folded): {missing[:5]}")
    requires_grad = sorted(lora_names)
    frozen = sorted(initializers - set(lora_names))
    artifacts.generate_artifacts(
        proto,
        requires_grad=requires_grad,
        frozen_params=frozen,
        loss=None,  # the exported graph's output already is the loss
        optimizer=artifacts.OptimType.AdamW,
        artifact_directory=str(directory),
        ort_format=False,
    )
    onnx_path.unlink()
    (directory / NAMES_FILE).write_text(json.dumps(lora_names, indent=1, sort_keys=True) + "\n")
    return directory


@TRAINERS.register("ort")
class OrtTrainer(Trainer):
    """``onnxruntime.training.api`` on artifacts built from the pack (cached in the pack directory)."""

    name = "ort"

    def train(
        self,
        pack: VerifiedPack,
        examples: Sequence[Example],
        settings: TrainSettings,
        seed: int,
        start: LoraState | None = None,
        delta: LoraState | None = None,
        stream: Stream | None = None,
    ) -> TrainResult:
        import numpy as np
        import torch
        from transformers import AutoTokenizer

        if delta:
            raise ConfigError(
                "the ort backend trains the pack's base as exported; FLoRA's merged update would need a new "
                "training graph per round: train this task with --backend torch"
            )
        if settings.checkpointing:
            raise ConfigError(
                "the ort backend has no gradient checkpointing: its training graph is exported once per "
                "pack; train this task with --backend torch"
            )
        directory = pack.directory / ARTIFACTS
        if not (directory / NAMES_FILE).exists():
            build_artifacts(pack, directory)
        lora_names: dict[str, str] = json.loads((directory / NAMES_FILE).read_text())
        state = ort_api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
        module = ort_api.Module(str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx"))
        if start is not None:  # after the Module exists: the state's parameters are bound to it then
            arrays = {
                name: np.ascontiguousarray(start[key].detach().float().numpy()) for name, key in lora_names.items()
            }
            for name, array in arrays.items():
                state.parameters[name].data = array
        optimizer = ort_api.Optimizer(str(directory / "optimizer_model.onnx"), module)
        optimizer.set_learning_rate(settings.lr)
        tokenizer = AutoTokenizer.from_pretrained(pack.directory)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        batches = (stream or Stream(seed)).batches(examples, settings, tokenizer)
        module.train()
        losses = []
        for _ in range(settings.steps):
            batch = next(batches)
            loss = module(
                batch["input_ids"].numpy().astype(np.int64),
                batch["attention_mask"].numpy().astype(np.int64),
                batch["labels"].numpy().astype(np.int64),
            )
            optimizer.step()
            module.lazy_reset_grad()
            losses.append(float(loss))
        lora = {
            key: torch.from_numpy(np.array(state.parameters[name].data, dtype=np.float32))
            for name, key in lora_names.items()
        }
        return TrainResult(
            lora=dict(sorted(lora.items())), num_samples=len(examples), train_loss=sum(losses) / len(losses)
        )
