"""Instruction data for federated fine-tuning: loading, client partitioning and tokenisation.

The synthetic task families live in :mod:`devft_edge.tasks`; :class:`Example`,
:func:`generate_synthetic` and :func:`train_eval_split` are re-exported here so callers need one
import. This module adds the three things every client needs: user data from JSONL, a split of
examples over clients (IID or Dirichlet label skew), and causal-LM batches whose loss covers only
the answer tokens.

Tokenisation conventions (shared by training and evaluation, so they cannot drift apart):

* the prompt is the tokenizer's chat template with a generation prompt when it has one, else a
  plain ``### Instruction: / ### Response:`` format; both are tokenised with
  ``add_special_tokens=False`` because the template already contains its special tokens;
* the answer is ``output`` followed by the EOS token, tokenised separately from the prompt, so the
  training sequence is exactly what greedy generation sees (prompt ids, then generated ids) and the
  model learns to stop;
* ``labels`` equal ``input_ids`` on the answer and are -100 elsewhere; transformers' causal-LM loss
  shifts them by one itself.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from devft_edge.errors import ConfigError, DataError, raise_if
from devft_edge.tasks import Example, generate_synthetic, train_eval_split

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "batches",
    "encode_batch",
    "encode_prompts",
    "exact_match",
    "generate_synthetic",
    "load_jsonl",
    "normalize_answer",
    "pad_id",
    "partition",
    "partition_by_kind",
    "render_answer",
    "render_prompt",
    "train_eval_split",
]

IGNORE_INDEX = -100
"""Label value that ``torch.nn.CrossEntropyLoss`` (and so every HF causal LM) skips."""

_MAX_LISTED_PROBLEMS = 20  # a broken file reports this many lines, then a count of the rest


# --------------------------------------------------------------------------------------------
# Loading user data


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read one example per line: ``instruction``, ``output`` (required), ``input``, ``task``.

    ``input`` defaults to ``""`` and ``task`` to ``"custom"``; other keys are ignored so exports
    carrying ids or metadata load as they are. Blank lines are skipped. Every bad line is reported
    in one :class:`DataError`, each as ``"<path>:<line>: <problem>"``.
    """
    try:
        with open(path, encoding="utf-8-sig") as f:  # tolerate a BOM
            # Iterating the file splits on newlines only; str.splitlines would also split on
            # U+2028 and friends, which JSON allows unescaped inside strings.
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    examples: list[Example] = []
    problems: list[str] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        ex_or_problem = _parse_line(line)
        if isinstance(ex_or_problem, Example):
            examples.append(ex_or_problem)
        else:
            problems.append(f"{path}:{lineno}: {ex_or_problem}")
    if problems:
        shown = problems[:_MAX_LISTED_PROBLEMS]
        if len(problems) > len(shown):
            shown.append(f"... and {len(problems) - len(shown)} more bad lines")
        raise DataError("\n".join(shown))
    if not examples:
        raise DataError(f"{path}: no examples (the file is empty)")
    return examples


def _parse_line(line: str) -> Example | str:
    """The example on ``line``, or a description of what is wrong with it."""
    try:
        obj: Any = json.loads(line)
    except json.JSONDecodeError as e:
        return f"invalid JSON: {e.msg} (column {e.colno})"
    if not isinstance(obj, dict):
        return f"expected a JSON object, got {type(obj).__name__}"
    fields: dict[str, str] = {}
    for key, default in (
        ("instruction", None),
        ("input", ""),
        ("output", None),
        ("task", "custom"),
    ):
        if key not in obj and default is None:
            return f"missing field {key!r}"
        value = obj.get(key, default)
        if not isinstance(value, str):
            return f"field {key!r} must be a string, got {type(value).__name__}"
        fields[key] = value
    for key in ("instruction", "output", "task"):
        if not fields[key].strip():
            return f"field {key!r} is empty"
    return Example(**fields)


# --------------------------------------------------------------------------------------------
# Client partitioning


