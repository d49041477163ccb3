"""jattn: fast, memory-lean attention kernels for JAX, and Flax modules built on them."""

from jattn import kernels, masks, nn, optim, parallel, plan
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
