"""A memory and step-time model of one local LoRA training step of a stage submodel.

The planner has to say, before anything is shipped, whether a stage's submodel trains within a
device's memory budget. The peak resident memory of a training process is modelled as a sum of
parts, each counted from the architecture (a meta-device skeleton of the model, so any supported
family is counted exactly) and a few calibrated coefficients:

``peak = runtime + weights + lora + activations + logits + dequant``

- ``runtime``: the Python process with torch, transformers and peft imported, the tokenizer
  loaded and the local data tokenized; a measured constant of the CPU training stack
  (``RUNTIME_BYTES``).
- ``weights``: the frozen base weights at the pack's quantization (exact bytes per scheme;
  norms stay fp32; embeddings/head quantized or not per the :class:`QuantSpec`).
- ``lora``: LoRA factors, their gradients and AdamW's two moments, plus the two fp32 copies of
  the starting LoRA a device agent holds while it trains (the pack's and the round's): 24 bytes
  per parameter.
- ``activations``: what autograd keeps between forward and backward. Per token and block it is
  proportional to the block's saved width (:meth:`ModelShape.saved_width`: every linear output,
  and each LoRA target's ``rank``-wide ``A x``), coefficient ``ACT_COEF``, plus ``HEAP_COEF``
  for the narrow (at most ``hidden``-wide) part of that width whose tensors fall below the
  agent's mmap threshold (:func:`heap_width`: freed heap blocks stay resident as holes under the
  tensors kept for backward, mapped ones are returned). A fixed amount per block was fitted too
  and came out zero. No ``s^2`` term: training batches carry no attention mask
  (:func:`devft_edge.training.causal_batch`), so torch's CPU ``scaled_dot_product_attention``
  takes its causal kernel, which never materialises the scores (the calibration includes seq 512
  and fits no quadratic term). With gradient checkpointing only each block's input (``hidden``
  floats per token) is kept, plus one block recomputed; while those inputs are heap tensors
  themselves every block's heap holes stay pinned under them (:func:`step_counts`).
- ``logits``: ``b * s * vocab`` floats times ``LOGIT_COEF`` (logits, their log-softmax and
  gradient; for a 135M model with a 49k vocabulary this is the largest activation).
- ``dequant``: a quantized layer's fp32 weight exists while it computes, at most
  ``CHUNK_ROWS`` rows at a time (the LM head is the biggest), in a per-thread buffer that every
  layer reuses and that therefore stays resident for the whole step
  (:func:`devft_edge.quantization.scratch`).

The heap term is why the model is not a plain count of tensors: the same activations cost more
below the threshold than above it, and only by the sizes glibc's allocator sees. The agent keeps
that threshold at 128 KiB, so at SmolLM2's sizes little is left on the heap; with it at 1 MiB
the heap's holes made up to 34% of a peak, moved it by up to 20% between runs of the same step
and needed terms of their own (docs/planning.md, "The allocator finding").
The coefficients are fitted to measured peaks on the development machine, on a calibration set
of configurations, and tested on held-out ones (batch 1-16, seq 64-512, rank 4-32, fp32/int8/int4,
with and without checkpointing) by ``benchmarks/memory_model.py`` (see ``docs/memory_model.md``);
the fit, the held-out error against the goal and the run-to-run spread of the measured peak
itself are reported there, not assumed.

Step time is FLOPs over the device's sustained GEMM throughput times an efficiency factor
measured here (training is not one big GEMM).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from devft_edge.allocator import MMAP_THRESHOLD_BYTES
from devft_edge.errors import ConfigError
from devft_edge.profiles import QUANTIZATIONS, DeviceProfile
from devft_edge.quantization import CHUNK_ROWS, QuantSpec

FLOAT = 4
"""Bytes of one fp32 value: training computes in fp32 on CPU devices."""

# Calibrated with the agent's 128 KiB mmap threshold (2026-11-30) on the development machine (2-core
# x86-64, torch 2.13 CPU, transformers 5.23, peft 0.21) by ``benchmarks/memory_model.py fit`` on its
# calibration rows; see docs/memory_model.md for the held-out error against the goal of issue 16 item 3.
RUNTIME_BYTES = 486 * 2**20
"""Resident memory of the training process before any weight is loaded."""
ACT_COEF = 2.027
"""Saved fp32 values per token per unit of block saved width (see :meth:`ModelShape.saved_width`)."""
LOGIT_COEF = 2.897
"""fp32 ``[tokens, vocab]`` tensors alive at the loss."""
HEAP_COEF = 4.572
"""Extra fp32 values per token per unit of *heap* activation width (see :func:`heap_width`)."""
STEP_EFFICIENCY = 0.476
"""Fraction of the sustained GEMM throughput a LoRA training step achieves."""
LORA_BYTES_PER_PARAM = 6 * FLOAT
"""Factor, gradient, AdamW's two moments, and the agent's two copies of the starting LoRA."""
RUNTIME_REFERENCE_BYTES = 323 * 2**20
"""Anonymous resident memory of a fresh Python process with torch, transformers and peft imported,
on the machine ``RUNTIME_BYTES`` was fitted on, as :func:`devft_edge.device_probe.runtime_bytes`
measures it (2026-11-30: 323 MiB in every run, in two venvs). A device whose profile measured its
own runtime is predicted with the difference: the libraries differ by platform (aarch64 torch 2.10
under qemu: 411 MiB, docs/edge.md)."""
CUDA_RUNTIME_BYTES = 1 * 2**30
"""Extra process memory of a CUDA context with cuBLAS on Jetson-class devices. Not calibrated
here (no GPU on the development machine): an estimate from NVIDIA's Jetson documentation."""


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block: ``out x in`` weights."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs to know about a model, counted on a skeleton."""

    model_type: str
    num_layers: int
    hidden: int
    vocab: int
    heads: int
    block_linears: tuple[Linear, ...]
    """Linear layers of one decoder block (every block of the supported families is the same)."""
    block_other_params: int
    """Per-block parameters outside linear layers (norms, biases), kept fp32."""
    embed_params: int
    head_params: int
    """LM head weight parameters; 0 when tied to the embedding."""
    other_params: int
    """Final norm and anything else outside blocks, embedding and head (fp32)."""
    lora_targets: tuple[str, ...]

    @property
    def act_width(self) -> int:
        """Sum of the block's linear output features: its per-token activation width."""
        return sum(lin.out_features for lin in self.block_linears)

    def saved_width(self, rank: int) -> int:
        """Per-token width autograd keeps for a block with LoRA of ``rank``: every linear output,
        and each LoRA target's ``rank``-wide ``A x`` (the input of ``B``)."""
        return self.act_width + rank * sum(lin.name in self.lora_targets for lin in self.block_linears)

    @property
    def block_params(self) -> int:
        """Parameters of one block."""
        return sum(lin.out_features * lin.in_features for lin in self.block_linears) + self.block_other_params

    def params_total(self, layers: int) -> int:
        """Parameters of a submodel with ``layers`` blocks."""
        return self.embed_params + self.head_params + self.other_params + layers * self.block_params

    def lora_params(self, layers: int, rank: int) -> int:
        """Trainable LoRA parameters (A and B of every target) of ``layers`` blocks."""
        per_block = sum(
            rank * (lin.in_features + lin.out_features) for lin in self.block_linears if lin.name in self.lora_targets
        )
        return layers * per_block

    def delta_params(self, layers: int) -> int:
        """Entries of a dense update of every LoRA target of ``layers`` blocks (FLoRA's merged update)."""
        return layers * sum(
            lin.in_features * lin.out_features for lin in self.block_linears if lin.name in self.lora_targets
        )


