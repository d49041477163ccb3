"""Tiny models learn to reverse a sequence, trained with the Noam schedule and our loss.

Each test trains for about a thousand steps on freshly sampled data (a few seconds after
compilation on 2 CPU cores) and then checks both the training loss and greedy decoding with the
KV cache on new data.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jattn.nn import DecoderLM, Transformer, cross_entropy, generate, generate_seq2seq
from jattn.optim import noam_schedule

PAD, BOS, EOS, FIRST, VOCAB = 0, 1, 2, 3, 10
L = 6  # longest source
D_MODEL = 32


def reverse_batch(key, batch=64):
    """Sources of 2..L symbols (right-padded) and their reversals followed by EOS."""
    k1, k2 = jax.random.split(key)
    lengths = jax.random.randint(k1, (batch,), 2, L + 1)
    symbols = jax.random.randint(k2, (batch, L), FIRST, VOCAB)
    pos = jnp.arange(L)[None]
    real = pos < lengths[:, None]
    src = jnp.where(real, symbols, PAD)
    flipped = jnp.take_along_axis(symbols, jnp.clip(lengths[:, None] - 1 - pos, 0, L - 1), 1)
    out = jnp.concatenate([jnp.where(real, flipped, PAD), jnp.full((batch, 1), PAD)], 1)
    out = out.at[jnp.arange(batch), lengths].set(EOS)  # [B, L + 1]
    return src, lengths, out


def train(model, loss_fn, *, steps, seed=0):
    """Adam with the paper's settings and the warm-up schedule; returns the last losses."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adam(noam_schedule(D_MODEL, 100, scale=0.2), b1=0.9, b2=0.98, eps=1e-9)

    def loss_of(params, key):
        return loss_fn(nnx.merge(graphdef, params, rest), key)

    @jax.jit
    def run(params, opt_state, keys):
        def step(carry, key):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_of)(params, key)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        return jax.lax.scan(step, (params, opt_state), keys)

    (params, _), losses = run(
        params, tx.init(params), jax.random.split(jax.random.key(seed), steps)
    )
    nnx.update(model, params)
    return np.asarray(losses)


def exact_match(generated, want):
    return float(np.mean(np.all(np.asarray(generated) == np.asarray(want), axis=1)))


def test_transformer_learns_to_reverse():
    model = Transformer(
        VOCAB,
        d_model=D_MODEL,
        num_heads=4,
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_ff=64,
        dropout_rate=0.0,
        rngs=nnx.Rngs(0),
    )

    def loss_fn(m, key):
        src, lengths, out = reverse_batch(key)
        tgt_in = jnp.concatenate([jnp.full((out.shape[0], 1), BOS), out[:, :-1]], 1)
        logits = m(src, tgt_in, src_lengths=lengths, tgt_lengths=lengths + 1)
        return cross_entropy(logits, out, pad_id=PAD)

    losses = train(model, loss_fn, steps=1000)
    assert losses[:10].mean() > 1.0  # it did start from ignorance
    assert losses[-50:].mean() < 0.03, losses[-50:].mean()

    src, lengths, want = reverse_batch(jax.random.key(123), batch=128)
    got = generate_seq2seq(
        model, src, src_lengths=lengths, max_length=L + 1, bos_id=BOS, eos_id=EOS, pad_id=PAD
    )
    assert exact_match(got, want) > 0.95


def test_decoder_lm_learns_to_reverse():
    model = DecoderLM(
        VOCAB,
        d_model=D_MODEL,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        dropout_rate=0.0,
        rngs=nnx.Rngs(0),
    )

    def loss_fn(m, key):
        src, _, out = reverse_batch(key)
        # "src BOS reversed EOS": learn the tokens after BOS.
        seq = jnp.concatenate([src, jnp.full((src.shape[0], 1), BOS), out], 1)
        logits = m(seq[:, :-1])
        where = jnp.arange(seq.shape[1] - 1)[None] >= L
        return cross_entropy(logits, seq[:, 1:], pad_id=PAD, where=where)

    losses = train(model, loss_fn, steps=800)
    assert losses[:10].mean() > 1.0
    assert losses[-50:].mean() < 0.03, losses[-50:].mean()

    src, _, want = reverse_batch(jax.random.key(123), batch=128)
    prompt = jnp.concatenate([src, jnp.full((src.shape[0], 1), BOS)], 1)
    got = generate(model, prompt, max_new_tokens=L + 1, eos_id=EOS, pad_id=PAD)
    assert exact_match(got, want) > 0.95
