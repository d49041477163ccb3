"""What every implementation's tuning dataclass shares: fields that carry their constraints.

A config is a frozen dataclass deriving from :class:`Tuning`; each of its integer knobs is
declared with :func:`knob`, which records the constraints in the field's metadata
(``{"min": 1, "pow2": True, "why": "Triton tiles"}``), and :func:`validate` (run on
construction) checks every field against them, naming the class, the field and the value.
A knob whose default is None may be None ("use the compiler's default", "same as the forward").

Each config also has a ``default_for(plan, backend)`` classmethod, next to its fields: the
heuristic default that :func:`jattn.kernels.select` uses when the caller passes none.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["Tuning", "knob", "validate"]


def knob(default: int | None, *, minimum: int = 1, pow2: bool = False, why: str = "") -> Any:
    """A dataclass field for an int ``>= minimum`` (a power of two when ``pow2``; ``why`` says
    who needs that), or None when ``default`` is None."""
    return dataclasses.field(default=default, metadata={"min": minimum, "pow2": pow2, "why": why})


def validate(config: Any) -> None:
    """Raises ValueError for the first field of ``config`` that breaks its :func:`knob`
    constraints; fields declared otherwise are not checked."""
    cls = type(config).__name__
    for f in dataclasses.fields(config):
        if "min" not in f.metadata:
            continue
        v = getattr(config, f.name)
        if v is None and f.default is None:
            continue
        lo = f.metadata["min"]
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            want = "a positive int" if lo == 1 else f"an int >= {lo}"
            raise ValueError(f"{cls}.{f.name} must be {want}, got {v!r}")
        if f.metadata.get("pow2") and v & (v - 1):
            why = f" ({f.metadata['why']})" if f.metadata.get("why") else ""
            raise ValueError(f"{cls}.{f.name} must be a power of two{why}, got {v}")


class Tuning:
    """Base of the tuning dataclasses: validates the fields on construction."""

    def __post_init__(self) -> None:
        validate(self)
