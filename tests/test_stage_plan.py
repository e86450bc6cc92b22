"""Stage plans: a device fuses a stage from the full pack it holds, and gets what the server would."""

from __future__ import annotations

import copy
import hashlib
import json
import tarfile
from types import SimpleNamespace

import pytest
import torch

from devft_edge.errors import DevFTError
from devft_edge.fusion import FUSIONS
from devft_edge.layers import decoder_layers
from devft_edge.lora import LoraSettings, init_lora_state, lora_shapes
from devft_edge.models import model_dir
from devft_edge.pack import PackError, load_pack, read_pack, write_pack
from devft_edge.pack_manifest import PackManifest
from devft_edge.quantization import QuantSpec
from devft_edge.signing import Ed25519PrivateKey
from devft_edge.stage_plan import StagePlanManifest, derive_stage_pack, plan_matches, read_plan, write_plan
from devft_edge.submodel import build_submodel
from devft_edge.training import TrainSettings
from devft_edge.weights import unique_state

LORA = LoraSettings(rank=4)
GROUPS = [[0, 1, 2], [3, 4], [5], [6, 7]]
FUSION = FUSIONS.get("dblf", beta=0.1)


def _packs(tmp_path, tiny, quant, heal=None, blocks=None, base_pack="sha-of-full"):
    """A signed full pack and the signed plan of stage 1 (made for ``base_pack``, or for the full
    pack's real sha256 when it is None), both verified; and the full model's starting LoRA."""
    key = Ed25519PrivateKey.generate()
    lora = init_lora_state(lora_shapes(tiny, LORA), LORA.rank, seed=0)
    common = dict(model_name="tiny", stages=2, lora=LORA, quant=QuantSpec(quant), training=TrainSettings())
    common.update(created="2026-01-01T00:00:00Z", sign_key=key)
    write_pack(
        tmp_path / "full.devpack",
        copy.deepcopy(tiny),
        lora,
        stage=0,
        groups=[[j] for j in range(8)],
        tokenizer_dir=model_dir("tiny"),
        **common,
    )
    full = read_pack(tmp_path / "full.devpack", tmp_path / "full", key.public_key())
    if base_pack is None:
        base_pack = hashlib.sha256((tmp_path / "full.devpack").read_bytes()).hexdigest()
    written = write_plan(
        tmp_path / "s1.plan",
        base_pack=base_pack,
        model_type="llama",
        stage=1,
        groups=GROUPS,
        coefficients=[FUSION.coefficients(len(g)) for g in GROUPS],
        targets=LORA.target_names(tiny),
        heal=heal,
        blocks=blocks,
        **common,
    )
    plan = read_plan(tmp_path / "s1.plan", tmp_path / "plan", key.public_key())
    assert plan.manifest == written
    return full, plan, lora


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_device_fusion_equals_fusing_the_packs_weights(tmp_path, tiny, quant):
    full, plan, lora = _packs(tmp_path, tiny, quant)
    assert plan.manifest.kind == "stage_plan" and plan.signed and plan_matches(plan, "sha-of-full") == []
    assert plan.manifest.coefficients == tuple(tuple(FUSION.coefficients(len(g))) for g in GROUPS)
    stage = derive_stage_pack(full, plan, {}, tmp_path / "stage")
    assert stage.manifest == PackManifest.read(stage.directory)  # what the agent reads back from its cache
    assert stage.manifest.derived_from == ("full", "plan") and stage.manifest.members == {}
    assert (stage.manifest.quant, stage.manifest.lora) == (full.manifest.quant, full.manifest.lora)
    model, _ = load_pack(stage)
    # the server's view: fuse the (dequantized) full pack's layers with the same coefficients
    reference = build_submodel(_dequantized(full), GROUPS, FUSION).model
    ids = torch.randint(0, 1000, (2, 12))
    got, want = model(ids).logits, reference(ids).logits
    if quant == "none":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    else:  # the device re-quantizes each fused weight: exactly quantize(sum_j c_j dequantize(W_j))
        members = decoder_layers(load_pack(full)[0])
        quantizer = QuantSpec("int4").quantizer()
        coeffs = FUSION.coefficients(3)
        fused = sum(c * members[j].mlp.down_proj.dequantized() for j, c in zip(GROUPS[0], coeffs, strict=True))
        expected = quantizer.dequantize(quantizer.quantize(fused), fused.shape[1])
        assert torch.equal(decoder_layers(model)[0].mlp.down_proj.dequantized(), expected)
    blocks = decoder_layers(model)
    assert len(blocks) == 4 and stage.manifest.groups == tuple(map(tuple, GROUPS)) and stage.manifest.layers == 4
    assert stage.manifest.fp32_bytes == sum(t.numel() * 4 for t in unique_state(reference).values())
    if quant == "int4":  # a singleton group keeps the pack's quantized tensors bit for bit
        full_model = load_pack(full)[0]
        assert torch.equal(blocks[2].self_attn.q_proj.qweight, decoder_layers(full_model)[5].self_attn.q_proj.qweight)


def _dequantized(full):
    from devft_edge.quantization import dequantize_model

    return dequantize_model(load_pack(full)[0])


