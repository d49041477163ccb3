"""What the two Pallas kernels share: the call's driver, its custom_vjp, the mask as a kernel
reads it, block ranges, and the pieces of the flash loop that do not depend on the hardware.

:func:`launch` is the whole call but for the hardware: it fits the config's blocks to the
sequences, pads, lowers the mask, runs the kernel's custom_vjp (:func:`flash_vjp`) and cuts
the padding off the output and the log-sum-exp. A kernel module gives it a :class:`Kernel`:
how a block is fitted (and which sizes its hardware takes), how ``q/k/v`` are laid out for
its tiles and how the output comes back, and its forward and backward passes.

A Pallas kernel cannot call a :mod:`jattn.masks` object on a traced slice of its leaves (a
Triton or Mosaic kernel sees refs, not arrays, and has no ``dynamic_slice`` of a value), so it
reads the mask of a call as a :class:`jattn.masks.MaskPlan`: static bounds (window, causal
offset, the unpadded key count) plus per-batch integer arrays (lengths, a traced causal
offset) and the segment ids. The registry only sends the Pallas kernels masks of that form
(:data:`SUPPORTS`: no ``dense_mask``, no ``mask_algebra``).

The same plan gives, for one block of queries, the range of key blocks any of its rows can see
and the sub-range of key blocks where no entry is masked (and the same for one block of keys,
for the dK/dV pass), so the kernels loop only over visible blocks and apply the mask only on
the blocks at the edges.

Numerics, as in :mod:`jattn.kernels.flash`: base-2 logits (``log2 e`` folded into the scale),
softcap before masking, ``-inf`` for masked entries with a guard for empty rows (zeros,
``lse = -inf``), and the log-sum-exp returned in natural units.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _intmath as im
from jattn.kernels.common import KernelOutput
from jattn.masks import MaskArrays, MaskPlan
from jattn.plan import Plan

__all__ = [
    "BLOCKS",
    "Kernel",
    "LN2",
    "LOG2E",
    "MaskArrays",
    "MaskPlan",
    "SUPPORTS",
    "Scalars",
    "Static",
    "base2_logits",
    "dlogits",
    "flash_vjp",
    "ids_overlap",
    "kv_blocks",
    "launch",
    "mask_logits",
    "normalize",
    "pad_to",
    "plan_mask",
    "next_pow2",
    "q_blocks",
    "rescale",
    "round_up",
    "scalars",
    "split_refs",
    "visible",
]

# What both Pallas kernels serve; the registry refuses the other features before a kernel runs.
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

# The block sizes of both configs: the forward tile, the dK/dV pass's, the dQ pass's.
BLOCKS = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")

Array = jax.Array

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# The call: fit, pad, lower the mask, run, unpad.


@dataclasses.dataclass(frozen=True)
class Static:
    """The hashable part of a call, fixed at trace time."""

    scale: float
    softcap: float | None
    plan: MaskPlan
    groups: int  # query heads per K/V head
    tp: int  # padded query length (a multiple of every query block)
    sp: int  # padded key length (a multiple of every key block)
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    config: Any  # the kernel's tuning dataclass, for its launch parameters
    interpret: bool


@dataclasses.dataclass(frozen=True)
class Kernel:
    """What a Pallas kernel module gives :func:`launch`.

    Attributes:
      fit: ``(config, field, length, interpret) -> block``: the block of ``config.<field>``
        (one of :data:`BLOCKS`) for a sequence of ``length``, or ValueError when the hardware
        cannot take it.
      pack: ``(st, q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv]) -> (q, k, v)`` in the
        kernel's layout, padded to ``st.tp``/``st.sp``.
      unpack: ``(out, t, hv) -> out [B, t, N, hv]``, from the kernel's layout and padding.
      attention: the :func:`flash_vjp` of the kernel: ``(st, q, k, v, arrays) -> (out, lse2)``
        with ``lse2 [B, N, Tp]`` in base 2.
    """

    fit: Callable[[Any, str, int, bool], int]
    pack: Callable[..., tuple[Array, Array, Array]]
    unpack: Callable[[Array, int, int], Array]
    attention: Callable[..., tuple[Array, Array]]


def launch(q: Array, k: Array, v: Array, plan: Plan, kernel: Kernel, *, interpret: bool):
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]`` when the plan asks
    for it), with ``plan.config`` tiling ``kernel``; emulated when ``interpret``."""
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    nb = math.prod(batch)
    cfg = plan.config
    b = {f: kernel.fit(cfg, f, t if f.startswith("block_q") else s, interpret) for f in BLOCKS}
    tp = round_up(t, math.lcm(b["block_q"], b["block_q_dkv"], b["block_q_dq"]))
    sp = round_up(s, math.lcm(b["block_k"], b["block_k_dkv"], b["block_k_dq"]))
    mask_plan, arrays = plan_mask(plan, tp, sp)
    st = Static(
        scale=plan.scale,
        softcap=plan.softcap,
        plan=mask_plan,
        groups=n // kh,
        tp=tp,
        sp=sp,
        bq=b["block_q"],
        bk=b["block_k"],
        bq_dkv=b["block_q_dkv"],
        bk_dkv=b["block_k_dkv"],
        bq_dq=b["block_q_dq"],
        bk_dq=b["block_k_dq"],
        config=cfg,
        interpret=interpret,
    )
    qp, kp, vp = kernel.pack(
        st, q.reshape(nb, t, n, h), k.reshape(nb, s, kh, h), v.reshape(nb, s, kh, hv)
    )
    out, lse2 = kernel.attention(st, qp, kp, vp, arrays)
    out = kernel.unpack(out, t, hv).reshape(*batch, t, n, hv)
    lse = (lse2[:, :, :t] * LN2).reshape(*batch, n, t) if plan.return_lse else None
    return KernelOutput(out, lse, None)


