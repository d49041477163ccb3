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
threads per call, XLA's pool, block sizes) is an FFI attribute (``_TUNING``), never an
environment variable. :func:`isa` tells which instruction set the loaded library detected.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import dataclasses
import functools
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jattn.kernels.common import KernelOutput
from jattn.plan import FEATURES, Plan

__all__ = ["AVAILABLE", "LIBRARY", "SUPPORTS", "UNAVAILABLE_REASON", "cpu_attention", "isa"]

Array = jax.Array

# Everything but unions/complements of masks, float64 and the weights.
SUPPORTS = FEATURES - {"mask_algebra", "float64", "return_weights", "chunked"}

_BUILD_ERROR = "_jattn_cpu.build-error.txt"  # setup.py writes why it did not build the library
_FWD = "jattn_cpu_forward"
_BWD = "jattn_cpu_backward"
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


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
    return lib, None


LIBRARY: Path = _library_path()
_lib, UNAVAILABLE_REASON = _load()
AVAILABLE: bool = _lib is not None


def isa() -> str | None:
    """The instruction set the loaded library runs with ('avx512', 'avx2', 'generic'), or None
    when it is not available."""
    if _lib is None:
        return None
    fn = _lib.jattn_cpu_isa
    fn.restype = ctypes.c_char_p
    return fn().decode()


# ---------------------------------------------------------------------------------------------
# The kernel.


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
    vma: tuple[str, ...] = ()  # the shard_map axes the inputs vary over
    tuning: tuple[tuple[str, object], ...] = ()  # overrides of _TUNING's defaults, sorted

    def attrs(self) -> dict:
        knobs = {**_TUNING, **dict(self.tuning)}
        return dict(
            scale=np.float32(self.scale),
            softcap=np.float32(self.softcap),
            dropout_rate=np.float32(self.dropout_rate),
            has_left=bool(self.has_left),
            has_right=bool(self.has_right),
            left=np.int64(self.left),
            right=np.int64(self.right),
            chunk=np.int64(self.chunk),
            **{k: _knob(k, v) for k, v in knobs.items()},
        )


# The native kernel's knobs (FFI attributes) and their defaults: -1 / 0 = the kernel's own
# choice (isa: the best the CPU has; threads: all of the pool's; the block sizes, strip and
# key splits: the heuristic's, as _default_tuning reports them).
_TUNING: dict[str, int | bool] = dict(
    isa=-1,
    threads=0,
    xla_pool=False,
    block_rows=0,
    block_keys=0,
    strip=0,
    stream_decode=True,
    key_splits=0,
    bwd_block_rows=0,
    bwd_block_keys=0,
)
_ISA_LEVELS = {"generic": 0, "avx2": 1, "avx512": 2}


def _knob(name: str, value) -> bool | np.int64:
    """A knob as its FFI attribute: bool or int64, as its default is."""
    return bool(value) if isinstance(_TUNING[name], bool) else np.int64(value)


# Private: attributes that calls made inside `_with_attrs` pass (tests; the public CpuConfig
# will carry the tuning knobs).
_extra_attrs: contextvars.ContextVar[tuple] = contextvars.ContextVar("_extra_attrs", default=())


@contextlib.contextmanager
def _with_attrs(**attrs):
    """Native calls traced inside this block pass these attributes (the knobs of _TUNING,
    isa also by name, and chunk)."""
    if isinstance(attrs.get("isa"), str):
        attrs["isa"] = _ISA_LEVELS[attrs["isa"]]
    unknown = set(attrs) - set(_TUNING) - {"chunk"}
    if unknown:
        raise ValueError(f"unknown native attributes {sorted(unknown)}")
    token = _extra_attrs.set(tuple({**dict(_extra_attrs.get()), **attrs}.items()))
    try:
        yield
    finally:
        _extra_attrs.reset(token)


def _query(name: str, restype):
    """The library's exported query `name()` (None when the library is not available)."""
    if _lib is None:
        return None
    fn = getattr(_lib, name)
    fn.restype = restype
    return fn()


def best_isa() -> int | None:
    """The best ISA level the CPU has (0 generic, 1 avx2, 2 avx512), or None."""
    return _query("jattn_cpu_best_isa", ctypes.c_int)


def num_threads() -> int | None:
    """The native kernel's pool's thread count (after JATTN_CPU_THREADS), or None."""
    return _query("jattn_cpu_threads", ctypes.c_int64)


def _default_tuning(b, t, s, k, g, h, hv, threads=0) -> dict | None:
    """What the native heuristics pick for this shape (the knobs of _TUNING that have one)."""
    if _lib is None:
        return None
    out = (ctypes.c_int64 * 7)()
    fn = _lib.jattn_cpu_default_tuning
    fn.restype = None
    fn.argtypes = [ctypes.c_int64] * 8 + [ctypes.POINTER(ctypes.c_int64)]
    fn(b, t, s, k, g, h, hv, threads, out)
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
    return jnp.zeros((0,), jnp.int32)


