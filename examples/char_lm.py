"""Character-level language model: a jattn ``DecoderLM`` trained on any UTF-8 text.

Trains on windows of ``--seq-len`` characters drawn from the first 90% of the text, validates on
the held-out last 10% (loss in nats per character), then continues ``--prompt``.

Sampling: ``--temperature T`` samples from ``softmax(logits / T)``; ``--alpha A`` is the same
choice written as a scale factor, ``softmax(A * logits)`` with ``A = 1 / T``. Higher alpha
(lower temperature) gives more predictable text; T = 0 (alpha = inf) is greedy decoding.

Without ``--text`` it trains on the Python documentation that every Python install ships
(``pydoc_data.topics``), so it runs anywhere.

    python examples/char_lm.py --text ../shared/data/mysterious_island.txt \\
        --steps 3000 --max-minutes 30 --prompt "The engineer" --temperature 0.5 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

try:  # run as a script (python examples/char_lm.py) or imported as examples.char_lm
    from examples import common
except ImportError:  # pragma: no cover - the script's own directory is on sys.path instead
    import common  # type: ignore[no-redef]

import jattn.nn as jn

MODEL_ARGS = ("d_model", "layers", "heads", "d_ff", "dropout", "seq_len")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="char_lm.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--text",
        type=Path,
        default=None,
        help="UTF-8 text file (default: the standard library's pydoc_data topics)",
    )
    g.add_argument(
        "--no-gutenberg-cut",
        action="store_true",
        help="keep a Project Gutenberg header and footer (cut by default when present)",
    )
    g.add_argument("--start-marker", help="start at the first line that is exactly this text")
    g.add_argument("--end-marker", help="stop before the first line that is exactly this text")
    g.add_argument("--seq-len", type=int, default=128, help="characters per training window")
    g.add_argument("--val-fraction", type=float, default=0.1, help="held-out tail of the text")
    g = p.add_argument_group("model")
    g.add_argument("--d-model", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ff", type=int, default=None, help="feed-forward width (default 4*d)")
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=None, help="default: the start of the held-out text")
    g.add_argument(
        "--temperature",
        type=float,
        nargs="+",
        default=None,
        help="one sample per value; softmax(logits / T), 0 = greedy (default: 0.5 1.0)",
    )
    g.add_argument(
        "--alpha",
        type=float,
        nargs="+",
        default=None,
        help="the same as a scale factor: softmax(alpha * logits), alpha = 1/T; "
        "higher alpha = more predictable text",
    )
    g.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest chars")
    g.add_argument("--gen-length", type=int, default=400, help="characters to generate")
    common.add_training_args(
        p,
        name="char_lm",
        steps=2000,
        batch_size=64,
        lr=2e-3,
        warmup=100,
        eval_every=200,
        implementation="fused",
    )
    return p


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        common.finish_args(args)
        if args.temperature is not None and args.alpha is not None:
            raise ValueError("give --temperature or --alpha, not both")
        if args.alpha is not None:
            if any(a <= 0 for a in args.alpha):
                raise ValueError("--alpha must be positive (alpha = 1/temperature)")
            args.temperature = [1.0 / a for a in args.alpha]
        if args.temperature is None:
            args.temperature = [0.5, 1.0]
        if any(t < 0 for t in args.temperature):
            raise ValueError("--temperature must be >= 0")
        if args.seq_len < 2:
            raise ValueError("--seq-len must be at least 2")
    except ValueError as e:
        parser.error(str(e))
    return args


# -- data --------------------------------------------------------------------------------------


def load_text(args: argparse.Namespace) -> tuple[str, str]:
    """``(text, where it came from)``."""
    if args.text is None:
        from pydoc_data.topics import topics

        return "".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    text = common.read_text(args.text)
    if not args.no_gutenberg_cut or args.start_marker or args.end_marker:
        text = common.strip_gutenberg(
            text, start_marker=args.start_marker, end_marker=args.end_marker
        )
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


def make_data(text: str, val_fraction: float, seq_len: int, vocab: str | None) -> CharData:
    vocab = vocab if vocab is not None else "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({c for c in text if c not in index})
    if unknown:
        warnings.warn(f"{len(unknown)} characters not in the vocabulary are dropped", stacklevel=2)
    ids = np.fromiter((index[c] for c in text if c in index), np.int32)
    cut = common.tail_split(len(ids), val_fraction)
    train, val = ids[:cut], ids[cut:]
    if len(train) < seq_len + 1 or len(val) < seq_len + 1:
        raise ValueError(
            f"the text is too short for --seq-len {seq_len}: {len(train)} training and "
            f"{len(val)} validation characters"
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
        weight = np.zeros(batch_size, np.float32)
        weight[: len(chunk)] = 1.0
        pad = np.zeros((batch_size - len(chunk), seq_len + 1), np.int32)
        batches.append({"tokens": np.concatenate([chunk, pad]), "weight": weight})
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


# -- main --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    summary: dict[str, Any]
    trainer: common.Trainer
    data: CharData


def run(argv: Sequence[str] | None = None) -> Result:
    """Trains, validates, generates and plots; returns the summary and the trained state."""
    t0 = time.perf_counter()
    args = parse_args(argv)
    checkpoints, saved_meta = common.open_checkpoints(args, MODEL_ARGS)

    text, source = load_text(args)
    data = make_data(
        text, args.val_fraction, args.seq_len, saved_meta["vocab"] if saved_meta else None
    )
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
    tx = common.make_optimizer(
        "cosine", args.lr, args.warmup, args.steps, weight_decay=args.weight_decay
    )
    trainer = common.Trainer(model, tx, lm_loss, seed=args.seed, mesh=common.parse_mesh(args.mesh))
    history: dict[str, list] = {"train": [], "val": []}
    resumed_from = None
    if saved_meta is not None:
        meta = checkpoints.restore(trainer)
        history = meta["history"]
        resumed_from = trainer.step
        print(f"resumed from step {resumed_from} of {args.ckpt_dir}", flush=True)

    batches_val = val_batches(data, args.batch_size, args.seq_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        loss = s["nll_sum"] / s["chars"]
        return {"val_loss": loss, "val_bits_per_char": loss / math.log(2)}

    def meta() -> dict[str, Any]:
        return {"args": common.jsonable_args(args), "vocab": data.vocab, "history": history}

    result = common.fit(
        trainer,
        args,
        get_batch=lambda step: train_batch(data, args.batch_size, args.seq_len, args.seed, step),
        count_tokens=lambda batch: batch["tokens"].shape[0] * args.seq_len,
        validate=validate,
        history=history,
        checkpoints=checkpoints,
        meta=meta,
        unit="char",
    )
    checkpoints.close()

    # Samples and plots from the trained model.
    lm = trainer.model
    prompt = args.prompt if args.prompt is not None else data.decode(data.val[:40])
    samples = []
    for temperature in args.temperature:
        sample = generate_text(
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

    out = args.out_dir
    loss_png = common.plot_losses(
        history, out / "loss.png", title="character LM", ylabel="loss (nats / char)"
    )
    shown = data.encode(samples[0]["text"])[: min(args.seq_len, 48)]
    weights = common.record_attention(
        lm, ("layers", -1, "self_attn"), lambda m: m(jnp.asarray(shown)[None])
    )[0]
    labels = [common.show_token(c) for c in data.decode(shown)]
    heads = min(weights.shape[0], 4)
    attn_png = common.plot_attention(
        weights[:heads],
        out / "attention.png",
        row_labels=labels,
        col_labels=labels,
        title=f"last layer's causal self-attention (heads 1-{heads})",
        panel_titles=[f"head {h + 1}" for h in range(heads)],
        xlabel="attended character",
        ylabel="query character",
    )

    final = history["val"][-1]
    summary = {
        "example": "char_lm",
        "text": source,
        "characters": len(text),
        "vocab_size": len(data.vocab),
        "train_chars": len(data.train),
        "val_chars": len(data.val),
        "params": common.count_params(lm),
        "implementation": args.implementation,
        "seed": args.seed,
        "step": result.end_step,
        "resumed_from": resumed_from,
        "stopped_early": result.stopped_early,
        "train_seconds": round(result.train_seconds, 1),
        "chars_per_second": round(result.tokens_per_second or 0.0),
        "val_loss": round(final["val_loss"], 4),
        "val_bits_per_char": round(final["val_bits_per_char"], 4),
        "best_val_loss": round(min(v["val_loss"] for v in history["val"]), 4),
        "prompt": prompt,
        "samples": samples,
        "plots": {"loss": str(loss_png), "attention": str(attn_png)},
        "checkpoint_dir": str(args.ckpt_dir),
        "wall_seconds": common.seconds(t0),
    }
    common.write_summary(summary, out)
    return Result(summary, trainer, data)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the summary (also written to OUT_DIR/summary.json)."""
    return run(argv).summary


if __name__ == "__main__":
    main(sys.argv[1:])
