"""Token-level cross-entropy with label smoothing that ignores padding."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["cross_entropy"]


def cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    *,
    label_smoothing: float = 0.0,
    pad_id: int | None = None,
    where: jax.Array | None = None,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> jax.Array:
    """Cross-entropy of ``logits [*B, T, V]`` against int ``targets [*B, T]``.

    With label smoothing ε the target distribution is ``(1 - ε)·onehot + ε/V`` (Szegedy et al.,
    2016; 0.1 in the Transformer paper), so the smallest reachable loss is that distribution's
    entropy, not 0. Positions where ``targets == pad_id`` or ``where`` is False count for
    nothing: they are excluded from the sum and from the number of tokens of the mean.

    Args:
      logits: unnormalised scores, any float dtype (computed in float32).
      targets: int token ids.
      label_smoothing: ε in ``[0, 1)``.
      pad_id: the padding id to ignore, if any.
      where: bool ``[*B, T]``, True for positions that count.
      reduction: "mean" over counted tokens (0 if there are none), "sum", or "none" (the
        per-token losses ``[*B, T]``, 0 at ignored positions).

    Returns:
      A scalar, or ``[*B, T]`` for ``reduction="none"``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn.nn import cross_entropy
      >>> logits = jnp.zeros((1, 3, 4))  # uniform over 4 classes
      >>> round(float(cross_entropy(logits, jnp.array([[1, 2, 0]]), pad_id=0)), 4)  # ln 4
      1.3863
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must be targets.shape + (vocab,), got {logits.shape=} and {targets.shape=}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing=}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    # From the log-sum-exp, without the log-probabilities [*B, T, V]: -log p_t = lse - x_t, and
    # the smoothing term -(1/V)·Σ log p = lse - mean(x) (only computed when smoothing).
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    nll = lse - jnp.take_along_axis(x, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = nll
    if label_smoothing:
        loss = (1.0 - label_smoothing) * nll + label_smoothing * (lse - x.mean(axis=-1))
    keep = jnp.ones(targets.shape, bool)
    if pad_id is not None:
        keep = keep & (targets != pad_id)
    if where is not None:
        keep = keep & jnp.asarray(where, bool)
    loss = jnp.where(keep, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / jnp.maximum(keep.sum(), 1)