def _five_d(x: Array, batch_shape: tuple[int, ...]) -> Array:
    """A canonical leaf ``[*B', K', G', T', S']`` as ``[B or 1, K', G', T', S']``."""
    nb = len(batch_shape)
    if all(d == 1 for d in x.shape[:nb]):
        return x.reshape((1,) + x.shape[nb:])
    x = jnp.broadcast_to(x, batch_shape + x.shape[nb:])
    return x.reshape((math.prod(batch_shape),) + x.shape[nb:])


def cpu_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays: ``q [*B, T, N, H]``, ``k [*B, S, K, H]``,
    ``v [*B, S, K, Hv]`` -> ``out [*B, T, N, Hv]`` (and ``lse [*B, N, T]``)."""
    if not AVAILABLE:
        raise NotImplementedError(f"cpu is unavailable: {UNAVAILABLE_REASON}")
    if jnp.dtype(q.dtype) not in _DTYPES:
        raise NotImplementedError(f"cpu does not support {q.dtype} inputs (float64)")
    mask_plan, arrays = plan.mask_plan()
    if mask_plan.general:
        raise NotImplementedError("cpu does not support mask_algebra")
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    batch = tuple(batch)
    nb = math.prod(batch)
    g = n // kh

    q3 = q.reshape(nb, t, n, h)
    k3 = k.reshape(nb, s, kh, h)
    v3 = v.reshape(nb, s, kh, hv)
    ops = (
        _none_i32() if arrays.q_len is None else arrays.q_len.astype(jnp.int32),
        _none_i32() if arrays.kv_len is None else arrays.kv_len.astype(jnp.int32),
        _none_i32() if arrays.offset is None else arrays.offset.astype(jnp.int32),
        _none_i32() if arrays.q_seg is None else arrays.q_seg.astype(jnp.int32),
        _none_i32() if arrays.kv_seg is None else arrays.kv_seg.astype(jnp.int32),
        jnp.zeros((0,), jnp.uint8) if arrays.dense is None else arrays.dense.astype(jnp.uint8),
        jnp.zeros((0,), jnp.uint32)
        if plan.dropout_seed is None
        else plan.dropout_seed.reshape(nb, kh, g).astype(jnp.uint32),
    )
    bias = None
    if plan.bias is not None:
        bias = _five_d(plan.bias, batch).astype(jnp.float32)
    st = _Static(
        scale=float(plan.scale),
        softcap=0.0 if plan.softcap is None else float(plan.softcap),
        dropout_rate=float(plan.dropout_rate),
        has_left=mask_plan.left is not None,
        left=0 if mask_plan.left is None else int(mask_plan.left),
        has_right=mask_plan.right is not None,
        right=0 if mask_plan.right is None else int(mask_plan.right),
        chunk=int(getattr(mask_plan, "chunk", None) or 0),
        vma=_vma(q3, k3, v3, *([] if bias is None else [bias])),
    )
    extra = dict(_extra_attrs.get())
    if "chunk" in extra:
        st = dataclasses.replace(st, chunk=int(extra.pop("chunk")))
    st = dataclasses.replace(st, tuning=tuple(sorted(extra.items())))
    out, lse = _attention(st, q3, k3, v3, bias, ops)
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


def _forward(st: _Static, q, k, v, bias, ops):
    b, t, n, _ = q.shape
    hv = v.shape[-1]
    out_types = (
        jax.ShapeDtypeStruct((b, t, n, hv), q.dtype),
        jax.ShapeDtypeStruct((b, n, t), jnp.float32),
    )
    bias_op = jnp.zeros((0,), jnp.float32) if bias is None else bias
    call = jax.ffi.ffi_call(_FWD, out_types, vmap_method="sequential")
    out, lse = call(q, k, v, *ops[:6], bias_op, ops[6], **st.attrs())
    return _vary(out, st.vma), _vary(lse, st.vma)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(st: _Static, q, k, v, bias, ops):
    return _forward(st, q, k, v, bias, ops)


def _attention_fwd(st, q, k, v, bias, ops):
    out, lse = _forward(st, q, k, v, bias, ops)
    return (out, lse), (q, k, v, bias, ops, out, lse)


def _attention_bwd(st, res, cts):
    q, k, v, bias, ops, out, lse = res
    g_out, g_lse = cts
    if isinstance(g_lse, jax.custom_derivatives.SymbolicZero) or g_lse is None:
        g_lse = jnp.zeros((0,), jnp.float32)
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
    bias_op = jnp.zeros((0,), jnp.float32) if bias is None else bias
    call = jax.ffi.ffi_call(_BWD, out_types, vmap_method="sequential")
    dq, dk, dv, dbias = call(
        q, k, v, *ops[:6], bias_op, ops[6], out, lse, g_out, g_lse, **st.attrs()
    )
    if bias is None:
        dbias = None
    else:
        axes = tuple(i for i, d in enumerate(bias.shape) if d == 1 and dbias.shape[i] != 1)
        dbias = _vary(jnp.sum(dbias, axis=axes, keepdims=True).astype(bias.dtype), st.vma)
    return _vary(dq, st.vma), _vary(dk, st.vma), _vary(dv, st.vma), dbias, None


_attention.defvjp(_attention_fwd, _attention_bwd)
