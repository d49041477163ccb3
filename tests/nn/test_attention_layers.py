"""MultiHeadAttention, DotProductAttention and AdditiveAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jattn
import jattn.nn.attention as attention_module
from jattn import masks as M
from jattn.nn import AdditiveAttention, DotProductAttention, MultiHeadAttention, RotaryEmbedding

B, T, D = 2, 6, 16


def mha(**kw):
    kw.setdefault("rngs", nnx.Rngs(0))
    return MultiHeadAttention(4, D, **kw)


def x_(key=0, shape=(B, T, D)):
    return jax.random.normal(jax.random.key(key), shape, jnp.float32)


@pytest.fixture
def spy(monkeypatch):
    """Records the keyword arguments each layer gives jattn.attention."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(kwargs)
        return jattn.attention(*args, **kwargs)

    monkeypatch.setattr(attention_module, "_attention", wrapped)
    return calls


# -- MultiHeadAttention ----------------------------------------------------------------------


def test_shapes_self_and_cross():
    layer = MultiHeadAttention(4, D, 32, 8, kv_features=12, rngs=nnx.Rngs(0))
    assert layer.head_dim == 8
    out = layer(x_(), x_(1, (B, 9, 12)))
    assert out.shape == (B, T, 8)
    out, w = layer(x_(), x_(1, (B, 9, 12)), return_weights=True)
    assert w.shape == (B, 4, T, 9)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    # Extra batch dims.
    assert mha()(x_(2, (3, 2, T, D))).shape == (3, 2, T, D)