def plan_mask(plan: Plan, tp: int, sp: int) -> tuple[MaskPlan, MaskArrays]:
    """:meth:`Plan.mask_plan` for a kernel that runs on lengths padded to ``tp``/``sp``:
    keys past the true count are never visible, padded segment ids never match."""
    mask_plan, arrays = plan.mask_plan()
    if arrays.q_seg is not None:
        # Distinct negative ids: padded queries and keys never match anything.
        q_seg, kv_seg = arrays.q_seg, arrays.kv_seg
        arrays = arrays._replace(
            q_seg=jnp.pad(q_seg, ((0, 0), (0, tp - q_seg.shape[1])), constant_values=-1),
            kv_seg=jnp.pad(kv_seg, ((0, 0), (0, sp - kv_seg.shape[1])), constant_values=-2),
        )
    s = plan.kv_seq_len
    return dataclasses.replace(mask_plan, kv_bound=s if sp != s else None), arrays


def flash_vjp(forward: Callable, backward: Callable, rows: str) -> Callable:
    """The custom_vjp ``(st, q, k, v, arrays) -> (out, lse2 [B, N, Tp])`` of a kernel pair.

    ``forward(st, q, k, v, arrays) -> (out, lse2)`` may return ``lse2`` in any shape that
    flattens to ``[B, N, Tp]``; ``backward(st, q, k, v, arrays, g_out, lse, delta) ->
    (dq, dk, dv)`` gets ``lse`` and ``delta`` in that shape. ``rows`` is the einsum that sums
    the rows of two outputs into ``[B, N, Tp]`` (e.g. ``"btnd,btnd->bnt"``).
    """

    def flat(lse2: Array) -> Array:
        return lse2.reshape(lse2.shape[0], lse2.shape[1], -1)

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def attention(st: Static, q, k, v, arrays: MaskArrays):
        out, lse2 = forward(st, q, k, v, arrays)
        return out, flat(lse2)

    def attention_fwd(st, q, k, v, arrays):
        out, lse2 = forward(st, q, k, v, arrays)
        return (out, flat(lse2)), (q, k, v, arrays, out, lse2)

    def attention_bwd(st, res, cts):
        q, k, v, arrays, out, lse2 = res
        g_out, g_lse2 = cts
        # dL/dlogits = p * (dp - delta), delta = rowsum(dO * O) minus the lse cotangent: one
        # cheap fused XLA reduction, not worth a kernel.
        delta = jnp.einsum(rows, g_out.astype(jnp.float32), out.astype(jnp.float32))
        if not (g_lse2 is None or isinstance(g_lse2, jax.custom_derivatives.SymbolicZero)):
            # The caller's lse is lse2 * ln2, so this cotangent is ln2 times the natural one,
            # and d lse / d logit = p holds in natural units: the logits need the natural one.
            delta = delta - g_lse2.astype(jnp.float32) / LN2
        # Rows with no visible key (lse = -inf) get p = 0 everywhere.
        lse = jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)
        dq, dk, dv = backward(st, q, k, v, arrays, g_out, lse, delta.reshape(lse2.shape))
        return dq, dk, dv, None

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


