"""Synthetic instruction tasks with exact-match answers.

The paper fine-tunes on Alpaca-GPT4, whose free-form answers need an LLM judge to score. For tests,
benchmarks and demos on edge hardware we want something a tiny model can learn in minutes and that
is scored by string equality, so every family here has one short correct answer (a number, a word,
a date) computed in Python. Families are small registered classes (see :data:`TASKS`); a family's
``instruction`` is fixed and everything that varies lives in ``input``, so an (instruction, input)
pair identifies a question and the held-out split can be checked for leaks by that pair.

Generation is seeded through :class:`random.Random` only, so a seed gives the same data on every
platform and Python version that keeps ``random``'s documented reproducibility guarantee.
"""

from __future__ import annotations

import datetime
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from devft_edge.errors import ConfigError, raise_if
from devft_edge.registry import Registry


@dataclass(frozen=True)
class Example:
    """One instruction-following example; frozen so it can be hashed, shared and deduplicated."""

    task: str
    """Task family the example comes from (``"custom"`` for user data); drives non-IID splits."""
    instruction: str
    """What the model is asked to do."""
    input: str
    """The data the instruction applies to; empty when the instruction stands alone."""
    output: str
    """The reference answer, compared by exact match after normalisation."""


# Common English words, lowercase, 3 to 8 letters: short enough that a reversed word or five
# sorted words stay within ~12 tokens of a BPE vocabulary. Fixed in the module, so a seed fully
# determines the data with no download.
WORDS: tuple[str, ...] = tuple(
    """
    able about above accept across act add after again age agree air all allow almost alone
    along already also always among amount animal answer any apple area arm army around arrive
    art ask baby back bad bag ball bank base basket bear beat bed before begin behind bell best
    better big bird black blood blue board boat body bone book born both bottle bottom box boy
    branch bread break bridge bright bring brother brown build burn busy buy cake call camp can
    captain car card care carry case cat catch cause cell center chair chance change charge
    check cheese chicken child choose church circle city class clean clear climb clock close
    cloud coast coat cold color come common corn cost cotton count country course cover cow
    crowd cup current cut dance dark daughter day dead deal dear decide deep desert design
    dinner direct doctor dog dollar door double down draw dream dress drink drive drop dry duck
    during early earth east easy eat edge egg eight energy engine enough enter equal even event
    every exact example eye face fact fair fall family famous farm fast father fear feel field
    fight figure fill final find fine finger finish fire first fish five floor flower fly
    follow food foot forest forget form forward four free fresh friend front fruit full game
    garden gather gentle gift girl glass gold good grass great green ground group grow guess
    guide hair half hand happy hard hat head heart heat heavy help high hill history hold home
    hope horse hot hour house huge human hunt idea inch island jacket job join joy judge jump
    just keep key kind king kitchen knife know lady lake land large laugh lead learn leave left
    lemon letter level light line lion list listen little long lost loud love low lucky lunch
    machine main market match meat meet metal middle milk mind minute money month moon morning
    mother motor mountain mouth music name nation nature near neck night noise north number
    ocean offer office open orange order paper parent party pencil people pepper picture piece
    pilot plant plate play pocket point poor potato power press pretty price print problem
    purple queen quick quiet rabbit rain reach read ready record red river road rock room rope
    round rule salt sand school science sea season seat second seed sell sense seven shape
    sharp sheep shell ship shirt shoe short shoulder silver simple sister size skin sky sleep
    slow small smile snow soft soldier song sound south space speak spring square stand star
    station stone story street strong sugar summer sun supply table tail teacher team thank
    thick thin thought tiger today tomato tool tooth total town train tree truck turn uncle
    under valley village voice wagon walk warm watch water weather week west wheel white wide
    wild window winter wish wood world write yellow young zebra
    """.split()
)

TASKS: Registry[TaskFamily] = Registry("task")
"""Name -> task family. ``TASKS.get(name)`` builds one; ``TASKS.names()`` lists them sorted."""


class TaskFamily(ABC):
    """A generator of one kind of question; subclasses set ``name`` and ``instruction``."""

    name: ClassVar[str]
    """Registry name, stored in :attr:`Example.task`."""
    instruction: ClassVar[str]
    """Fixed wording of the question, so that ``input`` alone tells two questions apart."""

    @abstractmethod
    def generate(self, rng: random.Random) -> Example:
        """Draw one example, consuming randomness only from ``rng`` (for reproducibility)."""

    def _example(self, input: str, output: str) -> Example:
        return Example(task=self.name, instruction=self.instruction, input=input, output=output)


@TASKS.register("arithmetic")
class Arithmetic(TaskFamily):
    """``a + b`` or ``a - b`` with ``a, b`` in 0..99; the answer may be negative."""

    name = "arithmetic"
    instruction = "Compute the result. Answer with the integer only."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        op = rng.choice("+-")
        return self._example(f"{a} {op} {b}", str(a + b if op == "+" else a - b))


@TASKS.register("reverse")
class Reverse(TaskFamily):
    """Spell a word backwards (only ``len(WORDS)`` distinct questions exist)."""

    name = "reverse"
    instruction = "Reverse the letters of the word."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        word = rng.choice(WORDS)
        return self._example(word, word[::-1])


@TASKS.register("sort_words")
class SortWords(TaskFamily):
    """Sort 3 to 5 distinct words alphabetically; the answer is space-separated."""

    name = "sort_words"
    instruction = "Sort the words alphabetically. Answer with the words separated by spaces."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        words = rng.sample(WORDS, rng.randint(3, 5))
        return self._example(" ".join(words), " ".join(sorted(words)))


