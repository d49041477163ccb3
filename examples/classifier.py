"""Sentence classifier: a bidirectional LSTM with jattn's ``AdditiveAttention`` (Bahdanau).

Each sentence goes through an embedding and a bidirectional LSTM (``flax.nnx.RNN`` over an
``OptimizedLSTMCell`` in each direction, padding-aware through the sequence lengths). The final
states of both directions form the query of an additive attention over all the LSTM states,
``score_j = vᵀ tanh(W₁ h_j + W₂ q)``, which ``jattn.nn.AdditiveAttention`` hands to the chosen
kernel as a bias (padding masked by the lengths). The context vector and the query feed a
linear layer over the classes. Validation accuracy is reported next to the majority-class
baseline.

Reads ``--data`` (a CSV with a text column and an integer label column, ``Q`` and ``label`` by
default: ../shared/data/ChatbotData.csv, 0 everyday / 1 break-up / 2 love). Labels are cleaned
of stray whitespace; rows whose label is not an integer are skipped and counted. Without
``--data`` it learns a generated task: which of the letters x, y, z hides in a string of
random letters.

    python examples/classifier.py --data ../shared/data/ChatbotData.csv \\
        --label-names everyday breakup love --classify "헤어진 지 한 달" "오늘 점심 뭐 먹지"
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import sys
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

try:  # run as a script (python examples/classifier.py) or imported as examples.classifier
    from examples import common
except ImportError:  # pragma: no cover - the script's own directory is on sys.path instead
    import common  # type: ignore[no-redef]

import jattn.nn as jn

MODEL_ARGS = ("embed", "hidden", "units", "dropout", "max_len", "tokens")
CHAR_PAD, CHAR_UNK = 0, 1  # char vocabulary: 0 pad, 1 unknown, then the characters


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="classifier.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None, help="CSV file (default: generated task)")
    g.add_argument("--text-column", default="Q")
    g.add_argument("--label-column", default="label")
    g.add_argument("--label-names", nargs="+", default=None, help="names of classes 0, 1, ...")
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument(
        "--tokens",
        choices=("char", "bpe", "unigram"),
        default="char",
        help="characters, or subwords from a tokenizer trained on the training split",
    )
    g.add_argument("--vocab-size", type=int, default=4000, help="for subword tokens")
    g.add_argument("--max-len", type=int, default=64, help="tokens kept per sentence")
    g.add_argument("--generated-examples", type=int, default=3000)
    g = p.add_argument_group("model")
    g.add_argument("--embed", type=int, default=128)
    g.add_argument("--hidden", type=int, default=128, help="LSTM units per direction")
    g.add_argument("--units", type=int, default=128, help="additive attention width")
    g.add_argument("--dropout", type=float, default=0.3)
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g = p.add_argument_group("classification")
    g.add_argument(
        "--classify", nargs="+", default=None, help="sentences to classify after training"
    )
    common.add_training_args(
        p,
        name="classifier",
        steps=1500,
        batch_size=64,
        lr=2e-3,
        warmup=100,
        eval_every=150,
        implementation="fused",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        common.finish_args(args)
        if args.implementation_value == "flash":
            raise ValueError(
                "--implementation flash cannot return attention weights, which the classifier "
                "needs: use fused, reference or auto"
            )
    except ValueError as e:
        parser.error(str(e))
    return args


# -- data --------------------------------------------------------------------------------------


def generated_examples(n: int, seed: int) -> list[tuple[str, int]]:
    """Random strings over a-w with one of x, y, z hidden inside; the label says which."""
    rng = np.random.default_rng([seed, 0xC1A5])
    letters = np.array(list("abcdefghijklmnopqrstuvw"))
    out = []
    for _ in range(n):
        text = list(rng.choice(letters, size=rng.integers(8, 25)))
        label = int(rng.integers(0, 3))
        text.insert(int(rng.integers(0, len(text) + 1)), "xyz"[label])
        out.append(("".join(text), label))
    return out


def load_examples(args: argparse.Namespace) -> tuple[list[tuple[str, int]], str, int]:
    """``(examples, source, skipped)``: (text, label) pairs, labels as ints."""
    if args.data is None:
        return generated_examples(args.generated_examples, args.seed), "generated x/y/z task", 0
    rows = common.read_csv_columns(args.data, [args.text_column, args.label_column])
    examples, skipped = [], 0
    for row in rows:
        text, label = row[args.text_column], row[args.label_column]  # both already stripped
        try:
            value = int(label)
        except ValueError:
            value = -1
        if not text or value < 0:
            skipped += 1
            continue
        examples.append((text, value))
    if not examples:
        raise ValueError(f"{args.data}: no row has text and an integer label")
    return examples, str(args.data), skipped


class CharTokens:
    """Characters as tokens: 0 padding, 1 unknown, then the training set's characters."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i + 2 for i, c in enumerate(chars)}

    @classmethod
    def fit(cls, texts: Sequence[str]) -> CharTokens:
        return cls("".join(sorted(set("".join(texts)))))

    def encode(self, text: str) -> list[int]:
        return [self.index.get(c, CHAR_UNK) for c in text]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.chars[i - 2] if i >= 2 else "?" for i in ids]

    @property
    def size(self) -> int:
        return len(self.chars) + 2

    def to_str(self) -> str:
        return self.chars


