""".ci/run removes its temporary virtual environment however it ends, unless asked to keep it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _ci(tmp: Path, *args: str, path: str | None = None, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "TMPDIR": str(tmp)}
    environ.pop("JATTN_CI_KEEP_VENV", None)  # only what the test sets
    environ.update(env)
    if path is not None:
        environ["PATH"] = path
    return subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_dry_run_removes_its_folder(tmp_path):
    done = _ci(tmp_path, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "+ python -m pytest -n auto -q" in done.stdout
    assert f"+ python3 -m venv {tmp_path}/jattn-ci." in done.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_failed_step_removes_the_folder_and_keeps_the_status(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "python3"
    fake.write_text('#!/bin/sh\nmkdir -p "$3/bin"\nexit 3\n')  # makes the venv, then fails
    fake.chmod(0o755)
    work = tmp_path / "tmp"
    work.mkdir()
    done = _ci(work, path=f"{bin_dir}:{os.environ['PATH']}")
    assert done.returncode == 3
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("how", ["option", "env"])
def test_the_folder_is_kept_when_asked(tmp_path, how):
    if how == "option":
        done = _ci(tmp_path, "--dry-run", "--keep-venv")
    else:
        done = _ci(tmp_path, "--dry-run", JATTN_CI_KEEP_VENV="1")
    assert done.returncode == 0, done.stderr
    (kept,) = tmp_path.iterdir()
    assert f"kept the virtual environment {kept}/venv" in done.stdout
    assert (kept / "venv").is_dir()


def test_an_unknown_option_is_refused(tmp_path):
    done = _ci(tmp_path, "--bogus")
    assert done.returncode == 2 and "unknown option '--bogus'" in done.stderr
