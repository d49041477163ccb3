"""`python -m bench device`: the one-shot device check, in one call, within a time budget.

On the machine it runs on it
1. prints the device and the software (`env`): Python, jax, jaxlib, flax, the jax plugins,
   the driver through `nvidia-smi` where there is one, and what jattn's registry makes of it;
2. runs the shared kernel suite on the GPU (`suite`): `pytest tests/kernels/test_suite.py
   --impls NAME` (tests/conftest.py) once per implementation, each stopping at its first
   failure, the float64 reference on the host CPU;
3. runs the benchmark on the GPU (`bench`): the device's matmul rates (bench/roofline.py), then
   groups of cases in order of priority (bfloat16 before float16, T = 1k-16k at H = 64 and 128,
   causal and not, forward and forward+backward, decode), jattn's kernels beside `jax.nn`
   (xla, cudnn) and tokamax where it imports; then `python -m bench report` of the records;
4. writes `summary.txt` and `summary.json`; every log and record file stays in the `--out`
   folder.

Each phase, and within it each child process, has a time budget; a child that runs out is
stopped and its step says so. Every phase runs in child processes: this one never imports JAX,
so each child has the whole accelerator to itself.

Without a GPU the suite and the benchmark are skipped, and the summary says so. `--quick`
makes every selection tiny; without a GPU it rehearses the suite's and the benchmark's
plumbing on the CPU (`flash` on two suite tests, a tiny sweep), recorded as rehearsals that
verify nothing about any GPU.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
SUITE = "tests/kernels/test_suite.py"
DEFAULT_IMPLS = ("pallas_gpu", "cudnn", "flash", "fused")
DEFAULT_BUDGET_S = 480.0  # 8 minutes, all phases together
MIN_BUDGET_S = 60.0
# Shares of the budget: the environment takes at most ENV_S; of the rest the suite gets
# SUITE_SHARE, the benchmark what the suite leaves (less the report's and the summary's reserve).
ENV_S = 45.0
SUITE_SHARE = 0.5
REPORT_S = 30.0
SLACK_S = 10.0
# The suite tests run in quick mode (and in the CPU rehearsal).
QUICK_TESTS = "test_forward_low_precision or test_oracle_runs_on_host"


class DeviceCheckError(ValueError):
    """A bad option of `python -m bench device`, naming it."""


@dataclasses.dataclass
class Step:
    """One child process (or a step that did not run): what, how it ended, where its log is."""

    phase: str  # "env", "suite", "bench", "report"
    name: str
    status: str  # "ok", "failed", "timed out", "skipped", "not run"
    detail: str = ""
    seconds: float = 0.0
    budget_s: float | None = None
    log: str | None = None
    command: list[str] | None = None
    rehearsal: bool = False  # on the CPU, to rehearse the plumbing: verifies no device

    def line(self) -> str:
        what = f"{self.phase} {self.name}".strip() if self.name else self.phase
        if self.rehearsal:
            what += " [CPU rehearsal, not a device result]"
        text = f"{what}: {self.status}"
        if self.detail:
            text += f": {self.detail}"
        if self.status not in ("skipped", "not run"):
            budget = f" of {self.budget_s:.0f} s" if self.budget_s is not None else ""
            text += f" ({self.seconds:.1f} s{budget})"
        return text


# ---------------------------------------------------------------------------------------------
# Child processes.


def _child_env() -> dict[str, str]:
    # A check started from inside a pytest run (tests/bench) must not hand its own run's
    # markers to the suite it starts.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PYTEST_XDIST_", "PYTEST_CURRENT_TEST"))
    }
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_child(
    command: Sequence[str], log_path: pathlib.Path, budget_s: float
) -> tuple[str, int | None, float]:
    """Runs `command` from the repository root, its output to `log_path`, stopped (its whole
    process group) when it outlives `budget_s`. Returns (status, exit code, seconds)."""
    start = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        proc = subprocess.Popen(
            list(command),
            cwd=ROOT,
            env=_child_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stopped with every child of it
        )
        try:
            rc: int | None = proc.wait(timeout=max(budget_s, 0.1))
        except subprocess.TimeoutExpired:
            _stop(proc)
            seconds = time.monotonic() - start
            log.write(
                f"\n[bench device] stopped after {seconds:.1f} s: "
                f"out of its {budget_s:.0f} s budget\n"
            )
            return "timed out", None, seconds
    seconds = time.monotonic() - start
    return ("ok" if rc == 0 else "failed"), rc, seconds


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ---------------------------------------------------------------------------------------------
# The phases, as seen from the parent.


class Clock:
    """The run's deadline, and what is left of it."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.monotonic()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def env_phase(out: pathlib.Path, clock: Clock) -> tuple[Step, dict[str, Any]]:
    budget = min(ENV_S, clock.left())
    cmd = [sys.executable, "-m", "bench.device", "env", str(out)]
    status, rc, seconds = run_child(cmd, out / "env.log", budget)
    info: dict[str, Any] = {}
    if (out / "env.json").is_file():
        info = json.loads((out / "env.json").read_text(encoding="utf-8"))
    detail = ""
    if status == "failed":
        detail = f"exit code {rc}; see env.log"
    elif status == "ok":
        detail = describe_env(info)
    return Step("env", "", status, detail, seconds, budget, "env.log", cmd), info


