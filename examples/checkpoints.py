"""Orbax checkpoints of a :class:`~examples.trainer.Trainer` that are checked both ways.

- Saving refuses non-finite parameters or optimizer state, records a SHA-256 of every array
  in the checkpoint's JSON ``meta``, reads the checkpoint back and compares it, and only then
  deletes the oldest ones beyond ``keep``: a good checkpoint is never rotated away in favour
  of one that does not verify.
- Restoring takes the newest checkpoint that loads and verifies (its arrays hash to what was
  recorded and are finite); each one that does not is reported in one line and moved aside to
  ``CKPT_DIR/rejected/`` (kept for a post-mortem, out of the way of the next saves).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from examples.flags import ExampleError
from examples.trainer import Trainer, flatten

__all__ = [
    "CheckpointError",
    "Checkpoints",
    "Restored",
    "checksum",
    "open_checkpoints",
    "read_checkpoint",
]


class CheckpointError(ExampleError):
    """A checkpoint folder the run cannot use as asked."""


@dataclasses.dataclass
class Restored:
    """A checkpoint that verified: its step, its arrays (numpy, keyed as saved) and meta."""

    step: int
    tree: dict[str, Any]
    meta: dict[str, Any]


def checksum(flat: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every array's path, dtype, shape and bytes, in path order."""
    h = hashlib.sha256()
    for name in sorted(flat):
        a = np.ascontiguousarray(flat[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _non_finite(flat: Mapping[str, np.ndarray]) -> list[str]:
    return [
        k
        for k, a in flat.items()
        if np.issubdtype(a.dtype, np.inexact) and not np.isfinite(a).all()
    ]


def _quiet_orbax() -> None:
    # Orbax logs every save and restore at INFO through absl; keep the console for results.
    logging.getLogger("absl").setLevel(logging.WARNING)


class Checkpoints:
    """Orbax checkpoints of a :class:`Trainer` plus a JSON ``meta`` dict, keyed by step."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self._ocp = ocp
        self.keep = keep
        self.directory = Path(directory).absolute()
        # Rotation is ours (see the module doc), and saves are synchronous so that each one
        # can be verified before an older one goes. Orbax still writes into a temporary
        # folder and renames it when complete, so a run killed mid-save leaves no half
        # checkpoint behind, only that temporary folder: the run holds the folder's lock
        # (examples.rundir) when it gets here, so any such folder is a dead run's, and goes.
        for stale in self.directory.glob("*.orbax-checkpoint-tmp*"):
            print(f"removing {stale}, left by a run that stopped while saving", flush=True)
            shutil.rmtree(stale, ignore_errors=True)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=None, create=True, enable_async_checkpointing=False
            ),
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainer: Trainer, meta: Mapping[str, Any]) -> None:
        """Saves, verifies and rotates. Raises :class:`CheckpointError` (saving nothing) when
        the state is not finite."""
        step = trainer.step
        tree = trainer.checkpoint_tree()
        flat = flatten(tree)
        bad = _non_finite(flat)
        if bad:
            raise CheckpointError(
                f"not saving step {step}: non-finite values in {', '.join(bad[:3])}"
                + (f" and {len(bad) - 3} more arrays" if len(bad) > 3 else "")
            )
        digest = checksum(flat)
        if step in self.manager.all_steps():
            problem = self._verify(step)
            if problem is None:
                return  # already saved (a resumed run that trained no further)
            self._reject(step, problem)
        ocp = self._ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                meta=ocp.args.JsonSave({**meta, "step": step, "sha256": digest}),
            ),
        )
        self.manager.wait_until_finished()
        problem = self._verify(step)
        if problem is not None:
            self._reject(step, problem)
            raise CheckpointError(
                f"the checkpoint of step {step} did not read back as written ({problem}); "
                f"the older ones in {self.directory} are kept"
            )
        for old in self.steps()[: -self.keep]:
            self.manager.delete(old)

    def _read(self, step: int) -> tuple[dict[str, Any], dict[str, Any]]:
        ocp = self._ocp
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
        return dict(restored["state"]), dict(restored["meta"])

    def _load(self, step: int) -> tuple[Restored | None, str | None]:
        """``(checkpoint, None)`` when step loads and verifies, else ``(None, why not)``."""
        try:
            tree, meta = self._read(step)
        except Exception as e:  # orbax and tensorstore raise many types for a bad file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
            return None, f"it does not load: {type(e).__name__}: {reason[:200]}"
        flat = flatten(tree)
        # The checksum first: damage after saving is what it names precisely (flipped bytes may
        # also read as NaN, which would otherwise hide the cause).
        recorded = meta.get("sha256")
        if recorded is not None and checksum(flat) != recorded:
            return None, "its arrays do not match the checksum recorded when it was saved"
        bad = _non_finite(flat)
        if bad:
            return None, f"non-finite values in {', '.join(bad[:3])}"
        if "args" not in meta:
            return None, "its meta has no 'args'"
        return Restored(step, tree, meta), None

    def _verify(self, step: int) -> str | None:
        return self._load(step)[1]

    def _reject(self, step: int, why: str) -> None:
        stamp = f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        target = self.directory / "rejected" / stamp
        n = 1
        while target.exists() or target.with_name(f"{target.name}.txt").exists():
            n += 1  # a second rejection of this step within the second: keep both
            target = target.with_name(f"{stamp}-{n}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.directory / str(step)), str(target))
        (target.parent / f"{target.name}.txt").write_text(why + "\n", encoding="utf-8")
        self.manager.reload()

    def newest_good(self) -> Restored | None:
        """The newest checkpoint that loads and verifies; each newer one that does not is
        reported in one line and moved to ``rejected/``."""
        for step in reversed(self.steps()):
            restored, why = self._load(step)
            if restored is not None:
                return restored
            print(
                f"checkpoint {self.directory / str(step)} is unusable: {why}; moved to "
                f"{self.directory / 'rejected'}, trying the previous one",
                flush=True,
            )
            self._reject(step, why or "")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def open_checkpoints(
    args: argparse.Namespace, model_args: Sequence[str]
) -> tuple[Checkpoints, Restored | None]:
    """The run's checkpoint folder and, with ``--resume``, its newest good checkpoint (whose
    model settings replace ``args``'). Refuses to overwrite checkpoints silently."""
    checkpoints = Checkpoints(args.ckpt_dir)
    if checkpoints.latest_step() is None:
        if args.resume:
            print(f"--resume: no checkpoint in {args.ckpt_dir}, starting afresh", flush=True)
        return checkpoints, None
    if not args.resume:
        checkpoints.close()
        raise CheckpointError(
            f"{args.ckpt_dir} already holds checkpoints: pass --resume to continue from them "
            "or choose another --ckpt-dir"
        )
    restored = checkpoints.newest_good()
    if restored is None:
        checkpoints.close()
        raise CheckpointError(
            f"--resume: no checkpoint in {args.ckpt_dir} loads and verifies (the rejected ones "
            f"are in {args.ckpt_dir / 'rejected'}); start afresh with another --ckpt-dir"
        )
    restore_model_args(args, restored.meta["args"], model_args)
    return checkpoints, restored


def restore_model_args(
    args: argparse.Namespace, saved: Mapping[str, Any], names: Sequence[str]
) -> None:
    """On ``--resume`` the model's shape comes from the checkpoint; says when flags differ."""
    for name in names:
        if name in saved and getattr(args, name) != saved[name]:
            warnings.warn(
                f"--resume: using the checkpoint's {name}={saved[name]!r} "
                f"(the command line said {getattr(args, name)!r})",
                stacklevel=2,
            )
            setattr(args, name, saved[name])


def read_checkpoint(
    directory: str | Path, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)`` of a checkpoint as saved (numpy leaves), without any model."""
    import jax
    import orbax.checkpoint as ocp

    _quiet_orbax()
    with ocp.CheckpointManager(Path(directory).absolute()) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {directory}")
        restored = manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()),
        )
    tree = jax.tree.map(np.asarray, restored["state"])
    return tree, dict(restored["meta"])
