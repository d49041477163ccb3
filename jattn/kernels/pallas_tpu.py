"""Flash attention as Pallas kernels for TPUs (Mosaic lowering), forward and backward.

The TPU way of writing the flash loop: the grid is ``(batch, heads, query blocks, key
blocks)``, the key axis innermost and sequential ("arbitrary"), so the Pallas pipeline streams
K/V tiles HBM -> VMEM while the running max, sum and output accumulator stay in VMEM scratch
across the key steps. A key block no row of the query block can see is skipped twice over: its
index map is clamped to the visible range (an unchanged block index issues no new DMA) and its
step does no compute (``pl.when``). Of the visible blocks only those on the edges of the mask
evaluate it; the ranges come from :mod:`jattn.kernels._pallas_common`, as on the GPU. The
per-batch lengths and causal offsets are scalar-prefetched into SMEM, where both the index maps
and the kernel read them.

Layout: heads before sequence (``[B, N, T, D]``), so a tile's last two dims are
``(sequence, head dim)``: sublanes and lanes. The running max and sum are kept replicated
across the 128 lanes (``[block_q, 128]``), the Mosaic-friendly form of a per-row scalar; the
log-sum-exp leaves the forward pass lane-dense (``[B, N, 1, T]``, one transpose per query
block). The dK/dV pass works on transposed score tiles (``[block_k, block_q]``), so the saved
per-query rows (lse, ``delta``) broadcast along sublanes without any relayout; the dQ pass
transposes them once per query block into lane-replicated scratch.

GQA: K/V index maps read head ``h // groups``; the dK/dV grid walks the query heads of each
group inside its sequential axis, so group gradients are summed in VMEM, never in HBM.

Off a TPU the same kernels run in Pallas interpret mode, which is how CI checks them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jattn.kernels import _pallas_common as pc
from jattn.kernels.common import KernelOutput
from jattn.plan import Plan

Array = jax.Array

LANES = 128

SUPPORTS = pc.SUPPORTS


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig:
    """Tiling of the Pallas TPU kernels.

    ``block_q`` x ``block_k`` is the score tile of the forward pass; the dK/dV pass holds
    ``block_k_dkv`` keys against ``block_q_dkv`` queries, the dQ pass ``block_q_dq`` queries
    against ``block_k_dq`` keys. On a TPU every block is a multiple of 128 (lanes; the
    log-sum-exp and the transposed tiles put queries on lanes too); in interpret mode any
    positive size works. Blocks larger than the sequence (rounded up to 128) are shrunk to it.
    ``vmem_limit_bytes`` raises Mosaic's scoped VMEM limit (None: the compiler's default).
    """

    block_q: int = 512
    block_k: int = 512
    block_q_dkv: int = 512
    block_k_dkv: int = 512
    block_q_dq: int = 512
    block_k_dq: int = 512
    vmem_limit_bytes: int | None = None

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> PallasTpuConfig:
        """The heuristic default for a call on ``backend``."""
        q_shape = (*plan.batch_shape, plan.q_seq_len, plan.num_heads, plan.head_dim)
        k_shape = (*plan.batch_shape, plan.kv_seq_len, plan.num_kv_heads, plan.head_dim)
        return default_config(q_shape, k_shape, plan.dtype, backend, plan.features)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "vmem_limit_bytes" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PallasTpuConfig.{f.name} must be a positive int, got {v!r}")


# Defaults by TPU generation: (fwd q, fwd k, dkv q, dkv k, dq q, dq k). v5e has a 16 MiB
# default scoped VMEM and the smallest MXU budget, so its key tiles are smaller; v4/v5p/v6e
# take 1024-key tiles in the forward pass (score tile 2 MiB of float32).
_DEFAULTS = {
    "v5e": (512, 512, 512, 256, 256, 512),
    "large": (512, 1024, 512, 512, 512, 512),
}


def _generation(device_kind: str) -> str:
    kind = device_kind.lower()
    if "lite" in kind or "v5e" in kind:
        return "v5e" if "v5" in kind else "large"  # v6 lite (Trillium) has 32 MiB scoped VMEM
    return "large"


def default_config(
    q_shape, k_shape, dtype, backend: str, features: frozenset[str] = frozenset()
) -> PallasTpuConfig:
    """The heuristic default for the TPU ``jax.devices()[0]`` (by ``device_kind``); off a TPU
    (interpret mode) small tiles keep the emulation quick."""
    del k_shape, dtype
    if backend != "tpu":
        return PallasTpuConfig(32, 32, 32, 32, 32, 32)
    bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq = _DEFAULTS[_generation(jax.devices()[0].device_kind)]
    if q_shape[-1] > 128:  # large head dims: halve the key tiles to stay within VMEM
        bk, bk_dq = bk // 2 if bk > 256 else bk, bk_dq // 2 if bk_dq > 256 else bk_dq
    return PallasTpuConfig(bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The hashable part of a call, fixed at trace time."""

    scale: float
    softcap: float | None
    plan: pc.MaskPlan
    groups: int
    tp: int
    sp: int
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    vmem_limit_bytes: int | None
    interpret: bool


