"""The timing loop and the rules for turning a failure into a record status."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np

from bench.records import Status


@dataclasses.dataclass(frozen=True)
class TimingConfig:
    """How to time one case.

    repeats: timed samples; the record reports their median and spread.
    warmup: untimed calls first (at least 1: the first call pays for allocation and caches).
    min_time: a sample runs the call `number` times, with `number` chosen so a sample lasts
      at least this long; very fast calls are then not dominated by timer resolution.
    rounds: the implementations of one case are measured in turn this many times, and each
      record pools its samples from every round. On a shared machine whose speed drifts
      from minute to minute, every implementation then sees the same slow and fast spells,
      and their ratios hold still.
    evict: called, untimed, before every timed call (`bench.cache.Evictor`: empties the
      caches), and every sample is then one call (min_time is not used); None: the calls of
      a sample run back to back. Its `nbytes`, if it has one, goes into the Timing.
    """

    repeats: int = 5
    warmup: int = 1
    min_time: float = 0.01
    rounds: int = 1
    evict: Callable[[], object] | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")
        if self.min_time < 0:
            raise ValueError(f"min_time must be >= 0, got {self.min_time}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be >= 1, got {self.rounds}")


@dataclasses.dataclass(frozen=True)
class Timing:
    median_s: float
    iqr_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int
    warmup: int
    samples: tuple[float, ...] = ()  # seconds per call, one per sample
    evict_bytes: int | None = None  # bytes read before every call (TimingConfig.evict)


_MAX_NUMBER = 1000


def _summary(
    samples: list[float], number: int, warmup: int, evict_bytes: int | None = None
) -> Timing:
    arr = np.asarray(samples)
    q25, q50, q75 = np.percentile(arr, [25, 50, 75])
    return Timing(
        median_s=float(q50),
        iqr_s=float(q75 - q25),
        min_s=float(arr.min()),
        max_s=float(arr.max()),
        repeats=len(samples),
        number=number,
        warmup=warmup,
        samples=tuple(samples),
        evict_bytes=evict_bytes,
    )


def pool(timings: list[Timing]) -> Timing:
    """One timing from the samples of several rounds (TimingConfig.rounds)."""
    if not timings:
        raise ValueError("pool() needs at least one timing")
    return _summary(
        [x for t in timings for x in t.samples],
        number=max(t.number for t in timings),
        warmup=sum(t.warmup for t in timings),
        evict_bytes=timings[0].evict_bytes,
    )


def measure(step: Callable[[], object], config: TimingConfig) -> Timing:
    """Time `step`, which must run one call and wait for its result (block_until_ready).

    After the warm-up, one more call is timed to choose how many calls make one sample; each
    sample is the mean over its calls, and the spread is over samples. With `config.evict`,
    every sample is one call after an eviction.
    """
    for _ in range(config.warmup):
        step()
    if config.evict is not None:
        samples = []
        for _ in range(config.repeats):
            config.evict()
            start = time.perf_counter()
            step()
            samples.append(time.perf_counter() - start)
        return _summary(samples, 1, config.warmup, getattr(config.evict, "nbytes", None))
    start = time.perf_counter()
    step()
    last = time.perf_counter() - start
    number = 1
    if 0 < last < config.min_time:
        number = min(_MAX_NUMBER, math.ceil(config.min_time / last))
    samples = []
    for _ in range(config.repeats):
        start = time.perf_counter()
        for _ in range(number):
            step()
        samples.append((time.perf_counter() - start) / number)
    return _summary(samples, number, config.warmup)


class SkipCase(Exception):
    """Raised by a runner that decides before running that a case cannot be served."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_OOM_MARKERS = ("resource_exhausted", "out of memory", "outofmemory", "can't allocate memory")


def classify(exc: BaseException) -> tuple[Status, str]:
    """The record status and reason for an exception raised while preparing or timing a case."""
    if isinstance(exc, SkipCase):
        return exc.status, exc.reason
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    reason = f"{type(exc).__name__}: {first}"[:500]
    if isinstance(exc, NotImplementedError):
        return "unsupported", reason
    lowered = f"{type(exc).__name__} {text}".lower()
    if isinstance(exc, MemoryError) or any(marker in lowered for marker in _OOM_MARKERS):
        return "oom", reason
    return "error", reason
