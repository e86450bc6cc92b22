"""Weight-only quantization: error bounds per scheme, sizes, quantized layers, save/load of base weights."""

from __future__ import annotations

import pytest
import torch

from devft_edge.errors import ConfigError, DataError
from devft_edge.lora import LoraSettings, attach_lora
from devft_edge.models import load_model
from devft_edge.quantization import QUANTIZERS, Int4, QuantizedLinear, QuantSpec, quantize_model
from devft_edge.weights import load_base, read_safetensors, save_base


@pytest.mark.parametrize("in_features", [64, 200])
def test_int8_error_is_at_most_half_a_step_per_row(in_features):
    w = torch.randn(48, in_features) * torch.linspace(0.01, 3, 48)[:, None]
    q = QUANTIZERS.get("int8")
    parts = q.quantize(w)
    step = w.abs().amax(dim=1) / 127
    err = (q.dequantize(parts, in_features) - w).abs().amax(dim=1)
    assert torch.all(err <= step / 2 + 1e-6)
    assert parts["qweight"].dtype == torch.int8
    assert q.nbytes(48, in_features) == sum(t.numel() * t.element_size() for t in parts.values())


@pytest.mark.parametrize("in_features,group", [(128, 64), (200, 64), (96, 32)])
def test_int4_error_is_at_most_half_a_step_per_group(in_features, group):
    w = torch.randn(40, in_features)
    q = Int4(group_size=group)
    parts = q.quantize(w)
    deq = q.dequantize(parts, in_features)
    assert deq.shape == w.shape
    groups = -(-in_features // group)
    padded = torch.nn.functional.pad(w, (0, groups * group - in_features)).view(40, groups, group)
    step = (padded.abs().amax(dim=2) / 7).repeat_interleave(group, dim=1)[:, :in_features]
    # fp16 scales add a relative rounding error of 2^-11 on top of half a step
    assert torch.all((deq - w).abs() <= step / 2 + step * 7 * 2**-10 + 1e-6)
    assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape == (40, groups * group // 2)
    assert q.nbytes(40, in_features) == sum(t.numel() * t.element_size() for t in parts.values())


def test_int4_dequantization_is_the_plain_nibble_formula():
    """Low nibble first, offset 8, one scale per group, padded columns dropped: written out plainly
    here, independent of the in-place unpacking every path shares."""
    q = Int4(group_size=32)
    parts = q.quantize(torch.randn(6, 100))
    packed, scale = parts["qweight"], parts["scale"].float()
    nibbles = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2).float() - 8
    expected = (nibbles.view(6, -1, 32) * scale[..., None]).flatten(-2)[:, :100]
    assert torch.equal(q.dequantize(parts, 100), expected)
    assert torch.equal(q.dequantize_transient(parts, 100), expected)


def test_transient_buffers_are_per_thread():
    """A second thread never writes into the weight this thread is computing with."""
    import threading

    q = Int4(group_size=32)
    parts = q.quantize(torch.randn(8, 64))
    here = q.dequantize_transient(parts, 64)
    there: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: there.append(q.dequantize_transient(parts, 64)))
    worker.start()
    worker.join()
    assert here.data_ptr() != there[0].data_ptr() and torch.equal(here, there[0])


def test_int4_rows_match_full_dequantization():
    q = Int4(group_size=32)
    w = torch.randn(50, 96)
    parts = q.quantize(w)
    rows = torch.tensor([[0, 7], [49, 7]])
    assert torch.equal(q.dequantize_rows(parts, rows, 96), q.dequantize(parts, 96)[rows])