class SubwordTokens:
    """A trained ``tokenizers`` model; its <pad> is id 0 too."""

    def __init__(self, tok: Any):
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.tok.id_to_token(i) for i in ids]

    @property
    def size(self) -> int:
        return self.tok.get_vocab_size()

    def to_str(self) -> str:
        return self.tok.to_str()


def make_tokens(
    kind: str, texts: Sequence[str], vocab_size: int, saved: str | None
) -> CharTokens | SubwordTokens:
    if kind == "char":
        return CharTokens(saved) if saved is not None else CharTokens.fit(texts)
    if saved is not None:
        return SubwordTokens(common.tokenizer_from_json(saved))
    return SubwordTokens(common.train_subword_tokenizer(texts, vocab_size=vocab_size, kind=kind))


def make_batch(
    ids: Sequence[Sequence[int]], labels: np.ndarray, rows: np.ndarray, max_len: int
) -> dict[str, np.ndarray]:
    tokens, lengths = common.encode_padded([ids[i] for i in rows], max_len, multiple=16)
    return {
        "tokens": tokens,
        "lengths": np.maximum(lengths, 1),  # an empty text reads as one padding token
        "labels": labels[rows].astype(np.int32),
        "weight": np.ones(len(rows), np.float32),
    }


def val_batches(
    ids: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int, max_len: int
) -> list[dict[str, np.ndarray]]:
    batches = []
    for i in range(0, len(ids), batch_size):
        rows = np.arange(i, min(i + batch_size, len(ids)))
        batch = make_batch(ids, labels, rows, max_len)
        fill = batch_size - len(rows)
        if fill:  # filler rows of weight 0 keep one batch shape
            for k, v in batch.items():
                filler = np.ones if k == "lengths" else np.zeros
                batch[k] = np.concatenate([v, filler((fill, *v.shape[1:]), v.dtype)])
        batches.append(batch)
    return batches


# -- model -------------------------------------------------------------------------------------


