"""Flash attention as Pallas kernels for NVIDIA GPUs (Triton lowering), forward and backward.

One launch covers the whole call: the grid is ``(query blocks, batch, heads)`` and each program
keeps one ``[block_q, D]`` query tile in registers while it loops (``lax.fori_loop``, pipelined
by Triton over ``num_stages``) over the key/value blocks its mask can see, with the online
softmax in float32. The loop is split in three by :func:`_pallas_common.kv_blocks`: masked
blocks on the left edge, unmasked blocks in the middle, masked blocks on the right edge, so a
causal or windowed call neither visits empty blocks nor evaluates the mask on full ones.

K/V are indexed by ``head // group`` in the block specs, so grouped-query attention reads each
K/V head in place and is never repeated. The backward pass is two kernels: dK/dV with a grid
over key blocks (looping over the query blocks and over the query heads of the group, so GQA
gradients are summed in registers), and dQ with a grid over query blocks. Numerics follow
:mod:`jattn.kernels.flash`: base-2 logits (``log2 e`` folded into the scale), softcap before
masking, ``-inf`` for masked entries with a guard for empty rows (zeros, ``lse = -inf``), and the
log-sum-exp returned in natural units.

Off a GPU the same kernels run in Pallas interpret mode, which is how CI checks them.
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
from jax.experimental.pallas import triton as plgpu

from jattn.kernels import _pallas_common as pc
from jattn.kernels.common import KernelOutput
from jattn.plan import Plan

Array = jax.Array

# Triton's dot needs every dimension >= 16; loads and stores need power-of-two sizes.
_MIN_DOT = 16

SUPPORTS = pc.SUPPORTS


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig:
    """Tiling and pipelining of the Pallas GPU kernels.

    ``block_q`` x ``block_k`` is the score tile of the forward pass (and of the dQ pass with
    ``block_q_dq`` x ``block_k_dq``); the dK/dV pass holds ``block_k_dkv`` keys and walks the
    queries ``block_q_dkv`` at a time. Block sizes are powers of two (Triton's tiles); on a GPU
    they are at least 16 (``tl.dot``). Blocks larger than the (padded) sequence are shrunk to it.
    ``num_warps``/``num_stages`` are Triton's launch parameters for the forward pass, and the
    ``_bwd`` ones for the backward kernels (None: the forward's).
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int | None = None
    num_stages_bwd: int | None = None

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> PallasGpuConfig:
        """The heuristic default for a call on ``backend``."""
        q_shape = (*plan.batch_shape, plan.q_seq_len, plan.num_heads, plan.head_dim)
        k_shape = (*plan.batch_shape, plan.kv_seq_len, plan.num_kv_heads, plan.head_dim)
        return default_config(q_shape, k_shape, plan.dtype, backend, plan.features)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_bwd") and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"PallasGpuConfig.{f.name} must be a positive int, got {v!r}")
            if f.name.startswith("block_") and v & (v - 1):
                raise ValueError(
                    f"PallasGpuConfig.{f.name} must be a power of two (Triton tiles), got {v}"
                )
        if self.num_warps & (self.num_warps - 1):
            raise ValueError(
                f"PallasGpuConfig.num_warps must be a power of two, got {self.num_warps}"
            )


# Defaults by GPU generation and head dim, (fwd q, fwd k, dkv q, dkv k, dq q, dq k, warps,
# stages). The forward tiles follow the FlashAttention-2 Triton kernels: on Hopper and Ampere
# data-centre parts (228/164 KiB of shared memory per SM) 128-row query tiles with 3 stages;
# head dim 256 halves the query tile, whose float32 accumulator would otherwise spill
# registers. Educated guesses, not measured (no GPU was at hand): tune with `config=`.
_DEFAULTS: dict[str, dict[int, tuple[int, ...]]] = {
    "hopper": {
        64: (128, 128, 64, 128, 128, 64, 8, 3),
        128: (128, 128, 64, 128, 128, 64, 8, 3),
        256: (64, 64, 32, 64, 64, 32, 4, 2),
    },
    "ampere": {
        64: (128, 64, 64, 128, 128, 64, 4, 3),
        128: (128, 64, 64, 64, 64, 64, 8, 3),
        256: (64, 32, 32, 32, 32, 32, 4, 2),
    },
    # Consumer, Turing, Ada and unknown parts: ~100 KiB of shared memory per SM.
    "small": {
        64: (128, 64, 64, 64, 64, 64, 4, 2),
        128: (64, 64, 32, 64, 64, 32, 4, 2),
        256: (64, 32, 16, 32, 32, 16, 4, 1),
    },
}


def _generation(device_kind: str) -> str:
    kind = device_kind.upper()
    if any(x in kind for x in ("H100", "H200", "H800", "H20", "GH200", "B200", "B100", "GB200")):
        return "hopper"
    if any(x in kind for x in ("A100", "A800", "A30")):
        return "ampere"
    return "small"


def default_config(
    q_shape, k_shape, dtype, backend: str, features: frozenset[str] = frozenset()
) -> PallasGpuConfig:
    """The heuristic default for the GPU ``jax.devices()[0]`` (by ``device_kind``) and the head
    dim of ``q_shape``. Off a GPU (interpret mode) small tiles keep the emulation quick."""
    del k_shape
    if backend != "gpu":
        return PallasGpuConfig(32, 32, 32, 32, 32, 32, 4, 1)
    head_dim = max(q_shape[-1], 64)
    table = _DEFAULTS[_generation(jax.devices()[0].device_kind)]
    key = min((d for d in table if d >= head_dim), default=256)
    bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq, warps, stages = table[key]
    if jnp.dtype(dtype).itemsize == 4:  # float32 tiles take twice the registers and memory
        half = lambda b: max(_MIN_DOT, b // 2)  # noqa: E731
        bk, bk_dkv, bq_dq = half(bk), half(bk_dkv), half(bq_dq)
    return PallasGpuConfig(bq, bk, bq_dkv, bk_dkv, bq_dq, bk_dq, warps, stages)


@dataclasses.dataclass(frozen=True)
class _Static:
    """The hashable part of a call, fixed at trace time."""

    scale: float
    softcap: float | None
    plan: pc.MaskPlan
    groups: int  # query heads per K/V head
    tp: int  # padded query length (a multiple of every query block)
    sp: int  # padded key length
    bq: int
    bk: int
    bq_dkv: int
    bk_dkv: int
    bq_dq: int
    bk_dq: int
    num_warps: int
    num_stages: int
    num_warps_bwd: int
    num_stages_bwd: int
    interpret: bool

    @property
    def reverse(self) -> bool:
        # Causal-like masks: late query blocks have the most work; launching them first
        # evens out the tail of the grid.
        return self.plan.right is not None or self.plan.offset


def pallas_gpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``); the mask leaves
    of ``plan`` are in :func:`jattn.attention`'s canonical ``[*B', K', G', ...]`` layout."""
    interpret = _interpret()
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    nb = math.prod(batch)
    cfg = plan.config

    low = 1 if interpret else _MIN_DOT
    # A block never exceeds the sequence rounded up to a power of two.
    fit_q = lambda b: min(b, max(low, pc.next_pow2(t)))  # noqa: E731
    fit_k = lambda b: min(b, max(low, pc.next_pow2(s)))  # noqa: E731
    bq, bq_dkv, bq_dq = fit_q(cfg.block_q), fit_q(cfg.block_q_dkv), fit_q(cfg.block_q_dq)
    bk, bk_dkv, bk_dq = fit_k(cfg.block_k), fit_k(cfg.block_k_dkv), fit_k(cfg.block_k_dq)
    if not interpret:
        for name, b in [
            ("block_q", bq),
            ("block_k", bk),
            ("block_q_dkv", bq_dkv),
            ("block_k_dkv", bk_dkv),
            ("block_q_dq", bq_dq),
            ("block_k_dq", bk_dq),
        ]:
            if b < _MIN_DOT:
                raise ValueError(f"PallasGpuConfig.{name}={b} must be >= {_MIN_DOT} on a GPU")
    # Powers of two: the largest block is a multiple of the others.
    tp = pc.round_up(t, max(bq, bq_dkv, bq_dq))
    sp = pc.round_up(s, max(bk, bk_dkv, bk_dq))
    hp, hvp = max(low, pc.next_pow2(h)), max(low, pc.next_pow2(hv))

    qp = pc.pad_to(pc.pad_to(q.reshape(nb, t, n, h), 1, tp), 3, hp)
    kp = pc.pad_to(pc.pad_to(k.reshape(nb, s, kh, h), 1, sp), 3, hp)
    vp = pc.pad_to(pc.pad_to(v.reshape(nb, s, kh, hv), 1, sp), 3, hvp)
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
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        num_warps_bwd=cfg.num_warps_bwd or cfg.num_warps,
        num_stages_bwd=cfg.num_stages_bwd or cfg.num_stages,
        interpret=interpret,
    )
    out, lse2 = _attention(st, qp, kp, vp, arrays)
    out = out[:, :t, :, :hv].reshape(*batch, t, n, hv)
    lse = None
    if plan.return_lse:
        lse = (lse2[:, :, :t] * pc.LN2).reshape(*batch, n, t)
    return KernelOutput(out, lse, None)


def _interpret() -> bool:
    """Whether to emulate the kernels (off a GPU). Tests that lower for CUDA on a CPU-only
    machine patch this to False."""
    return jax.default_backend() != "gpu"


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _scalars(plan: pc.MaskPlan, refs) -> pc.Scalars:
    return pc.Scalars(**{name: ref[()] for name, ref in zip(plan.scalar_names, refs, strict=True)})


def _split_refs(plan: pc.MaskPlan, refs, n_before: int):
    """``refs`` -> (the first ``n_before``, scalar refs, (q_seg, kv_seg) or Nones, the rest)."""
    head, rest = refs[:n_before], refs[n_before:]
    ns = len(plan.scalar_names)
    sc_refs, rest = rest[:ns], rest[ns:]
    seg = (None, None)
    if plan.segments:
        seg, rest = rest[:2], rest[2:]
    return head, sc_refs, seg, rest


def _dot(a: Array, b: Array, ta: bool = False, tb: bool = False) -> Array:
    """``a @ b`` (``a`` transposed if ``ta``, ``b`` if ``tb``) with float32 accumulation;
    Triton folds the transposes into the MMA operand layout."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _logits(st: _Static, qi: Array, kj: Array):
    """Base-2 logits ``[bq, bk]`` of a tile, and with softcap the tanh its derivative needs."""
    s = _dot(qi, kj, tb=True)
    s = s * (st.scale * pc.LOG2E)
    th = None
    if st.softcap is not None:
        c2 = st.softcap * pc.LOG2E
        th = jnp.tanh(s * (1.0 / c2))
        s = c2 * th
    return s, th


def _mask(st: _Static, sc, s, rows, cols, q_ids, kv_ids):
    ok = pc.visible(
        st.plan,
        sc,
        rows[:, None],
        cols[None, :],
        None if q_ids is None else q_ids[:, None],
        None if kv_ids is None else kv_ids[None, :],
    )
    return s if ok is None else jnp.where(ok, s, -jnp.inf)


def _run_blocks(st: _Static, bounds, step, carry, overlap=None):
    """Runs ``step(j, carry, masked)`` over ``[lo, f_lo)`` masked, ``[f_lo, f_hi)`` unmasked
    and ``[f_hi, hi)`` masked. With segments every block is masked and a block whose id ranges
    do not meet (``overlap(j)`` False) is skipped."""
    lo, f_lo, f_hi, hi = (jnp.asarray(b, jnp.int32) for b in bounds)
    if not st.plan.masks_anything:
        return lax.fori_loop(lo, hi, lambda j, c: step(j, c, False), carry)
    if st.plan.segments:

        def seg_step(j, c):
            return lax.cond(overlap(j), lambda c: step(j, c, True), lambda c: c, c)

        return lax.fori_loop(lo, hi, seg_step, carry)
    carry = lax.fori_loop(lo, f_lo, lambda j, c: step(j, c, True), carry)
    carry = lax.fori_loop(f_lo, f_hi, lambda j, c: step(j, c, False), carry)
    return lax.fori_loop(f_hi, hi, lambda j, c: step(j, c, True), carry)


def _iota(n: int) -> Array:
    return lax.iota(jnp.int32, n)


def _params(st: _Static, bwd: bool):
    if bwd:
        return plgpu.CompilerParams(num_warps=st.num_warps_bwd, num_stages=st.num_stages_bwd)
    return plgpu.CompilerParams(num_warps=st.num_warps, num_stages=st.num_stages)


def _mask_specs(st: _Static, arrays: pc.MaskArrays, q_spec, kv_spec):
    """Block specs and operands of the mask arrays; the index maps take ``(qi, b, h)``-like
    grid indices with the batch second."""
    specs, ops = [], []
    for x in arrays.scalars(st.plan):
        specs.append(pl.BlockSpec((None,), lambda i, b, h: (b,)))
        ops.append(x)
    if st.plan.segments:
        specs += [q_spec, kv_spec]
        ops += [arrays.q_seg, arrays.kv_seg]
    return specs, ops


def _qblock(st: _Static, i, nq: int):
    return (nq - 1 - i) if st.reverse else i


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, st: _Static):
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), (o_ref, lse_ref) = _split_refs(
        st.plan, refs, 3
    )
    bq, bk = st.bq, st.bk
    q0 = _qblock(st, pl.program_id(0), st.tp // bq) * bq
    sc = _scalars(st.plan, sc_refs)
    qi = q_ref[...]
    rows = q0 + _iota(bq)
    q_ids = None if qseg_ref is None else qseg_ref[...]

    def step(j, carry, masked):
        m, l, acc = carry
        k0 = pl.multiple_of(j * bk, bk)
        kj = k_ref[pl.ds(k0, bk), :]
        vj = v_ref[pl.ds(k0, bk), :]
        s, _ = _logits(st, qi, kj)
        if masked:
            kv_ids = None if kvseg_ref is None else kvseg_ref[pl.ds(k0, bk)]
            s = _mask(st, sc, s, rows, k0 + _iota(bk), q_ids, kv_ids)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row with nothing visible yet
        alpha = jnp.exp2(m - m_use)
        p = jnp.exp2(s - m_use[:, None])
        l = l * alpha + p.sum(axis=1)
        return m_new, l, acc * alpha[:, None] + _dot(p.astype(vj.dtype), vj)

    def overlap(j):
        kv_ids = kvseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)]
        return (q_ids.min() <= kv_ids.max()) & (kv_ids.min() <= q_ids.max())

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    )
    bounds = pc.kv_blocks(st.plan, sc, q0, bq, bk, st.sp)
    m, l, acc = _run_blocks(st, bounds, step, init, overlap)
    safe_l = jnp.where(l > 0.0, l, 1.0)
    out = acc / safe_l[:, None]
    lse2 = jnp.where(l > 0.0, m + jnp.log2(safe_l), -jnp.inf)
    if st.plan.q_len:  # padding rows: zeros, and -inf so the backward gives them nothing
        valid = rows < sc.q_len
        out = jnp.where(valid[:, None], out, 0.0)
        lse2 = jnp.where(valid, lse2, -jnp.inf)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def _forward(st: _Static, q, k, v, arrays: pc.MaskArrays):
    nb, tp, n, hp = q.shape
    sp, hvp = k.shape[1], v.shape[-1]
    nq, g = tp // st.bq, st.groups
    qb = functools.partial(_qblock, st, nq=nq)
    mask_specs, mask_ops = _mask_specs(
        st,
        arrays,
        pl.BlockSpec((None, st.bq), lambda i, b, h: (b, qb(i))),
        pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)),
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, st=st),
        grid=(nq, nb, n),
        in_specs=[
            pl.BlockSpec((None, st.bq, None, hp), lambda i, b, h: (b, qb(i), h, 0)),
            pl.BlockSpec((None, sp, None, hp), lambda i, b, h: (b, 0, pc.fdiv(h, g), 0)),
            pl.BlockSpec((None, sp, None, hvp), lambda i, b, h: (b, 0, pc.fdiv(h, g), 0)),
            *mask_specs,
        ],
        out_specs=[
            pl.BlockSpec((None, st.bq, None, hvp), lambda i, b, h: (b, qb(i), h, 0)),
            pl.BlockSpec((None, None, st.bq), lambda i, b, h: (b, h, qb(i))),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((nb, tp, n, hvp), q.dtype),
            jax.ShapeDtypeStruct((nb, n, tp), jnp.float32),
        ],
        compiler_params=_params(st, bwd=False),
        interpret=st.interpret,
        name="jattn_pallas_gpu_fwd",
    )(q, k, v, *mask_ops)


