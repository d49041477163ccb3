"""The registry of attention implementations: what each is, what it supports, where it runs.

An implementation is either a single-head kernel ``fn(q [T, H], k [S, H], v [S, Hv], *, plan)``
that :func:`jattn.attention` vmaps over heads and batch (the plan's leaves then sliced to one
head), or a batched one ``fn(q [*B, T, N, H], k [*B, S, K, H], v [*B, S, K, Hv], *, plan)`` that
indexes heads itself. Both return a :class:`KernelOutput` and read only the
:class:`jattn.plan.Plan` of the call, with its ``config`` already resolved (:func:`select`):
a kernel never re-checks a feature its ``supports`` states, nor picks its own config.

Implementations that need an optional backend (Pallas, cuDNN, the native CPU library) are
registered under a guarded import; one that cannot load is left out and the reason kept in
:data:`UNAVAILABLE`. The registry is read-only once this module is imported.

``implementation=None`` tries, in order, the names of :data:`DEFAULT_ORDER` for the backend and
the call's size ("short" below :data:`FLASH_MIN_SCORES` scores per head, else "long") that are
registered, verified on the backend (:data:`VERIFIED_ON_DEVICE`), run on it and support the
call's features.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from jattn.kernels import flash
from jattn.kernels.common import KernelOutput
from jattn.kernels.fused import fused_attention
from jattn.kernels.reference import reference_attention
from jattn.plan import FEATURES, Plan

__all__ = [
    "DEFAULT_ORDER",
    "FEATURES",
    "FLASH_MIN_SCORES",
    "Implementation",
    "ImplementationChoice",
    "KernelOutput",
    "REGISTRY",
    "UNAVAILABLE",
    "VERIFIED_ON_DEVICE",
    "available",
    "default_order",
    "record_choices",
    "select",
    "testable",
    "verified",
]

# What `implementation=` takes everywhere (jattn.attention, the nn modules, ring attention):
# None for the default order, a registry name, or names tried in order.
ImplementationChoice = str | Sequence[str] | None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation.

    Attributes:
      name: what ``implementation=`` calls it.
      fn: the kernel (single-head, or batched when ``batched``).
      supports: the subset of :data:`FEATURES` it serves.
      backends: the platforms it runs on ('cpu', 'gpu', 'tpu').
      config_type: its tuning dataclass, which users may pass as ``config=``, with a
        ``default_for(plan, backend)`` classmethod giving the heuristic default; or None.
      batched: whether ``fn`` takes whole arrays and indexes heads itself.
      interpret_backends: platforms where it runs only emulated (Pallas interpret mode on a
        CPU): callable by name, for tests, but never chosen by default nor benchmarked.
      oracle: the exact, slow kernel the tests compare against: last in the default order and
        benchmarked only when asked for by name.
      applies_sinks: whether a batched ``fn`` counts the plan's attention sinks in its ``out``
        and ``lse`` itself (otherwise ``jattn.attention`` merges them into its results).
    """

    name: str
    fn: Callable[..., KernelOutput]
    supports: frozenset[str]
    backends: frozenset[str]
    config_type: type | None = None
    batched: bool = False
    interpret_backends: frozenset[str] = frozenset()
    oracle: bool = False
    applies_sinks: bool = False

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The features of ``needed`` this implementation lacks, sorted."""
        return sorted(set(needed) - self.supports)

    def refusal(self, plan: Plan, backend: str, *, emulated_ok: bool) -> str | None:
        """Why this implementation cannot take ``plan`` on ``backend``, or None."""
        runs = self.backends | (self.interpret_backends if emulated_ok else frozenset())
        if backend not in runs:
            return f"{self.name!r} does not run on backend {backend!r}"
        if missing := self.missing(plan.features):
            return f"{self.name!r} does not support {', '.join(missing)}"
        return None


# The crossover between the materialising kernels and the blockwise ones: below this many
# scores per head (T * S) `fused` comes first, above it the blockwise kernels (whose memory
# stays O(T + S)). Measured with `python -m bench` on 2-core CPUs; see docs/kernels.md.
FLASH_MIN_SCORES = 512 * 1024

# implementation=None: the names tried, in order, by backend and call size, where each would go.
# Names that are not registered here (their backend is missing), and device kernels not yet
# verified on the backend (VERIFIED_ON_DEVICE), are passed over.
DEFAULT_ORDER: Mapping[str, Mapping[str, tuple[str, ...]]] = types.MappingProxyType(
    {
        "cpu": {
            # The native kernel is ahead of `fused` down to T = S = 128 (fwd 1.5-2.5x, fwd+bwd
            # 1.1-1.7x) and level with it below (sub-millisecond calls); see docs/kernels.md.
            "short": ("cpu", "fused", "flash", "reference"),
            "long": ("cpu", "flash", "fused", "reference"),
        },
        "gpu": {
            "short": ("cudnn", "pallas_gpu", "fused", "flash", "reference"),
            "long": ("cudnn", "pallas_gpu", "flash", "fused", "reference"),
        },
        "tpu": {
            "short": ("pallas_tpu", "fused", "flash", "reference"),
            "long": ("pallas_tpu", "flash", "fused", "reference"),
        },
    }
)

# The kernels whose device code is jattn's own (Pallas), and the accelerator backends on which
# the shared suite (tests/kernels/test_suite.py) has passed on real hardware. Until it has,
# implementation=None does not choose the kernel there; it stays callable by name. Their tests
# so far ran on a CPU only (interpret mode, and lowering through the real Triton and Mosaic
# lowerings), so both sets are empty. To return `pallas_gpu` to the GPU order: run
# `python -m bench device` on a GPU, check its summary says the suite passed for pallas_gpu,
# then add "gpu" to its set here, citing the device, the versions and the run's summary.json
# in the commit. Kernels not named here (the pure-JAX ones, and `cudnn`, which delegates to
# jax.nn's cuDNN path) need no such entry.
VERIFIED_ON_DEVICE: Mapping[str, frozenset[str]] = types.MappingProxyType(
    {
        "pallas_gpu": frozenset(),
        "pallas_tpu": frozenset(),
    }
)


def verified(name: str, backend: str) -> bool:
    """Whether ``name`` may be chosen by default on ``backend``: it is no device kernel of
    jattn's own, or the shared suite has passed on that backend's hardware."""
    return name not in VERIFIED_ON_DEVICE or backend in VERIFIED_ON_DEVICE[name]


def default_order(backend: str, q_len: int, kv_len: int) -> list[str]:
    """The registered, verified implementations ``implementation=None`` tries, in order."""
    size = "short" if q_len * kv_len < FLASH_MIN_SCORES else "long"
    order = DEFAULT_ORDER.get(backend, DEFAULT_ORDER["cpu"])[size]
    return [name for name in order if name in REGISTRY and verified(name, backend)]


def available(backend: str | None = None) -> list[str]:
    """Names of the implementations that run on ``backend`` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    return [name for name, impl in REGISTRY.items() if backend in impl.backends]


