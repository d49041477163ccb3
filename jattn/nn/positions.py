"""Position information: sinusoidal encoding, learned embeddings and rotary embeddings (RoPE).

All three take integer positions rather than a sequence length, so that the same code serves a
full forward pass (positions ``0..T-1``), packed sequences (positions restart per segment) and
KV-cache decoding (positions ``cache_index..cache_index+t-1``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

__all__ = [
    "LearnedPositionalEmbedding",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "apply_rotary",
    "sinusoidal_encoding",
]


def sinusoidal_encoding(
    positions: jax.Array | int,
    features: int,
    *,
    max_timescale: float = 10000.0,
    dtype: Dtype = jnp.float32,
) -> jax.Array:
    """The fixed encoding of "Attention Is All You Need" (Vaswani et al., 2017, §3.5).

    ``PE[pos, 2i] = sin(pos / max_timescale^(2i / features))`` and
    ``PE[pos, 2i+1] = cos(pos / max_timescale^(2i / features))``: sines and cosines interleaved,
    as in the paper's formula (not the concatenated [sin..., cos...] layout of tensor2tensor).

    Args:
      positions: int array ``[*B, T]`` of positions, or an int ``T`` meaning ``arange(T)``.
      features: the model width ``d``; odd widths are allowed (the last column is a sine).
      max_timescale: the 10000 of the paper.
      dtype: dtype of the result.

    Returns:
      ``[*B, T, features]`` (``[T, features]`` when ``positions`` is an int).

    Examples:
      >>> from jattn.nn import sinusoidal_encoding
      >>> pe = sinusoidal_encoding(50, 16)  # positions 0..49
      >>> pe.shape, pe[0, :4].tolist()  # sin(0) = 0, cos(0) = 1, alternating
      ((50, 16), [0.0, 1.0, 0.0, 1.0])
    """
    if features < 1:
        raise ValueError(f"features must be positive, got {features=}")
    if isinstance(positions, int):
        positions = jnp.arange(positions)
    pos = jnp.asarray(positions, jnp.float32)[..., None]
    dim = jnp.arange(features)
    # Column 2i and 2i+1 share the frequency of pair i.
    exponent = (2 * (dim // 2)).astype(jnp.float32) / features
    angle = pos / jnp.power(jnp.float32(max_timescale), exponent)
    pe = jnp.where(dim % 2 == 0, jnp.sin(angle), jnp.cos(angle))
    return pe.astype(dtype)


class SinusoidalPositionalEncoding(nnx.Module):
    """Parameter-free module form of :func:`sinusoidal_encoding`.

    ``__call__(positions [*B, T]) -> [*B, T, features]``.
    """

    def __init__(
        self, features: int, *, max_timescale: float = 10000.0, dtype: Dtype = jnp.float32
    ):
        self.features = features
        self.max_timescale = max_timescale
        self.dtype = dtype

    def __call__(self, positions: jax.Array) -> jax.Array:
        return sinusoidal_encoding(
            positions, self.features, max_timescale=self.max_timescale, dtype=self.dtype
        )


_position_init = nnx.initializers.normal(stddev=0.02)


class LearnedPositionalEmbedding(nnx.Module):
    """A trained table of ``max_length`` position vectors.

    ``__call__(positions [*B, T]) -> [*B, T, features]``. Positions at or beyond
    ``max_length`` are clamped by the gather (JAX semantics), so keep them in range.
    """

    def __init__(
        self,
        max_length: int,
        features: int,
        *,
        embedding_init: nnx.Initializer = _position_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length=}")
        self.max_length = max_length
        self.embed = nnx.Embed(
            max_length,
            features,
            embedding_init=embedding_init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, positions: jax.Array) -> jax.Array:
        return self.embed(positions)


def apply_rotary(
    x: jax.Array,
    positions: jax.Array,
    *,
    base: float = 10000.0,
) -> jax.Array:
    """Rotary position embedding (Su et al., 2021, "RoFormer").

    Feature pairs are rotated by the angle ``pos * base^(-2i/H)``, so that the dot product of a
    rotated query at position m with a rotated key at position n depends on m - n only. Pairs are
    ``(x[i], x[i + H/2])`` (the GPT-NeoX / LLaMA layout), which rotates the same way as the
    paper's interleaved pairs up to a fixed permutation of the features.

    Args:
      x: ``[*B, T, N, H]`` with even ``H``.
      positions: int ``[*B, T]`` (or ``[T]``), broadcast against x's batch dimensions.
      base: the frequency base.

    Returns:
      ``[*B, T, N, H]`` in ``x.dtype``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn.nn import apply_rotary
      >>> x = jnp.ones((1, 4, 2, 8))  # [batch, T, heads, head_dim]
      >>> y = apply_rotary(x, jnp.arange(4)[None])
      >>> y.shape, bool(jnp.allclose(y[:, 0], x[:, 0]))  # position 0 is not rotated
      ((1, 4, 2, 8), True)
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got x.shape={x.shape}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq  # [*B, T, H/2]
    # [*B, T, 1 (heads), 1 or 2 (halves), H/2]: the halves (x1, x2) of x become an axis, so
    # that (x1 cos - x2 sin, x2 cos + x1 sin) is x·cos + flip(x)·(-sin, sin): elementwise with
    # a reversal of a length-2 axis, one loop forward and one backward, where slicing x into
    # halves and concatenating them back costs a pad and a concatenate in the gradient.
    # Both factors are built by a concatenate, which XLA's CPU fusion keeps as one small table
    # ([*B, T, 1, 2, H/2]) that every rotation (forward and gradient, each layer) reads; a plain
    # jnp.cos(angle) was fused into each rotation loop and computed for every head again.
    cos = jnp.cos(angle)[..., None, None, :]
    sin = jnp.sin(angle)[..., None, None, :]
    cos = jnp.concatenate([cos, cos], axis=-2)
    signed_sin = jnp.concatenate([-sin, sin], axis=-2)
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], 2, half)
    out = pairs * cos + jnp.flip(pairs, axis=-2) * signed_sin
    return out.reshape(x.shape).astype(x.dtype)


class RotaryEmbedding(nnx.Module):
    """Parameter-free module form of :func:`apply_rotary`.

    Give one to :class:`~jattn.nn.MultiHeadAttention` (``rotary=``) and it rotates queries and keys
    at their positions before attention (and before they enter the KV cache).
    ``__call__(x [*B, T, N, H], positions [*B, T]) -> [*B, T, N, H]``.
    """

    def __init__(self, *, base: float = 10000.0):
        self.base = base

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        return apply_rotary(x, positions, base=self.base)