# ---------------------------------------------------------------------------------------------
# Inside a kernel.


class Scalars(NamedTuple):
    """One batch element's scalars inside a kernel (traced int32 scalars, or None)."""

    q_len: Any = None
    kv_len: Any = None
    offset: Any = None


def scalars(plan: MaskPlan, values) -> Scalars:
    """The plan's per-batch scalars (read from their refs, in ``plan.scalar_names`` order)."""
    return Scalars(**dict(zip(plan.scalar_names, values, strict=True)))


def split_refs(plan: MaskPlan, refs, *, scalars_first: bool):
    """A kernel's refs -> ``((q, k, v), scalar refs, (q_seg, kv_seg) or Nones, the rest)``.

    The inputs are ``q, k, v``, the plan's scalars, the segment ids when present, then the
    rest; or the scalars first (scalar prefetch puts them before every other operand)."""
    ns = len(plan.scalar_names)
    if scalars_first:
        sc_refs, qkv, rest = refs[:ns], refs[ns : ns + 3], refs[ns + 3 :]
    else:
        qkv, sc_refs, rest = refs[:3], refs[3 : 3 + ns], refs[3 + ns :]
    seg = (None, None)
    if plan.segments:
        seg, rest = rest[:2], rest[2:]
    return qkv, sc_refs, seg, rest


def base2_logits(st: Static, qk: Array):
    """``q·k`` products -> scaled (and softcapped) base-2 logits, and with softcap the tanh
    its derivative needs (else None)."""
    s = qk * (st.scale * LOG2E)
    th = None
    if st.softcap is not None:
        c2 = st.softcap * LOG2E
        th = jnp.tanh(s * (1.0 / c2))
        s = c2 * th
    return s, th


def mask_logits(
    plan: MaskPlan, sc: Scalars, s: Array, rows: Array, cols: Array, q_ids=None, kv_ids=None
) -> Array:
    """``s`` with ``-inf`` where the query positions ``rows`` may not see the key positions
    ``cols`` (both broadcastable to ``s``, as are the segment ids)."""
    ok = visible(plan, sc, rows, cols, q_ids, kv_ids)
    return s if ok is None else jnp.where(ok, s, -jnp.inf)


def rescale(m: Array, row_max: Array):
    """One online-softmax step: ``(m_new, m_use, alpha)`` from the running max ``m`` and a
    block's row max; ``m_use`` is 0 for a row with nothing visible yet, ``alpha`` the factor
    of what was summed so far."""
    m_new = jnp.maximum(m, row_max)
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, m_use, jnp.exp2(m - m_use)


def normalize(acc: Array, m: Array, l: Array, widen: Callable, valid=None):
    """The output and base-2 log-sum-exp of a finished online softmax. ``widen`` brings a
    per-row array to ``acc``'s width. A row with nothing visible gets zeros and ``-inf``, and
    so does a row where ``valid`` is False (padding past ``q_len``: the backward then gives it
    nothing)."""
    safe = jnp.where(l > 0.0, l, 1.0)
    out = acc / widen(safe)
    lse2 = jnp.where(l > 0.0, m + jnp.log2(safe), -jnp.inf)
    if valid is not None:
        out = jnp.where(widen(valid), out, 0.0)
        lse2 = jnp.where(valid, lse2, -jnp.inf)
    return out, lse2


def dlogits(st: Static, p: Array, dp: Array, th: Array | None) -> Array:
    """The gradient of the scaled ``q·k`` products from ``p * dp`` (``dp`` less ``delta``),
    through the softcap when there is one."""
    ds = p * dp
    if th is not None:
        ds = ds * (1.0 - th * th)
    return ds * st.scale


