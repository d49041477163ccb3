"""Sentence classifier: a bidirectional LSTM with jattn's ``AdditiveAttention`` (Bahdanau).

Each sentence goes through an embedding and a bidirectional LSTM (``flax.nnx.RNN`` over an
``OptimizedLSTMCell`` in each direction, padding-aware through the sequence lengths). The final
states of both directions form the query of an additive attention over all the LSTM states,
``score_j = vᵀ tanh(W₁ h_j + W₂ q)``, which ``jattn.nn.AdditiveAttention`` hands to the chosen
kernel as a bias (padding masked by the lengths). The context vector and the query feed a
linear layer over the classes. Validation accuracy is reported next to the majority-class
baseline.

Reads ``--data`` (a CSV with a text column and an integer label column, ``Q`` and ``label`` by
default: ChatbotData.csv, 0 everyday / 1 break-up / 2 love, see docs/examples.md). Labels are
cleaned of stray whitespace; rows whose label is not an integer are skipped and counted; the
labels must be the class ids 0..C-1, each present. Without ``--data`` it learns a generated
task: which of the letters x, y, z hides in a string of random letters.

    python examples/classifier.py --data ChatbotData.csv \\
        --label-names everyday breakup love --classify "헤어진 지 한 달" "오늘 점심 뭐 먹지"
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

if not __package__:  # run as a file (python examples/classifier.py): import as the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
from flax import nnx

from examples import flags, plots, session
from examples.data import batch_indices, shuffled_split
from examples.fit import fit
from examples.tasks import classifier as task
from examples.tasks.classifier import MODEL_ARGS
from examples.trainer import Trainer, make_optimizer
from examples.vocab import make_tokens, show_token


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None, help="CSV file (default: generated task)")
    g.add_argument("--text-column", default="Q")
    g.add_argument("--label-column", default="label")
    g.add_argument("--label-names", nargs="+", default=None, help="names of classes 0, 1, ...")
    g.add_argument(
        "--max-classes",
        type=flags.at_least(2),
        default=100,
        help="refuse data whose labels make more classes than this",
    )
    g.add_argument("--val-fraction", type=flags.fraction, default=0.1)
    g.add_argument(
        "--tokens",
        choices=("char", "bpe", "unigram"),
        default="char",
        help="characters, or subwords from a tokenizer trained on the training split",
    )
    g.add_argument("--vocab-size", type=flags.at_least(8), default=4000, help="for subword tokens")
    g.add_argument("--max-len", type=flags.positive, default=64, help="tokens kept per sentence")
    g.add_argument("--generated-examples", type=flags.at_least(2), default=3000)
    g = p.add_argument_group("model")
    g.add_argument("--embed", type=flags.positive, default=128)
    g.add_argument("--hidden", type=flags.positive, default=128, help="LSTM units per direction")
    g.add_argument("--units", type=flags.positive, default=128, help="additive attention width")
    g.add_argument("--dropout", type=flags.probability, default=0.3)
    g.add_argument("--weight-decay", type=flags.at_least(0.0, float), default=1e-4)
    g = p.add_argument_group("classification")
    g.add_argument(
        "--classify", nargs="+", default=None, help="sentences to classify after training"
    )
    flags.add_training_args(
        p,
        "classifier",
        steps=1500,
        batch_size=64,
        lr=2e-3,
        warmup=100,
        eval_every=150,
        # AdditiveAttention hands its scores to the kernel as a bias and plots the weights.
        needs=("bias", "return_weights"),
    )


example = session.Example("classifier.py", __doc__, add_flags, MODEL_ARGS)
parse_args, run, main = example.parse_args, example.run, example.main


@example.body
def train_and_classify(args, checkpoints, restored):
    """Reads the labelled sentences, trains the classifier, classifies, plots."""
    examples, source, skipped = task.load_examples(args)
    num_classes = max(label for _, label in examples) + 1
    if restored is not None:
        num_classes = restored.meta["num_classes"]
    default_names = ["x", "y", "z"] if args.data is None else [str(c) for c in range(num_classes)]
    names = args.label_names or default_names
    if len(names) != num_classes:
        raise flags.ExampleError(
            f"--label-names gives {len(names)} names for the {num_classes} classes of {source}"
        )
    train_idx, val_idx = shuffled_split(len(examples), args.val_fraction, args.seed)
    train_texts = [examples[i][0] for i in train_idx]
    val_texts = [examples[i][0] for i in val_idx]
    train_labels = np.asarray([examples[i][1] for i in train_idx])
    val_labels = np.asarray([examples[i][1] for i in val_idx])
    tokens = make_tokens(
        args.tokens, train_texts, args.vocab_size, restored.meta["tokens"] if restored else None
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

    model = task.BiLSTMAttentionClassifier(
        tokens.size,
        num_classes,
        embed=args.embed,
        hidden=args.hidden,
        units=args.units,
        dropout=args.dropout,
        implementation=args.implementation_value,
        rngs=nnx.Rngs(params=args.seed, dropout=args.seed + 1),
    )
    tx = make_optimizer("cosine", args.lr, args.warmup, args.steps, weight_decay=args.weight_decay)
    trainer = Trainer(
        model, tx, task.classify_loss, seed=args.seed, mesh=flags.make_mesh(args.mesh)
    )
    batches_val = task.val_batches(val_ids, val_labels, args.batch_size, args.max_len)

    def validate() -> dict[str, float]:
        s = trainer.evaluate(batches_val)
        return {"val_loss": s["nll_sum"] / s["count"], "val_accuracy": s["correct"] / s["count"]}

    result = fit(
        trainer,
        args,
        get_batch=lambda step: task.make_batch(
            train_ids,
            train_labels,
            batch_indices(len(train_ids), args.batch_size, step, args.seed),
            args.max_len,
        ),
        count_tokens=lambda b: int(b["lengths"].sum()),
        validate=validate,
        checkpoints=checkpoints,
        restored=restored,
        meta={"tokens": tokens.to_str(), "num_classes": num_classes},
    )

    # Classify the given sentences, or a few held-out ones (with their labels).
    clf = trainer.model
    if args.classify:
        texts, truth = list(args.classify), [None] * len(args.classify)
    else:
        texts, truth = val_texts[:6], val_labels[:6].tolist()
    ids = [tokens.encode(t)[: args.max_len] for t in texts]
    probs, weights = task.predict(clf, ids, args.max_len)
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

    history, out = result.history, args.out_dir
    loss_png = plots.plot_losses(
        history, out / "loss.png", title="BiLSTM + additive attention", ylabel="cross-entropy"
    )
    attn_png = plots.plot_token_weights(
        [[show_token(t) for t in tokens.pieces(i)] or ["∅"] for i in ids],
        [w if len(i) else w[:1] for w, i in zip(weights, ids, strict=True)],
        out / "attention.png",
        row_labels=[
            f"{c['predicted']}" + ("" if c["label"] is None else f" (label {c['label']})")
            for c in classified
        ],
        title="additive attention over the BiLSTM states (row: prediction)",
    )

    final = history["val"][-1]  # the last validation
    summary = {
        "data": source,
        "examples": len(examples),
        "skipped_rows": skipped,
        "classes": {names[c]: all_counts.get(c, 0) for c in range(num_classes)},
        "train_examples": len(train_ids),
        "val_examples": len(val_ids),
        "tokens": args.tokens,
        "vocab_size": tokens.size,
        **result.summary(args, "tokens_per_second"),
        "val_accuracy": round(final["val_accuracy"], 4),
        "best_val_accuracy": round(max(v["val_accuracy"] for v in history["val"]), 4),
        "majority_class": names[majority],
        "majority_baseline_val": round(baseline, 4),
        "majority_baseline_all": round(all_counts[majority] / len(examples), 4),
        "classified": classified,
    }
    return summary, trainer, {"loss": loss_png, "attention": attn_png}


if __name__ == "__main__":
    main(sys.argv[1:])
