"""Healing fused submodels on the server: the distillation lowers the KL, touches only the fused
blocks, and the adapter mode's factors reproduce what it merged; the server text is deterministic."""

from __future__ import annotations

import pytest
import torch

from devft_edge.errors import ConfigError
from devft_edge.fusion import FUSIONS
from devft_edge.healing import HealSettings, Teacher, heal_submodel
from devft_edge.layers import decoder_layers
from devft_edge.server_text import _WORDS, server_prompts, server_text
from devft_edge.submodel import build_submodel
from devft_edge.tasks import WORDS

GROUPS = [[0, 1, 2], [3, 4], [5], [6, 7]]


@pytest.fixture(scope="module")
def text(tokenizer):
    from devft_edge.models import load_model

    return server_text(load_model("tiny", seed=0), tokenizer, n=12, new_tokens=6, seed=0)


def test_server_prompts_are_deterministic_and_not_the_client_tasks():
    prompts = server_prompts(40, seed=3)
    assert prompts == server_prompts(40, seed=3) and prompts != server_prompts(40, seed=4)
    assert len(prompts) == 40 and len(set(prompts)) > 30
    assert set(_WORDS).isdisjoint(WORDS)  # another word list than the clients' tasks
    with pytest.raises(ConfigError):
        server_prompts(0, seed=0)


def test_server_text_marks_answer_positions(text, tokenizer):
    ids, mask = text.input_ids, text.loss_mask
    assert ids.shape == mask.shape and mask.dtype == torch.bool
    assert bool(mask.any(dim=1).all())  # every sequence has an answer to distil on
    for row in range(ids.shape[0]):
        first = int(mask[row].nonzero()[0])
        prompt = tokenizer.decode(ids[row, : first + 1])
        assert prompt.rstrip().endswith("assistant")  # the first distilled prediction follows the prompt


@pytest.mark.parametrize("mode", ["bake", "adapter"])
def test_heal_lowers_kl_and_changes_only_fused_blocks(mode, tiny, text):
    sub = build_submodel(tiny, GROUPS, FUSIONS.get("dblf", beta=0.1)).model
    frozen = {n: p.detach().clone() for n, p in sub.named_parameters() if "layers." not in n}
    blocks = {n: p.detach().clone() for n, p in sub.named_parameters() if "layers." in n}
    settings = HealSettings(steps=40, lr=3e-3, batch=4, mode=mode, rank=4)
    result = heal_submodel(sub, GROUPS, Teacher(tiny, text), settings)
    assert result.kl_after < result.kl_before
    after = dict(sub.named_parameters())
    assert all(torch.equal(after[n], t) for n, t in frozen.items())  # embeddings, norm, head untouched
    assert any(not torch.equal(after[n], t) for n, t in blocks.items())
    assert not any(p.requires_grad for p in sub.parameters())
    if mode == "adapter":
        assert result.adapter and all(k.startswith("layers.") for k in result.adapter)
        key = next(k for k in result.adapter if k.endswith("q_proj.heal_A"))
        g = int(key.split(".")[1])
        delta = result.adapter[key.replace("heal_A", "heal_B")] @ result.adapter[key]
        before = blocks[f"model.layers.{g}.self_attn.q_proj.weight"]
        torch.testing.assert_close(decoder_layers(sub)[g].self_attn.q_proj.weight, before + delta)
        assert not decoder_layers(sub)[g].self_attn.q_proj._forward_hooks  # merged: no hook left
    else:
        assert result.adapter == {}


def test_heal_brings_the_submodel_closer_to_the_full_model(tiny, text):
    ids = text.input_ids[:4]
    target = torch.log_softmax(tiny(ids).logits, -1)

    def kl(model):
        student = torch.log_softmax(model(ids).logits, -1)
        return float(torch.nn.functional.kl_div(student, target, log_target=True, reduction="batchmean"))

    sub = build_submodel(tiny, GROUPS, FUSIONS.get("dblf", beta=0.1)).model
    before = kl(sub)
    heal_submodel(sub, GROUPS, Teacher(tiny, text), HealSettings(steps=60, lr=3e-3, batch=4))
    assert kl(sub) < before


def test_heal_settings_and_boundaries(tiny, text):
    with pytest.raises(ConfigError) as err:
        HealSettings(steps=0, lr=-1, mode="x")
    assert len(err.value.problems) == 3
    sub = build_submodel(tiny, GROUPS, FUSIONS.get("dblf", beta=0.1)).model
    with pytest.raises(ConfigError, match="boundaries"):
        heal_submodel(sub, GROUPS, Teacher(tiny, text), HealSettings(steps=1, hidden_weight=1.0))
    with pytest.raises(ConfigError, match="teacher has 8 layers"):
        heal_submodel(sub, [[0, 1, 2], [3, 4]], Teacher(tiny, text), HealSettings(steps=1))
    result = heal_submodel(sub, GROUPS, Teacher(tiny, text, boundaries=True), HealSettings(steps=3, hidden_weight=1.0))
    assert result.kl_after >= 0