def _interpret() -> bool:
    """Whether to emulate the kernels (off a TPU). Tests that lower for TPU on a CPU-only
    machine patch this to False."""
    return jax.default_backend() != "tpu"


def pallas_tpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``); the mask leaves
    of ``plan`` are in :func:`jattn.attention`'s canonical ``[*B', K', G', ...]`` layout."""
    interpret = _interpret()
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    nb = math.prod(batch)
    cfg = plan.config
    align = 1 if interpret else LANES
    if not interpret:
        for f in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            b = getattr(cfg, f)
            if b % LANES:
                raise ValueError(f"PallasTpuConfig.{f}={b} must be a multiple of {LANES} on a TPU")
    fit_q = lambda b: min(b, pc.round_up(t, align))  # noqa: E731
    fit_k = lambda b: min(b, pc.round_up(s, align))  # noqa: E731
    bq, bq_dkv, bq_dq = fit_q(cfg.block_q), fit_q(cfg.block_q_dkv), fit_q(cfg.block_q_dq)
    bk, bk_dkv, bk_dq = fit_k(cfg.block_k), fit_k(cfg.block_k_dkv), fit_k(cfg.block_k_dq)
    tp = pc.round_up(t, math.lcm(bq, bq_dkv, bq_dq))
    sp = pc.round_up(s, math.lcm(bk, bk_dkv, bk_dq))

    # [*B, T, N, H] -> [B, N, Tp, H]: heads outside, so tiles are (sequence, head dim).
    qt = pc.pad_to(q.reshape(nb, t, n, h).transpose(0, 2, 1, 3), 2, tp)
    kt = pc.pad_to(k.reshape(nb, s, kh, h).transpose(0, 2, 1, 3), 2, sp)
    vt = pc.pad_to(v.reshape(nb, s, kh, hv).transpose(0, 2, 1, 3), 2, sp)
    mask_plan, arrays = pc.plan_mask(plan.mask, tuple(batch), tp, sp, s)
    st = _Static(
        scale=plan.scale,
        softcap=plan.softcap,
        plan=mask_plan,
        groups=n // kh,
        tp=tp,
        sp=sp,
        bq=bq,
        bk=bk,
        bq_dkv=bq_dkv,
        bk_dkv=bk_dkv,
        bq_dq=bq_dq,
        bk_dq=bk_dq,
        vmem_limit_bytes=cfg.vmem_limit_bytes,
        interpret=interpret,
    )
    out, lse2 = _attention(st, qt, kt, vt, arrays)
    out = out[:, :, :t].transpose(0, 2, 1, 3).reshape(*batch, t, n, hv)
    lse = None
    if plan.return_lse:
        lse = (lse2[:, :, :t] * pc.LN2).reshape(*batch, n, t)
    return KernelOutput(out, lse, None)


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _when(cond: Any, fn) -> None:
    """``pl.when`` that also takes a static Python bool."""
    if isinstance(cond, bool):
        if cond:
            fn()
    else:
        pl.when(cond)(fn)


def _lanes(x: Array, width: int) -> Array:
    """A lane-replicated ``[rows, 128]`` array widened (or cut) to ``[rows, width]``."""
    if width <= LANES:
        return x if width == LANES else x[:, :width]
    reps = pc.cdiv(width, LANES)
    y = jnp.tile(x, (1, reps))
    return y if reps * LANES == width else y[:, :width]


def _dot(a: Array, b: Array, tb: bool = False) -> Array:
    """``a @ b`` (``b`` transposed if ``tb``) with float32 accumulation on the MXU. Float32
    operands get full precision: Mosaic's default would round them to bfloat16."""
    dims = (((1,), (1 if tb else 0,)), ((), ()))
    f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if f32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(st: _Static, a: Array, b: Array):
    """Base-2 logits ``a @ b.T`` (scaled, softcapped) and the tanh the backward needs."""
    s = _dot(a, b, tb=True) * (st.scale * pc.LOG2E)
    th = None
    if st.softcap is not None:
        c2 = st.softcap * pc.LOG2E
        th = jnp.tanh(s * (1.0 / c2))
        s = c2 * th
    return s, th


