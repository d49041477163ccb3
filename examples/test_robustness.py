"""What the examples do with bad flags, bad data, a busy output folder, a diverging run and
damaged checkpoints: refuse early with one line naming the flag, file or row, and never
lose (or load) a bad checkpoint in place of a good one.

The runs use test_examples.py's tiny character LM, so they reuse its compiled steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from examples import char_lm, chatbot, classifier, rundir
from examples.checkpoints import CheckpointError, Checkpoints, checksum, read_checkpoint
from examples.test_examples import GUTENBERG
from examples.trainer import flatten

ROOT = Path(__file__).resolve().parents[1]
TINY_LM = [
    "--seq-len", "16", "--batch-size", "4", "--d-model", "16", "--layers", "1", "--heads", "2",
    "--dropout", "0.1", "--prompt", "the ", "--temperature", "0.8", "--gen-length", "8",
    "--top-k", "5", "--seed", "3", "--no-progress",
]  # fmt: skip


@pytest.fixture
def book(tmp_path: Path) -> Path:
    body = "the island rose out of the sea, and the engineer looked at it.\n" * 12
    path = tmp_path / "book.txt"
    path.write_text(GUTENBERG.format(body=body).replace("\n", "\r\n"), encoding="utf-8-sig")
    return path


def lm_args(book: Path, out: Path, *extra: str) -> list[str]:
    return ["--text", str(book), *TINY_LM, "--out-dir", str(out), *extra]


def steps_in(ckpt: Path) -> list[int]:
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.is_dir() else []


def assert_good(ckpt: Path, step: int) -> None:
    """The checkpoint reads back, is finite and hashes to the checksum saved with it."""
    tree, meta = read_checkpoint(ckpt, step)
    flat = flatten(tree)
    assert all(np.isfinite(a).all() for a in flat.values() if a.dtype.kind == "f"), step
    assert checksum(flat) == meta["sha256"], step


# -- flags -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, argv, flag",
    [
        (char_lm, ["--top-k", "0"], "--top-k"),
        (char_lm, ["--layers", "0"], "--layers"),
        (char_lm, ["--lr", "nan"], "--lr"),
        (char_lm, ["--lr", "-1"], "--lr"),
        (char_lm, ["--dropout", "1.5"], "--dropout"),
        (char_lm, ["--temperature", "nan"], "--temperature"),
        (char_lm, ["--temperature", "1", "-0.5"], "--temperature"),
        (char_lm, ["--ckpt-every", "-1"], "--ckpt-every"),
        (char_lm, ["--max-minutes", "inf"], "--max-minutes"),
        (char_lm, ["--val-fraction", "1"], "--val-fraction"),
        (char_lm, ["--seq-len", "1"], "--seq-len"),
        (char_lm, ["--implementation", "fused,nope"], "--implementation"),
        (char_lm, ["--mesh", "data=0"], "--mesh"),
        (char_lm, ["--d-model", "16", "--heads", "3"], "--heads"),
        (chatbot, ["--temperature", "-1"], "--temperature"),
        (chatbot, ["--top-k", "0"], "--top-k"),
        (chatbot, ["--label-smoothing", "1"], "--label-smoothing"),
        (chatbot, ["--steps", "0"], "--steps"),
        (classifier, ["--implementation", "flash"], "--implementation"),
        (classifier, ["--weight-decay", "nan"], "--weight-decay"),
    ],
)
def test_bad_flags_are_refused_before_any_work(module, argv, flag, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--out-dir", str(out)])
    assert e.value.code == 2  # argparse's usage error
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert flag in err and "error" in err, err
    assert not out.exists()  # nothing was started: no folder, no data read


def test_implementation_lists_parse_to_hashable_tuples(tmp_path):
    args = char_lm.parse_args(["--implementation", "fused, reference", "--out-dir", str(tmp_path)])
    assert args.implementation_value == ("fused", "reference")
    assert char_lm.parse_args(["--implementation", "auto"]).implementation_value is None
    # The classifier needs weights and a bias: a list passes if one of its kernels has both.
    args = classifier.parse_args(["--implementation", "flash,fused"])
    assert args.implementation_value == ("flash", "fused")


# -- data ------------------------------------------------------------------------------------


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def test_data_problems_name_the_file_and_the_row(tmp_path, capsys):
    def fails(module, path: Path, text: str | bytes, *argv: str) -> str:
        if isinstance(text, str):
            text = text.encode()
        path.write_bytes(text)
        out = tmp_path / f"out-{path.stem}"
        flag = "--text" if module is char_lm else "--data"
        with pytest.raises(SystemExit) as e:
            module.main([flag, str(path), *argv, "--out-dir", str(out), "--no-progress"])
        assert e.value.code == 1
        line = one_line_error(capsys, module.__name__.rsplit(".", 1)[-1] + ".py")
        assert str(path) in line, line
        return line

    line = fails(chatbot, tmp_path / "empty.csv", "Q,A,label\n,빈 질문,1\n질문만,,0\n")
    assert "0 usable question/answer pairs" in line and "line 2" in line
    cp949 = b"Q,A\n" + "오늘 뭐 해,집에 있어요\n".encode("cp949")
    line = fails(chatbot, tmp_path / "cp949.csv", cp949)
    assert "not UTF-8" in line and "line 2" in line
    line = fails(char_lm, tmp_path / "latin1.txt", "café au lait\n".encode("latin-1") * 40)
    assert "not UTF-8" in line and "line 1" in line
    labels = "Q,A,label\n좋아,네,0\n싫어,응,1\n큰 라벨,?,1000000\n"
    line = fails(classifier, tmp_path / "big.csv", labels)
    assert "line 4" in line and "1000000" in line and "--max-classes" in line
    line = fails(classifier, tmp_path / "gap.csv", "Q,label\n좋아,0\n싫어,2\n밥,2\n")
    assert "no row has label 1" in line
    line = fails(classifier, tmp_path / "cols.csv", "Q,A,label\n좋아,네,0\n", "--label-column", "y")
    assert "no column 'y'" in line
    line = fails(chatbot, tmp_path / "noq.csv", "question,answer\n안녕,네\n")
    assert "no column 'Q', 'A'" in line
    missing = tmp_path / "no-such-file.txt"
    with pytest.raises(SystemExit):
        char_lm.main(["--text", str(missing), "--out-dir", str(tmp_path / "out-missing")])
    line = one_line_error(capsys, "char_lm.py")
    assert str(missing) in line and "cannot read it" in line


# -- the output folder -----------------------------------------------------------------------


def test_a_live_run_holds_its_folder_and_a_finished_one_does_not(book, tmp_path, capsys):
    out = tmp_path / "run"
    # flock locks conflict between open files even within one process: this holder stands
    # for another run (test_kill_9_mid_training_then_resume has a real one in a process).
    with rundir.hold(out, out / "ckpt"):
        with pytest.raises(SystemExit) as e:
            char_lm.main(lm_args(book, out, "--steps", "2"))
        assert e.value.code == 1
        line = one_line_error(capsys, "char_lm.py")
        assert f"{out} is in use by another run (pid {os.getpid()}" in line
        assert not steps_in(out / "ckpt")  # nothing was written
    # The lock file stays, naming its last holder: it no longer blocks.
    assert f"pid {os.getpid()}" in (out / rundir.LOCK_NAME).read_text()
    elsewhere = tmp_path / "elsewhere"  # a --ckpt-dir outside the output folder is held too
    with (
        rundir.hold(out, elsewhere),
        pytest.raises(rundir.RunLocked, match="elsewhere is in use"),
        rundir.hold(tmp_path / "other", elsewhere),
    ):
        pass
    # A second run that takes the first one's checkpoint folder (inside its output folder)
    # as its own --ckpt-dir is refused too.
    with (
        rundir.hold(out, out / "ckpt"),
        pytest.raises(rundir.RunLocked, match="ckpt is in use"),
        rundir.hold(tmp_path / "second", out / "ckpt"),
    ):
        pass


def test_a_dead_runs_half_save_is_cleared(tmp_path, capsys):
    from examples.checkpoints import Checkpoints

    ckpt = tmp_path / "ckpt"
    stale = ckpt / "3.orbax-checkpoint-tmp-1733150000"
    (stale / "state").mkdir(parents=True)
    checkpoints = Checkpoints(ckpt)
    checkpoints.close()
    assert (
        not stale.exists() and "left by a run that stopped while saving" in capsys.readouterr().out
    )


# -- diverging runs and damaged checkpoints ------------------------------------------------------


def test_a_non_finite_loss_stops_the_run_and_saves_nothing_from_it(book, tmp_path, capsys):
    out = tmp_path / "run"
    char_lm.run(lm_args(book, out, "--steps", "2"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        char_lm.main(
            lm_args(book, out, "--resume", "--steps", "12", "--lr", "1e30", "--warmup", "0")
            + ["--ckpt-every", "1", "--log-every", "1"]
        )
    assert e.value.code == 1
    line = one_line_error(capsys, "char_lm.py")
    assert "non-finite" in line or "loss is nan" in line or "loss is inf" in line, line
    kept = steps_in(out / "ckpt")
    assert kept and max(kept) < 12
    for step in kept:
        assert_good(out / "ckpt", step)
    assert not (out / "ckpt" / "rejected").exists()


def test_a_damaged_checkpoint_is_reported_and_the_newest_good_one_used(
    book, tmp_path, capsys, monkeypatch
):
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    argv = lm_args(book, out, "--steps", "4", "--ckpt-every", "1")  # one optimizer: one compile
    char_lm.run(argv)
    assert steps_in(ckpt) == [3, 4]  # two kept
    capsys.readouterr()

    # Bit rot that orbax reads back without complaint: one weight of the newest checkpoint
    # changed under its recorded checksum. (Flipping bytes in its files is no stand-in: where
    # they land in orbax's layout varies from run to run, and some land where nothing reads.)
    real_read = Checkpoints._read
    rotted = []

    def read_rotted(self, step):
        tree, meta = real_read(self, step)
        if step == 4 and not rotted:  # the old step 4 only, not the one saved again
            rotted.append(step)
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            i = next(i for i, a in enumerate(leaves) if np.asarray(a).dtype.kind == "f")
            leaves[i] = np.array(leaves[i], copy=True)
            leaves[i].flat[0] += 1.0
            tree = jax.tree_util.tree_unflatten(treedef, leaves)
        return tree, meta

    monkeypatch.setattr(Checkpoints, "_read", read_rotted)
    again = char_lm.run([*argv, "--resume"])
    monkeypatch.setattr(Checkpoints, "_read", real_read)
    printed = capsys.readouterr().out
    assert f"checkpoint {ckpt / '4'} is unusable: its arrays do not match the checksum" in printed
    assert again.summary["resumed_from"] == 3 and again.summary["step"] == 4
    assert steps_in(ckpt) == [3, 4] and len(list((ckpt / "rejected").glob("4-*.txt"))) == 1
    assert_good(ckpt, 4)

    # A checkpoint that does not load at all (a file of it gone), and then a new one that does
    # not read back as written: both reported, and the good one is not rotated away in
    # favour of the bad one, even when only one is kept.
    (ckpt / "4" / "state" / "manifest.ocdbt").unlink()
    verifying_the_new_save = []

    def read_damaged(self, step):
        tree, meta = real_read(self, step)  # raises for the broken step 4
        if step == 4:
            verifying_the_new_save.append(step)
            tree["params"] = {"x": np.zeros(1)}
        return tree, meta

    monkeypatch.setattr(Checkpoints, "_read", read_damaged)
    monkeypatch.setattr(Checkpoints.__init__, "__kwdefaults__", {"keep": 1})
    with pytest.raises(CheckpointError, match="step 4 did not read back as written"):
        char_lm.run([*argv, "--resume"])
    monkeypatch.undo()
    assert "is unusable: it does not load" in capsys.readouterr().out
    assert verifying_the_new_save == [4]
    assert steps_in(ckpt) == [3]
    assert_good(ckpt, 3)
    assert len(list((ckpt / "rejected").glob("4-*.txt"))) == 3


def test_kill_9_mid_training_then_resume(book, tmp_path, capsys):
    """A run killed with SIGKILL (started as a file, with a list of kernels) leaves its
    folder resumable: its lock dies with it and the last complete checkpoint loads."""
    out, ckpt = tmp_path / "run", tmp_path / "run" / "ckpt"
    argv = lm_args(book, out, "--steps", "500", "--ckpt-every", "1", "--eval-every", "0")
    env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    proc = subprocess.Popen(
        [sys.executable, "examples/char_lm.py", *argv, "--implementation", "fused,reference"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240
        while len(steps_in(ckpt)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        # While it runs, a second run in the folder gets the lock message.
        with pytest.raises(SystemExit):
            char_lm.main(lm_args(book, out, "--steps", "2", "--resume"))
        assert f"in use by another run (pid {proc.pid}" in one_line_error(capsys, "char_lm.py")
        seen = max(steps_in(ckpt))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    latest = max(steps_in(ckpt))
    assert latest >= seen
    resumed = char_lm.run(lm_args(book, out, "--steps", str(latest + 1), "--resume"))
    assert resumed.summary["resumed_from"] == latest
    assert resumed.summary["step"] == latest + 1
    assert_good(ckpt, latest + 1)
