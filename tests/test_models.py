"""Model loading, the layer-access table and the submodel builder."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from devft_edge.errors import ConfigError, UnsupportedArchitectureError
from devft_edge.fusion import FUSIONS
from devft_edge.layers import ARCHITECTURES, architecture_of, decoder_layers, num_layers
from devft_edge.models import TINY_FAMILIES, load_model, tiny_config
from devft_edge.submodel import build_submodel, submodel_config


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_singleton_submodel_reproduces_full_logits(family):
    model = load_model(f"tiny-{family}", seed=1)
    L = num_layers(model.config)
    sub = build_submodel(model, [[j] for j in range(L)], FUSIONS.get("dblf", beta=0.1))
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sub.model(ids).logits, model(ids).logits, rtol=0, atol=0)
    # Embeddings are shared, not copied.
    assert sub.model.get_input_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_submodel_has_fused_layers(tiny):
    groups = [[0, 1, 2], [3], [4, 5, 6, 7]]
    sub = build_submodel(tiny, groups, FUSIONS.get("dblf", beta=0.1))
    assert num_layers(sub.model.config) == 3 and len(decoder_layers(sub.model)) == 3
    full = decoder_layers(tiny)
    want = full[4].mlp.up_proj.weight + 0.1 * sum(
        full[j].mlp.up_proj.weight - full[4].mlp.up_proj.weight for j in (5, 6, 7)
    )
    torch.testing.assert_close(decoder_layers(sub.model)[2].mlp.up_proj.weight, want)
    torch.testing.assert_close(decoder_layers(sub.model)[1].input_layernorm.weight, full[3].input_layernorm.weight)
    out = sub.model(torch.tensor([[1, 2, 3]])).logits
    assert out.shape == (1, 3, tiny.config.vocab_size) and torch.isfinite(out).all()
    assert sub.groups == groups


def test_per_layer_config_lists_follow_anchors():
    config = tiny_config("qwen2", num_layers=4)
    config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    new = submodel_config(config, [[0], [1, 2], [3]])
    assert new.num_hidden_layers == 3
    assert new.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert config.num_hidden_layers == 4  # the base config is untouched


def test_bad_groups_rejected(tiny):
    with pytest.raises(ConfigError, match="partition"):
        build_submodel(tiny, [[0, 1], [3, 4, 5, 6, 7]], FUSIONS.get("one"))


def test_unsupported_architecture_names_supported_ones(tmp_path):
    config = AutoConfig.for_model(
        "bert", vocab_size=100, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    with pytest.raises(UnsupportedArchitectureError) as err:
        architecture_of(config)
    for name in ("llama", "qwen2", "gpt2", "gpt_neox", "phi3"):
        assert name in str(err.value)
    config.save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="bert"):
        load_model(str(tmp_path))


def test_unknown_model_spec():
    with pytest.raises(ConfigError, match="no such directory"):
        load_model("no-such-model")
    with pytest.raises(ConfigError, match="tiny config"):
        load_model("tiny-bert")


def test_table_covers_three_families():
    assert {"llama", "qwen2", "gpt2", "gpt_neox", "phi3"} <= set(ARCHITECTURES)


def test_a_tokenizer_larger_than_the_embedding_is_a_clear_error(tmp_path):
    """Once an IndexError deep inside torch at the first batch (issue 14)."""
    import shutil

    from devft_edge.models import TOKENIZER_FILES, load_tokenizer, smollm2_dir

    for name in TOKENIZER_FILES:
        if (smollm2_dir() / name).is_file():
            shutil.copy(smollm2_dir() / name, tmp_path / name)
    tiny_config("llama", vocab_size=1000).save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer has 49152 tokens but the model's embedding only 1000"):
        load_tokenizer(str(tmp_path))
    assert len(load_tokenizer("tiny")) == 49152  # SmolLM2's tokenizer on a tiny model of its vocabulary