def _scalars(plan: pc.MaskPlan, refs, b) -> pc.Scalars:
    return pc.Scalars(**{name: ref[b] for name, ref in zip(plan.scalar_names, refs, strict=True)})


def _clamp_block(j, lo, hi, n: int):
    """The block to fetch at step ``j``: ``j`` inside ``[lo, hi)``, else the nearest visible
    block, so steps outside the range re-use the block already in VMEM (no DMA)."""
    return pc.imin(pc.imax(pc.imin(j, pc.imax(lo, hi - 1)), lo), n - 1)


def _compiler_params(st: _Static):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=st.vmem_limit_bytes,
    )


def _and(a: Any, b: Any) -> Any:
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    return jnp.logical_and(a, b)


def _not(a: Any) -> Any:
    return (not a) if isinstance(a, bool) else jnp.logical_not(a)


def _in(i: Any, lo: Any, hi: Any) -> Any:
    """``lo <= i < hi``, static when all three are."""
    return _and(pc.imax(i, lo) == i, pc.imin(i, hi - 1) == i)


def _run_step(st: _Static, run: Any, full: Any, update) -> None:
    """Calls ``update(masked)`` for a visible block (``run``), unmasked when ``full``."""
    if not st.plan.masks_anything:
        _when(run, lambda: update(False))
        return
    _when(_and(run, full), lambda: update(False))
    _when(_and(run, _not(full)), lambda: update(True))


