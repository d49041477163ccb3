"""The plots every run writes: the loss curves and the attention heatmaps (matplotlib, Agg).

Text falls back, glyph by glyph, from matplotlib's default font to NanumGothic, a font with
Hangul that the ``koreanize-matplotlib`` package ships (the ``examples`` extra installs it; its
font file is registered here, the package itself is never imported, as importing it would set
every plot's font). A token that no available font can draw is labelled by its position
instead, and the title says so.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
import textwrap
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["fallback_fonts", "plot_attention", "plot_losses", "plot_token_weights"]

DPI = 120
# Fonts with Hangul (and some Hanja) glyphs, shipped by pip packages: (module, file inside it).
_FONT_PACKAGES = (("koreanize_matplotlib", "fonts/NanumGothic.ttf"),)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@functools.cache
def fallback_fonts() -> tuple[str, ...]:
    """The files of the installed fonts that text falls back on where matplotlib's default
    font has no glyph (registered with matplotlib on the first call); () when none is
    installed (``pip install koreanize-matplotlib``, or the ``examples`` extra)."""
    from matplotlib import font_manager

    found = []
    for module, name in _FONT_PACKAGES:
        try:
            spec = importlib.util.find_spec(module)  # finds the package without running it
        except (ImportError, ValueError):
            spec = None
        for folder in (spec and spec.submodule_search_locations) or ():
            path = Path(folder) / name
            if path.is_file():
                font_manager.fontManager.addfont(str(path))
                found.append(str(path))
                break
    return tuple(found)


@contextlib.contextmanager
def _fonts() -> Iterator[None]:
    """matplotlib's default font first, then the fallback fonts, glyph by glyph."""
    import matplotlib
    from matplotlib import font_manager

    extra = [font_manager.FontProperties(fname=f).get_name() for f in fallback_fonts()]
    default = font_manager.FontProperties(fname=_default_font()).get_name()
    with matplotlib.rc_context({"font.family": [default, *extra]} if extra else {}):
        yield


def _default_font() -> str:
    from matplotlib import font_manager

    return font_manager.findfont(font_manager.FontProperties())


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # bbox_inches="tight": the saved image grows to hold every title, label and colorbar.
    fig.savefig(path, dpi=DPI, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return path


def _wrap(text: str, inches: float, points: float) -> str:
    """``text`` broken into lines that fit ``inches`` at ``points`` (about 0.55 em a char)."""
    width = max(20, int(inches * 72 / (0.55 * points)))
    return "\n".join(textwrap.fill(line, width) for line in text.split("\n"))


def plot_losses(history: Mapping[str, list], path: Path, *, title: str, ylabel: str) -> Path:
    """Training loss (line) and validation loss (dots) against the step."""
    plt = _pyplot()
    with _fonts():
        fig, ax = plt.subplots(figsize=(6, 3.6), layout="constrained")
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
        ax.set_title(_wrap(title, 5.5, 12))
        ax.grid(alpha=0.3)
        ax.legend()
        return _save(plt, fig, path)


# Heatmap sizes, in inches: a cell per token wide enough for a 7-point label, and a panel
# never smaller than MIN_PANEL (a title, axis labels and a colorbar must fit beside it).
CELL = 0.13
MIN_PANEL = (3.6, 3.0)
MAX_PANEL = 9.0
# Tick labels: 7 points in cells of CELL, larger (up to 9) where fewer tokens leave room.
TICK_POINTS = (7.0, 9.0)


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

    Tick labels are the tokens; a token no available font can draw is shown by its position
    instead, and a note says so. Each panel is sized to its tokens, at least ``MIN_PANEL``
    inches, and its labels to the room a token gets (``TICK_POINTS``); the key (x) labels are
    written horizontally, turned vertical only where neighbours would overlap. The title is
    wrapped to the figure's width.
    """
    plt = _pyplot()
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 2:
        weights = weights[None]
    panels, rows, cols = weights.shape
    with _fonts():
        row_labels, col_labels, note = _drawable_labels(list(row_labels), list(col_labels))
        ncols = min(panels, 2)
        nrows = math.ceil(panels / ncols)
        panel_w = min(max(1.4 + CELL * cols, MIN_PANEL[0]), MAX_PANEL)
        panel_h = min(max(1.2 + CELL * rows, MIN_PANEL[1]), MAX_PANEL)
        # the room of a token, in points: the panel less its margins, over the tokens
        pitch = 72 * min((panel_w - 1.4) / cols, (panel_h - 1.2) / rows)
        ticks = min(max(0.75 * pitch, TICK_POINTS[0]), TICK_POINTS[1])
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(panel_w * ncols, panel_h * nrows),
            squeeze=False,
            layout="constrained",
        )
        for p, ax in enumerate(axes.flat):
            if p >= panels:
                ax.axis("off")
                continue
            im = ax.imshow(weights[p], cmap="viridis", aspect="auto", vmin=0.0)
            ax.set_xticks(range(cols), col_labels, fontsize=ticks)
            ax.set_yticks(range(rows), row_labels, fontsize=ticks)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel(ylabel, fontsize=8)
            if panel_titles is not None:
                ax.set_title(_wrap(panel_titles[p], panel_w - 0.6, 9), fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.05)
        full = title + (f"\n{note}" if note else "")
        fig.suptitle(_wrap(full, panel_w * ncols - 0.3, 10), fontsize=10)
        _turn_crowded_xticks(fig, axes.flat[:panels])
        return _save(plt, fig, path)


def _turn_crowded_xticks(fig: Any, axes: Sequence[Any]) -> None:
    """Turns a panel's key labels vertical where, horizontal, two neighbours would overlap
    (long tokens in narrow cells), after a first layout; short tokens, Hangul above all, read
    best horizontal."""
    fig.canvas.draw()  # lays the figure out, as saving it will
    renderer = fig.canvas.get_renderer()
    for ax in axes:
        boxes = [t.get_window_extent(renderer) for t in ax.get_xticklabels() if t.get_text()]
        gap = 2 * fig.dpi / 72  # two points between neighbours
        if any(a.x1 + gap > b.x0 for a, b in itertools.pairwise(boxes)):
            ax.tick_params(axis="x", labelrotation=90)


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
    with _fonts():
        drawn, _, note = _drawable_labels(flat, [])
        drawable = [d == f for d, f in zip(drawn, flat, strict=True)]
        width = min(max(2.5 + 0.32 * cols, 4.5), 16)
        fig, ax = plt.subplots(figsize=(width, max(1.2 + 0.45 * rows, 2.5)), layout="constrained")
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
        ax.set_title(_wrap(title + (f"\n{note}" if note else ""), width - 1.0, 9), fontsize=9)
        return _save(plt, fig, path)


def _drawable_labels(rows: list[str], cols: list[str]) -> tuple[list[str], list[str], str]:
    """The labels, each one that no available font (the default, then the fallback fonts)
    has every glyph of replaced by ``#position``; and a note when any was."""
    try:
        from matplotlib.ft2font import FT2Font

        charmap: set[int] = set()
        for font in (_default_font(), *fallback_fonts()):
            charmap |= set(FT2Font(font).get_charmap())
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
