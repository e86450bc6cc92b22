"""Weight-only quantization of a pack's frozen base weights, and layers that train on top of it.

Edge devices hold the stage submodel's base weights in 4-8 GB shared with everything else, and
the weights dominate a small model's footprint, so packs store them quantized and the device
dequantizes each weight when a layer runs (the weights are frozen: only LoRA trains).

Schemes (registry ``QUANTIZERS``):

- ``none``: fp32, as the model is; ``fp16`` / ``bf16``: 16-bit floats, computed in fp32.
- ``int8``: symmetric per output channel, ``w = q * s[o]`` with ``q`` in [-127, 127].
- ``int4``: symmetric per group of ``group_size`` input columns, ``w = q * s[o, g]`` with ``q`` in
  [-7, 7], stored as ``q + 8`` packed two per byte; fp16 scales. Columns are padded to a whole
  group, the padding is dropped on dequantization.
- ``nf4``: bitsandbytes' 4-bit NormalFloat with an fp32 absmax per block of 64 (QLoRA's format).

A quantized linear layer saves nothing for backward: its weight is frozen, so the only gradient
it passes on is ``grad_x = grad_y @ W``, and ``W`` is dequantized again in backward instead of
being kept alive between forward and backward (which would bring back the fp32 footprint).

That fp32 weight lives for one matmul, twice per layer per training step, and is written into a
per-thread buffer that every layer reuses (:meth:`Quantizer.dequantize_transient`) rather than
into fresh memory: the device agent's allocator gives every block of 128 KiB or more its own
mapping (:mod:`devft_edge.allocator`), whose pages fault in anew on every use. On SmolLM2's
30-layer int4 stage (4 x 64 tokens, one thread) the same unpacking into fresh tensors costs
0.86 M page faults and 2.24 s per step, the reused buffer 0.57 M and 1.97 s, for a peak 7 MiB
higher (the buffer; ``benchmarks/dequant.py``, ``benchmarks/results/dequant.json``). The unpacking
before this one (four temporaries per weight) cost 1.32 M faults and 2.68 s.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from devft_edge.errors import ConfigError
from devft_edge.registry import Registry

QuantParts = dict[str, Tensor]
"""A quantized tensor: named parts (``qweight``, ``scale``) stored as buffers and in packs."""


class Quantizer:
    """A weight-only scheme for 2-D weights ``[out, in]``; rows are output channels."""

    name = "none"

    def nbytes(self, out_features: int, in_features: int) -> int:
        """Bytes the quantized weight takes (what packs and the memory model count)."""
        return 4 * out_features * in_features

    def quantize(self, weight: Tensor) -> QuantParts:
        """Quantize ``weight`` [out, in] (fp32)."""
        return {"qweight": weight.detach().float().contiguous()}

    def dequantize(self, parts: QuantParts, in_features: int) -> Tensor:
        """The fp32 weight [out, in] the parts stand for."""
        return parts["qweight"]

    def dequantize_rows(self, parts: QuantParts, rows: Tensor, in_features: int) -> Tensor:
        """Only the rows ``rows`` (any shape of indices) of the weight: an embedding lookup."""
        return F.embedding(rows, self.dequantize(parts, in_features))

    def dequantize_transient(self, parts: QuantParts, in_features: int) -> Tensor:
        """The fp32 weight [rows, in] of 2-D ``parts``, for one matmul: it may live in this thread's
        :func:`scratch` buffers, overwritten by the next transient dequantization on the thread.

        Schemes that compute a new tensor override this to compute it in place; the default
        (fp32 weights, nf4's kernel) is :meth:`dequantize`.
        """
        return self.dequantize(parts, in_features)

    def empty_parts(self, out_features: int, in_features: int, device: str | torch.device = "meta") -> QuantParts:
        """Correctly shaped uninitialised parts, to load a saved quantized model into."""
        return {"qweight": torch.empty(out_features, in_features, device=device)}


_SCRATCH = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """This thread's reused buffer of ``dtype`` on ``device``, as a ``shape`` view (contents undefined).

    One buffer per dtype and device, grown to the largest request and never shrunk: for a model that
    is its largest dequantized weight (SmolLM2: a 4096-row chunk of the LM head, 9.4 MB of fp32).
    Per thread, because the autograd engine or a caller may run layers on more than one.
    """
    buffers: dict[tuple[torch.dtype, torch.device], Tensor] = _SCRATCH.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buffer = buffers.get((dtype, device))
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


QUANTIZERS: Registry[Quantizer] = Registry("quantization")


@QUANTIZERS.register("none")
class NoQuantization(Quantizer):
    """fp32 weights (the reference every other scheme is measured against)."""


@QUANTIZERS.register("fp16", dtype="float16")
@QUANTIZERS.register("bf16", dtype="bfloat16")
class HalfPrecision(Quantizer):
    """Weights stored in 16-bit floats (half the fp32 bytes), computed in fp32."""

    def __init__(self, dtype: str = "float16") -> None:
        self.dtype = getattr(torch, dtype)
        self.name = "fp16" if self.dtype == torch.float16 else "bf16"

    def nbytes(self, out_features: int, in_features: int) -> int:
        return 2 * out_features * in_features

    def quantize(self, weight: Tensor) -> QuantParts:
        return {"qweight": weight.detach().to(self.dtype).contiguous()}

    def dequantize(self, parts: QuantParts, in_features: int) -> Tensor:
        return parts["qweight"].float()

    def dequantize_rows(self, parts: QuantParts, rows: Tensor, in_features: int) -> Tensor:
        return parts["qweight"][rows].float()

    def dequantize_transient(self, parts: QuantParts, in_features: int) -> Tensor:
        weight = parts["qweight"]
        return scratch(tuple(weight.shape), torch.float32, weight.device).copy_(weight)

    def empty_parts(self, out_features: int, in_features: int, device: str | torch.device = "meta") -> QuantParts:
        return {"qweight": torch.empty(out_features, in_features, dtype=self.dtype, device=device)}


@QUANTIZERS.register("int8")
class Int8(Quantizer):
    """Symmetric int8 per output channel: 1 byte per weight plus one fp32 scale per row."""

    name = "int8"

    def nbytes(self, out_features: int, in_features: int) -> int:
        return out_features * in_features + 4 * out_features

    def quantize(self, weight: Tensor) -> QuantParts:
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return {"qweight": q.contiguous(), "scale": scale.contiguous()}

    def dequantize(self, parts: QuantParts, in_features: int) -> Tensor:
        return parts["qweight"].float() * parts["scale"][:, None]

    def dequantize_rows(self, parts: QuantParts, rows: Tensor, in_features: int) -> Tensor:
        return parts["qweight"][rows].float() * parts["scale"][rows].unsqueeze(-1)

    def dequantize_transient(self, parts: QuantParts, in_features: int) -> Tensor:
        q = parts["qweight"]
        out = scratch(tuple(q.shape), torch.float32, q.device)
        return torch.mul(q, parts["scale"][:, None], out=out)

    def empty_parts(self, out_features: int, in_features: int, device: str | torch.device = "meta") -> QuantParts:
        return {
            "qweight": torch.empty(out_features, in_features, dtype=torch.int8, device=device),
            "scale": torch.empty(out_features, device=device),
        }


@QUANTIZERS.register("int4", group_size=64)
class Int4(Quantizer):
    """Symmetric int4 per group of input columns, packed two per byte, fp16 scale per group."""

    name = "int4"

    def __init__(self, group_size: int = 64) -> None:
        if not (isinstance(group_size, int) and group_size >= 2 and group_size % 2 == 0):
            raise ConfigError(f"int4 group_size must be an even int >= 2, got {group_size!r}")
        self.group_size = group_size

    def _groups(self, in_features: int) -> int:
        return math.ceil(in_features / self.group_size)

    def nbytes(self, out_features: int, in_features: int) -> int:
        groups = self._groups(in_features)
        return out_features * groups * (self.group_size // 2 + 2)

    def quantize(self, weight: Tensor) -> QuantParts:
        w = weight.detach().float()
        out_features, in_features = w.shape
        groups = self._groups(in_features)
        padded = F.pad(w, (0, groups * self.group_size - in_features)).view(out_features, groups, self.group_size)
        scale = (padded.abs().amax(dim=2) / 7.0).clamp(min=1e-8).half()
        q = torch.round(padded / scale.float()[..., None]).clamp(-7, 7).to(torch.int16) + 8
        q = q.to(torch.uint8).view(out_features, -1)
        packed = q[:, 0::2] | (q[:, 1::2] << 4)
        return {"qweight": packed.contiguous(), "scale": scale.contiguous()}

    def _unpack(self, packed: Tensor, scale: Tensor, in_features: int, out: Tensor, nibbles: Tensor) -> Tensor:
        """The weight of ``packed`` (any leading dims) written into ``out`` (fp32, twice ``packed``'s
        last dim), through the byte buffer ``nibbles`` (``packed``'s shape): each nibble plane goes
        into its interleaved columns, which are then shifted and scaled in place."""
        columns = out.view(*packed.shape, 2)
        columns[..., 0].copy_(torch.bitwise_and(packed, 0x0F, out=nibbles))
        columns[..., 1].copy_(torch.bitwise_right_shift(packed, 4, out=nibbles))
        out.view(*scale.shape, self.group_size).sub_(8).mul_(scale.unsqueeze(-1))
        return out[..., :in_features]

    def _unpack_fresh(self, packed: Tensor, scale: Tensor, in_features: int) -> Tensor:
        out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], device=packed.device)
        return self._unpack(packed, scale, in_features, out, torch.empty_like(packed))

    def dequantize(self, parts: QuantParts, in_features: int) -> Tensor:
        return self._unpack_fresh(parts["qweight"], parts["scale"], in_features)

    def dequantize_rows(self, parts: QuantParts, rows: Tensor, in_features: int) -> Tensor:
        return self._unpack_fresh(parts["qweight"][rows], parts["scale"][rows], in_features)

    def dequantize_transient(self, parts: QuantParts, in_features: int) -> Tensor:
        packed = parts["qweight"]
        rows, half = packed.shape
        out = scratch((rows, 2 * half), torch.float32, packed.device)
        return self._unpack(packed, parts["scale"], in_features, out, scratch((rows, half), torch.uint8, packed.device))

    def empty_parts(self, out_features: int, in_features: int, device: str | torch.device = "meta") -> QuantParts:
        groups = self._groups(in_features)
        return {
            "qweight": torch.empty(out_features, groups * self.group_size // 2, dtype=torch.uint8, device=device),
            "scale": torch.empty(out_features, groups, dtype=torch.float16, device=device),
        }


@QUANTIZERS.register("nf4", block_size=64)
class NF4(Quantizer):
    """bitsandbytes NF4 (QLoRA): 4-bit normal-float codes, one fp32 absmax per block of 64.

    Rows are padded to whole blocks so every row owns its blocks (an embedding lookup
    dequantizes only its rows). Quantize and dequantize use bitsandbytes' kernels, which run on
    CPU and CUDA; bitsandbytes is imported only when an nf4 weight is touched.
    """

    name = "nf4"

    def __init__(self, block_size: int = 64) -> None:
        self.block_size = block_size

    def _blocks(self, in_features: int) -> int:
        return math.ceil(in_features / self.block_size)

    def nbytes(self, out_features: int, in_features: int) -> int:
        return out_features * self._blocks(in_features) * (self.block_size // 2 + 4)

    def quantize(self, weight: Tensor) -> QuantParts:
        import bitsandbytes.functional as bnb

        w = weight.detach().float()
        out_features, in_features = w.shape
        padded = F.pad(w, (0, self._blocks(in_features) * self.block_size - in_features)).contiguous()
        packed, state = bnb.quantize_4bit(padded, blocksize=self.block_size, quant_type="nf4")
        return {
            "qweight": packed.view(out_features, -1).contiguous(),
            "absmax": state.absmax.view(out_features, -1).float().contiguous(),
        }

    def _unpack(self, packed: Tensor, absmax: Tensor, in_features: int) -> Tensor:
        import bitsandbytes.functional as bnb

        rows = packed.shape[:-1]
        width = self._blocks(in_features) * self.block_size
        state = bnb.QuantState(
            absmax=absmax.reshape(-1).contiguous(),
            shape=torch.Size((math.prod(rows), width)),
            code=bnb.get_4bit_type("nf4", device=packed.device),
            blocksize=self.block_size,
            quant_type="nf4",
            dtype=torch.float32,
        )
        w = bnb.dequantize_4bit(packed.reshape(-1, 1).contiguous(), state)
        return w.view(*rows, width)[..., :in_features]

    def dequantize(self, parts: QuantParts, in_features: int) -> Tensor:
        return self._unpack(parts["qweight"], parts["absmax"], in_features)

    def dequantize_rows(self, parts: QuantParts, rows: Tensor, in_features: int) -> Tensor:
        return self._unpack(parts["qweight"][rows], parts["absmax"][rows], in_features)

    def empty_parts(self, out_features: int, in_features: int, device: str | torch.device = "meta") -> QuantParts:
        blocks = self._blocks(in_features)
        return {
            "qweight": torch.empty(out_features, blocks * self.block_size // 2, dtype=torch.uint8, device=device),
            "absmax": torch.empty(out_features, blocks, device=device),
        }


CHUNK_ROWS = 4096
"""Output rows dequantized at a time. A big layer (the LM head of a 49k-vocabulary model is
``49152 x 576``, 113 MB in fp32) is computed in row chunks so its fp32 weight never exists whole."""


def _row_chunks(out_features: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK_ROWS, out_features)) for a in range(0, out_features, CHUNK_ROWS)]


class _DequantLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized chunk by chunk in forward and again in backward.

    Nothing is saved for backward: ``W`` is frozen, so only ``grad_x = grad_y W`` is needed.
    """

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantizedLinear) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        if layer.out_features <= CHUNK_ROWS:
            return F.linear(x, layer.transient_weight(0, layer.out_features), layer.bias)
        out = x.new_empty(*x.shape[:-1], layer.out_features)
        for a, b in _row_chunks(layer.out_features):
            bias = None if layer.bias is None else layer.bias[a:b]
            out[..., a:b] = F.linear(x, layer.transient_weight(a, b), bias)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        layer = ctx.layer
        if layer.out_features <= CHUNK_ROWS:
            return grad_out @ layer.transient_weight(0, layer.out_features), None
        grad_x = None
        for a, b in _row_chunks(layer.out_features):
            part = grad_out[..., a:b] @ layer.transient_weight(a, b)
            grad_x = part if grad_x is None else grad_x.add_(part)
        return grad_x, None


class QuantizedLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight lives quantized in buffers.

    It subclasses ``nn.Linear`` so peft wraps it with its ordinary LoRA ``Linear``; ``weight`` is
    ``None`` and peft places the adapter by the ``qweight`` buffer instead.
    """

    def __init__(self, in_features: int, out_features: int, quantizer: Quantizer, bias: bool, device: str) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.quantizer = quantizer
        self.register_parameter("weight", None)
        for name, part in quantizer.empty_parts(out_features, in_features, device).items():
            self.register_buffer(name, part)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self.merged: Tensor | None = None
        """A dense fp32 update added to the dequantized weight (FLoRA's merged global update): the
        quantized weight itself stays as signed in the pack."""

    def add_delta(self, update: Tensor, alpha: float) -> None:
        """Add ``alpha * update`` ([out, in]) to the weight this layer computes with."""
        scaled = update.to(torch.float32) * alpha
        self.merged = scaled if self.merged is None else self.merged + scaled

    def parts(self) -> QuantParts:
        """The quantized weight's parts (buffers named as the quantizer names them)."""
        return dict(self.named_buffers(recurse=False))

    def dequantized(self) -> Tensor:
        """The fp32 weight, as a tensor of its own (to fuse, export or compare)."""
        weight = self.quantizer.dequantize(self.parts(), self.in_features)
        return weight if self.merged is None else weight + self.merged

    def transient_weight(self, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the fp32 weight for one matmul (:meth:`Quantizer.dequantize_transient`):
        valid until the next transient weight is made on this thread."""
        parts = {name: part[start:stop] for name, part in self.parts().items()}
        weight = self.quantizer.dequantize_transient(parts, self.in_features)
        return weight if self.merged is None else weight + self.merged[start:stop]

    def forward(self, x: Tensor) -> Tensor:
        return _DequantLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quantizer.name}"


class QuantizedEmbedding(nn.Module):
    """A frozen embedding table stored quantized; a lookup dequantizes only the rows it reads."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quantizer: Quantizer, device: str) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.quantizer = quantizer
        for name, part in quantizer.empty_parts(num_embeddings, embedding_dim, device).items():
            self.register_buffer(name, part)

    def parts(self) -> QuantParts:
        """The quantized table's parts (buffers named as the quantizer names them)."""
        return dict(self.named_buffers(recurse=False))

    def forward(self, ids: Tensor) -> Tensor:
        return self.quantizer.dequantize_rows(self.parts(), ids, self.embedding_dim)


@dataclass(frozen=True)
class QuantSpec:
    """How a pack stores its base weights."""

    scheme: str = "none"
    """A name in ``QUANTIZERS``."""
    group_size: int = 64
    """int4 group width (input columns per scale)."""
    embeddings: bool = True
    """Also quantize the token embedding and LM head; they are most of a small model's bytes
    (SmolLM2-135M: 28 M of 135 M parameters, and all of a shallow stage's non-block weights)."""

    def __post_init__(self) -> None:
        if self.scheme not in QUANTIZERS:
            raise ConfigError(f"unknown quantization {self.scheme!r}; known: {', '.join(QUANTIZERS.names())}")
        self.quantizer()

    def quantizer(self) -> Quantizer:
        """The configured scheme instance."""
        return QUANTIZERS.get(self.scheme, **({"group_size": self.group_size} if self.scheme == "int4" else {}))


def _linear_weight(module: nn.Module) -> Tensor:
    """``[out, in]`` weight of a Linear, or of a GPT-2 ``Conv1D`` (which stores ``[in, out]``)."""
    return module.weight.T if type(module).__name__ == "Conv1D" else module.weight


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def quantize_model(model: nn.Module, spec: QuantSpec) -> nn.Module:
    """Replace the frozen linear layers (and, per ``spec``, embedding and head) by quantized ones.

    Works in place on a real model (weights are quantized) or on a meta-device skeleton (the
    layers get empty parts to be filled by ``load_state_dict(..., assign=True)``). A tied LM head
    shares its embedding's quantized buffers, as the fp32 model shares one tensor.
    """
    quantizer = spec.quantizer()
    if spec.scheme == "none":
        return model
    embed = model.get_input_embeddings()  # type: ignore[operator]
    head = model.get_output_embeddings()  # type: ignore[operator]
    tied = head is not None and embed is not None and head.weight is embed.weight
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            is_embed, is_head = child is embed, child is head
            if (is_embed or is_head) and not spec.embeddings:
                continue
            if is_embed:
                new: nn.Module = _replace_embedding(child, quantizer)
            elif _is_linear(child):
                new = _replace_linear(child, quantizer)
            else:
                continue
            setattr(parent, child_name, new)
    if tied and spec.embeddings:
        new_embed, new_head = model.get_input_embeddings(), model.get_output_embeddings()  # type: ignore[operator]
        for name, buf in new_embed.named_buffers(recurse=False):
            setattr(new_head, name, buf)
    return model


def _replace_linear(layer: nn.Module, quantizer: Quantizer) -> QuantizedLinear:
    weight = _linear_weight(layer)
    out_features, in_features = weight.shape
    device = weight.device
    new = QuantizedLinear(in_features, out_features, quantizer, layer.bias is not None, device=str(device))
    if device.type != "meta":
        for name, part in quantizer.quantize(weight).items():
            setattr(new, name, part)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
    return new


def _replace_embedding(embed: nn.Module, quantizer: Quantizer) -> QuantizedEmbedding:
    weight = embed.weight
    new = QuantizedEmbedding(weight.shape[0], weight.shape[1], quantizer, device=str(weight.device))
    if weight.device.type != "meta":
        for name, part in quantizer.quantize(weight).items():
            setattr(new, name, part)
    return new


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace quantized layers by plain fp32 ``nn.Linear``/``nn.Embedding`` (in place), re-tying the head.

    For consumers that need ordinary modules, such as the ONNX exporter: the weights are the
    dequantized ones, so the result computes exactly what the quantized model computes.
    """
    tables: dict[int, nn.Parameter] = {}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, QuantizedEmbedding):
                key = id(child.qweight)
                tables.setdefault(
                    key,
                    nn.Parameter(child.quantizer.dequantize(child.parts(), child.embedding_dim), requires_grad=False),
                )
                new: nn.Module = nn.Embedding(child.num_embeddings, child.embedding_dim, device="meta")
                new.weight = tables[key]  # the same Parameter as a tied head's
            elif isinstance(child, QuantizedLinear):
                key = id(child.qweight)
                new = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device="meta")
                if key not in tables:
                    tables[key] = nn.Parameter(child.dequantized(), requires_grad=False)
                new.weight = tables[key]
                if child.bias is not None:
                    new.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
            else:
                continue
            new.requires_grad_(False)
            setattr(parent, child_name, new)
    return model
