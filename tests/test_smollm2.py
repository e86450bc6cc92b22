"""The core on the real pretrained model (SmolLM2-135M-Instruct, bundled offline)."""

from __future__ import annotations

import pytest
import torch

from devft_edge.calibration import CALIBRATION_TEXT
from devft_edge.data import batches, train_eval_split
from devft_edge.fusion import FUSIONS
from devft_edge.grouping import GROUPINGS
from devft_edge.layers import num_layers
from devft_edge.lora import LoraSettings, attach_lora, init_lora_state, lora_shapes, set_lora_state
from devft_edge.models import load_model, load_tokenizer
from devft_edge.schedule import StageSchedule
from devft_edge.similarity import SIMILARITIES
from devft_edge.submodel import build_submodel, layer_evidence, stage_lora
from devft_edge.training import TrainSettings, evaluate, train_local

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2"), load_tokenizer("smollm2")


def test_bundled_model_is_smollm2(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and num_layers(model.config) == 30
    assert model.config.hidden_size == 576 and model.config.vocab_size == 49152
    assert StageSchedule(30, 4, 12).capacities == (4, 8, 15, 30)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.input_ids.shape[1] :])


def test_cka_groups_and_stage_one_training(smollm2):
    model, tokenizer = smollm2
    settings = LoraSettings(rank=8)
    full = init_lora_state(lora_shapes(model, settings), settings.rank, seed=0)
    calibration = tokenizer(CALIBRATION_TEXT, return_tensors="pt").input_ids[:, :512]
    cka = SIMILARITIES.get("cka")
    w = cka.compute(layer_evidence(model, cka, settings, full, calibration))
    # Functional similarity carries signal: neighbours alike, distant layers much less so.
    adjacent = torch.stack([w[i, i + 1] for i in range(29)]).mean()
    distant = torch.stack([w[i, j] for i in range(30) for j in range(30) if abs(i - j) > 5]).mean()
    assert adjacent > 0.85 and distant < adjacent - 0.2
    groups = GROUPINGS.get("contiguous").group(w, 4, seed=0)
    assert [j for g in groups for j in g] == list(range(30)) and max(len(g) for g in groups) <= 15

    fusion = FUSIONS.get("dblf", beta="auto")
    sub = build_submodel(model, groups, fusion)
    peft_model = attach_lora(sub.model, settings)
    set_lora_state(peft_model, stage_lora(full, groups, fusion))
    train, held_out = train_eval_split(64, 16, seed=0)
    before = evaluate(peft_model, tokenizer, held_out, seq_len=64)
    train_local(peft_model, batches(train, 4, 0, tokenizer, 64), TrainSettings(steps=8, lr=1e-3))
    after = evaluate(peft_model, tokenizer, held_out, seq_len=64)
    assert after.loss < before.loss - 0.3, (before, after)
