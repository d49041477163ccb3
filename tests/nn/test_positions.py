"""Positions: the sinusoidal formula, learned embeddings, and RoPE's relative-position property."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_encoding,
)


@pytest.mark.parametrize("d", [8, 7, 32])
def test_sinusoidal_matches_the_paper_formula(d):
    length = 50
    pe = np.asarray(sinusoidal_encoding(length, d))
    assert pe.shape == (length, d)
    for pos in range(length):
        for col in range(d):
            i = col // 2
            angle = pos / 10000 ** (2 * i / d)
            want = math.sin(angle) if col % 2 == 0 else math.cos(angle)
            assert pe[pos, col] == pytest.approx(want, abs=2e-5), (pos, col)


def test_sinusoidal_takes_batched_positions():
    positions = jnp.array([[0, 1, 2], [5, 6, 7]])
    got = SinusoidalPositionalEncoding(6)(positions)
    table = sinusoidal_encoding(8, 6)
    assert got.shape == (2, 3, 6)
    np.testing.assert_allclose(got, table[positions], atol=1e-6)


def test_sinusoidal_rejects_bad_width():
    with pytest.raises(ValueError, match="features"):
        sinusoidal_encoding(4, 0)


def test_learned_embedding_shapes_and_training_signal():
    emb = LearnedPositionalEmbedding(10, 4, rngs=nnx.Rngs(0))
    positions = jnp.array([[0, 3, 9]])
    out = emb(positions)
    assert out.shape == (1, 3, 4)
    np.testing.assert_allclose(out[0, 1], emb.embed.embedding[3])
    # Gradients reach exactly the rows that were used.
    grads = nnx.grad(lambda m: m(positions).sum())(emb)
    used = np.asarray(jnp.abs(grads.embed.embedding[...]).sum(-1) > 0)
    assert used.tolist() == [i in (0, 3, 9) for i in range(10)]
    with pytest.raises(ValueError, match="max_length"):
        LearnedPositionalEmbedding(0, 4, rngs=nnx.Rngs(0))


def test_rope_scores_depend_only_on_the_offset():
    key_q, key_k = jax.random.split(jax.random.key(0))
    h = 16
    q = jax.random.normal(key_q, (1, 1, 1, h), jnp.float32)
    k = jax.random.normal(key_k, (1, 1, 1, h), jnp.float32)
    rope = RotaryEmbedding()

    def score(m, n):
        qm = rope(q, jnp.array([[m]]))
        kn = rope(k, jnp.array([[n]]))
        return float(jnp.sum(qm * kn))

    for offset in (0, 1, 5, -3):
        scores = [score(m, m - offset) for m in (3, 10, 40, 100)]
        np.testing.assert_allclose(scores, scores[0], rtol=1e-4, atol=1e-4)
    # ... and do depend on it (the test would pass trivially for a constant).
    assert abs(score(10, 10) - score(10, 4)) > 1e-3


def test_rope_is_a_rotation():
    x = jax.random.normal(jax.random.key(1), (2, 5, 3, 8), jnp.float32)
    positions = jnp.arange(5)[None].repeat(2, 0)
    y = apply_rotary(x, positions)
    assert y.shape == x.shape
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(y[:, 0], x[:, 0], rtol=1e-6)  # position 0: identity
    assert not np.allclose(y[:, 1:], x[:, 1:])
    with pytest.raises(ValueError, match="even head_dim"):
        apply_rotary(jnp.ones((1, 2, 1, 5)), jnp.arange(2))
