"""One run per output folder: a lock file that a live run holds and a dead one does not.

The lock is ``fcntl.flock`` on ``.run.lock`` in the output folder and in the checkpoint folder,
wherever that lies: a second run that names the first one's checkpoint folder as its own
``--ckpt-dir`` (inside the first run's output folder or not) is refused. The kernel releases
the lock when the process ends, however it ends (``kill -9`` included), so a lock file left
behind by a dead run never blocks the next one; the file records the holder's pid and command
line for the message a second run gets.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from examples.flags import ExampleError

__all__ = ["LOCK_NAME", "RunLocked", "hold"]

LOCK_NAME = ".run.lock"


class RunLocked(ExampleError):
    """Another live process is running in this folder."""


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            raise RunLocked(
                f"{folder} is in use by another run ({holder}); wait for it to finish or "
                "choose another --out-dir / --ckpt-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing releases the lock


@contextlib.contextmanager
def hold(out_dir: Path, ckpt_dir: Path) -> Iterator[None]:
    """Holds the run's folders for the duration of the ``with`` block; raises
    :class:`RunLocked` when another live run holds one of them."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(_lock(out_dir))
        if ckpt_dir.absolute() != out_dir.absolute():
            stack.enter_context(_lock(ckpt_dir))
        yield
