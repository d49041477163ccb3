"""One tiny sweep for the whole bench test package: compiling is most of its cost."""

from __future__ import annotations

import contextlib
import io

import pytest

from bench import __main__ as cli

TINY = "1,32,32,2,2,8"  # B,T,S,N,K,H


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Every default jattn implementation and two peers, both masks and modes, via the CLI
    (what it printed is kept beside it, as tiny.stdout)."""
    out = tmp_path_factory.mktemp("run") / "tiny.jsonl"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(
            [
                "--shape", TINY,
                "--peers", "xla,flax",
                "--repeats", "2",
                "--min-time", "0",
                "--no-progress",
                "--out", str(out),
            ]
        )  # fmt: skip
    out.with_suffix(".stdout").write_text(printed.getvalue(), encoding="utf-8")
    assert code == 0, printed.getvalue()
    return out
