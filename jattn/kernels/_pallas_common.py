"""What the Pallas kernels share: the mask in a form a kernel can read, and block ranges.

A Pallas kernel cannot call a :mod:`jattn.masks` object on a traced slice of its leaves (a
Triton or Mosaic kernel sees refs, not arrays, and has no ``dynamic_slice`` of a value), so the
mask of a call is first reduced to a :class:`MaskPlan`: static bounds (window, causal offset,
the unpadded key count) plus per-batch integer arrays (lengths, a traced causal offset) and the
segment ids. Every supported mask is an intersection (``&``) of those parts; unions and
complements (``mask_algebra``) and dense masks are left to other implementations.

The same plan gives, for one block of queries, the range of key blocks any of its rows can see
and the sub-range of key blocks where no entry is masked (and the same for one block of keys,
for the dK/dV pass), so the kernels loop only over visible blocks and apply the mask only on
the blocks at the edges.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jattn import masks as masks_lib
from jattn.masks import MaskArrays, MaskPlan

# What both Pallas kernels serve (the rest raises NotImplementedError naming the feature).
SUPPORTS = frozenset(
    {
        "causal",
        "local_window",
        "lengths",
        "segments",
        "softcap",
        "return_lse",
        "gqa",
        "value_head_dim",
    }
)

Array = jax.Array

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class Scalars(NamedTuple):
    """One batch element's scalars inside a kernel (traced int32 scalars, or None)."""

    q_len: Any = None
    kv_len: Any = None
    offset: Any = None


def plan_mask(
    mask: masks_lib.Mask | None, batch_shape: tuple[int, ...], tp: int, sp: int, s: int
) -> tuple[MaskPlan, MaskArrays]:
    """:func:`jattn.masks.plan_mask` for a kernel that runs on lengths padded to ``tp``/``sp``
    (``s`` is the true key count: keys past it are never visible)."""
    plan, arrays = masks_lib.plan_mask(mask, batch_shape)
    if arrays.q_seg is not None:
        # Distinct negative ids: padded queries and keys never match anything.
        q_seg, kv_seg = arrays.q_seg, arrays.kv_seg
        arrays = arrays._replace(
            q_seg=jnp.pad(q_seg, ((0, 0), (0, tp - q_seg.shape[1])), constant_values=-1),
            kv_seg=jnp.pad(kv_seg, ((0, 0), (0, sp - kv_seg.shape[1])), constant_values=-2),
        )
    return dataclasses.replace(plan, kv_bound=s if sp != s else None), arrays


# ---------------------------------------------------------------------------------------------
# Integer arithmetic that stays Python when it can (static loop bounds) and is int32 otherwise.
# Divisions only ever see non-negative numerators: truncating division is then floor division,
# which is what Triton and Mosaic lower `lax.div` to.


def _static(*xs: Any) -> bool:
    return all(isinstance(x, int) for x in xs)


def imax(a: Any, b: Any) -> Any:
    return max(a, b) if _static(a, b) else jnp.maximum(a, b)


def imin(a: Any, b: Any) -> Any:
    return min(a, b) if _static(a, b) else jnp.minimum(a, b)


def fdiv(a: Any, b: int) -> Any:
    """``a // b`` for ``a >= 0``."""
    if _static(a):
        return a // b
    a = jnp.asarray(a)
    return lax.div(a, jnp.asarray(b, a.dtype))


def cdiv(a: Any, b: int) -> Any:
    """``ceil(a / b)`` for ``a >= 0``."""
    return fdiv(a + (b - 1), b)


def clip(x: Any, lo: Any, hi: Any) -> Any:
    return imin(imax(x, lo), hi)


def _kv_end(plan: MaskPlan, sc: Scalars, sp: int) -> Any:
    """One past the last key any row may see, from the key-side bounds."""
    end: Any = sp if plan.kv_bound is None else plan.kv_bound
    if plan.kv_len:
        end = imin(end, imax(sc.kv_len, 0))
    return end


def _right(plan: MaskPlan, sc: Scalars) -> Any:
    """The tightest ``j <= i + right`` bound, or None."""
    if plan.offset:
        return sc.offset if plan.right is None else imin(sc.offset, plan.right)
    return plan.right


def _select(c: Any, a: Any, b: Any) -> Any:
    if isinstance(c, bool):
        return a if c else b
    # Arithmetic rather than jnp.where: Triton's lowering of a select between two integer
    # literals types them as i1.
    return b + (a - b) * jnp.asarray(c, jnp.int32)


