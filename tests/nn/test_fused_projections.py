"""The training-speed rewrites of jattn.nn compute what the plain formulas compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn import MultiHeadAttention, apply_rotary


def _rotary_by_halves(x, positions, base=10000.0):
    """RoPE as first written: slice into halves, rotate, concatenate."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
    angle = positions[..., None].astype(jnp.float32) * inv_freq
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def test_rotary_matches_the_halves_formula_and_its_gradient():
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 8))
    pos = jnp.arange(7)[None] + jnp.array([[0], [5]])
    np.testing.assert_allclose(
        apply_rotary(x, pos), _rotary_by_halves(x, pos), rtol=1e-6, atol=1e-6
    )
    g = jax.grad(lambda x: (apply_rotary(x, pos) ** 3).sum())(x)
    want = jax.grad(lambda x: (_rotary_by_halves(x, pos) ** 3).sum())(x)
    np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_kv_heads", [4, 2])
@pytest.mark.parametrize("use_bias", [True, False])
def test_self_attention_projects_qkv_as_three_linears(num_kv_heads, use_bias):
    layer = MultiHeadAttention(4, 16, num_kv_heads=num_kv_heads, use_bias=use_bias,
                               rngs=nnx.Rngs(0))  # fmt: skip
    if use_bias:  # non-zero biases, so that a bias in the wrong place shows
        for lin in (layer.query, layer.key, layer.value):
            lin.bias[...] = jax.random.normal(jax.random.key(1), lin.bias.shape, jnp.float32)
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))
    assert layer._fuses_qkv()
    q, k, v = layer._project_qkv(x)
    np.testing.assert_allclose(q, layer._heads(layer.query(x), 4), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, layer._heads(layer.key(x), num_kv_heads), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v, layer._heads(layer.value(x), num_kv_heads), rtol=1e-5, atol=1e-6)
    # the parameters are still the three projections
    names = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer, nnx.Param))}
    assert {"query/kernel", "key/kernel", "value/kernel", "out/kernel"} <= names


def test_cross_attention_width_does_not_fuse():
    layer = MultiHeadAttention(2, 8, kv_features=6, rngs=nnx.Rngs(0))
    assert not layer._fuses_qkv()
    out = layer(jnp.ones((1, 3, 8)), jnp.ones((1, 4, 6)))
    assert out.shape == (1, 3, 8)