def testable(backend: str | None = None) -> list[str]:
    """:func:`available` plus those that run emulated on ``backend`` (Pallas interpret mode)."""
    backend = backend or jax.default_backend()
    return [
        name
        for name, impl in REGISTRY.items()
        if backend in impl.backends or backend in impl.interpret_backends
    ]


# The lists that record_choices() blocks, open in this context, are filling.
_RECORDERS: contextvars.ContextVar[tuple[list[str], ...]] = contextvars.ContextVar(
    "jattn_kernels_recorders", default=()
)


@contextlib.contextmanager
def record_choices() -> Iterator[list[str]]:
    """Lists the implementation that each :func:`jattn.attention` call inside the block runs
    (after any that refused it when traced), in call order: what ``implementation=None`` or a
    list of names resolved to. A call records when it is traced: a jitted function that runs
    its compiled program again records nothing, so trace it inside the block (``jax.eval_shape``
    of a fresh function computes and compiles nothing). Blocks may nest; each sees its calls.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import jattn
      >>> q = jnp.ones((1, 8, 2, 4))
      >>> with jattn.kernels.record_choices() as ran:
      ...     _ = jax.eval_shape(lambda q: jattn.attention(q, q, q, implementation="flash"), q)
      >>> ran
      ['flash']
    """
    names: list[str] = []
    token = _RECORDERS.set((*_RECORDERS.get(), names))
    try:
        yield names
    finally:
        _RECORDERS.reset(token)


def note_choice(name: str) -> None:
    """Called by :func:`jattn.attention` with the implementation a call runs."""
    for names in _RECORDERS.get():
        names.append(name)


class Candidate(NamedTuple):
    impl: Implementation
    plan: Plan  # with the implementation's config


