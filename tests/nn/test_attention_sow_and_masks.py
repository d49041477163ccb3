"""MultiHeadAttention(sow_weights=True) and the mask dtype the attention layers accept."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jattn.nn import AdditiveAttention, DotProductAttention, MultiHeadAttention

B, T, S, D = 2, 5, 7, 16


def x_(key, shape):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


class TwoLayers(nnx.Module):
    """Two attention layers, only the second sowing its weights."""

    def __init__(self):
        self.first = MultiHeadAttention(4, D, implementation="fused", rngs=nnx.Rngs(0))
        self.second = MultiHeadAttention(
            2, D, implementation="fused", sow_weights=True, rngs=nnx.Rngs(1)
        )

    def __call__(self, x, kv):
        return self.second(
            self.first(x, is_causal=True), kv, key_value_seq_lengths=jnp.array([S, 3])
        )


def test_sown_weights_equal_the_returned_weights():
    x, kv = x_(0, (B, T, D)), x_(1, (B, S, D))
    model = TwoLayers()
    out, sown = nnx.capture(model, nnx.Intermediate)(x, kv)
    assert set(sown) == {"second"}  # the layer without the flag sows nothing
    (weights,) = sown["second"]["attention_weights"].get_value()  # one call, one entry
    assert weights.shape == (B, 2, T, S)
    hidden = model.first(x, is_causal=True)
    model.second.sow_weights = False  # outside nnx.capture, sow would store into the model
    want_out, want_w = model.second(
        hidden, kv, key_value_seq_lengths=jnp.array([S, 3]), return_weights=True
    )
    np.testing.assert_array_equal(weights, want_w)
    np.testing.assert_array_equal(out, want_out)
    assert float(jnp.abs(weights[1, :, :, 3:]).max()) == 0.0  # padding keys get no weight
    # nnx.capture collected them: nothing was stored in the model itself.
    assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))


def test_sowing_works_under_jit_and_appends_per_call():
    model = TwoLayers()
    graphdef, state = nnx.split(model)
    x, kv = x_(2, (B, T, D)), x_(3, (B, S, D))

    @jax.jit
    def twice(state):
        m = nnx.merge(graphdef, state)

        def run(m):
            m(x, kv)
            return m(x[:, :2], kv)

        return nnx.capture(run, nnx.Intermediate)(m)[1]

    first, second = twice(state)["second"]["attention_weights"].get_value()
    assert first.shape == (B, 2, T, S) and second.shape == (B, 2, 2, S)
    np.testing.assert_allclose(first[:, :, :2], second, rtol=1e-6)  # no causal mask in layer 2


def test_no_weights_sown_when_off_and_switchable_on_a_built_layer():
    layer = MultiHeadAttention(4, D, implementation="fused", rngs=nnx.Rngs(0))
    x = x_(4, (B, T, D))
    out, sown = nnx.capture(layer, nnx.Intermediate)(x)
    assert not jax.tree.leaves(sown)
    assert out.shape == (B, T, D)  # a plain output, not an (out, weights) pair
    layer.sow_weights = True
    out2, sown = nnx.capture(layer, nnx.Intermediate)(x)
    np.testing.assert_array_equal(out2, out)
    (w,) = sown["attention_weights"].get_value()
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_sowing_needs_an_implementation_that_returns_weights():
    layer = MultiHeadAttention(4, D, implementation="flash", sow_weights=True, rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="weights"):
        nnx.capture(layer, nnx.Intermediate)(x_(5, (B, T, D)))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.float32, np.uint8])
def test_non_boolean_masks_are_refused_like_jattn_attention(dtype):
    x, kv = x_(6, (B, T, D)), x_(7, (B, S, D))
    padding = np.arange(S)[None] < np.array([S, 3])[:, None]  # [B, S]
    bad = jnp.asarray(padding).astype(dtype)
    for call in (
        lambda: DotProductAttention()(x, kv, mask=bad),
        lambda: AdditiveAttention(D, D, 8, rngs=nnx.Rngs(0))(x, kv, mask=bad),
    ):
        with pytest.raises(TypeError, match=rf"mask.*{jnp.dtype(dtype).name}"):
            call()
    # The decode path combines the mask with the cache's causal mask: refused there too.
    layer = MultiHeadAttention(4, D, rngs=nnx.Rngs(0))
    layer.init_cache(B, S)
    with pytest.raises(TypeError, match=rf"mask.*{jnp.dtype(dtype).name}"):
        layer(x[:, :1], decode=True, mask=bad[:, None, None, :])
    # The same mask as booleans is fine, and means what it says.
    ctx, w = DotProductAttention()(x, kv, mask=jnp.asarray(padding))
    assert float(jnp.abs(w[1, :, 3:]).max()) == 0.0
    out = layer(x[:, :1], decode=True, mask=jnp.asarray(padding)[:, None, None, :])
    assert out.shape == (B, 1, D)
