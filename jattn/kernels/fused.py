"""Materialised scores with the fused masked softmax.

One jitted computation per call: ``q·kᵀ`` in the input dtype with float32 accumulation, the
mask applied inside the softmax's reductions (no additive ``-1e9`` tensor, no NaN on empty rows),
and a backward pass that keeps only the softmax output. The fastest choice for short sequences,
and the one that can return the attention weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jattn.kernels.common import KernelOutput, dropout_keep, lse_from, transform_logits
from jattn.plan import Plan
from jattn.softmax import masked_softmax, safe_max

Array = jax.Array


def fused_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention of one head. ``q [T, D]``, ``k [S, D]``, ``v [S, Dv]`` -> ``out [T, Dv]``."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    t, s_len = q.shape[0], k.shape[0]
    # Scale q (T·D) rather than the logits (T·S).
    qs = (q.astype(acc) * jnp.asarray(plan.scale, acc)).astype(q.dtype)
    s = jnp.einsum("td,sd->ts", qs, k, preferred_element_type=acc)
    s = transform_logits(s, plan, plan.bias)
    mask = None if plan.mask is None else plan.mask.materialize(t, s_len)
    p = masked_softmax(s, mask)
    keep = dropout_keep(plan, jnp.arange(t), jnp.arange(s_len))
    pd = p if keep is None else jnp.where(keep, p * (1.0 / (1.0 - plan.dropout_rate)), 0.0)
    out = jnp.einsum("ts,sd->td", pd.astype(v.dtype), v, preferred_element_type=acc)
    lse = None
    if plan.return_lse:
        sm = s if mask is None else jnp.where(mask, s, -jnp.inf)
        m = safe_max(sm)
        lse = lse_from(m[:, 0], jnp.exp(sm - m).sum(-1))
    w = p.astype(q.dtype) if plan.return_weights else None
    return KernelOutput(out.astype(q.dtype), lse, w)
