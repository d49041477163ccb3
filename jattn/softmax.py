"""The fused masked softmax, and the safe-softmax pieces every kernel shares."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

__all__ = ["masked_softmax"]

Array = jax.Array


def safe_max(x: Array, axis: int = -1, keepdims: bool = True) -> Array:
    """Row max where a row of only ``-inf`` gives 0 instead of ``-inf``.

    Subtracting it keeps ``exp`` finite and makes fully masked rows give ``exp(-inf) = 0``
    instead of ``exp(nan)``. Softmax is invariant to the shift, so no gradient flows through it.
    """
    m = jnp.max(x, axis=axis, keepdims=keepdims)
    return jax.lax.stop_gradient(jnp.where(jnp.isneginf(m), 0.0, m).astype(x.dtype))


def masked_softmax(logits: Array, mask: Array | None = None, axis: int = -1) -> Array:
    """Softmax of ``logits`` over ``axis`` where ``mask`` is True, zero elsewhere.

    One pass over the logits: masked entries are excluded inside the reduction, not by adding a
    ``-1e9`` tensor, so a row with no visible entry returns zeros (not a uniform average and not
    NaN), and its gradient is zero. The computation runs in float32 (float64 for float64 input)
    and the result has the dtype of ``logits``. The backward pass keeps only the output.

    Args:
      logits: any shape, floating point.
      mask: boolean, broadcastable to ``logits`` (True = keep), or None.
      axis: the axis to normalise over.
    """
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"logits must be floating point, got dtype {logits.dtype}")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"mask must be boolean, got dtype {mask.dtype}")
        try:
            jnp.broadcast_shapes(mask.shape, logits.shape)
        except ValueError:
            raise ValueError(
                f"mask of shape {mask.shape} is not broadcastable to logits of shape {logits.shape}"
            ) from None
    axis = axis % logits.ndim if logits.ndim else 0
    return _masked_softmax(logits, mask, axis)


# A custom_jvp rather than a custom_vjp: JAX transposes the tangent below into the backward
# a custom_vjp would write (dx = p (g - rowsum(g p)), keeping only p), and differentiates it
# in every mode (jax.jvp, a Hessian) besides.
@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _masked_softmax(logits, mask, axis):
    return _forward(logits, mask, axis)


def _forward(logits, mask, axis):
    acc = jnp.promote_types(logits.dtype, jnp.float32)
    x = logits.astype(acc)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    e = jnp.exp(x - safe_max(x, axis))
    s = jnp.sum(e, axis=axis, keepdims=True)
    return (e / jnp.where(s == 0, 1, s)).astype(logits.dtype)


@_masked_softmax.defjvp
def _jvp(axis, primals, tangents):
    logits, mask = primals
    p = _masked_softmax(logits, mask, axis)
    acc = jnp.promote_types(p.dtype, jnp.float32)
    pf, tf = p.astype(acc), tangents[0].astype(acc)
    # Masked entries have p == 0, so their tangent is zero without looking at the mask.
    dp = pf * (tf - jnp.sum(tf * pf, axis=axis, keepdims=True))
    return p, dp.astype(p.dtype)


def merge_sinks(
    out: Array, lse: Array, sinks: Array, weights: Array | None = None
) -> tuple[Array, Array, Array | None]:
    """Adds one sink logit per row to finished softmax results: ``exp(sink)`` joins each
    row's denominator without a value (gpt-oss, StreamingLLM), so a row may put weight on
    nothing.

    ``out [*B, T, N, Hv]``, ``lse [*B, N, T]`` (rows with no visible key: ``-inf``),
    ``sinks`` broadcastable to ``[*B, N]``, ``weights [*B, N, T, S]`` or None. Returns the
    results with the sink counted once: ``lse' = logaddexp(lse, sink)``; ``out`` and
    ``weights`` scaled by ``exp(lse - lse')`` (rows then sum to less than one). This is the
    merge of two partial softmaxes, one of them the sink alone; it is exact: a sink of
    ``-inf`` leaves every result bit for bit as it was, and a row with no visible key stays
    zero, with ``lse' = sink``. The factor is computed in ``lse``'s dtype (float32, float64
    for float64 calls).
    """
    s = jnp.asarray(sinks).astype(lse.dtype)[..., None]  # [*B, N, 1]
    new_lse = jnp.logaddexp(lse, s)
    empty = jnp.isneginf(lse)
    # exp(lse - lse') without a NaN (or a NaN gradient) where both are -inf.
    share = jnp.where(empty, 0.0, jnp.exp(jnp.where(empty, 0.0, lse - new_lse)))
    rows = jnp.moveaxis(share, -1, -2)[..., None]  # [*B, T, N, 1]
    out = (out.astype(share.dtype) * rows).astype(out.dtype)
    if weights is not None:
        weights = (weights.astype(share.dtype) * share[..., None]).astype(weights.dtype)
    return out, new_lse, weights
