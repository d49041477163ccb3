"""Flash attention as Pallas kernels for NVIDIA GPUs (Triton lowering), forward and backward.

One launch covers the whole call: the grid is ``(query blocks, batch, heads)`` and each program
keeps one ``[block_q, D]`` query tile in registers while it loops (``lax.fori_loop``, pipelined
by Triton over ``num_stages``) over the key/value blocks its mask can see, with the online
softmax in float32. The loop is split in three by :meth:`jattn.masks.MaskPlan.kv_blocks`: masked
blocks on the left edge, unmasked blocks in the middle, masked blocks on the right edge, so a
causal or windowed call neither visits empty blocks nor evaluates the mask on full ones.

K/V are indexed by ``head // group`` in the block specs, so grouped-query attention reads each
K/V head in place and is never repeated. The backward pass is two kernels: dK/dV with a grid
over key blocks (looping over the query blocks and over the query heads of the group, so GQA
gradients are summed in registers), and dQ with a grid over query blocks. Numerics follow
:mod:`jattn.kernels.flash`: base-2 logits (``log2 e`` folded into the scale), softcap before
masking, ``-inf`` for masked entries with a guard for empty rows (zeros, ``lse = -inf``), and the
log-sum-exp returned in natural units.

Off a GPU (:func:`_interpret`) the kernels run in Pallas interpret mode: CI checks them that
way, and by lowering them through Triton.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jattn import _intmath as im
from jattn.kernels import _pallas_common as pc
from jattn.kernels._tuning import Tuning, knob
from jattn.kernels.common import KernelOutput
from jattn.plan import Plan

Array = jax.Array

# Triton's dot needs every dimension >= 16; loads and stores need power-of-two sizes.
_MIN_DOT = 16


@dataclasses.dataclass(frozen=True)
class PallasGpuConfig(Tuning):
    """Tiling and pipelining of the Pallas GPU kernels.

    ``block_q`` x ``block_k`` is the score tile of the forward pass (and of the dQ pass with
    ``block_q_dq`` x ``block_k_dq``); the dK/dV pass holds ``block_k_dkv`` keys and walks the
    queries ``block_q_dkv`` at a time. Block sizes are powers of two (Triton's tiles); on a GPU
    they are at least 16 (``tl.dot``). Blocks larger than the (padded) sequence are shrunk to it.
    ``num_warps``/``num_stages`` are Triton's launch parameters for the forward pass, and the
    ``_bwd`` ones for the backward kernels (None: the forward's).
    """

    block_q: int = knob(128, pow2=True, why="Triton tiles")
    block_k: int = knob(64, pow2=True, why="Triton tiles")
    block_q_dkv: int = knob(64, pow2=True, why="Triton tiles")
    block_k_dkv: int = knob(64, pow2=True, why="Triton tiles")
    block_q_dq: int = knob(64, pow2=True, why="Triton tiles")
    block_k_dq: int = knob(64, pow2=True, why="Triton tiles")
    num_warps: int = knob(4, pow2=True)
    num_stages: int = knob(2)
    num_warps_bwd: int | None = knob(None, pow2=True)
    num_stages_bwd: int | None = knob(None)

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> PallasGpuConfig:
        """The heuristic default for a call on ``backend``: by the generation of the GPU
        ``jax.devices()[0]`` and the head dim, from :data:`_DEFAULTS`. Off a GPU (interpret
        mode) small tiles keep the emulation quick."""
        if backend != "gpu":
            return cls(**dict.fromkeys(pc.BLOCKS, 32), num_stages=1)
        table = _DEFAULTS[_generation(jax.devices()[0].device_kind)]
        head_dim = max(plan.head_dim, 64)
        cfg = table[min((d for d in table if d >= head_dim), default=256)]
        if plan.dtype.itemsize == 4:  # float32 tiles take twice the registers and memory
            half = lambda b: max(_MIN_DOT, b // 2)
            cfg = dataclasses.replace(
                cfg,
                block_k=half(cfg.block_k),
                block_k_dkv=half(cfg.block_k_dkv),
                block_q_dq=half(cfg.block_q_dq),
            )
        return cfg


# Defaults by GPU generation and head dim. The forward tiles follow the FlashAttention-2 Triton
# kernels: on Hopper and Ampere data-centre parts (228/164 KiB of shared memory per SM) 128-row
# query tiles with 3 stages; head dim 256 halves the query tile, whose float32 accumulator
# would otherwise spill registers. Educated guesses, not measured (no GPU was at hand): tune
# with `config=`.
# fmt: off
_DEFAULTS: dict[str, dict[int, PallasGpuConfig]] = {
    "hopper": {
        64: PallasGpuConfig(block_q=128, block_k=128, block_q_dkv=64, block_k_dkv=128,
                            block_q_dq=128, block_k_dq=64, num_warps=8, num_stages=3),
        128: PallasGpuConfig(block_q=128, block_k=128, block_q_dkv=64, block_k_dkv=128,
                             block_q_dq=128, block_k_dq=64, num_warps=8, num_stages=3),
        256: PallasGpuConfig(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=64,
                             block_q_dq=64, block_k_dq=32, num_warps=4, num_stages=2),
    },
    "ampere": {
        64: PallasGpuConfig(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=128,
                            block_q_dq=128, block_k_dq=64, num_warps=4, num_stages=3),
        128: PallasGpuConfig(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                             block_q_dq=64, block_k_dq=64, num_warps=8, num_stages=3),
        256: PallasGpuConfig(block_q=64, block_k=32, block_q_dkv=32, block_k_dkv=32,
                             block_q_dq=32, block_k_dq=32, num_warps=4, num_stages=2),
    },
    # Consumer, Turing, Ada and unknown parts: ~100 KiB of shared memory per SM.
    "small": {
        64: PallasGpuConfig(block_q=128, block_k=64, block_q_dkv=64, block_k_dkv=64,
                            block_q_dq=64, block_k_dq=64, num_warps=4, num_stages=2),
        128: PallasGpuConfig(block_q=64, block_k=64, block_q_dkv=32, block_k_dkv=64,
                             block_q_dq=64, block_k_dq=32, num_warps=4, num_stages=2),
        256: PallasGpuConfig(block_q=64, block_k=32, block_q_dkv=16, block_k_dkv=32,
                             block_q_dq=32, block_k_dq=16, num_warps=4, num_stages=1),
    },
}
# fmt: on


def _generation(device_kind: str) -> str:
    kind = device_kind.upper()
    if any(x in kind for x in ("H100", "H200", "H800", "H20", "GH200", "B200", "B100", "GB200")):
        return "hopper"
    if any(x in kind for x in ("A100", "A800", "A30")):
        return "ampere"
    return "small"


def pallas_gpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``); the mask leaves
    of ``plan`` are in :func:`jattn.attention`'s canonical ``[*B', K', G', ...]`` layout."""
    return pc.launch(q, k, v, plan, _KERNEL, interpret=_interpret())


def _interpret() -> bool:
    """Whether to emulate the kernels (off a GPU). Tests that lower for CUDA on a CPU-only
    machine patch this to False."""
    return jax.default_backend() != "gpu"


def _fit(cfg: PallasGpuConfig, field: str, length: int, interpret: bool) -> int:
    """A block never exceeds the sequence rounded up to a power of two; on a GPU it is at
    least 16 (``tl.dot``)."""
    low = 1 if interpret else _MIN_DOT
    b = min(getattr(cfg, field), max(low, pc.next_pow2(length)))
    if b < low:
        raise ValueError(f"PallasGpuConfig.{field}={b} must be >= {_MIN_DOT} on a GPU")
    return b


def _pack(st: pc.Static, q: Array, k: Array, v: Array):
    """``[B, T, N, H]`` as is, sequences padded to the blocks and head dims to powers of two
    (Triton's loads)."""
    low = 1 if st.interpret else _MIN_DOT
    hp, hvp = max(low, pc.next_pow2(q.shape[-1])), max(low, pc.next_pow2(v.shape[-1]))
    return (
        pc.pad_to(pc.pad_to(q, 1, st.tp), 3, hp),
        pc.pad_to(pc.pad_to(k, 1, st.sp), 3, hp),
        pc.pad_to(pc.pad_to(v, 1, st.sp), 3, hvp),
    )


def _unpack(out: Array, t: int, hv: int) -> Array:
    return out[:, :t, :, :hv]


# ---------------------------------------------------------------------------------------------
# Pieces shared by the kernels.


def _reverse(st: pc.Static) -> bool:
    """Causal-like masks: late query blocks have the most work; launching them first evens
    out the tail of the grid."""
    return st.plan.right is not None or st.plan.offset


def _scalars(plan: pc.MaskPlan, refs) -> pc.Scalars:
    return pc.scalars(plan, [ref[()] for ref in refs])


def _dot(a: Array, b: Array, ta: bool = False, tb: bool = False) -> Array:
    """``a @ b`` (``a`` transposed if ``ta``, ``b`` if ``tb``) with float32 accumulation;
    Triton folds the transposes into the MMA operand layout."""
    dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _logits(st: pc.Static, qi: Array, kj: Array):
    """Base-2 logits ``[bq, bk]`` of a tile, and with softcap the tanh its derivative needs."""
    return pc.base2_logits(st, _dot(qi, kj, tb=True))


def _mask(st: pc.Static, sc, s, rows, cols, q_ids, kv_ids):
    return pc.mask_logits(
        st.plan,
        sc,
        s,
        rows[:, None],
        cols[None, :],
        None if q_ids is None else q_ids[:, None],
        None if kv_ids is None else kv_ids[None, :],
    )


def _hide_past(st: pc.Static, sc, cols: Array, *blocks: Array) -> tuple[Array, ...]:
    """Key blocks (keys ``cols`` on the rows) with the keys past the key-side bounds zeroed
    (``MaskPlan.keys_seen``): a zero weight times a NaN stored there would be NaN."""
    seen = st.plan.keys_seen(sc, cols[:, None])
    return blocks if seen is None else tuple(jnp.where(seen, x, 0) for x in blocks)


def _run_blocks(st: pc.Static, bounds, step, carry, overlap=None):
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


def _params(st: pc.Static, bwd: bool):
    cfg = st.config
    if bwd:
        return plgpu.CompilerParams(
            num_warps=cfg.num_warps_bwd or cfg.num_warps,
            num_stages=cfg.num_stages_bwd or cfg.num_stages,
        )
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _mask_specs(st: pc.Static, arrays: pc.MaskArrays, q_spec, kv_spec):
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


def _qblock(st: pc.Static, i, nq: int):
    return (nq - 1 - i) if _reverse(st) else i


# ---------------------------------------------------------------------------------------------
# Forward.


def _fwd_kernel(*refs, st: pc.Static):
    (q_ref, k_ref, v_ref), sc_refs, (qseg_ref, kvseg_ref), (o_ref, lse_ref) = pc.split_refs(
        st.plan, refs, scalars_first=False
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
        if masked:  # (keys past the bounds get -inf logits; only dq needs them zeroed)
            (vj,) = _hide_past(st, sc, k0 + _iota(bk), vj)
        s, _ = _logits(st, qi, kj)
        if masked:
            kv_ids = None if kvseg_ref is None else kvseg_ref[pl.ds(k0, bk)]
            s = _mask(st, sc, s, rows, k0 + _iota(bk), q_ids, kv_ids)
        m_new, m_use, alpha = pc.rescale(m, s.max(axis=1))
        p = jnp.exp2(s - m_use[:, None] - st.shift)
        l = l * alpha + p.sum(axis=1)
        return m_new, l, acc * alpha[:, None] + _dot(p.astype(vj.dtype), vj)

    def overlap(j):
        return pc.ids_overlap(q_ids, kvseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)])

    init = (
        jnp.full((bq,), -jnp.inf, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros((bq, v_ref.shape[-1]), jnp.float32),
    )
    bounds = st.plan.kv_blocks(sc, q0, bq, bk, st.sp)
    m, l, acc = _run_blocks(st, bounds, step, init, overlap)
    valid = (rows < sc.q_len) if st.plan.q_len else None
    out, lse2 = pc.normalize(acc, m, l, lambda x: x[:, None], valid, st.shift)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse2


def _forward(st: pc.Static, q, k, v, arrays: pc.MaskArrays):
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
            pl.BlockSpec((None, sp, None, hp), lambda i, b, h: (b, 0, im.fdiv(h, g), 0)),
            pl.BlockSpec((None, sp, None, hvp), lambda i, b, h: (b, 0, im.fdiv(h, g), 0)),
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


def _dkv_kernel(*refs, st: pc.Static):
    qkv, sc_refs, (qseg_ref, kvseg_ref), rest = pc.split_refs(st.plan, refs, scalars_first=False)
    q_ref, k_ref, v_ref = qkv
    do_ref, lse_ref, delta_ref, dk_ref, dv_ref = rest
    bq, bk = st.bq_dkv, st.bk_dkv
    k0 = pl.program_id(0) * bk
    sc = _scalars(st.plan, sc_refs)
    cols = k0 + _iota(bk)
    kj = k_ref[...]
    (vj,) = _hide_past(st, sc, cols, v_ref[...])
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
            ds = pc.dlogits(st, p, dp - delta[:, None], th)
            return dk + _dot(ds.astype(qi.dtype), qi, ta=True), dv

        def overlap(i):
            return pc.ids_overlap(qseg_ref[pl.ds(pl.multiple_of(i * bq, bq), bq)], kv_ids)

        bounds = st.plan.q_blocks(sc, k0, bk, bq, st.tp, st.sp)
        return _run_blocks(st, bounds, step, carry, overlap)

    init = (
        jnp.zeros((bk, k_ref.shape[-1]), jnp.float32),
        jnp.zeros((bk, v_ref.shape[-1]), jnp.float32),
    )
    dk, dv = head(0, init) if st.groups == 1 else lax.fori_loop(0, st.groups, head, init)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(*refs, st: pc.Static):
    qkv, sc_refs, (qseg_ref, kvseg_ref), rest = pc.split_refs(st.plan, refs, scalars_first=False)
    q_ref, k_ref, v_ref = qkv
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
        if masked:
            kj, vj = _hide_past(st, sc, k0 + _iota(bk), kj, vj)
        s, th = _logits(st, qi, kj)
        if masked:
            kv_ids = None if kvseg_ref is None else kvseg_ref[pl.ds(k0, bk)]
            s = _mask(st, sc, s, rows, k0 + _iota(bk), q_ids, kv_ids)
        p = jnp.exp2(s - lse[:, None])
        dp = _dot(doi, vj, tb=True)
        ds = pc.dlogits(st, p, dp - delta[:, None], th)
        return dq + _dot(ds.astype(kj.dtype), kj)

    def overlap(j):
        return pc.ids_overlap(q_ids, kvseg_ref[pl.ds(pl.multiple_of(j * bk, bk), bk)])

    bounds = st.plan.kv_blocks(sc, q0, bq, bk, st.sp)
    dq = _run_blocks(st, bounds, step, jnp.zeros((bq, q_ref.shape[-1]), jnp.float32), overlap)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(st: pc.Static, q, k, v, arrays, g_out, lse, delta):
    nb, tp, n, hp = q.shape
    sp, kh, hvp = k.shape[1], k.shape[2], v.shape[-1]
    g = st.groups
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
    )(q, k, v, *dkv_mask_ops, g_out, lse, delta)

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
            pl.BlockSpec((None, sp, None, hp), lambda i, b, h: (b, 0, im.fdiv(h, g), 0)),
            pl.BlockSpec((None, sp, None, hvp), lambda i, b, h: (b, 0, im.fdiv(h, g), 0)),
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
    )(q, k, v, *dq_mask_ops, g_out, lse, delta)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The custom_vjp and what the driver needs.

SUPPORTS = pc.SUPPORTS
_attention = pc.flash_vjp(_forward, _backward, rows="btnd,btnd->bnt")
_KERNEL = pc.Kernel(fit=_fit, pack=_pack, unpack=_unpack, attention=_attention)
