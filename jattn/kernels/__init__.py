"""The registry of attention implementations: name -> what it is, what it supports, where it runs.

Each implementation is a single-head kernel ``fn(q [T, D], k [S, D], v [S, Dv], *, spec)``
returning a :class:`~jattn.kernels.common.KernelOutput`; :mod:`jattn.api` vmaps it over heads
and batch. An implementation whose import fails (a backend it needs is missing) is simply not
registered.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax

from jattn.kernels import cudnn, flash, pallas_gpu, pallas_tpu
from jattn.kernels.common import KernelOutput, Spec
from jattn.kernels.fused import fused_attention
from jattn.kernels.reference import reference_attention

__all__ = [
    "FEATURES",
    "Implementation",
    "KernelOutput",
    "REGISTRY",
    "Spec",
    "available",
    "register",
    "testable",
]

# Every feature a call can need. An implementation lists those it supports.
FEATURES = frozenset(
    {
        "bias",
        "causal",
        "local_window",
        "lengths",
        "segments",
        "dense_mask",
        "mask_algebra",  # `|` and `~` of masks
        "softcap",
        "dropout",
        "return_weights",
        "return_lse",
        "float64",
        "gqa",
        "value_head_dim",  # value head dim != query head dim
    }
)


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation.

    Attributes:
      name: what ``implementation=`` calls it.
      fn: the single-head kernel.
      supports: the subset of :data:`FEATURES` it serves.
      backends: the platforms it runs on ('cpu', 'gpu', 'tpu').
      config_fn: ``(q_shape, k_shape, dtype, backend, features=...) -> config`` (e.g. block
        sizes; ``features`` is the set of FEATURES the call needs), or None.
      config_type: the type of that config, which users may pass as ``config=``.
      batched: True when ``fn`` takes whole arrays itself rather than one head (one Pallas
        launch over batch and heads, or a delegating implementation such as cuDNN):
        ``fn(q [*B, T, N, H], k [*B, S, K, H], v [*B, S, K, Hv], *, spec)`` with the spec's
        leaves in the canonical ``[*B', K', G', ...]`` layout, returning ``out [*B, T, N, Hv]``,
        ``lse [*B, N, T]`` and ``weights [*B, N, T, S]``.
      interpret_backends: platforms where it runs only emulated (Pallas interpret mode on a
        CPU): callable by name, for tests, but never chosen by default nor benchmarked.
    """

    name: str
    fn: Callable[..., KernelOutput]
    supports: frozenset[str]
    backends: frozenset[str]
    config_fn: Callable | None = None
    config_type: type | None = None
    batched: bool = False
    interpret_backends: frozenset[str] = frozenset()

    def missing(self, needed: Iterable[str]) -> list[str]:
        """The features of ``needed`` this implementation lacks, sorted."""
        return sorted(set(needed) - self.supports)


REGISTRY: dict[str, Implementation] = {}

# Preference order when ``implementation=None``, most preferred first, per backend.
DEFAULT_ORDER: dict[str, list[str]] = {"cpu": [], "gpu": [], "tpu": []}


def register(impl: Implementation, *, default_rank: dict[str, int] | None = None) -> None:
    """Adds ``impl`` to the registry; ``default_rank`` places it in the default order."""
    REGISTRY[impl.name] = impl
    for backend, rank in (default_rank or {}).items():
        order = DEFAULT_ORDER.setdefault(backend, [])
        if impl.name in order:
            order.remove(impl.name)
        order.insert(rank, impl.name)


# The crossover between the materialising kernel and the blockwise one: below this many scores
# per head (T * S) `fused` is faster, above it `flash` (and its memory stays O(T + S)). Measured
# with `python -m bench` on a 2-core Zen 4 CPU; see the README's benchmark section.
FLASH_MIN_SCORES = 512 * 1024


def default_order(backend: str, q_len: int, kv_len: int) -> list[str]:
    """Implementations to try, in order, when ``implementation=None``."""
    order = list(DEFAULT_ORDER.get(backend, []))
    if "fused" in order and "flash" in order:
        order.remove("flash")
        at = order.index("fused") + (q_len * kv_len < FLASH_MIN_SCORES)
        order.insert(at, "flash")
    return [*order, "reference"]


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


_ALL_BACKENDS = frozenset({"cpu", "gpu", "tpu"})

register(
    Implementation("reference", reference_attention, FEATURES, _ALL_BACKENDS),
)
register(
    Implementation("fused", fused_attention, FEATURES, _ALL_BACKENDS),
    default_rank={"cpu": 0, "gpu": 0, "tpu": 0},
)
register(
    Implementation(
        "flash",
        flash.flash_attention,
        FEATURES - {"return_weights"},
        _ALL_BACKENDS,
        config_fn=flash.default_config,
        config_type=flash.FlashConfig,
    ),
    default_rank={"cpu": 1, "gpu": 1, "tpu": 1},
)
register(
    Implementation(
        "pallas_gpu",
        pallas_gpu.pallas_gpu_attention,
        pallas_gpu.SUPPORTS,
        frozenset({"gpu"}),
        config_fn=pallas_gpu.default_config,
        config_type=pallas_gpu.PallasGpuConfig,
        batched=True,
        interpret_backends=frozenset({"cpu"}),
    ),
    default_rank={"gpu": 0},
)
register(
    Implementation(
        "pallas_tpu",
        pallas_tpu.pallas_tpu_attention,
        pallas_tpu.SUPPORTS,
        frozenset({"tpu"}),
        config_fn=pallas_tpu.default_config,
        config_type=pallas_tpu.PallasTpuConfig,
        batched=True,
        interpret_backends=frozenset({"cpu"}),
    ),
    default_rank={"tpu": 0},
)
# cuDNN first on NVIDIA GPUs: whether it serves a call also depends on the dtype, head dims and
# mask values, which it checks when traced, raising NotImplementedError; `attention` then moves
# on to the next candidate (pallas_gpu, then flash / fused).
register(
    Implementation(
        "cudnn", cudnn.cudnn_attention, cudnn.SUPPORTS, frozenset({"gpu"}), batched=True
    ),
    default_rank={"gpu": 0},
)
