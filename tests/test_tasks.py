"""Synthetic task families: answers recomputed independently, determinism, held-out split."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from devft_edge.errors import ConfigError, UnknownVariantError
from devft_edge.tasks import TASKS, WORDS, Example, generate_synthetic, train_eval_split

FAMILIES = ["arithmetic", "count_letter", "date_format", "reverse", "sort_words", "unit_conversion"]


def _sample(task: str, n: int = 200, seed: int = 3) -> list[Example]:
    examples = generate_synthetic(n, seed, [task])
    assert {ex.task for ex in examples} == {task}
    return examples


def test_registry_has_every_family_under_its_own_name() -> None:
    assert set(FAMILIES) <= set(TASKS.names())
    for name in FAMILIES:
        assert TASKS.get(name).name == name
    with pytest.raises(UnknownVariantError, match="reverse"):  # lists the known names
        TASKS.get("no_such_task")


def test_word_list_is_a_few_hundred_distinct_lowercase_words() -> None:
    assert len(WORDS) >= 300
    assert len(set(WORDS)) == len(WORDS)
    assert all(w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 8 for w in WORDS)


def test_arithmetic_answers() -> None:
    ops = Counter()
    for ex in _sample("arithmetic"):
        m = re.fullmatch(r"(\d+) ([+-]) (\d+)", ex.input)
        assert m, ex.input
        a, op, b = int(m[1]), m[2], int(m[3])
        assert 0 <= a <= 99 and 0 <= b <= 99
        assert int(ex.output) == (a + b if op == "+" else a - b)
        assert ex.output == str(int(ex.output))  # plain integer, no "+" or padding
        ops[op] += 1
    assert set(ops) == {"+", "-"}


def test_reverse_answers() -> None:
    for ex in _sample("reverse"):
        assert ex.input in WORDS
        assert ex.output == "".join(reversed(ex.input))
        assert len(ex.output) == len(ex.input)


def test_sort_words_answers() -> None:
    lengths = set()
    for ex in _sample("sort_words"):
        words = ex.input.split(" ")
        lengths.add(len(words))
        assert len(set(words)) == len(words)
        expected = list(words)
        expected.sort()
        assert ex.output.split(" ") == expected
    assert lengths == {3, 4, 5}


_FACTORS = {
    ("kilometer", "meter"): 1000,
    ("meter", "centimeter"): 100,
    ("centimeter", "millimeter"): 10,
    ("kilogram", "gram"): 1000,
    ("liter", "milliliter"): 1000,
    ("hour", "minute"): 60,
    ("minute", "second"): 60,
    ("day", "hour"): 24,
    ("week", "day"): 7,
}


def test_unit_conversion_answers() -> None:
    seen = set()
    for ex in _sample("unit_conversion", n=400):
        m = re.fullmatch(r"(\d+) ([a-z]+?)s? in ([a-z]+)s", ex.input)
        assert m, ex.input
        value, src, dst = int(m[1]), m[2], m[3]
        assert ex.input.split()[1] == (src if value == 1 else src + "s")  # singular only for 1
        assert ex.output == str(value * _FACTORS[(src, dst)])
        seen.add((src, dst))
    assert seen == set(_FACTORS)


def test_count_letter_answers() -> None:
    answers = Counter()
    for ex in _sample("count_letter", n=300):
        m = re.fullmatch(r"letter: ([a-z])\nword: ([a-z]+)", ex.input)
        assert m, ex.input
        letter, word = m[1], m[2]
        assert ex.output == str(sum(1 for ch in word if ch == letter))
        answers[ex.output] += 1
    assert answers["0"] > 0 and answers["1"] > 0 and answers["2"] > 0


def test_date_format_answers() -> None:
    for ex in _sample("date_format"):
        m = re.fullmatch(r"(\d{4})-(\d{2})-(\d{2})", ex.input)
        assert m, ex.input
        year, month, day = m[1], m[2], m[3]
        assert ex.output == f"{day}/{month}/{year}"
        assert 1950 <= int(year) <= 2049 and 1 <= int(month) <= 12 and 1 <= int(day) <= 31


def test_instruction_is_fixed_per_family() -> None:
    examples = generate_synthetic(120, 0)
    per_task = {}
    for ex in examples:
        per_task.setdefault(ex.task, set()).add(ex.instruction)
    assert all(len(instructions) == 1 for instructions in per_task.values())
    assert len({next(iter(v)) for v in per_task.values()}) == len(per_task)


def test_generate_is_deterministic_and_seed_dependent() -> None:
    assert generate_synthetic(60, 7) == generate_synthetic(60, 7)
    assert generate_synthetic(60, 7) != generate_synthetic(60, 8)
    # A family draws only from the rng it is given.
    family = TASKS.get("sort_words")
    assert family.generate(random.Random(1)) == family.generate(random.Random(1))


def test_generate_is_round_robin_balanced() -> None:
    examples = generate_synthetic(601, 0)
    names = TASKS.names()
    assert [ex.task for ex in examples] == [names[i % len(names)] for i in range(601)]
    counts = Counter(ex.task for ex in examples)
    assert max(counts.values()) - min(counts.values()) <= 1
    subset = generate_synthetic(5, 0, ["reverse", "arithmetic"])
    assert [ex.task for ex in subset] == ["reverse", "arithmetic", "reverse", "arithmetic", "reverse"]


def test_generate_rejects_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        generate_synthetic(-1, 0)
    with pytest.raises(ConfigError):
        generate_synthetic(3, 0, [])
    with pytest.raises(UnknownVariantError):
        generate_synthetic(3, 0, ["reverse", "poetry"])


def test_train_eval_split_is_held_out() -> None:
    train, held_out = train_eval_split(3000, 300, seed=5)
    assert len(train) == 3000 and len(held_out) == 300
    eval_keys = [(ex.instruction, ex.input) for ex in held_out]
    assert len(set(eval_keys)) == len(eval_keys)  # eval has no repeats
    assert not set(eval_keys) & {(ex.instruction, ex.input) for ex in train}
    assert Counter(ex.task for ex in held_out) == Counter({name: 50 for name in TASKS.names()})
    # Small families do repeat in train (reverse has len(WORDS) questions and 500 draws).
    assert train_eval_split(3000, 300, seed=5) == (train, held_out)
    assert train_eval_split(3000, 300, seed=6) != (train, held_out)


def test_train_eval_split_reports_an_exhausted_family() -> None:
    with pytest.raises(ConfigError, match="reverse"):
        train_eval_split(0, len(WORDS) + 1, seed=0, tasks=["reverse"])
    with pytest.raises(ConfigError, match="reverse"):  # eval took every word, nothing left to train
        train_eval_split(1, len(WORDS), seed=0, tasks=["reverse"])
    train, held_out = train_eval_split(5, len(WORDS) - 1, seed=0, tasks=["reverse"])
    assert {ex.input for ex in train} == set(WORDS) - {ex.input for ex in held_out}
    with pytest.raises(ConfigError, match="n_eval"):
        train_eval_split(1, -1, seed=0)