# (singular, plural) of the source unit, the same of the target unit, and the factor between
# them. Only conversions to a smaller unit, so every answer is an integer.
_CONVERSIONS: tuple[tuple[tuple[str, str], tuple[str, str], int], ...] = (
    (("kilometer", "kilometers"), ("meter", "meters"), 1000),
    (("meter", "meters"), ("centimeter", "centimeters"), 100),
    (("centimeter", "centimeters"), ("millimeter", "millimeters"), 10),
    (("kilogram", "kilograms"), ("gram", "grams"), 1000),
    (("liter", "liters"), ("milliliter", "milliliters"), 1000),
    (("hour", "hours"), ("minute", "minutes"), 60),
    (("minute", "minutes"), ("second", "seconds"), 60),
    (("day", "days"), ("hour", "hours"), 24),
    (("week", "weeks"), ("day", "days"), 7),
)


@TASKS.register("unit_conversion")
class UnitConversion(TaskFamily):
    """Convert 1..99 of a unit into a smaller one (km->m, kg->g, hours->minutes, ...)."""

    name = "unit_conversion"
    instruction = "Convert the quantity to the requested unit. Answer with the number only."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        (src_one, src_many), (_, dst_many), factor = rng.choice(_CONVERSIONS)
        value = rng.randint(1, 99)
        src = src_one if value == 1 else src_many
        return self._example(f"{value} {src} in {dst_many}", str(value * factor))


@TASKS.register("count_letter")
class CountLetter(TaskFamily):
    """Count a letter in a word; one question in four asks for any letter, so 0 occurs."""

    name = "count_letter"
    instruction = "Count how many times the letter appears in the word. Answer with the number only."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        word = rng.choice(WORDS)
        letter = rng.choice(word) if rng.random() < 0.75 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        return self._example(f"letter: {letter}\nword: {word}", str(word.count(letter)))


_FIRST_DAY = datetime.date(1950, 1, 1).toordinal()
_LAST_DAY = datetime.date(2049, 12, 31).toordinal()


@TASKS.register("date_format")
class DateFormat(TaskFamily):
    """Rewrite an ISO date (YYYY-MM-DD, 1950..2049) as DD/MM/YYYY."""

    name = "date_format"
    instruction = "Rewrite the date in the format DD/MM/YYYY."

    def generate(self, rng: random.Random) -> Example:  # noqa: D102
        day = datetime.date.fromordinal(rng.randint(_FIRST_DAY, _LAST_DAY))
        return self._example(day.isoformat(), day.strftime("%d/%m/%Y"))


# How many draws a family may waste on questions it must avoid before we call its question space
# exhausted; far above what a non-exhausted family needs (reverse with 90% of words taken: ~10).
_MAX_REJECTIONS = 10_000


def _families(tasks: Sequence[str] | None) -> list[TaskFamily]:
    names = TASKS.names() if tasks is None else list(tasks)
    raise_if([] if names else ["tasks must name at least one task family"])
    return [TASKS.get(name) for name in names]


def _draw(
    families: list[TaskFamily],
    n: int,
    rng: random.Random,
    avoid: set[tuple[str, str]],
    unique: bool,
) -> list[Example]:
    """Round-robin over ``families``, skipping (instruction, input) pairs in ``avoid``.

    With ``unique`` every accepted pair is added to ``avoid``, so the result has no repeats.
    """
    out: list[Example] = []
    for i in range(n):
        family = families[i % len(families)]
        for _ in range(_MAX_REJECTIONS):
            ex = family.generate(rng)
            key = (ex.instruction, ex.input)
            if key not in avoid:
                break
        else:
            raise ConfigError(
                f"task {family.name!r} ran out of distinct questions after {len(out)} examples; "
                "ask for fewer examples or drop the task"
            )
        if unique:
            avoid.add(key)
        out.append(ex)
    return out


def generate_synthetic(n: int, seed: int, tasks: Sequence[str] | None = None) -> list[Example]:
    """``n`` examples, family ``i % len(tasks)`` at position ``i`` (all registered when None).

    Round-robin keeps the families balanced to within one example for any ``n``; repeats are
    allowed (small families like ``reverse`` have only a few hundred questions). The same
    ``seed`` and ``tasks`` always give the same list.
    """
    raise_if([f"n must be >= 0, got {n}"] if n < 0 else [])
    return _draw(_families(tasks), n, random.Random(seed), set(), unique=False)


def train_eval_split(
    n_train: int, n_eval: int, seed: int, tasks: Sequence[str] | None = None
) -> tuple[list[Example], list[Example]]:
    """A train split and a held-out eval split sharing no (instruction, input) pair.

    The eval split is drawn first, without repeats, from its own stream (seeded by ``seed``), and
    the train split is drawn from a second stream rejecting every eval question, so exact-match
    accuracy on eval measures generalisation rather than memorisation. Both are round-robin over
    the families. Raises :class:`ConfigError` when a family has too few distinct questions.
    """
    raise_if([f"{name} must be >= 0, got {v}" for name, v in (("n_train", n_train), ("n_eval", n_eval)) if v < 0])
    families = _families(tasks)
    held_out: set[tuple[str, str]] = set()
    eval_set = _draw(families, n_eval, random.Random(f"devft-edge/eval/{seed}"), held_out, unique=True)
    train = _draw(families, n_train, random.Random(f"devft-edge/train/{seed}"), held_out, unique=False)
    return train, eval_set
