"""What every kernel returns, and the pieces the pure-JAX kernels share."""

from __future__ import annotations

from typing import NamedTuple

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


def dropout_keep(plan: Plan, q_idx: Array, kv_idx: Array) -> Array | None:
    if plan.dropout_rate == 0.0:
        return None
    return _dropout.keep_mask(plan.dropout_seed, q_idx, kv_idx, plan.dropout_rate)


def lse_from(m: Array, l: Array) -> Array:
    """``log(sum exp)`` from a row max ``m`` and the sum ``l`` of ``exp(s - m)``."""
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1)), -jnp.inf)
