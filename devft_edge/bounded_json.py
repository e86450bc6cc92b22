"""JSON from the network, parsed with limits: the one parser for message headers and pack manifests.

Python's ``json`` accepts integers of any length (quadratic time to convert), ``NaN`` and
``Infinity``, and nesting as deep as the recursion limit. Everything a peer sends is hostile until
checked, so :func:`loads` refuses all three before any field is read; each caller turns the
``ValueError`` into its own refusal (a protocol reason, a pack refusal).
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_INT_DIGITS = 19
"""Longest integer accepted: every count, size and time the system carries is below 10**19, and a
several-thousand-digit integer would cost quadratic time to parse."""


def loads(data: bytes | str, max_depth: int) -> Any:
    """Parse ``data``: integers of at most :data:`MAX_INT_DIGITS` digits, finite floats (``NaN``
    only as the bare constant, for a metric a device has no value for), at most ``max_depth``
    levels of nesting.

    Raises:
        ValueError: not JSON, not within the bounds, or too deep (message says which).
    """
    try:
        value = json.loads(data, parse_int=_bounded_int, parse_float=_finite_float, parse_constant=_constant)
    except RecursionError:
        raise ValueError("nests deeper than the parser's recursion limit") from None
    if depth(value) > max_depth:
        raise ValueError(f"nests deeper than {max_depth}")
    return value


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"an integer of {len(text)} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:24]} is not finite")
    return value


def _constant(name: str) -> float:
    if name == "NaN":
        return math.nan
    raise ValueError(f"{name} is not a finite number")
