"""Convergence plots: eval loss against wall time and against bytes moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, object]]], path: Path, reference: float | None = None) -> Path:
    """Write a two-panel PNG: eval loss vs ``wall_seconds`` and vs ``bytes_up + bytes_down``.

    ``runs`` maps a label to its ``metrics.jsonl`` rows; rows without an eval are skipped.
    ``reference`` (e.g. the untuned base model's eval loss) is drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in runs.items():
        points = [r for r in rows if r.get("eval_loss") is not None]
        loss = [float(r["eval_loss"]) for r in points]  # type: ignore[arg-type]
        ax_time.plot([float(r["wall_seconds"]) for r in points], loss, marker="o", ms=3, label=label)  # type: ignore[arg-type]
        ax_bytes.plot(
            [(int(r["bytes_up"]) + int(r["bytes_down"])) / 1e6 for r in points],
            loss,
            marker="o",
            ms=3,
            label=label,  # type: ignore[call-overload]
        )
    ax_time.set(xlabel="wall time (s)", ylabel="eval loss", title="eval loss vs wall time")
    ax_bytes.set(xlabel="bytes up + down (MB)", ylabel="eval loss", title="eval loss vs communication")
    for ax in (ax_time, ax_bytes):
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="base model, untuned")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
