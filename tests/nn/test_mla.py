"""Multi-head latent attention: the absorbed (latent) form equals the expanded one, cached
decoding equals the full pass, and a DecoderLM built on it trains and decodes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jattn
from jattn.nn import DecoderLM, MLAConfig, MLAttention

CFG = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def x_(shape=(2, 9, 32), key=0):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.mark.parametrize("q_lora_rank", [None, 12])
@pytest.mark.parametrize("sinks", [False, True])
def test_absorbed_form_equals_expanded(q_lora_rank, sinks):
    cfg = MLAConfig(
        kv_lora_rank=16,
        q_lora_rank=q_lora_rank,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    )
    layer = MLAttention(4, 32, config=cfg, sinks=sinks, rngs=nnx.Rngs(0))
    if sinks:
        layer.sink_logits[...] = jnp.array([0.5, -1.0, 1.5, 0.0], jnp.float32)
    x = x_()
    lengths = jnp.array([9, 5])
    expanded = layer(x, is_causal=True, key_value_seq_lengths=lengths)
    layer.absorb = True
    absorbed = layer(x, is_causal=True, key_value_seq_lengths=lengths)
    np.testing.assert_allclose(absorbed, expanded, rtol=1e-5, atol=1e-5)


def test_expanded_form_is_attention_with_h_ne_hv():
    """The expanded form is plain attention with query/key size 12 and value size 6, under the
    scale (d_nope + d_rope) ** -0.5, against the float64 reference built by hand."""
    layer = MLAttention(2, 32, config=CFG, rngs=nnx.Rngs(1))
    x = x_((1, 5, 32))
    pos = jnp.arange(5)
    q_nope, q_rope = layer._queries(x, pos)
    latent = layer._latent(x, pos)
    c, k_rope = latent[..., 0, :16], latent[..., 0, 16:]
    k = jnp.concatenate(
        [jnp.einsum("bsr,rnd->bsnd", c, layer.k_up[...]), jnp.repeat(k_rope[:, :, None], 2, 2)],
        -1,
    )
    v = jnp.einsum("bsr,rnd->bsnd", c, layer.v_up[...])
    q = jnp.concatenate([q_nope, q_rope], -1)
    heads = jattn.attention(
        *(a.astype(jnp.float64) for a in (q, k, v)),
        is_causal=True,
        scale=12**-0.5,
        implementation="reference",
    )
    want = layer.out(heads.reshape(1, 5, -1).astype(jnp.float32))
    np.testing.assert_allclose(layer(x, is_causal=True), want, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_pass():
    layer = MLAttention(4, 32, config=CFG, rngs=nnx.Rngs(0))
    x = x_()
    full = layer(x, is_causal=True)
    layer.init_cache(2, 12)
    assert layer.cached_latent.shape == (2, 12, 1, 20)
    outs = [layer(x[:, :3], decode=True)]  # a prefill chunk, then one token at a time
    outs += [layer(x[:, t : t + 1], decode=True) for t in range(3, 9)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="self-attention"):
        layer(x, x)


def test_decoder_lm_with_mla_trains_and_decodes():
    lm = DecoderLM(
        40,
        d_model=32,
        num_layers=2,
        num_heads=4,
        d_ff=48,
        dropout_rate=0.0,
        attention="mla",
        mla=CFG,
        sinks=True,
        rngs=nnx.Rngs(0),
    )
    assert isinstance(lm.layers[0].self_attn, MLAttention)
    toks = jax.random.randint(jax.random.key(2), (4, 10), 1, 40)
    opt = nnx.Optimizer(lm, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(m, opt, toks):
        def loss(m):
            logits = m(toks[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

        value, grads = nnx.value_and_grad(loss)(m)
        opt.update(m, grads)
        return value

    losses = [float(step(lm, opt, toks)) for _ in range(30)]
    assert losses[-1] < 0.8 * losses[0], losses
    full = lm(toks)
    lm.init_cache(4, 10)
    steps = [lm(toks[:, t : t + 1], decode=True)[:, 0] for t in range(10)]
    np.testing.assert_allclose(jnp.stack(steps, 1), full, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention must be 'mha' or 'mla'"):
        DecoderLM(40, d_model=32, num_layers=1, num_heads=4, attention="gqa", rngs=nnx.Rngs(0))
