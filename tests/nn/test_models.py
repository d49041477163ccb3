"""Blocks, Transformer and DecoderLM: shapes, errors, leakage, padding, cached decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
import jattn.nn.attention as attention_module
from jattn.nn import (
    DecoderLayer,
    DecoderLM,
    EncoderLayer,
    FeedForward,
    Transformer,
    generate,
    generate_seq2seq,
    sample_logits,
)

V, D = 13, 16


def tokens(key, shape, low=1):
    return jax.random.randint(jax.random.key(key), shape, low, V)


def tiny_transformer(**kw):
    cfg = dict(
        d_model=D,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
        d_ff=32,
        dropout_rate=0.0,
        rngs=nnx.Rngs(0),
    )
    cfg.update(kw)
    return Transformer(V, **cfg)


def tiny_lm(**kw):
    cfg = dict(d_model=D, num_heads=4, num_layers=2, d_ff=32, dropout_rate=0.0, rngs=nnx.Rngs(0))
    cfg.update(kw)
    return DecoderLM(V, **cfg)


# -- blocks ----------------------------------------------------------------------------------


def test_feed_forward_is_position_wise():
    ffn = FeedForward(D, 32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, D), jnp.float32)
    out = ffn(x)
    assert out.shape == x.shape
    np.testing.assert_allclose(out[:, 3], ffn(x[:, 3]), rtol=1e-6)
    want = ffn.down(jax.nn.relu(ffn.up(x)))
    np.testing.assert_allclose(out, want, rtol=1e-6)


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_and_decoder_layer_norm_placement(norm_first):
    enc = EncoderLayer(D, 4, 32, dropout_rate=0.0, norm_first=norm_first, rngs=nnx.Rngs(0))
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 5, D), jnp.float32)
    y = enc(x)
    assert y.shape == x.shape
    mean, std = np.asarray(y.mean(-1)), np.asarray(y.std(-1))
    if norm_first:  # residual stream keeps its offset: not normalised
        assert np.abs(mean).min() > 0.5
    else:  # post-norm: LayerNorm output (scale 1, bias 0 at init)
        np.testing.assert_allclose(mean, 0.0, atol=1e-4)
        np.testing.assert_allclose(std, 1.0, rtol=1e-3)
    dec = DecoderLayer(D, 4, 32, dropout_rate=0.0, norm_first=norm_first, rngs=nnx.Rngs(0))
    assert dec(x, y).shape == x.shape
    with pytest.raises(ValueError, match="memory"):
        dec(x)
    lm_layer = DecoderLayer(D, 4, 32, cross_attention=False, rngs=nnx.Rngs(0))
    assert lm_layer.cross_attn is None
    with pytest.raises(ValueError, match="without cross-attention"):
        lm_layer.init_cache(2, 4, memory=y)
    with pytest.raises(ValueError, match="lengths"):
        lm_layer.init_cache(2, 4)
        lm_layer(x[:, :1], lengths=jnp.array([1, 1]), decode=True)


def test_residual_dropout_follows_train_and_eval():
    enc = EncoderLayer(D, 4, 32, dropout_rate=0.5, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 5, D), jnp.float32)
    assert not np.allclose(enc(x), enc(x))
    enc.eval()
    np.testing.assert_allclose(enc(x), enc(x))


# -- Transformer -----------------------------------------------------------------------------


def test_transformer_defaults_are_the_paper_base_model():
    model = nnx.eval_shape(lambda: Transformer(37000, rngs=nnx.Rngs(0)))
    assert model.d_model == 512
    assert len(model.encoder_layers) == 6 and len(model.decoder_layers) == 6
    layer = model.encoder_layers[0]
    assert layer.self_attn.num_heads == 8 and layer.self_attn.head_dim == 64
    assert layer.ffn.up.kernel.shape == (512, 2048)
    assert layer.attn_block.dropout.rate == 0.1
    assert layer.attn_block.norm_first is False
    assert model.src_embedder.scale == pytest.approx(512**0.5)


def test_transformer_shapes_and_errors():
    model = tiny_transformer(tgt_vocab_size=7)
    src, tgt = tokens(0, (2, 8)), tokens(1, (2, 8), low=1) % 7
    assert model(src, tgt).shape == (2, 8, 7)
    assert model.encode(src).shape == (2, 8, D)
    with pytest.raises(ValueError, match="int"):
        model(src.astype(jnp.float32), tgt)
    with pytest.raises(ValueError, match="position_encoding"):
        tiny_transformer(position_encoding="alibi")
    with pytest.raises(ValueError, match="max_length"):
        tiny_transformer(position_encoding="learned")
    with pytest.raises(ValueError, match="one vocabulary"):
        tiny_transformer(tgt_vocab_size=7, share_embeddings=True)
    with pytest.raises(ValueError, match="divisible"):
        tiny_transformer(num_heads=3)
    with pytest.raises(ValueError, match="init_cache"):
        model.decode(tgt[:, :1], decode=True)


def test_weight_tying():
    tied = tiny_transformer(share_embeddings=True, tie_output=True)
    assert tied.output is None
    assert tied.src_embedder.embed is tied.tgt_embedder.embed
    untied = tiny_transformer()
    n_tied = sum(x.size for x in jax.tree.leaves(nnx.state(tied, nnx.Param)))
    n_untied = sum(x.size for x in jax.tree.leaves(nnx.state(untied, nnx.Param)))
    assert n_untied - n_tied == 2 * V * D + V  # one embedding, one projection and its bias
    src, tgt = tokens(0, (2, 8)), tokens(1, (2, 8))
    assert tied(src, tgt).shape == (2, 8, V)


@pytest.mark.parametrize(
    "position_encoding,norm_first", [("sinusoidal", False), ("rope", True), ("learned", False)]
)
def test_transformer_decoder_has_no_leakage_and_ignores_padding(position_encoding, norm_first):
    model = tiny_transformer(
        position_encoding=position_encoding, max_length=16, norm_first=norm_first
    )
    src, tgt = tokens(0, (2, 8)), tokens(1, (2, 8))
    src_lengths = jnp.array([8, 4])
    base = model(src, tgt, src_lengths=src_lengths)
    # Target positions after t do not change the logits at t.
    t = 2
    changed = jnp.where(jnp.arange(8) > t, (tgt + 1) % V, tgt)
    out = model(src, changed, src_lengths=src_lengths)
    np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-5)
    assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])
    # Source padding content does not matter.
    noisy_src = src.at[1, 4:].set((src[1, 4:] + 1) % V)
    np.testing.assert_allclose(
        model(noisy_src, tgt, src_lengths=src_lengths), base, rtol=1e-5, atol=1e-5
    )
    assert not np.allclose(model(noisy_src, tgt), model(src, tgt))
    # Target padding does not change real target positions.
    tgt_lengths = jnp.array([8, 3])
    a = model(src, tgt, src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    b = model(src, tgt.at[1, 3:].set(1), src_lengths=src_lengths, tgt_lengths=tgt_lengths)
    np.testing.assert_allclose(a[1, :3], b[1, :3], rtol=1e-5, atol=1e-5)


def test_transformer_cached_decoding_matches_full_pass():
    model = tiny_transformer(num_kv_heads=2, norm_first=True)
    src, tgt = tokens(0, (2, 8)), tokens(1, (2, 8))
    src_lengths = jnp.array([8, 5])
    full = model(src, tgt, src_lengths=src_lengths)
    memory = model.encode(src, src_lengths=src_lengths)
    model.init_cache(memory, 8)
    for t in range(8):
        step = model.decode(tgt[:, t : t + 1], src_lengths=src_lengths, decode=True)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


def test_generate_seq2seq_greedy_follows_the_full_pass():
    model = tiny_transformer()
    src = tokens(0, (2, 8))
    src_lengths = jnp.array([8, 3])
    out = generate_seq2seq(model, src, src_lengths=src_lengths, max_length=8, bos_id=1)
    assert out.shape == (2, 8) and out.dtype == jnp.int32
    # Greedy: each token is the argmax of the teacher-forced logits on the previous ones.
    tgt_in = jnp.concatenate([jnp.ones((2, 1), jnp.int32), out[:, :-1]], 1)
    logits = model(src, tgt_in, src_lengths=src_lengths)
    np.testing.assert_array_equal(out, jnp.argmax(logits, -1))


# -- DecoderLM -------------------------------------------------------------------------------


def test_lm_shapes_errors_and_implementation(monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["implementation"])
        return jattn.attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_attention", spy)
    lm = tiny_lm(implementation="reference", tie_output=True)
    assert lm.output is None
    assert lm(tokens(0, (2, 8))).shape == (2, 8, V)
    assert seen == ["reference"] * 2  # both layers
    seen.clear()
    model = tiny_transformer(implementation=["reference"])
    model(tokens(0, (2, 8)), tokens(1, (2, 8)))
    assert seen == [["reference"]] * 6  # 2 encoder self, 2 decoder self, 2 cross
    with pytest.raises(ValueError, match="int"):
        lm(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="position_encoding"):
        tiny_lm(position_encoding="absolute")
    with pytest.raises(ValueError, match="init_cache"):
        lm(tokens(0, (2, 1)), decode=True)
    with pytest.raises(ValueError, match="lengths"):
        lm.init_cache(2, 4)
        lm(tokens(0, (2, 1)), lengths=jnp.array([1, 1]), decode=True)


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_lm_no_leakage_and_padding(position_encoding):
    lm = tiny_lm(position_encoding=position_encoding, max_length=16)
    x = tokens(0, (2, 8))
    base = lm(x)
    assert base.shape == (2, 8, V)
    for t in (0, 4):
        changed = jnp.where(jnp.arange(8) > t, (x + 1) % V, x)
        out = lm(changed)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-5)
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])
    lengths = jnp.array([8, 5])
    a = lm(x, lengths=lengths)
    b = lm(x.at[1, 5:].set(2), lengths=lengths)
    np.testing.assert_allclose(a[1, :5], b[1, :5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a[0], base[0], rtol=1e-5, atol=1e-5)


def test_lm_packed_segments_equal_separate_sequences():
    lm = tiny_lm()
    x = tokens(0, (2, 8))
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2]] * 2)
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2]] * 2)
    packed = lm(x, segment_ids=seg, positions=pos)
    # Causal, so the first tokens of a sequence do not see what follows: compare the second
    # segment with the same tokens moved to the front.
    alone = lm(jnp.roll(x, -5, axis=1))
    np.testing.assert_allclose(packed[:, 5:], alone[:, :3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed[:, :5], lm(x)[:, :5], rtol=1e-5, atol=1e-5)
    assert not np.allclose(packed[:, 5:], lm(x)[:, 5:])


@pytest.mark.parametrize("position_encoding", ["rope", "learned"])
def test_lm_cached_decoding_matches_full_pass(position_encoding):
    lm = tiny_lm(position_encoding=position_encoding, max_length=16, num_kv_heads=1)
    x = tokens(0, (2, 8))
    full = lm(x)
    lm.init_cache(2, 10)
    prefill = lm(x[:, :3], decode=True)  # several tokens at once, then one at a time
    np.testing.assert_allclose(prefill, full[:, :3], rtol=1e-4, atol=1e-5)
    for t in range(3, 8):
        step = lm(x[:, t : t + 1], decode=True)
        np.testing.assert_allclose(step[:, 0], full[:, t], rtol=1e-4, atol=1e-5)


def test_generate_greedy_follows_the_full_pass_and_stops_at_eos():
    lm = tiny_lm()
    prompt = tokens(0, (2, 2))
    out = generate(lm, prompt, max_new_tokens=6)
    assert out.shape == (2, 6) and out.dtype == jnp.int32
    seq = jnp.concatenate([prompt, out], 1)
    np.testing.assert_array_equal(out, jnp.argmax(lm(seq)[:, 1:-1], -1))
    # Stop at an end token: pick the first generated token of row 0 as "eos".
    eos = int(out[0, 2])
    stopped = generate(lm, prompt, max_new_tokens=6, eos_id=eos, pad_id=0)
    for row, full_row in zip(np.asarray(stopped), np.asarray(out), strict=True):
        hits = np.flatnonzero(full_row == eos)
        end = hits[0] + 1 if hits.size else len(full_row)
        np.testing.assert_array_equal(row[:end], full_row[:end])
        assert np.all(row[end:] == 0)


@pytest.mark.parametrize("implementation", [None, "flash"])
def test_generate_with_ragged_prompts_continues_each_prompt(implementation):
    if implementation is not None and implementation not in jattn.kernels.REGISTRY:
        pytest.skip(f"{implementation} is not available")
    lm = tiny_lm(position_encoding="sinusoidal", implementation=implementation)
    prompt = tokens(0, (2, 4))
    lengths = np.array([4, 2])
    n_new = 4
    out = np.asarray(
        generate(lm, prompt, prompt_lengths=jnp.asarray(lengths), max_new_tokens=n_new)
    )
    # Each row is the greedy continuation of its own prompt alone, at its own positions:
    # compare with one teacher-forced pass over "prompt[:n] + generated", right-padded.
    seqs = np.zeros((2, 4 + n_new), np.int32)
    for i, n in enumerate(lengths):
        seqs[i, :n] = prompt[i, :n]
        seqs[i, n : n + n_new] = out[i]
    logits = lm(jnp.asarray(seqs), lengths=jnp.asarray(lengths + n_new))
    for i, n in enumerate(lengths):
        np.testing.assert_array_equal(out[i], np.argmax(logits[i, n - 1 : n - 1 + n_new], -1))
    # What sits in the prompt padding does not matter.
    garbage = jnp.where(jnp.arange(4)[None] < jnp.asarray(lengths)[:, None], prompt, 7)
    again = generate(lm, garbage, prompt_lengths=jnp.asarray(lengths), max_new_tokens=n_new)
    np.testing.assert_array_equal(again, out)


def test_sampling_and_top_k():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    draws = jax.vmap(lambda k: sample_logits(logits, k, temperature=1.0, top_k=2))(
        jax.random.split(jax.random.key(0), 2000)
    )[:, 0]
    counts = np.bincount(np.asarray(draws), minlength=4) / 2000
    assert counts[2] == 0 and counts[3] == 0
    assert counts[0] == pytest.approx(0.5 / 0.8, abs=0.04)
    cold = jax.vmap(lambda k: sample_logits(logits, k, temperature=0.05))(
        jax.random.split(jax.random.key(1), 200)
    )
    assert np.all(np.asarray(cold) == 0)
    assert int(sample_logits(logits)[0]) == 0
    with pytest.raises(ValueError, match="rng"):
        sample_logits(logits, temperature=1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_logits(logits, jax.random.key(0), temperature=1.0, top_k=5)

    lm = tiny_lm()
    prompt = tokens(0, (2, 3))
    a = generate(lm, prompt, max_new_tokens=5, temperature=1.0, top_k=3, rng=jax.random.key(0))
    b = generate(lm, prompt, max_new_tokens=5, temperature=1.0, top_k=3, rng=jax.random.key(0))
    np.testing.assert_array_equal(a, b)
    # Each sampled token is among the 3 most likely continuations.
    logits = lm(jnp.concatenate([prompt, a], 1))[:, 2:-1]
    top3 = jax.lax.top_k(logits, 3)[1]
    assert np.all(np.any(np.asarray(top3) == np.asarray(a)[..., None], -1))
    with pytest.raises(ValueError, match="rng"):
        generate(lm, prompt, max_new_tokens=2, temperature=1.0)
    with pytest.raises(TypeError, match="DecoderLM"):
        generate(tiny_transformer(), prompt, max_new_tokens=2)
    with pytest.raises(ValueError, match="positive"):
        generate(lm, prompt, max_new_tokens=0)


def test_generation_does_not_touch_the_model():
    lm = tiny_lm(dropout_rate=0.1)

    def snapshot():
        return jax.tree.map(np.asarray, nnx.state(lm, nnx.Param, nnx.RngCount))

    before = snapshot()
    generate(lm, tokens(0, (2, 3)), max_new_tokens=5)
    assert lm.layers[0].self_attn.cached_key is None
    assert lm.embedder.dropout.deterministic is False
    jax.tree.map(np.testing.assert_array_equal, before, snapshot())


def test_lm_with_sinks_decodes_like_its_full_pass():
    lm = tiny_lm(sinks=True, num_kv_heads=2)
    for layer in lm.layers:
        assert layer.self_attn.sink_logits.shape == (4,)
        layer.self_attn.sink_logits[...] = jnp.linspace(-1.0, 2.0, 4, dtype=jnp.float32)
    x = tokens(0, (2, 6))
    full = lm(x)
    lm.init_cache(2, 6)
    steps = [lm(x[:, t : t + 1], decode=True)[:, 0] for t in range(6)]
    np.testing.assert_allclose(jnp.stack(steps, 1), full, rtol=1e-4, atol=1e-5)
    model = Transformer(
        V,
        d_model=D,
        num_heads=2,
        num_encoder_layers=1,
        num_decoder_layers=1,
        d_ff=32,
        dropout_rate=0.0,
        sinks=True,
        rngs=nnx.Rngs(0),
    )
    assert model.encoder_layers[0].self_attn.sink_logits.shape == (2,)
    assert model.decoder_layers[0].cross_attn.sink_logits is None
