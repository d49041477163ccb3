"""``implementation="cpu"``: the native CPU flash-attention kernel (C++17, ``csrc/``), through
``jax.ffi``.

The library ``_jattn_cpu.so`` next to this file is built from ``csrc/`` by the project's build
(``pip install``); it holds two XLA FFI handlers, ``JattnCpuForward`` and ``JattnCpuBackward``,
registered here for the CPU platform. One call covers the whole batch (a batched
implementation): ``q [*B, T, N, H]``, ``k [*B, S, K, H]``, ``v [*B, S, K, Hv]``, float32,
bfloat16 or float16, with the mask lowered to static bounds plus per-batch arrays
(:meth:`jattn.plan.Plan.mask_plan`), the bias and a dense mask in their canonical broadcast
layout, and one dropout seed per head. A ``jax.custom_vjp`` over the two calls saves only the
output and the log-sum-exp; the bias gradient comes back as float32 ``[B, K, G, T, S]`` and is
summed here to the bias's broadcast shape.

When the library is missing or cannot be loaded, :data:`AVAILABLE` is False and
:data:`UNAVAILABLE_REASON` says why; the registry then leaves ``cpu`` out (with that reason in
``jattn.kernels.UNAVAILABLE``) and ``implementation=None`` uses ``flash`` / ``fused``.
``JATTN_CPU_LIBRARY=/path/to/lib.so`` loads another build (a path that does not exist disables
the kernel). At run time ``JATTN_CPU_THREADS=n`` caps its threads (default: the CPUs of the
process's affinity mask, in a pool of the kernel's own). Every other knob (instruction set,
threads per call, XLA's pool, block sizes) is a field of :class:`CpuConfig`, passed as an FFI
attribute, never an environment variable. :func:`isa` tells which instruction set the loaded
library detected.

``jax.export`` carries the kernel's calls (versioned targets, :data:`ABI_VERSION`): the exported
program runs where a jattn with the same contract is imported.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _dropout, masks
from jattn.kernels._tuning import Tuning, knob
from jattn.kernels.common import KernelOutput
from jattn.plan import FEATURES, Plan

__all__ = [
    "AVAILABLE",
    "ISA_LEVELS",
    "LIBRARY",
    "SUPPORTS",
    "UNAVAILABLE_REASON",
    "CpuConfig",
    "EXPORT_TARGETS",
    "best_isa",
    "kept_bytes",
    "release_buffers",
    "cpu_attention",
    "isa",
    "num_threads",
]

Array = jax.Array

# Everything but unions/complements of masks, float64 and the weights.
SUPPORTS = FEATURES - {"mask_algebra", "float64", "return_weights"}

_BUILD_ERROR = "_jattn_cpu.build-error.txt"  # setup.py writes why it did not build the library

# The FFI contract, stated once here and bound in the same order by csrc/ffi.cc (whose binding
# names each operand in a comment; tests/kernels/test_cpu.py reads both and compares). Absent
# optional operands are passed with zero elements.
OPERANDS = (
    "q",  # [B, T, N, H]        float32 / bfloat16 / float16
    "k",  # [B, S, K, H]
    "v",  # [B, S, K, Hv]
    "q_len",  # [B]             int32
    "kv_len",  # [B]            int32
    "offset",  # [B]            int32: causal offsets
    "q_seg",  # [B, T]          int32
    "kv_seg",  # [B, S]         int32
    "mask",  # [B', K', G', T', S'] uint8, each dim full or 1
    "bias",  # [B', K', G', T', S'] float32, each dim full or 1
    "seeds",  # [B, K, G]       uint32: dropout, one per head
    "sinks",  # [B, K, G]       float32: attention sinks, one logit per head
)
# lse_lo [B, N, T] float32: what rounding lse to float32 left out (csrc/attention.h); the
# backward scales the dout and D of the rows where it matters by exp(-lse_lo), so that rows
# whose lse rounds away the log of their sum (logits near 1e38) get weights that sum to 1.
BACKWARD_OPERANDS = OPERANDS + ("out", "lse", "lse_lo", "dout", "dlse")  # dlse empty: zero
FORWARD_RESULTS = ("out", "lse", "lse_lo")
BACKWARD_RESULTS = ("dq", "dk", "dv", "dbias")  # dbias float32 [B, K, G, T, S] or empty
# The XLA custom-call targets carry the contract's version: a program exported with them
# (jax.export) names the contract it was built against, and a library with another contract
# does not take it. Any change to the tables above or to the attributes bumps it.
ABI_VERSION = 4
_FWD = f"jattn_cpu_forward_v{ABI_VERSION}"
_BWD = f"jattn_cpu_backward_v{ABI_VERSION}"
EXPORT_TARGETS = (_FWD, _BWD)


def _library_path() -> Path:
    env = os.environ.get("JATTN_CPU_LIBRARY")
    return Path(env) if env else Path(__file__).with_name("_jattn_cpu.so")


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = _library_path()
    if not path.is_file():
        why = path.with_name(_BUILD_ERROR)
        if why.is_file():
            return None, f"native library not built: {why.read_text().strip()}"
        return None, f"native library not built: {path} missing"
    try:
        lib = ctypes.CDLL(str(path))
        for name, fn in ((_FWD, lib.JattnCpuForward), (_BWD, lib.JattnCpuBackward)):
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(fn), platform="cpu")
    except (OSError, AttributeError, RuntimeError, ValueError) as e:
        return None, f"native library {path} failed to load: {type(e).__name__}: {e}"
    _allow_export((_FWD, _BWD))
    return lib, None


def _allow_export(targets: tuple[str, ...]) -> None:
    """Lets ``jax.export`` carry the native kernel's calls.

    ``jax.export`` refuses custom calls whose targets JAX does not know to be stable. These
    targets are versioned (:data:`ABI_VERSION`): a program exported with them runs wherever a
    jattn with the same contract is installed and imported (``import jattn`` registers them),
    and fails elsewhere with an unknown-target error rather than misreading its operands. JAX
    keeps that list privately; if it moves, export falls back to asking for
    ``jax.export.DisabledSafetyCheck.custom_call(name)`` with these names (:data:`EXPORT_TARGETS`).
    """
    try:
        from jax._src.export import _export

        _export._CUSTOM_CALL_TARGETS_GUARANTEED_STABLE.update(targets)
    except (ImportError, AttributeError):  # pragma: no cover - another JAX layout
        pass


LIBRARY: Path = _library_path()
_lib, UNAVAILABLE_REASON = _load()
AVAILABLE: bool = _lib is not None


def isa() -> str | None:
    """The instruction-set level the loaded library runs a call at by default (one of
    :data:`ISA_LEVELS`), or None when it is not available. "avx512_bf16" is the default only
    where its dot products were measured to outrun float32 FMAs (not on Intel's, which make
    them at half the rate); :func:`best_isa` is the best level the CPU has."""
    if _lib is None:
        return None
    fn = _lib.jattn_cpu_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


# ---------------------------------------------------------------------------------------------
# The kernel.


# The instruction-set levels the library is built with, in the order of the native Isa enum:
# the last two run the avx512 code and add a unit for bfloat16 products (AVX-512 BF16 dot
# products; AMX-BF16 tiles), used on bfloat16 inputs.
ISA_LEVELS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")

# The native DType codes (attention.h) of the dtypes the kernel takes.
_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(jnp.bfloat16): 1, np.dtype(np.float16): 2}


@dataclasses.dataclass(frozen=True)
class CpuConfig(Tuning):
    """The native kernel's knobs, passed to it as FFI attributes of the same names.

    A field left None is the kernel's own heuristic for the call; :meth:`default_for` fills
    every field with what that heuristic picks for the plan on this CPU (its caches, ISA level
    and thread count), so a config printed from it can be edited and passed back
    (``jattn.attention(..., implementation="cpu", config=CpuConfig(block_keys=128))``). The
    knobs change the schedule, never the answer beyond rounding.

    Attributes:
      block_rows: forward: the target rows of a task (the G query heads of a KV head packed
        as rows), aligned to the register tile and halved while threads would idle.
      block_keys: forward: keys per block (a score row stays in L1).
      strip: forward: rows of a block computed and swept at a time.
      key_splits: forward: key ranges per task row (decoding-like calls, merged by their
        log-sum-exp); ignored by the position-streaming decode path.
      stream_decode: forward: let decoding calls (a few query rows per KV head) stream K and V
        position by position.
      bwd_block_rows, bwd_block_keys: backward: the query and key blocks of a task.
      isa: the instruction-set level (one of :data:`ISA_LEVELS`: "generic", "avx2",
        "avx512", and for bfloat16 products "avx512_bf16" (dot-product instructions) or "amx"
        (AMX tiles)); None: the best this CPU has. A level the CPU lacks is refused.
      threads: at most this many threads for a call; None: every thread of the kernel's pool
        (the process-wide cap is the environment variable ``JATTN_CPU_THREADS``).
      xla_pool: run on XLA's intra-op thread pool instead of the kernel's own (slower to start
        tasks, measured; for programs that want one pool).
    """

    block_rows: int | None = knob(None)
    block_keys: int | None = knob(None)
    strip: int | None = knob(None)
    key_splits: int | None = knob(None)
    bwd_block_rows: int | None = knob(None)
    bwd_block_keys: int | None = knob(None)
    stream_decode: bool = True
    isa: str | None = None
    threads: int | None = knob(None)
    xla_pool: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("stream_decode", "xla_pool"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"CpuConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.isa is not None:
            if self.isa not in ISA_LEVELS:
                raise ValueError(
                    f"CpuConfig.isa must be None or one of {', '.join(ISA_LEVELS)}, got "
                    f"{self.isa!r}"
                )
            best = best_isa()
            if best is not None and ISA_LEVELS.index(self.isa) > best:
                raise ValueError(
                    f"CpuConfig.isa={self.isa!r}: this CPU runs at most {ISA_LEVELS[best]!r}"
                )

    @classmethod
    def default_for(cls, plan: Plan, backend: str) -> CpuConfig:
        """What the native heuristics pick for ``plan`` on this CPU; the block fields stay
        None (the kernel's choice when it runs) where the library is not loaded or a
        dimension is symbolic (``jax.export``)."""
        del backend  # the native kernel runs on CPUs only
        threads = num_threads()
        dims = (
            math.prod(plan.batch_shape),
            plan.q_seq_len,
            plan.kv_seq_len,
            plan.num_kv_heads,
            plan.group_size,
            plan.head_dim,
            plan.value_head_dim,
        )
        tuning = None
        # Symbolic (jax.export) or empty dimensions: the kernel chooses when it runs.
        if all(isinstance(d, int) and d > 0 for d in dims):
            tuning = _default_tuning(*dims, plan.dtype, threads or 0)
        return cls(**(tuning or {}), isa=isa(), threads=threads)

    def attrs(self) -> dict:
        """The FFI attributes: int64 (0 for None: the heuristic's; isa -1: the best) or bool."""
        ints = {
            name: np.int64(getattr(self, name) or 0)
            for name in (
                "block_rows",
                "block_keys",
                "strip",
                "key_splits",
                "bwd_block_rows",
                "bwd_block_keys",
                "threads",
            )
        }
        isa_level = -1 if self.isa is None else ISA_LEVELS.index(self.isa)
        return dict(
            **ints,
            isa=np.int64(isa_level),
            stream_decode=bool(self.stream_decode),
            xla_pool=bool(self.xla_pool),
        )


@dataclasses.dataclass(frozen=True)
class _Static:
    """The attributes of the FFI calls (hashable: part of the compiled program)."""

    scale: float
    softcap: float
    dropout_rate: float
    has_left: bool
    left: int
    has_right: bool
    right: int
    chunk: int = 0  # chunked attention: query i sees key j only if i // chunk == j // chunk
    value_dim: int = 0  # > 0: the v operand is k, the values its first value_dim features
    config: CpuConfig = CpuConfig()  # noqa: RUF009 - frozen
    vma: tuple[str, ...] = ()  # the shard_map axes the inputs vary over

    def attrs(self) -> dict:
        return dict(
            scale=np.float32(self.scale),
            softcap=np.float32(self.softcap),
            dropout_rate=np.float32(self.dropout_rate),
            dropout_threshold=np.int64(_dropout.threshold(self.dropout_rate)),
            has_left=bool(self.has_left),
            has_right=bool(self.has_right),
            left=np.int64(self.left),
            right=np.int64(self.right),
            chunk=np.int64(self.chunk),
            value_dim=np.int64(self.value_dim),
            **self.config.attrs(),
        )


def _query(name: str, restype):
    """The library's exported query `name()` (None when the library is not available)."""
    if _lib is None:
        return None
    fn = getattr(_lib, name)
    fn.restype = restype
    return fn()


def best_isa() -> int | None:
    """The best ISA level the CPU has, as an index of :data:`ISA_LEVELS`, or None."""
    return _query("jattn_cpu_best_isa", ctypes.c_int)


def num_threads() -> int | None:
    """The native kernel's pool's thread count (after JATTN_CPU_THREADS), or None."""
    return _query("jattn_cpu_threads", ctypes.c_int64)


def kept_bytes() -> int | None:
    """The bytes the native kernel keeps between calls (pre-packed keys and values, the
    backward's copies, decoding's partial results: per calling thread, each buffer up to a
    bound; larger ones are freed with their call), or None without the library."""
    return _query("jattn_cpu_kept_bytes", ctypes.c_int64)


def release_buffers() -> int | None:
    """Frees the buffers the native kernel keeps between calls, once the calls running have
    finished; returns the bytes freed (None without the library). The next call allocates
    what it needs again: use this after a large call, when the memory is wanted elsewhere."""
    return _query("jattn_cpu_release", ctypes.c_int64)


def _default_tuning(b, t, s, k, g, h, hv, dtype=np.float32, threads=0) -> dict | None:
    """What the native heuristics pick for this shape and dtype (the CpuConfig fields that
    have one)."""
    if _lib is None:
        return None
    out = (ctypes.c_int64 * 7)()
    fn = _lib.jattn_cpu_default_tuning
    fn.restype = None
    fn.argtypes = [ctypes.c_int64] * 9 + [ctypes.POINTER(ctypes.c_int64)]
    fn(b, t, s, k, g, h, hv, _DTYPE_CODES[np.dtype(dtype)], threads, out)
    names = (
        "block_rows",
        "block_keys",
        "strip",
        "stream_decode",
        "key_splits",
        "bwd_block_rows",
        "bwd_block_keys",
    )
    return {n: bool(v) if n == "stream_decode" else int(v) for n, v in zip(names, out, strict=True)}


def _none_i32() -> Array:
    return _empty(jnp.int32)


def _empty(dtype) -> Array:
    """An absent optional operand: zero elements."""
    return jnp.zeros((0,), dtype)


def _operands(names: tuple[str, ...], given: dict) -> list:
    """The call's operands in the contract's order."""
    return [given[name] for name in names]


def cpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``)."""
    # The registry sends only calls within SUPPORTS (no float64, no mask algebra), with the
    # config resolved.
    mask_plan, arrays = plan.mask_plan()
    config = plan.config if isinstance(plan.config, CpuConfig) else CpuConfig()
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    batch = tuple(batch)
    nb = math.prod(batch)
    g = n // kh

    q3 = q.reshape(nb, t, n, h)
    k3 = k.reshape(nb, s, kh, h)
    # Values inside the keys (value_dim): the kernel reads them there, and v (a slice of k)
    # is never used, so XLA does not make it.
    v3 = k3 if plan.value_in_key else v.reshape(nb, s, kh, hv)
    i32 = lambda x: _none_i32() if x is None else x.astype(jnp.int32)  # noqa: E731
    seeds = plan.dropout_seed
    ops = {
        "q_len": i32(arrays.q_len),
        "kv_len": i32(arrays.kv_len),
        "offset": i32(arrays.offset),
        "q_seg": i32(arrays.q_seg),
        "kv_seg": i32(arrays.kv_seg),
        "mask": _empty(jnp.uint8) if arrays.dense is None else arrays.dense.astype(jnp.uint8),
        "seeds": _empty(jnp.uint32)
        if seeds is None
        else seeds.reshape(nb, kh, g).astype(jnp.uint32),
    }
    bias = None
    if plan.bias is not None:
        bias = masks.flatten_batch(plan.bias, batch).astype(jnp.float32)
    sinks = None
    if plan.sinks is not None:  # counted by the kernel itself (APPLIES_SINKS)
        sinks = masks.flatten_batch(plan.sinks, batch).astype(jnp.float32)
        sinks = jnp.broadcast_to(sinks, (nb, kh, g))
    st = _Static(
        scale=float(plan.scale),
        softcap=0.0 if plan.softcap is None else float(plan.softcap),
        dropout_rate=float(plan.dropout_rate),
        has_left=mask_plan.left is not None,
        left=0 if mask_plan.left is None else int(mask_plan.left),
        has_right=mask_plan.right is not None,
        right=0 if mask_plan.right is None else int(mask_plan.right),
        chunk=mask_plan.chunk or 0,
        value_dim=hv if plan.value_in_key else 0,
        config=config,
        vma=_vma(q3, k3, v3, *(x for x in (bias, sinks) if x is not None)),
    )
    out, lse = _attention(st, q3, k3, v3, bias, sinks, ops)
    out = out.reshape(*batch, t, n, hv)
    lse = lse.reshape(*batch, n, t) if plan.return_lse else None
    return KernelOutput(out, lse, None)


def _vma(*xs: Array) -> tuple[str, ...]:
    """The shard_map axes any of ``xs`` varies over (empty outside shard_map)."""
    if not hasattr(jax, "typeof"):
        return ()
    axes: set[str] = set()
    for x in xs:
        t = jax.typeof(x)
        mat = getattr(t, "manual_axis_type", None)  # jax >= 0.9
        axes |= set(getattr(mat, "varying", None) or getattr(t, "vma", None) or ())
    return tuple(sorted(axes))


def _vary(x: Array, axes: tuple[str, ...]) -> Array:
    """``x`` typed as varying over ``axes``: an FFI call's results carry no such type, and
    shard_map / custom_vjp want them typed as the inputs."""
    missing = tuple(a for a in axes if a not in _vma(x))
    if not missing or not hasattr(jax.lax, "pcast"):
        return x
    return jax.lax.pcast(x, missing, to="varying")


def _or_empty(x: Array | None) -> Array:
    return _empty(jnp.float32) if x is None else x


def _forward(st: _Static, q, k, v, bias, sinks, ops):
    b, t, n, _ = q.shape
    hv = st.value_dim or v.shape[-1]
    out_types = (
        jax.ShapeDtypeStruct((b, t, n, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, t), jnp.float32),
        jax.ShapeDtypeStruct((b, n, t), jnp.float32),
    )
    given = dict(ops, q=q, k=k, v=v, bias=_or_empty(bias), sinks=_or_empty(sinks))
    call = jax.ffi.ffi_call(_FWD, out_types, vmap_method="sequential")
    out, lse, lse_lo = call(*_operands(OPERANDS, given), **st.attrs())
    return _vary(out, st.vma), _vary(lse, st.vma), _vary(lse_lo, st.vma)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, bias, sinks, ops):
    out, lse, _ = _forward(st, q, k, v, bias, sinks, ops)
    return out, lse


def _attention_fwd(st, q, k, v, bias, sinks, ops):
    out, lse, lse_lo = _forward(st, q, k, v, bias, sinks, ops)
    return (out, lse), (q, k, v, bias, sinks, ops, out, lse, lse_lo)


def _sinks_gradient(sinks, out, lse, lse_lo, g_out, g_lse) -> Array:
    """d sink = -sum over the head's rows of p_sink * D, with p_sink = exp(sink - lse) (the
    sink's weight; lse counts it) and D = rowsum(dO * O) - dlse: the sink raises every row's
    denominator and has no value. exp(sink - lse) exp(-lse_lo): lse + lse_lo would round
    back to lse where lse_lo matters."""
    d = jnp.einsum("btnh,btnh->bnt", g_out.astype(jnp.float32), out.astype(jnp.float32))
    if g_lse.size:
        d = d - g_lse
    b, kh, g = sinks.shape
    s = sinks.reshape(b, kh * g)[..., None]
    p = jnp.where(jnp.isneginf(s), 0.0, jnp.exp(s - lse) * jnp.exp(-lse_lo))
    return -jnp.sum(p * d, axis=-1).reshape(b, kh, g)


def _attention_bwd(st, res, cts):
    q, k, v, bias, sinks, ops, out, lse, lse_lo = res
    if st.value_dim:
        # The backward takes the values as their own array (it is no decoding path), and
        # the values' gradient flows into the keys' first features through the v operand.
        hv = st.value_dim
        dq, dk, dv, dbias, dsinks, dops = _attention_bwd(
            dataclasses.replace(st, value_dim=0),
            (q, k, k[..., :hv], bias, sinks, ops, out, lse, lse_lo),
            cts,
        )
        dv = jnp.pad(dv, [(0, 0)] * (dv.ndim - 1) + [(0, k.shape[-1] - hv)])
        return dq, dk, dv, dbias, dsinks, dops
    g_out, g_lse = cts
    if isinstance(g_lse, jax.custom_derivatives.SymbolicZero) or g_lse is None:
        g_lse = _empty(jnp.float32)
    else:
        g_lse = g_lse.astype(jnp.float32)
    g_out = g_out.astype(q.dtype)
    b, t, n, _ = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    dbias_type = (
        jax.ShapeDtypeStruct((0,), jnp.float32)
        if bias is None
        else jax.ShapeDtypeStruct((b, kh, g, t, s), jnp.float32)
    )
    out_types = (
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct(k.shape, k.dtype),
        jax.ShapeDtypeStruct(v.shape, v.dtype),
        dbias_type,
    )
    given = dict(
        ops,
        q=q,
        k=k,
        v=v,
        bias=_or_empty(bias),
        sinks=_or_empty(sinks),
        out=out,
        lse=lse,
        lse_lo=lse_lo,
        dout=g_out,
        dlse=g_lse,
    )
    call = jax.ffi.ffi_call(_BWD, out_types, vmap_method="sequential")
    dq, dk, dv, dbias = call(*_operands(BACKWARD_OPERANDS, given), **st.attrs())
    if bias is None:
        dbias = None
    else:
        axes = tuple(i for i, d in enumerate(bias.shape) if d == 1 and dbias.shape[i] != 1)
        dbias = _vary(jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype), st.vma)
    dsinks = None
    if sinks is not None:
        dsinks = _vary(_sinks_gradient(sinks, out, lse, lse_lo, g_out, g_lse), st.vma)
    return _vary(dq, st.vma), _vary(dk, st.vma), _vary(dv, st.vma), dbias, dsinks, None


_attention.defvjp(_attention_fwd, _attention_bwd)
