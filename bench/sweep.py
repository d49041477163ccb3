"""A sweep: every runner on every case, one record each, whatever happens to any one of them."""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
from collections.abc import Callable, Sequence
from typing import Literal

from bench.cache import Evictor, evictor_for
from bench.records import (
    Mode,
    Record,
    RecordWriter,
    attention_flops,
    host_cores,
    host_cpu,
    measured_fields,
    new_run_id,
    now,
    versions,
)
from bench.report import limits_line
from bench.roofline import Limit, RooflineConfig, measure_limits
from bench.runners import (
    Case,
    ConfigSpec,
    Measurement,
    Runner,
    Unavailable,
    config_runners,
    our_runners,
    peer_runners,
)
from bench.shapes import Shape
from bench.timing import TimingConfig, classify, pool


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """What to measure. `impls`/`peers` None means every default one; [] means none."""

    shapes: Sequence[tuple[str, Shape]]  # (shape-set name, shape)
    dtypes: Sequence[str] = ("float32",)
    causal: Sequence[bool] = (False, True)
    modes: Sequence[Mode] = ("fwd", "fwd+bwd")
    impls: Sequence[str] | None = None
    peers: Sequence[str] | None = None
    timing: TimingConfig = dataclasses.field(default_factory=TimingConfig)
    seed: int = 0
    torch_threads: int | None = None  # None: every core, like XLA's CPU backend
    # the machine's limits measured first (matmul rate, memory bandwidth); None: not measured
    roofline: RooflineConfig | None = dataclasses.field(default_factory=RooflineConfig)
    # implementations measured again with fields of their tuning config overridden (--config)
    configs: Sequence[ConfigSpec] = ()
    # "auto": decode cases (T = 1) timed with the caches emptied before every call, the rest
    # back to back; "cold" / "warm": every case so (bench.cache)
    cache: Literal["auto", "cold", "warm"] = "auto"


class NothingToMeasure(ValueError):
    """The selection leaves no case or no implementation: a run would measure nothing."""


@dataclasses.dataclass(frozen=True)
class Platform:
    backend: str
    device_kind: str


def current_platform() -> Platform:
    import jax

    return Platform(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind)


def cases(config: SweepConfig) -> list[Case]:
    """The cross product, minus causal runs of shapes that have nothing to mask (decode)."""
    out = []
    for (set_name, shape), dtype, causal, mode in itertools.product(
        config.shapes, config.dtypes, config.causal, config.modes
    ):
        if causal and not shape.allows_causal:
            continue
        out.append(Case(shape=shape, dtype=dtype, causal=causal, mode=mode, shape_set=set_name))
    return out


def _base(name: str, origin: str, platform: Platform, run_id: str) -> dict[str, object]:
    return {
        "implementation": name,
        "origin": origin,
        "backend": platform.backend,
        "device_kind": platform.device_kind,
        "host_cpu": host_cpu(),
        "host_cores": host_cores(),
        "versions": versions(),
        "run_id": run_id,
        "timestamp": now(),
    }


def absent_record(item: Unavailable, platform: Platform, run_id: str) -> Record:
    return Record(
        **_base(item.name, item.origin, platform, run_id),  # type: ignore[arg-type]
        status="absent",
        reason=item.reason,
    )


def roofline_records(
    config: RooflineConfig, platform: Platform, run_id: str, sweep_dtypes: Sequence[str] = ()
) -> tuple[list[Record], list[Limit]]:
    """Measure the machine's limits; each becomes a record (kind "roofline")."""
    records: list[Record] = []
    limits: list[Limit] = []
    for item in measure_limits(platform.backend, config, sweep_dtypes):
        base = _base("", "machine", platform, run_id)
        if isinstance(item, Limit):
            t = item.timing
            base["implementation"] = item.name
            records.append(
                Record(
                    **base,  # type: ignore[arg-type]
                    kind="roofline",
                    status="ok",
                    reason=None,
                    dtype=item.dtype,
                    problem=item.problem,
                    repeats=t.repeats,
                    number=t.number,
                    warmup=t.warmup,
                    median_s=t.median_s,
                    iqr_s=t.iqr_s,
                    min_s=t.min_s,
                    max_s=t.max_s,
                    compile_s=item.compile_s,
                    flops=item.flops,
                    tflops=item.tflops,
                    bytes=item.bytes,
                    gbytes_per_s=item.gbytes_per_s,
                )
            )
            limits.append(item)
        else:
            name, dtype, reason = item
            base["implementation"] = name
            records.append(
                Record(**base, kind="roofline", status="error", reason=reason, dtype=dtype)  # type: ignore[arg-type]
            )
    return records, limits


def cold(case: Case, cache: str) -> bool:
    """Whether `case` is timed with the caches emptied before every call (SweepConfig.cache):
    under "auto", a decode case (one query row, T = 1), which in a model streams a cache far
    larger than the machine's caches (see bench.cache)."""
    return cache == "cold" or (cache == "auto" and case.shape.T == 1)