def select(
    plan: Plan, implementation: Any = None, config: Any = None, backend: str | None = None
) -> tuple[list[Candidate], list[str]]:
    """The implementations to try for ``plan``, in order, each with its resolved config, and
    why the others were passed over. ``implementation`` and ``config`` are those of
    :func:`jattn.attention`. Raises NotImplementedError (every reason listed) when none can
    take the call, TypeError/ValueError for a bad ``implementation`` or ``config``."""
    backend = backend or jax.default_backend()
    reasons: list[str] = []
    if implementation is None:
        names = default_order(backend, plan.q_seq_len, plan.kv_seq_len)
        reasons += [f"{n!r} is unavailable: {r}" for n, r in UNAVAILABLE.items()]
    elif isinstance(implementation, str):
        names = [implementation]
    elif isinstance(implementation, Sequence):
        if not implementation:
            raise ValueError("implementation must be None, a name or a non-empty list of names")
        names = list(implementation)
    else:
        raise TypeError(
            "implementation must be None, a name or a non-empty sequence of names, got "
            f"{type(implementation).__name__} {implementation!r}"
        )
    for name in names:
        if not isinstance(name, str):
            raise TypeError(f"implementation names must be strings, got {name!r}")
        if name not in REGISTRY:
            if name in UNAVAILABLE and implementation is not None:
                reasons.append(f"{name!r} is unavailable: {UNAVAILABLE[name]}")
                continue
            raise ValueError(f"unknown implementation {name!r}; known: {sorted(REGISTRY)}")

    explicit = implementation is not None
    out = []
    for name in names:
        impl = REGISTRY.get(name)
        if impl is None:
            continue
        if why := impl.refusal(plan, backend, emulated_ok=explicit):
            reasons.append(why)
            continue
        out.append(Candidate(impl, plan.with_config(_config(impl, plan, config, backend))))
    if not out:
        raise NotImplementedError(
            f"no implementation can take this call on {backend!r}: " + "; ".join(reasons)
        )
    if config is not None and not any(
        c.impl.config_type is not None and isinstance(config, c.impl.config_type) for c in out
    ):
        takes = sorted({c.impl.config_type.__name__ for c in out if c.impl.config_type})
        raise TypeError(
            f"config of type {type(config).__name__} fits none of the implementations that "
            f"can take this call ({', '.join(c.impl.name for c in out) or 'none'}; their "
            f"configs: {', '.join(takes) or 'none'})"
        )
    return out, reasons


def _config(impl: Implementation, plan: Plan, config: Any, backend: str) -> Any:
    if impl.config_type is None:
        return None
    if isinstance(config, impl.config_type):
        return config
    return impl.config_type.default_for(plan, backend)


# ---------------------------------------------------------------------------------------------
# The implementations.

_REGISTRY: dict[str, Implementation] = {}
_UNAVAILABLE: dict[str, str] = {}
_ALL_BACKENDS = frozenset({"cpu", "gpu", "tpu"})


def _optional(name: str, load: Callable[[], Implementation | str]) -> None:
    """Registers what ``load`` returns; a failed import or a returned reason is recorded."""
    try:
        impl = load()
    except ImportError as e:
        impl = f"{type(e).__name__}: {e}"
    if isinstance(impl, str):
        _UNAVAILABLE[name] = impl
    else:
        _REGISTRY[name] = impl


_REGISTRY["reference"] = Implementation(
    "reference", reference_attention, FEATURES, _ALL_BACKENDS, oracle=True
)
_REGISTRY["fused"] = Implementation("fused", fused_attention, FEATURES, _ALL_BACKENDS)
_REGISTRY["flash"] = Implementation(
    "flash",
    flash.flash_attention,
    FEATURES - {"return_weights"},
    _ALL_BACKENDS,
    config_type=flash.FlashConfig,
)


def _pallas(backend: str) -> Callable[[], Implementation]:
    def load() -> Implementation:
        module = importlib.import_module(f"jattn.kernels.pallas_{backend}")
        return Implementation(
            f"pallas_{backend}",
            getattr(module, f"pallas_{backend}_attention"),
            module.SUPPORTS,
            frozenset({backend}),
            config_type=getattr(module, f"Pallas{backend.capitalize()}Config"),
            batched=True,
            interpret_backends=frozenset({"cpu"}),
        )

    return load


def _cudnn() -> Implementation:
    # First on NVIDIA GPUs: whether cuDNN serves a call also depends on the dtype, head dims and
    # mask values, which it checks when traced, raising NotImplementedError; `attention` then
    # moves on to the next candidate.
    from jattn.kernels import cudnn

    return Implementation(
        "cudnn", cudnn.cudnn_attention, cudnn.SUPPORTS, frozenset({"gpu"}), batched=True
    )


_optional("pallas_gpu", _pallas("gpu"))
_optional("pallas_tpu", _pallas("tpu"))
_optional("cudnn", _cudnn)


# --- native CPU kernel (issue 11; jattn/kernels/cpu.py, csrc/) -------------------------------
def _cpu() -> Implementation | str:
    from jattn.kernels import cpu

    if not cpu.AVAILABLE:
        return cpu.UNAVAILABLE_REASON
    return Implementation(
        "cpu",
        cpu.cpu_attention,
        cpu.SUPPORTS,
        frozenset({"cpu"}),
        config_type=cpu.CpuConfig,
        batched=True,
        applies_sinks=True,
    )


_optional("cpu", _cpu)
# --- end native CPU kernel ------------------------------------------------------------------

REGISTRY: Mapping[str, Implementation] = types.MappingProxyType(_REGISTRY)
# Implementations left out of REGISTRY, with the reason.
UNAVAILABLE: Mapping[str, str] = types.MappingProxyType(_UNAVAILABLE)
