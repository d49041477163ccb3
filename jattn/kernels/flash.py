"""Blockwise (flash) attention: online softmax over key blocks, O(T + S) memory, own backward.

The forward pass walks the query blocks; for each it loops over the key/value blocks its mask
can see (``Mask.kv_range``), keeping a running row max ``m``, row sum ``l`` and output
accumulator in float32. Per block the mask is classified (``Mask.classify``): empty blocks are
skipped, full blocks run without masking, and only mixed blocks evaluate the mask, from indices
or from the block of a dense mask, never from a ``[T, S]`` array. The backward pass
(``jax.custom_vjp``) saves only the output and the log-sum-exp and recomputes each block's
scores, so training needs O(T + S) memory per head as well.

Logits live in base-2 units (``log2(e)`` is folded into the scale, ``exp2`` replaces ``exp``),
and the row sum comes out of the ``p @ v`` product through a column of ones appended to ``v``:
on a CPU both save a pass over every block. With a bias they stay in natural units (a finite
bias, however large, must stay finite; ``bias * log2(e)`` overflows from 2.4e38 on) and are
converted after the max is subtracted. The weights are ``2^(x - m - shift)``, ``shift =
ceil(log2 S)`` (``weight_shift``): no sum of them exceeds 1, so the unnormalised accumulator
stays within the values' range (0 for float16 values, whose weights would otherwise be
rounded among float16's subnormals). The saved log-sum-exp comes with what rounding it left
out (``lo``); the backward scales the cotangents by ``2^-lo``, so rows whose lse rounds away
the log of their sum (logits near 1e38) still get weights that sum to 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from jattn import _dropout
from jattn.kernels._tuning import Tuning, knob
from jattn.kernels.common import KernelOutput, weight_shift
from jattn.masks import Lengths, Mask, block_kind
from jattn.plan import Plan

Array = jax.Array

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class FlashConfig(Tuning):
    """Block sizes of the flash kernel.

    ``block_q`` rows of queries are processed against ``block_k`` keys at a time. Larger blocks
    make better matrix products; smaller ones keep the ``[block_q, block_k]`` score block in
    cache and skip more of a causal mask. Sequences shorter than a block use one block.
    """

    block_q: int = knob(512)
    block_k: int = knob(256)

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> FlashConfig:
        """The heuristic default, from sweeps on a 2-core Zen 4 CPU (see docs/kernels.md).

        Without a causal or window mask, 256 x 512 blocks were best from T = 512 to 4k: long
        enough key blocks for large products, and a score block of 8 heads that stays in cache.
        With one, taller query blocks (512 rows) did better at T >= 2k, and shorter sequences
        keep at least four query blocks (down to 128 rows) so that about half of the blocks can
        be skipped. Off a CPU (where other kernels come first), 128 x 128.
        """
        if backend != "cpu":
            return cls(128, 128)
        if not plan.features & {"causal", "local_window"}:
            return cls(256, 512)
        block_q = 512
        while block_q > 128 and 4 * block_q > plan.q_seq_len:
            block_q //= 2
        return cls(block_q, 256)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The hashable part of a call, fixed at trace time."""

    scale: float
    softcap: float | None
    dropout_rate: float
    bq: int
    bk: int
    q_len: int
    kv_len: int
    natural: bool  # logits in natural units (a bias is given), else base 2
    shift: float  # ceil(log2 S): the weights' exponent offset

    @property
    def unit(self) -> float:
        """What a logit or a max times gives base 2."""
        return LOG2E if self.natural else 1.0

    @property
    def to_logits(self) -> float:
        """What a natural-unit quantity (the scale, the softcap) times gives the logits' units."""
        return 1.0 if self.natural else LOG2E


