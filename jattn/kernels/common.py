"""What every kernel returns, and the pieces the pure-JAX kernels share."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _dropout
from jattn.plan import Plan

Array = jax.Array


class KernelOutput(NamedTuple):
    out: Array  # [T, Dv], the query's dtype
    lse: Array | None = None  # [T] float32; -inf for a row with no visible key
    weights: Array | None = None  # [T, S], the query's dtype


def transform_logits(s: Array, plan: Plan, bias: Array | None) -> Array:
    """Scaled ``q·k`` logits -> softcapped, biased logits (in the dtype of ``s``).

    Order: ``softcap(scale · q·k) + bias``, then masking (Gemma-2 and FlashAttention order).
    """
    if plan.softcap is not None:
        c = jnp.asarray(plan.softcap, s.dtype)
        s = c * jnp.tanh(s / c)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    return s


def weight_shift(dtype: Any, sp: int) -> float:
    """The exponent offset of the blockwise kernels' weights ``2^(x - m - shift)``: ``ceil(log2
    sp)`` for ``sp`` keys, so that no sum of them exceeds 1 and an unnormalised float32
    accumulator stays within the values' range (values near float32's largest). 0 for float16
    values, whose sums stay far inside float32's range: weights scaled down by ``2^-shift``
    would fall among float16's subnormals when rounded for the ``P V`` product."""
    if jnp.dtype(dtype) == jnp.float16:
        return 0.0
    return float(math.ceil(math.log2(max(sp, 1))))


def dropout_keep(plan: Plan, q_idx: Array, kv_idx: Array) -> Array | None:
    if plan.dropout_rate == 0.0:
        return None
    return _dropout.keep_mask(plan.dropout_seed, q_idx, kv_idx, plan.dropout_rate)


def lse_from(m: Array, l: Array) -> Array:
    """``log(sum exp)`` from a row max ``m`` and the sum ``l`` of ``exp(s - m)``."""
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1)), -jnp.inf)
