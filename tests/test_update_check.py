"""Update validation: every rejection reason, and the norm it reports."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch

from devft_edge.errors import DataError
from devft_edge.protocol import ProtocolError, Reason
from devft_edge.update_check import check_update
from devft_edge.weights import read_safetensors


def _header(header: object) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw


def _raw_header(raw: bytes) -> bytes:
    return struct.pack("<Q", len(raw)) + raw


START = {"layers.0.q_proj.lora_A": torch.zeros(2, 3), "layers.0.q_proj.lora_B": torch.zeros(3, 2)}


def test_good_update_returns_its_distance():
    update = {k: v + 1.0 for k, v in START.items()}
    assert check_update(update, START) == pytest.approx(math.sqrt(12))


@pytest.mark.parametrize(
    "update,reason",
    [
        ({"layers.0.q_proj.lora_A": torch.zeros(2, 3)}, Reason.SHAPE),
        ({**START, "layers.9.q_proj.lora_A": torch.zeros(2, 3)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.zeros(3, 3)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.zeros(3, 2, dtype=torch.int64)}, Reason.SHAPE),
        ({**START, "layers.0.q_proj.lora_B": torch.tensor([[0.0, float("nan")]] * 3)}, Reason.NOT_FINITE),
        ({**START, "layers.0.q_proj.lora_B": torch.full((3, 2), float("inf"))}, Reason.NOT_FINITE),
        ({**START, "layers.0.q_proj.lora_B": torch.full((3, 2), 100.0)}, Reason.NORM),
    ],
)
def test_bad_updates_are_rejected_with_their_reason(update, reason):
    with pytest.raises(ProtocolError) as error:
        check_update(update, START, max_norm=50.0)
    assert error.value.reason is reason


def test_norm_bound_can_be_disabled():
    assert check_update({k: v + 1e3 for k, v in START.items()}, START, max_norm=None) > 1e3


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x01\x00",
        struct.pack("<Q", 10**12) + b"{}",  # header length beyond the file
        struct.pack("<Q", 2) + b"[]",  # header not an object
        struct.pack("<Q", 2) + b"\xff\xfe",  # not UTF-8 JSON
        _header({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 10**12]}}),  # data beyond the file
        _header({"a": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}) + b"\0" * 4,  # unknown dtype
        _header({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 4]}}) + b"\0" * 4,  # shape vs bytes
        _header({"a": "not a dict"}),
        # issue 14: past the checks once
        struct.pack("<Q", 40_004) + b"[" * 20_000 + b"]" * 20_000 + b"\0" * 4,  # nesting: a RecursionError
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [-8, -4]}}) + b"\0" * 8,  # negative offsets
        _header({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}) + b"\0" * 4,  # start after end
        _header({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}) + b"\0" * 4,  # negative dimension
        _raw_header(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"9" * 5000 + b"]}}"),  # long int
        _header({"a": {"dtype": "F32", "shape": [[[[[1]]]]], "data_offsets": [0, 4]}}) + b"\0" * 4,  # deep shape
    ],
)
def test_read_safetensors_refuses_hostile_files_with_a_data_error(tmp_path, payload):
    """An update file comes from an untrusted device: each malformation is a DataError, and no
    size in it is trusted before it is checked against the file (no huge allocation)."""
    path = tmp_path / "update.safetensors"
    path.write_bytes(payload)
    with pytest.raises(DataError):
        read_safetensors(path)