def partition(
    examples: Sequence[Example], num_clients: int, seed: int, alpha: float | None = None
) -> list[list[Example]]:
    """Split ``examples`` over ``num_clients`` clients; every example goes to exactly one client.

    ``alpha=None`` is IID: a seeded shuffle cut into near-equal parts (sizes differ by at most one,
    the first clients get the extra examples). With ``alpha`` it is the usual label-skew split of
    federated benchmarks (Hsu et al. 2019, "Measuring the effects of non-identical data
    distribution"), with task families as labels: for each family, in sorted name order, client
    proportions are drawn from Dirichlet(alpha) and the family's shuffled examples are cut at the
    cumulative proportions. Small alpha gives each client a few families, large alpha approaches
    IID. Every client must train, so empty clients each take one example from the currently
    largest client (lowest index on ties). Randomness comes from ``numpy.random.default_rng(seed)``
    only, so the split is reproducible.
    """
    problems = []
    if num_clients < 1:
        problems.append(f"num_clients must be >= 1, got {num_clients}")
    elif num_clients > len(examples):
        problems.append(f"num_clients ({num_clients}) must not exceed the number of examples ({len(examples)})")
    if alpha is not None and not alpha > 0:
        problems.append(f"alpha must be > 0, got {alpha}")
    raise_if(problems)

    if alpha is None:
        order = list(range(len(examples)))
        random.Random(seed).shuffle(order)
        base, extra = divmod(len(examples), num_clients)
        parts, start = [], 0
        for client in range(num_clients):
            size = base + (client < extra)
            parts.append(order[start : start + size])
            start += size
        return [[examples[i] for i in part] for part in parts]

    rng = np.random.default_rng(seed)
    by_task: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_task.setdefault(ex.task, []).append(i)
    clients: list[list[int]] = [[] for _ in range(num_clients)]
    for task in sorted(by_task):
        idx = np.asarray(by_task[task])[rng.permutation(len(by_task[task]))]
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for client, chunk in enumerate(np.split(idx, cuts)):
            clients[client].extend(chunk.tolist())
    # Terminates: while a client is empty the largest holds >= 2 (num_clients <= len(examples)).
    for empty in range(num_clients):
        if not clients[empty]:
            largest = max(range(num_clients), key=lambda c: (len(clients[c]), -c))
            clients[empty].append(clients[largest].pop())
    # Shuffle within each client so its list is not grouped by family.
    return [[examples[i] for i in np.asarray(c)[rng.permutation(len(c))].tolist()] for c in clients]


def partition_by_kind(
    examples: Sequence[Example], kinds: Sequence[str], seed: int, alpha: float | None = None
) -> list[list[Example]]:
    """Split ``examples`` over clients of several kinds (``kinds[c]`` = client ``c``'s kind, e.g.
    its device profile) so that every kind holds task families no other kind has.

    The sorted task families are dealt round-robin to the sorted kinds; each kind's examples are
    then split over its own clients by :func:`partition` (IID or Dirichlet ``alpha``). This is the
    fleet DevFT is made for: when a kind of device cannot train the full-depth stage, the families
    only it holds are learned in the shallower stages or not at all.
    """
    distinct = sorted(set(kinds))
    families = sorted({ex.task for ex in examples})
    raise_if(
        [f"{len(distinct)} kinds of client need at least as many task families, got {len(families)}"]
        if len(families) < len(distinct)
        else []
    )
    owner = {family: distinct[i % len(distinct)] for i, family in enumerate(families)}
    parts: list[list[Example]] = [[] for _ in kinds]
    for k, kind in enumerate(distinct):
        members = [c for c, x in enumerate(kinds) if x == kind]
        mine = [ex for ex in examples if owner[ex.task] == kind]
        for client, part in zip(members, partition(mine, len(members), seed + k, alpha), strict=True):
            parts[client] = part
    return parts


# --------------------------------------------------------------------------------------------
# Prompts and tokenisation


def render_prompt(tokenizer: Any, ex: Example) -> str:
    """The text the model sees before its answer (chat template, else a plain format)."""
    message = f"{ex.instruction}\n{ex.input}" if ex.input else ex.instruction
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        return str(text)
    return f"### Instruction:\n{message}\n### Response:\n"


def render_answer(tokenizer: Any, ex: Example) -> str:
    """The target text: ``output`` plus the EOS token text, so the model learns where to stop."""
    return ex.output + (tokenizer.eos_token or "")


