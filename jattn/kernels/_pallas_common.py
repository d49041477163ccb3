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
for the dK/dV pass: :meth:`MaskPlan.kv_blocks`, :meth:`MaskPlan.q_blocks`), so the kernels
loop only over visible blocks and apply the mask only on the blocks at the edges.

Numerics, as in :mod:`jattn.kernels.flash`: base-2 logits (``log2 e`` folded into the scale),
softcap before masking, ``-inf`` for masked entries with a guard for empty rows (zeros,
``lse = -inf``), and the log-sum-exp returned in natural units.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jattn.kernels.common import KernelOutput, weight_shift
from jattn.masks import MaskArrays, MaskPlan
from jattn.masks import MaskScalars as Scalars
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
    "launch",
    "mask_logits",
    "normalize",
    "pad_to",
    "padded_mask",
    "next_pow2",
    "rescale",
    "round_up",
    "scalars",
    "split_refs",
]

# What both Pallas kernels serve; the registry refuses the other features before a kernel runs.
SUPPORTS = frozenset(
    {
        "causal",
        "sinks",  # merged by jattn.api from the returned log-sum-exp
        "local_window",
        "chunked",
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
    # The forward's weights are ``2^(s - m - shift)`` (common.weight_shift: ceil(log2 sp), 0
    # for float16 values); :func:`normalize` adds it back to the log-sum-exp.
    shift: float = 0.0


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
    mask_plan, arrays = padded_mask(plan, tp, sp)
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
        shift=weight_shift(v.dtype, sp),
    )
    qp, kp, vp = kernel.pack(
        st, q.reshape(nb, t, n, h), k.reshape(nb, s, kh, h), v.reshape(nb, s, kh, hv)
    )
    out, lse2 = kernel.attention(st, qp, kp, vp, arrays)
    out = kernel.unpack(out, t, hv).reshape(*batch, t, n, hv)
    lse = (lse2[:, :, :t] * LN2).reshape(*batch, n, t) if plan.return_lse else None
    return KernelOutput(out, lse, None)


def padded_mask(plan: Plan, tp: int, sp: int) -> tuple[MaskPlan, MaskArrays]:
    """:meth:`Plan.mask_plan` for a kernel that runs on lengths padded to ``tp``/``sp``:
    keys past the true count are never visible, padded segment ids never match."""
    mask_plan, arrays = plan.mask_plan()
    s = plan.kv_seq_len
    return dataclasses.replace(mask_plan, kv_bound=s if sp != s else None), arrays.pad(tp, sp)


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
    ok = plan.visible(sc, rows, cols, q_ids, kv_ids)
    return s if ok is None else jnp.where(ok, s, -jnp.inf)


def rescale(m: Array, row_max: Array):
    """One online-softmax step: ``(m_new, m_use, alpha)`` from the running max ``m`` and a
    block's row max; ``m_use`` is 0 for a row with nothing visible yet, ``alpha`` the factor
    of what was summed so far."""
    m_new = jnp.maximum(m, row_max)
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    return m_new, m_use, jnp.exp2(m - m_use)


def normalize(acc: Array, m: Array, l: Array, widen: Callable, valid=None, shift: float = 0.0):
    """The output and base-2 log-sum-exp of a finished online softmax whose weights were
    ``2^(s - m - shift)``. ``widen`` brings a per-row array to ``acc``'s width. A row with
    nothing visible gets zeros and ``-inf``, and so does a row where ``valid`` is False
    (padding past ``q_len``: the backward then gives it nothing)."""
    safe = jnp.where(l > 0.0, l, 1.0)
    out = acc / widen(safe)
    lse2 = jnp.where(l > 0.0, m + (shift + jnp.log2(safe)), -jnp.inf)
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
