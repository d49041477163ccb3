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

CI runs the kernels in Pallas interpret mode off a TPU (:func:`_interpret`), and lowers them
through Mosaic.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jattn import _intmath as im
from jattn.kernels import _pallas_common as pc
from jattn.kernels._tuning import Tuning, knob
from jattn.kernels.common import KernelOutput
from jattn.plan import Plan

Array = jax.Array

LANES = 128


@dataclasses.dataclass(frozen=True)
class PallasTpuConfig(Tuning):
    """Tiling of the Pallas TPU kernels.

    ``block_q`` x ``block_k`` is the score tile of the forward pass; the dK/dV pass holds
    ``block_k_dkv`` keys against ``block_q_dkv`` queries, the dQ pass ``block_q_dq`` queries
    against ``block_k_dq`` keys. On a TPU every block is a multiple of 128 (lanes; the
    log-sum-exp and the transposed tiles put queries on lanes too); in interpret mode any
    positive size works. Blocks larger than the sequence (rounded up to 128) are shrunk to it.
    ``vmem_limit_bytes`` raises Mosaic's scoped VMEM limit (None: the compiler's default).
    """

    block_q: int = knob(512)
    block_k: int = knob(512)
    block_q_dkv: int = knob(512)
    block_k_dkv: int = knob(512)
    block_q_dq: int = knob(512)
    block_k_dq: int = knob(512)
    vmem_limit_bytes: int | None = knob(None)

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> PallasTpuConfig:
        """The heuristic default for a call on ``backend``: by the generation of the TPU
        ``jax.devices()[0]``, from :data:`_DEFAULTS`. Off a TPU (interpret mode) small tiles
        keep the emulation quick."""
        if backend != "tpu":
            return cls(**dict.fromkeys(pc.BLOCKS, 32))
        cfg = _DEFAULTS[_generation(jax.devices()[0].device_kind)]
        if plan.head_dim > 128:  # large head dims: halve the key tiles to stay within VMEM
            half = lambda b: b // 2 if b > 256 else b
            cfg = dataclasses.replace(
                cfg, block_k=half(cfg.block_k), block_k_dq=half(cfg.block_k_dq)
            )
        return cfg


# Defaults by TPU generation. v5e has a 16 MiB default scoped VMEM and the smallest MXU
# budget, so its key tiles are smaller; v4/v5p/v6e take 1024-key tiles in the forward pass
# (score tile 2 MiB of float32).
# fmt: off
_DEFAULTS: dict[str, PallasTpuConfig] = {
    "v5e": PallasTpuConfig(block_q=512, block_k=512, block_q_dkv=512, block_k_dkv=256,
                           block_q_dq=256, block_k_dq=512),
    "large": PallasTpuConfig(block_q=512, block_k=1024, block_q_dkv=512, block_k_dkv=512,
                             block_q_dq=512, block_k_dq=512),
}
# fmt: on


def _generation(device_kind: str) -> str:
    kind = device_kind.lower()
    if "lite" in kind or "v5e" in kind:
        return "v5e" if "v5" in kind else "large"  # v6 lite (Trillium) has 32 MiB scoped VMEM
    return "large"


def _interpret() -> bool:
    """Whether to emulate the kernels (off a TPU). Tests that lower for TPU on a CPU-only
    machine patch this to False."""
    return jax.default_backend() != "tpu"


