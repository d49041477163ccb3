"""One run of an example, from the command line to the summary.

:func:`launch` parses and checks the flags (before any work), holds the output folder
(:mod:`examples.rundir`), opens the checkpoints (resuming the newest good one with
``--resume``), runs the example's body, and writes the summary with the fields every run
reports last. :class:`Example` ties an entry script's pieces together; its ``main``
turns the problems a user can fix into one line and exit status 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from examples import flags, rundir
from examples.checkpoints import Checkpoints, Restored, open_checkpoints
from examples.summary import seconds, write_summary
from examples.trainer import Trainer

__all__ = ["Example", "RunResult", "launch"]


@dataclasses.dataclass
class RunResult:
    summary: dict[str, Any]
    trainer: Trainer


# body(args, checkpoints, restored) -> (summary, trainer, plots): plots maps names to files.
Body = Callable[
    [argparse.Namespace, Checkpoints, "Restored | None"], tuple[dict, Trainer, dict[str, Any]]
]


def launch(
    args: argparse.Namespace, body: Body, *, name: str, model_args: Sequence[str]
) -> RunResult:
    """Runs ``body(args, checkpoints, restored) -> (summary, trainer, plots)`` in the held
    output folder; adds ``example`` (``name``), ``plots``, ``checkpoint_dir`` and
    ``wall_seconds`` to the summary and writes it."""
    t0 = time.perf_counter()
    with rundir.hold(args.out_dir, args.ckpt_dir):
        checkpoints, restored = open_checkpoints(args, model_args)
        try:
            summary, trainer, plots = body(args, checkpoints, restored)
        finally:
            checkpoints.close()
        summary = {
            "example": name,
            **summary,
            "plots": {k: str(v) for k, v in plots.items()},
            "checkpoint_dir": str(args.ckpt_dir),
            "wall_seconds": seconds(t0),
        }
        write_summary(summary, args.out_dir)
    return RunResult(summary, trainer)


class Example:
    """An example as its entry script declares it: its name and ``--help`` text, its own
    flags (``add_flags(parser)``; ``check(args)`` for the rules between them), the flags that
    shape its model (on ``--resume``, the checkpoint's values win) and, through the
    :meth:`body` decorator, what it does with them."""

    def __init__(
        self,
        prog: str,
        doc: str,
        add_flags: Callable[[argparse.ArgumentParser], None],
        model_args: Sequence[str],
        check: Callable[[argparse.Namespace], None] | None = None,
    ):
        self.prog, self.doc, self.add_flags, self.check = prog, doc, add_flags, check
        self.model_args = model_args
        self._body: Body | None = None

    def body(self, fn: Body) -> Body:
        """Decorates the example's ``fn(args, checkpoints, restored) -> (summary, trainer,
        plots)``: read the data, build and train the model, use it, plot."""
        self._body = fn
        return fn

    def parse_args(self, argv: Sequence[str] | None) -> argparse.Namespace:
        """The checked command line (an argparse error, naming the flag, when it is not)."""
        return flags.parse(self.prog, self.doc, self.add_flags, argv, self.check)

    def run(self, argv: Sequence[str] | None = None) -> RunResult:
        """Parses ``argv``, trains, evaluates and reports; returns the summary and the
        trained state."""
        assert self._body is not None, f"{self.prog} has no @example.body"
        name = self.prog.removesuffix(".py")
        return launch(self.parse_args(argv), self._body, name=name, model_args=self.model_args)

    def main(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Command-line entry point; returns the summary (also written to
        OUT_DIR/summary.json). A problem the user can fix (an
        :class:`~examples.flags.ExampleError`) becomes ``prog: error: ...`` on stderr and
        exit status 1."""
        try:
            return self.run(argv).summary
        except flags.ExampleError as e:
            print(f"{self.prog}: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
