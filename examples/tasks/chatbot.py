"""The chatbot's task: question/answer pairs, seq2seq batches, the loss, answering.

Batches are right-padded, and the true lengths go to the model (``src_lengths``,
``tgt_lengths``), which hands them to the attention kernels as the padding masks; the
decoder's self-attention is causal. Padded target positions are left out of the loss.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jattn.nn as jn
from examples.attention_maps import sown_attention
from examples.data import DataError, encode_padded, fill_batch, read_csv_columns
from examples.plots import plot_attention
from examples.vocab import BOS, EOS, PAD, UNK, show_token

# The flags that shape the model: on --resume, the checkpoint's values win.
MODEL_ARGS = ("d_model", "heads", "layers", "d_ff", "dropout", "max_len")


def generated_pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Digit strings and their reversals, as space-separated "words"."""
    rng = np.random.default_rng([seed, 0xC4A7])
    pairs = []
    for _ in range(n):
        digits = rng.integers(0, 10, size=rng.integers(3, 9)).astype(str).tolist()
        pairs.append((" ".join(digits), " ".join(reversed(digits))))
    return pairs


def load_pairs(args: argparse.Namespace) -> tuple[list[tuple[str, str]], str, int]:
    """``(pairs, source, skipped)``: rows with an empty question or answer are skipped."""
    if args.data is None:
        return generated_pairs(args.generated_pairs, args.seed), "generated digit reversal", 0
    rows = read_csv_columns(args.data, ["Q", "A"])
    pairs = [(r["Q"], r["A"]) for r in rows if r["Q"] and r["A"]]
    if len(pairs) < 2:
        first = next((r["_line"] for r in rows if not (r["Q"] and r["A"])), None)
        raise DataError(
            f"{args.data}: {len(pairs)} usable question/answer pairs (a held-out split needs "
            f"2 or more): {len(rows)} rows"
            + (f", the first without both Q and A at line {first}" if first else "")
        )
    return pairs, str(args.data), len(rows) - len(pairs)


@dataclasses.dataclass
class Encoded:
    src: list[list[int]]
    tgt: list[list[int]]  # <bos> answer <eos>


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]], max_len: int) -> Encoded:
    qs = [e.ids[:max_len] for e in tok.encode_batch([q for q, _ in pairs])]
    answers = tok.encode_batch([a for _, a in pairs])
    tgt = [[BOS, *e.ids[: max_len - 2], EOS] for e in answers]
    return Encoded(qs, tgt)


def make_batch(data: Encoded, rows: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
    src, src_len = encode_padded([data.src[i] for i in rows], max_len, multiple=16)
    tgt, tgt_len = encode_padded([data.tgt[i] for i in rows], max_len + 1, multiple=16, offset=1)
    return {
        "src": src,
        "src_len": np.maximum(src_len, 1),
        "tgt_in": tgt[:, :-1],
        "tgt_out": tgt[:, 1:],
        "tgt_len": tgt_len - 1,  # the decoder input drops the last token
    }


def val_batches(data: Encoded, batch_size: int, max_len: int) -> list[dict[str, np.ndarray]]:
    """The validation pairs in full batches; filler rows have only padding targets."""
    n = len(data.src)
    return [
        fill_batch(make_batch(data, np.arange(i, min(i + batch_size, n)), max_len), batch_size)
        for i in range(0, n, batch_size)
    ]


@dataclasses.dataclass(frozen=True)
class Seq2SeqLoss:
    """Label-smoothed cross-entropy for training; plain NLL and accuracy sums for validation.

    A frozen dataclass, so that equal settings compare equal as the jitted step's static
    argument.
    """

    label_smoothing: float

    def __call__(
        self, model: jn.Transformer, batch: dict
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        logits = model(
            batch["src"],
            batch["tgt_in"],
            src_lengths=batch["src_len"],
            tgt_lengths=batch["tgt_len"],
        )
        target = batch["tgt_out"]
        loss = jn.cross_entropy(logits, target, label_smoothing=self.label_smoothing, pad_id=PAD)
        real = target != PAD
        nll = jn.cross_entropy(logits, target, pad_id=PAD, reduction="sum")
        correct = ((logits.argmax(-1) == target) & real).sum()
        return loss, {"nll_sum": nll, "tokens": real.sum(), "correct": correct}


# -- answers -----------------------------------------------------------------------------------


def answer(
    model: jn.Transformer,
    tok: Any,
    questions: Sequence[str],
    *,
    max_len: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> tuple[list[str], list[list[int]]]:
    """Answers for ``questions`` (greedy when ``temperature == 0``), and their token ids."""
    ids = [e.ids[:max_len] or [UNK] for e in tok.encode_batch(list(questions))]
    src, src_len = encode_padded(ids, max_len, multiple=16)
    out = jn.generate_seq2seq(
        model,
        jnp.asarray(src),
        src_lengths=jnp.asarray(src_len),
        max_length=max_len,
        bos_id=BOS,
        eos_id=EOS,
        pad_id=PAD,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
    )
    texts, tokens = [], []
    for row in np.asarray(out).tolist():
        row = row[: row.index(EOS)] if EOS in row else row
        row = [t for t in row if t != PAD]
        tokens.append(row)
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, tokens


def plot_cross_attention(
    model: jn.Transformer, tok: Any, question: str, answer_ids: list[int], path: Path
) -> Path:
    """The last decoder layer's cross-attention (mean over heads) while it writes the answer."""
    src = tok.encode(question).ids or [UNK]
    tgt = [BOS, *answer_ids]
    weights = sown_attention(
        model,
        ("decoder_layers", -1, "cross_attn"),
        lambda m: m(
            jnp.asarray([src]),
            jnp.asarray([tgt]),
            src_lengths=jnp.asarray([len(src)]),
            tgt_lengths=jnp.asarray([len(tgt)]),
        ),
    )[0].mean(axis=0)
    return plot_attention(
        weights,
        path,
        row_labels=[show_token(tok.id_to_token(t)) for t in tgt],
        col_labels=[show_token(tok.id_to_token(t)) for t in src],
        title="cross-attention of the last decoder layer (mean over heads)",
        xlabel="question token",
        ylabel="answer token (decoder input)",
    )
