"""What every single-head kernel receives and returns, and the pieces they share."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _dropout
from jattn.masks import Mask

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Spec:
    """The static choices and per-head leaves of one attention call.

    Static (hashable, part of the compiled program): ``scale``, ``softcap``, ``dropout_rate``,
    what to return, and ``config`` (an implementation's tuning dataclass, e.g. block sizes).
    Leaves (sliced per batch element and head by ``jattn.api``): ``mask`` (a ``jattn.masks``
    object or None), ``bias`` (``[T or 1, S or 1]`` or None) and ``dropout_seed`` (a uint32
    scalar per head, or None).
    """

    scale: float
    softcap: float | None = None
    dropout_rate: float = 0.0
    return_weights: bool = False
    return_lse: bool = False
    config: Any = None
    mask: Mask | None = None
    bias: Array | None = None
    dropout_seed: Array | None = None


jax.tree_util.register_dataclass(
    Spec,
    data_fields=["mask", "bias", "dropout_seed"],
    meta_fields=["scale", "softcap", "dropout_rate", "return_weights", "return_lse", "config"],
)


class KernelOutput(NamedTuple):
    out: Array  # [T, Dv], the query's dtype
    lse: Array | None = None  # [T] float32; -inf for a row with no visible key
    weights: Array | None = None  # [T, S], the query's dtype


def transform_logits(s: Array, spec: Spec, bias: Array | None) -> Array:
    """Scaled ``q·k`` logits -> softcapped, biased logits (in the dtype of ``s``).

    Order: ``softcap(scale · q·k) + bias``, then masking (Gemma-2 and FlashAttention order).
    """
    if spec.softcap is not None:
        c = jnp.asarray(spec.softcap, s.dtype)
        s = c * jnp.tanh(s / c)
    if bias is not None:
        s = s + bias.astype(s.dtype)
    return s


def dropout_keep(spec: Spec, q_idx: Array, kv_idx: Array) -> Array | None:
    if spec.dropout_rate == 0.0:
        return None
    return _dropout.keep_mask(spec.dropout_seed, q_idx, kv_idx, spec.dropout_rate)


def lse_from(m: Array, l: Array) -> Array:
    """``log(sum exp)`` from a row max ``m`` and the sum ``l`` of ``exp(s - m)``."""
    return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1)), -jnp.inf)