def describe_env(info: dict[str, Any]) -> str:
    v = info.get("versions", {})
    devices = info.get("devices") or [{}]
    parts = [
        f"{info.get('backend', '?')} ({devices[0].get('device_kind', '?')}"
        + (f" x{len(devices)}" if len(devices) > 1 else "")
        + ")",
        f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, flax {v.get('flax')}",
        f"plugins: {', '.join(info.get('jax_plugins') or []) or 'none'}",
        f"driver: {info.get('driver') or 'no nvidia-smi'}",
    ]
    return "; ".join(parts)


def suite_phase(
    out: pathlib.Path, clock: Clock, info: dict[str, Any], impls: Sequence[str], quick: bool
) -> list[Step]:
    backend = info.get("backend")
    if not (ROOT / SUITE).is_file():
        return [Step("suite", "", "skipped", f"{SUITE} is not in {ROOT}: run from a clone")]
    budget = max(0.0, (clock.left() - REPORT_S - SLACK_S) * SUITE_SHARE)
    if backend != "gpu":
        steps = [Step("suite", "", "skipped", f"no GPU: JAX's backend here is {backend}")]
        if quick:
            steps.append(_suite_run(out, "flash", budget, quick=True, rehearsal=True))
        return steps
    registered = info.get("jattn", {}).get("available", [])
    unavailable = info.get("jattn", {}).get("unavailable", {})
    steps = []
    deadline = time.monotonic() + budget
    todo = list(impls)
    while todo:
        name = todo.pop(0)
        if name not in registered:
            why = unavailable.get(name, f"does not run on {backend}")
            steps.append(Step("suite", name, "not run", f"not available here: {why}"))
            continue
        share = max(0.0, deadline - time.monotonic()) / (len(todo) + 1)
        if share < 5:
            steps.append(Step("suite", name, "not run", "out of time: the suite's budget is spent"))
            continue
        # A kernel that finishes early leaves its time to the ones after it.
        steps.append(_suite_run(out, name, share, quick=quick, rehearsal=False))
    return steps


def _suite_run(
    out: pathlib.Path, name: str, budget: float, *, quick: bool, rehearsal: bool
) -> Step:
    tag = f"{name}-rehearsal" if rehearsal else name
    xml = out / f"suite-{tag}.xml"
    cmd = [
        sys.executable, "-m", "pytest", SUITE, "-x", "-q", "-rfEs", "-p", "no:cacheprovider",
        f"--impls={name}", "--hypothesis-profile=device", f"--junitxml={xml}",
    ]  # fmt: skip
    if quick:
        cmd += ["-k", QUICK_TESTS]
    log = f"suite-{tag}.log"
    status, rc, seconds = run_child(cmd, out / log, budget)
    counts, first_failure = junit_summary(xml)
    detail = counts
    if status == "failed":
        detail += f"; first failure: {first_failure or f'exit code {rc}, see {log}'}"
        detail += f" (stopped there; log {log})"
    elif status == "timed out":
        detail += f"; stopped: out of its {budget:.0f} s budget (log {log})"
    return Step("suite", name, status, detail, seconds, budget, log, cmd, rehearsal)


