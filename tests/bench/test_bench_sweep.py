"""The sweep: records are complete and honest, failures become records, the CLI runs end to end."""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import pytest

from bench import __main__ as cli
from bench.records import (
    RECORD_FIELDS,
    SCHEMA_VERSION,
    Record,
    attention_flops,
    read_records,
    validate,
)
from bench.report import run_table
from bench.runners import (
    Case,
    Measurement,
    Runner,
    _fits,
    default_jattn_names,
    unavailable_jattn,
)
from bench.shapes import SHAPE_SETS, Shape, parse_shape
from bench.sweep import SweepConfig, cases, current_platform, run_case
from bench.timing import SkipCase, Timing, TimingConfig, classify, measure

TINY = "1,32,32,2,2,8"  # B,T,S,N,K,H: the shape of conftest.tiny_run


def test_flops_follow_the_flash_attention_convention():
    fwd = attention_flops(2, 128, 256, 4, 64, causal=False, mode="fwd")
    assert fwd == 4 * 2 * 4 * 128 * 256 * 64
    assert attention_flops(2, 128, 256, 4, 64, causal=True, mode="fwd") == fwd / 2
    assert attention_flops(2, 128, 256, 4, 64, causal=False, mode="fwd+bwd") == 3.5 * fwd
    assert attention_flops(2, 128, 256, 4, 64, causal=True, mode="fwd+bwd") == 1.75 * fwd
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 1, 1, 1, causal=False, mode="bwd")  # type: ignore[arg-type]


def test_tiny_sweep_writes_a_valid_record_per_implementation_and_case(tiny_run):
    records = list(read_records([tiny_run]))  # validates every line
    limits = [r for r in records if r["kind"] == "roofline"]
    records = [r for r in records if r["kind"] == "attention"]
    ours = default_jattn_names(jax.default_backend())
    expected_impls = {f"jattn:{name}" for name in ours} | {"jax.nn:xla", "flax.linen"}
    measured = [r for r in records if r["status"] != "absent"]
    # absent peers (torch, tokamax) are only there when asked for: --peers names two others;
    # absent jattn kernels are those the registry could not load (a native library not built)
    absent = {r["implementation"] for r in records if r["status"] == "absent"}
    assert absent == {f"jattn:{name}" for name in unavailable_jattn()}
    assert {r["status"] for r in measured} == {"ok"}, [r["reason"] for r in measured]
    assert {r["implementation"] for r in measured} == expected_impls
    # 1 shape x 2 masks x 2 modes for every implementation, each exactly once
    assert len(measured) == 4 * len(expected_impls)
    keys = {(r["implementation"], r["causal"], r["mode"]) for r in measured}
    assert len(keys) == len(measured)

    platform = current_platform()
    for r in measured:
        assert set(r) == set(RECORD_FIELDS)
        assert r["origin"] == ("ours" if r["implementation"].startswith("jattn:") else "peer")
        assert (r["backend"], r["device_kind"]) == (platform.backend, platform.device_kind)
        assert r["versions"]["jax"] == jax.__version__
        assert r["versions"]["flax"] is not None
        assert (r["B"], r["T"], r["S"], r["N"], r["K"], r["H"]) == (1, 32, 32, 2, 2, 8)
        assert r["dtype"] == "float32"
        assert r["mask"] == ("causal" if r["causal"] else "none")
        assert r["repeats"] == 2 and r["number"] == 1 and r["warmup"] == 1
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
        assert 0 <= r["iqr_s"] <= r["max_s"] - r["min_s"] + 1e-12
        assert r["compile_s"] > 0
        flops = attention_flops(1, 32, 32, 2, 8, causal=r["causal"], mode=r["mode"])
        assert r["flops"] == flops
        assert r["tflops"] == pytest.approx(flops / r["median_s"] / 1e12)
        # XLA's memory analysis: at least the inputs (q, k, v, and do for fwd+bwd) and output
        n_inputs = 3 if r["mode"] == "fwd" else 4
        assert r["xla_argument_bytes"] == n_inputs * 32 * 2 * 8 * 4
        assert r["xla_total_bytes"] >= r["xla_argument_bytes"] + r["xla_output_bytes"] > 0
    # the machine's limits, measured once at the start of the run, before any attention record
    assert sorted(r["implementation"] for r in limits) == ["xla:matmul", "xla:read"]
    for r in limits:
        assert r["status"] == "ok" and r["origin"] == "machine"
        assert r["run_id"] == records[0]["run_id"]
        assert 0 < r["min_s"] <= r["median_s"] <= r["max_s"]
    matmul = next(r for r in limits if r["implementation"] == "xla:matmul")
    n = 2048 if jax.default_backend() == "cpu" else 8192
    assert matmul["problem"] == f"{n}x{n}x{n}" and matmul["flops"] == 2 * n**3
    assert matmul["tflops"] == pytest.approx(matmul["flops"] / matmul["min_s"] / 1e12)
    read = next(r for r in limits if r["implementation"] == "xla:read")
    assert read["bytes"] >= 64 * 2**20 and read["tflops"] is None
    assert read["gbytes_per_s"] == pytest.approx(read["bytes"] / read["min_s"] / 1e9)
    table = run_table([*limits, *records])
    assert table.startswith("machine limits: float32 matmul ") and "memory read " in table


