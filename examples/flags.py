"""The command line the examples share: the training, checkpoint and output flags, the
checkers that refuse a bad value before any work starts, and one-line errors at the end.

Every flag is checked by argparse itself (a ``type=`` checker, so the message names the flag)
or, for rules between flags, by the example's ``check`` function; both run before any data is
read or any model is built. Errors found later (a bad data file, a locked output folder, a
non-finite loss) are :class:`ExampleError` and reach the user as one line
(:func:`examples.session.main`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import jattn

__all__ = [
    "ExampleError",
    "Implementation",
    "add_training_args",
    "at_least",
    "fraction",
    "heads_divide_d_model",
    "implementation_for",
    "jsonable_args",
    "make_mesh",
    "non_negative",
    "parse",
    "parse_implementation",
    "positive",
    "positive_float",
    "probability",
]

Implementation = str | tuple[str, ...] | None


class ExampleError(Exception):
    """A problem the user can fix (input data, the output folder, training diverged): shown
    as one line, without a traceback, and the script exits with status 1."""


# -- value checkers (argparse ``type=``) -------------------------------------------------------


def _number(kind: type, text: str) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """A checker for numbers ``>= low`` (finite, for floats)."""

    def check(text: str) -> Any:
        value = _number(kind, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {text}")
        return value

    check.__name__ = kind.__name__  # argparse names the type in its own messages
    return check


positive = at_least(1)
non_negative = at_least(0)


def positive_float(text: str) -> float:
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a held-out share)."""
    value = _number(float, text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return value


def probability(text: str) -> float:
    """A rate in [0, 1): dropout, label smoothing."""
    value = _number(float, text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def parse_implementation(text: str) -> Implementation:
    """``--implementation``: 'auto' -> None, 'a' -> 'a', 'a,b' -> ('a', 'b'), names checked
    against ``jattn.kernels.REGISTRY`` (a tuple, not a list: it lives in the models' static
    structure, which must be hashable). Raises ``ValueError``."""
    if text == "auto":
        return None
    names = [v.strip() for v in text.split(",") if v.strip()]
    known = jattn.kernels.REGISTRY
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        missing = getattr(jattn.kernels, "UNAVAILABLE", {})
        why = "".join(f"; {n!r} is unavailable here: {missing[n]}" for n in unknown if n in missing)
        raise ValueError(
            f"unknown implementation {', '.join(unknown) or repr(text)}{why}; known: "
            f"{', '.join(sorted(known))}, a comma-separated list of them, or 'auto'"
        )
    return names[0] if len(names) == 1 else tuple(names)


def implementation_for(features: Collection[str] = ()) -> Callable[[str], str]:
    """The ``--implementation`` checker: the names must be in the registry and, when the
    example needs kernel ``features`` (say returned weights), at least one of them must
    support all of them, as the registry states it (``REGISTRY[name].supports``)."""

    def check(text: str) -> str:
        try:
            value = parse_implementation(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        if value is None or not features:
            return text  # None: jattn picks a kernel that can serve each call
        names = (value,) if isinstance(value, str) else value
        registry = jattn.kernels.REGISTRY
        if not any(set(features) <= registry[n].supports for n in names):
            able = sorted(n for n, impl in registry.items() if set(features) <= impl.supports)
            raise argparse.ArgumentTypeError(
                f"{text!r} cannot serve this example, which needs {', '.join(sorted(features))}; "
                f"use {', '.join(able)} or 'auto'"
            )
        return text

    check.__name__ = "implementation"
    return check


def parse_mesh(text: str) -> dict[str, int]:
    """``data=4,model=2`` -> {"data": 4, "model": 2} (data -1: the remaining devices)."""
    sizes = {"data": -1, "model": 1}
    for part in text.split(","):
        name, _, size = part.partition("=")
        try:
            sizes[name] = int(size) if name in sizes else 0
        except ValueError:
            sizes[name] = 0
        if sizes[name] == 0 or sizes[name] < -1:
            raise ValueError(f"expected data=N,model=M with positive sizes, got {text!r}")
    return sizes


def _mesh(text: str) -> str:
    try:
        parse_mesh(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# -- the shared flags --------------------------------------------------------------------------


def add_training_args(
    parser: argparse.ArgumentParser,
    name: str,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    eval_every: int,
    implementation: str = "auto",
    needs: Collection[str] = (),
    lr_help: str = "peak learning rate",
) -> None:
    """The flags every example takes, with that example's defaults. ``needs``: the kernel
    features the example cannot do without (e.g. returned weights)."""
    g = parser.add_argument_group("training, checkpoints and output")
    g.add_argument(
        "--steps",
        type=positive,
        default=steps,
        help="total optimizer steps; a resumed run continues up to this number",
    )
    g.add_argument("--batch-size", type=positive, default=batch_size)
    g.add_argument("--lr", type=positive_float, default=lr, help=lr_help)
    g.add_argument(
        "--warmup", type=non_negative, default=warmup, help="learning-rate warm-up steps"
    )
    g.add_argument(
        "--eval-every",
        type=non_negative,
        default=eval_every,
        help="validate every N steps (0: at the end)",
    )
    g.add_argument(
        "--log-every", type=positive, default=10, help="average the loss over N steps for the bar"
    )
    g.add_argument(
        "--max-minutes",
        type=positive_float,
        default=None,
        help="stop training after this many minutes (then validate, save and report; "
        "default: no limit)",
    )
    g.add_argument(
        "--seed", type=non_negative, default=0, help="seeds initialisation, batches, dropout"
    )
    g.add_argument(
        "--implementation",
        type=implementation_for(needs),
        default=implementation,
        help="attention kernel: "
        + ", ".join(sorted(jattn.kernels.REGISTRY))
        + ", a comma-separated list tried in order, or 'auto' for jattn's default "
        f"(default: {implementation})",
    )
    g.add_argument(
        "--out-dir",
        type=Path,
        default=Path("runs") / name,
        help="plots and summary.json go here (default: %(default)s)",
    )
    g.add_argument(
        "--ckpt-dir",
        type=Path,
        default=None,
        help="orbax checkpoints (default: OUT_DIR/ckpt)",
    )
    g.add_argument(
        "--ckpt-every",
        type=non_negative,
        default=None,
        help="save every N steps (default: at each validation; 0: only at the end); always "
        "saved at the end",
    )
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the latest checkpoint in CKPT_DIR (its model settings win)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--mesh",
        type=_mesh,
        default=None,
        metavar="data=N,model=M",
        help="train on a device mesh: batches split over 'data', parameters and optimizer "
        "state placed by jattn.nn.sharding's rules (FSDP over 'data', tensor parallel over "
        "'model'); e.g. data=4,model=2. On a CPU, XLA_FLAGS="
        "--xla_force_host_platform_device_count=8 makes 8 devices to try it",
    )


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` as the examples show it: the docstring's own line breaks, and every flag with
    a default says it, unless its help already speaks of its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if not _has_default(action) or "default" in help:
            return help
        return f"{help} (default: %(default)s)".lstrip()


def _has_default(action: argparse.Action) -> bool:
    # 0 and 0.0 are defaults to show; None (unset) and False (a switch's off) are not.
    return bool(action.option_strings) and not any(
        action.default is x for x in (None, False, argparse.SUPPRESS)
    )


def _say_defaults(parser: argparse.ArgumentParser) -> None:
    # argparse shows nothing for a flag without help, default included: such flags get the
    # default as their help.
    for action in parser._actions:
        if action.help is None and _has_default(action):
            action.help = "(default: %(default)s)"


def parse(
    prog: str,
    doc: str,
    add_flags: Callable[[argparse.ArgumentParser], None],
    argv: Sequence[str] | None,
    check: Callable[[argparse.Namespace], None] | None = None,
) -> argparse.Namespace:
    """Builds the example's parser (``add_flags`` adds its flags), parses and checks ``argv``
    (``check`` raises ``ValueError`` for a rule between flags: an argparse error too), and
    fills the derived defaults of the shared flags."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=HelpFormatter,
    )
    add_flags(parser)
    _say_defaults(parser)
    args = parser.parse_args(argv)
    if args.ckpt_dir is None:
        args.ckpt_dir = args.out_dir / "ckpt"
    if args.ckpt_every is None:
        args.ckpt_every = args.eval_every
    args.implementation_value = parse_implementation(args.implementation)
    for flag in ("out_dir", "ckpt_dir"):
        path = getattr(args, flag)
        if path.exists() and not path.is_dir():
            parser.error(f"--{flag.replace('_', '-')} {path} exists and is not a folder")
    try:
        if check is not None:
            check(args)
    except ValueError as e:
        parser.error(str(e))
    return args


def heads_divide_d_model(args: argparse.Namespace) -> None:
    """A Transformer example's rule between flags: ``--d-model`` splits evenly into heads."""
    if args.d_model % args.heads:
        raise ValueError(f"--d-model {args.d_model} must be a multiple of --heads {args.heads}")


def make_mesh(text: str | None) -> Any:
    """The ``--mesh`` value as a ``jax.sharding.Mesh`` (None when not given)."""
    if text is None:
        return None
    from jattn.nn import sharding

    sizes = parse_mesh(text)
    try:
        return sharding.make_mesh(data=sizes["data"], model=sizes["model"])
    except ValueError as e:
        raise ExampleError(f"--mesh {text}: {e}") from None


def jsonable_args(args: argparse.Namespace) -> dict[str, Any]:
    """The command line as JSON-friendly values (paths as strings)."""
    return {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k != "implementation_value"
    }
