"""The training loop: resume, train with a progress bar, validate, log, save, stop.

:func:`fit` trains a :class:`~examples.trainer.Trainer` from its step (or from the checkpoint
it resumes) up to ``--steps``, validating every ``--eval-every`` steps and at the end, saving
every ``--ckpt-every`` steps and at the end, and stopping after ``--max-minutes``. A
non-finite training loss stops the run (:class:`NonFiniteLoss`) before anything is saved
from the diverged state.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from examples.checkpoints import Checkpoints, Restored
from examples.flags import ExampleError
from examples.trainer import Trainer, count_params

__all__ = ["FitResult", "NonFiniteLoss", "fit"]

Batch = Mapping[str, np.ndarray]


class NonFiniteLoss(ExampleError):
    """The training loss became NaN or infinite."""


@dataclasses.dataclass
class FitResult:
    start_step: int
    end_step: int
    train_seconds: float
    tokens_per_second: float | None
    stopped_early: bool
    history: dict[str, list]
    resumed_from: int | None
    params: int

    def summary(self, args: argparse.Namespace, rate_name: str) -> dict[str, Any]:
        """The summary fields every example reports about its training run."""
        return {
            "params": self.params,
            "implementation": args.implementation,
            "seed": args.seed,
            "step": self.end_step,
            "resumed_from": self.resumed_from,
            "stopped_early": self.stopped_early,
            "train_seconds": round(self.train_seconds, 1),
            rate_name: round(self.tokens_per_second or 0.0),
            "val_loss": round(self.history["val"][-1]["val_loss"], 4),
        }


def fit(
    trainer: Trainer,
    args: argparse.Namespace,
    *,
    get_batch: Callable[[int], Batch],
    count_tokens: Callable[[Batch], int],
    validate: Callable[[], dict[str, float]],
    checkpoints: Checkpoints,
    restored: Restored | None,
    meta: Mapping[str, Any],
    unit: str = "tok",
) -> FitResult:
    """Loads ``restored`` (if any) into ``trainer``, then trains up to ``args.steps``.

    Validates every ``args.eval_every`` steps and at the end (appending to
    ``history["val"]``), logs the mean training loss every ``args.log_every`` steps (to
    ``history["train"]``), saves a checkpoint every ``args.ckpt_every`` steps and at the end
    (its JSON: the command line, ``meta`` such as the vocabulary, and the history), and stops
    early after ``args.max_minutes``.
    The tokens/s shown and returned leave out the first step of the
    run, which includes compilation.
    """
    from tqdm.auto import tqdm

    from examples.flags import jsonable_args

    history: dict[str, list] = {"train": [], "val": []}
    resumed_from = None
    if restored is not None:
        try:
            trainer.load_checkpoint_tree(restored.tree)
        except ValueError as e:
            raise ExampleError(f"--resume: {checkpoints.directory}: {e}") from None
        history = restored.meta["history"]
        resumed_from = trainer.step
        print(f"resumed from step {resumed_from} of {args.ckpt_dir}", flush=True)

    def saved_meta() -> dict[str, Any]:
        return {"args": jsonable_args(args), **meta, "history": history}

    start = trainer.step
    if not isinstance(args.implementation_value, str):  # 'auto' or a list: say what it chose
        ran = kernels_line(trainer.attention_kernels(get_batch(start)))
        print(f"attention: --implementation {args.implementation} runs {ran}", flush=True)
    interactive = sys.stderr.isatty()
    bar = tqdm(
        total=args.steps,
        initial=start,
        desc="train",
        unit="step",
        disable=args.no_progress,
        dynamic_ncols=True,
        mininterval=0.5 if interactive else 30.0,
    )
    began = time.perf_counter()
    pending: list[jax.Array] = []

    def check_losses(done: int) -> np.ndarray:
        # Waits for the pending losses; the first non-finite one ends the run, before any
        # checkpoint of the diverged state is written.
        losses = np.asarray(jax.device_get(pending), np.float64)
        bad = np.flatnonzero(~np.isfinite(losses))
        if bad.size:
            at = done - len(losses) + int(bad[0]) + 1
            kept = checkpoints.steps()
            raise NonFiniteLoss(
                f"the training loss is {losses[bad[0]]} at step {at}: stopped, nothing saved "
                f"from it (checkpoints kept: steps {kept or 'none'}); try a lower --lr or "
                "more --warmup"
            )
        return losses

    def mean_loss(done: int) -> float:
        mean = float(check_losses(done).mean())
        pending.clear()
        return mean

    # Throughput windows run from one log point to the next (each ends by waiting for the
    # pending losses, so the device work is done); the first step of the run (compilation)
    # and the steps cut short by a validation or a checkpoint are left out.
    window_tokens, window_start = 0, None
    total_tokens, timed_seconds = 0, 0.0
    stopped_early = False
    validated_at = None
    try:
        for step in range(start, args.steps):
            batch = get_batch(step)
            loss = trainer.train_step(batch)
            pending.append(loss)
            if window_start is None:
                loss.block_until_ready()
                window_start = time.perf_counter()
            else:
                window_tokens += count_tokens(batch)
            done = step + 1
            if done % args.log_every == 0 or done == args.steps:
                mean = mean_loss(done)
                history["train"].append([done, mean])
                now = time.perf_counter()
                if window_tokens:
                    total_tokens += window_tokens
                    timed_seconds += now - window_start
                    rate = window_tokens / (now - window_start)
                    postfix = {"loss": f"{mean:.4f}", f"{unit}/s": f"{rate:,.0f}"}
                    bar.set_postfix(postfix, refresh=False)
                window_tokens, window_start = 0, now
            bar.update(1)
            last = done == args.steps
            out_of_time = (
                args.max_minutes is not None and time.perf_counter() - began > 60 * args.max_minutes
            )
            if not last and not out_of_time:
                paused = False
                if args.eval_every and done % args.eval_every == 0:
                    _validate(trainer, validate, history, bar)
                    validated_at = done
                    paused = True
                if args.ckpt_every and done % args.ckpt_every == 0:
                    check_losses(done)
                    checkpoints.save(trainer, saved_meta())
                    paused = True
                if paused:
                    window_tokens, window_start = 0, time.perf_counter()
            if out_of_time and not last:
                bar.write(f"stopping at step {done}: --max-minutes {args.max_minutes} reached")
                stopped_early = True
                break
        if pending:
            history["train"].append([trainer.step, mean_loss(trainer.step)])
        train_seconds = time.perf_counter() - began
        bar.close()
        end = trainer.step
        if validated_at != end:  # also after a resume with nothing left to train
            _validate(trainer, validate, history, None)
        checkpoints.save(trainer, saved_meta())
    finally:
        bar.close()
    return FitResult(
        start_step=start,
        end_step=end,
        train_seconds=train_seconds,
        tokens_per_second=total_tokens / timed_seconds if timed_seconds else None,
        stopped_early=stopped_early,
        history=history,
        resumed_from=resumed_from,
        params=count_params(trainer.model),
    )


def kernels_line(names: list[str]) -> str:
    """'cpu' when every attention call runs one kernel, else each with its calls:
    'fused (2 calls), flash (1 call)'."""
    counts = collections.Counter(names)
    if len(counts) <= 1:
        return names[0] if names else "no jattn kernel (no attention call)"
    return ", ".join(f"{n} ({c} call{'s' if c > 1 else ''})" for n, c in counts.items())


def _validate(
    trainer: Trainer,
    validate: Callable[[], dict[str, float]],
    history: dict[str, list],
    bar: Any,
) -> None:
    metrics = validate()
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLoss(
            f"validation at step {trainer.step} gave non-finite {', '.join(bad)}: stopped, "
            "nothing saved from it"
        )
    if history["val"] and history["val"][-1]["step"] == trainer.step:
        history["val"].pop()  # validated again after a resume: one entry per step
    history["val"].append({"step": trainer.step, **metrics})
    line = f"step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
