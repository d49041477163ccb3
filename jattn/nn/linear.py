"""Dense layers whose products stay two-dimensional, forward and backward.

``nnx.Linear`` multiplies ``x [*B, T, d]`` by ``W [d, n]`` with one ``dot_general`` that keeps
``x``'s leading dimensions. Its gradient with respect to ``W`` then contracts *two or more*
dimensions of ``x`` and ``dy`` at once (``[*B, T]``). XLA's CPU runtime hands such products
neither to YNNPACK nor to Eigen as they are: it copies ``dy`` into a transposed layout first and
runs the product as an Eigen dot. In a DecoderLM training step (d_model 384, 16 x 256 tokens,
float32, 2-core Xeon) those copies and dots took a fifth of the step.

Multiplying ``x.reshape(-1, d) @ W`` instead gives the same numbers (the same sums, one
matrix per call) and a gradient of two plain matrix products, ``dy W^T`` and ``x^T dy``, which
XLA runs without the copies. The reshape of contiguous leading dimensions is free on every
backend, and a batch sharded over the leading dimension stays sharded after it.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import nnx
from jax import lax

__all__ = ["Linear", "dot_general", "tied_logits"]


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
    """``lax.dot_general``, taking ``[*B, d] x [d, n]`` as one ``[prod(B), d] x [d, n]`` product.

    Any other contraction, or a call with ``out_sharding``, goes to ``lax.dot_general`` as given.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    flat = (
        lhs.ndim > 2
        and rhs.ndim == 2
        and tuple(lhs_contract) == (lhs.ndim - 1,)
        and tuple(rhs_contract) == (0,)
        and not lhs_batch
        and not rhs_batch
        and out_sharding is None
    )
    if not flat:
        return lax.dot_general(
            lhs,
            rhs,
            dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
    rows = math.prod(lhs.shape[:-1])
    y = lax.dot_general(
        lhs.reshape(rows, lhs.shape[-1]),
        rhs,
        (((1,), (0,)), ((), ())),
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    return y.reshape(*lhs.shape[:-1], rhs.shape[1])


def Linear(in_features: int, out_features: int, **kwargs: Any) -> nnx.Linear:
    """An ``nnx.Linear`` that multiplies with :func:`dot_general` unless given its own."""
    kwargs.setdefault("dot_general", dot_general)
    return nnx.Linear(in_features, out_features, **kwargs)


def tied_logits(embed: nnx.Embed, x: jax.Array) -> jax.Array:
    """``embed.attend(x)`` (logits against the embedding table) as one 2-D product."""
    x, table = embed.promote_dtype((x, embed.embedding[...]), dtype=embed.dtype)
    return dot_general(x, table.T, (((x.ndim - 1,), (0,)), ((), ())))