def test_a_run_prints_the_limits_once_and_ends_with_the_report_command(tiny_run):
    printed = tiny_run.with_suffix(".stdout").read_text(encoding="utf-8")
    assert printed.count("machine limits:") == 1, printed
    assert "float32 matmul " in printed and "memory read " in printed
    last = printed.strip().splitlines()[-1]
    assert last.endswith(f"python -m bench report {tiny_run}"), last
    assert "machine limits:" not in run_table(read_records([tiny_run]), limits=False)


def test_the_cli_prints_a_table(tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    cli.main(["--shape", "1,16,16,1,1,8", "--impls", "none", "--peers", "xla", "--modes", "fwd",
              "--causal", "no", "--repeats", "1", "--no-progress", "--no-roofline",
              "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert "median ms" in printed and "TFLOP/s" in printed
    assert "jax.nn:xla" in printed
    assert f"1 records written to {out}" in printed


def test_missing_peers_are_absent_records_not_errors(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)  # makes `import tokamax` fail
    monkeypatch.setitem(sys.modules, "torch", None)
    out = tmp_path / "absent.jsonl"
    code = cli.main(["--shape", TINY, "--impls", "none", "--peers", "torch,tokamax",
                     "--no-progress", "--out", str(out)])  # fmt: skip
    assert code == 1  # nothing was measured, and the run says so
    records = list(read_records([out]))
    assert sorted(r["implementation"] for r in records) == ["tokamax", "torch.sdpa"]
    for r in records:
        assert r["status"] == "absent"
        assert "not importable" in r["reason"]
        assert r["backend"] == jax.default_backend()


def test_an_unsupported_case_is_a_record_and_the_sweep_goes_on(tmp_path):
    out = tmp_path / "gqa.jsonl"
    cli.main(["--shape", "1,16,16,4,2,8", "--impls", "none", "--peers", "flax,xla",
              "--modes", "fwd", "--causal", "no", "--repeats", "1", "--no-progress",
              "--no-roofline", "--out", str(out)])  # fmt: skip
    by_impl = {r["implementation"]: r for r in read_records([out])}
    assert by_impl["flax.linen"]["status"] == "unsupported"
    assert "KV heads" in by_impl["flax.linen"]["reason"]
    assert by_impl["jax.nn:xla"]["status"] == "ok"


class _Failing(Runner):
    name = "failing"
    origin = "peer"

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def run(self, case: Case, config: TimingConfig, *, seed: int) -> Measurement:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (NotImplementedError("softcap"), "unsupported"),
        (RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8GiB"), "oom"),
        (MemoryError(), "oom"),
        (SkipCase("oom", "does not fit"), "oom"),
        (ValueError("bad"), "error"),
    ],
)
def test_failures_are_classified_into_records(exc, status):
    case = Case(Shape(1, 8, 8, 1, 1, 4), "float32", False, "fwd", "custom")
    config = SweepConfig(shapes=[])
    platform = current_platform()
    record = run_case(_Failing(exc), case, config, platform, run_id="t")
    assert record.status == status
    assert record.reason
    assert record.median_s is None and record.tflops is None
    assert record.flops == attention_flops(1, 8, 8, 1, 4, causal=False, mode="fwd")
    validate(json.loads(record.to_json()))
    assert classify(exc) == (record.status, record.reason)


def test_a_program_that_cannot_fit_is_not_run():
    memory = {"argument": 0, "output": 2**62, "temp": 2**62, "alias": 0, "total": 2**63}
    with pytest.raises(SkipCase) as info:
        _fits(memory, jax.devices()[0])
    assert info.value.status == "oom"
    _fits({"argument": 0, "output": 1, "temp": 1, "alias": 0, "total": 2}, jax.devices()[0])


def test_measure_warms_up_calibrates_and_repeats():
    calls = []
    timing = measure(lambda: calls.append(1), TimingConfig(repeats=3, warmup=2, min_time=0.0))
    assert len(calls) == 2 + 1 + 3  # warm-up, calibration, samples of one call each
    assert timing.number == 1 and timing.repeats == 3
    assert timing.min_s <= timing.median_s <= timing.max_s
    fast = measure(lambda: None, TimingConfig(repeats=2, warmup=1, min_time=1e-3))
    assert fast.number > 1  # a no-op is far below a millisecond: calls are batched per sample


def test_shape_sets_and_parsing():
    assert SHAPE_SETS["quick"] == (
        Shape(1, 1024, 1024, 8, 8, 64),
        Shape(1, 2048, 2048, 8, 8, 64),
        Shape(4, 512, 512, 8, 8, 64),
    )
    assert set(SHAPE_SETS["quick"]) <= set(SHAPE_SETS["full"])
    assert [s.T for s in SHAPE_SETS["long"]] == [8192, 16384, 32768]
    assert all(s.T == 1 and not s.allows_causal for s in SHAPE_SETS["decode"])
    assert parse_shape("2,128,256,8,2,64") == Shape(2, 128, 256, 8, 2, 64)
    assert parse_shape("2,128,8,64") == Shape(2, 128, 128, 8, 8, 64)
    with pytest.raises(ValueError, match="multiple"):
        parse_shape("1,8,8,3,2,4")
    with pytest.raises(ValueError, match="6 or 7 numbers"):
        parse_shape("1,2,3")


def test_decode_shapes_run_without_a_causal_mask():
    config = SweepConfig(shapes=[("decode", s) for s in SHAPE_SETS["decode"][:2]])
    todo = cases(config)
    assert todo and not any(c.causal for c in todo)
    assert len(todo) == 2 * 2  # 2 shapes x (fwd, fwd+bwd), no causal variant


def test_record_schema_round_trips():
    record = Record(
        implementation="x", origin="peer", status="absent", reason="because",
        backend="cpu", device_kind="cpu", host_cpu="c", host_cores=1, versions={},
    )  # fmt: skip
    assert json.loads(record.to_json())["schema_version"] == SCHEMA_VERSION == 6
    assert json.loads(record.to_json())["kind"] == "attention"
    validate(json.loads(record.to_json()))
    with pytest.raises(ValueError, match="reason"):
        validate({**json.loads(record.to_json()), "status": "error", "reason": None})
    with pytest.raises(ValueError, match="lacks"):
        validate({**json.loads(record.to_json()), "status": "ok"})


def test_torch_peer_when_installed(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "torch.jsonl"
    # GQA (N=4, K=2) exercises enable_gqa; both modes exercise no_grad and .backward()
    cli.main(["--shape", "1,16,16,4,2,8", "--impls", "none", "--peers", "torch",
              "--torch-threads", "1", "--repeats", "1", "--min-time", "0", "--no-progress",
              "--no-roofline", "--out", str(out)])  # fmt: skip
    records = list(read_records([out]))
    assert len(records) == 4
    for r in records:
        assert r["implementation"] == "torch.sdpa" and r["status"] == "ok", r["reason"]
        assert r["threads"] == 1 and r["compile_s"] is None
        assert r["versions"]["torch"] is not None
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)


def test_tokamax_peer_runs_whatever_the_command_line(tmp_path, monkeypatch):
    pytest.importorskip("tokamax")
    from absl import flags

    # tokamax reads absl flags on first use; unparsed, absl would parse sys.argv, which holds
    # the suite's own options. Start from unparsed flags and a bench command line.
    flags.FLAGS.unparse_flags()
    out = tmp_path / "tk.jsonl"
    argv = ["--shape", "2,16,24,4,2,8", "--impls", "none", "--peers", "tokamax",
            "--repeats", "1", "--min-time", "0", "--no-progress", "--no-roofline",
            "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["bench", *argv])
    assert cli.main(argv) == 0
    records = list(read_records([out]))
    assert len(records) == 4  # 2 masks x 2 modes, GQA (N=4, K=2) and T != S
    for r in records:
        assert r["implementation"].startswith("tokamax:") and r["status"] == "ok", r["reason"]
        assert r["versions"]["tokamax"] is not None
        assert (r["T"], r["S"], r["N"], r["K"]) == (16, 24, 4, 2)


def test_every_option_and_shape_set_is_documented():
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "benchmarks.md").read_text(
        encoding="utf-8"
    )
    parser = cli._parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("run", "report"):
        for action in subparsers[name]._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}" in doc, f"{name} {flag} is not in docs/benchmarks.md"
    for name in SHAPE_SETS:
        assert f"`{name}`" in doc, f"shape set {name} is not in docs/benchmarks.md"


def test_jattn_implementations_come_from_the_registry(monkeypatch, tmp_path):
    """No kernel name is written into the suite: a new kernel is measured once the registry
    lists it, and one the registry could not load is an absent record with its reason."""
    import dataclasses

    from bench.runners import our_runners
    from jattn import kernels

    fake = dataclasses.replace(kernels.REGISTRY["fused"], name="newkernel")
    monkeypatch.setattr(kernels, "REGISTRY", {**kernels.REGISTRY, "newkernel": fake})
    monkeypatch.setattr(kernels, "available", lambda backend=None: ["newkernel", "fused"])
    monkeypatch.setattr(kernels, "UNAVAILABLE", {"native": "not built (test)"}, raising=False)
    runners, absent = our_runners("cpu", None)
    assert [r.name for r in runners] == ["jattn:newkernel", "jattn:fused"]
    assert [(a.name, a.reason) for a in absent] == [("jattn:native", "not built (test)")]

    emulated = [n for n, impl in kernels.REGISTRY.items() if "cpu" in impl.interpret_backends]
    runners, absent = our_runners("cpu", ["native", *emulated[:1]])
    assert runners == []
    assert absent[0].reason == "not built (test)"
    if emulated:  # Pallas kernels: callable in interpret mode on a CPU, never benchmarked there
        assert "only emulated on cpu" in absent[1].reason

    out = tmp_path / "native.jsonl"
    code = cli.main(["--shape", TINY, "--impls", "native", "--peers", "none", "--no-progress",
                     "--no-roofline", "--out", str(out)])  # fmt: skip
    assert code == 1  # accepted as a name, but nothing could be measured
    (record,) = read_records([out])
    assert (record["implementation"], record["status"]) == ("jattn:native", "absent")
    assert record["reason"] == "not built (test)"


def test_run_sweep_refuses_a_selection_with_no_case(tmp_path):
    from bench.sweep import NothingToMeasure, run_sweep

    decode_only = SweepConfig(
        shapes=[("decode", SHAPE_SETS["decode"][0])], causal=(True,), peers=["xla"], roofline=None
    )
    with pytest.raises(NothingToMeasure, match="no case"):
        run_sweep(decode_only, tmp_path / "r.jsonl", progress=False)
    assert not (tmp_path / "r.jsonl").exists()


def test_the_oracle_is_measured_only_when_named():
    from bench.runners import our_runners

    default, _ = our_runners("cpu", None)
    assert "jattn:reference" not in {r.name for r in default}
    named, _ = our_runners("cpu", ["reference"])
    assert [r.name for r in named] == ["jattn:reference"]


class _Timed(Runner):
    """A runner with made-up samples that logs when it runs."""

    origin = "peer"

    def __init__(self, name: str, log: list[str], fail_on: int | None = None) -> None:
        self.name, self.log, self.fail_on = name, log, fail_on

    def run(self, case: Case, config: TimingConfig, *, seed: int) -> Measurement:
        self.log.append(self.name)
        n = sum(x == self.name for x in self.log)
        if n == self.fail_on:
            raise ValueError("broke in round two")
        samples = tuple(float(n * 10 + i) for i in range(config.repeats))
        timing = Timing(
            median_s=0.0, iqr_s=0.0, min_s=0.0, max_s=0.0, repeats=config.repeats, number=1,
            warmup=config.warmup, samples=samples,
        )  # fmt: skip
        return Measurement(timing=timing)


def test_rounds_interleave_the_runners_and_pool_their_samples(monkeypatch, tmp_path):
    from bench import sweep

    log: list[str] = []
    runners = [_Timed("a", log), _Timed("b", log, fail_on=2)]
    monkeypatch.setattr(sweep, "our_runners", lambda backend, impls: ([], []))
    monkeypatch.setattr(sweep, "peer_runners", lambda *a, **k: (runners, []))
    config = SweepConfig(
        shapes=[("custom", parse_shape(TINY))],
        causal=(False,),
        modes=("fwd",),
        timing=TimingConfig(repeats=2, rounds=3),
        roofline=None,
    )
    a, b = sweep.run_sweep(config, tmp_path / "r.jsonl", progress=False)
    assert log == ["a", "b", "a", "b", "a"]  # in turn; b is not retried after failing
    assert a.status == "ok" and a.repeats == 6
    assert (a.min_s, a.median_s, a.max_s) == (10.0, 20.5, 31.0)  # samples of all three rounds
    assert b.status == "error" and "round two" in b.reason
    with pytest.raises(ValueError, match="rounds"):
        TimingConfig(rounds=0)
