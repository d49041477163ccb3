"""The classifier's task: labelled sentences, the BiLSTM + additive attention model, its loss
and predictions (with each input's attention weights over its tokens).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn.nn as jn
from examples.data import DataError, encode_padded, fill_batch, read_csv_columns
from examples.flags import Implementation

# The flags that shape the model: on --resume, the checkpoint's values win.
MODEL_ARGS = ("embed", "hidden", "units", "dropout", "max_len", "tokens")


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
    rows = read_csv_columns(args.data, [args.text_column, args.label_column])
    examples, skipped, lines = [], 0, {}
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
        lines.setdefault(value, row["_line"])
    if not examples:
        raise DataError(
            f"{args.data}: no row has text in column {args.text_column!r} and a non-negative "
            f"integer label in column {args.label_column!r}"
        )
    if len(examples) < 2:
        raise DataError(f"{args.data}: 1 usable row; a held-out split needs 2 or more")
    check_labels(lines, args.data, args.label_column, args.max_classes)
    return examples, str(args.data), skipped


def check_labels(first_line: dict[int, str], path: Path, column: str, max_classes: int) -> None:
    """Labels are class ids: each of 0..C-1 must occur, and C is at most ``max_classes``.
    ``first_line``: each label seen -> the line of the file it was first seen at."""
    top = max(first_line)
    if top >= max_classes:
        raise DataError(
            f"{path}: line {first_line[top]}: label {top} in column {column!r} would make "
            f"{top + 1} classes (--max-classes {max_classes}); labels are class ids 0..C-1"
        )
    missing = [c for c in range(top + 1) if c not in first_line]
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise DataError(
            f"{path}: line {first_line[top]}: label {top} in column {column!r}, but no row has "
            f"label {shown}; labels are class ids 0..C-1 with every class present"
        )


def make_batch(
    ids: Sequence[Sequence[int]], labels: np.ndarray, rows: np.ndarray, max_len: int
) -> dict[str, np.ndarray]:
    tokens, lengths = encode_padded([ids[i] for i in rows], max_len, multiple=16)
    return {
        "tokens": tokens,
        "lengths": np.maximum(lengths, 1),  # an empty text reads as one padding token
        "labels": labels[rows].astype(np.int32),
        "weight": np.ones(len(rows), np.float32),
    }


def val_batches(
    ids: Sequence[Sequence[int]], labels: np.ndarray, batch_size: int, max_len: int
) -> list[dict[str, np.ndarray]]:
    """The validation examples in full batches; filler rows have weight 0."""
    return [
        fill_batch(
            make_batch(ids, labels, np.arange(i, min(i + batch_size, len(ids))), max_len),
            batch_size,
        )
        for i in range(0, len(ids), batch_size)
    ]


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
        implementation: Implementation,
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
    tokens, lengths = encode_padded(ids, max_len, multiple=16)
    lengths = np.maximum(lengths, 1)
    graphdef, state = nnx.split(model)
    probs, weights = _predict(graphdef, state, jnp.asarray(tokens), jnp.asarray(lengths))
    weights = np.asarray(weights)
    return np.asarray(probs), [weights[i, : lengths[i]] for i in range(len(ids))]