def _iota(shape: tuple[int, int], dim: int) -> Array:
    return lax.broadcasted_iota(jnp.int32, shape, dim)


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, st: _Static):
    plan, bq, bk = st.plan, st.bq, st.bk
    ns = len(plan.scalar_names)
    sc_refs, (q_ref, k_ref, v_ref), refs = refs[:ns], refs[ns : ns + 3], refs[ns + 3 :]
    qseg_ref = kvseg_ref = None
    if plan.segments:
        (qseg_ref, kvseg_ref), refs = refs[:2], refs[2:]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk = st.sp // bk
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = pc.kv_blocks(plan, sc, q0, bq, bk, st.sp)
    dv = acc_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        s, _ = _logits(st, q_ref[...], k_ref[...])
        if masked:
            ok = pc.visible(
                plan,
                sc,
                q0 + _iota((bq, bk), 0),
                k0 + _iota((bq, bk), 1),
                None if qseg_ref is None else qseg_ref[...],  # [bq, 1]
                None if kvseg_ref is None else kvseg_ref[...],  # [1, bk]
            )
            s = s if ok is None else jnp.where(ok, s, -jnp.inf)
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet
        alpha = jnp.exp2(m_prev - m_use)
        p = jnp.exp2(s - _lanes(m_use, bk))
        m_ref[...] = m_new
        l_ref[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        vj = v_ref[...]
        acc_ref[...] = acc_ref[...] * _lanes(alpha, dv) + _dot(p.astype(vj.dtype), vj)

    _run_step(st, _in(j, lo, hi), _in(j, f_lo, f_hi), update)

    @pl.when(j == nk - 1)
    def _finish():
        l, m = l_ref[...], m_ref[...]
        safe = jnp.where(l > 0.0, l, 1.0)
        out = acc_ref[...] / _lanes(safe, dv)
        lse2 = jnp.where(l > 0.0, m + jnp.log2(safe), -jnp.inf)
        if plan.q_len:  # padding rows: zeros, and -inf so the backward gives them nothing
            valid = q0 + _iota((bq, LANES), 0) < sc.q_len
            out = jnp.where(_lanes(valid, dv), out, 0.0)
            lse2 = jnp.where(valid, lse2, -jnp.inf)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.transpose(lse2)[:1, :]  # lane-dense [1, bq]


def _forward(st: _Static, q, k, v, arrays: pc.MaskArrays):
    nb, n, tp, h = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    g, bq, bk, plan = st.groups, st.bq, st.bk, st.plan
    nq, nk = tp // bq, sp // bk

    def kv_map(b, hh, i, j, *sc_refs):
        lo, _, _, hi = pc.kv_blocks(plan, _scalars(plan, sc_refs, b), i * bq, bq, bk, sp)
        return (b, pc.fdiv(hh, g), _clamp_block(j, lo, hi, nk), 0)

    def kvseg_map(b, hh, i, j, *sc_refs):
        return (b, 0, kv_map(b, hh, i, j, *sc_refs)[2])

    in_specs = [
        pl.BlockSpec((None, None, bq, h), lambda b, hh, i, j, *_: (b, hh, i, 0)),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, dv), kv_map),
    ]
    ops = [q, k, v]
    if plan.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, hh, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), kvseg_map),
        ]
        ops += [arrays.q_seg[:, :, None], arrays.kv_seg[:, None, :]]
    scalars = arrays.scalars(plan)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars),
        grid=(nb, n, nq, nk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, dv), lambda b, hh, i, j, *_: (b, hh, i, 0)),
            pl.BlockSpec((None, None, 1, bq), lambda b, hh, i, j, *_: (b, hh, 0, i)),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, LANES), jnp.float32),  # running max (base 2), lane-replicated
            pltpu.VMEM((bq, LANES), jnp.float32),  # running sum
            pltpu.VMEM((bq, dv), jnp.float32),  # output accumulator
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((nb, n, tp, dv), q.dtype),
            jax.ShapeDtypeStruct((nb, n, 1, tp), jnp.float32),
        ],
        compiler_params=_compiler_params(st),
        interpret=st.interpret,
        name="jattn_pallas_tpu_fwd",
    )(*scalars, *ops)


# ---------------------------------------------------------------------------------------------
# Backward: dK/dV on transposed tiles over key blocks, dQ over query blocks.


