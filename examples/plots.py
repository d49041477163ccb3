"""The plots every run writes: the loss curves and the attention heatmaps (matplotlib, Agg).

A token the installed fonts cannot draw (Hangul without a CJK font, say) is labelled by its
position instead, and the title says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_attention", "plot_losses", "plot_token_weights"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_losses(history: Mapping[str, list], path: Path, *, title: str, ylabel: str) -> Path:
    """Training loss (line) and validation loss (dots) against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, losses, label="train", lw=1.2)
    if history["val"]:
        ax.plot(
            [v["step"] for v in history["val"]],
            [v["val_loss"] for v in history["val"]],
            "o-",
            ms=4,
            label="validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(plt, fig, path)


def plot_attention(
    weights: np.ndarray,
    path: Path,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    panel_titles: Sequence[str] | None = None,
    xlabel: str = "key",
    ylabel: str = "query",
) -> Path:
    """Heatmaps of attention weights ``[rows, cols]`` or ``[panels, rows, cols]``.

    Tick labels are the tokens; a token the available fonts cannot draw (Hangul without a
    CJK font installed) is shown by its position instead, and a note says so.
    """
    plt = _pyplot()
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 2:
        weights = weights[None]
    panels, rows, cols = weights.shape
    row_labels, col_labels, note = _drawable_labels(list(row_labels), list(col_labels))
    size = 0.11  # inches per token: room for a 7-point label
    ncols = min(panels, 2)
    width = min(1.8 + size * cols, 8.0) * ncols
    height = min(1.2 + size * rows, 8.0) * math.ceil(panels / ncols)
    fig, axes = plt.subplots(
        math.ceil(panels / ncols), ncols, figsize=(width, height), dpi=100, squeeze=False
    )
    for p, ax in enumerate(axes.flat):
        if p >= panels:
            ax.axis("off")
            continue
        im = ax.imshow(weights[p], cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xticks(range(cols), col_labels, fontsize=7, rotation=90 if cols > 1 else 0)
        ax.set_yticks(range(rows), row_labels, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if panel_titles is not None:
            ax.set_title(panel_titles[p], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9)
    return _save(plt, fig, path)


def plot_token_weights(
    tokens: Sequence[Sequence[str]],
    weights: Sequence[Sequence[float]],
    path: Path,
    *,
    row_labels: Sequence[str],
    title: str,
) -> Path:
    """One row per input: its attention weight on each of its tokens, the token in the cell."""
    plt = _pyplot()
    rows, cols = len(tokens), max(len(t) for t in tokens)
    grid = np.full((rows, cols), np.nan, np.float32)
    for r, w in enumerate(weights):
        grid[r, : len(w)] = w
    flat = [t for row in tokens for t in row]
    drawn, _, note = _drawable_labels(flat, [])
    drawable = [d == f for d, f in zip(drawn, flat, strict=True)]
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.32 * cols, 16), 1.2 + 0.45 * rows), dpi=100)
    im = ax.imshow(grid, cmap="Blues", aspect="auto", vmin=0.0)
    i = 0
    for r, row in enumerate(tokens):
        for c, token in enumerate(row):
            if drawable[i]:
                ax.text(c, r, token, ha="center", va="center", fontsize=8)
            i += 1
    ax.set_yticks(range(rows), row_labels, fontsize=8)
    ax.set_xlabel("token position")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    return _save(plt, fig, path)


def _drawable_labels(rows: list[str], cols: list[str]) -> tuple[list[str], list[str], str]:
    from matplotlib import font_manager

    font = font_manager.findfont(font_manager.FontProperties())
    try:
        from matplotlib.ft2font import FT2Font

        charmap = set(FT2Font(font).get_charmap())
    except Exception:  # an unreadable font: trust it rather than drop every label
        return rows, cols, ""
    replaced = False

    def fix(labels: list[str]) -> list[str]:
        nonlocal replaced
        out = []
        for i, label in enumerate(labels):
            if all(ord(c) in charmap for c in label):
                out.append(label)
            else:
                out.append(f"#{i}")
                replaced = True
        return out

    rows, cols = fix(rows), fix(cols)
    note = "(text the installed fonts cannot draw: left out or shown as #position)"
    if not replaced:
        note = ""
    return rows, cols, note