def normalize_answer(text: str) -> str:
    """Canonical form for exact match: the first non-blank line, whitespace runs collapsed.

    Greedy decoding often continues past the answer with a newline and more text, and may pad with
    spaces; none of that should count against an otherwise correct answer.
    """
    stripped = text.strip()
    return " ".join(stripped.split("\n", 1)[0].split())


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` equals ``reference`` after :func:`normalize_answer` on both."""
    return normalize_answer(prediction) == normalize_answer(reference)


def pad_id(tokenizer: Any) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ConfigError("tokenizer has neither a pad token nor an EOS token to pad with")
    return int(pad)


def _prompt_ids(tokenizer: Any, ex: Example) -> list[int]:
    return list(tokenizer(render_prompt(tokenizer, ex), add_special_tokens=False)["input_ids"])


def _answer_ids(tokenizer: Any, ex: Example) -> list[int]:
    """Token ids of the answer; EOS is appended as an id, never re-parsed from its text.

    Appending the id guarantees the model is trained on the exact id that stops generation, even
    for tokenizers that split special-token text into ordinary pieces.
    """
    ids = list(tokenizer(ex.output, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return ids


def _describe(index: int, ex: Example) -> str:
    return f"example {index} (task {ex.task!r}, instruction {ex.instruction[:40]!r})"


def _tokenize_for_training(
    tokenizer: Any, examples: Sequence[Example], seq_len: int
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per example, prompt left-truncated to fit ``seq_len``.

    The prompt keeps at least one token: position 0's label is never used by the shifted loss, so
    an answer filling the whole window would lose its first token and have no context at all.
    """
    raise_if([f"seq_len must be >= 2, got {seq_len}"] if seq_len < 2 else [])
    if not examples:
        raise DataError("no examples to encode")
    out: list[tuple[list[int], list[int]]] = []
    problems: list[str] = []
    for i, ex in enumerate(examples):
        prompt, answer = _prompt_ids(tokenizer, ex), _answer_ids(tokenizer, ex)
        if len(answer) >= seq_len:
            problems.append(
                f"{_describe(i, ex)}: answer is {len(answer)} tokens, seq_len {seq_len} needs it"
                f" to be at most {seq_len - 1} to leave room for the prompt"
            )
            continue
        overflow = len(prompt) + len(answer) - seq_len
        out.append((prompt[overflow:] if overflow > 0 else prompt, answer))
    if problems:
        raise DataError("; ".join(problems))
    return out


def _collate(tokenized: Sequence[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> dict[str, Tensor]:
    batch = len(tokenized)
    input_ids = torch.full((batch, seq_len), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, seq_len), dtype=torch.long)
    labels = torch.full((batch, seq_len), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, answer) in enumerate(tokenized):
        n_prompt, n = len(prompt), len(prompt) + len(answer)
        input_ids[row, :n] = torch.tensor(prompt + answer, dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, n_prompt:n] = torch.tensor(answer, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def encode_batch(tokenizer: Any, examples: Sequence[Example], seq_len: int) -> dict[str, Tensor]:
    """Training tensors ``input_ids``, ``attention_mask``, ``labels``, each ``[B, seq_len]`` long.

    Right-padded with the pad id (EOS id when the tokenizer has no pad token). ``labels`` are the
    answer ids at the answer positions and -100 on prompt and padding, so the loss is over the
    answer only. Overlong prompts lose tokens from the left (the instruction's start or the chat
    header), never the answer. Raises :class:`DataError` naming every example whose answer does not
    fit.
    """
    return _collate(_tokenize_for_training(tokenizer, examples, seq_len), seq_len, pad_id(tokenizer))


def encode_prompts(tokenizer: Any, examples: Sequence[Example], max_length: int | None = None) -> dict[str, Tensor]:
    """Prompts only, LEFT-padded to the longest, for batched ``generate``: ``[B, L]`` tensors.

    Left padding puts every prompt's last token in the last column, so all rows start generating
    at the same position. ``max_length`` left-truncates longer prompts, as training does.
    """
    if not examples:
        raise DataError("no examples to encode")
    raise_if([f"max_length must be >= 1, got {max_length}"] if max_length is not None and max_length < 1 else [])
    prompts = [_prompt_ids(tokenizer, ex) for ex in examples]
    if max_length is not None:
        prompts = [p[-max_length:] for p in prompts]
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id(tokenizer), dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[row, width - len(p) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def batches(
    examples: Sequence[Example], batch_size: int, seed: int, tokenizer: Any, seq_len: int
) -> Iterator[dict[str, Tensor]]:
    """Endless training batches for one client, as :func:`encode_batch` builds them.

    Epochs are seeded shuffles (``random.Random(seed)``) chained into one stream, so every batch is
    full and, within each epoch, every example is seen once; local training just takes the next
    ``local_steps`` batches. All examples are tokenised once up front, which both saves work on the
    device and reports every too-long answer before training starts.
    """
    raise_if([f"batch_size must be >= 1, got {batch_size}"] if batch_size < 1 else [])
    tokenized = _tokenize_for_training(tokenizer, examples, seq_len)
    pad = pad_id(tokenizer)
    rng = random.Random(seed)

    def stream() -> Iterator[dict[str, Tensor]]:
        pending: list[int] = []
        while True:
            order = list(range(len(tokenized)))
            rng.shuffle(order)
            pending.extend(order)
            while len(pending) >= batch_size:
                chosen = pending[:batch_size]
                del pending[:batch_size]
                yield _collate([tokenized[i] for i in chosen], seq_len, pad)

    return stream()
