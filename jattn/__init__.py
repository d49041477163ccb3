"""jattn: fast, memory-lean attention kernels for JAX, and Flax modules built on them.

``import jattn`` loads the kernels only: ``jattn.nn`` (Flax) and ``jattn.optim`` (optax) are
imported the first time they are used, so that code that only calls the kernels does not pay
for Flax and optax.
"""

import importlib
from typing import Any

from jattn import kernels, masks, parallel, plan
from jattn.api import attention
from jattn.softmax import masked_softmax

__version__ = "0.1.0"

__all__ = [
    "attention",
    "kernels",
    "masked_softmax",
    "masks",
    "nn",
    "optim",
    "parallel",
    "plan",
]

_LAZY = ("nn", "optim")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"jattn.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jattn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