class _Evictors:
    """One `bench.cache.Evictor` for a sweep, made when a cold case first needs it."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._evictor: Evictor | None = None

    def timing(self, case: Case, config: SweepConfig) -> TimingConfig:
        if not cold(case, config.cache):
            return config.timing
        if self._evictor is None:
            self._evictor = evictor_for(self.backend)
        return dataclasses.replace(config.timing, evict=self._evictor)


def run_case(
    runner: Runner, case: Case, config: SweepConfig, platform: Platform, run_id: str
) -> Record:
    """Measure one case with one runner; a failure becomes a record, never an exception."""
    timing = _Evictors(platform.backend).timing(case, config)
    return case_record(runner, case, [_attempt(runner, case, config, timing)], platform, run_id)


def _attempt(
    runner: Runner, case: Case, config: SweepConfig, timing: TimingConfig
) -> Measurement | BaseException:
    """One round of one runner on one case: its measurement or the exception it raised."""
    try:
        return runner.run(case, timing, seed=config.seed)
    except Exception as e:
        return e
    finally:
        gc.collect()  # drop the case's device buffers before the next one allocates


def case_record(
    runner: Runner,
    case: Case,
    rounds: Sequence[Measurement | BaseException],
    platform: Platform,
    run_id: str,
) -> Record:
    """The record of one runner on one case from its rounds: the first failure, else their
    samples pooled (compile time and memory from the first round)."""
    s = case.shape
    flops = attention_flops(s.B, s.T, s.S, s.N, s.H, causal=case.causal, mode=case.mode, Hv=s.hv)
    fields = {
        **_base(runner.name, runner.origin, platform, run_id),
        "shape_set": case.shape_set,
        "B": s.B,
        "T": s.T,
        "S": s.S,
        "N": s.N,
        "K": s.K,
        "H": s.H,
        "Hv": s.hv,
        "sinks": s.sinks,
        "latent": s.latent,
        "dtype": case.dtype,
        "causal": case.causal,
        "mask": "causal" if case.causal else "none",
        "mode": case.mode,
        "flops": flops,
    }
    for m in rounds:
        if isinstance(m, BaseException):
            status, reason = classify(m)
            return Record(**fields, status=status, reason=reason)  # type: ignore[arg-type]
    m = rounds[0]
    t = pool([r.timing for r in rounds]) if len(rounds) > 1 else m.timing
    return Record(
        **fields,  # type: ignore[arg-type]
        **measured_fields(t, m.xla_memory),
        status="ok",
        reason=None,
        compile_s=m.compile_s,
        tflops=flops / t.median_s / 1e12 if t.median_s > 0 else None,
        device_peak_bytes=m.device_peak_bytes,
        device_peak_scope=m.device_peak_scope,
        threads=m.threads,
    )


def run_sweep(
    config: SweepConfig,
    out_path: str | os.PathLike[str],
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[Record]:
    """Run every runner on every case, appending each record to `out_path` as it is made."""
    from tqdm.auto import tqdm

    platform = current_platform()
    run_id = new_run_id()
    ours, ours_absent = our_runners(platform.backend, config.impls)
    tuned, tuned_absent = config_runners(platform.backend, config.configs)
    peers, peers_absent = (
        ([], [])
        if config.peers == []
        else peer_runners(
            platform.backend,
            platform.device_kind,
            config.peers,
            torch_threads=config.torch_threads,
        )
    )
    runners: list[Runner] = [*ours, *tuned, *peers]
    todo = cases(config)
    if not todo:
        raise NothingToMeasure(
            "the selection leaves no case to measure (decode shapes, T=1, run only without a "
            "causal mask)"
        )
    records: list[Record] = []
    with RecordWriter(out_path) as writer:
        for item in [*ours_absent, *tuned_absent, *peers_absent]:
            record = absent_record(item, platform, run_id)
            writer.write(record)
            records.append(record)
        if not runners:
            return records  # nothing can run: the absent records say why
        if config.roofline is not None:
            limit_records, _ = roofline_records(config.roofline, platform, run_id, config.dtypes)
            for record in limit_records:
                writer.write(record)
                records.append(record)
            if log is not None:
                log(limits_line(limit_records) or "machine limits: none measured")
        n_rounds = config.timing.rounds
        evictors = _Evictors(platform.backend)
        bar = tqdm(
            total=len(todo) * len(runners) * n_rounds,
            unit="run",
            disable=not progress,
            desc="bench",
        )
        with bar:
            for case in todo:
                # Round-robin: every runner once per round, so that all see the same spells
                # of a shared machine's drift; a runner that fails is not tried again.
                tries: dict[int, list[Measurement | BaseException]] = {
                    i: [] for i in range(len(runners))
                }
                timing = evictors.timing(case, config)
                for _ in range(n_rounds):
                    for i, runner in enumerate(runners):
                        if tries[i] and isinstance(tries[i][-1], BaseException):
                            bar.update()
                            continue
                        bar.set_postfix_str(f"{runner.name} {case.label}", refresh=True)
                        tries[i].append(_attempt(runner, case, config, timing))
                        bar.update()
                for i, runner in enumerate(runners):
                    record = case_record(runner, case, tries[i], platform, run_id)
                    writer.write(record)
                    records.append(record)
                    if record.status != "ok" and log is not None:
                        (tqdm.write if progress else log)(
                            f"{record.status}: {runner.name} {case.label}: {record.reason}"
                        )
    return records
