"""The machine's own limits, measured at the start of every run: what attention is judged against.

Two figures, each by XLA on the device the sweep runs on, each timed like an attention case but
rated by its fastest sample (a limit is the best the machine does; on a shared machine the median
mixes in the other users' load):

- the matmul rate: one `a @ b` of square `n x n` matrices (2·n³ FLOPs) in each dtype, at XLA's
  default precision (what the attention kernels get). Inputs narrower than float32 (bfloat16,
  float16) are multiplied with float32 accumulation and a float32 result
  (`lax.dot(..., preferred_element_type=float32)`), as attention kernels multiply them: a
  bfloat16 result would let the backend accumulate in bfloat16, or round where a kernel does
  not. n is 2048 on a CPU (about 0.1-0.3 s a call on two cores), 8192 on an accelerator.
- the memory bandwidth: the row sums of a float32 array far larger than the caches (512 MiB by
  default), which reads every byte once and writes almost nothing; row sums rather than one total
  so XLA can spread the reduction over every core. Memory-bound attention (decode: one query row
  against a long cache) cannot beat the time to read K and V once at this rate.

Each limit becomes a record of kind "roofline" (`bench.records.Record`), written before the first
attention record, so a report can give every result as a share of what the machine can do.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from bench.timing import Timing, TimingConfig, measure

# Timing of a limit: a few samples, each at least 50 ms; the fastest one gives the rate.
TIMING = TimingConfig(repeats=5, warmup=1, min_time=0.05)


@dataclasses.dataclass(frozen=True)
class RooflineConfig:
    """What to measure. None: chosen by the backend (`dtypes`: see `default_dtypes`), and for
    `read_bytes` by free memory."""

    dtypes: Sequence[str] | None = None
    matmul_n: int | None = None
    read_bytes: int | None = None
    timing: TimingConfig = TIMING

    def __post_init__(self) -> None:
        if self.matmul_n is not None and self.matmul_n < 1:
            raise ValueError(f"matmul_n must be >= 1, got {self.matmul_n}")
        if self.read_bytes is not None and self.read_bytes < 4096:
            raise ValueError(f"read_bytes must be >= 4096, got {self.read_bytes}")


@dataclasses.dataclass(frozen=True)
class Limit:
    """One measured limit: a matmul (flops set) or a memory read (bytes set)."""

    name: str  # "xla:matmul" or "xla:read"
    dtype: str
    problem: str
    timing: Timing
    compile_s: float
    flops: float | None = None
    bytes: int | None = None

    @property
    def tflops(self) -> float | None:
        """FLOP rate of the fastest sample, in 10^12 per second."""
        return None if self.flops is None else self.flops / self.timing.min_s / 1e12

    @property
    def gbytes_per_s(self) -> float | None:
        """Bytes read per second in the fastest sample, in 10^9."""
        return None if self.bytes is None else self.bytes / self.timing.min_s / 1e9


def default_dtypes(backend: str, sweep_dtypes: Sequence[str]) -> list[str]:
    """float32 always, bfloat16 on accelerators, and every dtype the sweep measures (so on a
    CPU bfloat16 is measured whenever the sweep has bfloat16 cases)."""
    wanted = ["float32", *(["bfloat16"] if backend != "cpu" else []), *sweep_dtypes]
    return list(dict.fromkeys(wanted))


def _matmul_n(backend: str) -> int:
    return 2048 if backend == "cpu" else 8192


def _read_bytes(available: int | None) -> int:
    """512 MiB, or an eighth of the free memory where that is less (never under 64 MiB)."""
    size = 512 * 2**20
    if available is not None:
        size = min(size, max(64 * 2**20, available // 8))
    return size


def _timed(fn, args, timing: TimingConfig) -> tuple[Timing, float]:
    import time

    import jax

    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    return measure(lambda: jax.block_until_ready(compiled(*args)), timing), compile_s


def matmul_fn(dtype: str):
    """The product timed for `dtype`: `a @ b`, accumulated in float32 with a float32 result
    for inputs narrower than float32 (and in the inputs' own type for float32 and wider)."""
    import jax
    import jax.numpy as jnp

    if jnp.dtype(dtype).itemsize >= 4:
        return lambda a, b: a @ b
    return lambda a, b: jax.lax.dot(a, b, preferred_element_type=jnp.float32)


def matmul_limit(n: int, dtype: str, timing: TimingConfig = TIMING) -> Limit:
    """The rate of one `n x n` by `n x n` matmul in `dtype` (random inputs, XLA's default
    precision, float32 accumulation for narrower inputs: `matmul_fn`)."""
    import jax
    import jax.numpy as jnp

    fn = matmul_fn(dtype)  # raises TypeError for a name that is no dtype
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    jax.block_until_ready((a, b))
    t, compile_s = _timed(fn, (a, b), timing)
    problem = f"{n}x{n}x{n}"
    if jnp.dtype(dtype).itemsize < 4:
        problem += ", float32 accumulation"
    return Limit("xla:matmul", dtype, problem, t, compile_s, flops=2.0 * n**3)


def read_limit(nbytes: int, timing: TimingConfig = TIMING) -> Limit:
    """The rate at which XLA reads a float32 array of about `nbytes` (row sums: each byte is
    read once, one float per 64 KiB row is written)."""
    import jax
    import jax.numpy as jnp

    row = 16384  # floats per row: 64 KiB, long enough to stream, many rows to share out
    rows = max(1, nbytes // (4 * row))
    x = jax.random.normal(jax.random.key(1), (rows, row), jnp.float32)
    jax.block_until_ready(x)
    t, compile_s = _timed(lambda x: jnp.sum(x, axis=1), (x,), timing)
    size = rows * row * 4
    return Limit("xla:read", "float32", f"{size / 2**20:.0f} MiB", t, compile_s, bytes=size)


def measure_limits(
    backend: str, config: RooflineConfig, sweep_dtypes: Sequence[str] = ()
) -> list[Limit | tuple[str, str, str]]:
    """Every limit of `config`; one that fails is `(name, dtype, reason)` instead of a Limit."""
    from bench.runners import _host_available_bytes
    from bench.timing import classify

    out: list[Limit | tuple[str, str, str]] = []
    n = config.matmul_n or _matmul_n(backend)
    dtypes = config.dtypes if config.dtypes is not None else default_dtypes(backend, sweep_dtypes)
    for dtype in dtypes:
        try:
            out.append(matmul_limit(n, dtype, config.timing))
        except Exception as e:  # a dtype the backend cannot multiply: say so, go on
            out.append(("xla:matmul", dtype, classify(e)[1]))
    nbytes = config.read_bytes or _read_bytes(_host_available_bytes() if backend == "cpu" else None)
    try:
        out.append(read_limit(nbytes, config.timing))
    except Exception as e:
        out.append(("xla:read", "float32", classify(e)[1]))
    return out


def describe(limits: Sequence[Limit]) -> str:
    """One line: 'float32 matmul 132 GFLOP/s (2048x2048x2048); memory read 20.1 GB/s (512 MiB)'."""
    parts = []
    for limit in limits:
        if limit.tflops is not None:
            parts.append(f"{limit.dtype} matmul {rate(limit.tflops)} ({limit.problem})")
        elif limit.gbytes_per_s is not None:
            parts.append(f"memory read {limit.gbytes_per_s:.1f} GB/s ({limit.problem})")
    return "; ".join(parts)


def rate(tflops: float) -> str:
    """A FLOP rate in the unit that reads best: '132 GFLOP/s', '812 TFLOP/s'."""
    if tflops >= 1:
        return f"{tflops:.3g} TFLOP/s"
    return f"{tflops * 1e3:.3g} GFLOP/s"
