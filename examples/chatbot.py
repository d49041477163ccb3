"""Chatbot: a jattn encoder-decoder ``Transformer`` trained on question -> answer pairs.

Reads a CSV with ``Q`` and ``A`` columns (``--data``; e.g. ChatbotData.csv, 11,823 Korean
pairs, see docs/examples.md), trains a subword tokenizer (Hugging Face ``tokenizers``, BPE or
Unigram) on the training split, and trains the Transformer with the warm-up ("Noam") schedule
of Vaswani et al. and label-smoothed cross-entropy. Then it answers ``--ask`` questions,
greedily and by sampling.

Masks: batches are right-padded, and the true lengths go to the model (``src_lengths``,
``tgt_lengths``), which hands them to the attention kernels as the padding masks (keys past a
sequence's length are never attended to); the decoder's self-attention is causal, the
look-ahead mask, so that position i sees target tokens up to i only. No dense [T, S] mask is
ever built. Padded target positions are left out of the loss.

Without ``--data`` it learns a generated task: reverse a string of digits
("3 1 4 1 5" -> "5 1 4 1 3").

    python examples/chatbot.py --data ChatbotData.csv --max-minutes 12 \\
        --ask "오늘 너무 힘들어" "좋아하는 사람이 생겼어"
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python examples/chatbot.py): import as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from flax import nnx

import jattn.nn as jn
from examples import flags, plots, session
from examples.data import batch_indices, shuffled_split
from examples.fit import fit
from examples.tasks import chatbot as task
from examples.tasks.chatbot import MODEL_ARGS
from examples.trainer import Trainer, make_optimizer
from examples.vocab import tokenizer_from_json, train_subword_tokenizer


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data", type=Path, default=None, help="CSV with Q,A columns (default: digit reversal)"
    )
    g.add_argument("--val-fraction", type=flags.fraction, default=0.1)
    g.add_argument(
        "--tokenizer", choices=("bpe", "unigram"), default="bpe", help="subword model to train"
    )
    g.add_argument("--vocab-size", type=flags.at_least(8), default=4000)
    g.add_argument(
        "--max-len", type=flags.at_least(4), default=32, help="tokens kept per question / answer"
    )
    g.add_argument(
        "--generated-pairs",
        type=flags.at_least(2),
        default=4000,
        help="size of the generated task",
    )
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=flags.positive, default=256)
    g.add_argument("--heads", type=flags.positive, default=8)
    g.add_argument(
        "--layers", type=flags.positive, default=2, help="encoder layers = decoder layers"
    )
    g.add_argument("--d-ff", type=flags.positive, default=512)
    g.add_argument("--dropout", type=flags.probability, default=0.1)
    g.add_argument("--label-smoothing", type=flags.probability, default=0.1)
    g = p.add_argument_group("answers")
    g.add_argument(
        "--ask", nargs="+", default=None, help="questions to answer (default: a few held-out ones)"
    )
    g.add_argument(
        "--temperature",
        type=flags.at_least(0.0, float),
        default=0.8,
        help="for the sampled answers (0: greedy)",
    )
    g.add_argument("--top-k", type=flags.positive, default=10, help="for the sampled answers")
    flags.add_training_args(
        p,
        "chatbot",
        steps=3000,
        batch_size=64,
        lr=0.5,
        warmup=500,
        eval_every=250,
        lr_help="scale of the warm-up schedule: lr = scale * d_model^-0.5 * "
        "min(step^-0.5, step * warmup^-1.5)",
    )


example = session.Example("chatbot.py", __doc__, add_flags, MODEL_ARGS, flags.heads_divide_d_model)
parse_args, run, main = example.parse_args, example.run, example.main


@example.body
def train_and_answer(args, checkpoints, restored):
    """Reads the pairs, trains the tokenizer and the Transformer, answers, plots."""
    pairs, source, skipped = task.load_pairs(args)
    train_idx, val_idx = shuffled_split(len(pairs), args.val_fraction, args.seed)
    train_pairs = [pairs[i] for i in train_idx]
    val_pairs = [pairs[i] for i in val_idx]
    if restored is not None:  # the very tokenizer the checkpoint was trained with
        tok = tokenizer_from_json(restored.meta["tokenizer"])
    else:
        tok = train_subword_tokenizer(
            [t for qa in train_pairs for t in qa], vocab_size=args.vocab_size, kind=args.tokenizer
        )
    train_data = task.encode_pairs(tok, train_pairs, args.max_len)
    val_data = task.encode_pairs(tok, val_pairs, args.max_len)
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
    tx = make_optimizer("noam", args.lr, args.warmup, args.steps, d_model=args.d_model)
    loss = task.Seq2SeqLoss(args.label_smoothing)
    trainer = Trainer(model, tx, loss, seed=args.seed, mesh=flags.make_mesh(args.mesh))
    batches_val = task.val_batches(val_data, args.batch_size, args.max_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        return {"val_loss": s["nll_sum"] / s["tokens"], "val_accuracy": s["correct"] / s["tokens"]}

    n_train = len(train_data.src)
    result = fit(
        trainer,
        args,
        get_batch=lambda step: task.make_batch(
            train_data, batch_indices(n_train, args.batch_size, step, args.seed), args.max_len
        ),
        count_tokens=lambda b: int(b["src_len"].sum() + b["tgt_len"].sum()),
        validate=validate,
        checkpoints=checkpoints,
        restored=restored,
        meta={"tokenizer": tok.to_str()},
    )

    # Answers: the questions asked, or a few held-out ones (with their reference answers).
    if args.ask:
        questions, references = list(args.ask), [None] * len(args.ask)
    else:
        shown = val_pairs[:4] if args.data is not None else task.generated_pairs(4, args.seed + 1)
        questions, references = [q for q, _ in shown], [a for _, a in shown]
    bot = trainer.model
    how = dict(max_len=args.max_len, top_k=args.top_k, seed=args.seed)
    greedy, greedy_ids = task.answer(bot, tok, questions, temperature=0.0, **how)
    sampled, _ = task.answer(bot, tok, questions, temperature=args.temperature, **how)
    answers = []
    for q, ref, g, s in zip(questions, references, greedy, sampled, strict=True):
        answers.append({"question": q, "greedy": g, "sampled": s, "reference": ref})
        print(f"Q: {q}\n  greedy:  {g}\n  sampled: {s}" + (f"\n  data:    {ref}" if ref else ""))

    history, out = result.history, args.out_dir
    loss_png = plots.plot_losses(
        history,
        out / "loss.png",
        title="chatbot (train: label-smoothed)",
        ylabel="loss (nats / token)",
    )
    attn_png = task.plot_cross_attention(
        bot, tok, questions[0], greedy_ids[0], out / "attention.png"
    )

    final = history["val"][-1]  # the last validation
    summary = {
        "data": source,
        "pairs": len(pairs),
        "skipped_rows": skipped,
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "tokenizer": args.tokenizer,
        "vocab_size": tok.get_vocab_size(),
        **result.summary(args, "tokens_per_second"),
        "val_token_accuracy": round(final["val_accuracy"], 4),
        "answers": answers,
    }
    return summary, trainer, {"loss": loss_png, "attention": attn_png}


if __name__ == "__main__":
    main(sys.argv[1:])