def flash_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention of one head. ``q [T, D]``, ``k [S, D]``, ``v [S, Dv]`` -> ``out [T, Dv]``."""
    return _attention(_flash, q, k, v, plan)


def flash_attention_jvp(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """:func:`flash_attention` with a forward mode instead of a backward: its JVP is one more
    blockwise pass (``_tangent``), O(T + S) memory like the forward. ``jattn.attention`` takes
    the tangents of every kernel's forward mode from it."""
    return _attention(_flash_forward_mode, q, k, v, plan)


def _attention(core, q: Array, k: Array, v: Array, plan: Plan) -> KernelOutput:
    cfg = plan.config or FlashConfig()
    t, s = q.shape[0], k.shape[0]
    bq, bk = min(cfg.block_q, t), min(cfg.block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    natural = plan.bias is not None
    shift = weight_shift(v.dtype, sp)
    st = _Static(plan.scale, plan.softcap, plan.dropout_rate, bq, bk, t, s, natural, shift)

    qp = jnp.pad(q, ((0, tp - t), (0, 0)))
    kp = jnp.pad(k, ((0, sp - s), (0, 0)))
    vp = jnp.pad(v, ((0, sp - s), (0, 0)))
    mask = None if plan.mask is None else plan.mask.pad(tp, sp)
    if sp != s:  # padded keys are never visible; a static bound, so whole blocks still skip
        mask = Lengths(kv=s) if mask is None else mask & Lengths(kv=s)
    bias = plan.bias
    if bias is not None:
        pads = [(0, 0 if d == 1 else n - d) for d, n in zip(bias.shape, (tp, sp), strict=True)]
        bias = jnp.pad(bias, pads)
    out, lse_u = core(st, qp, kp, vp, bias, mask, plan.dropout_seed)
    lse = (lse_u[:t] if natural else lse_u[:t] * LN2) if plan.return_lse else None
    return KernelOutput(out[:t], lse, None)


# ---------------------------------------------------------------------------------------------
# Block computations shared by forward and backward.


def _logits(st: _Static, qi: Array, kj: Array, bias: Array | None, q0, k0):
    """Logits of a block (base 2, or natural with a bias) and, with softcap, the tanh needed by
    its derivative."""
    acc = jnp.promote_types(qi.dtype, jnp.float32)
    s = jnp.einsum("td,sd->ts", qi, kj, preferred_element_type=acc)
    if qi.dtype not in (jnp.float32, jnp.float64):
        s = s * (st.scale * st.to_logits)  # low-precision q: not pre-scaled
    th = None
    if st.softcap is not None:
        c2 = st.softcap * st.to_logits
        th = jnp.tanh(s / c2)
        s = c2 * th
    if bias is not None:
        s = s + _bias_block(bias, q0, k0, st.bq, st.bk).astype(s.dtype)  # natural units
    return s, th


def _bias_block(bias: Array, q0, k0, bq: int, bk: int) -> Array:
    rows = (0, 1) if bias.shape[0] == 1 else (q0, bq)
    cols = (0, 1) if bias.shape[1] == 1 else (k0, bk)
    return jax.lax.dynamic_slice(bias, _i32(rows[0], cols[0]), (rows[1], cols[1]))


def _i32(*xs):
    """Indices as int32 (under ``jax_enable_x64`` Python ints would become int64)."""
    return tuple(jnp.asarray(x, jnp.int32) for x in xs)


def _prescaled(st: _Static, q: Array) -> Array:
    if q.dtype in (jnp.float32, jnp.float64):
        return q * jnp.asarray(st.scale * st.to_logits, q.dtype)
    return q


def _dispatch(flags, skip, full, mixed, carry):
    """Runs ``skip``, ``full`` or ``mixed`` on ``carry`` by the block's classification,
    statically when the flags are Python bools."""
    any_, all_ = flags
    if any_ is False:
        return skip(carry)
    if all_ is True:  # a block with every entry visible is not empty either
        return full(carry)
    if any_ is True and all_ is False:
        return mixed(carry)
    index = jnp.where(jnp.asarray(any_), jnp.where(jnp.asarray(all_), 1, 2), 0)
    return jax.lax.switch(index, (skip, full, mixed), carry)


def _block_range(st: _Static, mask: Mask | None, q0, tp: int, sp: int):
    if mask is None:
        return 0, sp // st.bk
    lo, hi = mask.kv_range(q0, q0 + st.bq, sp)
    if isinstance(lo, int) and isinstance(hi, int):
        lo_b, hi_b = lo // st.bk, -(-hi // st.bk)
        return lo_b, max(lo_b, hi_b)
    lo_b = jnp.asarray(lo) // st.bk
    hi_b = -(-jnp.asarray(hi) // st.bk)
    return lo_b, jnp.maximum(lo_b, hi_b)


def _hide_past(st: _Static, mask: Mask, q0, k0, sp: int, *blocks):
    """Key blocks at ``k0`` with the keys past the range rows ``[q0, q0 + bq)`` can see
    (``Mask.kv_range``: a sequence's length) zeroed. A KV cache may hold NaN or inf there, and
    a zero weight times NaN is NaN. One compare and select per row of the block."""
    _, hi = mask.kv_range(q0, q0 + st.bq, sp)
    seen = (k0 + jnp.arange(st.bk) < hi)[:, None]
    return tuple(jnp.where(seen, x, 0) for x in blocks)


def _keep(st: _Static, seed, q0, k0):
    return _dropout.keep_mask(seed, q0 + jnp.arange(st.bq), k0 + jnp.arange(st.bk), st.dropout_rate)


# ---------------------------------------------------------------------------------------------
# Forward.


def _forward(st: _Static, q, k, v, bias, mask, seed):
    tp, sp, dv = q.shape[0], k.shape[0], v.shape[1]
    nq = tp // st.bq
    dropout = st.dropout_rate > 0.0
    qs = _prescaled(st, q)
    # The row sum rides along in the p @ v product as an extra column (not with dropout, where
    # the sum must be of the weights before dropping).
    ve = v if dropout else jnp.concatenate([v, jnp.ones((sp, 1), v.dtype)], axis=1)
    width = ve.shape[1]

    def q_block(i):
        q0 = i * st.bq
        qi = jax.lax.dynamic_slice_in_dim(qs, q0, st.bq)

        def update(j, carry, masked):
            m, l, acc = carry
            k0 = j * st.bk
            kj = jax.lax.dynamic_slice_in_dim(k, k0, st.bk)
            vj = jax.lax.dynamic_slice_in_dim(ve, k0, st.bk)
            if masked:
                # (the keys need no zeroing here: their logits are masked; the backward zeroes
                # them for dq = dS K)
                (vj,) = _hide_past(st, mask, q0, k0, sp, vj)
            s, _ = _logits(st, qi, kj, bias, q0, k0)
            if masked:
                s = jnp.where(mask.block(q0, k0, st.bq, st.bk), s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
            alpha = jnp.exp2((m - m_use) * st.unit)
            # Clamped: XLA may recompute the scaled logits inside this fusion with a fused
            # multiply-add, so at logits of ~1e9 `s - max` can be a few ulps above 0 and exp2
            # overflow (bfloat16 inputs, whose scale is applied after the product).
            p = jnp.exp2(jnp.minimum(s - m_use[:, None], 0.0) * st.unit - st.shift)
            if dropout:
                l = l * alpha + p.sum(axis=1)
                keep = _keep(st, seed, q0, k0)
                p = jnp.where(keep, p * (1.0 / (1.0 - st.dropout_rate)), 0.0)
            pv = jnp.einsum("ts,sd->td", p.astype(v.dtype), vj, preferred_element_type=acc.dtype)
            return m_new, l, acc * alpha[:, None] + pv

        def body(j, carry):
            flags = block_kind(mask, q0, j * st.bk, st.bq, st.bk)
            return _dispatch(
                flags,
                lambda c: c,
                lambda c: update(j, c, masked=False),
                lambda c: update(j, c, masked=True),
                carry,
            )

        acc_dt = jnp.promote_types(q.dtype, jnp.float32)
        # Built *_like(qi) so that inside shard_map they vary across devices like qi does
        # (constants would not, and lax.switch requires equal branch types).
        init = (
            jnp.full_like(qi, -jnp.inf, acc_dt, shape=(st.bq,)),
            jnp.zeros_like(qi, acc_dt, shape=(st.bq,)),
            jnp.zeros_like(qi, acc_dt, shape=(st.bq, width)),
        )
        lo, hi = _block_range(st, mask, q0, tp, sp)
        m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
        if not dropout:
            acc, l = acc[:, :dv], acc[:, dv]
        safe_l = jnp.where(l > 0, l, 1.0)
        out = (acc / safe_l[:, None]).astype(q.dtype)
        # lse = m + (shift + log2 l) in m's units, and lo: what its rounding left out (m - lse
        # is exact where it matters, near m).
        t = (st.shift + jnp.log2(safe_l)) / st.unit
        lse = jnp.where(l > 0, m + t, -jnp.inf)
        lo = jnp.where(l > 0, (m - lse) + t, 0.0)
        return out, lse, lo

    if nq == 1:
        return q_block(0)
    outs, lses, los = jax.lax.map(q_block, jnp.arange(nq))
    return outs.reshape(tp, dv), lses.reshape(tp), los.reshape(tp)


# ---------------------------------------------------------------------------------------------
# Backward: recompute each block's probabilities from the saved log-sum-exp.


def _from_saved_lse(st: _Static, lse: Array, lo: Array, acc_dt) -> tuple[Array, Array]:
    """What the passes that recompute each block's weights from the saved log-sum-exp (the
    backward, forward mode's tangent) need: the lse with rows that see no key at +inf (their
    weights 0 everywhere), and ``2^(-lo unit)``: the recomputed weights are ``2^(lo unit)``
    times the true ones, so each row's sums are scaled by it."""
    return jnp.where(jnp.isneginf(lse), jnp.inf, lse), jnp.exp2(-lo * st.unit).astype(acc_dt)


def _block_weights(st: _Static, s: Array, lsei: Array) -> Array:
    """A block's weights ``2^((s - lse) unit)`` from its logits and its rows' saved lse, with
    the forward's clamp."""
    return jnp.exp2(jnp.minimum(s - lsei[:, None], 0.0) * st.unit)


def _backward(st: _Static, q, k, v, bias, mask, seed, out, lse, lo, g_out, g_lse):
    tp, sp, d = q.shape[0], k.shape[0], q.shape[1]
    nq = tp // st.bq
    dropout = st.dropout_rate > 0.0
    acc_dt = jnp.promote_types(q.dtype, jnp.float32)
    qs = _prescaled(st, q)
    # The recomputed weights are 2^(lo unit) times the true ones: the cotangents are scaled by
    # 2^(-lo unit) instead (the same products; a pass over dO, not over the logits).
    lse_use, fix = _from_saved_lse(st, lse, lo, acc_dt)
    g_out = (g_out.astype(acc_dt) * fix[:, None]).astype(g_out.dtype)
    # dL/dlogits = p * (dp - delta); delta = rowsum(dO * O) minus the lse cotangent.
    delta = jnp.sum(g_out.astype(acc_dt) * out.astype(acc_dt), axis=1)
    if g_lse is not None:
        delta = delta - g_lse.astype(acc_dt) * fix

    def q_block(i, carry):
        dk, dv, dbias = carry
        q0 = i * st.bq
        qi = jax.lax.dynamic_slice_in_dim(q, q0, st.bq)
        qsi = jax.lax.dynamic_slice_in_dim(qs, q0, st.bq)
        doi = jax.lax.dynamic_slice_in_dim(g_out, q0, st.bq)
        lsei = jax.lax.dynamic_slice_in_dim(lse_use, q0, st.bq)
        deli = jax.lax.dynamic_slice_in_dim(delta, q0, st.bq)

        def local(j, masked):
            """One block's contributions (dq_i, dk_j, dv_j, dlogits). Only these small arrays
            pass through the block's switch; the big accumulators are updated outside it, so
            XLA never copies them per block."""
            k0 = j * st.bk
            kj = jax.lax.dynamic_slice_in_dim(k, k0, st.bk)
            vj = jax.lax.dynamic_slice_in_dim(v, k0, st.bk)
            s, th = _logits(st, qsi, kj, bias, q0, k0)
            if masked:
                visible = mask.block(q0, k0, st.bq, st.bk)
                s = jnp.where(visible, s, -jnp.inf)
            p = _block_weights(st, s, lsei)
            dp = jnp.einsum("td,sd->ts", doi, vj, preferred_element_type=acc_dt)
            pd = p
            if dropout:
                keep = _keep(st, seed, q0, k0)
                inv = 1.0 / (1.0 - st.dropout_rate)
                pd = jnp.where(keep, p * inv, 0.0)
                dp = jnp.where(keep, dp * inv, 0.0)
            dvj = jnp.einsum("ts,td->sd", pd.astype(v.dtype), doi, preferred_element_type=acc_dt)
            ds = p * (dp - deli[:, None])  # gradient of the (softcapped, biased) logits
            if masked:  # (p = 0 there, and a value past a sequence's length may make dp NaN)
                ds = jnp.where(visible, ds, 0.0)
            dlogits = ds if bias is not None else None
            if th is not None:
                ds = ds * (1.0 - th * th)
            dsl = (ds * st.scale).astype(q.dtype)
            if masked:  # keys past the block's range (a zero dS times NaN would be NaN)
                (kj,) = _hide_past(st, mask, q0, k0, k.shape[0], kj)
            dqj = jnp.einsum("ts,sd->td", dsl, kj, preferred_element_type=acc_dt)
            dkj = jnp.einsum("ts,td->sd", dsl, qi, preferred_element_type=acc_dt)
            return dqj, dkj, dvj, dlogits

        def skipped(j):
            zq = jnp.zeros_like(qi, acc_dt)
            zk = jnp.zeros_like(qi, acc_dt, shape=(st.bk, d))
            zv = jnp.zeros_like(qi, acc_dt, shape=(st.bk, v.shape[1]))
            zb = None if bias is None else jnp.zeros_like(qi, acc_dt, shape=(st.bq, st.bk))
            return zq, zk, zv, zb

        def body(j, c):
            dqi, dk, dv, dbias = c
            flags = block_kind(mask, q0, j * st.bk, st.bq, st.bk)
            dqj, dkj, dvj, dlogits = _dispatch(
                flags,
                skipped,
                lambda j: local(j, masked=False),
                lambda j: local(j, masked=True),
                j,
            )
            k0 = j * st.bk
            dk = jax.lax.dynamic_update_slice_in_dim(
                dk, jax.lax.dynamic_slice_in_dim(dk, k0, st.bk) + dkj, k0, axis=0
            )
            dv = jax.lax.dynamic_update_slice_in_dim(
                dv, jax.lax.dynamic_slice_in_dim(dv, k0, st.bk) + dvj, k0, axis=0
            )
            if bias is not None:
                dbias = _add_bias_block(dbias, dlogits, q0, k0, st)
            return dqi + dqj, dk, dv, dbias

        lo, hi = _block_range(st, mask, q0, tp, sp)
        dqi = jnp.zeros_like(qi, acc_dt)
        dqi, dk, dv, dbias = jax.lax.fori_loop(lo, hi, body, (dqi, dk, dv, dbias))
        return (dk, dv, dbias), dqi

    init = (
        jnp.zeros_like(k, acc_dt),
        jnp.zeros_like(v, acc_dt),
        None if bias is None else jnp.zeros_like(bias, acc_dt),
    )
    (dk, dv, dbias), dq = jax.lax.scan(lambda c, i: q_block(i, c), init, jnp.arange(nq))
    dq = dq.reshape(tp, d)
    return (
        dq.astype(q.dtype),
        dk.astype(k.dtype),
        dv.astype(v.dtype),
        None if bias is None else dbias.astype(bias.dtype),
    )


def _add_bias_block(dbias: Array, ds: Array, q0, k0, st: _Static) -> Array:
    blk = ds
    rows, cols = (0, st.bq), (0, st.bk)
    if dbias.shape[0] == 1:
        blk, rows = blk.sum(0, keepdims=True), (0, 1)
    else:
        rows = (q0, st.bq)
    if dbias.shape[1] == 1:
        blk, cols = blk.sum(1, keepdims=True), (0, 1)
    else:
        cols = (k0, st.bk)
    start = _i32(rows[0], cols[0])
    cur = jax.lax.dynamic_slice(dbias, start, (rows[1], cols[1]))
    return jax.lax.dynamic_update_slice(dbias, cur + blk, start)


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(st: _Static, q, k, v, bias, mask: Any, seed):
    out, lse, _ = _forward(st, q, k, v, bias, mask, seed)
    return out, lse


def _flash_fwd(st, q, k, v, bias, mask, seed):
    out, lse, lo = _forward(st, q, k, v, bias, mask, seed)
    return (out, lse), (q, k, v, bias, mask, seed, out, lse, lo)


def _flash_bwd(st, res, cts):
    q, k, v, bias, mask, seed, out, lse, lo = res
    g_out, g_lse = cts
    if isinstance(g_lse, jax.custom_derivatives.SymbolicZero) or g_lse is None:
        g_lse = None
    elif not st.natural:
        # The cotangent of lse2 = lse / ln2 is ln2 times that of the natural lse, and
        # d lse / d logit = p in natural units: the logits need the natural one.
        g_lse = g_lse / LN2
    dq, dk, dv, dbias = _backward(st, q, k, v, bias, mask, seed, out, lse, lo, g_out, g_lse)
    return dq, dk, dv, dbias, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _flash_forward_mode(st: _Static, q, k, v, bias, mask: Any, seed):
    out, lse, _ = _forward(st, q, k, v, bias, mask, seed)
    return out, lse


@_flash_forward_mode.defjvp
def _flash_forward_mode_jvp(st: _Static, primals, tangents):
    q, k, v, bias, mask, seed = primals
    tq, tk, tv, tbias = tangents[:4]
    out, lse, lo = _forward(st, q, k, v, bias, mask, seed)
    t_out, t_lse = _tangent(st, q, k, v, bias, mask, seed, out, lse, lo, tq, tk, tv, tbias)
    return (out, lse), (t_out, t_lse)


# ---------------------------------------------------------------------------------------------
# Forward mode: the tangent of the output and the log-sum-exp from the saved log-sum-exp.


def _tangent(st: _Static, q, k, v, bias, mask, seed, out, lse, lo, tq, tk, tv, tbias):
    """With P the weights, dl the logits' tangent (natural units) and P' the weights after
    dropout: ``d lse = sum_j P dl`` and ``d out = sum_j P' (dl v_j + dv_j) - d lse out``.
    Blockwise, each block's weights recomputed from the log-sum-exp as in the backward; the
    tangent of ``lse`` is returned in its units (base 2 unless a bias is given), as it is."""
    tp, sp, dv = q.shape[0], k.shape[0], v.shape[1]
    nq = tp // st.bq
    dropout = st.dropout_rate > 0.0
    acc_dt = jnp.promote_types(q.dtype, jnp.float32)
    qs, tqs = _prescaled(st, q), _prescaled(st, tq)
    lse_use, fix = _from_saved_lse(st, lse, lo, acc_dt)  # (fix: applied per row at the end)

    def q_block(i):
        q0 = i * st.bq
        qsi = jax.lax.dynamic_slice_in_dim(qs, q0, st.bq)
        tqsi = jax.lax.dynamic_slice_in_dim(tqs, q0, st.bq)
        lsei = jax.lax.dynamic_slice_in_dim(lse_use, q0, st.bq)

        def local(j, masked):
            k0 = j * st.bk
            kj = jax.lax.dynamic_slice_in_dim(k, k0, st.bk)
            tkj = jax.lax.dynamic_slice_in_dim(tk, k0, st.bk)
            vj = jax.lax.dynamic_slice_in_dim(v, k0, st.bk)
            tvj = jax.lax.dynamic_slice_in_dim(tv, k0, st.bk)
            if masked:  # keys and values past the block's range: a zero weight times NaN
                kj, tkj, vj, tvj = _hide_past(st, mask, q0, k0, sp, kj, tkj, vj, tvj)
            s, th = _logits(st, qsi, kj, bias, q0, k0)
            ds = jnp.einsum("td,sd->ts", tqsi, kj, preferred_element_type=acc_dt)
            ds = ds + jnp.einsum("td,sd->ts", qsi, tkj, preferred_element_type=acc_dt)
            if qsi.dtype not in (jnp.float32, jnp.float64):
                ds = ds * (st.scale * st.to_logits)  # (low-precision q: not pre-scaled)
            if th is not None:
                ds = ds * (1.0 - th * th)
            if tbias is not None:
                ds = ds + _bias_block(tbias, q0, k0, st.bq, st.bk).astype(acc_dt)
            if masked:
                visible = mask.block(q0, k0, st.bq, st.bk)
                s = jnp.where(visible, s, -jnp.inf)
                ds = jnp.where(visible, ds, 0.0)
            p = _block_weights(st, s, lsei)
            pds = p * ds
            d_lse = pds.sum(axis=1)
            if dropout:
                keep = _keep(st, seed, q0, k0)
                inv = 1.0 / (1.0 - st.dropout_rate)
                p, pds = (jnp.where(keep, x * inv, 0.0) for x in (p, pds))
            # (dl = ds / to_logits: applied once per row at the end)
            tv_part = jnp.einsum("ts,sd->td", p.astype(v.dtype), tvj, preferred_element_type=acc_dt)
            v_part = jnp.einsum("ts,sd->td", pds, vj.astype(acc_dt), preferred_element_type=acc_dt)
            return d_lse, v_part, tv_part

        def skipped(j):
            z = jnp.zeros_like(qsi, acc_dt, shape=(st.bq, dv))
            return jnp.zeros_like(qsi, acc_dt, shape=(st.bq,)), z, z

        def body(j, carry):
            flags = block_kind(mask, q0, j * st.bk, st.bq, st.bk)
            parts = _dispatch(
                flags,
                skipped,
                lambda j: local(j, masked=False),
                lambda j: local(j, masked=True),
                j,
            )
            return tuple(c + x for c, x in zip(carry, parts, strict=True))

        lo_b, hi_b = _block_range(st, mask, q0, tp, sp)
        d_lse, v_part, tv_part = jax.lax.fori_loop(lo_b, hi_b, body, skipped(0))
        fixi = jax.lax.dynamic_slice_in_dim(fix, q0, st.bq)
        outi = jax.lax.dynamic_slice_in_dim(out, q0, st.bq).astype(acc_dt)
        d_lse = d_lse * fixi
        t_out = ((v_part * fixi[:, None] - d_lse[:, None] * outi) / st.to_logits) + (
            tv_part * fixi[:, None]
        )
        return t_out.astype(q.dtype), d_lse.astype(lse.dtype)

    if nq == 1:
        return q_block(0)
    t_outs, t_lses = jax.lax.map(q_block, jnp.arange(nq))
    return t_outs.reshape(tp, dv), t_lses.reshape(tp)
