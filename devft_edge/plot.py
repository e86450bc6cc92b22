"""Convergence plots: eval loss against wall time, device compute and bytes moved."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

AXES: tuple[tuple[str, str], ...] = (
    ("wall_seconds", "wall time (s)"),
    ("compute", "device compute (full-model steps)"),
    ("bytes", "bytes up + down (MB)"),
)
"""The cost axes, one panel each: wall time, device compute (survives a busy machine), bytes."""


def _cost(row: Mapping[str, object], key: str) -> float:
    if key == "bytes":
        return (int(row["bytes_up"]) + int(row["bytes_down"])) / 1e6  # type: ignore[call-overload]
    return float(row[key])  # type: ignore[arg-type]


def plot_curves(runs: Mapping[str, Sequence[Mapping[str, object]]], path: Path, reference: float | None = None) -> Path:
    """Write a PNG of eval loss against each cost in :data:`AXES` that every row carries.

    ``runs`` maps a label to its ``metrics.jsonl`` rows; rows without an eval are skipped. Rows with
    ``full_eval_loss`` (the full model with a stage's transferred LoRA, DevFT) are drawn beside the
    submodel's curve as squares, so what each stage hands over is seen next to what it trained.
    ``reference`` (e.g. the untuned base model's eval loss) is drawn as a dashed line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for rows in runs.values() for r in rows]
    axes = [(k, name) for k, name in AXES if k == "bytes" or all(r.get(k) is not None for r in every)]
    fig, panels = plt.subplots(1, len(axes), figsize=(5.5 * len(axes), 4), squeeze=False)
    for ax, (key, name) in zip(panels[0], axes, strict=True):
        for label, rows in runs.items():
            points = [r for r in rows if r.get("eval_loss") is not None]
            line = ax.plot(
                [_cost(r, key) for r in points],
                [float(r["eval_loss"]) for r in points],  # type: ignore[arg-type]
                marker="o",
                ms=3,
                label=label,
            )[0]
            handed = [r for r in rows if r.get("full_eval_loss") is not None]
            if handed:
                ax.plot(
                    [_cost(r, key) for r in handed],
                    [float(r["full_eval_loss"]) for r in handed],  # type: ignore[arg-type]
                    marker="s",
                    linestyle=":",
                    color=line.get_color(),
                    label=f"{label}: full model after transfer",
                )
        if reference is not None:
            ax.axhline(reference, color="grey", linestyle="--", linewidth=1, label="base model, untuned")
        ax.set(xlabel=name, ylabel="eval loss", title=f"eval loss vs {name.split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
