"""Shared fixtures: tiny models of each family, the SmolLM2 tokenizer (cached once per session)."""

from __future__ import annotations

import pytest

from devft_edge.models import load_model, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (the tiny models borrow it)."""
    return load_tokenizer("tiny")


@pytest.fixture
def tiny():
    """A fresh 8-layer tiny Llama with random weights."""
    return load_model("tiny", seed=0)