@pytest.mark.parametrize("scheme", ["none", "fp16", "bf16", "int8", "int4", "nf4"])
def test_transient_weights_equal_the_dequantized_weight_and_reuse_one_buffer(scheme):
    """What a layer computes with in training (row chunks through the per-thread buffer) is exactly
    :meth:`Quantizer.dequantize`'s weight, padded columns dropped; the next call overwrites it."""
    q = QuantSpec(scheme, group_size=32).quantizer()
    w = torch.randn(70, 100)  # 100 columns: int4 pads to 128, nf4 to 128
    parts = q.quantize(w)
    full = q.dequantize(parts, 100)
    first = q.dequantize_transient({k: v[0:40] for k, v in parts.items()}, 100)
    assert first.shape == (40, 100) and torch.equal(first, full[0:40])
    second = q.dequantize_transient({k: v[40:70] for k, v in parts.items()}, 100)
    assert torch.equal(second, full[40:70])
    if scheme in ("fp16", "bf16", "int8", "int4"):  # the schemes that compute in place share one buffer
        assert first.data_ptr() == second.data_ptr()


def test_bad_quant_spec_is_refused():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        QuantSpec("int3")
    with pytest.raises(ConfigError, match="group_size"):
        QuantSpec("int4", group_size=7)


@pytest.mark.parametrize("scheme,tolerance", [("int8", 0.05), ("int4", 0.6)])
def test_quantized_model_tracks_fp32_and_trains_lora(scheme, tolerance):
    model = load_model("tiny", seed=0)
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = model(input_ids=ids).logits
    quantize_model(model, QuantSpec(scheme))
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantizedLinear)
    assert model.lm_head.qweight is model.model.embed_tokens.qweight  # tied head shares the table
    assert (model(input_ids=ids).logits - reference).abs().max() < tolerance
    peft_model = attach_lora(model, LoraSettings(rank=4))
    with torch.no_grad():  # make B non-zero so A gets a gradient too
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert not any(p.requires_grad for n, p in peft_model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("scheme", ["none", "int8", "int4"])
def test_save_and_load_base_reproduces_logits(tmp_path, scheme):
    model = load_model("tiny", seed=1)
    save_base(model, QuantSpec(scheme), tmp_path / "m")
    ids = torch.randint(0, 1000, (1, 9))
    loaded = load_base(tmp_path / "m")
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_read_safetensors_refuses_truncated_file(tmp_path):
    model = load_model("tiny", seed=1)
    path = save_base(model, QuantSpec("int8"), tmp_path / "m") / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DataError, match="truncated"):
        read_safetensors(path)
    path.write_bytes(b"\x05")
    with pytest.raises(DataError, match="truncated"):
        read_safetensors(path)


@pytest.mark.parametrize("out_features", [100, 9000])  # one chunk, and three row chunks of the head path
def test_quantized_linear_gradient_matches_dense(out_features):
    layer = torch.nn.Linear(48, out_features, bias=True)
    spec = QuantSpec("int4", group_size=16)
    container = torch.nn.Sequential(layer)
    container.get_input_embeddings = lambda: None  # type: ignore[attr-defined]
    container.get_output_embeddings = lambda: None  # type: ignore[attr-defined]
    quantize_model(container, spec)  # the walker works on any module tree with linears
    qlayer = container[0]
    assert isinstance(qlayer, QuantizedLinear)
    dense = qlayer.dequantized()
    x = torch.randn(3, 5, 48, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, out_features)
    y = qlayer(x)
    y_ref = torch.nn.functional.linear(x_ref, dense, qlayer.bias)
    assert torch.allclose(y, y_ref, atol=1e-5)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-4)


@pytest.mark.parametrize("scheme,dtype,bound", [("fp16", torch.float16, 2**-11), ("bf16", torch.bfloat16, 2**-8)])
def test_half_precision_round_trip(scheme, dtype, bound):
    q = QUANTIZERS.get(scheme)
    w = torch.randn(30, 70)
    parts = q.quantize(w)
    assert parts["qweight"].dtype == dtype and q.nbytes(30, 70) == 2 * 30 * 70
    assert torch.all((q.dequantize(parts, 70) - w).abs() <= w.abs() * bound + 1e-7)


