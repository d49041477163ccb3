"""Counter-based dropout: the keep decision is a hash of (seed, head, row, column).

Because the decision depends only on positions, every kernel draws the same mask whatever its
block sizes, the backward pass recomputes exactly the forward's mask block by block, and a
blockwise kernel can be checked against the reference with dropout on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

_U32 = jnp.uint32


def _fmix32(x: Array) -> Array:
    # The murmur3 finaliser: a bijection on uint32 with full avalanche.
    x = x ^ (x >> 16)
    x = x * _U32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * _U32(0xC2B2AE35)
    return x ^ (x >> 16)


def seed_from_key(key: Array) -> Array:
    """Two uint32 words from a PRNG key (typed or raw)."""
    return jax.random.bits(key, (2,), jnp.uint32)


def head_seed(seed: Array, head_id: Array) -> Array:
    """One uint32 per head from the call's seed words and the head's linear index."""
    h = _fmix32(seed[0] ^ (head_id.astype(_U32) * _U32(0x9E3779B9)))
    return _fmix32(h ^ seed[1])


def keep_mask(hseed: Array, q_idx: Array, kv_idx: Array, rate: float) -> Array:
    """Boolean ``[bq, bk]``: True where the weight survives dropout at ``rate``."""
    row = _fmix32(hseed ^ (q_idx.astype(_U32) * _U32(0x85EBCA77)))
    bits = _fmix32(row[:, None] ^ (kv_idx.astype(_U32)[None, :] * _U32(0xC2B2AE3D) + _U32(1)))
    return bits >= _U32(threshold(rate))


def threshold(rate: float) -> int:
    """The keep threshold of ``rate``: ``min(int(rate * 2**32), 2**32 - 1)`` from the Python
    float, the one way every kernel computes it (the native kernel takes it as an attribute)."""
    return min(int(float(rate) * 2**32), 2**32 - 1)
