"""The summary each run ends with: printed, and written as ``OUT_DIR/summary.json``."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["seconds", "write_summary"]


def write_summary(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """Writes ``summary.json`` into ``out_dir`` and prints the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    text = json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default)
    path.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def seconds(t0: float) -> float:
    """Wall seconds since ``t0`` (a ``time.perf_counter()``), rounded for the summary."""
    return round(time.perf_counter() - t0, 2)
