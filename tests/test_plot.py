"""The run plot: one panel per cost the rows carry, and the hand-over drawn beside the curve."""

from __future__ import annotations

import struct
from pathlib import Path

from devft_edge.plot import plot_curves


def _png_size(path: Path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


def _row(r: int, compute: float | None, handed: float | None = None) -> dict[str, object]:
    return {
        "round": r,
        "eval_loss": 3.0 - 0.1 * r,
        "wall_seconds": 10.0 * r,
        "compute": compute,
        "bytes_up": 1000 * r,
        "bytes_down": 2000 * r,
        "full_eval_loss": handed,
    }


def test_compute_panel_and_handover(tmp_path: Path) -> None:
    with_compute = [_row(1, 4.0), _row(2, 8.0, handed=2.9), _row(3, 24.0, handed=2.7)]
    without = [{**r, "compute": None} for r in with_compute]
    three = plot_curves({"devft": with_compute}, tmp_path / "a.png", reference=3.2)
    two = plot_curves({"fedit": without}, tmp_path / "b.png")
    assert _png_size(three)[0] > 1.4 * _png_size(two)[0]  # wall, compute, bytes against wall, bytes
    assert three.stat().st_size > 1000