# ---------------------------------------------------------------------------------------------
# Backward: dK/dV over key blocks, dQ over query blocks, both recomputing p from the lse.


def _dkv_kernel(*refs, st: _Static):
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), rest = _split_refs(st.plan, refs, 3)
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    bq, bk = st.bq_dkv, st.bk_dkv
    k0 = pl.program_id(0) * bk
    sc = _scalars(st.plan, sc_refs)
    kj, vj = k_ref[...], v_ref[...]
    cols = k0 + _iota(bk)
    kv_ids = None if kvseg_ref is None else kvseg_ref[...]

    def head(g, carry):
        def step(i, carry, masked):
            dk, dv = carry
            q0 = pl.multiple_of(i * bq, bq)
            qi = q_ref[pl.ds(q0, bq), g, :]
            doi = do_ref[pl.ds(q0, bq), g, :]
            lse = lse_ref[g, pl.ds(q0, bq)]
            delta = delta_ref[g, pl.ds(q0, bq)]
            s, th = _logits(st, qi, kj)
            if masked:
                q_ids = None if qseg_ref is None else qseg_ref[pl.ds(q0, bq)]
                s = _mask(st, sc, s, q0 + _iota(bq), cols, q_ids, kv_ids)
            p = jnp.exp2(s - lse[:, None])
            dv = dv + _dot(p.astype(doi.dtype), doi, ta=True)
            dp = _dot(doi, vj, tb=True)
            ds = p * (dp - delta[:, None])
            if th is not None:
                ds = ds * (1.0 - th * th)
            ds = ds * st.scale
            return dk + _dot(ds.astype(qi.dtype), qi, ta=True), dv

        def overlap(i):
            q_ids = qseg_ref[pl.ds(pl.multiple_of(i * bq, bq), bq)]
            return (q_ids.min() <= kv_ids.max()) & (kv_ids.min() <= q_ids.max())

        bounds = pc.q_blocks(st.plan, sc, k0, bk, bq, st.tp, st.sp)
        return _run_blocks(st, bounds, step, carry, overlap)

    init = (
        jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dk, dv = head(0, init) if st.groups == 1 else lax.fori_loop(0, st.groups, head, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: _Static):
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), rest = _split_refs(st.plan, refs, 3)
    do_ref, lse_ref, delta_ref, dq_ref = rest
    bq, bk = st.bq_dq, st.bk_dq
    q0 = _qblock(st, pl.program_id(0), st.tp // bq) * bq
    sc = _scalars(st.plan, sc_refs)
    qi, doi, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    rows = q0 + _iota(bq)
    q_ids = None if qseg_ref is None else qseg_ref[...]

    def step(j, dq, masked):
        k0 = pl.multiple_of(j * bk, bk)
        kj = k_ref[pl.ds(k0, bk), :]
        vj = v_ref[pl.ds(k0, bk), :]
        s, th = _logits(st, qi, kj)
        if masked:
            kv_ids = None if kvseg_ref is None else kvseg_ref[pl.ds(k0, bk)]
            s = _mask(st, sc, s, rows, k0 + _iota(bk), q_ids, kv_ids)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(doi, vj, tb=True)
        ds = p * (dp - delta[:, None])
        if th is not None:
            ds = ds * (1.0 - th * th)
        ds = ds * st.scale
        return dq + _dot(ds.astype(kj.dtype), kj)

    def overlap(j):
        kv_ids = kvseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)]
        return (q_ids.min() <= kv_ids.max()) & (kv_ids.min() <= q_ids.max())

    bounds = pc.kv_blocks(st.plan, sc, q0, bq, bk, st.sp)
    dq = _run_blocks(st, bounds, step, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32), overlap)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(st: _Static, q, k, v, arrays, out, lse2, g_out, g_lse2):
    nb, tp, n, hp = q.shape
    sp, kh, hvp = k.shape[1], k.shape[2], v.shape[-1]
    g = st.groups
    # dL/dlogits = p * (dp - delta), delta = rowsum(dO * O) minus the lse cotangent: one cheap
    # fused XLA reduction, not worth a kernel.
    delta = jnp.einsum("btnd,btnd->bnt", g_out.astype(jnp.float32), out.astype(jnp.float32))
    if g_lse2 is not None:
        delta = delta - g_lse2
    # Rows with no visible key (lse = -inf) get p = 0 everywhere.
    lse_use = jnp.where(lse2 == -jnp.inf, jnp.inf, lse2)

    nk = sp // st.bk_dkv
    dkv_mask_specs, dkv_mask_ops = _mask_specs(
        st,
        arrays,
        pl.BlockSpec((None, tp), lambda j, b, h: (b, 0)),
        pl.BlockSpec((None, st.bk_dkv), lambda j, b, h: (b, j)),
    )
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, st=st),
        grid=(nk, nb, kh),
        in_specs=[
            pl.BlockSpec((None, tp, g, hp), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, st.bk_dkv, None, hp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, st.bk_dkv, None, hvp), lambda j, b, h: (b, j, h, 0)),
            *dkv_mask_specs,
            pl.BlockSpec((None, tp, g, hvp), lambda j, b, h: (b, 0, h, 0)),
            pl.BlockSpec((None, g, tp), lambda j, b, h: (b, h, 0)),
            pl.BlockSpec((None, g, tp), lambda j, b, h: (b, h, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, st.bk_dkv, None, hp), lambda j, b, h: (b, j, h, 0)),
            pl.BlockSpec((None, st.bk_dkv, None, hvp), lambda j, b, h: (b, j, h, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(st, bwd=True),
        interpret=st.interpret,
        name="jattn_pallas_gpu_dkv",
    )(q, k, v, *dkv_mask_ops, g_out, lse_use, delta)

    nq = tp // st.bq_dq
    qb = functools.partial(_qblock, st, nq=nq)
    dq_mask_specs, dq_mask_ops = _mask_specs(
        st,
        arrays,
        pl.BlockSpec((None, st.bq_dq), lambda i, b, h: (b, qb(i))),
        pl.BlockSpec((None, sp), lambda i, b, h: (b, 0)),
    )
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, st=st),
        grid=(nq, nb, n),
        in_specs=[
            pl.BlockSpec((None, st.bq_dq, None, hp), lambda i, b, h: (b, qb(i), h, 0)),
            pl.BlockSpec((None, sp, None, hp), lambda i, b, h: (b, 0, pc.fdiv(h, g), 0)),
            pl.BlockSpec((None, sp, None, hvp), lambda i, b, h: (b, 0, pc.fdiv(h, g), 0)),
            *dq_mask_specs,
            pl.BlockSpec((None, st.bq_dq, None, hvp), lambda i, b, h: (b, qb(i), h, 0)),
            pl.BlockSpec((None, None, st.bq_dq), lambda i, b, h: (b, h, qb(i))),
            pl.BlockSpec((None, None, st.bq_dq), lambda i, b, h: (b, h, qb(i))),
        ],
        out_specs=pl.BlockSpec((None, st.bq_dq, None, hp), lambda i, b, h: (b, qb(i), h, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(st, bwd=True),
        interpret=st.interpret,
        name="jattn_pallas_gpu_dq",
    )(q, k, v, *dq_mask_ops, g_out, lse_use, delta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# custom_vjp wiring.


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, arrays: Any):
    return _forward(st, q, k, v, arrays)


def _attention_fwd(st, q, k, v, arrays):
    out, lse2 = _forward(st, q, k, v, arrays)
    return (out, lse2), (q, k, v, arrays, out, lse2)


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