def kv_blocks(plan: MaskPlan, sc: Scalars, q0: Any, bq: int, bk: int, sp: int):
    """Key blocks for the query rows ``[q0, q0 + bq)``: ``(lo, full_lo, full_hi, hi)``.

    Blocks ``[lo, hi)`` hold every visible key; of those, ``[full_lo, full_hi)`` have no masked
    entry (rows past ``q_len`` aside: their results are zeroed afterwards, and their ``lse`` of
    ``-inf`` zeroes their gradients). ``lo <= full_lo <= full_hi <= hi <= sp // bk``.
    """
    nk = sp // bk
    right = _right(plan, sc)
    end = _kv_end(plan, sc, sp)
    lo: Any = 0 if plan.left is None else imax(0, q0 - plan.left)
    hi: Any = end if right is None else imin(end, imax(0, q0 + bq + right))
    if plan.q_len:
        hi = _select(q0 < sc.q_len, hi, 0)
    lo_b = imin(fdiv(lo, bk), nk)
    hi_b = imax(lo_b, cdiv(hi, bk))
    if plan.segments:  # ids are only known block by block: every block is masked
        return lo_b, lo_b, lo_b, hi_b
    f_lo: Any = lo_b if plan.left is None else cdiv(imax(0, q0 + bq - 1 - plan.left), bk)
    f_hi: Any = nk if right is None else fdiv(imax(0, q0 + right + 1), bk)
    if plan.kv_bound is not None or plan.kv_len:
        f_hi = imin(f_hi, fdiv(end, bk))
    f_lo = clip(f_lo, lo_b, hi_b)
    f_hi = clip(f_hi, f_lo, hi_b)
    return lo_b, f_lo, f_hi, hi_b


def q_blocks(plan: MaskPlan, sc: Scalars, k0: Any, bk: int, bq: int, tp: int, sp: int):
    """Query blocks whose rows see keys ``[k0, k0 + bk)``: ``(lo, full_lo, full_hi, hi)``,
    as in :func:`kv_blocks` with the roles of rows and columns swapped."""
    nq = tp // bq
    right = _right(plan, sc)
    lo: Any = 0 if right is None else imax(0, k0 - right)
    hi: Any = tp
    if plan.q_len:
        hi = imin(hi, imax(sc.q_len, 0))
    if plan.left is not None:
        hi = imin(hi, k0 + bk + plan.left)
    bounded = plan.kv_bound is not None or plan.kv_len
    end = _kv_end(plan, sc, sp)
    if bounded:
        hi = _select(k0 < end, hi, 0)
    lo_b = imin(fdiv(lo, bq), nq)
    hi_b = imax(lo_b, cdiv(hi, bq))
    if plan.segments:
        return lo_b, lo_b, lo_b, hi_b
    f_lo: Any = lo_b if right is None else cdiv(imax(0, k0 + bk - 1 - right), bq)
    f_hi: Any = hi_b if plan.left is None else fdiv(k0 + plan.left + 1, bq)
    if bounded:  # a key block that straddles the end is masked for every row
        f_hi = _select(k0 + bk <= end, f_hi, 0)
    f_lo = clip(f_lo, lo_b, hi_b)
    f_hi = clip(f_hi, f_lo, hi_b)
    return lo_b, f_lo, f_hi, hi_b


def visible(
    plan: MaskPlan, sc: Scalars, rows: Array, cols: Array, q_ids=None, kv_ids=None
) -> Array | None:
    """The visibility of query positions ``rows`` and key positions ``cols`` (broadcastable
    int32 arrays; the result has their broadcast shape), or None when nothing is masked.

    ``q_len`` is left out: rows past it are zeroed after the loop instead.
    """
    ok = None

    def add(c):
        nonlocal ok
        ok = c if ok is None else jnp.logical_and(ok, c)

    if plan.left is not None:
        add(cols >= rows - plan.left)
    if plan.right is not None:
        add(cols <= rows + plan.right)
    if plan.offset:
        add(cols <= rows + sc.offset)
    if plan.kv_bound is not None:
        add(cols < plan.kv_bound)
    if plan.kv_len:
        add(cols < sc.kv_len)
    if plan.segments:
        add(q_ids == kv_ids)
    return ok


def pad_to(x: Array, axis: int, size: int) -> Array:
    """Zero-pads ``x`` along ``axis`` to ``size`` (no copy when it already has that size)."""
    if x.shape[axis] == size:
        return x
    pads = [(0, 0)] * x.ndim
    pads[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pads)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
