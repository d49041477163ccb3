"""`python -m bench [run] [options]` measures; `python -m bench report FILE...` reports;
`python -m bench train [options]` measures whole training steps of jattn's models;
`python -m bench device` is the one-shot check of a GPU machine (bench/device.py).

Run `python -m bench --help` or `python -m bench report --help` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys
from collections.abc import Sequence

from bench.records import MODES, read_records, record_kind
from bench.roofline import RooflineConfig
from bench.runners import DTYPES, PEERS
from bench.shapes import SET_DTYPES, SHAPE_SETS, Shape, parse_shape
from bench.timing import TimingConfig

SUBCOMMANDS = ("run", "report", "list", "train", "device")


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _names(text: str) -> list[str] | None:
    """'all' -> None (every default one), 'none' -> [], else the comma-separated names."""
    if text == "all":
        return None
    if text == "none":
        return []
    return _csv(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Attention throughput: jattn's implementations against their peers.",
        epilog="With no subcommand, `run` is meant: `python -m bench --repeats 3` is "
        "`python -m bench run --repeats 3`. See `python -m bench run --help` for its options.",
    )
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="measure (the default when no subcommand is given)")
    run.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated named shape sets: {', '.join(SHAPE_SETS)} (default: quick, "
        "unless --shape is given)",
    )
    run.add_argument(
        "--shape",
        action="append",
        default=[],
        metavar="B,T,S,N,K,H",
        help="an extra shape (B,T,S,N,K,H,Hv for value heads of size Hv; B,T,N,H for "
        "self-attention with K=N; last items, in either order: 'sinks' adds attention sinks, "
        "'latent' makes the values the keys' first Hv features, one array, as MLA decodes: "
        "jattn gets value_dim=Hv, the peers the slice); repeatable",
    )
    run.add_argument(
        "--impls",
        default="all",
        help="jattn implementations, comma-separated registry names, 'all' (every one "
        "jattn.kernels.available() lists for this backend; kernels that run only emulated "
        "there, Pallas in interpret mode on a CPU, are not listed) or 'none'",
    )
    run.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="IMPL:FIELD=VALUE[,FIELD=VALUE...]",
        help="also measure jattn implementation IMPL with these fields of its tuning config "
        "replaced (the rest as its default for each case), as 'jattn:IMPL[FIELD=VALUE,...]'; "
        "values: int, float, true/false, none or a string; repeatable",
    )
    run.add_argument(
        "--peers",
        default="all",
        help=f"peers: comma-separated from {', '.join(PEERS)}; 'all' or 'none' (default: all)",
    )
    run.add_argument(
        "--dtypes",
        default=None,
        help="comma-separated: float32, bfloat16, float16 (default: float32; float32,bfloat16 "
        "for the bf16 shape set)",
    )
    run.add_argument(
        "--causal",
        choices=("both", "yes", "no"),
        default="both",
        help="causal mask, no mask, or both (default). Decode shapes (T=1) run without.",
    )
    run.add_argument(
        "--modes",
        default="fwd,fwd+bwd",
        help="comma-separated: fwd (forward), fwd+bwd (forward and gradients of q, k, v), "
        "jvp (forward mode: the output and its tangent along tangents of q, k, v)",
    )
    run.add_argument("--repeats", type=int, default=5, help="timed samples per case (default 5)")
    run.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    run.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure a case's implementations in turn this many times and pool each one's "
        "samples: on a shared machine whose speed drifts, all see the same spells (default 1)",
    )
    run.add_argument(
        "--min-time",
        type=float,
        default=0.01,
        help="seconds a sample lasts at least; fast calls repeat within a sample (default 0.01)",
    )
    run.add_argument(
        "--cache",
        choices=("auto", "cold", "warm"),
        default="auto",
        help="auto (default): decode shapes (T=1) timed with the caches emptied before every "
        "call (one call a sample), as a model's decoding finds them; cold / warm: every case "
        "so / none",
    )
    run.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    run.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (default: every core this process may use, as XLA does)",
    )
    run.add_argument(
        "--out",
        default=None,
        help="results file, JSON lines, appended to (default: results/bench-BACKEND-TIME.jsonl)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--no-roofline",
        action="store_true",
        help="do not measure the machine's matmul rate and memory bandwidth first (a few seconds)",
    )

    report = sub.add_parser("report", help="markdown table and PNG plots from results files")
    report.add_argument("files", nargs="+", help="results files (JSON lines) from any machines")
    report.add_argument(
        "--out-dir",
        default="results/report",
        help="where report.md, throughput.png and speedup.png go (default results/report)",
    )
    report.add_argument(
        "--baseline",
        default=None,
        help="implementation speed-ups are over, one measured in the files (default jax.nn:xla; "
        "without it in the files, no speed-ups)",
    )

    sub.add_parser("list", help="the shape sets and the implementations this machine can run")

    from bench import device

    dev = sub.add_parser(
        "device",
        help="one-shot device check: versions, the kernel suite and the benchmark on the GPU, "
        "within 8 minutes, every file in one folder",
        description="The one-shot check of a GPU machine, within --budget-s seconds (default "
        "480): prints the device and software versions (jax, jaxlib, flax, jax plugins, the "
        "driver via nvidia-smi); runs the shared kernel suite (tests/kernels/test_suite.py "
        "--impls NAME, float64 reference on the host CPU) on the GPU for each of --impls, each "
        "stopping at its first failure; runs the benchmark on the GPU (the bf16 matmul rate, "
        "then bf16 and f16, fwd and fwd+bwd, H=64 and 128, T=1k-16k, causal and not, decode, "
        "beside jax.nn xla and cudnn and tokamax where it imports); writes summary.txt and "
        "summary.json. Each phase has its own time budget and a step that runs out is stopped "
        "and says so. Without a GPU the suite and the benchmark are skipped and the summary "
        "says so; with --quick they are rehearsed there on tiny selections (not device "
        "results). Exit code 0 when every step that ran passed. Run it from a clone of the "
        "repository (the suite lives in tests/).",
    )
    dev.add_argument(
        "--out",
        default=None,
        help="the folder every log and record file goes to; new or empty "
        "(default: results/device-TIME)",
    )
    dev.add_argument(
        "--impls",
        default=",".join(device.DEFAULT_IMPLS),
        help="comma-separated jattn implementations the suite checks on the GPU "
        f"(default {','.join(device.DEFAULT_IMPLS)}); the benchmark measures every one that "
        "runs there",
    )
    dev.add_argument(
        "--budget-s",
        type=float,
        default=device.DEFAULT_BUDGET_S,
        help=f"seconds for the whole check, shared out among the phases (default "
        f"{device.DEFAULT_BUDGET_S:.0f}, at least {device.MIN_BUDGET_S:.0f})",
    )
    dev.add_argument(
        "--quick",
        action="store_true",
        help="tiny selections (two suite tests, a tiny sweep): a smoke test; without a GPU, "
        "the CPU rehearsal of the suite's and the benchmark's plumbing",
    )

    from bench.train import JATTN_IMPLS, TRAIN_PEERS, TRAIN_SETS

    train = sub.add_parser(
        "train",
        help="whole training steps (forward, backward, AdamW) of jattn's DecoderLM and "
        "Transformer beside PyTorch",
    )
    train.add_argument(
        "--sets",
        default=None,
        help=f"comma-separated named sets: {', '.join(TRAIN_SETS)} (default: quick, unless "
        "--case is given)",
    )
    train.add_argument(
        "--case",
        action="append",
        default=[],
        metavar="MODEL,d_model,layers,heads,d_ff,vocab,B,T",
        help="an extra case, MODEL DecoderLM or Transformer "
        "(e.g. DecoderLM,384,6,6,1536,96,16,256); repeatable",
    )
    train.add_argument(
        "--impls",
        default="all",
        help=f"jattn implementations in the models: comma-separated from {', '.join(JATTN_IMPLS)} "
        "('auto': jattn's own choice), 'all' or 'none'",
    )
    train.add_argument(
        "--peers",
        default="all",
        help=f"peers: comma-separated from {', '.join(TRAIN_PEERS)} (xla: the jattn model with "
        "jax.nn.dot_product_attention), 'all' or 'none'",
    )
    train.add_argument("--repeats", type=int, default=3, help="timed steps per round (default 3)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    train.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="time a case's runners in turn this many times, pooling each one's samples "
        "(default 1)",
    )
    train.add_argument("--seed", type=int, default=0, help="seed of parameters and batches")
    train.add_argument(
        "--torch-threads", type=int, default=None, help="CPU threads for PyTorch (default: all)"
    )
    train.add_argument(
        "--out", default=None, help="results file, JSON lines (default: results/train-...jsonl)"
    )
    train.add_argument(
        "--no-roofline", action="store_true", help="do not measure the matmul rate first"
    )
    return parser


class BadOption(Exception):
    """A bad option or input file: `main` prints it as one line on stderr and returns 2."""


def _shapes(args: argparse.Namespace) -> list[tuple[str, Shape]]:
    chosen: list[tuple[str, Shape]] = []
    named = args.shapes if args.shapes is not None else ("" if args.shape else "quick")
    for name in _csv(named):
        if name not in SHAPE_SETS:
            raise BadOption(f"--shapes: unknown shape set {name!r}; known: {', '.join(SHAPE_SETS)}")
        chosen.extend((name, shape) for shape in SHAPE_SETS[name])
    for text in args.shape:
        try:
            chosen.append(("custom", parse_shape(text)))
        except ValueError as e:
            raise BadOption(f"--shape: {e}") from None
    seen: set[Shape] = set()  # a shape in two of the sets named is measured once
    unique = []
    for name, shape in chosen:
        if shape not in seen:
            seen.add(shape)
            unique.append((name, shape))
    return unique


def _impls(text: str) -> list[str] | None:
    names = _names(text)
    if not names:
        return names
    from bench.runners import known_jattn_names

    try:
        known = known_jattn_names()
    except Exception:  # jattn not importable: the sweep records that as an absent record
        return names
    for name in names:
        if name not in known:
            raise BadOption(
                f"--impls: unknown jattn implementation {name!r}; known: {', '.join(known)}, "
                "all, none"
            )
    return names


def _peers(text: str) -> list[str] | None:
    names = _names(text)
    for name in names or ():
        if name not in PEERS:
            raise BadOption(f"--peers: unknown peer {name!r}; known: {', '.join(PEERS)}, all, none")
    return names


def _configs(texts: Sequence[str]) -> list:  # -> list[ConfigSpec]
    from bench.runners import ConfigSpec, check_config

    specs = []
    for text in texts:
        try:
            spec = ConfigSpec.parse(text)
        except ValueError as e:
            raise BadOption(f"--config {e}") from None
        try:
            check_config(spec)
        except ImportError:  # jattn not importable: the sweep records that as an absent record
            pass
        except ValueError as e:
            raise BadOption(f"--config {text!r}: {e}") from None
        if spec in specs:
            raise BadOption(f"--config {text!r} is given twice")
        specs.append(spec)
    return specs


def _out_path(args: argparse.Namespace, backend: str) -> pathlib.Path:
    """The results file, checked before anything is measured: a folder or an unwritable place
    is refused now rather than after an hour of measuring."""
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("results") / f"bench-{backend}-{stamp}.jsonl"
    else:
        out = pathlib.Path(args.out)
    if out.is_dir():
        raise BadOption(f"--out {str(out)!r} names a folder; give a file (JSON lines)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8"):
            pass
    except OSError as e:
        raise BadOption(f"--out {str(out)!r}: cannot write there ({e.strerror or e})") from None
    return out


def _config(args: argparse.Namespace):  # -> SweepConfig (imported late: it imports JAX)
    from bench.sweep import SweepConfig

    dtypes = []
    dtype_text = args.dtypes
    if dtype_text is None:  # the shape sets' own dtypes, else float32
        sets = _csv(args.shapes) if args.shapes is not None else []
        dtype_text = ",".join(
            dict.fromkeys(d for name in sets for d in SET_DTYPES.get(name, ("float32",)))
            or ["float32"]
        )
    for name in _csv(dtype_text):
        if name not in DTYPES:
            known = ", ".join(sorted(set(DTYPES.values())))
            raise BadOption(f"--dtypes: unknown dtype {name!r}; known: {known}")
        dtypes.append(DTYPES[name])
    if not dtypes:
        raise BadOption(f"--dtypes {dtype_text!r} names no dtype")
    modes = _csv(args.modes)
    for mode in modes:
        if mode not in MODES:
            raise BadOption(f"--modes: unknown mode {mode!r}; known: {', '.join(MODES)}")
    if not modes:
        raise BadOption(f"--modes {args.modes!r} names no mode")
    _check_counts(args)
    if not (math.isfinite(args.min_time) and args.min_time >= 0):
        raise BadOption(f"--min-time must be a number of seconds >= 0, got {args.min_time}")
    shapes = _shapes(args)
    if not shapes:
        raise BadOption("no shape selected: give --shapes NAMES or --shape B,T,S,N,K,H")
    impls, peers = _impls(args.impls), _peers(args.peers)
    configs = _configs(args.config)
    if impls == [] and peers == [] and not configs:
        raise BadOption("--impls none --peers none selects no implementation: nothing to measure")
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    return SweepConfig(
        shapes=shapes,
        dtypes=dtypes,
        causal=causal,
        modes=modes,  # type: ignore[arg-type]
        impls=impls,
        peers=peers,
        timing=TimingConfig(
            repeats=args.repeats, warmup=args.warmup, min_time=args.min_time, rounds=args.rounds
        ),
        seed=args.seed,
        torch_threads=args.torch_threads,
        roofline=None if args.no_roofline else RooflineConfig(),
        configs=configs,
        cache=args.cache,
    )


def _check_counts(args: argparse.Namespace) -> None:
    """The timing and seed options that `run` and `train` share, each at least its minimum."""
    for option, value, least in (
        ("--repeats", args.repeats, 1),
        ("--warmup", args.warmup, 1),
        ("--rounds", args.rounds, 1),
        ("--torch-threads", args.torch_threads, 1),
        ("--seed", args.seed, 0),
    ):
        if value is not None and value < least:
            raise BadOption(f"{option} must be >= {least}, got {value}")


def _train_config(args: argparse.Namespace):  # -> bench.train.TrainConfig
    from bench.train import JATTN_IMPLS, TRAIN_PEERS, TRAIN_SETS, TrainConfig, TrainShape

    _check_counts(args)
    chosen: list[tuple[str, TrainShape]] = []
    named = args.sets if args.sets is not None else ("" if args.case else "quick")
    for name in _csv(named):
        if name not in TRAIN_SETS:
            raise BadOption(f"--sets: unknown set {name!r}; known: {', '.join(TRAIN_SETS)}")
        chosen.extend((name, shape) for shape in TRAIN_SETS[name])
    for text in args.case:
        try:
            chosen.append(("custom", TrainShape.parse(text)))
        except ValueError as e:
            raise BadOption(f"--case: {e}") from None
    if not chosen:
        raise BadOption("no case selected: give --sets NAMES or --case MODEL,d,L,N,ff,V,B,T")
    unique = list({shape: (name, shape) for name, shape in reversed(chosen)}.values())[::-1]
    impls, peers = _names(args.impls), _names(args.peers)
    for option, names, known in (("--impls", impls, JATTN_IMPLS), ("--peers", peers, TRAIN_PEERS)):
        for name in names or ():
            if name not in known:
                raise BadOption(
                    f"{option}: unknown name {name!r}; known: {', '.join(known)}, all, none"
                )
    if impls == [] and peers == []:
        raise BadOption("--impls none --peers none selects nothing to measure")
    return TrainConfig(
        shapes=unique,
        impls=impls,
        peers=peers,
        timing=TimingConfig(repeats=args.repeats, warmup=args.warmup, min_time=0.0,
                            rounds=args.rounds),
        seed=args.seed,
        torch_threads=args.torch_threads,
        roofline=None if args.no_roofline else RooflineConfig(dtypes=("float32",)),
    )  # fmt: skip


def _train(args: argparse.Namespace) -> int:
    from bench.report import train_run_table
    from bench.sweep import current_platform
    from bench.train import run_train

    config = _train_config(args)
    platform = current_platform()
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = str(pathlib.Path("results") / f"train-{platform.backend}-{stamp}.jsonl")
    out = _out_path(args, platform.backend)
    print(f"backend {platform.backend} ({platform.device_kind}); records -> {out}", flush=True)
    records = run_train(config, out, log=lambda line: print(line, flush=True))
    print()
    print(train_run_table(records))
    print(f"\n{len(records)} records written to {out}")
    if not any(r.status == "ok" and r.kind == "train" for r in records):
        print(
            "python -m bench train: nothing was measured (the reasons are above)", file=sys.stderr
        )
        return 1
    return 0


def _run(args: argparse.Namespace) -> int:
    from bench.report import run_table
    from bench.sweep import cases, current_platform, run_sweep

    config = _config(args)
    if not cases(config):
        raise BadOption(
            "the selection leaves no case to measure: decode shapes (T=1) run only without a "
            "causal mask, so --causal yes with only decode shapes measures nothing"
        )
    platform = current_platform()
    out = _out_path(args, platform.backend)
    print(f"backend {platform.backend} ({platform.device_kind}); records -> {out}", flush=True)
    records = run_sweep(config, out, progress=not args.no_progress, log=print)
    print()
    print(run_table(records, limits=False))  # the limits' line was printed when measured
    print(f"\n{len(records)} records written to {out}")
    attention = [r for r in records if r.kind == "attention"]
    if not any(r.status == "ok" for r in attention):
        print(
            "python -m bench: nothing was measured: every selected implementation is absent or "
            "failed on every case (the reasons are above)",
            file=sys.stderr,
        )
        return 1
    print(f"markdown table and plots of these results: python -m bench report {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from bench.report import BASELINE, write_report

    records = []
    for path in args.files:
        try:
            found = list(read_records([path]))
        except OSError as e:
            raise BadOption(f"report: cannot read {path!r}: {e.strerror or e}") from None
        except ValueError as e:
            raise BadOption(f"report: {e}") from None
        if not found:
            raise BadOption(f"report: {path!r} holds no records")
        records.extend(found)
    attention = [r for r in records if record_kind(r) == "attention"]
    trained = [r for r in records if record_kind(r) == "train" and r["status"] == "ok"]
    if not any(r["status"] == "ok" for r in attention) and not trained:
        statuses = ", ".join(sorted({r["status"] for r in attention})) or "none"
        raise BadOption(
            f"report: no measured ('ok') attention record in {', '.join(args.files)} "
            f"({len(attention)} attention records, status {statuses}) and no measured "
            "training step: nothing to report"
        )
    measured = sorted({r["implementation"] for r in attention + trained if r["status"] == "ok"})
    baseline = args.baseline or BASELINE
    if args.baseline is not None and args.baseline not in measured:
        raise BadOption(
            f"--baseline {args.baseline!r} has no measured record in these files; measured: "
            f"{', '.join(measured)}"
        )
    out_dir = pathlib.Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BadOption(f"--out-dir {str(out_dir)!r} names a file; give a folder")
    try:
        paths = write_report(records, out_dir, baseline=baseline)
    except OSError as e:
        why = e.strerror or e
        raise BadOption(f"--out-dir {str(out_dir)!r}: cannot write there ({why})") from None
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _list() -> int:
    from bench.runners import jattn_names, unavailable_jattn
    from bench.sweep import current_platform

    platform = current_platform()
    for name, shapes in SHAPE_SETS.items():
        print(f"{name}:")
        for shape in shapes:
            print(f"  {shape.label}")
    try:
        every, default = jattn_names(platform.backend)
        print(f"\njattn implementations: {', '.join(every)}")
        print(f"run by default on {platform.backend}: {', '.join(default)}")
        for name, why in sorted(unavailable_jattn().items()):
            print(f"not available: {name}: {why}")
    except Exception as e:
        print(f"\njattn is not importable: {e}")
    print(f"peers: {', '.join(PEERS)}")
    from bench.train import TRAIN_SETS

    print("\ntraining-step sets (python -m bench train --sets NAME):")
    for name, shapes in TRAIN_SETS.items():
        print(f"{name}:")
        for shape in shapes:
            print(f"  {shape.label}")
    return 0


def _device(args: argparse.Namespace) -> int:
    from bench.device import DeviceCheckError, parse_impls, run_device_check

    try:
        impls = parse_impls(args.impls)
        return run_device_check(
            args.out,
            impls=impls,
            budget_s=args.budget_s,
            quick=args.quick,
            print_fn=lambda text: print(text, flush=True),
        )
    except DeviceCheckError as e:
        raise BadOption(str(e)) from None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `python -m bench --repeats 3` means `python -m bench run --repeats 3`.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            return _report(args)
        if args.command == "list":
            return _list()
        if args.command == "train":
            return _train(args)
        if args.command == "device":
            return _device(args)
        return _run(args)
    except BadOption as e:
        print(f"python -m bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