def test_heal_adapter_is_applied_on_the_device(tmp_path, tiny):
    out_f, in_f = tiny.model.layers[0].self_attn.q_proj.weight.shape
    heal = {
        "layers.0.self_attn.q_proj.heal_A": torch.randn(2, in_f),
        "layers.0.self_attn.q_proj.heal_B": torch.randn(out_f, 2),
        "layers.1.input_layernorm.weight_delta": torch.full((tiny.config.hidden_size,), 0.5),
    }
    full, plan, _ = _packs(tmp_path, tiny, "none", heal=heal)
    assert plan.manifest.heal == "adapter"
    healed = decoder_layers(load_pack(derive_stage_pack(full, plan, {}, tmp_path / "stage"))[0])
    plain = decoder_layers(build_submodel(load_pack(full)[0], GROUPS, FUSION).model)
    delta = heal["layers.0.self_attn.q_proj.heal_B"] @ heal["layers.0.self_attn.q_proj.heal_A"]
    torch.testing.assert_close(healed[0].self_attn.q_proj.weight, plain[0].self_attn.q_proj.weight + delta)
    torch.testing.assert_close(healed[1].input_layernorm.weight, plain[1].input_layernorm.weight + 0.5)
    torch.testing.assert_close(healed[3].mlp.up_proj.weight, plain[3].mlp.up_proj.weight)


def test_finished_blocks_replace_device_fusion(tmp_path, tiny):
    sub = build_submodel(tiny, GROUPS, FUSION).model
    with torch.no_grad():
        for p in decoder_layers(sub).parameters():
            p.add_(0.01)  # a "healed" block the device could not derive
    blocks = {k: v for k, v in sub.state_dict().items() if k.startswith("model.layers.")}
    full, plan, _ = _packs(tmp_path, tiny, "none", blocks=blocks)
    model, _ = load_pack(derive_stage_pack(full, plan, {}, tmp_path / "stage"))
    ids = torch.randint(0, 1000, (1, 9))
    torch.testing.assert_close(model(ids).logits, sub(ids).logits)


def test_the_typed_plan_manifest_writes_back_the_signed_bytes(tmp_path, tiny):
    _packs(tmp_path, tiny, "none")
    with tarfile.open(tmp_path / "s1.plan") as tar:
        raw = tar.extractfile(tar.next()).read()
    manifest = StagePlanManifest.from_json(json.loads(raw))
    assert json.dumps(manifest.to_json(), sort_keys=True, separators=(",", ":")).encode() == raw


def test_a_plan_is_refused_for_another_pack_and_when_tampered(tmp_path, tiny):
    full, plan, _ = _packs(tmp_path, tiny, "none")
    assert plan_matches(plan, "another-sha") and "made for pack" in plan_matches(plan, "another-sha")[0]
    with pytest.raises(PackError, match="kind"):  # a pack is not a plan
        read_plan(tmp_path / "full.devpack", tmp_path / "not-a-plan", None)
    data = bytearray((tmp_path / "s1.plan").read_bytes())
    data[200] ^= 1  # inside the signed manifest
    (tmp_path / "bad.plan").write_bytes(bytes(data))
    key = Ed25519PrivateKey.generate()
    with pytest.raises(PackError):
        read_pack(tmp_path / "bad.plan", tmp_path / "bad", key.public_key())
    with pytest.raises(DevFTError, match="not both"):
        write_plan(
            tmp_path / "x",
            base_pack="",
            model_name="tiny",
            model_type="llama",
            stage=1,
            stages=2,
            groups=[[0]],
            coefficients=[[1.0]],
            quant=QuantSpec(),
            lora=LORA,
            targets=(),
            training=TrainSettings(),
            created="",
            heal={"a": torch.ones(1)},
            blocks={"b": torch.ones(1)},
        )


def test_the_agent_reads_each_archive_as_its_kind_and_fuses_again_a_stage_cached_in_an_older_form(tmp_path, tiny):
    """The agent unpacks a pack or a plan once, as the type its task names: a plan sent as the
    pack is refused (and its blob deleted). A stage it fused before the typed manifest (whose
    manifest lacked fields) is fused again rather than refused on every task."""
    from devft_edge.blobs import BlobStore
    from devft_edge.pack import Refusal
    from device_agent.agent import Agent

    _packs(tmp_path / "made", tiny, "none", base_pack=None)
    agent = SimpleNamespace(store=BlobStore(tmp_path / "blobs"), packs=tmp_path / "packs", public_key=None)
    agent._verified = Agent._verified.__get__(agent)
    full_sha = agent.store.add_file(tmp_path / "made" / "full.devpack", 2**20).sha256
    plan_sha = agent.store.add_file(tmp_path / "made" / "s1.plan", 2**20).sha256
    with pytest.raises(PackError) as error:
        agent._verified(plan_sha, PackManifest)
    assert error.value.reason is Refusal.MANIFEST and not agent.store.has(plan_sha)
    plan_sha = agent.store.add_file(tmp_path / "made" / "s1.plan", 2**20).sha256
    full = agent._verified(full_sha, PackManifest)
    assert agent._verified(full_sha, PackManifest) == full  # the second time from the unpacked directory
    derive = Agent._derived.__get__(agent)
    stage = derive(full, plan_sha, {})
    assert stage.manifest.derived_from == (full_sha, plan_sha) and stage.manifest.stage == 1
    manifest = tmp_path / "packs" / f"{plan_sha}-stage" / "manifest.json"
    old = {k: v for k, v in json.loads(manifest.read_text()).items() if k not in ("created", "fp32_bytes", "members")}
    manifest.write_text(json.dumps(old))  # what derive_stage_pack wrote before the typed manifest
    assert derive(full, plan_sha, {}) == stage and PackManifest.read(stage.directory) == stage.manifest
