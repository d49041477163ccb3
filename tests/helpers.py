"""Shared test machinery: random attention calls, brute-force masks, the float64 oracle."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jattn
from jattn import masks

# Tolerances against the float64 reference, per input dtype: (forward, gradients).
TOL = {
    jnp.float32: (2e-5, 2e-4),
    jnp.float16: (1e-2, 3e-2),
    jnp.bfloat16: (3e-2, 8e-2),
}


def tol(dtype) -> tuple[float, float]:
    return TOL[jnp.dtype(dtype).type]


@dataclasses.dataclass(frozen=True)
class Variant:
    """An implementation under test, with the config it runs with (None: its default).

    ``slow``: it runs emulated (Pallas interpret mode), where every new shape costs seconds of
    tracing; the suite skips its largest shapes.
    ``every``: it runs one in ``every`` random mask cases (extra configurations of a kernel
    whose default one sees them all, and emulated kernels), to keep the suite's time in hand.
    """

    name: str
    config: Any = None
    slow: bool = False
    every: int = 1
    # It serves a subset of the suite's calls that its registry entry cannot state (cuDNN:
    # dtypes, head dims, mask shapes, judged when traced): a call it refuses with a
    # NotImplementedError naming itself is skipped with the reason, not failed (conftest.py).
    partial: bool = False

    @property
    def kw(self) -> dict:
        return {"implementation": self.name, "config": self.config}

    def __str__(self) -> str:
        if self.config is None:
            return self.name
        fields = dataclasses.asdict(self.config).values()
        return f"{self.name}[{'x'.join(map(str, fields))}]"


# The device check (`pytest --impls NAMES`, run by `python -m bench device`): the suite runs
# the named implementations only, each at its default config, on JAX's default backend, with
# float32 matmuls at full precision and sequences up to 4k (test_long_sequences). None: the
# ordinary suite. Set once, by conftest.py, before the test modules are collected.
DEVICE_RUN: tuple[str, ...] | None = None

# Implementations that may refuse a call when traced (see Variant.partial).
_PARTIAL = frozenset({"cudnn"})


def configure_device_run(text: str) -> tuple[str, ...]:
    """Selects the device check for the comma-separated implementation names of ``text``.
    Raises ValueError naming ``--impls`` for a name that is unknown, not registered here, the
    oracle, or one that would run only emulated on this backend."""
    global DEVICE_RUN
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    reg, backend = jattn.kernels.REGISTRY, jax.default_backend()
    if not names:
        raise ValueError(f"--impls {text!r} names no implementation")
    for name in names:
        if name in jattn.kernels.UNAVAILABLE:
            raise ValueError(
                f"--impls: {name!r} is not available here: {jattn.kernels.UNAVAILABLE[name]}"
            )
        if name not in reg:
            raise ValueError(f"--impls: unknown implementation {name!r}; known: {sorted(reg)}")
        if reg[name].oracle:
            raise ValueError(f"--impls: {name!r} is the oracle the suite compares against")
        if backend not in reg[name].backends:
            raise ValueError(
                f"--impls: {name!r} does not run on this backend ({backend!r}; it runs on "
                f"{', '.join(sorted(reg[name].backends))}); the device check runs no emulation"
            )
    # GPUs multiply float32 in TF32 by default (jax and Triton alike): the suite checks the
    # kernels' arithmetic against float32 tolerances, so it asks for float32 products.
    jax.config.update("jax_default_matmul_precision", "highest")
    DEVICE_RUN = names
    return names


def variants() -> list[Variant]:
    """Every implementation that runs here, and small-block configs that force the blockwise
    kernels through many blocks, padding and partial blocks even on tiny inputs; on the device
    check, the named implementations at their default configs."""
    from jattn.kernels.flash import FlashConfig

    if DEVICE_RUN is not None:
        return [Variant(name, partial=name in _PARTIAL) for name in DEVICE_RUN]
    reg = jattn.kernels.REGISTRY
    native = jattn.kernels.available("cpu")
    out = [Variant(n) for n in native if n != "reference"]
    if "flash" in reg:
        out += [
            Variant("flash", FlashConfig(8, 16), every=2),
            Variant("flash", FlashConfig(16, 4), every=2),
        ]
    # Emulated kernels run once each, with blocks small enough for many blocks, partial
    # blocks and padding on the suite's shapes, and different in the forward and backward.
    if "pallas_gpu" in reg:
        from jattn.kernels.pallas_gpu import PallasGpuConfig

        cfg = PallasGpuConfig(16, 8, 8, 16, 16, 8, num_warps=4, num_stages=1)
        out.append(Variant("pallas_gpu", cfg, slow=True, every=3))
    if "pallas_tpu" in reg:
        from jattn.kernels.pallas_tpu import PallasTpuConfig

        out.append(Variant("pallas_tpu", PallasTpuConfig(16, 8, 16, 8, 8, 16), slow=True, every=3))
    return out


def impl_kw(impl) -> dict:
    return impl.kw if isinstance(impl, Variant) else {"implementation": impl}


@dataclasses.dataclass
class Call:
    """One attention call: arrays plus keyword arguments, and a brute-force dense mask."""

    q: Any
    k: Any
    v: Any
    bias: Any = None
    kwargs: dict = dataclasses.field(default_factory=dict)
    dense: np.ndarray | None = None  # [*B, N, T, S] bool, the same mask written out by hand

    def run(self, implementation, *, dtype=None, **extra):
        cast = (
            (lambda x: x) if dtype is None else (lambda x: None if x is None else x.astype(dtype))
        )
        return jattn.attention(
            cast(self.q),
            cast(self.k),
            cast(self.v),
            cast(self.bias),
            **impl_kw(implementation),
            **self.kwargs,
            **extra,
        )


def host():
    """The host CPU, where the float64 reference is computed whatever the backend under test."""
    return jax.devices("cpu")[0]


@contextlib.contextmanager
def on_host():
    """Runs the computations inside on the host CPU. Arrays made without a device (as the
    suite's are) follow the computation there; ``to_host64`` commits an input to it."""
    with jax.default_device(host()):
        yield


def to_host64(x):
    """``x`` in float64 on the host CPU (None stays None). Differentiable."""
    return None if x is None else jax.device_put(jnp.asarray(x), host()).astype(jnp.float64)


def oracle(q, k, v, bias=None, **kwargs):
    """The float64 reference on the given (possibly low-precision) inputs, on the host CPU."""
    with on_host():
        return jattn.attention(
            to_host64(q),
            to_host64(k),
            to_host64(v),
            to_host64(bias),
            implementation="reference",
            **kwargs,
        )


def normal(key, shape, dtype=jnp.float32):
    """Standard normal samples drawn by numpy from ``key``'s bits.

    ``jax.random.normal`` compiles once per shape (over a second under x64), and the suite
    draws hundreds of shapes; numpy draws them at no compile cost, just as reproducibly.
    """
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype)