class BiLSTMAttentionClassifier(nnx.Module):
    """Embedding -> bidirectional LSTM -> additive attention -> linear classes.

    ``__call__(tokens int [B, S], lengths int [B]) -> (logits [B, C], weights [B, S])``.
    """

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        *,
        embed: int,
        hidden: int,
        units: int,
        dropout: float,
        implementation: common.Implementation,
        rngs: nnx.Rngs,
    ):
        self.embed = nnx.Embed(vocab_size, embed, rngs=rngs)

        def direction() -> nnx.RNN:
            return nnx.RNN(nnx.OptimizedLSTMCell(embed, hidden, rngs=rngs))

        self.lstm = nnx.Bidirectional(direction(), direction())
        self.attention = jn.AdditiveAttention(
            2 * hidden, 2 * hidden, units, implementation=implementation, rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(4 * hidden, num_classes, rngs=rngs)

    def __call__(self, tokens: jax.Array, lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = self.dropout(self.embed(tokens))
        # With seq_lengths the forward carry is taken at each sentence's last real token and
        # the backward direction reads each sentence from its own end, so padding never
        # reaches the states that matter.
        (forward, backward), states = self.lstm(x, seq_lengths=lengths, return_carry=True)
        query = jnp.concatenate([forward[1], backward[1]], axis=-1)  # the h of (c, h)
        context, weights = self.attention(query, states, lengths=lengths)
        logits = self.out(self.dropout(jnp.concatenate([context, query], axis=-1)))
        return logits, weights


def classify_loss(
    model: BiLSTMAttentionClassifier, batch: dict
) -> tuple[jax.Array, dict[str, jax.Array]]:
    logits, _ = model(batch["tokens"], batch["lengths"])
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
    weight = batch["weight"]
    correct = (logits.argmax(-1) == batch["labels"]) * weight
    count = weight.sum()
    return (nll * weight).sum() / count, {
        "nll_sum": (nll * weight).sum(),
        "correct": correct.sum(),
        "count": count,
    }


@partial(jax.jit, static_argnums=0)
def _predict(graphdef: Any, state: Any, tokens: jax.Array, lengths: jax.Array) -> Any:
    model = nnx.merge(graphdef, state)
    logits, weights = model(tokens, lengths)
    return jax.nn.softmax(logits), weights


def predict(
    model: BiLSTMAttentionClassifier, ids: Sequence[Sequence[int]], max_len: int
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities ``[N, C]`` and each input's attention weights over its tokens."""
    tokens, lengths = common.encode_padded(ids, max_len, multiple=16)
    lengths = np.maximum(lengths, 1)
    graphdef, state = nnx.split(model)
    probs, weights = _predict(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths))
    weights = np.asarray(weights)
    return np.asarray(probs), [weights[i, : lengths[i]] for i in range(len(ids))]


# -- main --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    summary: dict[str, Any]
    trainer: common.Trainer


def run(argv: Sequence[str] | None = None) -> Result:
    """Trains, validates, classifies and plots; returns the summary and the trained state."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    checkpoints, saved_meta = common.open_checkpoints(args, MODEL_ARGS)

    examples, source, skipped = load_examples(args)
    num_classes = max(label for _, label in examples) + 1
    if saved_meta is not None:
        num_classes = saved_meta["num_classes"]
    default_names = ["x", "y", "z"] if args.data is None else [str(c) for c in range(num_classes)]
    names = args.label_names or default_names
    if len(names) != num_classes:
        raise SystemExit(f"--label-names gives {len(names)} names for {num_classes} classes")
    train_idx, val_idx = common.shuffled_split(len(examples), args.val_fraction, args.seed)
    train_texts = [examples[i][0] for i in train_idx]
    val_texts = [examples[i][0] for i in val_idx]
    train_labels = np.asarray([examples[i][1] for i in train_idx])
    val_labels = np.asarray([examples[i][1] for i in val_idx])
    tokens = make_tokens(
        args.tokens, train_texts, args.vocab_size, saved_meta["tokens"] if saved_meta else None
    )
    train_ids = [tokens.encode(t)[: args.max_len] for t in train_texts]
    val_ids = [tokens.encode(t)[: args.max_len] for t in val_texts]

    # The baseline: always answer the training set's most frequent class.
    counts = collections.Counter(train_labels.tolist())
    majority = counts.most_common(1)[0][0]
    baseline = float(np.mean(val_labels == majority))
    all_counts = collections.Counter(label for _, label in examples)
    print(
        f"{source}: {len(examples):,} examples ({skipped} rows skipped: no text or no integer "
        f"label), {num_classes} classes {dict(sorted(all_counts.items()))}; "
        f"{len(train_ids):,} for training, {len(val_ids):,} held out; {args.tokens} vocabulary "
        f"of {tokens.size}; majority class {names[majority]!r} scores {baseline:.3f} on the "
        "held-out set",
        flush=True,
    )

    model = BiLSTMAttentionClassifier(
        tokens.size,
        num_classes,
        embed=args.embed,
        hidden=args.hidden,
        units=args.units,
        dropout=args.dropout,
        implementation=args.implementation_value,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    tx = common.make_optimizer(
        "cosine", args.lr, args.warmup, args.steps, weight_decay=args.weight_decay
    )
    trainer = common.Trainer(model, tx, classify_loss, seed=args.seed)
    history: dict[str, list] = {"train": [], "val": []}
    resumed_from = None
    if saved_meta is not None:
        history = checkpoints.restore(trainer)["history"]
        resumed_from = trainer.step
        print(f"resumed from step {resumed_from} of {args.ckpt_dir}", flush=True)

    batches_val = val_batches(val_ids, val_labels, args.batch_size, args.max_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        return {"val_loss": s["nll_sum"] / s["count"], "val_accuracy": s["correct"] / s["count"]}

    def meta() -> dict[str, Any]:
        return {
            "args": common.jsonable_args(args),
            "tokens": tokens.to_str(),
            "num_classes": num_classes,
            "history": history,
        }

    result = common.fit(
        trainer,
        args,
        get_batch=lambda step: make_batch(
            train_ids,
            train_labels,
            common.batch_indices(len(train_ids), args.batch_size, step, args.seed),
            args.max_len,
        ),
        count_tokens=lambda b: int(b["lengths"].sum()),
        validate=validate,
        history=history,
        checkpoints=checkpoints,
        meta=meta,
    )
    checkpoints.close()

    # Classify the given sentences, or a few held-out ones (with their labels).
    clf = trainer.model
    if args.classify:
        texts, truth = list(args.classify), [None] * len(args.classify)
    else:
        texts, truth = val_texts[:6], val_labels[:6].tolist()
    ids = [tokens.encode(t)[: args.max_len] for t in texts]
    probs, weights = predict(clf, ids, args.max_len)
    classified = []
    for text, label, p, w, tok_ids in zip(texts, truth, probs, weights, ids, strict=True):
        pred = int(p.argmax())
        top = np.argsort(w)[::-1][:3]
        pieces = tokens.pieces(tok_ids) if tok_ids else []
        classified.append(
            {
                "text": text,
                "predicted": names[pred],
                "probabilities": {names[c]: round(float(p[c]), 3) for c in range(num_classes)},
                "label": None if label is None else names[label],
                "most_attended": [pieces[i] for i in top if i < len(pieces)],
            }
        )
        print(
            f"{text!r}: {names[pred]} ({p[pred]:.2f})"
            + ("" if label is None else f", labelled {names[label]}")
        )

    out = args.out_dir
    loss_png = common.plot_losses(
        history, out / "loss.png", title="BiLSTM + additive attention", ylabel="cross-entropy"
    )
    attn_png = common.plot_token_weights(
        [[common.show_token(t) for t in tokens.pieces(i)] or ["∅"] for i in ids],
        [w if len(i) else w[:1] for w, i in zip(weights, ids, strict=True)],
        out / "attention.png",
        row_labels=[
            f"{c['predicted']}" + ("" if c["label"] is None else f" (label {c['label']})")
            for c in classified
        ],
        title="additive attention over the BiLSTM states (row: prediction)",
    )

    final = history["val"][-1]
    summary = {
        "example": "classifier",
        "data": source,
        "examples": len(examples),
        "skipped_rows": skipped,
        "classes": {names[c]: all_counts.get(c, 0) for c in range(num_classes)},
        "train_examples": len(train_ids),
        "val_examples": len(val_ids),
        "tokens": args.tokens,
        "vocab_size": tokens.size,
        "params": common.count_params(clf),
        "implementation": args.implementation,
        "seed": args.seed,
        "step": result.end_step,
        "resumed_from": resumed_from,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second or 0.0),
        "val_loss": round(final["val_loss"], 4),
        "val_accuracy": round(final["val_accuracy"], 4),
        "best_val_accuracy": round(max(v["val_accuracy"] for v in history["val"]), 4),
        "majority_class": names[majority],
        "majority_baseline_val": round(baseline, 4),
        "majority_baseline_all": round(all_counts[majority] / len(examples), 4),
        "classified": classified,
        "plots": {"loss": str(loss_png), "attention": str(attn_png)},
        "checkpoint_dir": str(args.ckpt_dir),
        "wall_seconds": common.seconds(t0),
    }
    common.write_summary(summary, out)
    return Result(summary, trainer)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the summary (also written to OUT_DIR/summary.json)."""
    return run(argv).summary


if __name__ == "__main__":
    main(sys.argv[1:])