def test_nf4_round_trip_and_rows():
    q = QUANTIZERS.get("nf4")
    w = torch.randn(24, 100)  # 100 columns: padded to two blocks of 64
    parts = q.quantize(w)
    deq = q.dequantize(parts, 100)
    assert deq.shape == w.shape and q.nbytes(24, 100) == sum(t.numel() * t.element_size() for t in parts.values())
    # NF4 levels span [-1, 1] per block of 64; the widest gap (-1.0 to -0.696) bounds the error by 0.152
    absmax = torch.nn.functional.pad(w, (0, 28)).view(24, 2, 64).abs().amax(-1).repeat_interleave(64, 1)[:, :100]
    assert torch.all((deq - w).abs() <= 0.153 * absmax + 1e-6)
    rows = torch.tensor([3, 0, 23])
    assert torch.equal(q.dequantize_rows(parts, rows, 100), deq[rows])


def test_dequantize_model_computes_what_the_quantized_model_computes():
    from devft_edge.quantization import QuantizedEmbedding, dequantize_model

    model = load_model("tiny", seed=2)
    quantize_model(model, QuantSpec("int4", group_size=32))
    ids = torch.randint(0, 1000, (1, 10))
    expected = model(input_ids=ids).logits
    dequantize_model(model)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)


def test_bound_heap_and_its_settings(monkeypatch):
    from devft_edge.allocator import HEAP_ENV, MMAP_THRESHOLD_BYTES, bound_heap, heap_setting

    assert heap_setting() == MMAP_THRESHOLD_BYTES
    assert bound_heap() is True  # glibc here
    monkeypatch.setenv(HEAP_ENV, "1048576")
    assert heap_setting() == 2**20
    assert bound_heap() is True
    monkeypatch.setenv(HEAP_ENV, "default")
    assert heap_setting() is None
    assert bound_heap() is False
    for bad in ("0", "-5", "1e6", "big"):
        monkeypatch.setenv(HEAP_ENV, bad)
        with pytest.raises(ConfigError, match=HEAP_ENV):
            heap_setting()
    monkeypatch.setenv(HEAP_ENV, str(MMAP_THRESHOLD_BYTES))  # leave the test process as the agent runs
    bound_heap()


@pytest.mark.parametrize(
    ("service", "args"),
    [("cloud_aggregator.service:Aggregator", (None, "unused")), ("device_agent.agent:Agent", (None,))],
)
def test_the_services_bound_the_heap_before_anything_else(service, args, monkeypatch):
    """The aggregator and the agent fix the mmap threshold first thing: the agent's memory plan
    assumes it, and the aggregator's resident memory otherwise keeps the stage builds' freed heap.
    (Only a whole-run RSS bound would notice its removal otherwise, and only in some runs.)"""
    import importlib

    class Bounded(Exception):
        pass

    def bound_heap() -> bool:
        raise Bounded  # stops the constructor here: nothing of its config was needed before

    monkeypatch.setattr("devft_edge.allocator.bound_heap", bound_heap)
    module, name = service.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(Bounded):
        cls(*args)


@pytest.mark.parametrize("out_features", [100, 9000])
def test_a_merged_update_rides_beside_the_quantized_weight(out_features):
    """FLoRA on a quantized pack: the global update is added to what the layer computes with (every
    row chunk included), the quantized buffers stay as signed, and taking it out restores the layer."""
    from devft_edge.submodel import add_weight_delta

    model = load_model("tiny", seed=0)
    quantize_model(model, QuantSpec("int4"))
    layer = model.model.layers[1].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    before, buffers = layer.dequantized(), {k: v.clone() for k, v in layer.parts().items()}
    delta = torch.randn(layer.out_features, layer.in_features)
    add_weight_delta(model, {"layers.1.self_attn.q_proj.delta": delta}, 0.5)
    assert torch.allclose(layer.dequantized(), before + 0.5 * delta, atol=1e-6)
    rows = layer.transient_weight(2, 7)
    assert torch.allclose(rows, (before + 0.5 * delta)[2:7], atol=1e-6)
    assert all(torch.equal(v, buffers[k]) for k, v in layer.parts().items())
    add_weight_delta(model, {"layers.1.self_attn.q_proj.delta": delta}, -0.5)
    assert torch.allclose(layer.dequantized(), before, atol=1e-6)
    with pytest.raises(ConfigError, match="delta shape"):
        add_weight_delta(model, {"layers.1.self_attn.q_proj.delta": delta[:, :3]}, 1.0)
