"""What the three examples share: flags, data splits, tokenizers, the jitted training loop with
its progress bar, orbax checkpoints, plots and the final summary.

Determinism: every random choice is a pure function of ``--seed`` and the step number (which
windows or examples make up batch ``s``, the dropout masks of step ``s``), so a run resumed
from a checkpoint at step ``s`` sees exactly what an uninterrupted run would have seen. That
is also why checkpoints hold only parameters, optimizer state and a little JSON: there is no
random-generator state to carry over.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
import time
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn
from jattn.nn import sharding

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "Checkpoints",
    "FitResult",
    "Trainer",
    "add_training_args",
    "batch_indices",
    "count_params",
    "encode_padded",
    "finish_args",
    "fit",
    "jsonable_args",
    "make_optimizer",
    "parse_implementation",
    "plot_attention",
    "plot_losses",
    "plot_token_weights",
    "read_checkpoint",
    "read_csv_columns",
    "read_text",
    "record_attention",
    "open_checkpoints",
    "restore_model_args",
    "show_token",
    "shuffled_split",
    "strip_gutenberg",
    "tail_split",
    "tokenizer_from_json",
    "train_subword_tokenizer",
    "write_summary",
]

Batch = Mapping[str, np.ndarray]
Implementation = str | list[str] | None

# -- command line ------------------------------------------------------------------------------


def add_training_args(
    parser: argparse.ArgumentParser,
    *,
    name: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    eval_every: int,
    implementation: str,
    lr_help: str = "peak learning rate",
) -> None:
    """The flags every example takes, with that example's defaults."""
    g = parser.add_argument_group("training, checkpoints and output")
    g.add_argument(
        "--steps",
        type=int,
        default=steps,
        help="total optimizer steps; a resumed run continues up to this number",
    )
    g.add_argument("--batch-size", type=int, default=batch_size)
    g.add_argument("--lr", type=float, default=lr, help=lr_help)
    g.add_argument("--warmup", type=int, default=warmup, help="learning-rate warm-up steps")
    g.add_argument(
        "--eval-every", type=int, default=eval_every, help="validate every N steps (0: at the end)"
    )
    g.add_argument(
        "--log-every", type=int, default=10, help="average the loss over N steps for the bar"
    )
    g.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop training after this many minutes (then validate, save and report)",
    )
    g.add_argument("--seed", type=int, default=0, help="seeds initialisation, batches, dropout")
    g.add_argument(
        "--implementation",
        default=implementation,
        help="attention kernel: "
        + ", ".join(sorted(jattn.kernels.REGISTRY))
        + ", a comma-separated list tried in order, or 'auto' for jattn's default "
        f"(default: {implementation})",
    )
    g.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs") / name,
        help="plots and summary.json go here (default: %(default)s)",
    )
    g.add_argument(
        "--ckpt-dir",
        type=Path,
        default=None,
        help="orbax checkpoints (default: OUT_DIR/ckpt)",
    )
    g.add_argument(
        "--ckpt-every",
        type=int,
        default=None,
        help="save every N steps (default: at each validation); always saved at the end",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in CKPT_DIR (its model settings win)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--mesh",
        default=None,
        metavar="data=N,model=M",
        help="train on a device mesh: batches split over 'data', parameters and optimizer "
        "state placed by jattn.nn.sharding's rules (FSDP over 'data', tensor parallel over "
        "'model'); e.g. data=4,model=2. On a CPU, XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 makes 8 devices to try it",
    )


def parse_mesh(value: str | None):
    """``--mesh data=4,model=2`` -> a ``jax.sharding.Mesh`` (None when not given)."""
    if not value:
        return None
    sizes = {"data": -1, "model": 1}
    for part in value.split(","):
        name, _, size = part.partition("=")
        if name not in sizes or not size.lstrip("-").isdigit():
            raise SystemExit(f"--mesh expects data=N,model=M, got {value!r}")
        sizes[name] = int(size)
    return sharding.make_mesh(data=sizes["data"], model=sizes["model"])


