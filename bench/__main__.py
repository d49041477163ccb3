"""`python -m bench [run] [options]` measures; `python -m bench report FILE...` reports.

Run `python -m bench --help` or `python -m bench report --help` for the options.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
from collections.abc import Sequence

from bench.records import MODES, read_records
from bench.runners import DTYPES, PEERS
from bench.shapes import SHAPE_SETS, Shape, parse_shape
from bench.timing import TimingConfig

SUBCOMMANDS = ("run", "report", "list")


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
        help="an extra shape (B,T,N,H for self-attention with K=N); repeatable",
    )
    run.add_argument(
        "--impls",
        default="all",
        help="jattn implementations, comma-separated registry names, 'all' (every one that "
        "runs on this backend, except the slow 'reference' and Pallas in interpret mode on "
        "CPU) or 'none'",
    )
    run.add_argument(
        "--peers",
        default="all",
        help=f"peers: comma-separated from {', '.join(PEERS)}; 'all' or 'none' (default: all)",
    )
    run.add_argument(
        "--dtypes", default="float32", help="comma-separated: float32, bfloat16, float16"
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
        help="comma-separated: fwd (forward), fwd+bwd (forward and gradients of q, k, v)",
    )
    run.add_argument("--repeats", type=int, default=5, help="timed samples per case (default 5)")
    run.add_argument("--warmup", type=int, default=1, help="untimed calls first (default 1)")
    run.add_argument(
        "--min-time",
        type=float,
        default=0.01,
        help="seconds a sample lasts at least; fast calls repeat within a sample (default 0.01)",
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

    report = sub.add_parser("report", help="markdown table and PNG plots from results files")
    report.add_argument("files", nargs="+", help="results files (JSON lines) from any machines")
    report.add_argument(
        "--out-dir",
        default="results/report",
        help="where report.md, throughput.png and speedup.png go (default results/report)",
    )
    report.add_argument(
        "--baseline", default="jax.nn:xla", help="implementation speed-ups are over"
    )

    sub.add_parser("list", help="the shape sets and the implementations this machine can run")
    return parser


def _shapes(args: argparse.Namespace) -> list[tuple[str, Shape]]:
    chosen: list[tuple[str, Shape]] = []
    named = args.shapes if args.shapes is not None else ("" if args.shape else "quick")
    for name in _csv(named):
        if name not in SHAPE_SETS:
            raise SystemExit(f"unknown shape set {name!r}; known: {', '.join(SHAPE_SETS)}")
        chosen.extend((name, shape) for shape in SHAPE_SETS[name])
    for text in args.shape:
        try:
            chosen.append(("custom", parse_shape(text)))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return chosen


def _run(args: argparse.Namespace) -> int:
    from bench.report import run_table
    from bench.sweep import SweepConfig, current_platform, run_sweep

    dtypes = []
    for name in _csv(args.dtypes):
        if name not in DTYPES:
            raise SystemExit(
                f"unknown dtype {name!r}; known: {', '.join(sorted(set(DTYPES.values())))}"
            )
        dtypes.append(DTYPES[name])
    modes = _csv(args.modes)
    for mode in modes:
        if mode not in MODES:
            raise SystemExit(f"unknown mode {mode!r}; known: {', '.join(MODES)}")
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    try:
        timing = TimingConfig(repeats=args.repeats, warmup=args.warmup, min_time=args.min_time)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    config = SweepConfig(
        shapes=_shapes(args),
        dtypes=dtypes,
        causal=causal,
        modes=modes,  # type: ignore[arg-type]
        impls=_names(args.impls),
        peers=_names(args.peers),
        timing=timing,
        seed=args.seed,
        torch_threads=args.torch_threads,
    )
    platform = current_platform()
    out = args.out
    if out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = pathlib.Path("results") / f"bench-{platform.backend}-{stamp}.jsonl"
    print(f"backend {platform.backend} ({platform.device_kind}); records -> {out}", flush=True)
    try:
        records = run_sweep(config, out, progress=not args.no_progress, log=print)
    except ValueError as e:  # an unknown implementation or peer name
        raise SystemExit(str(e)) from None
    print()
    print(run_table(records))
    print(f"\n{len(records)} records written to {out}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from bench.report import write_report

    try:
        records = list(read_records(args.files))
    except (OSError, ValueError) as e:
        raise SystemExit(str(e)) from None
    paths = write_report(records, args.out_dir, baseline=args.baseline)
    print(paths["markdown"].read_text(encoding="utf-8"))
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _list() -> int:
    from bench.runners import jattn_names
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
    except Exception as e:
        print(f"\njattn is not importable: {e}")
    print(f"peers: {', '.join(PEERS)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `python -m bench --repeats 3` means `python -m bench run --repeats 3`.
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    if args.command == "report":
        return _report(args)
    if args.command == "list":
        return _list()
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