def junit_summary(path: pathlib.Path) -> tuple[str, str | None]:
    """'N passed, M skipped, F failed' and the first failing test with its message, from a
    pytest junit XML file (absent when pytest was stopped before writing it)."""
    if not path.is_file():
        return "no test report (pytest did not finish)", None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return f"unreadable test report ({e})", None
    passed = skipped = failed = 0
    first = None
    for case in root.iter("testcase"):
        bad = case.find("failure")
        if bad is None:
            bad = case.find("error")
        if bad is not None:
            failed += 1
            if first is None:
                message = (bad.get("message") or "").strip().splitlines()
                first = f"{case.get('name')}: {message[0] if message else bad.tag}"[:400]
        elif case.find("skipped") is not None:
            skipped += 1
        else:
            passed += 1
    return f"{passed} passed, {skipped} skipped, {failed} failed", first


# The benchmark's groups, most wanted first: each is one child `python -m bench.device
# bench-group NAME`, appending to the same records file, until the phase's time is spent.
def bench_groups(quick: bool) -> list[str]:
    if quick:
        return ["quick"]
    return ["bf16", "bf16-decode", "f16", "f16-decode", "bf16-more-lengths"]


def group_config(name: str, backend: str):  # -> bench.sweep.SweepConfig
    """The sweep of one group (imports JAX's side of bench: called in the child)."""
    from bench.roofline import RooflineConfig
    from bench.shapes import Shape
    from bench.sweep import SweepConfig
    from bench.timing import TimingConfig

    def prefill(lengths: Sequence[int]) -> list[Shape]:
        # 16k tokens per call at every length, as the FlashAttention papers measure.
        return [Shape(16384 // t, t, t, n, n, h) for h, n in ((64, 16), (128, 8)) for t in lengths]

    def decode(lengths: Sequence[int]) -> list[Shape]:
        return [Shape(8, 1, s, 32, 8, 128, allows_causal=False) for s in lengths]

    timing = TimingConfig(repeats=3, warmup=1, min_time=0.005)
    peers = ["xla", "cudnn", "tokamax"]
    roofline = None
    if name == "quick":
        shapes = [Shape(1, 64, 64, 2, 2, 16), Shape(2, 1, 128, 4, 2, 16, allows_causal=False)]
        dtypes = ["bfloat16"]
        peers = ["xla", "cudnn"]
        small = backend == "cpu"  # a rehearsal: a tiny matmul and read, not the machine's limit
        roofline = RooflineConfig(
            dtypes=["bfloat16", "float32"],
            matmul_n=256 if small else None,
            read_bytes=16 * 2**20 if small else None,
        )
    elif name in ("bf16", "f16"):
        shapes = prefill((1024, 4096, 16384))
        dtypes = ["bfloat16"] if name == "bf16" else ["float16"]
        if name == "bf16":
            roofline = RooflineConfig(dtypes=["bfloat16", "float16", "float32"])
    elif name in ("bf16-decode", "f16-decode"):
        shapes = decode((4096, 16384))
        dtypes = ["bfloat16"] if name == "bf16-decode" else ["float16"]
    elif name == "bf16-more-lengths":
        shapes, dtypes = prefill((2048, 8192)), ["bfloat16"]
    else:
        raise ValueError(f"unknown benchmark group {name!r}; known: {bench_groups(False)}")
    return SweepConfig(
        shapes=[(f"device-{name}", s) for s in shapes],
        dtypes=dtypes,
        causal=(False, True),
        modes=("fwd", "fwd+bwd"),
        impls=None,  # every jattn kernel that runs on the backend (Pallas included on a GPU)
        peers=peers,
        timing=timing,
        roofline=roofline,
    )


def bench_phase(
    out: pathlib.Path, clock: Clock, info: dict[str, Any], quick: bool
) -> tuple[list[Step], pathlib.Path]:
    records = out / "bench.jsonl"
    backend = info.get("backend")
    rehearsal = backend != "gpu"
    steps: list[Step] = []
    if rehearsal:
        steps.append(Step("bench", "", "skipped", f"no GPU: JAX's backend here is {backend}"))
        if not quick:
            return steps, records
    budget = max(0.0, clock.left() - REPORT_S - SLACK_S)
    deadline = time.monotonic() + budget
    for group in bench_groups(quick):
        left = deadline - time.monotonic()
        if left < 10:
            steps.append(
                Step("bench", group, "not run", "out of time: the benchmark's budget is spent")
            )
            continue
        cmd = [sys.executable, "-m", "bench.device", "bench-group", group, str(records)]
        log = f"bench-{group}.log"
        before = _count_records(records)
        status, rc, seconds = run_child(cmd, out / log, left)
        made = _count_records(records) - before
        detail = f"{made} records"
        if status == "failed":
            detail += f"; exit code {rc}, see {log}"
        elif status == "timed out":
            detail += f"; stopped: out of the benchmark's time ({left:.0f} s left), see {log}"
        steps.append(Step("bench", group, status, detail, seconds, left, log, cmd, rehearsal))
    return steps, records


def _count_records(path: pathlib.Path) -> int:
    if not path.is_file():
        return 0
    with path.open(encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def report_phase(out: pathlib.Path, clock: Clock, records: pathlib.Path, rehearsal: bool) -> Step:
    if not records.is_file():
        return Step("report", "", "skipped", "no benchmark records")
    budget = max(5.0, min(REPORT_S, clock.left()))
    cmd = [
        sys.executable, "-m", "bench", "report", str(records), "--out-dir", str(out / "report"),
    ]  # fmt: skip
    status, rc, seconds = run_child(cmd, out / "report.log", budget)
    detail = "report/report.md and plots" if status == "ok" else f"exit code {rc}, see report.log"
    return Step("report", "", status, detail, seconds, budget, "report.log", cmd, rehearsal)


def bench_figures(records: pathlib.Path) -> dict[str, Any]:
    """From the records: counts by status and the measured matmul rates by dtype."""
    from bench.records import read_records

    if not records.is_file():
        return {}
    counts: dict[str, int] = {}
    matmul: dict[str, float] = {}
    for r in read_records([records]):
        if r.get("kind") == "roofline":
            if r.get("status") == "ok" and r.get("tflops") is not None:
                matmul[r["dtype"]] = r["tflops"]
            continue
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return {"attention_records": counts, "matmul_tflops": matmul}


# ---------------------------------------------------------------------------------------------
# The whole run.


def parse_impls(text: str) -> list[str]:
    names = list(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    if not names:
        raise DeviceCheckError(f"--impls {text!r} names no implementation")
    return names


def prepare_out(out: str | None) -> pathlib.Path:
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = pathlib.Path("results") / f"device-{stamp}"
    else:
        path = pathlib.Path(out)
    if path.exists() and not path.is_dir():
        raise DeviceCheckError(f"--out {str(path)!r} is a file; give a folder")
    if path.is_dir() and any(path.iterdir()):
        raise DeviceCheckError(
            f"--out {str(path)!r} is not empty: give a new folder, so one run's files stay alone"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DeviceCheckError(
            f"--out {str(path)!r}: cannot create it ({e.strerror or e})"
        ) from None
    return path.resolve()


def run_device_check(
    out: str | None,
    *,
    impls: Sequence[str] = DEFAULT_IMPLS,
    budget_s: float = DEFAULT_BUDGET_S,
    quick: bool = False,
    print_fn=print,
) -> int:
    """The whole check; returns 0 when every step that ran passed (skips included), else 1."""
    if not (budget_s >= MIN_BUDGET_S):
        raise DeviceCheckError(f"--budget-s must be >= {MIN_BUDGET_S:.0f} seconds, got {budget_s}")
    path = prepare_out(out)
    clock = Clock(budget_s)
    print_fn(f"python -m bench device: files -> {path} (budget {budget_s:.0f} s)")

    def show(step: Step) -> Step:
        print_fn(f"  {step.line()}")
        return step

    env_step, info = env_phase(path, clock)
    show(env_step)
    if info:
        print_fn((path / "env.txt").read_text(encoding="utf-8").rstrip())
    steps = [env_step]
    if env_step.status == "ok":
        known = set(info.get("jattn", {}).get("registry", [])) | set(
            info.get("jattn", {}).get("unavailable", {})
        )
        unknown = [n for n in impls if n not in known]
        if unknown:
            raise DeviceCheckError(
                f"--impls: unknown implementation {unknown[0]!r}; known: {', '.join(sorted(known))}"
            )
        steps += [show(s) for s in suite_phase(path, clock, info, impls, quick)]
        bench_steps, records = bench_phase(path, clock, info, quick)
        steps += [show(s) for s in bench_steps]
        rehearsal = info.get("backend") != "gpu"
        if any(s.phase == "bench" and s.command for s in bench_steps):
            steps.append(show(report_phase(path, clock, records, rehearsal)))
    else:
        steps.append(show(Step("suite", "", "not run", "the environment could not be read")))
        steps.append(show(Step("bench", "", "not run", "the environment could not be read")))
        records = path / "bench.jsonl"
    figures = bench_figures(records)
    summary = write_summary(path, clock, info, steps, figures, impls, quick)
    print_fn("")
    print_fn((path / "summary.txt").read_text(encoding="utf-8").rstrip())
    return 0 if summary["passed"] else 1


def write_summary(
    path: pathlib.Path,
    clock: Clock,
    info: dict[str, Any],
    steps: Sequence[Step],
    figures: dict[str, Any],
    impls: Sequence[str],
    quick: bool,
) -> dict[str, Any]:
    backend = info.get("backend")
    on_gpu = backend == "gpu"
    bad = [s for s in steps if s.status in ("failed", "timed out")]
    suite = {s.name: s.status for s in steps if s.phase == "suite" and s.name and not s.rehearsal}
    lines = ["== summary: python -m bench device =="]
    if info:
        lines.append(f"machine: {describe_env(info)}")
    if not on_gpu:
        lines.append(
            f"GPU parts SKIPPED: no GPU here (JAX's backend is {backend}); the kernel suite and "
            "the benchmark did not run on a GPU, so nothing here verifies a kernel on one"
            + ("; --quick rehearsed their plumbing on the CPU" if quick else "")
        )
    lines += [s.line() for s in steps]
    if on_gpu:
        for name in impls:
            lines.append(f"suite verdict {name}: {suite.get(name, 'not run')}")
    matmul = figures.get("matmul_tflops") or {}
    if matmul:
        rates = ", ".join(f"{d} {t:.3g} TFLOP/s" for d, t in sorted(matmul.items()))
        lines.append(f"matmul rate ({'CPU rehearsal' if not on_gpu else backend}): {rates}")
    if figures.get("attention_records"):
        counts = ", ".join(f"{n} {k}" for k, n in sorted(figures["attention_records"].items()))
        lines.append(f"benchmark records: {counts} (bench.jsonl)")
    lines.append(
        f"total {clock.elapsed():.0f} s of a {clock.budget_s:.0f} s budget; "
        f"{'all steps that ran passed' if not bad else f'{len(bad)} step(s) failed or timed out'}"
    )
    files = sorted(p.name for p in path.iterdir()) + ["summary.json", "summary.txt"]
    lines.append(f"files in {path}: {', '.join(sorted(set(files)))}")
    summary = {
        "passed": not bad,
        "backend": backend,
        "gpu": on_gpu,
        "gpu_parts": "ran" if on_gpu else "skipped: no GPU",
        "quick": quick,
        "elapsed_s": clock.elapsed(),
        "budget_s": clock.budget_s,
        "suite_verdicts": suite,
        "steps": [dataclasses.asdict(s) for s in steps],
        "bench": figures,
        "env": info,
        "lines": lines,
    }
    (path / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (path / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------------------------------------
# The children's side: `python -m bench.device env OUT` and `... bench-group NAME RECORDS`.


def environment() -> dict[str, Any]:
    """The device and software of this machine, as JAX and jattn see them."""
    import importlib.metadata as md
    import platform
    import shutil

    from bench.records import host_cores, host_cpu, versions

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "host_cpu": host_cpu(),
        "host_cores": host_cores(),
        "versions": versions(),
    }
    plugins = set()
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name.startswith(("jax-cuda", "jax-rocm", "libtpu", "jax-plugin")) or name in (
            "nvidia-cudnn-cu12",
            "nvidia-cuda-runtime-cu12",
            "nvidia-cudnn-cu13",
        ):
            plugins.add(f"{name} {dist.version}")
    for ep in md.entry_points(group="jax_plugins"):
        plugins.add(f"entry point jax_plugins:{ep.name} ({ep.value})")
    info["jax_plugins"] = sorted(plugins)
    if shutil.which("nvidia-smi"):
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
             "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        info["driver"] = q.stdout.strip().replace("\n", "; ") or q.stderr.strip()
    else:
        info["driver"] = None
    import jax

    info["versions"]["jax"] = jax.__version__
    info["backend"] = jax.default_backend()
    info["devices"] = [
        {
            "id": d.id,
            "platform": d.platform,
            "device_kind": d.device_kind,
            "compute_capability": getattr(d, "compute_capability", None),
        }
        for d in jax.devices()
    ]
    import jattn.kernels as K

    backend = info["backend"]
    info["jattn"] = {
        "registry": sorted(K.REGISTRY),
        "available": K.available(backend),
        "unavailable": dict(K.UNAVAILABLE),
        "verified_on_device": {n: sorted(b) for n, b in K.VERIFIED_ON_DEVICE.items()},
        "default_order_long": K.default_order(backend, 4096, 4096),
        "default_order_short": K.default_order(backend, 8, 8),
    }
    return info


def _env_main(out: pathlib.Path) -> int:
    import shutil

    import jax

    info = environment()
    text = [
        f"backend: {info['backend']}; devices: "
        + ", ".join(f"{d['device_kind']} ({d['platform']} {d['id']})" for d in info["devices"]),
        "versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v),
        f"jax plugins: {', '.join(info['jax_plugins']) or 'none'}",
        f"driver (nvidia-smi): {info['driver'] or 'no nvidia-smi'}",
        f"jattn available here: {', '.join(info['jattn']['available'])}; default order "
        f"(long calls): {' -> '.join(info['jattn']['default_order_long'])}",
        "jattn verified on device: "
        + ", ".join(
            f"{n}: {', '.join(b) or 'none'}" for n, b in info["jattn"]["verified_on_device"].items()
        ),
        "",
        jax.print_environment_info(return_string=True).rstrip(),
    ]
    (out / "env.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    (out / "env.txt").write_text("\n".join(text) + "\n", encoding="utf-8")
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30)
        (out / "nvidia-smi.txt").write_text(smi.stdout + smi.stderr, encoding="utf-8")
    print("\n".join(text))
    return 0


def _bench_group_main(group: str, records: pathlib.Path) -> int:
    from bench.report import run_table
    from bench.sweep import current_platform, run_sweep

    config = group_config(group, current_platform().backend)
    made = run_sweep(config, records, progress=False, log=lambda m: print(m, flush=True))
    print(run_table(made), flush=True)
    ok = [r for r in made if r.kind == "attention" and r.status == "ok"]
    print(f"{len(made)} records ({len(ok)} measured) appended to {records}", flush=True)
    return 0 if ok else 1


def _child_main(argv: Sequence[str]) -> int:
    if len(argv) == 2 and argv[0] == "env":
        return _env_main(pathlib.Path(argv[1]))
    if len(argv) == 3 and argv[0] == "bench-group":
        return _bench_group_main(argv[1], pathlib.Path(argv[2]))
    print(
        "usage: python -m bench.device env OUT | bench-group NAME RECORDS "
        "(the children of `python -m bench device`)",
        file=sys.stderr,
    )
    return 2


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