def parse_implementation(value: str | None) -> Implementation:
    """``--implementation``: 'auto' -> None, 'a,b' -> ['a', 'b'], 'a' -> 'a' (names checked)."""
    if value is None or value == "auto":
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if n not in jattn.kernels.REGISTRY]
    if unknown or not names:
        raise ValueError(
            f"--implementation {value!r}: unknown {unknown}; known: "
            f"{sorted(jattn.kernels.REGISTRY)} or 'auto'"
        )
    return names[0] if len(names) == 1 else names


def finish_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fills the derived defaults of :func:`add_training_args`' flags and checks them."""
    if args.ckpt_dir is None:
        args.ckpt_dir = args.out_dir / "ckpt"
    if args.ckpt_every is None:
        args.ckpt_every = args.eval_every
    for flag in ("steps", "batch_size", "log_every"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    args.implementation_value = parse_implementation(args.implementation)
    return args


# -- data --------------------------------------------------------------------------------------


def read_text(path: str | Path) -> str:
    """A UTF-8 file as text, without a byte-order mark and with ``\\n`` line ends."""
    # newline=None (the default) turns \r\n and \r into \n: Gutenberg files use \r\n.
    with open(path, encoding="utf-8-sig") as f:
        return f.read()


def strip_gutenberg(
    text: str, *, start_marker: str | None = None, end_marker: str | None = None
) -> str:
    """Cuts a Project Gutenberg file down to the book.

    Without markers the book starts after the ``*** START OF ...`` line (and after the
    "Produced by ..." paragraph that often follows it) and ends before ``*** END OF ...`` or
    ``End of the Project Gutenberg`` (whichever comes first). ``start_marker`` / ``end_marker``
    cut at the first line that is exactly that text instead (the start line is kept, the end
    line is not). A text without the markers is returned whole.
    """
    lines = text.split("\n")
    begin, end = 0, len(lines)
    if start_marker is not None:
        hits = [i for i, line in enumerate(lines) if line.strip() == start_marker]
        if not hits:
            raise ValueError(f"start marker {start_marker!r} is not a line of the text")
        begin = hits[0]
    else:
        for i, line in enumerate(lines):
            if line.startswith("*** START OF") or line.startswith("***START OF"):
                begin = i + 1
                # Skip blank lines and a "Produced by" credit paragraph (Gutenberg's, not the
                # author's).
                while begin < end and not lines[begin].strip():
                    begin += 1
                if begin < end and lines[begin].startswith("Produced by"):
                    while begin < end and lines[begin].strip():
                        begin += 1
                break
    if end_marker is not None:
        hits = [i for i in range(begin, end) if lines[i].strip() == end_marker]
        if not hits:
            raise ValueError(f"end marker {end_marker!r} is not a line of the text")
        end = hits[0]
    else:
        for i in range(begin, end):
            if lines[i].startswith(("*** END OF", "***END OF", "End of the Project Gutenberg")):
                end = i
                break
    return "\n".join(lines[begin:end]).strip("\n") + "\n"


def tail_split(n: int, val_fraction: float) -> int:
    """Index where the held-out tail of ``n`` items starts (the last ``val_fraction``)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    return n - max(1, round(n * val_fraction))


def shuffled_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random split of ``range(n)`` into (train, validation) index arrays."""
    perm = np.random.default_rng([seed, 0x5EED]).permutation(n)
    cut = tail_split(n, val_fraction)
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of batch ``step``: epochs of seeded permutations of ``range(n)``.

    A pure function of its arguments, so a resumed run draws the same batches. A batch that
    would run past the end of an epoch is filled from the next one.
    """
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = _epoch_permutation(n, seed, epoch)
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


@lru_cache(maxsize=4)
def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def read_csv_columns(path: str | Path, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a CSV file (read with :mod:`csv`, so quoted commas and newlines are fine).

    Header names are compared without surrounding whitespace; values come back with theirs
    stripped. Raises ``ValueError`` naming the missing columns.
    """
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"{path}: columns {missing} not in the header {header}")
        where = {c: header.index(c) for c in columns}
        rows = []
        for raw in reader:
            if not any(cell.strip() for cell in raw):
                continue  # blank line
            rows.append({c: (raw[i].strip() if i < len(raw) else "") for c, i in where.items()})
    return rows


