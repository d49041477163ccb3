"""The character LM's task: text as character ids, training windows, the loss, sampling.

Trains on windows of ``seq_len`` characters drawn from the first part of the text and
validates on every window of the held-out tail (loss in nats per character).
"""

from __future__ import annotations

import argparse
import dataclasses
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jattn.nn as jn
from examples.data import DataError, fill_batch, read_text, strip_gutenberg, tail_split

# The flags that shape the model: on --resume, the checkpoint's values win.
MODEL_ARGS = ("d_model", "layers", "heads", "d_ff", "dropout", "seq_len")


def load_text(args: argparse.Namespace) -> tuple[str, str]:
    """``(text, where it came from)``."""
    if args.text is None:
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    text = read_text(args.text)
    if not args.no_gutenberg_cut or args.start_marker or args.end_marker:
        try:
            text = strip_gutenberg(text, start_marker=args.start_marker, end_marker=args.end_marker)
        except DataError as e:
            raise DataError(f"{args.text}: {e}") from None
    return text, str(args.text)


@dataclasses.dataclass
class CharData:
    vocab: str  # id i is the character vocab[i]
    train: np.ndarray  # int32 ids
    val: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        return np.fromiter((index[c] for c in text if c in index), np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def default_prompt(data: CharData, length: int = 40) -> str:
    """The prompt when none is given: the start of the first held-out line that reads as prose
    (starts with a letter, at least 20 characters, mostly letters and spaces), cut to whole
    words within ``length`` characters. The held-out text itself may start mid-line or in an
    indented code block (the Python documentation does), which makes a poor prompt."""
    text = data.decode(data.val[: 200 * length])
    for line in text.splitlines()[1:]:  # the first line may start mid-sentence
        line = " ".join(line.split())
        wordy = sum(c.isalpha() or c == " " for c in line)
        if len(line) >= 20 and line[0].isalpha() and wordy >= 0.8 * len(line):
            if len(line) > length:
                cut = line[: length + 1]
                line = cut[: cut.rindex(" ")] if " " in cut else cut[:length]
            return line
    return text[:length].strip() or text[:length]


def make_data(
    text: str, val_fraction: float, seq_len: int, vocab: str | None, source: str = "the text"
) -> CharData:
    """Character ids of ``text`` split into training text and a held-out tail. ``vocab``: the
    characters a resumed model knows (others are dropped), or None to take the text's."""
    vocab = vocab if vocab is not None else "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        warnings.warn(f"{len(unknown)} characters not in the vocabulary are dropped", stacklevel=2)
    ids = np.fromiter((index[c] for c in text if c in index), np.int32)
    cut = tail_split(len(ids), val_fraction)
    train, val = ids[:cut], ids[cut:]
    if len(train) < seq_len + 1 or len(val) < seq_len + 1:
        raise DataError(
            f"{source}: too short for --seq-len {seq_len}: {len(train)} training and "
            f"{len(val)} held-out characters (each needs at least {seq_len + 1})"
        )
    return CharData(vocab, train, val)


def train_batch(data: CharData, batch_size: int, seq_len: int, seed: int, step: int) -> dict:
    """Random windows of ``seq_len + 1`` characters; which ones depends on (seed, step) only."""
    starts = np.random.default_rng([seed, step]).integers(
        0, len(data.train) - seq_len, size=batch_size
    )
    return {"tokens": data.train[starts[:, None] + np.arange(seq_len + 1)]}


def val_batches(data: CharData, batch_size: int, seq_len: int) -> list[dict]:
    """All non-overlapping windows of the held-out text, in full batches (padding weighted 0)."""
    n = (len(data.val) - 1) // seq_len
    starts = np.arange(n) * seq_len
    windows = data.val[starts[:, None] + np.arange(seq_len + 1)]
    batches = []
    for i in range(0, n, batch_size):
        chunk = windows[i : i + batch_size]
        batch = {"tokens": chunk, "weight": np.ones(len(chunk), np.float32)}
        batches.append(fill_batch(batch, batch_size))
    return batches


def lm_loss(model: jn.DecoderLM, batch: dict) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean next-character cross-entropy (nats); stats are sums for validation."""
    tokens = batch["tokens"]
    logits = model(tokens[:, :-1])
    nll = jn.cross_entropy(logits, tokens[:, 1:], reduction="none")
    weight = batch.get("weight")
    weight = jnp.ones(nll.shape[:1]) if weight is None else weight
    nll = nll * weight[:, None]
    count = weight.sum() * nll.shape[1]
    return nll.sum() / count, {"nll_sum": nll.sum(), "chars": count}


# -- generation --------------------------------------------------------------------------------


def generate_text(
    model: jn.DecoderLM,
    data: CharData,
    prompt: str,
    *,
    length: int,
    seq_len: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    """Continues ``prompt`` by ``length`` characters with a sliding context of ``seq_len``.

    The model never saw positions beyond ``seq_len``, so generation runs in chunks of
    ``seq_len // 2`` new characters, each prompted with the last characters that fit.
    """
    ids = data.encode(prompt)
    if len(ids) < len(prompt):
        warnings.warn(
            f"{len(prompt) - len(ids)} prompt characters are not in the vocabulary; dropped",
            stacklevel=2,
        )
    if len(ids) == 0:
        ids = data.val[:1]
    out = list(ids.tolist())
    chunk = max(seq_len // 2, 1)
    rng = jax.random.key(seed)
    k = 0
    while len(out) - len(ids) < length:
        new = min(chunk, length - (len(out) - len(ids)))
        context = np.asarray(out[-(seq_len - new) :], np.int32)
        gen = jn.generate(
            model,
            jnp.asarray(context)[None],
            max_new_tokens=new,
            temperature=temperature,
            top_k=top_k,
            rng=jax.random.fold_in(rng, k),
        )
        out.extend(np.asarray(gen[0]).tolist())
        k += 1
    return data.decode(out)
