"""Benchmark records: the schema, the FLOP convention, the environment, JSON-lines I/O.

A record is one implementation measured on one case (shape, dtype, causal, mode), one
implementation that could not be measured (status other than "ok", with the reason), or one of
the machine's own limits measured at the start of a run (`kind="roofline"`: the matmul rate and
the memory bandwidth). Reports are made from records only, so everything a report shows must be
in here.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
from collections.abc import Iterable, Iterator
from typing import Any, Literal

# 2: `kind` ("attention" or "roofline") and the roofline fields `problem`, `bytes`,
# `gbytes_per_s`. Version 1 records are attention records.
# 3: `Hv` (value head size) and `sinks`; records of versions 1 and 2 read as Hv = H, no sinks.
# 4: kind "train" (a whole training step of a model, `python -m bench train`) with its fields
# `model`, `d_model`, `layers`, `d_ff`, `vocab`, `tokens`, `params`, `matmul_params`,
# `tokens_per_s`; status "skipped" (a peer that could not be set up on this machine, such as
# torch.compile without a working compiler).
# 5: `latent` (the values are each key's first Hv features: jattn is passed the one array with
# `value_dim=Hv`, the peers the slice); records before 5 read as latent = False.
# 6: `evict_bytes` (the caches were emptied before every timed call by reading that many
# bytes: decode cases, `bench.cache`); None, and in records before 6: calls back to back.
SCHEMA_VERSION = 6

Kind = Literal["attention", "roofline", "train"]
KINDS: tuple[Kind, ...] = ("attention", "roofline", "train")
Origin = Literal["ours", "peer", "machine"]

Mode = Literal["fwd", "fwd+bwd", "jvp"]
MODES: tuple[Mode, ...] = ("fwd", "fwd+bwd", "jvp")

Status = Literal["ok", "unsupported", "oom", "error", "absent", "skipped"]
STATUSES: tuple[Status, ...] = ("ok", "unsupported", "oom", "error", "absent", "skipped")

# FlashAttention convention: the backward pass does 2.5x the forward's matmul work
# (five matmuls against two), so forward + backward is 3.5x the forward.
BACKWARD_FACTOR = 2.5
# Forward mode (jax.jvp of q, k, v): the forward plus its tangent, whose logits' tangent is two
# products the size of q kᵀ and whose output's tangent two the size of p v: 3x the forward.
JVP_FACTOR = 2.0


def attention_flops(
    B: int, T: int, S: int, N: int, H: int, *, causal: bool, mode: Mode, Hv: int | None = None
) -> float:
    """FLOPs of attention by the FlashAttention convention.

    Forward: 2·B·N·T·S·(H + Hv) (q kᵀ is 2·T·S·H per head, p v is 2·T·S·Hv; 4·B·N·T·S·H when
    Hv = H, the default), halved when causal. Forward + backward: 3.5× the forward; forward
    mode (``jvp``): 3×. Softmax, sinks and masking are not counted.
    """
    flops = 2.0 * B * N * T * S * (H + (H if Hv is None else Hv))
    if causal:
        flops /= 2
    if mode == "fwd+bwd":
        flops *= 1.0 + BACKWARD_FACTOR
    elif mode == "jvp":
        flops *= 1.0 + JVP_FACTOR
    elif mode != "fwd":
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return flops


@dataclasses.dataclass
class Record:
    """One line of a results file. Times in seconds, memory in bytes; None = not measured."""

    # what was measured
    # "jattn:fused", ... (ours), "jax.nn:xla", "torch.sdpa", ... (peers), or for a roofline
    # record what measured the limit: "xla:matmul", "xla:read" (origin "machine")
    implementation: str
    origin: Origin
    status: Status
    reason: str | None  # why status is not "ok"
    # where
    backend: str  # JAX platform the run saw: "cpu", "gpu" or "tpu"
    device_kind: str  # e.g. "cpu", "NVIDIA H100 80GB HBM3", "TPU v5 lite"
    host_cpu: str
    host_cores: int
    versions: dict[str, str | None]
    # the case (None in an "absent" record, which stands for the whole run)
    shape_set: str | None = None
    B: int | None = None
    T: int | None = None
    S: int | None = None
    N: int | None = None
    K: int | None = None
    H: int | None = None  # head size of queries and keys
    Hv: int | None = None  # head size of values and the output (records before 3: H)
    sinks: bool | None = None  # one sink logit per query head passed (records before 3: False)
    # the values are each key's first Hv features, one array (records before 5: False)
    latent: bool | None = None
    dtype: str | None = None
    causal: bool | None = None
    mask: str | None = None  # "causal" or "none"
    mode: Mode | Literal["train"] | None = None  # "train" in a train record
    # timing: wall time of one call after warm-up, inputs already on the device
    repeats: int | None = None
    number: int | None = None  # calls per repeat (more than 1 only for very fast calls)
    warmup: int | None = None
    # the caches emptied before every timed call by reading this many bytes (bench.cache;
    # decode cases), each sample one call; None: a sample's calls back to back, caches warm
    evict_bytes: int | None = None
    median_s: float | None = None
    iqr_s: float | None = None  # 75th minus 25th percentile over the repeats
    min_s: float | None = None
    max_s: float | None = None
    compile_s: float | None = None  # trace + lower + compile (JAX); None for eager torch
    flops: float | None = None
    tflops: float | None = None  # flops / median_s / 1e12
    # memory
    xla_argument_bytes: int | None = None  # XLA memory_analysis() of the compiled program
    xla_output_bytes: int | None = None
    xla_temp_bytes: int | None = None
    xla_alias_bytes: int | None = None
    xla_total_bytes: int | None = None  # argument + output + temp - alias
    device_peak_bytes: int | None = None  # allocator high-water mark, see device_peak_scope
    device_peak_scope: str | None = None  # "case" (reset before the case) or "process"
    # CPU threads the implementation was given where the suite sets it (torch on CPU); None
    # where the library decides (XLA's CPU backend uses every core the process may run on).
    threads: int | None = None
    # roofline records: what was run ("2048x2048x2048", "512 MiB"), the bytes it streamed and
    # the bandwidth; a matmul's rate is in `flops` / `tflops` like an attention record's
    kind: Kind = "attention"
    problem: str | None = None
    bytes: int | None = None
    gbytes_per_s: float | None = None
    # train records: the model and its sizes (N: heads, H: head size, T: tokens per sequence,
    # S: the source length of an encoder-decoder), the tokens of a step, the parameter count,
    # the weights of its matmuls (what `flops` counts 6 per token for) and the throughput
    model: str | None = None  # "DecoderLM" or "Transformer"
    d_model: int | None = None
    layers: int | None = None
    d_ff: int | None = None
    vocab: int | None = None
    tokens: int | None = None
    params: int | None = None
    matmul_params: int | None = None
    tokens_per_s: float | None = None
    # bookkeeping
    run_id: str = ""
    timestamp: str = ""
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=False)


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Record))
CASE_FIELDS: tuple[str, ...] = ("B", "T", "S", "N", "K", "H", "dtype", "causal", "mode")
REQUIRED_FIELDS: tuple[str, ...] = (
    "implementation",
    "origin",
    "status",
    "backend",
    "device_kind",
    "versions",
    "schema_version",
)


_NUMBER_FIELDS = ("median_s", "iqr_s", "min_s", "max_s", "compile_s", "flops", "tflops",
                  "gbytes_per_s", "tokens_per_s")  # fmt: skip
_INT_FIELDS = ("B", "T", "S", "N", "K", "H", "Hv", "repeats", "number", "warmup", "bytes",
               "evict_bytes", "d_model", "layers", "d_ff", "vocab", "tokens", "params",
               "matmul_params")  # fmt: skip
TRAIN_FIELDS: tuple[str, ...] = ("model", "d_model", "layers", "N", "d_ff", "vocab", "B", "T")


def measured_fields(timing: Any, xla_memory: dict[str, int] | None) -> dict[str, Any]:
    """The Record fields of a measurement: its samples' statistics (a `bench.timing.Timing`)
    and XLA's memory analysis of the compiled program (keys argument, output, temp, alias,
    total; None when unknown)."""
    mem = xla_memory or {}
    return dict(
        repeats=timing.repeats,
        number=timing.number,
        warmup=timing.warmup,
        evict_bytes=timing.evict_bytes,
        median_s=timing.median_s,
        iqr_s=timing.iqr_s,
        min_s=timing.min_s,
        max_s=timing.max_s,
        **{f"xla_{k}_bytes": mem.get(k) for k in ("argument", "output", "temp", "alias", "total")},
    )


def record_kind(record: dict[str, Any]) -> str:
    """ "attention", "roofline" or "train" (records of schema 1 have no kind: they are
    attention ones)."""
    return record.get("kind") or "attention"


def validate(record: Any) -> None:
    """Raise ValueError if a record read from a file is not one this suite can report on."""
    if not isinstance(record, dict):
        raise ValueError(f"a record is a JSON object, not {type(record).__name__}: {record!r:.80}")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise ValueError(f"record lacks fields {missing}: {record!r:.200}")
    kind = record_kind(record)
    if kind not in KINDS:
        raise ValueError(f"record kind {kind!r} is not one of {KINDS}")
    if record["status"] not in STATUSES:
        raise ValueError(f"record status {record['status']!r} is not one of {STATUSES}")
    origins: tuple[str, ...] = ("machine",) if kind == "roofline" else ("ours", "peer")
    if record["origin"] not in origins:
        raise ValueError(f"a {kind} record's origin {record['origin']!r} is not one of {origins}")
    for name in _NUMBER_FIELDS:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"record field {name!r} must be a number, got {value!r:.40}")
    for name in _INT_FIELDS:
        value = record.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"record field {name!r} must be an integer, got {value!r:.40}")
    for name in ("sinks", "latent"):
        if record.get(name) is not None and not isinstance(record[name], bool):
            raise ValueError(
                f"record field {name!r} must be true or false, got {record[name]!r:.40}"
            )
    if record["status"] == "ok":
        if kind == "roofline":
            needed: tuple[str, ...] = ("dtype", "median_s")
            if record.get("tflops") is None and record.get("gbytes_per_s") is None:
                raise ValueError(f"a roofline record lacks tflops or gbytes_per_s: {record!r:.200}")
        elif kind == "train":
            needed = (*TRAIN_FIELDS, "dtype", "median_s", "flops", "tflops", "tokens_per_s")
        else:
            needed = (*CASE_FIELDS, "median_s", "tflops")
        lacking = [n for n in needed if record.get(n) is None]
        if lacking:
            raise ValueError(f"an 'ok' record lacks {lacking}: {record!r:.200}")
    elif record["status"] != "absent" and not record.get("reason"):
        raise ValueError(f"a {record['status']!r} record must give a reason: {record!r:.200}")


def with_defaults(record: dict[str, Any]) -> dict[str, Any]:
    """The record with the fields of later schema versions filled in as an older record meant
    them: an attention case without `Hv` has value heads of size H, one without `sinks` has none,
    one without `latent` has values of their own. Returns `record` itself, completed in place."""
    if record_kind(record) == "attention":
        if record.get("Hv") is None and record.get("H") is not None:
            record["Hv"] = record["H"]
        for flag in ("sinks", "latent"):
            if record.get(flag) is None and record.get("H") is not None:
                record[flag] = False
    return record


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{os.getpid()}"


class RecordWriter:
    """Appends records to a JSON-lines file, one flush per record, so a crash keeps the rest."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")

    def write(self, record: Record) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_records(paths: Iterable[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Yield the validated records of JSON-lines files, naming file and line on bad input.

    Raises OSError for a file that cannot be opened, ValueError (with the file and line) for
    one that is not UTF-8 text or holds a line that is not a record. Records of older schema
    versions come with the newer fields filled in (`with_defaults`)."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, start=1):  # noqa: B007 (read after the loop)
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                        validate(record)
                    except ValueError as e:  # json.JSONDecodeError is a ValueError
                        raise ValueError(f"{path}:{lineno}: {e}") from None
                    yield with_defaults(record)
            except UnicodeDecodeError:
                raise ValueError(f"{path}: not UTF-8 text (near line {lineno + 1})") from None


# --- environment ---------------------------------------------------------------------------

_VERSIONED = ("jax", "jaxlib", "flax", "numpy", "torch", "tokamax", "jattn")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def versions() -> dict[str, str | None]:
    """Versions of the libraries that matter, without importing them (None = not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _VERSIONED:
        found[dist] = _version(dist)
    found["jattn_commit"] = _git_describe()
    # The C library's allocator settings change CPU training steps by 5-9% (bench.train).
    found["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES")
    return found


def _git_describe() -> str | None:
    """The commit of the jattn checkout this suite runs from, '-dirty' if it has local edits."""
    root = pathlib.Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=10"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@functools.cache
def host_cpu() -> str:
    """The CPU model name, e.g. 'AMD EPYC 7B13', or what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def host_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