# -- tokenizers --------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD, BOS, EOS, UNK = range(4)


def train_subword_tokenizer(texts: Iterable[str], *, vocab_size: int, kind: str = "bpe") -> Any:
    """A subword tokenizer (Hugging Face ``tokenizers``) trained on ``texts``.

    ``kind`` is "bpe" or "unigram". Text is NFKC-normalised and split at spaces the way
    SentencePiece does (Metaspace: a word carries its leading space as "▁"), so decoding
    restores the spacing, and Hangul syllables stay whole characters (a byte-level BPE would
    spend three byte tokens on each before learning to merge them). The special tokens take
    ids 0-3: ``<pad> <bos> <eos> <unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
        )
    elif kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            unk_token="<unk>",
            show_progress=False,
        )
    else:
        raise ValueError(f"tokenizer kind must be 'bpe' or 'unigram', got {kind!r}")
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(list(texts), trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise RuntimeError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    return tok


def tokenizer_from_json(text: str) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(text)


def encode_padded(
    sequences: Sequence[Sequence[int]], max_len: int, *, multiple: int = 8, offset: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads id sequences with ``PAD`` into ``int32 [N, L]`` and returns ``(ids, lengths)``.

    Sequences longer than ``max_len`` are cut. ``L - offset`` is the longest length less
    ``offset`` rounded up to a multiple of ``multiple`` (``L`` at most ``max_len``), so
    batches take few distinct shapes and the jitted step compiles only a few times
    (``offset=1`` for targets that lose one token when split into decoder input and output).
    """
    lengths = np.asarray([min(len(s), max_len) for s in sequences], np.int32)
    longest = max(int(lengths.max(initial=1)) - offset, 1)
    width = min(max_len, -(-longest // multiple) * multiple + offset)
    ids = np.full((len(sequences), width), PAD, np.int32)
    for i, s in enumerate(sequences):
        ids[i, : lengths[i]] = s[: lengths[i]]
    return ids, lengths


# -- optimisation and the jitted steps ---------------------------------------------------------


@lru_cache(maxsize=16)
def make_optimizer(
    kind: str,
    lr: float,
    warmup: int,
    steps: int,
    *,
    d_model: int = 0,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """The optimizer of an example, memoised so that equal settings give the same object.

    The optimizer sits in the jitted step's static graph; handing back the very same object
    for equal settings lets a second run in one process (a resumed one, a test) reuse the
    compiled step.

    kind "cosine": AdamW, linear warm-up to ``lr`` then cosine decay to ``lr/10`` at
    ``steps``. kind "noam": Adam(0.9, 0.98, 1e-9) with the Transformer paper's warm-up
    schedule ``lr · d_model^-0.5 · min(s^-0.5, s · warmup^-1.5)`` (``lr`` is its ``scale``).
    """
    from jattn.optim import noam_schedule

    if kind == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=lr / 10
        )
        tx = optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay)
    elif kind == "noam":
        tx = optax.adam(noam_schedule(d_model, warmup, scale=lr), b1=0.9, b2=0.98, eps=1e-9)
    else:
        raise ValueError(f"optimizer kind must be 'cosine' or 'noam', got {kind!r}")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _fold_path(path: tuple[Any, ...], key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Each dropout stream gets its own key, derived from the step key and its place in the
    # model (crc32 of the path: stable across processes, unlike hash()).
    key = jax.random.fold_in(key, zlib.crc32(repr(path).encode()))
    return jax.random.split(key, shape) if shape else key


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _train_step(
    graphdef: Any, loss_fn: Callable, state: Any, batch: Batch, key: jax.Array
) -> tuple[Any, jax.Array]:
    model, optimizer = nnx.merge(graphdef, state)
    # The dropout masks of a step depend on the seed and the step only (see the module doc).
    nnx.reseed(model, dropout=jax.random.fold_in(key, optimizer.step[...]), policy=_fold_path)
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss


@partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef: Any, loss_fn: Callable, state: Any, batch: Batch) -> dict[str, Any]:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return loss_fn(model, batch)[1]


class Trainer:
    """A model and its optimizer held as one NNX state, with jitted train and eval steps.

    ``loss_fn(model, batch) -> (loss, stats)`` must be hashable by value (a module-level
    function or a frozen dataclass): it is a static argument of the compiled steps. ``stats``
    is a dict of sums over the batch (e.g. ``nll_sum``, ``tokens``) that :meth:`evaluate`
    adds up over the validation batches.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]],
        *,
        seed: int,
        mesh: Any = None,
    ):
        model.train()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.loss_fn = loss_fn
        self.dropout_key = jax.random.key(seed + 1)
        # On a mesh: parameters and optimizer moments sharded by path rules, batches split
        # over 'data'; the jitted steps then run as one SPMD program (XLA inserts the
        # collectives).
        self.mesh = mesh
        if mesh is not None:
            self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh))

    @property
    def model(self) -> nnx.Module:
        """The model in evaluation mode (a fresh view of the current state)."""
        model = nnx.merge(self.graphdef, self.state)[0]
        model.eval()
        return model

    @property
    def step(self) -> int:
        return int(nnx.merge(self.graphdef, self.state)[1].step[...])

    def train_step(self, batch: Batch) -> jax.Array:
        batch = _to_device(batch)
        if self.mesh is not None:
            batch = sharding.shard_batch(batch, self.mesh)
        self.state, loss = _train_step(
            self.graphdef, self.loss_fn, self.state, batch, self.dropout_key
        )
        return loss

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Sums the loss function's stats over ``batches``."""
        totals: dict[str, Any] = {}
        for batch in batches:
            stats = _eval_step(self.graphdef, self.loss_fn, self.state, _to_device(batch))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: float(v) for k, v in totals.items()}

    # The pieces a checkpoint holds: parameters and optimizer state (with its step counter).
    def checkpoint_tree(self) -> dict[str, Any]:
        model, optimizer = nnx.merge(self.graphdef, self.state)
        return {
            "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
        }

    def load_checkpoint_tree(self, tree: Mapping[str, Any]) -> None:
        # Host copies: arrays straight from orbax are committed to a device, and committed
        # arguments would make jax compile the steps (and decoding) again.
        tree = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), tree)
        model, optimizer = nnx.merge(self.graphdef, self.state)
        for node, pure in ((model, tree["params"]), (optimizer, tree["optimizer"])):
            state = nnx.state(node, nnx.Param) if node is model else nnx.state(node)
            nnx.replace_by_pure_dict(state, pure)
            nnx.update(node, state)
        self.state = nnx.state((model, optimizer))


