"""Integer and boolean arithmetic that stays Python when it can and is traced otherwise.

Block-skipping code (the masks' block classification, the Pallas kernels' loop bounds and
index maps) computes with numbers that are static for most masks (a causal diagonal, a window)
and traced for others (lengths, a per-batch causal offset). Every helper here returns a Python
``int``/``bool`` when all its arguments are static, so loop bounds and skipped blocks are fixed
at trace time, and a ``jnp`` value otherwise.

Divisions only ever see non-negative numerators: truncating division is then floor division,
which is what Triton and Mosaic lower ``lax.div`` to.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "Flag",
    "and_",
    "cdiv",
    "clip",
    "fdiv",
    "imax",
    "imin",
    "in_range",
    "is_static",
    "le",
    "lt",
    "not_",
    "or_",
    "select",
    "where",
]

# A Python bool when static, a traced bool scalar or array when data dependent.
Flag = Any


def is_static(*xs: Any) -> bool:
    """Whether every ``x`` is a static integer (Python or NumPy; bools are not)."""
    return all(isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) for x in xs)


def imin(a: Any, b: Any) -> Any:
    return min(a, b) if is_static(a, b) else jnp.minimum(a, b)


def imax(a: Any, b: Any) -> Any:
    return max(a, b) if is_static(a, b) else jnp.maximum(a, b)


def clip(x: Any, lo: Any, hi: Any) -> Any:
    """``x`` clamped to ``[lo, hi]`` (``hi`` wins when ``lo > hi``)."""
    return imin(imax(x, lo), hi)


def fdiv(a: Any, b: int) -> Any:
    """``a // b`` for ``a >= 0`` and a static ``b > 0``."""
    if is_static(a):
        return a // b
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(b, a.dtype))


def cdiv(a: Any, b: int) -> Any:
    """``ceil(a / b)`` for ``a >= 0`` and a static ``b > 0``."""
    return fdiv(a + (b - 1), b)


def lt(a: Any, b: Any) -> Flag:
    return bool(a < b) if is_static(a, b) else jnp.less(a, b)


def le(a: Any, b: Any) -> Flag:
    return bool(a <= b) if is_static(a, b) else jnp.less_equal(a, b)


def in_range(i: Any, lo: Any, hi: Any) -> Flag:
    """``lo <= i < hi``."""
    return and_(le(lo, i), lt(i, hi))


def and_(a: Flag, b: Flag) -> Flag:
    """``a and b``; static as soon as one side is a static False (or both are static)."""
    return _combine(a, b, False, jnp.logical_and)


def or_(a: Flag, b: Flag) -> Flag:
    """``a or b``; static as soon as one side is a static True (or both are static)."""
    return _combine(a, b, True, jnp.logical_or)


def _combine(a: Flag, b: Flag, absorbing: bool, op) -> Flag:
    """``op(a, b)`` for a boolean ``op`` whose ``absorbing`` element decides it alone (False
    for ``and``, True for ``or``) and whose other element leaves the other side as it is."""
    if a is absorbing or b is absorbing:
        return absorbing
    if isinstance(a, bool):  # the neutral element
        return b
    if isinstance(b, bool):
        return a
    return op(a, b)


def not_(a: Flag) -> Flag:
    return (not a) if isinstance(a, bool) else jnp.logical_not(a)


def where(c: Flag, a: Any, b: Any) -> Any:
    """``a if c else b``, elementwise when ``c`` is traced (``jnp.where``)."""
    return (a if c else b) if isinstance(c, bool) else jnp.where(c, a, b)


def select(c: Flag, a: Any, b: Any) -> Any:
    """:func:`where` for integers inside a Pallas kernel: arithmetic rather than
    ``jnp.where``, because Triton's lowering of a select between two integer literals types
    them as ``i1``."""
    if isinstance(c, bool):
        return a if c else b
    return b + (a - b) * jnp.asarray(c, jnp.int32)
