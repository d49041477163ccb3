"""Character-level language model: a jattn ``DecoderLM`` trained on any UTF-8 text.

Trains on windows of ``--seq-len`` characters drawn from the first 90% of the text, validates on
the held-out last 10% (loss in nats per character), then continues ``--prompt``.

Sampling: ``--temperature T`` samples from ``softmax(logits / T)``; ``--alpha A`` is the same
choice written as a scale factor, ``softmax(A * logits)`` with ``A = 1 / T``. Higher alpha
(lower temperature) gives more predictable text; T = 0 (alpha = inf) is greedy decoding.

Without ``--text`` it trains on the Python documentation that every Python install ships
(``pydoc_data.topics``), so it runs anywhere. The Mysterious Island (Project Gutenberg ebook
1268, see docs/examples.md) is the text of the README's results:

    python examples/char_lm.py --text mysterious_island.txt \\
        --steps 3000 --max-minutes 30 --prompt "The engineer" --temperature 0.5 1.0
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if not __package__:  # run as a file (python examples/char_lm.py): import as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import jax.numpy as jnp
from flax import nnx

import jattn.nn as jn
from examples import flags, plots, session
from examples.attention_maps import sown_attention
from examples.fit import fit
from examples.tasks import char_lm as task
from examples.tasks.char_lm import MODEL_ARGS
from examples.trainer import Trainer, make_optimizer
from examples.vocab import show_token


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--text", type=Path, help="UTF-8 text file (default: the standard library's pydoc_data)"
    )
    g.add_argument(
        "--no-gutenberg-cut",
        action="store_true",
        help="keep a Project Gutenberg header and footer (cut by default when present)",
    )
    g.add_argument("--start-marker", help="start at the first line that is exactly this text")
    g.add_argument("--end-marker", help="stop before the first line that is exactly this text")
    g.add_argument(
        "--seq-len", type=flags.at_least(2), default=128, help="characters per training window"
    )
    g.add_argument(
        "--val-fraction", type=flags.fraction, default=0.1, help="held-out tail of the text"
    )
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=flags.positive, default=256)
    g.add_argument("--layers", type=flags.positive, default=4)
    g.add_argument("--heads", type=flags.positive, default=4)
    g.add_argument(
        "--d-ff", type=flags.positive, default=None, help="feed-forward width (default 4*d)"
    )
    g.add_argument("--dropout", type=flags.probability, default=0.0)
    g.add_argument("--weight-decay", type=flags.at_least(0.0, float), default=0.01)
    g = p.add_argument_group("generation")
    g.add_argument(
        "--prompt",
        default=None,
        help="text the samples continue (default: the start of the first line of prose in the "
        "held-out text, up to 40 characters)",
    )
    g.add_argument(
        "--temperature",
        type=flags.at_least(0.0, float),
        nargs="+",
        default=None,
        help="one sample per value; softmax(logits / T), 0 = greedy (default: 0.5 1.0)",
    )
    g.add_argument(
        "--alpha",
        type=flags.positive_float,
        nargs="+",
        default=None,
        help="the same as a scale factor: softmax(alpha * logits), alpha = 1/T; "
        "higher alpha = more predictable text",
    )
    g.add_argument(
        "--top-k", type=flags.positive, default=None, help="sample among the k likeliest chars"
    )
    g.add_argument("--gen-length", type=flags.positive, default=400, help="characters to generate")
    flags.add_training_args(
        p, "char_lm", steps=2000, batch_size=64, lr=2e-3, warmup=100, eval_every=200
    )


def check(args: argparse.Namespace) -> None:
    """The rules between flags (each flag's own range is checked by its ``type``)."""
    if args.temperature is not None and args.alpha is not None:
        raise ValueError("give --temperature or --alpha, not both")
    if args.alpha is not None:
        args.temperature = [1.0 / a for a in args.alpha]
    if args.temperature is None:
        args.temperature = [0.5, 1.0]
    flags.heads_divide_d_model(args)


example = session.Example("char_lm.py", __doc__, add_flags, MODEL_ARGS, check)
parse_args, run, main = example.parse_args, example.run, example.main


@example.body
def train_and_sample(args, checkpoints, restored):
    """Reads the text, trains the LM, samples from it and plots its attention."""
    text, source = task.load_text(args)
    vocab = restored.meta["vocab"] if restored else None
    data = task.make_data(text, args.val_fraction, args.seq_len, vocab, source)
    print(
        f"{source}: {len(text):,} characters, {len(data.vocab)} distinct; "
        f"{len(data.train):,} for training, {len(data.val):,} held out",
        flush=True,
    )
    model = jn.DecoderLM(
        len(data.vocab),
        d_model=args.d_model,
        num_layers=args.layers,
        num_heads=args.heads,
        d_ff=args.d_ff or 4 * args.d_model,
        dropout_rate=args.dropout,
        implementation=args.implementation_value,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    tx = make_optimizer("cosine", args.lr, args.warmup, args.steps, weight_decay=args.weight_decay)
    trainer = Trainer(model, tx, task.lm_loss, seed=args.seed, mesh=flags.make_mesh(args.mesh))
    batches_val = task.val_batches(data, args.batch_size, args.seq_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        loss = s["nll_sum"] / s["chars"]
        return {"val_loss": loss, "val_bits_per_char": loss / math.log(2)}

    result = fit(
        trainer,
        args,
        get_batch=lambda step: task.train_batch(
            data, args.batch_size, args.seq_len, args.seed, step
        ),
        count_tokens=lambda batch: batch["tokens"].shape[0] * args.seq_len,
        validate=validate,
        checkpoints=checkpoints,
        restored=restored,
        meta={"vocab": data.vocab},
        unit="char",
    )

    # Samples and plots from the trained model.
    lm = trainer.model
    prompt = args.prompt if args.prompt is not None else task.default_prompt(data)
    samples = []
    for temperature in args.temperature:
        sample = task.generate_text(
            lm,
            data,
            prompt,
            length=args.gen_length,
            seq_len=args.seq_len,
            temperature=temperature,
            top_k=args.top_k,
            seed=args.seed,
        )
        alpha = None if temperature == 0 else 1.0 / temperature  # greedy: alpha = infinity
        samples.append({"temperature": temperature, "alpha": alpha, "text": sample})
        shown_alpha = "inf" if alpha is None else f"{alpha:.3g}"
        print(f"\n--- temperature {temperature} (alpha {shown_alpha}) ---\n{sample}\n", flush=True)

    history, out = result.history, args.out_dir
    loss_png = plots.plot_losses(
        history, out / "loss.png", title="character LM", ylabel="loss (nats / char)"
    )
    shown = data.encode(samples[0]["text"])[: min(args.seq_len, 48)]
    weights = sown_attention(
        lm, ("layers", -1, "self_attn"), lambda m: m(jnp.asarray(shown)[None])
    )[0]
    labels = [show_token(c) for c in data.decode(shown)]
    heads = min(weights.shape[0], 4)
    attn_png = plots.plot_attention(
        weights[:heads],
        out / "attention.png",
        row_labels=labels,
        col_labels=labels,
        title=f"last layer's causal self-attention (heads 1-{heads})",
        panel_titles=[f"head {h + 1}" for h in range(heads)],
        xlabel="attended character",
        ylabel="query character",
    )

    final = history["val"][-1]  # the last validation
    summary = {
        "text": source,
        "characters": len(text),
        "vocab_size": len(data.vocab),
        "train_chars": len(data.train),
        "val_chars": len(data.val),
        **result.summary(args, "chars_per_second"),
        "val_bits_per_char": round(final["val_bits_per_char"], 4),
        "best_val_loss": round(min(v["val_loss"] for v in history["val"]), 4),
        "prompt": prompt,
        "samples": samples,
    }
    return summary, trainer, {"loss": loss_png, "attention": attn_png}


if __name__ == "__main__":
    main(sys.argv[1:])
