"""`python -m bench device` rehearsed on the CPU: it runs end to end, says the GPU parts were
skipped, and leaves its files in one folder; its steps stop when out of time; bad options are
refused by name."""

from __future__ import annotations

import json
import sys
import time

import pytest

from bench import __main__ as cli
from bench import device


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("device") / "check"
    lines: list[str] = []
    code = device.run_device_check(str(out), quick=True, print_fn=lines.append)
    return code, out, "\n".join(lines)


def test_cpu_rehearsal_runs_end_to_end_and_says_the_gpu_parts_were_skipped(rehearsal):
    code, out, printed = rehearsal
    assert code == 0, printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["passed"] and summary["backend"] == "cpu" and not summary["gpu"]
    assert summary["gpu_parts"] == "skipped: no GPU"
    assert summary["suite_verdicts"] == {}  # no kernel was verified on any device
    text = (out / "summary.txt").read_text()
    assert "GPU parts SKIPPED: no GPU here" in text
    assert "GPU parts SKIPPED: no GPU here" in printed and "== summary" in printed
    steps = {(s["phase"], s["name"]): s for s in summary["steps"]}
    assert steps[("suite", "")]["status"] == "skipped"
    assert steps[("bench", "")]["status"] == "skipped"
    # The rehearsals ran, and are marked as such.
    suite = steps[("suite", "flash")]
    assert suite["rehearsal"] and suite["status"] == "ok"
    assert suite["detail"].startswith("3 passed, 0 skipped, 0 failed")
    bench = steps[("bench", "quick")]
    assert bench["rehearsal"] and bench["status"] == "ok"
    assert "[CPU rehearsal, not a device result]" in text
    # The versions, the records with a bfloat16 matmul rate, the report: all in the folder.
    env = json.loads((out / "env.json").read_text())
    assert env["versions"]["jax"] and env["versions"]["jaxlib"] and "flax" in env["versions"]
    assert env["jattn"]["verified_on_device"] == {"pallas_gpu": [], "pallas_tpu": []}
    assert summary["bench"]["matmul_tflops"]["bfloat16"] > 0
    assert summary["bench"]["attention_records"]["ok"] > 0
    for name in ("env.txt", "env.log", "suite-flash-rehearsal.log", "suite-flash-rehearsal.xml",
                 "bench-quick.log", "bench.jsonl", "report/report.md"):  # fmt: skip
        assert (out / name).is_file(), name
    assert "jax.nn:cudnn" in (out / "bench.jsonl").read_text()  # absent here, and says why


def test_a_step_out_of_time_is_stopped_and_says_so(tmp_path):
    start = time.monotonic()
    cmd = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    status, rc, seconds = device.run_child(cmd, tmp_path / "slow.log", budget_s=1.0)
    assert status == "timed out" and rc is None
    assert 1.0 <= seconds < 15 and time.monotonic() - start < 15
    log = (tmp_path / "slow.log").read_text()
    assert "started" in log and "out of its 1 s budget" in log
    # A suite run out of time says so in its step.
    step = device._suite_run(tmp_path, "flash", 0.5, quick=True, rehearsal=True)
    assert step.status == "timed out" and "out of its 0 s budget" in step.detail
    assert "no test report" in step.detail


def test_gpu_suite_plumbing_with_a_fake_gpu_environment(tmp_path):
    """The GPU path's bookkeeping, fed a GPU environment: a kernel that is not available is
    not run, a failing pytest run is a failed step, and none of it leaks between kernels."""
    info = {"backend": "gpu", "jattn": {"available": ["reference"], "unavailable": {}}}
    steps = device.suite_phase(
        tmp_path, device.Clock(300), info, ["pallas_gpu", "reference"], quick=True
    )
    assert [(s.name, s.status) for s in steps] == [
        ("pallas_gpu", "not run"),
        ("reference", "failed"),  # the oracle is refused by --impls: pytest exits with an error
    ]
    assert "not available here" in steps[0].detail
    assert "first failure" in steps[1].detail and not steps[1].rehearsal
    assert "is the oracle" in (tmp_path / "suite-reference.log").read_text()


def test_junit_summary_names_the_first_failure(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><skipped/></testcase>'
        '<testcase name="c"><failure message="AssertionError: off by 1&#10;more"/></testcase>'
        "</testsuite></testsuites>"
    )
    counts, first = device.junit_summary(xml)
    assert counts == "1 passed, 1 skipped, 1 failed"
    assert first == "c: AssertionError: off by 1"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--budget-s", "10"], "--budget-s must be >= 60"),
        (["--impls", " , "], "--impls"),
        (["--out", "FILE"], "is a file"),
        (["--out", "FULL"], "is not empty"),
        (["--impls", "flash,nope"], "--impls: unknown implementation 'nope'"),
    ],
)
def test_bad_options_are_refused_by_name(tmp_path, capsys, args, message):
    (tmp_path / "FILE").write_text("x")
    (tmp_path / "FULL").mkdir()
    (tmp_path / "FULL" / "x").write_text("x")
    args = [str(tmp_path / a) if a in ("FILE", "FULL") else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "new")]
    assert cli.main(["device", "--quick", *args]) == 2
    assert message in capsys.readouterr().err


def test_help_documents_the_device_mode(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "device" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["device", "--help"])
    text = capsys.readouterr().out
    for option in ("--out", "--impls", "--budget-s", "--quick"):
        assert option in text