def test_constructor_and_call_errors():
    with pytest.raises(ValueError, match="qkv_features"):
        MultiHeadAttention(3, D, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        mha(num_kv_heads=3)
    with pytest.raises(ValueError, match="dropout_rate"):
        mha(dropout_rate=1.0)
    with pytest.raises(ValueError, match="in_features"):
        mha()(jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="kv_features"):
        mha()(x_(), jnp.ones((B, T, D + 1)))
    with pytest.raises(ValueError, match="init_cache"):
        mha()(x_(), decode=True)
    with pytest.raises(ValueError, match="unknown implementation"):
        mha(implementation="no-such-kernel")(x_())


def test_implementation_and_masks_reach_the_kernel(spy):
    layer = mha(implementation="reference")
    lengths = jnp.array([6, 3])
    layer(x_(), is_causal=True, query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    (kw,) = spy
    assert kw["implementation"] == "reference"
    assert kw["is_causal"] is True
    assert kw["query_seq_lengths"] is lengths and kw["key_value_seq_lengths"] is lengths
    assert kw["mask"] is None  # no dense [T, S] array is built for padding / causality


def test_matches_a_hand_written_attention():
    layer = mha()
    x = x_()
    out = layer(x, is_causal=True)

    def heads(lin, n):
        return lin(x).reshape(B, T, n, -1)

    q, k, v = heads(layer.query, 4), heads(layer.key, 4), heads(layer.value, 4)
    s = jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(4)
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    o = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(s, -1), v).reshape(B, T, D)
    np.testing.assert_allclose(out, layer.out(o), rtol=1e-5, atol=1e-5)


def test_no_leakage_under_causal_mask():
    layer = mha(rotary=RotaryEmbedding())
    x = x_()
    base = layer(x, is_causal=True)
    noise = x_(10)
    for t in range(T - 1):
        changed = jnp.where(jnp.arange(T)[None, :, None] > t, noise, x)
        out = layer(changed, is_causal=True)
        np.testing.assert_allclose(out[:, : t + 1], base[:, : t + 1], rtol=1e-5, atol=1e-6)
        assert not np.allclose(out[:, t + 1 :], base[:, t + 1 :])  # later positions do change


def test_padding_invariance():
    layer = mha(num_kv_heads=2)
    lengths = jnp.array([4, 2])
    x = x_()
    noise = x_(5)
    pad = (jnp.arange(T)[None, :] >= lengths[:, None])[..., None]
    out1 = layer(x, query_seq_lengths=lengths, key_value_seq_lengths=lengths, is_causal=False)
    out2 = layer(jnp.where(pad, noise, x), query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    real = ~pad[..., 0]
    np.testing.assert_allclose(out1[real], out2[real], rtol=1e-5, atol=1e-6)
    # Without the lengths the padding would leak in.
    assert not np.allclose(layer(x)[real], layer(jnp.where(pad, noise, x))[real])
    # Same result as attending to the unpadded sequence alone.
    alone = layer(x[1:, :2])
    np.testing.assert_allclose(out1[1, :2], alone[0], rtol=1e-5, atol=1e-6)


def test_segment_ids_equal_separate_sequences():
    layer = mha()
    x = x_()
    seg = jnp.array([[1, 1, 1, 2, 2, 2]] * B)
    packed = layer(x, segment_ids=seg, is_causal=True)
    np.testing.assert_allclose(packed[:, :3], layer(x[:, :3], is_causal=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(packed[:, 3:], layer(x[:, 3:], is_causal=True), rtol=1e-5, atol=1e-6)


def test_mask_argument_array_and_object_agree():
    layer = mha()
    x, lengths = x_(), jnp.array([5, 3])
    obj = layer(x, mask=M.Causal() & M.Lengths(None, lengths))
    dense = jnp.tril(jnp.ones((T, T), bool))[None, None] & (
        jnp.arange(T)[None, None, None, :] < lengths[:, None, None, None]
    )
    np.testing.assert_allclose(obj, layer(x, mask=dense), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        obj, layer(x, is_causal=True, key_value_seq_lengths=lengths), rtol=1e-5
    )


@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_gqa_equals_mha_with_repeated_kv_heads(num_kv_heads):
    gqa = mha(num_kv_heads=num_kv_heads)
    assert gqa.key.kernel.shape == (D, num_kv_heads * 4)
    full = mha(rngs=nnx.Rngs(1))
    group = 4 // num_kv_heads

    def repeat(w):  # [in, K*H] -> [in, N*H], each kv head serving `group` query heads
        return jnp.repeat(w.reshape(*w.shape[:-1], num_kv_heads, 4), group, axis=-2).reshape(
            *w.shape[:-1], 16
        )

    for name in ("query", "out"):
        getattr(full, name).kernel[...] = getattr(gqa, name).kernel[...]
        getattr(full, name).bias[...] = getattr(gqa, name).bias[...]
    for name in ("key", "value"):
        getattr(full, name).kernel[...] = repeat(getattr(gqa, name).kernel[...])
        getattr(full, name).bias[...] = repeat(getattr(gqa, name).bias[...])
    x = x_()
    np.testing.assert_allclose(
        gqa(x, is_causal=True), full(x, is_causal=True), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    "num_kv_heads,chunks,implementation",
    [(4, [1] * T, None), (2, [2, 1, 3], None), (1, [T], None), (2, [1, 3, 2], "flash")],
    ids=["mha", "gqa", "mqa", "gqa-flash"],
)
def test_kv_cache_decoding_matches_full_pass(num_kv_heads, chunks, implementation):
    if implementation is not None and implementation not in jattn.kernels.REGISTRY:
        pytest.skip(f"{implementation} is not available")
    layer = mha(num_kv_heads=num_kv_heads, rotary=RotaryEmbedding(), implementation=implementation)
    x = x_()
    full = layer(x, is_causal=True)
    layer.init_cache(B, T + 2)
    assert layer.cached_key.shape == (B, T + 2, num_kv_heads, 4)
    outs, start = [], 0
    for n in chunks:
        outs.append(layer(x[:, start : start + n], decode=True))
        start += n
        assert int(layer.cache_index[...]) == start
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_under_jit_and_errors():
    layer = mha()
    x = x_()
    full = layer(x, is_causal=True)
    layer.init_cache(B, T)

    @nnx.jit
    def step(m, tok):
        return m(tok, decode=True)

    outs = [step(layer, x[:, t : t + 1]) for t in range(T)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch shape"):
        layer(x[:1, :1], decode=True)
    with pytest.raises(ValueError, match="inputs_kv=None"):
        layer(x[:, :1], x, decode=True)
    layer.clear_cache()
    with pytest.raises(ValueError, match="init_cache"):
        layer(x[:, :1], decode=True)


def test_cross_cache_matches_uncached_cross_attention():
    layer = mha()
    x, memory = x_(), x_(3, (B, 9, D))
    lengths = jnp.array([9, 4])
    full = layer(x, memory, key_value_seq_lengths=lengths)
    layer.init_cross_cache(memory)
    steps = [layer(x[:, t : t + 1], decode=True, key_value_seq_lengths=lengths) for t in range(T)]
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_returned_weights_respect_masks():
    layer = mha(implementation="fused")
    lengths = jnp.array([6, 3])
    _, w = layer(x_(), is_causal=True, key_value_seq_lengths=lengths, return_weights=True)
    w = np.asarray(w)
    assert np.all(np.triu(np.ones((T, T), bool), 1)[None, None] <= (w == 0))
    assert np.all(w[1, :, :, 3:] == 0)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)


def test_attention_dropout():
    layer = mha(dropout_rate=0.5, rngs=nnx.Rngs(0, dropout=1))
    x = x_()
    a, b = layer(x), layer(x)
    assert not np.allclose(a, b)  # a fresh key per call
    layer.eval()
    c, d = layer(x), layer(x)
    np.testing.assert_allclose(c, d)
    np.testing.assert_allclose(
        layer(x, deterministic=False, rngs=jax.random.key(3)),
        layer(x, deterministic=False, rngs=jax.random.key(3)),
    )
    viewed = nnx.view(layer, deterministic=False)
    assert not np.allclose(viewed(x), c)
    # Averaged over many keys, dropout keeps the expectation.
    outs = jax.vmap(lambda k: layer(x, deterministic=False, rngs=k))(
        jax.random.split(jax.random.key(0), 400)
    )
    np.testing.assert_allclose(outs.mean(0), c, atol=0.25)
    no_rng = mha(dropout_rate=0.5, rngs=nnx.Rngs(0))
    no_rng.rngs = None
    with pytest.raises(ValueError, match="rngs"):
        no_rng(x)


def test_gradients_are_finite_with_fully_masked_rows():
    layer = mha()
    lengths = jnp.array([6, 0])

    def loss(m):
        return jnp.sum(m(x_(), query_seq_lengths=lengths, key_value_seq_lengths=lengths) ** 2)

    grads = nnx.grad(loss)(layer)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# -- Luong and Bahdanau ----------------------------------------------------------------------


def softmax_masked(scores, valid):
    scores = np.where(valid, scores, -np.inf)
    m = np.max(scores, -1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.where(valid, np.exp(scores - m), 0.0)
    den = e.sum(-1, keepdims=True)
    return e / np.where(den == 0, 1, den)


def test_dot_product_attention_formula_and_mask(spy):
    s = x_(0, (B, D))
    h = x_(1)
    lengths = jnp.array([T, 2])
    ctx, w = DotProductAttention(implementation="reference")(s, h, lengths=lengths)
    assert spy[0]["implementation"] == "reference"
    assert ctx.shape == (B, D) and w.shape == (B, T)
    scores = np.einsum("bd,bsd->bs", s, h)
    want_w = softmax_masked(scores, np.arange(T)[None] < np.asarray(lengths)[:, None])
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx, np.einsum("bs,bsd->bd", want_w, h), rtol=1e-5, atol=1e-5)
    # The boolean mask says the same.
    mask = jnp.arange(T)[None] < lengths[:, None]
    ctx2, w2 = DotProductAttention()(s, h, mask=mask)
    np.testing.assert_allclose(w2, w, rtol=1e-6)
    # Many queries at once, separate values, scaling.
    q = x_(2)
    v = x_(3, (B, T, 2))
    ctx3, w3 = DotProductAttention(scaled=True)(q, h, v)
    assert ctx3.shape == (B, T, 2) and w3.shape == (B, T, T)
    want = softmax_masked(np.einsum("btd,bsd->bts", q, h) / np.sqrt(D), np.ones((1, 1, T), bool))
    np.testing.assert_allclose(w3, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one width"):
        DotProductAttention()(x_(0, (B, D - 1)), h)
    with pytest.raises(ValueError, match="batch of keys"):
        DotProductAttention()(x_(0, (B + 1, D)), h)


def test_fully_masked_rows_give_zeros_not_nan():
    h = x_(1)
    add = AdditiveAttention(D, 12, 8, rngs=nnx.Rngs(0))
    for layer, keys in ((DotProductAttention(), h), (add, h[..., :12])):
        ctx, w = layer(x_(0, (B, D)), keys, lengths=jnp.array([0, 3]))
        assert np.all(np.asarray(ctx[0]) == 0) and np.all(np.asarray(w[0]) == 0)
        assert np.all(np.isfinite(ctx)) and np.all(np.isfinite(w))
    grads = nnx.grad(
        lambda m: jnp.sum(m(x_(0, (B, D)), h[..., :12], lengths=jnp.array([0, 3]))[0])
    )(add)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_additive_attention_formula(spy):
    layer = AdditiveAttention(D, 12, 8, implementation="fused", rngs=nnx.Rngs(0))
    s = x_(0)
    h = x_(1)[..., :12]
    mask = jnp.arange(T)[None] < jnp.array([T, 4])[:, None]
    ctx, w = layer(s, h, mask=mask)
    assert spy[0]["implementation"] == "fused"
    w1 = np.asarray(layer.key_proj.kernel[...])
    w2 = np.asarray(layer.query_proj.kernel[...])
    b2 = np.asarray(layer.query_proj.bias[...])
    v = np.asarray(layer.score.kernel[...])[:, 0]
    hidden = np.tanh(
        np.einsum("bsk,ku->bsu", h, w1)[:, None]
        + (np.einsum("btq,qu->btu", s, w2) + b2)[:, :, None]
    )
    scores = hidden @ v
    want_w = softmax_masked(scores, np.asarray(mask)[:, None])
    np.testing.assert_allclose(w, want_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ctx, np.einsum("bts,bsd->btd", want_w, h), rtol=1e-5, atol=1e-5)
    # One decoder step at a time, with the key projection computed once.
    pk = layer.project_keys(h)
    ctx0, w0 = layer(s[:, 0], h, mask=mask, projected_keys=pk)
    assert ctx0.shape == (B, 12) and w0.shape == (B, T)
    np.testing.assert_allclose(ctx0, ctx[:, 0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="query_features"):
        layer(x_(0, (B, D - 1)), h)
    with pytest.raises(ValueError, match="key_features"):
        layer(s, x_(1))


def test_sinks_are_learned_per_head_and_used_when_decoding():
    """sinks=True adds a zero-initialised logit per head; the layer's output equals the
    kernel call with those sinks, decoding with the cache equals the full pass, and the
    sink logits receive gradients."""
    layer = mha(sinks=True, num_kv_heads=2, rotary=RotaryEmbedding())
    assert layer.sink_logits.shape == (4,) and not np.asarray(layer.sink_logits[...]).any()
    layer.sink_logits[...] = jnp.array([0.5, -1.0, 2.0, 0.0], jnp.float32)
    x = x_()
    full = layer(x, is_causal=True)
    plain = mha(num_kv_heads=2, rotary=RotaryEmbedding())
    assert not np.allclose(full, plain(x, is_causal=True))  # same init, the sinks differ
    layer.init_cache(B, T)
    outs = [layer(x[:, t : t + 1], decode=True) for t in range(T)]
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-5, atol=1e-5)
    layer.clear_cache()

    def loss(m):
        return jnp.sum(m(x, is_causal=True) ** 2)

    grads = nnx.grad(loss)(layer)
    assert np.asarray(grads.sink_logits[...]).all()