def model_shape(config: object) -> ModelShape:
    """Count a HF config's model on a meta-device skeleton (no weights are allocated)."""
    import torch
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModelForCausalLM

    from devft_edge.layers import architecture_of, decoder_layers, num_layers

    arch = architecture_of(config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    block = decoder_layers(model)[0]
    linears, other = [], 0
    for name, module in block.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            out_f, in_f = (weight.shape[1], weight.shape[0]) if type(module).__name__ == "Conv1D" else weight.shape
            linears.append(Linear(name.rpartition(".")[2], int(out_f), int(in_f)))
            other += module.bias.numel() if module.bias is not None else 0
        else:
            other += sum(p.numel() for p in module.parameters(recurse=False))
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    # The config says whether the head is tied (a meta skeleton may not share the tensor yet).
    tied = head is None or bool(getattr(config, "tie_word_embeddings", False)) or head.weight is embed.weight
    total = sum(p.numel() for p in model.parameters() if not (tied and head is not None and p is head.weight))
    blocks = num_layers(config) * (sum(lin.out_features * lin.in_features for lin in linears) + other)
    head_params = 0 if tied else head.weight.numel()
    hidden = int(embed.weight.shape[1])
    return ModelShape(
        model_type=arch.model_type,
        num_layers=num_layers(config),
        hidden=hidden,
        vocab=int(embed.weight.shape[0]),
        heads=int(getattr(config, "num_attention_heads", 1)),
        block_linears=tuple(linears),
        block_other_params=int(other),
        embed_params=int(embed.weight.numel()),
        head_params=int(head_params),
        other_params=int(total - blocks - embed.weight.numel() - head_params),
        lora_targets=arch.lora_targets,
    )


QUANTS = QUANTIZATIONS


@dataclass(frozen=True)
class StepConfig:
    """One local training step to predict: submodel depth, batch and LoRA settings."""

    layers: int
    batch: int = 4
    seq: int = 64
    rank: int = 8
    quant: str = "none"
    quant_embeddings: bool = True
    checkpointing: bool = False
    backend: str = "cpu"
    runtime_bytes: int | None = None
    """The device's own runtime memory (its profile's ``memory.runtime_mb``, measured the way
    :data:`RUNTIME_REFERENCE_BYTES` was); None: the calibration machine's."""
    merged_delta: bool = False
    """FLoRA: the global update rides beside the (quantized) pack as a dense fp32 update of each
    LoRA target; with an unquantized base it is merged into the weights in place and costs nothing."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("layers", "batch", "seq", "rank"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 1):
                problems.append(f"{name} must be an int >= 1, got {value!r}")
        if self.quant not in QUANTS:
            problems.append(f"quant must be one of {', '.join(QUANTS)}, got {self.quant!r}")
        if self.backend not in ("cpu", "cuda"):
            problems.append(f"backend must be cpu or cuda, got {self.backend!r}")
        if problems:
            raise ConfigError(problems)


def base_weight_bytes(shape: ModelShape, layers: int, quant: str, quant_embeddings: bool = True) -> int:
    """Frozen base weights of a ``layers``-block submodel at ``quant`` (what a pack carries)."""
    nbytes = QuantSpec(quant).quantizer().nbytes
    block = sum(nbytes(lin.out_features, lin.in_features) for lin in shape.block_linears)
    block += FLOAT * shape.block_other_params
    table_quant = quant if quant_embeddings else "none"
    table_bytes = QuantSpec(table_quant).quantizer().nbytes
    embed = table_bytes(shape.vocab, shape.hidden)
    head = table_bytes(shape.head_params // shape.hidden, shape.hidden) if shape.head_params else 0
    return layers * block + embed + head + FLOAT * shape.other_params


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted peak resident memory of a training step, by part (bytes)."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        """The sum of the parts."""
        return sum(self.parts.values())


def heap_width(shape: ModelShape, tokens: int) -> int:
    """The part of the block's activation width that costs extra on the heap at ``tokens`` tokens:
    the outputs no wider than the hidden size whose tensors fall below the agent's mmap threshold.

    The agent bounds glibc's mmap threshold (:mod:`devft_edge.allocator`): a tensor at or above it
    gets its own mapping, returned whole when freed; a smaller one lives on the heap, where a freed
    block stays resident until an allocation that fits reuses it. The hidden- and kv-wide tensors
    of a block (its projections, and attention's copies of them: heads split and repeated for
    grouped queries, rotary embeddings, the attention output, norms, residual adds) are mostly
    temporaries freed between tensors kept for backward, so on the heap they leave holes the kept
    tensors pin. The MLP's wide intermediates are all kept for backward and cost their size either
    way: at 64 and 128 tokens (SmolLM2's 1,536-wide outputs below the threshold too) the measured
    cost per token and block is the same as at 256 tokens (only the narrow ones below it), while
    counting the wide ones over-predicted batch-1 steps by up to 20% (issue 16, item 3). SmolLM2
    with the 128 KiB threshold: up to 56 tokens the 576- and 192-wide outputs are heap tensors, up
    to 170 only the 192-wide ones, from 171 tokens none.
    """
    return sum(
        lin.out_features
        for lin in shape.block_linears
        if lin.out_features <= shape.hidden and tokens * lin.out_features * FLOAT < MMAP_THRESHOLD_BYTES
    )


@dataclass(frozen=True)
class StepCounts:
    """fp32 values of one training step, per calibrated coefficient."""

    saved: int
    """Kept for backward, times ``ACT_COEF``: tokens x :meth:`ModelShape.saved_width` per block
    held (one block with gradient checkpointing: the one recomputed)."""
    heap: int
    """Heap holes, times ``HEAP_COEF``: tokens x :func:`heap_width` per block whose holes are pinned."""
    logits: int
    """Tokens x vocabulary, times ``LOGIT_COEF``."""
    boundaries: int
    """Gradient checkpointing's kept block inputs (``hidden`` per token and block), counted exactly."""


def step_counts(shape: ModelShape, step: StepConfig) -> StepCounts:
    """What :func:`estimate_memory` multiplies by the calibrated coefficients (and the fit fits).

    Without checkpointing every block keeps its tensors for backward, each pinning its heap holes.
    With it only the recomputed block keeps them, and only when the kept block inputs are heap
    tensors themselves (``tokens x hidden`` floats below the mmap threshold) does every block pin
    the holes its forward left beneath its kept input. Found with the threshold at 1 MiB (30
    SmolLM2 layers at 128 tokens: 928 MiB measured, 795 MiB predicted counting one block); at
    128 KiB it applies below 57 tokens (a held-out row of docs/memory_model.md tests it). So the
    peak can fall as the batch grows, where the kept inputs leave the heap.
    """
    tokens = step.batch * step.seq
    held = 1 if step.checkpointing else step.layers
    boundaries = step.layers * tokens * shape.hidden if step.checkpointing else 0
    pinned = step.layers if tokens * shape.hidden * FLOAT < MMAP_THRESHOLD_BYTES else held
    return StepCounts(
        saved=held * tokens * shape.saved_width(step.rank),
        heap=pinned * tokens * heap_width(shape, tokens),
        logits=tokens * shape.vocab,
        boundaries=boundaries,
    )


def dequant_chunk_bytes(shape: ModelShape, step: StepConfig) -> int:
    """The largest fp32 weight a quantized base materialises at once: a whole block linear, or
    :data:`~devft_edge.quantization.CHUNK_ROWS` rows of a quantized embedding/head; 0 unquantized."""
    if step.quant == "none":
        return 0
    widest = [(lin.out_features, lin.in_features) for lin in shape.block_linears]
    if step.quant_embeddings:
        widest.append((shape.vocab, shape.hidden))
    return max(min(out_f, CHUNK_ROWS) * in_f for out_f, in_f in widest) * FLOAT


def runtime_difference(runtime_bytes: int | None) -> int:
    """What a device's measured runtime adds to the calibration machine's (0 when not measured)."""
    return 0 if runtime_bytes is None else runtime_bytes - RUNTIME_REFERENCE_BYTES


def on_device(step: StepConfig, profile: DeviceProfile) -> StepConfig:
    """``step`` as ``profile``'s device runs it: its backend and, when its profile measured it, its
    own runtime memory."""
    runtime = profile.memory.runtime_mb
    return replace(step, backend=profile.compute.backend, runtime_bytes=None if runtime is None else runtime * 2**20)


def estimate_memory(shape: ModelShape, step: StepConfig) -> MemoryEstimate:
    """Predicted peak of one steady-state training step (see the module docstring for the terms)."""
    if step.layers > shape.num_layers:
        raise ConfigError(f"layers={step.layers} exceeds the model's {shape.num_layers}")
    counts = step_counts(shape, step)
    activations = counts.saved * ACT_COEF + counts.heap * HEAP_COEF + counts.boundaries
    runtime = RUNTIME_BYTES + (CUDA_RUNTIME_BYTES if step.backend == "cuda" else 0)
    runtime += runtime_difference(step.runtime_bytes)
    return MemoryEstimate(
        parts={
            "runtime": runtime,
            "weights": base_weight_bytes(shape, step.layers, step.quant, step.quant_embeddings),
            "lora": LORA_BYTES_PER_PARAM * shape.lora_params(step.layers, step.rank),
            "activations": int(FLOAT * activations),
            "logits": int(FLOAT * LOGIT_COEF * counts.logits),
            "dequant": dequant_chunk_bytes(shape, step),
            "delta": FLOAT * shape.delta_params(step.layers) if step.merged_delta and step.quant != "none" else 0,
        }
    )


def step_flops(shape: ModelShape, step: StepConfig) -> float:
    """FLOPs of one training step: forward, backward to the inputs (frozen weights), LoRA grads.

    A frozen linear layer costs ``2 * tokens * in * out`` forward and the same again backward
    (input gradient only); attention ``4 * b * s^2 * hidden`` per block forward, twice that
    backward; gradient checkpointing recomputes the blocks' forward once more.
    """
    tokens = step.batch * step.seq
    block_linear = sum(lin.out_features * lin.in_features for lin in shape.block_linears)
    linear_fwd = step.layers * 2 * tokens * block_linear
    attn_fwd = step.layers * 4 * step.batch * step.seq**2 * shape.hidden
    head_fwd = 2 * tokens * shape.hidden * shape.vocab
    lora = 6 * tokens * shape.lora_params(step.layers, step.rank)
    recompute = linear_fwd + attn_fwd if step.checkpointing else 0
    return 2 * linear_fwd + 3 * attn_fwd + 2 * head_fwd + lora + recompute


def estimate_step_seconds(shape: ModelShape, step: StepConfig, sustained_gflops: float) -> float:
    """Predicted seconds per training step on a device sustaining ``sustained_gflops`` on GEMM."""
    return step_flops(shape, step) / (sustained_gflops * 1e9 * STEP_EFFICIENCY)


def max_batch(shape: ModelShape, step: StepConfig, budget_bytes: int, limit: int = 4096) -> int:
    """Largest batch (<= ``limit``) whose predicted peak fits ``budget_bytes``; 0 if none does.

    Binary search: the predicted peak grows with the batch except at the one step where
    checkpointed block inputs grow past the mmap threshold and stop pinning heap holes
    (:func:`step_counts`). There the search may stop below a larger batch that also fits; the
    batch it returns always fits.
    """

    def fits(batch: int) -> bool:
        return estimate_memory(shape, _with(step, batch=batch)).peak_bytes <= budget_bytes

    if not fits(1):
        return 0
    low, high = 1, limit
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def max_layers(shape: ModelShape, step: StepConfig, budget_bytes: int) -> int:
    """Deepest submodel (<= the model's depth) that fits ``budget_bytes``; 0 if none."""
    fitting = [
        n
        for n in range(1, shape.num_layers + 1)
        if estimate_memory(shape, _with(step, layers=n)).peak_bytes <= budget_bytes
    ]
    return max(fitting, default=0)


def _with(step: StepConfig, **changes: object) -> StepConfig:
    return replace(step, **changes)  # type: ignore[arg-type]


def gib(n_bytes: float) -> str:
    """Human-readable size for tables."""
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.0f} MiB"