def _to_device(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


# -- checkpoints -------------------------------------------------------------------------------


def open_checkpoints(
    args: argparse.Namespace, model_args: Sequence[str]
) -> tuple[Checkpoints, dict[str, Any] | None]:
    """The run's checkpoint directory and, with ``--resume`` and a checkpoint there, its saved
    meta (whose model settings replace ``args``'). Refuses to overwrite checkpoints silently."""
    checkpoints = Checkpoints(args.ckpt_dir)
    if checkpoints.latest_step() is None:
        if args.resume:
            print(f"--resume: no checkpoint in {args.ckpt_dir}, starting afresh", flush=True)
        return checkpoints, None
    if not args.resume:
        checkpoints.close()
        raise SystemExit(
            f"{args.ckpt_dir} already holds checkpoints: pass --resume to continue from them "
            "or choose another --ckpt-dir"
        )
    saved_meta = checkpoints.read_meta()
    restore_model_args(args, saved_meta["args"], model_args)
    return checkpoints, saved_meta


class Checkpoints:
    """Orbax checkpoints of a :class:`Trainer` plus a JSON ``meta`` dict, keyed by step."""

    def __init__(self, directory: str | Path, *, keep: int = 2):
        import orbax.checkpoint as ocp

        _quiet_orbax()
        self._ocp = ocp
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, trainer: Trainer, meta: Mapping[str, Any]) -> None:
        step = trainer.step
        if step in self.manager.all_steps():
            return
        ocp = self._ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(trainer.checkpoint_tree()),
                meta=ocp.args.JsonSave({**meta, "step": step}),
            ),
        )

    def restore(self, trainer: Trainer, step: int | None = None) -> dict[str, Any]:
        """Loads the latest (or given) checkpoint into ``trainer``; returns its meta."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(trainer.checkpoint_tree()),
                meta=ocp.args.JsonRestore(),
            ),
        )
        trainer.load_checkpoint_tree(restored["state"])
        return dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON part only: what an example needs to rebuild its model before restoring."""
        ocp = self._ocp
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def read_checkpoint(
    directory: str | Path, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(arrays, meta)`` of a checkpoint as saved (numpy leaves), without any model."""
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


def _quiet_orbax() -> None:
    # Orbax logs every save and restore at INFO through absl; keep the console for results.
    logging.getLogger("absl").setLevel(logging.WARNING)


# -- the training loop -------------------------------------------------------------------------


@dataclasses.dataclass
class FitResult:
    start_step: int
    end_step: int
    train_seconds: float
    tokens_per_second: float | None
    stopped_early: bool


def fit(
    trainer: Trainer,
    args: argparse.Namespace,
    *,
    get_batch: Callable[[int], Batch],
    count_tokens: Callable[[Batch], int],
    validate: Callable[[], dict[str, float]],
    history: dict[str, list],
    checkpoints: Checkpoints | None,
    meta: Callable[[], dict[str, Any]],
    unit: str = "tok",
) -> FitResult:
    """Trains from ``trainer.step`` up to ``args.steps`` with a progress bar.

    Validates every ``args.eval_every`` steps and at the end (appending to
    ``history["val"]``), logs the mean training loss every ``args.log_every`` steps (to
    ``history["train"]``), saves a checkpoint every ``args.ckpt_every`` steps and at the end,
    and stops early after ``args.max_minutes``. The tokens/s shown and returned leave out the
    first step of the run, which includes compilation.
    """
    from tqdm.auto import tqdm

    start = trainer.step
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
    # Throughput windows run from one log point to the next (each ends by waiting for the
    # pending losses, so the device work is done); the first step of the run (compilation)
    # and the steps cut short by a validation or a checkpoint are left out.
    window_tokens, window_start = 0, None
    total_tokens, timed_seconds = 0, 0.0
    stopped_early = False
    validated_at = None
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
            mean = float(np.mean(jax.device_get(pending)))
            pending.clear()
            history["train"].append([done, mean])
            now = time.perf_counter()
            if window_tokens:
                total_tokens += window_tokens
                timed_seconds += now - window_start
                rate = window_tokens / (now - window_start)
                bar.set_postfix(loss=f"{mean:.4f}", **{f"{unit}/s": f"{rate:,.0f}"}, refresh=False)
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
            if checkpoints is not None and args.ckpt_every and done % args.ckpt_every == 0:
                checkpoints.save(trainer, meta())
                paused = True
            if paused:
                window_tokens, window_start = 0, time.perf_counter()
        if out_of_time and not last:
            bar.write(f"stopping at step {done}: --max-minutes {args.max_minutes} reached")
            stopped_early = True
            break
    if pending:
        history["train"].append([trainer.step, float(np.mean(jax.device_get(pending)))])
    train_seconds = time.perf_counter() - began
    bar.close()
    end = trainer.step
    if validated_at != end:  # also after a resume with nothing left to train
        _validate(trainer, validate, history, None)
    if checkpoints is not None:
        checkpoints.save(trainer, meta())
    return FitResult(
        start_step=start,
        end_step=end,
        train_seconds=train_seconds,
        tokens_per_second=total_tokens / timed_seconds if timed_seconds else None,
        stopped_early=stopped_early,
    )


def _validate(
    trainer: Trainer,
    validate: Callable[[], dict[str, float]],
    history: dict[str, list],
    bar: Any,
) -> None:
    metrics = validate()
    if history["val"] and history["val"][-1]["step"] == trainer.step:
        history["val"].pop()  # validated again after a resume: one entry per step
    history["val"].append({"step": trainer.step, **metrics})
    line = f"step {trainer.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)


# -- plots and the summary ---------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(history: Mapping[str, list], path: Path, *, title: str, ylabel: str) -> Path:
    """Training loss (line) and validation loss (dots) against the step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if history["train"]:
        steps, losses = zip(*history["train"], strict=True)
        ax.plot(steps, losses, label="train", lw=1.2)
    if history["val"]:
        ax.plot(
            [v["step"] for v in history["val"]],
            [v["val_loss"] for v in history["val"]],
            "o-",
            ms=4,
            label="validation",
        )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_attention(
    weights: np.ndarray,
    path: Path,
    *,
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str,
    panel_titles: Sequence[str] | None = None,
    xlabel: str = "key",
    ylabel: str = "query",
) -> Path:
    """Heatmaps of attention weights ``[rows, cols]`` or ``[panels, rows, cols]``.

    Tick labels are the tokens; a token the available fonts cannot draw (Hangul without a
    CJK font installed) is shown by its position instead, and a note says so.
    """
    plt = _pyplot()
    weights = np.asarray(weights, np.float32)
    if weights.ndim == 2:
        weights = weights[None]
    panels, rows, cols = weights.shape
    row_labels, col_labels, note = _drawable_labels(list(row_labels), list(col_labels))
    size = 0.11  # inches per token: room for a 7-point label
    ncols = min(panels, 2)
    width = min(1.8 + size * cols, 8.0) * ncols
    height = min(1.2 + size * rows, 8.0) * math.ceil(panels / ncols)
    fig, axes = plt.subplots(
        math.ceil(panels / ncols), ncols, figsize=(width, height), dpi=100, squeeze=False
    )
    for p, ax in enumerate(axes.flat):
        if p >= panels:
            ax.axis("off")
            continue
        im = ax.imshow(weights[p], cmap="viridis", aspect="auto", vmin=0.0)
        ax.set_xticks(range(cols), col_labels, fontsize=7, rotation=90 if cols > 1 else 0)
        ax.set_yticks(range(rows), row_labels, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if panel_titles is not None:
            ax.set_title(panel_titles[p], fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_token_weights(
    tokens: Sequence[Sequence[str]],
    weights: Sequence[Sequence[float]],
    path: Path,
    *,
    row_labels: Sequence[str],
    title: str,
) -> Path:
    """One row per input: its attention weight on each of its tokens, the token in the cell."""
    plt = _pyplot()
    rows, cols = len(tokens), max(len(t) for t in tokens)
    grid = np.full((rows, cols), np.nan, np.float32)
    for r, w in enumerate(weights):
        grid[r, : len(w)] = w
    flat = [t for row in tokens for t in row]
    drawn, _, note = _drawable_labels(flat, [])
    drawable = [d == f for d, f in zip(drawn, flat, strict=True)]
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.32 * cols, 16), 1.2 + 0.45 * rows), dpi=100)
    im = ax.imshow(grid, cmap="Blues", aspect="auto", vmin=0.0)
    i = 0
    for r, row in enumerate(tokens):
        for c, token in enumerate(row):
            if drawable[i]:
                ax.text(c, r, token, ha="center", va="center", fontsize=8)
            i += 1
    ax.set_yticks(range(rows), row_labels, fontsize=8)
    ax.set_xlabel("token position")
    fig.colorbar(im, ax=ax, fraction=0.03)
    ax.set_title(title + (f"\n{note}" if note else ""), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _drawable_labels(rows: list[str], cols: list[str]) -> tuple[list[str], list[str], str]:
    from matplotlib import font_manager

    font = font_manager.findfont(font_manager.FontProperties())
    try:
        from matplotlib.ft2font import FT2Font

        charmap = set(FT2Font(font).get_charmap())
    except Exception:  # an unreadable font: trust it rather than drop every label
        return rows, cols, ""
    replaced = False

    def fix(labels: list[str]) -> list[str]:
        nonlocal replaced
        out = []
        for i, label in enumerate(labels):
            if all(ord(c) in charmap for c in label):
                out.append(label)
            else:
                out.append(f"#{i}")
                replaced = True
        return out

    rows, cols = fix(rows), fix(cols)
    note = "(text the installed fonts cannot draw: left out or shown as #position)"
    if not replaced:
        note = ""
    return rows, cols, note


def show_token(text: str) -> str:
    """A token as a readable tick label: visible spaces and line ends."""
    return text.replace(" ", "␣").replace("▁", "␣").replace("\n", "⏎") or "∅"


def write_summary(summary: Mapping[str, Any], out_dir: Path) -> Path:
    """Writes ``summary.json`` into ``out_dir`` and prints the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "summary.json"
    text = json.dumps(summary, indent=2, ensure_ascii=False, default=_json_default)
    path.write_text(text + "\n", encoding="utf-8")
    print(text, flush=True)
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.generic, np.ndarray)):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON-friendly values (paths as strings)."""
    out = {}
    for k, v in vars(args).items():
        if k == "implementation_value":
            continue
        out[k] = str(v) if isinstance(v, Path) else v
    return out


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


def seconds(t0: float) -> float:
    return round(time.perf_counter() - t0, 2)


# -- attention weights of a model's layer ------------------------------------------------------


class _Recorder(nnx.Module):
    """Stands in for a MultiHeadAttention and keeps the weights of its last call."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner
        self.weights = nnx.data(None)

    def __call__(self, *args: Any, **kwargs: Any) -> jax.Array:
        out, weights = self.inner(*args, return_weights=True, **kwargs)
        self.weights = nnx.data(weights)
        return out


def record_attention(
    model: nnx.Module, path: Sequence[str | int], run: Callable[[nnx.Module], Any]
) -> np.ndarray:
    """The attention weights ``[*B, heads, T, S]`` of one layer while ``run(model)`` runs.

    ``path`` names a :class:`jattn.nn.MultiHeadAttention` inside ``model`` (e.g.
    ``("layers", -1, "self_attn")``). ``run`` gets an evaluation-mode copy of the model in
    which that layer also returns its weights, computed by the "fused" kernel (kernels such
    as "flash" never materialise them); the model itself is not touched.
    """

    def find(root: Any) -> tuple[Any, Any]:
        parent = root
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        return parent, getattr(parent, path[-1])

    copy = nnx.clone(model)
    copy.eval()
    parent, inner = find(copy)
    inner.implementation = "fused"
    setattr(parent, path[-1], _Recorder(inner))
    graphdef, state = nnx.split(copy)

    @jax.jit  # one compiled forward pass rather than hundreds of eager operations
    def weights(state: Any) -> jax.Array:
        m = nnx.merge(graphdef, state)
        run(m)
        recorder = find(m)[1]
        if recorder.weights is None:
            raise RuntimeError(f"the attention layer at {path} was not called")
        return recorder.weights

    return np.asarray(weights(state))


def count_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
