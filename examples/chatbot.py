"""Chatbot: a jattn encoder-decoder ``Transformer`` trained on question -> answer pairs.

Reads a CSV with ``Q`` and ``A`` columns (``--data``; e.g. ../shared/data/ChatbotData.csv, Korean),
trains a subword tokenizer (Hugging Face ``tokenizers``, BPE or Unigram) on the training split,
and trains the Transformer with the warm-up ("Noam") schedule of Vaswani et al. and
label-smoothed cross-entropy. Then it answers ``--ask`` questions, greedily and by sampling.

Masks: batches are right-padded, and the true lengths go to the model (``src_lengths``,
``tgt_lengths``), which hands them to the attention kernels as the padding masks (keys past a
sequence's length are never attended to); the decoder's self-attention is causal, the
look-ahead mask, so that position i sees target tokens up to i only. No dense [T, S] mask is
ever built. Padded target positions are left out of the loss.

Without ``--data`` it learns a generated task: reverse a string of digits
("3 1 4 1 5" -> "5 1 4 1 3").

    python examples/chatbot.py --data ../shared/data/ChatbotData.csv --max-minutes 12 \\
        --ask "오늘 너무 힘들어" "좋아하는 사람이 생겼어"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # run as a script (python examples/chatbot.py) or imported as examples.chatbot
    from examples import common
except ImportError:  # pragma: no cover - the script's own directory is on sys.path instead
    import common  # type: ignore[no-redef]

import jattn.nn as jn

MODEL_ARGS = ("d_model", "heads", "layers", "d_ff", "dropout", "max_len")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="chatbot.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", type=Path, default=None, help="CSV with Q,A columns (default: digit reversal)"
    )
    g.add_argument("--val-fraction", type=float, default=0.1)
    g.add_argument(
        "--tokenizer", choices=("bpe", "unigram"), default="bpe", help="subword model to train"
    )
    g.add_argument("--vocab-size", type=int, default=4000)
    g.add_argument("--max-len", type=int, default=32, help="tokens kept per question / answer")
    g.add_argument("--generated-pairs", type=int, default=4000, help="size of the generated task")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--heads", type=int, default=8)
    g.add_argument("--layers", type=int, default=2, help="encoder layers = decoder layers")
    g.add_argument("--d-ff", type=int, default=512)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--label-smoothing", type=float, default=0.1)
    g = p.add_argument_group("answers")
    g.add_argument(
        "--ask", nargs="+", default=None, help="questions to answer (default: a few held-out ones)"
    )
    g.add_argument("--temperature", type=float, default=0.8, help="for the sampled answers")
    g.add_argument("--top-k", type=int, default=10, help="for the sampled answers")
    common.add_training_args(
        p,
        name="chatbot",
        steps=3000,
        batch_size=64,
        lr=0.5,
        warmup=500,
        eval_every=250,
        implementation="fused",
        lr_help="scale of the warm-up schedule: lr = scale * d_model^-0.5 * "
        "min(step^-0.5, step * warmup^-1.5)",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        common.finish_args(args)
        if args.max_len < 4:
            raise ValueError("--max-len must be at least 4")
    except ValueError as e:
        parser.error(str(e))
    return args


# -- data --------------------------------------------------------------------------------------


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
    rows = common.read_csv_columns(args.data, ["Q", "A"])
    pairs = [(r["Q"], r["A"]) for r in rows if r["Q"] and r["A"]]
    return pairs, str(args.data), len(rows) - len(pairs)


@dataclasses.dataclass
class Encoded:
    src: list[list[int]]
    tgt: list[list[int]]  # <bos> answer <eos>


def encode_pairs(tok: Any, pairs: Sequence[tuple[str, str]], max_len: int) -> Encoded:
    qs = [e.ids[:max_len] for e in tok.encode_batch([q for q, _ in pairs])]
    answers = tok.encode_batch([a for _, a in pairs])
    tgt = [[common.BOS, *e.ids[: max_len - 2], common.EOS] for e in answers]
    return Encoded(qs, tgt)


def make_batch(data: Encoded, rows: np.ndarray, max_len: int) -> dict[str, np.ndarray]:
    src, src_len = common.encode_padded([data.src[i] for i in rows], max_len, multiple=16)
    tgt, tgt_len = common.encode_padded(
        [data.tgt[i] for i in rows], max_len + 1, multiple=16, offset=1
    )
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
    batches = []
    for i in range(0, n, batch_size):
        rows = np.arange(i, min(i + batch_size, n))
        batch = make_batch(data, rows, max_len)
        fill = batch_size - len(rows)
        if fill:
            for k, v in batch.items():
                pad = np.ones if k.endswith("_len") else np.zeros
                batch[k] = np.concatenate([v, pad((fill, *v.shape[1:]), v.dtype)])
        batches.append(batch)
    return batches


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
        loss = jn.cross_entropy(
            logits, target, label_smoothing=self.label_smoothing, pad_id=common.PAD
        )
        real = target != common.PAD
        nll = jn.cross_entropy(logits, target, pad_id=common.PAD, reduction="sum")
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
    ids = [e.ids[:max_len] or [common.UNK] for e in tok.encode_batch(list(questions))]
    src, src_len = common.encode_padded(ids, max_len, multiple=16)
    out = jn.generate_seq2seq(
        model,
        jnp.asarray(src),
        src_lengths=jnp.asarray(src_len),
        max_length=max_len,
        bos_id=common.BOS,
        eos_id=common.EOS,
        pad_id=common.PAD,
        temperature=temperature,
        top_k=top_k,
        rng=jax.random.key(seed),
    )
    texts, tokens = [], []
    for row in np.asarray(out).tolist():
        row = row[: row.index(common.EOS)] if common.EOS in row else row
        row = [t for t in row if t != common.PAD]
        tokens.append(row)
        texts.append(tok.decode(row, skip_special_tokens=True))
    return texts, tokens


# -- main --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    summary: dict[str, Any]
    trainer: common.Trainer
    tokenizer: Any


def run(argv: Sequence[str] | None = None) -> Result:
    """Trains, validates, answers and plots; returns the summary and the trained state."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    checkpoints, saved_meta = common.open_checkpoints(args, MODEL_ARGS)

    pairs, source, skipped = load_pairs(args)
    train_idx, val_idx = common.shuffled_split(len(pairs), args.val_fraction, args.seed)
    train_pairs = [pairs[i] for i in train_idx]
    val_pairs = [pairs[i] for i in val_idx]
    if saved_meta is not None:  # the very tokenizer the checkpoint was trained with
        tok = common.tokenizer_from_json(saved_meta["tokenizer"])
    else:
        tok = common.train_subword_tokenizer(
            [t for qa in train_pairs for t in qa], vocab_size=args.vocab_size, kind=args.tokenizer
        )
    train_data = encode_pairs(tok, train_pairs, args.max_len)
    val_data = encode_pairs(tok, val_pairs, args.max_len)
    print(
        f"{source}: {len(pairs):,} pairs ({skipped} skipped), {len(train_pairs):,} for "
        f"training, {len(val_pairs):,} held out; {args.tokenizer} vocabulary of "
        f"{tok.get_vocab_size()}",
        flush=True,
    )

    model = jn.Transformer(
        tok.get_vocab_size(),
        d_model=args.d_model,
        num_heads=args.heads,
        num_encoder_layers=args.layers,
        num_decoder_layers=args.layers,
        d_ff=args.d_ff,
        dropout_rate=args.dropout,
        share_embeddings=True,  # one tokenizer for questions and answers
        tie_output=True,
        implementation=args.implementation_value,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    tx = common.make_optimizer("noam", args.lr, args.warmup, args.steps, d_model=args.d_model)
    trainer = common.Trainer(model, tx, Seq2SeqLoss(args.label_smoothing), seed=args.seed)
    history: dict[str, list] = {"train": [], "val": []}
    resumed_from = None
    if saved_meta is not None:
        history = checkpoints.restore(trainer)["history"]
        resumed_from = trainer.step
        print(f"resumed from step {resumed_from} of {args.ckpt_dir}", flush=True)

    batches_val = val_batches(val_data, args.batch_size, args.max_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        return {"val_loss": s["nll_sum"] / s["tokens"], "val_accuracy": s["correct"] / s["tokens"]}

    def meta() -> dict[str, Any]:
        return {"args": common.jsonable_args(args), "tokenizer": tok.to_str(), "history": history}

    n_train = len(train_data.src)
    result = common.fit(
        trainer,
        args,
        get_batch=lambda step: make_batch(
            train_data,
            common.batch_indices(n_train, args.batch_size, step, args.seed),
            args.max_len,
        ),
        count_tokens=lambda b: int(b["src_len"].sum() + b["tgt_len"].sum()),
        validate=validate,
        history=history,
        checkpoints=checkpoints,
        meta=meta,
    )
    checkpoints.close()

    # Answers: the questions asked, or a few held-out ones (with their reference answers).
    if args.ask:
        questions, references = list(args.ask), [None] * len(args.ask)
    else:
        shown = val_pairs[:4] if args.data is not None else generated_pairs(4, args.seed + 1)
        questions, references = [q for q, _ in shown], [a for _, a in shown]
    bot = trainer.model
    common_kw = dict(max_len=args.max_len, top_k=args.top_k, seed=args.seed)
    greedy, greedy_ids = answer(bot, tok, questions, temperature=0.0, **common_kw)
    sampled, _ = answer(bot, tok, questions, temperature=args.temperature, **common_kw)
    answers = []
    for q, ref, g, s in zip(questions, references, greedy, sampled, strict=True):
        answers.append({"question": q, "greedy": g, "sampled": s, "reference": ref})
        print(f"Q: {q}\n  greedy:  {g}\n  sampled: {s}" + (f"\n  data:    {ref}" if ref else ""))

    out = args.out_dir
    loss_png = common.plot_losses(
        history,
        out / "loss.png",
        title="chatbot (train: label-smoothed)",
        ylabel="loss (nats / token)",
    )
    attn_png = plot_cross_attention(bot, tok, questions[0], greedy_ids[0], out / "attention.png")

    final = history["val"][-1]
    summary = {
        "example": "chatbot",
        "data": source,
        "pairs": len(pairs),
        "skipped_rows": skipped,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "tokenizer": args.tokenizer,
        "vocab_size": tok.get_vocab_size(),
        "params": common.count_params(bot),
        "implementation": args.implementation,
        "seed": args.seed,
        "step": result.end_step,
        "resumed_from": resumed_from,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 1),
        "tokens_per_second": round(result.tokens_per_second or 0.0),
        "val_loss": round(final["val_loss"], 4),
        "val_token_accuracy": round(final["val_accuracy"], 4),
        "answers": answers,
        "plots": {"loss": str(loss_png), "attention": str(attn_png)},
        "checkpoint_dir": str(args.ckpt_dir),
        "wall_seconds": common.seconds(t0),
    }
    common.write_summary(summary, out)
    return Result(summary, trainer, tok)


def plot_cross_attention(
    model: jn.Transformer, tok: Any, question: str, answer_ids: list[int], path: Path
) -> Path:
    """The last decoder layer's cross-attention (mean over heads) while it writes the answer."""
    src = tok.encode(question).ids or [common.UNK]
    tgt = [common.BOS, *answer_ids]
    weights = common.record_attention(
        model,
        ("decoder_layers", -1, "cross_attn"),
        lambda m: m(
            jnp.asarray([src]),
            jnp.asarray([tgt]),
            src_lengths=jnp.asarray([len(src)]),
            tgt_lengths=jnp.asarray([len(tgt)]),
        ),
    )[0].mean(axis=0)
    return common.plot_attention(
        weights,
        path,
        row_labels=[common.show_token(tok.id_to_token(t)) for t in tgt],
        col_labels=[common.show_token(tok.id_to_token(t)) for t in src],
        title="cross-attention of the last decoder layer (mean over heads)",
        xlabel="question token",
        ylabel="answer token (decoder input)",
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the summary (also written to OUT_DIR/summary.json)."""
    return run(argv).summary


if __name__ == "__main__":
    main(sys.argv[1:])