def ids_overlap(q_ids: Array, kv_ids: Array) -> Array:
    """Whether the id ranges of a block of queries and one of keys meet (else no entry of the
    block is visible)."""
    return (q_ids.min() <= kv_ids.max()) & (kv_ids.min() <= q_ids.max())


# ---------------------------------------------------------------------------------------------
# Block ranges.


def _kv_end(plan: MaskPlan, sc: Scalars, sp: int) -> Any:
    """One past the last key any row may see, from the key-side bounds."""
    end: Any = sp if plan.kv_bound is None else plan.kv_bound
    if plan.kv_len:
        end = im.imin(end, im.imax(sc.kv_len, 0))
    return end


def _right(plan: MaskPlan, sc: Scalars) -> Any:
    """The tightest ``j <= i + right`` bound, or None."""
    if plan.offset:
        return sc.offset if plan.right is None else im.imin(sc.offset, plan.right)
    return plan.right


def kv_blocks(plan: MaskPlan, sc: Scalars, q0: Any, bq: int, bk: int, sp: int):
    """Key blocks for the query rows ``[q0, q0 + bq)``: ``(lo, full_lo, full_hi, hi)``.

    Blocks ``[lo, hi)`` hold every visible key; of those, ``[full_lo, full_hi)`` have no masked
    entry (rows past ``q_len`` aside: their results are zeroed afterwards, and their ``lse`` of
    ``-inf`` zeroes their gradients). ``lo <= full_lo <= full_hi <= hi <= sp // bk``.
    """
    nk = sp // bk
    right = _right(plan, sc)
    end = _kv_end(plan, sc, sp)
    lo: Any = 0 if plan.left is None else im.imax(0, q0 - plan.left)
    hi: Any = end if right is None else im.imin(end, im.imax(0, q0 + bq + right))
    if plan.q_len:
        hi = im.select(q0 < sc.q_len, hi, 0)
    lo_b = im.imin(im.fdiv(lo, bk), nk)
    hi_b = im.imax(lo_b, im.cdiv(hi, bk))
    if plan.segments:  # ids are only known block by block: every block is masked
        return lo_b, lo_b, lo_b, hi_b
    f_lo: Any = lo_b if plan.left is None else im.cdiv(im.imax(0, q0 + bq - 1 - plan.left), bk)
    f_hi: Any = nk if right is None else im.fdiv(im.imax(0, q0 + right + 1), bk)
    if plan.kv_bound is not None or plan.kv_len:
        f_hi = im.imin(f_hi, im.fdiv(end, bk))
    f_lo = im.clip(f_lo, lo_b, hi_b)
    f_hi = im.clip(f_hi, f_lo, hi_b)
    return lo_b, f_lo, f_hi, hi_b


def q_blocks(plan: MaskPlan, sc: Scalars, k0: Any, bk: int, bq: int, tp: int, sp: int):
    """Query blocks whose rows see keys ``[k0, k0 + bk)``: ``(lo, full_lo, full_hi, hi)``,
    as in :func:`kv_blocks` with the roles of rows and columns swapped."""
    nq = tp // bq
    right = _right(plan, sc)
    lo: Any = 0 if right is None else im.imax(0, k0 - right)
    hi: Any = tp
    if plan.q_len:
        hi = im.imin(hi, im.imax(sc.q_len, 0))
    if plan.left is not None:
        hi = im.imin(hi, k0 + bk + plan.left)
    bounded = plan.kv_bound is not None or plan.kv_len
    end = _kv_end(plan, sc, sp)
    if bounded:
        hi = im.select(k0 < end, hi, 0)
    lo_b = im.imin(im.fdiv(lo, bq), nq)
    hi_b = im.imax(lo_b, im.cdiv(hi, bq))
    if plan.segments:
        return lo_b, lo_b, lo_b, hi_b
    f_lo: Any = lo_b if right is None else im.cdiv(im.imax(0, k0 + bk - 1 - right), bq)
    f_hi: Any = hi_b if plan.left is None else im.fdiv(k0 + plan.left + 1, bq)
    if bounded:  # a key block that straddles the end is masked for every row
        f_hi = im.select(k0 + bk <= end, f_hi, 0)
    f_lo = im.clip(f_lo, lo_b, hi_b)
    f_hi = im.clip(f_hi, f_lo, hi_b)
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


# ---------------------------------------------------------------------------------------------
# Sizes.


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
