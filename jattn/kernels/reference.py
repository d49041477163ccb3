"""The reference kernel: every score materialised, computed in float32 or float64.

It is the oracle of every test: straightforward, with no tricks beyond the safe softmax and
zeros for the keys and values no query sees, and float64-capable (give it float64 inputs with
``jax_enable_x64``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.kernels.common import KernelOutput, dropout_keep, lse_from, transform_logits
from jattn.plan import Plan
from jattn.softmax import safe_max

Array = jax.Array


def _hide_unseen(visible: Array, *rows: Array) -> tuple[Array, ...]:
    """``rows`` (keys, values: ``[S, D]``) with the positions no query of ``visible`` (the
    head's ``[T, S]`` mask) can see set to zero. A weight of zero times a NaN or inf is NaN,
    so padding past a sequence's length would otherwise reach the output and every gradient
    through the products."""
    seen = visible.any(axis=0)[:, None]
    return tuple(jnp.where(seen, x, 0) for x in rows)


def reference_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention of one head. ``q [T, D]``, ``k [S, D]``, ``v [S, Dv]`` -> ``out [T, Dv]``."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    t, s_len = q.shape[0], k.shape[0]
    qf, kf, vf = q.astype(acc), k.astype(acc), v.astype(acc)
    mask = None if plan.mask is None else plan.mask.materialize(t, s_len)
    if mask is not None:
        kf, vf = _hide_unseen(mask, kf, vf)
    hi = jax.lax.Precision.HIGHEST
    s = jnp.matmul(qf, kf.T, precision=hi) * jnp.asarray(plan.scale, acc)
    s = transform_logits(s, plan, plan.bias)
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    m = safe_max(s)
    e = jnp.exp(s - m)
    l = e.sum(-1, keepdims=True)
    p = e / jnp.where(l == 0, 1, l)
    keep = dropout_keep(plan, jnp.arange(t), jnp.arange(s_len))
    pd = p if keep is None else jnp.where(keep, p / (1.0 - plan.dropout_rate), 0.0)
    out = jnp.matmul(pd, vf, precision=hi).astype(q.dtype)
    lse = lse_from(m[:, 0], l[:, 0]) if plan.return_lse else None
    w = p.astype(q.dtype) if plan.return_weights else None
    return KernelOutput(out, lse, w)