def pallas_tpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``); the mask leaves
    of ``plan`` are in :func:`jattn.attention`'s canonical ``[*B', K', G', ...]`` layout."""
    return pc.launch(q, k, v, plan, _KERNEL, interpret=_interpret())


def _fit(cfg: PallasTpuConfig, field: str, length: int, interpret: bool) -> int:
    """On a TPU a block is a multiple of 128; it never exceeds the sequence rounded up to
    that."""
    b = getattr(cfg, field)
    if not interpret and b % LANES:
        raise ValueError(f"PallasTpuConfig.{field}={b} must be a multiple of {LANES} on a TPU")
    return min(b, pc.round_up(length, 1 if interpret else LANES))


def _pack(st: pc.Static, q: Array, k: Array, v: Array):
    """``[B, T, N, H]`` -> ``[B, N, Tp, H]``: heads outside, so tiles are (sequence, head
    dim)."""
    return (
        pc.pad_to(q.transpose(0, 2, 1, 3), 2, st.tp),
        pc.pad_to(k.transpose(0, 2, 1, 3), 2, st.sp),
        pc.pad_to(v.transpose(0, 2, 1, 3), 2, st.sp),
    )


def _unpack(out: Array, t: int, hv: int) -> Array:
    del hv
    return out[:, :, :t].transpose(0, 2, 1, 3)


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
    reps = im.cdiv(width, LANES)
    y = jnp.tile(x, (1, reps))
    return y if reps * LANES == width else y[:, :width]


def _dot(a: Array, b: Array, tb: bool = False) -> Array:
    """``a @ b`` (``b`` transposed if ``tb``) with float32 accumulation on the MXU. Float32
    operands get full precision: Mosaic's default would round them to bfloat16."""
    dims = (((1,), (1 if tb else 0,)), ((), ()))
    f32 = a.dtype == jnp.float32 and b.dtype == jnp.float32
    precision = lax.Precision.HIGHEST if f32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits(st: pc.Static, a: Array, b: Array):
    """Base-2 logits ``a @ b.T`` (scaled, softcapped) and the tanh the backward needs."""
    return pc.base2_logits(st, _dot(a, b, tb=True))


def _scalars(plan: pc.MaskPlan, refs, b) -> pc.Scalars:
    return pc.scalars(plan, [ref[b] for ref in refs])


def _clamp_block(j, lo, hi, n: int):
    """The block to fetch at step ``j``: ``j`` inside ``[lo, hi)``, else the nearest visible
    block, so steps outside the range re-use the block already in VMEM (no DMA)."""
    return im.imin(im.imax(im.imin(j, im.imax(lo, hi - 1)), lo), n - 1)


def _compiler_params(st: pc.Static):
    return pltpu.CompilerParams(
        dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"),
        vmem_limit_bytes=st.config.vmem_limit_bytes,
    )


def _run_step(st: pc.Static, run: Any, full: Any, update) -> None:
    """Calls ``update(masked)`` for a visible block (``run``), unmasked when ``full``."""
    if not st.plan.masks_anything:
        _when(run, lambda: update(False))
        return
    _when(im.and_(run, full), lambda: update(False))
    _when(im.and_(run, im.not_(full)), lambda: update(True))


def _mask(st: pc.Static, sc: pc.Scalars, s: Array, rows, cols, qseg_ref, kvseg_ref) -> Array:
    """``s`` masked; the segment id blocks are shaped to broadcast against ``s``."""
    q_ids = None if qseg_ref is None else qseg_ref[...]
    kv_ids = None if kvseg_ref is None else kvseg_ref[...]
    return pc.mask_logits(st.plan, sc, s, rows, cols, q_ids, kv_ids)


def _hide_past(st: pc.Static, sc: pc.Scalars, k0, *blocks: Array) -> tuple[Array, ...]:
    """Key blocks (keys on sublanes from position ``k0``) with the keys past the key-side
    bounds zeroed (``MaskPlan.keys_seen``): a zero weight times a NaN stored there is NaN."""
    out = []
    for x in blocks:
        seen = st.plan.keys_seen(sc, k0 + _iota(x.shape, 0))
        out.append(x if seen is None else jnp.where(seen, x, 0))
    return tuple(out)


def _kv_map(st: pc.Static, bq: int, bk: int):
    """The K/V index map of a grid ``(batch, head, query block, key block)``: the head's K/V
    head, and the key block clamped to the range the query block sees."""
    plan, nk = st.plan, st.sp // bk

    def kv_map(b, hh, i, j, *sc_refs):
        lo, _, _, hi = plan.kv_blocks(_scalars(plan, sc_refs, b), i * bq, bq, bk, st.sp)
        return (b, im.fdiv(hh, st.groups), _clamp_block(j, lo, hi, nk), 0)

    return kv_map