def _dkv_kernel(*refs, st: _Static):
    plan, bq, bk = st.plan, st.bq_dkv, st.bk_dkv
    ns = len(plan.scalar_names)
    sc_refs, (q_ref, k_ref, v_ref), refs = refs[:ns], refs[ns : ns + 3], refs[ns + 3 :]
    qseg_ref = kvseg_ref = None
    if plan.segments:
        (qseg_ref, kvseg_ref), refs = refs[:2], refs[2:]
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq = st.tp // bq
    i = lax.rem(r, jnp.int32(nq))  # the sequential axis walks (group head, query block)
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = pc.q_blocks(plan, sc, k0, bk, bq, st.tp, st.sp)

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(masked: bool):
        qi, kj, vj, doi = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, th = _logits(st, kj, qi)  # [bk, bq]: keys on sublanes, queries on lanes
        if masked:
            ok = pc.visible(
                plan,
                sc,
                q0 + _iota((bk, bq), 1),
                k0 + _iota((bk, bq), 0),
                None if qseg_ref is None else qseg_ref[...],  # [1, bq]
                None if kvseg_ref is None else kvseg_ref[...],  # [bk, 1]
            )
            s = s if ok is None else jnp.where(ok, s, -jnp.inf)
        p = jnp.exp2(s - lse_ref[...])  # lse row [1, bq] broadcast along sublanes
        dv_acc[...] += _dot(p.astype(doi.dtype), doi)
        ds = p * (_dot(vj, doi, tb=True) - delta_ref[...])
        if th is not None:
            ds = ds * (1.0 - th * th)
        dk_acc[...] += _dot((ds * st.scale).astype(qi.dtype), qi)

    _run_step(st, _in(i, lo, hi), _in(i, f_lo, f_hi), update)

    @pl.when(r == st.groups * nq - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, st: _Static):
    plan, bq, bk = st.plan, st.bq_dq, st.bk_dq
    ns = len(plan.scalar_names)
    sc_refs, (q_ref, k_ref, v_ref), refs = refs[:ns], refs[ns : ns + 3], refs[ns + 3 :]
    qseg_ref = kvseg_ref = None
    if plan.segments:
        (qseg_ref, kvseg_ref), refs = refs[:2], refs[2:]
    do_ref, lse_ref, delta_ref, dq_ref, dq_acc, lse_col, delta_col = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk = st.sp // bk
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = pc.kv_blocks(plan, sc, q0, bq, bk, st.sp)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        # The per-row values arrive lane-dense [1, bq]; one transpose per query block makes
        # them lane-replicated columns [bq, 128].
        lse_col[...] = jnp.transpose(jnp.broadcast_to(lse_ref[...], (LANES, bq)))
        delta_col[...] = jnp.transpose(jnp.broadcast_to(delta_ref[...], (LANES, bq)))

    def update(masked: bool):
        qi, kj, vj, doi = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        s, th = _logits(st, qi, kj)
        if masked:
            ok = pc.visible(
                plan,
                sc,
                q0 + _iota((bq, bk), 0),
                k0 + _iota((bq, bk), 1),
                None if qseg_ref is None else qseg_ref[...],
                None if kvseg_ref is None else kvseg_ref[...],
            )
            s = s if ok is None else jnp.where(ok, s, -jnp.inf)
        p = jnp.exp2(s - _lanes(lse_col[...], bk))
        ds = p * (_dot(doi, vj, tb=True) - _lanes(delta_col[...], bk))
        if th is not None:
            ds = ds * (1.0 - th * th)
        dq_acc[...] += _dot((ds * st.scale).astype(kj.dtype), kj)

    _run_step(st, _in(j, lo, hi), _in(j, f_lo, f_hi), update)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _backward(st: _Static, q, k, v, arrays, out, lse2, g_out, g_lse2):
    nb, n, tp, h = q.shape
    kh, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, plan = st.groups, st.plan
    # dL/dlogits = p * (dp - delta), delta = rowsum(dO * O) minus the lse cotangent.
    delta = jnp.einsum("bntd,bntd->bnt", g_out.astype(jnp.float32), out.astype(jnp.float32))
    if g_lse2 is not None:
        delta = delta - g_lse2
    delta = delta[:, :, None, :]
    lse_use = jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)  # empty rows: p = 0
    scalars = arrays.scalars(plan)
    compiler_params = _compiler_params(st)

    # dK/dV: grid (batch, kv head, key block, group head x query block).
    bq, bk = st.bq_dkv, st.bk_dkv
    nq, nk = tp // bq, sp // bk

    def q_of(b, hh, j, r, sc_refs):
        lo, _, _, hi = pc.q_blocks(plan, _scalars(plan, sc_refs, b), j * bk, bk, bq, tp, sp)
        head = hh * g + pc.fdiv(r, nq)
        return head, _clamp_block(lax.rem(r, jnp.int32(nq)), lo, hi, nq)

    def q_map(b, hh, j, r, *sc_refs):
        head, i = q_of(b, hh, j, r, sc_refs)
        return (b, head, i, 0)

    def row_map(b, hh, j, r, *sc_refs):
        head, i = q_of(b, hh, j, r, sc_refs)
        return (b, head, 0, i)

    def qseg_map(b, hh, j, r, *sc_refs):
        return (b, 0, q_of(b, hh, j, r, sc_refs)[1])

    kv_map = lambda b, hh, j, r, *_: (b, hh, j, 0)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, bq, h), q_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, dv), kv_map),
    ]
    ops = [q, k, v]
    if plan.segments:
        in_specs += [
            pl.BlockSpec((None, 1, bq), qseg_map),
            pl.BlockSpec((None, bk, 1), lambda b, hh, j, r, *_: (b, j, 0)),
        ]
        ops += [arrays.q_seg[:, None, :], arrays.kv_seg[:, :, None]]
    in_specs += [
        pl.BlockSpec((None, None, bq, dv), q_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
        pl.BlockSpec((None, None, 1, bq), row_map),
    ]
    ops += [g_out, lse_use, delta]
    dk, dv_ = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(nb, kh, nk, g * nq),
            in_specs=in_specs,
            out_specs=[
                pl.BlockSpec((None, None, bk, h), kv_map),
                pl.BlockSpec((None, None, bk, dv), kv_map),
            ],
            scratch_shapes=[
                pltpu.VMEM((bk, h), jnp.float32),
                pltpu.VMEM((bk, dv), jnp.float32),
            ],
        ),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=compiler_params,
        interpret=st.interpret,
        name="jattn_pallas_tpu_dkv",
    )(*scalars, *ops)

    # dQ: grid (batch, head, query block, key block), as the forward pass.
    bq, bk = st.bq_dq, st.bk_dq
    nq, nk = tp // bq, sp // bk

    def kv_map_dq(b, hh, i, j, *sc_refs):
        lo, _, _, hi = pc.kv_blocks(plan, _scalars(plan, sc_refs, b), i * bq, bq, bk, sp)
        return (b, pc.fdiv(hh, g), _clamp_block(j, lo, hi, nk), 0)

    q_map_dq = lambda b, hh, i, j, *_: (b, hh, i, 0)  # noqa: E731
    row_map_dq = lambda b, hh, i, j, *_: (b, hh, 0, i)  # noqa: E731
    in_specs = [
        pl.BlockSpec((None, None, bq, h), q_map_dq),
        pl.BlockSpec((None, None, bk, h), kv_map_dq),
        pl.BlockSpec((None, None, bk, dv), kv_map_dq),
    ]
    ops = [q, k, v]
    if plan.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, hh, i, j, *_: (b, i, 0)),
            pl.BlockSpec(
                (None, 1, bk), lambda b, hh, i, j, *r: (b, 0, kv_map_dq(b, hh, i, j, *r)[2])
            ),
        ]
        ops += [arrays.q_seg[:, :, None], arrays.kv_seg[:, None, :]]
    in_specs += [
        pl.BlockSpec((None, None, bq, dv), q_map_dq),
        pl.BlockSpec((None, None, 1, bq), row_map_dq),
        pl.BlockSpec((None, None, 1, bq), row_map_dq),
    ]
    ops += [g_out, lse_use, delta]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(scalars),
            grid=(nb, n, nq, nk),
            in_specs=in_specs,
            out_specs=pl.BlockSpec((None, None, bq, h), q_map_dq),
            scratch_shapes=[
                pltpu.VMEM((bq, h), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
                pltpu.VMEM((bq, LANES), jnp.float32),
            ],
        ),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=compiler_params,
        interpret=st.interpret,
        name="jattn_pallas_tpu_dq",
    )(*scalars, *ops)
    return dq, dk, dv_


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, arrays: Any):
    out, lse2 = _forward(st, q, k, v, arrays)
    return out, lse2[:, :, 0, :]


def _attention_fwd(st, q, k, v, arrays):
    out, lse2 = _forward(st, q, k, v, arrays)
    return (out, lse2[:, :, 0, :]), (q, k, v, arrays, out, lse2)


def _attention_bwd(st, res, cts):
    q, k, v, arrays, out, lse2 = res
    g_out, g_lse2 = cts
    if isinstance(g_lse2, jax.custom_derivatives.SymbolicZero) or g_lse2 is None:
        g_lse2 = None
    else:
        # The caller's lse is lse2 * ln2, so this cotangent is ln2 times the natural one, and
        # d lse / d logit = p holds in natural units: the logits need the natural one.
        g_lse2 = g_lse2.astype(jnp.float32) / pc.LN2
    dq, dk, dv = _backward(st, q, k, v, arrays, out, lse2, g_out, g_lse2)
    return dq, dk, dv, None


_attention.defvjp(_attention_fwd, _attention_bwd)
