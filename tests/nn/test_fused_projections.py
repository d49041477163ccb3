"""The training-speed rewrites of jattn.nn compute what the plain formulas compute."""

from __future__ import annotations

import jax
import jax.extend.core
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


def _dots(fn, *args):
    """The dot_general equations of fn's jaxpr, nested calls included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(eqn)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_linear_products_and_their_gradients_are_two_dimensional():
    """A [B, T, d] input meets its kernel as one [B*T, d] matrix, forward and backward, with the
    numbers of nnx.Linear's own product (float64 reference on random inputs)."""
    from jattn.nn.linear import Linear

    layer = Linear(16, 24, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (3, 5, 16))
    dy = jax.random.normal(jax.random.key(4), (3, 5, 24))

    graphdef, state = nnx.split(layer)
    grad_fn = jax.value_and_grad(
        lambda state, x: (nnx.merge(graphdef, state)(x) * dy).sum(), argnums=(0, 1)
    )
    for eqn in _dots(grad_fn, state, x):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        shapes = [v.aval.shape for v in eqn.invars]
        assert len(lc) == len(rc) == 1 and not lb and not rb, shapes
        assert all(len(s) == 2 for s in shapes), shapes

    value, (grads, dx) = grad_fn(state, x)
    dk = grads["kernel"][...]
    kernel = layer.kernel[...]
    k64, x64, dy64 = (np.asarray(a, np.float64) for a in (kernel, x, dy))
    b64 = np.asarray(layer.bias[...], np.float64)
    np.testing.assert_allclose(value, ((x64 @ k64 + b64) * dy64).sum(), rtol=1e-5)
    np.testing.assert_allclose(dk, np.einsum("btd,btn->dn", x64, dy64), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy64 @ k64.T, rtol=1e-5, atol=1e-5)


def test_linear_dot_general_edge_cases():
    from jattn.nn.linear import dot_general

    w = jax.random.normal(jax.random.key(5), (4, 3))
    std = (((2,), (0,)), ((), ()))
    # no rows: [2, 0, 4] -> [2, 0, 3]
    assert dot_general(jnp.ones((2, 0, 4)), w, std).shape == (2, 0, 3)
    # an empty contraction gives zeros of the right shape
    assert (dot_general(jnp.ones((2, 5, 0)), jnp.ones((0, 3)), std) == 0).all()
    # preferred_element_type is honoured on the flattened product
    y = dot_general(jnp.ones((2, 5, 4), jnp.bfloat16), w.astype(jnp.bfloat16), std,
                    preferred_element_type=jnp.float32)  # fmt: skip
    assert y.dtype == jnp.float32 and y.shape == (2, 5, 3)
    # any other contraction is lax.dot_general's, bit for bit
    a = jax.random.normal(jax.random.key(6), (2, 4, 5))
    other = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(dot_general(a, w, other), jax.lax.dot_general(a, w, other))


@pytest.mark.parametrize("model", ["DecoderLM", "Transformer"])
def test_tied_output_logits_equal_the_embedding_attend(model):
    from jattn.nn import DecoderLM, Transformer

    if model == "DecoderLM":
        m = DecoderLM(11, d_model=16, num_heads=2, num_layers=1, d_ff=32, tie_output=True,
                      rngs=nnx.Rngs(0))  # fmt: skip
        embed = m.embedder.embed
    else:
        sizes = dict(num_encoder_layers=1, num_decoder_layers=1, d_ff=32, tie_output=True)
        m = Transformer(11, 11, d_model=16, num_heads=2, rngs=nnx.Rngs(0), **sizes)
        embed = m.tgt_embedder.embed
    from jattn.nn.linear import tied_logits

    x = jax.random.normal(jax.random.key(7), (2, 3, 16))
    np.testing.assert_allclose(tied_logits(embed, x), embed.attend(x), rtol=1e-6, atol=1e-6)
