"""Flax's own attention modules running on jattn kernels give Flax's numbers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

from jattn.nn import attention_fn, make_attention_fn

B, T, S, D, N = 2, 5, 7, 16, 4


def inputs():
    kq, kk = jax.random.split(jax.random.key(0))
    return jax.random.normal(kq, (B, T, D), jnp.float32), jax.random.normal(
        kk, (B, S, D), jnp.float32
    )


def masks():
    causal = linen.make_causal_mask(jnp.ones((B, T)))  # [B, 1, T, T]
    valid_kv = jnp.arange(S)[None] < jnp.array([S, 4])[:, None]
    padding = linen.make_attention_mask(jnp.ones((B, T), bool), valid_kv)  # [B, 1, T, S]
    return causal, padding


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_linen_adapter_matches_linen(implementation):
    x, y = inputs()
    causal, padding = masks()
    ours_fn = make_attention_fn(implementation=implementation)
    flax_layer = linen.MultiHeadDotProductAttention(num_heads=N, qkv_features=D)
    ours_layer = linen.MultiHeadDotProductAttention(
        num_heads=N, qkv_features=D, attention_fn=ours_fn
    )
    params = jax.jit(flax_layer.init)(jax.random.key(1), x, y)
    # One compiled program per call instead of one per operation keeps the test fast.
    flax_apply, ours_apply = jax.jit(flax_layer.apply), jax.jit(ours_layer.apply)
    for q, kv, mask in [(x, y, padding), (x, x, causal), (x, y, None)]:
        want = flax_apply(params, q, kv, mask=mask)
        got = ours_apply(params, q, kv, mask=mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Dropout: runs on jattn's own dropout; deterministic=True switches it off.
    drop = linen.MultiHeadDotProductAttention(
        num_heads=N, qkv_features=D, dropout_rate=0.5, attention_fn=ours_fn
    )
    rngs = {"dropout": jax.random.key(2)}
    noisy = drop.apply(params, x, y, deterministic=False, rngs=rngs)
    clean = flax_apply(params, x, y)
    assert not np.allclose(noisy, clean)
    np.testing.assert_allclose(
        drop.apply(params, x, y, deterministic=True), clean, rtol=1e-5, atol=1e-6
    )


def test_linen_sown_weights_match():
    x, y = inputs()
    _, padding = masks()
    flax_layer = linen.MultiHeadDotProductAttention(num_heads=N, qkv_features=D)
    ours_layer = linen.MultiHeadDotProductAttention(
        num_heads=N, qkv_features=D, attention_fn=attention_fn
    )
    params = flax_layer.init(jax.random.key(1), x, y)
    _, want = flax_layer.apply(
        params, x, y, mask=padding, sow_weights=True, mutable=["intermediates"]
    )
    _, got = ours_layer.apply(
        params, x, y, mask=padding, sow_weights=True, mutable=["intermediates"]
    )
    w_want = want["intermediates"]["attention_weights"][0]
    w_got = got["intermediates"]["attention_weights"][0]
    assert w_got.shape == (B, N, T, S)
    np.testing.assert_allclose(w_got, w_want, rtol=1e-5, atol=1e-6)


def nnx_pair(**kw):
    def make(fn=None):
        extra = {} if fn is None else {"attention_fn": fn}
        return nnx.MultiHeadAttention(
            N, D, qkv_features=D, decode=False, rngs=nnx.Rngs(3), **kw, **extra
        )

    return make(), make(make_attention_fn(implementation="fused"))


def test_nnx_adapter_matches_nnx():
    x, y = inputs()
    causal, padding = masks()
    flax_layer, ours_layer = nnx_pair()
    np.testing.assert_allclose(ours_layer.query.kernel[...], flax_layer.query.kernel[...])
    for q, kv, mask in [(x, y, padding), (x, x, causal), (x, y, None)]:
        want = flax_layer(q, kv, mask=mask)
        got = ours_layer(q, kv, mask=mask)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # is_causal is forwarded.
    np.testing.assert_allclose(
        ours_layer(x, is_causal=True), flax_layer(x, mask=causal), rtol=1e-5, atol=1e-5
    )


def test_nnx_adapter_sown_weights_and_decoding():
    x, _ = inputs()
    causal, _ = masks()
    flax_layer, ours_layer = nnx_pair()
    _, want = nnx.capture(flax_layer, nnx.Intermediate)(x, mask=causal, sow_weights=True)
    _, got = nnx.capture(ours_layer, nnx.Intermediate)(x, mask=causal, sow_weights=True)
    np.testing.assert_allclose(
        got["attention_weights"][0], want["attention_weights"][0], rtol=1e-5, atol=1e-6
    )
    # Flax's own KV cache (it builds the mask) on jattn's kernel.
    for layer in (flax_layer, ours_layer):
        layer.init_cache((B, T, D), dtype=x.dtype)
    steps_flax = [flax_layer(x[:, t : t + 1], decode=True) for t in range(T)]
    steps_ours = [ours_layer(x[:, t : t + 1], decode=True) for t in range(T)]
    np.testing.assert_allclose(
        jnp.concatenate(steps_ours, 1), jnp.concatenate(steps_flax, 1), rtol=1e-5, atol=1e-5
    )


def test_nnx_adapter_dropout_and_errors():
    x, y = inputs()
    flax_layer, ours_layer = nnx_pair(dropout_rate=0.5)
    rngs = nnx.Rngs(dropout=0)
    noisy = ours_layer(x, y, deterministic=False, rngs=rngs)
    clean = ours_layer(x, y, deterministic=True)
    assert not np.allclose(noisy, clean)
    np.testing.assert_allclose(clean, flax_layer(x, y, deterministic=True), rtol=1e-5, atol=1e-5)

    q = jnp.ones((B, T, N, 4))
    with pytest.raises(ValueError, match="dropout_rng"):
        attention_fn(q, q, q, dropout_rate=0.1, deterministic=False)
    with pytest.raises(TypeError, match="complex64.*dot_product_attention"):
        attention_fn(q.astype(jnp.complex64), q, q)
    with pytest.raises(ValueError, match="set per call"):
        make_attention_fn(is_causal=True)
    # Fixed options reach the kernel.
    capped = make_attention_fn(softcap=0.01)(q, q * 100, q)
    np.testing.assert_allclose(capped, attention_fn(q, q, q), rtol=1e-5)


def test_linen_custom_einsums_are_honoured():
    """linen passes qk_attn_weights_einsum / attn_weights_value_einsum (AQT); the adapter uses
    exactly those products and gives Flax's numbers."""
    calls = []

    def counting(name):
        def make():
            def einsum(spec, a, b):
                calls.append(name)
                return jnp.einsum(spec, a, b)

            return einsum

        return make

    x, y = inputs()
    _, padding = masks()
    kw = dict(
        num_heads=N,
        qkv_features=D,
        qk_attn_weights_einsum_cls=counting("qk"),
        attn_weights_value_einsum_cls=counting("av"),
    )
    flax_layer = linen.MultiHeadDotProductAttention(**kw)
    ours_layer = linen.MultiHeadDotProductAttention(**kw, attention_fn=attention_fn)
    params = flax_layer.init(jax.random.key(1), x, y)
    want = flax_layer.apply(params, x, y, mask=padding)
    calls.clear()
    got = ours_layer.apply(params, x, y, mask=padding)
    assert calls == ["qk", "av"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_einsum_dot_general_is_honoured():
    q = jax.random.normal(jax.random.key(4), (B, T, N, 8))
    k = jax.random.normal(jax.random.key(5), (B, S, N, 8))
    used = []

    def dot_general(*args, **kw):
        used.append(1)
        return jax.lax.dot_general(*args, **kw)

    got = attention_fn(q, k, k, is_causal=False, einsum_dot_general=dot_general)
    assert len(used) == 2  # both products (traced once; jnp.einsum caches the trace)
    want = linen.dot_product_attention(q, k, k, einsum_dot_general=dot_general)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="softcap"):
        make_attention_fn(softcap=2.0)(q, k, k, einsum_dot_general=dot_general)