def _query_major_specs(st: pc.Static, q, k, v, arrays: pc.MaskArrays, bq: int, bk: int):
    """Block specs and operands of ``q, k, v`` (and the segment ids) for a grid ``(batch,
    head, query block, key block)``: the forward and dQ passes."""
    h, dv = q.shape[-1], v.shape[-1]
    kv_map = _kv_map(st, bq, bk)
    in_specs = [
        pl.BlockSpec((None, None, bq, h), lambda b, hh, i, j, *_: (b, hh, i, 0)),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, dv), kv_map),
    ]
    ops = [q, k, v]
    if st.plan.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda b, hh, i, j, *_: (b, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b, hh, i, j, *r: (b, 0, kv_map(b, hh, i, j, *r)[2])),
        ]
        ops += [arrays.q_seg[:, :, None], arrays.kv_seg[:, None, :]]
    return in_specs, ops


def _iota(shape: tuple[int, int], dim: int) -> Array:
    return lax.broadcasted_iota(jnp.int32, shape, dim)


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, st: pc.Static):
    plan, bq, bk = st.plan, st.bq, st.bk
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), refs = pc.split_refs(
        plan, refs, scalars_first=True
    )
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk = st.sp // bk
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = plan.kv_blocks(sc, q0, bq, bk, st.sp)
    dv = acc_ref.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    def update(masked: bool):
        kj, vj = k_ref[...], v_ref[...]
        if masked:  # (keys past the bounds get -inf logits; only dq needs them zeroed)
            (vj,) = _hide_past(st, sc, k0, vj)
        s, _ = _logits(st, q_ref[...], kj)
        if masked:
            s = _mask(
                st, sc, s, q0 + _iota((bq, bk), 0), k0 + _iota((bq, bk), 1), qseg_ref, kvseg_ref
            )
        m_prev, l_prev = m_ref[...], l_ref[...]
        m_new, m_use, alpha = pc.rescale(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.exp2(s - _lanes(m_use, bk) - st.shift)
        m_ref[...] = m_new
        l_ref[...] = alpha * l_prev + p.sum(axis=1, keepdims=True)
        acc_ref[...] = acc_ref[...] * _lanes(alpha, dv) + _dot(p.astype(vj.dtype), vj)

    _run_step(st, im.in_range(j, lo, hi), im.in_range(j, f_lo, f_hi), update)

    @pl.when(j == nk - 1)
    def _finish():
        valid = (q0 + _iota((bq, LANES), 0) < sc.q_len) if plan.q_len else None
        widen = lambda x: _lanes(x, dv)
        out, lse2 = pc.normalize(acc_ref[...], m_ref[...], l_ref[...], widen, valid, st.shift)
        o_ref[...] = out.astype(o_ref.dtype)
        lse_ref[...] = jnp.transpose(lse2)[:1, :]  # lane-dense [1, bq]


def _forward(st: pc.Static, q, k, v, arrays: pc.MaskArrays):
    nb, n, tp, h = q.shape
    sp, dv = k.shape[2], v.shape[-1]
    bq, bk, plan = st.bq, st.bk, st.plan
    nq, nk = tp // bq, sp // bk
    in_specs, ops = _query_major_specs(st, q, k, v, arrays, bq, bk)
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


def _dkv_kernel(*refs, st: pc.Static):
    plan, bq, bk = st.plan, st.bq_dkv, st.bk_dkv
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), refs = pc.split_refs(
        plan, refs, scalars_first=True
    )
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    b, j, r = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nq = st.tp // bq
    i = lax.rem(r, jnp.int32(nq))  # the sequential axis walks (group head, query block)
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = plan.q_blocks(sc, k0, bk, bq, st.tp, st.sp)

    @pl.when(r == 0)
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    def update(masked: bool):
        qi, kj, vj, doi = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        if masked:
            (vj,) = _hide_past(st, sc, k0, vj)
        s, th = _logits(st, kj, qi)  # [bk, bq]: keys on sublanes, queries on lanes
        if masked:
            s = _mask(
                st, sc, s, q0 + _iota((bk, bq), 1), k0 + _iota((bk, bq), 0), qseg_ref, kvseg_ref
            )
        p = jnp.exp2(s - lse_ref[...])  # lse row [1, bq] broadcast along sublanes
        dv_acc[...] += _dot(p.astype(doi.dtype), doi)
        ds = pc.dlogits(st, p, _dot(vj, doi, tb=True) - delta_ref[...], th)
        dk_acc[...] += _dot(ds.astype(qi.dtype), qi)

    _run_step(st, im.in_range(i, lo, hi), im.in_range(i, f_lo, f_hi), update)

    @pl.when(r == st.groups * nq - 1)
    def _finish():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _dq_kernel(*refs, st: pc.Static):
    plan, bq, bk = st.plan, st.bq_dq, st.bk_dq
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), refs = pc.split_refs(
        plan, refs, scalars_first=True
    )
    do_ref, lse_ref, delta_ref, dq_ref, dq_acc, lse_col, delta_col = refs
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    nk = st.sp // bk
    sc = _scalars(plan, sc_refs, b)
    q0, k0 = i * bq, j * bk
    lo, f_lo, f_hi, hi = plan.kv_blocks(sc, q0, bq, bk, st.sp)

    @pl.when(j == 0)
    def _init():
        dq_acc[...] = jnp.zeros(dq_acc.shape, jnp.float32)
        # The per-row values arrive lane-dense [1, bq]; one transpose per query block makes
        # them lane-replicated columns [bq, 128].
        lse_col[...] = jnp.transpose(jnp.broadcast_to(lse_ref[...], (LANES, bq)))
        delta_col[...] = jnp.transpose(jnp.broadcast_to(delta_ref[...], (LANES, bq)))

    def update(masked: bool):
        qi, kj, vj, doi = q_ref[...], k_ref[...], v_ref[...], do_ref[...]
        if masked:
            kj, vj = _hide_past(st, sc, k0, kj, vj)
        s, th = _logits(st, qi, kj)
        if masked:
            s = _mask(
                st, sc, s, q0 + _iota((bq, bk), 0), k0 + _iota((bq, bk), 1), qseg_ref, kvseg_ref
            )
        p = jnp.exp2(s - _lanes(lse_col[...], bk))
        ds = pc.dlogits(st, p, _dot(doi, vj, tb=True) - _lanes(delta_col[...], bk), th)
        dq_acc[...] += _dot(ds.astype(kj.dtype), kj)

    _run_step(st, im.in_range(j, lo, hi), im.in_range(j, f_lo, f_hi), update)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def _backward(st: pc.Static, q, k, v, arrays, g_out, lse, delta):
    nb, n, tp, h = q.shape
    kh, sp, dv = k.shape[1], k.shape[2], v.shape[-1]
    g, plan = st.groups, st.plan
    scalars = arrays.scalars(plan)
    compiler_params = _compiler_params(st)

    # dK/dV: grid (batch, kv head, key block, group head x query block).
    bq, bk = st.bq_dkv, st.bk_dkv
    nq, nk = tp // bq, sp // bk

    def q_of(b, hh, j, r, sc_refs):
        lo, _, _, hi = plan.q_blocks(_scalars(plan, sc_refs, b), j * bk, bk, bq, tp, sp)
        head = hh * g + im.fdiv(r, nq)
        return head, _clamp_block(lax.rem(r, jnp.int32(nq)), lo, hi, nq)

    def q_map(b, hh, j, r, *sc_refs):
        head, i = q_of(b, hh, j, r, sc_refs)
        return (b, head, i, 0)

    def row_map(b, hh, j, r, *sc_refs):
        head, i = q_of(b, hh, j, r, sc_refs)
        return (b, head, 0, i)

    def qseg_map(b, hh, j, r, *sc_refs):
        return (b, 0, q_of(b, hh, j, r, sc_refs)[1])

    kv_map = lambda b, hh, j, r, *_: (b, hh, j, 0)
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
    ops += [g_out, lse, delta]
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

    q_map_dq = lambda b, hh, i, j, *_: (b, hh, i, 0)
    row_map_dq = lambda b, hh, i, j, *_: (b, hh, 0, i)
    in_specs, ops = _query_major_specs(st, q, k, v, arrays, bq, bk)
    in_specs += [
        pl.BlockSpec((None, None, bq, dv), q_map_dq),
        pl.BlockSpec((None, None, 1, bq), row_map_dq),
        pl.BlockSpec((None, None, 1, bq), row_map_dq),
    ]
    ops += [g_out, lse, delta]
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
# The custom_vjp and what the driver needs.

SUPPORTS = pc.SUPPORTS
_attention = pc.flash_vjp(_forward, _backward, rows="bntd,bntd->bnt")
_KERNEL = pc.Kernel(fit=_fit, pack=_pack, unpack=_unpack, attention=_attention)
