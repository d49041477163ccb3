"""Every bad option or input file gets one clear line on stderr and a non-zero exit, no traceback;
a run that would measure nothing says so before measuring."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from bench import __main__ as cli

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fake_gpu_records.jsonl"
ROOT = pathlib.Path(__file__).resolve().parents[2]
# a run that would be quick if it got going: a tiny shape, one mode, one mask, one peer
RUN = ["--shape", "1,16,16,1,1,8", "--modes", "fwd", "--causal", "no", "--impls", "none",
       "--peers", "xla", "--repeats", "1", "--min-time", "0", "--no-progress",
       "--no-roofline"]  # fmt: skip


def _fails(argv: list[str], capsys, *named: str) -> str:
    """Run the CLI; assert it exits 2 with one stderr line naming each of `named`."""
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m bench: error: ")
    for word in named:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def _ok_line() -> str:
    return FIXTURE.read_text(encoding="utf-8").splitlines()[1]


# --- report ----------------------------------------------------------------------------------


def test_report_on_an_empty_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    _fails(
        ["report", str(empty), "--out-dir", str(tmp_path / "r")],
        capsys,
        "empty.jsonl",
        "no records",
    )
    assert not (tmp_path / "r").exists()


def test_report_on_a_file_with_no_ok_record(tmp_path, capsys):
    absent = tmp_path / "absent.jsonl"
    lines = [line for line in FIXTURE.read_text().splitlines() if '"status": "absent"' in line]
    absent.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _fails(
        ["report", str(absent), "--out-dir", str(tmp_path / "r")], capsys, "absent.jsonl", "'ok'"
    )


def test_report_on_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    _fails(
        ["report", str(missing), "--out-dir", str(tmp_path / "r")],
        capsys,
        "nope.jsonl",
        "No such file",
    )


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json\n", "Expecting property name"),
        ("[1, 2]\n", "JSON object"),
        ("3\n", "JSON object"),
        ('{"status": "ok"}\n', "lacks fields"),
        ("TWEAK", "must be a number"),
    ],
)
def test_report_on_lines_that_are_not_records(tmp_path, capsys, content, why):
    if content == "TWEAK":  # a good record with a string where a time belongs
        content = json.dumps({**json.loads(_ok_line()), "median_s": "fast"}) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(_ok_line() + "\n" + content, encoding="utf-8")
    _fails(["report", str(bad), "--out-dir", str(tmp_path / "r")], capsys, "bad.jsonl:2", why)


def test_report_on_a_file_that_is_not_text(tmp_path, capsys):
    binary = tmp_path / "results.jsonl"
    binary.write_bytes(_ok_line().encode() + b"\n\xff\xfe\x00garbage\n")
    _fails(
        ["report", str(binary), "--out-dir", str(tmp_path / "r")], capsys, "results.jsonl", "UTF-8"
    )


def test_report_with_an_unknown_baseline(tmp_path, capsys):
    line = _fails(
        ["report", str(FIXTURE), "--baseline", "jax.nn:nosuch", "--out-dir", str(tmp_path / "r")],
        capsys,
        "--baseline",
        "jax.nn:nosuch",
    )
    assert "jax.nn:xla" in line  # the message lists what could be the baseline
    assert not (tmp_path / "r").exists()


def test_report_out_dir_naming_a_file(tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("x", encoding="utf-8")
    _fails(["report", str(FIXTURE), "--out-dir", str(a_file)], capsys, "--out-dir", "names a file")
    assert a_file.read_text(encoding="utf-8") == "x"


def test_report_with_a_good_baseline_other_than_the_default(tmp_path, capsys):
    out_dir = tmp_path / "r"
    assert (
        cli.main(["report", str(FIXTURE), "--baseline", "torch.sdpa", "--out-dir", str(out_dir)])
        == 0
    )
    md = (out_dir / "report.md").read_text(encoding="utf-8")
    assert "speed-up over `torch.sdpa`" in md
    # the fixture times fused at 0.5 and torch at 0.8 of jax.nn:xla: 1.6x over torch
    row = next(line for line in md.splitlines() if line.startswith("| fwd ") and "| 512 " in line)
    assert "(1.60×)" in row and "(1.00×)" in row and "(0.80×)" in row


# --- run -------------------------------------------------------------------------------------


def test_out_naming_a_folder(tmp_path, capsys):
    _fails([*RUN, "--out", str(tmp_path)], capsys, "--out", "folder")


def test_out_where_no_file_can_be(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("x", encoding="utf-8")
    _fails([*RUN, "--out", str(a_file / "r.jsonl")], capsys, "--out", "cannot write")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--torch-threads", "-2"),
        ("--torch-threads", "0"),
        ("--repeats", "0"),
        ("--warmup", "0"),
        ("--seed", "-1"),
        ("--min-time", "-1"),
        ("--min-time", "nan"),
    ],
)
def test_numbers_out_of_range(tmp_path, capsys, option, value):
    out = tmp_path / "r.jsonl"
    _fails([*RUN, option, value, "--out", str(out)], capsys, option, value)
    assert not out.exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("option", "value", "known"),
    [
        ("--impls", "fused,nosuch", "flash"),
        ("--peers", "xla,nosuch", "torch"),
        ("--shapes", "quick,nosuch", "decode"),
        ("--dtypes", "float64", "bfloat16"),
        ("--modes", "bwd", "fwd+bwd"),
        ("--shape", "1,2,3", "B,T,S,N,K,H"),
        ("--shape", "1,8,8,3,2,4", "multiple"),
        ("--shape", "0,8,8,2,2,4", "positive"),
    ],
)
def test_unknown_names_list_the_known_ones(tmp_path, capsys, option, value, known):
    out = tmp_path / "r.jsonl"
    _fails([*RUN, option, value, "--out", str(out)], capsys, option, known)
    assert not out.exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--shape", "8,1,64,2,2,8", "--causal", "yes"],  # decode runs only without a mask
        ["--shape", "1,16,16,1,1,8", "--impls", "none", "--peers", "none"],
        ["--shapes", ""],
        ["--dtypes", ","],
    ],
)
def test_a_selection_that_leaves_nothing_to_measure(tmp_path, capsys, argv):
    out = tmp_path / "r.jsonl"
    line = _fails([*argv, "--no-progress", "--no-roofline", "--out", str(out)], capsys)
    assert any(word in line for word in ("nothing to measure", "no case", "no shape", "no dtype"))
    assert not out.exists()


def test_a_run_where_everything_is_absent_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails
    out = tmp_path / "r.jsonl"
    code = cli.main([*RUN, "--peers", "torch", "--out", str(out)])  # the last --peers counts
    assert code == 1
    assert "nothing was measured" in capsys.readouterr().err
    # the absent record is kept: it says why
    assert [json.loads(line)["status"] for line in out.read_text().splitlines()] == ["absent"]


def test_one_line_from_the_real_command(tmp_path):
    """Through `python -m bench` itself: one stderr line, exit status 2, no traceback."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *RUN,
            "--torch-threads",
            "-2",
            "--out",
            str(tmp_path / "r"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "python -m bench: error: --torch-threads must be >= 1, got -2"
    ]


def test_report_without_the_default_baseline_in_the_files(tmp_path):
    """Only a --baseline given by name must be measured; the default may be missing (a run with
    --peers torch): the report then has no speed-ups."""
    lines = [line for line in FIXTURE.read_text().splitlines() if '"jax.nn:xla"' not in line]
    path = tmp_path / "no-xla.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert cli.main(["report", str(path), "--out-dir", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text(encoding="utf-8")
    assert "| jattn:fused" in md and "| jax.nn:xla" not in md  # no such column
    assert "×)" not in md.split("Machine limits", 1)[1].split("Compute-bound")[0]
