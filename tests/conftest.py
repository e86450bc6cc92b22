"""Shared fixtures: tiny models, the SmolLM2 tokenizer (cached once per session), a mosquitto broker."""

from __future__ import annotations

import pytest
from system_harness import MOSQUITTO, mosquitto

from devft_edge.models import load_model, load_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (the tiny models borrow it)."""
    return load_tokenizer("tiny")


@pytest.fixture
def tiny():
    """A fresh 8-layer tiny Llama with random weights."""
    return load_model("tiny", seed=0)


@pytest.fixture
def broker(tmp_path):
    """A real mosquitto on a free loopback port (its files under ``tmp_path/broker``); the URL."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto not installed (make test installs it)")
    with mosquitto(tmp_path / "broker") as url:
        yield url