def random_qkv(key, batch, t, s, n, kh, h, hv=None, dtype=jnp.float32, bias=False):
    ks = jax.random.split(key, 4)
    hv = h if hv is None else hv
    q = normal(ks[0], (*batch, t, n, h), dtype)
    k = normal(ks[1], (*batch, s, kh, h), dtype)
    v = normal(ks[2], (*batch, s, kh, hv), dtype)
    b = None
    if bias:
        b = normal(ks[3], (*batch, n, t, s), dtype)
    return q, k, v, b


def numpy_attention(q, k, v, bias, dense, scale, softcap=None, sinks=None):
    """Attention written with numpy loops over heads, in float64. Independent of jattn.

    ``dense`` is a boolean ``[*B, N, T, S]`` mask (or None). Empty rows give zeros.
    ``sinks`` (broadcastable to ``[*B, N]``): one logit per head in each row's denominator,
    ``out_i = sum_j exp(l_ij) v_j / (exp(s) + sum_j exp(l_ij))``.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    g = n // kh
    out = np.zeros((*batch, t, n, hv))
    for idx in np.ndindex(*batch):
        for head in range(n):
            qi, ki, vi = q[idx][:, head], k[idx][:, head // g], v[idx][:, head // g]
            logits = scale * qi @ ki.T
            if softcap is not None:
                logits = softcap * np.tanh(logits / softcap)
            if bias is not None:
                logits = (
                    logits
                    + np.broadcast_to(np.asarray(bias, np.float64), (*batch, n, t, s))[idx][head]
                )
            vis = np.ones((t, s), bool) if dense is None else dense[idx][head]
            sink = -np.inf
            if sinks is not None:
                sink = np.broadcast_to(np.asarray(sinks, np.float64), (*batch, n))[idx][head]
            for row in range(t):
                if not vis[row].any():
                    continue
                x = np.where(vis[row], logits[row], -np.inf)
                top = max(x.max(), sink)
                p = np.exp(x - top)
                out[idx][row, head] = (p / (p.sum() + np.exp(sink - top))) @ vi
    return out


def brute_force_mask(
    batch,
    n,
    t,
    s,
    *,
    is_causal=False,
    window=None,
    chunk=None,
    q_lengths=None,
    kv_lengths=None,
    q_seg=None,
    kv_seg=None,
    dense=None,
):
    """The intersection of the masking arguments, written out element by element."""
    out = np.ones((*batch, n, t, s), bool)
    dense_b = None if dense is None else np.broadcast_to(dense, (*batch, n, t, s))
    # Python values up front: the loops below test one entry at a time, the way the
    # arguments are documented, and indexing numpy arrays per entry would dominate the suite.
    as_list = lambda x: None if x is None else np.asarray(x).tolist()  # noqa: E731
    q_lengths, kv_lengths, q_seg, kv_seg = map(as_list, (q_lengths, kv_lengths, q_seg, kv_seg))

    def at(x, b):
        for i in b:
            x = x[i]
        return x

    for idx in np.ndindex(*batch, n):
        b = idx[:-1]
        d = None if dense_b is None else dense_b[idx].tolist()
        ql = None if q_lengths is None else at(q_lengths, b)
        kl = None if kv_lengths is None else at(kv_lengths, b)
        qs = None if q_seg is None else at(q_seg, b)
        ks = None if kv_seg is None else at(kv_seg, b)
        rows = out[idx]
        for i in range(t):
            for j in range(s):
                ok = True
                if is_causal:
                    ok &= j <= i
                if chunk is not None:
                    ok &= i // chunk == j // chunk
                if window is not None:
                    ok &= i - window[0] <= j <= i + window[1]
                if ql is not None:
                    ok &= i < ql
                if kl is not None:
                    ok &= j < kl
                if qs is not None:
                    ok &= qs[i] == ks[j]
                if d is not None:
                    ok &= d[i][j]
                rows[i, j] = ok
    return out


def mask_kwargs(draw_np: np.random.Generator, batch, n, t, s, choices: dict) -> tuple[dict, dict]:
    """Builds jattn keyword arguments and the matching brute-force arguments."""
    kw, bf = {}, {}
    if choices.get("causal"):
        kw["is_causal"] = True
        bf["is_causal"] = True
    if choices.get("window") is not None:
        kw["local_window_size"] = choices["window"]
        w = choices["window"]
        bf["window"] = (w, w) if isinstance(w, int) else w
    if choices.get("lengths"):
        ql = draw_np.integers(0, t + 1, size=batch).astype(np.int32)
        kl = draw_np.integers(0, s + 1, size=batch).astype(np.int32)
        kw["query_seq_lengths"], kw["key_value_seq_lengths"] = jnp.asarray(ql), jnp.asarray(kl)
        bf["q_lengths"], bf["kv_lengths"] = ql, kl
    if choices.get("segments"):
        qs = np.sort(draw_np.integers(0, 3, size=(*batch, t)), axis=-1).astype(np.int32)
        ks = np.sort(draw_np.integers(0, 3, size=(*batch, s)), axis=-1).astype(np.int32)
        kw["segment_ids"] = (jnp.asarray(qs), jnp.asarray(ks))
        bf["q_seg"], bf["kv_seg"] = qs, ks
    if choices.get("dense"):
        # Broadcast over heads (the common padding-mask case) half the time.
        heads = n if draw_np.random() < 0.5 else 1
        d = draw_np.random((*batch, heads, t, s)) < 0.7
        kw["mask"] = jnp.asarray(d)
        bf["dense"] = d
    if choices.get("chunk") is not None:
        c = masks.Chunked(choices["chunk"])
        kw["mask"] = c if "mask" not in kw else masks.Dense(kw["mask"]) & c
        bf["chunk"] = choices["chunk"]
    return kw, bf


def assert_close(actual, expected, atol, rtol=None, what=""):
    rtol = atol if rtol is None else rtol
    a = np.asarray(jnp.asarray(actual).astype(jnp.float64))
    e = np.asarray(jnp.asarray(expected).astype(jnp.float64))
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    assert np.isfinite(a).all(), f"{what}: non-finite values"
    np.testing.assert_allclose(a, e, atol=atol, rtol=rtol, err_msg=what)


def cases_mask_objects():
    """Composite mask objects and their brute-force equivalents (functions of i, j)."""
    return {
        "causal_offset": (masks.Causal(2), lambda i, j: j <= i + 2),
        "window_or_first": (
            masks.LocalWindow(1, 1) | masks.LocalWindow(None, 0) & ~masks.LocalWindow(0, None),
            lambda i, j: (i - 1 <= j <= i + 1) or (j < i),
        ),
        "not_causal": (~masks.Causal(0), lambda i, j: j > i),
        "left_only": (masks.LocalWindow(2, None), lambda i, j: j >= i - 2),
        "chunked_causal": (
            masks.Chunked(4) & masks.Causal(),
            lambda i, j: i // 4 == j // 4 and j <= i,
        ),
        "chunked_window": (
            masks.Chunked(6) & masks.LocalWindow(2, 1),
            lambda i, j: i // 6 == j // 6 and i - 2 <= j <= i + 1,
        ),
        "two_chunkings": (masks.Chunked(6) & masks.Chunked(3), lambda i, j: i // 3 == j // 3),
        "chunks_or_first": (
            masks.Chunked(5) | masks.LocalWindow(None, 0) & ~masks.LocalWindow(0, None),
            lambda i, j: i // 5 == j // 5 or j < i,
        ),
    }
