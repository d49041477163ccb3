"""Inputs at the edges: what jax.nn accepts works with the same numbers, bad values are refused
by name at the call, and no kernel turns finite inputs into NaN."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen
from jax import export

import jattn
from jattn.kernels.flash import FlashConfig
from tests import helpers as H

IMPLS = jattn.kernels.testable()
KEY = jax.random.key(0)


def _qkv(b, t, s, n, kh, h, hv=None, dtype=jnp.float32):
    hv = h if hv is None else hv
    k1, k2, k3 = jax.random.split(KEY, 3)
    q = H.normal(k1, (*b, t, n, h), dtype)
    k = H.normal(k2, (*b, s, kh, h), dtype)
    v = H.normal(k3, (*b, s, kh, hv), dtype)
    return q, k, v


# ---------------------------------------------------------------------------------------------
# Empty dimensions.


@pytest.mark.filterwarnings("ignore:divide by zero")  # jax.nn's 1 / sqrt(0)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "dims",
    [
        ((0,), 4, 4, 2, 2, 8),  # no batch element
        ((2,), 0, 4, 2, 2, 8),  # no query
        ((2,), 4, 0, 2, 2, 8),  # no key: every row sees nothing
        ((2,), 4, 4, 0, 0, 8),  # no head (jax.nn divides by zero here)
        ((2,), 4, 4, 2, 2, 0),  # zero-width heads
    ],
)
def test_empty_dimensions(impl, dims):
    q, k, v = _qkv(*dims)
    out, lse = jattn.attention(q, k, v, implementation=impl, return_lse=True)
    assert out.shape == q.shape[:-1] + (v.shape[-1],)
    assert lse.shape == (*q.shape[:-3], q.shape[-2], q.shape[-3])
    assert not jnp.isnan(out).any()
    if dims[3] != 0:  # jax.nn serves every other case: same shape, same numbers
        np.testing.assert_allclose(out, jax.nn.dot_product_attention(q, k, v), atol=1e-6)
    if dims[2] == 0:
        assert (lse == -jnp.inf).all() and (out == 0).all()
    grads = jax.grad(
        lambda q, k, v: jattn.attention(q, k, v, implementation=impl).sum(), (0, 1, 2)
    )(q, k, v)
    for g, x in zip(grads, (q, k, v), strict=True):
        assert g.shape == x.shape and not jnp.isnan(g).any()


def test_zero_width_query_heads_average_the_values():
    q, k, v = _qkv((1,), 3, 5, 2, 2, 0, hv=4)
    out = jattn.attention(q, k, v, implementation="fused")
    np.testing.assert_allclose(
        out, jnp.broadcast_to(v.mean(1, keepdims=True), out.shape), atol=1e-6
    )


# ---------------------------------------------------------------------------------------------
# What jax.nn accepts.


@pytest.mark.parametrize("impl", ["fused", "flash", "reference"])
def test_unbatched_inputs_with_four_dim_mask_and_bias(impl):
    q, k, v = _qkv((), 6, 7, 4, 2, 8)
    mask = jax.random.bernoulli(KEY, 0.7, (1, 4, 6, 7)).at[..., 0].set(True)
    bias = jax.random.normal(KEY, (1, 4, 6, 7))
    got = jattn.attention(q, k, v, bias, mask, implementation=impl)
    want = jax.nn.dot_product_attention(q, k, v, bias, mask)
    np.testing.assert_allclose(got, want, atol=2e-5)
    with pytest.raises(ValueError, match=r"mask of shape \(2, 4, 6, 7\)"):
        jattn.attention(q, k, v, mask=jnp.ones((2, 4, 6, 7), bool), implementation=impl)


@pytest.mark.parametrize("impl", ["fused", "flash"])
def test_numpy_and_traced_scales(impl):
    q, k, v = _qkv((2,), 8, 8, 2, 2, 8)
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    for scale in (np.float32(0.3), np.float64(0.3), jnp.asarray(0.3)):
        got = jattn.attention(q, k, v, scale=scale, implementation=impl)
        np.testing.assert_allclose(got, want, atol=2e-6)
    traced = jax.jit(lambda s: jattn.attention(q, k, v, scale=s, implementation=impl))
    np.testing.assert_allclose(traced(0.3), want, atol=2e-6)
    # The scale is differentiable when traced.
    g = jax.grad(lambda s: jattn.attention(q, k, v, scale=s, implementation=impl).sum())(0.3)
    g_ref = jax.grad(lambda s: jax.nn.dot_product_attention(q, k, v, scale=s).sum())(0.3)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "flash", "pallas_gpu"])
@pytest.mark.parametrize("dtype", [jnp.uint32, jnp.int8, jnp.uint8])
def test_lengths_of_any_integer_type(impl, dtype):
    q, k, v = _qkv((2,), 8, 9, 2, 2, 8)
    lengths = np.array([9, 4])
    got = jattn.attention(
        q, k, v, key_value_seq_lengths=jnp.asarray(lengths, dtype), implementation=impl
    )
    want = jax.nn.dot_product_attention(
        q, k, v, key_value_seq_lengths=jnp.asarray(lengths, jnp.int32)
    )
    np.testing.assert_allclose(got, want, atol=2e-5)


@pytest.mark.parametrize("impl", ["fused", "flash", "pallas_gpu"])
def test_huge_windows_and_offsets_mean_no_bound(impl):
    q, k, v = _qkv((1,), 8, 8, 2, 2, 8)
    want = jax.nn.dot_product_attention(q, k, v)
    for w in (2**31, 2**40, (2**63, 2**31)):
        got = jattn.attention(q, k, v, local_window_size=w, implementation=impl)
        np.testing.assert_allclose(got, want, atol=2e-5)
    m = jattn.masks.Causal(2**40)
    np.testing.assert_allclose(
        jattn.attention(q, k, v, mask=m, implementation=impl), want, atol=2e-5
    )


@pytest.mark.parametrize("impl", [i for i in IMPLS if i != "reference"])
def test_64_bit_ids_and_offsets_keep_their_meaning(impl):
    """With x64 on, int64 segment ids that differ only above bit 31 stay different, and traced
    causal offsets at the top of int32 (or past it, in int64) mean "no bound": nothing wraps."""
    q, k, v = _qkv((2,), 8, 8, 2, 2, 8)
    big = jnp.array([[2**32 + 1] * 4 + [1] * 4, [5] * 8], jnp.int64)
    small = jnp.array([[2] * 4 + [1] * 4, [5] * 8], jnp.int32)
    got = jattn.attention(q, k, v, segment_ids=big, implementation=impl)
    want = jattn.attention(q, k, v, segment_ids=small, implementation="reference")
    np.testing.assert_allclose(got, want, atol=2e-5)
    f = jax.jit(
        lambda off: jattn.attention(q, k, v, mask=jattn.masks.Causal(off), **H.impl_kw(impl))
    )
    plain = jattn.attention(q, k, v, implementation="reference")
    for off in (jnp.int32(2**31 - 1), jnp.int64(2**32 - 1), jnp.int64(2**40)):
        np.testing.assert_allclose(f(off), plain, atol=2e-5, err_msg=str(off))
    hidden = f(jnp.int64(-(2**32) - 1))  # before every key: every row empty, zeros
    assert not np.asarray(hidden).any()


def test_numpy_dropout_rate_is_a_number():
    q, k, v = _qkv((1,), 8, 8, 2, 2, 8)
    rng = jax.random.key(3)
    a = jattn.attention(q, k, v, dropout_rate=np.float32(0.25), dropout_rng=rng)
    b = jattn.attention(q, k, v, dropout_rate=0.25, dropout_rng=rng)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("impl", ["fused", "flash"])
def test_symbolic_batch_dimension_exports(impl):
    (b,) = export.symbolic_shape("b")
    x = jax.ShapeDtypeStruct((b, 16, 2, 8), jnp.float32)
    lengths = jax.ShapeDtypeStruct((b,), jnp.int32)

    def f(q, k, v, lengths):
        return jattn.attention(
            q, k, v, is_causal=True, key_value_seq_lengths=lengths, implementation=impl
        )

    exported = export.export(jax.jit(f))(x, x, x, lengths)
    q, k, v = _qkv((3,), 16, 16, 2, 2, 8)
    lens = jnp.array([16, 5, 1], jnp.int32)
    np.testing.assert_allclose(exported.call(q, k, v, lens), f(q, k, v, lens), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad values, refused at the call and by name.


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": float("inf")}, ValueError, "scale must be finite"),
        ({"scale": np.float32("inf")}, ValueError, "scale must be finite"),
        ({"scale": "0.5"}, TypeError, "scale must be a real number"),
        ({"scale": True}, TypeError, "scale must be a real number"),
        ({"scale": jnp.ones(2)}, TypeError, "scale must be a real number"),
        ({"softcap": float("inf")}, ValueError, "softcap must be a positive finite"),
        ({"softcap": 0.0}, ValueError, "softcap must be a positive finite"),
        ({"dropout_rate": np.float32(1.5)}, ValueError, "dropout_rate must be in"),
        ({"dropout_rate": "0.1"}, TypeError, "dropout_rate must be a real number"),
        ({"dropout_rate": 0.1, "dropout_rng": 3}, TypeError, "dropout_rng must be a PRNG key"),
        ({"is_causal": "yes"}, TypeError, "is_causal must be a bool"),
        ({"return_lse": 1}, TypeError, "return_lse must be a bool"),
        ({"implementation": 3}, TypeError, "implementation must be None, a name"),
        ({"implementation": ["flash", 3]}, TypeError, "implementation names must be strings"),
        ({"config": FlashConfig(8, 8), "return_weights": True}, TypeError, "config of type"),
        ({"local_window_size": (1, -1)}, ValueError, "local_window_size"),
        ({"local_window_size": 1.5}, TypeError, "local_window_size"),
    ],
)
def test_bad_values_are_named(kwargs, error, match):
    q, k, v = _qkv((1,), 4, 4, 2, 2, 8)
    with pytest.raises(error, match=match):
        jattn.attention(q, k, v, **kwargs)


def test_traced_static_options_are_refused_by_name():
    q, k, v = _qkv((1,), 4, 4, 2, 2, 8)
    for name in ("softcap", "dropout_rate"):
        f = jax.jit(lambda x, name=name: jattn.attention(q, k, v, **{name: x}))
        with pytest.raises(TypeError, match=f"{name} must be a static number"):
            f(0.5)


def test_every_reason_is_given_when_no_implementation_fits():
    q, k, v = _qkv((1,), 4, 4, 2, 2, 8)
    with pytest.raises(NotImplementedError) as e:
        jattn.attention(q, k, v, return_weights=True, implementation=["flash", "pallas_gpu"])
    msg = str(e.value)
    assert "'flash' does not support return_weights" in msg
    assert "'pallas_gpu' does not support return_weights" in msg


# ---------------------------------------------------------------------------------------------
# Finite wherever the materialising kernel is.


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_is_finite_at_huge_logits(dtype, causal):
    # Logits around 1e9: a max subtracted in one fusion and recomputed with an FMA in another
    # used to differ by ulps of 1e9, and exp2 overflowed.
    big = {jnp.bfloat16: 3e4, jnp.float16: 200.0, jnp.float32: 3e4}[dtype]
    q, k, v = _qkv((1,), 300, 300, 2, 2, 16, dtype=dtype)
    q, k = q * jnp.asarray(big, dtype), k * jnp.asarray(big, dtype)
    fused = jattn.attention(q, k, v, is_causal=causal, implementation="fused")
    assert jnp.isfinite(fused).all()
    for cfg in (FlashConfig(300, 300), FlashConfig(64, 128)):
        out = jattn.attention(q, k, v, is_causal=causal, implementation="flash", config=cfg)
        assert jnp.isfinite(out).all()

        def loss(q, cfg=cfg):
            out = jattn.attention(q, k, v, is_causal=causal, implementation="flash", config=cfg)
            return out.astype(jnp.float32).sum()

        g = jax.grad(loss)(q)
        assert jnp.isfinite(g).all()
        # Each output row is a convex combination of value rows.
        assert (jnp.abs(out) <= jnp.abs(v).max() * 1.01).all()


# ---------------------------------------------------------------------------------------------
# The Flax adapter.


def test_adapter_force_fp32_for_softmax_sows_float32_weights():
    x = jax.random.normal(KEY, (2, 6, 16), jnp.bfloat16)
    layer = linen.MultiHeadDotProductAttention(
        num_heads=2,
        qkv_features=16,
        dtype=jnp.bfloat16,
        force_fp32_for_softmax=True,
        attention_fn=jattn.nn.attention_fn,
    )
    params = layer.init(KEY, x)
    out, state = layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
    (weights,) = jax.tree.leaves(state["intermediates"])
    assert weights.dtype == jnp.float32 and out.dtype == jnp.bfloat16
    flax_layer = layer.clone(attention_fn=linen.dot_product_attention)
    want, want_state = flax_layer.apply(params, x, sow_weights=True, mutable=["intermediates"])
    (want_weights,) = jax.tree.leaves(want_state["intermediates"])
    assert want_weights.dtype == weights.dtype
    np.testing.assert_allclose(weights, want_weights, atol=2e-2)
    H.assert_close(out, want, 5e-2)


# ---------------------------------------------------------------------------------------------
# Non-finite inputs, extreme caps and rates: one rule for every kernel (issue 27).


def _nan_where(x) -> np.ndarray:
    return np.isnan(np.asarray(x, np.float32))


def _supports(impl: str, feature: str) -> bool:
    return feature in jattn.kernels.REGISTRY[impl].supports


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("where", ["q", "k", "bias", "v"])
@pytest.mark.parametrize("t", [1, 40])
def test_a_nan_that_reaches_a_visible_logit_or_value_stays_nan(impl, where, t):
    """A NaN in a visible query, key, bias entry or value makes NaN exactly where the
    reference's output does (never zeros), and the gradients are NaN where the reference's
    are; everything else agrees with the reference."""
    q, k, v = _qkv((2,), t, 48, 4, 2, 16)
    bias = None
    if _supports(impl, "bias"):
        bias = H.normal(jax.random.key(3), (2, 4, t, 48))
    elif where == "bias":
        pytest.skip(f"{impl} takes no bias")
    at = {"q": (1, t - 1, 2, 3), "k": (0, 20, 1, 5), "v": (1, 7, 0, 2), "bias": (0, 3, t - 1, 9)}
    arrays = dict(q=q, k=k, v=v, bias=bias)
    arrays[where] = arrays[where].at[at[where]].set(jnp.nan)

    def loss(impl):
        def f(q, k, v, bias):
            out = jattn.attention(q, k, v, bias, is_causal=t > 1, implementation=impl)
            return jnp.sum(out * out), out

        return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)

    args = [arrays[name] for name in ("q", "k", "v", "bias")]
    (_, got), g_got = loss(impl)(*args)
    (_, want), g_want = loss("reference")(*args)
    assert _nan_where(want).any()
    np.testing.assert_array_equal(_nan_where(got), _nan_where(want))
    ok = ~_nan_where(want)
    np.testing.assert_allclose(np.asarray(got)[ok], np.asarray(want)[ok], atol=2e-5)
    for name, a, b in zip("qkv", g_got, g_want, strict=False):
        assert _nan_where(a).any() == _nan_where(b).any(), (name, where)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_non_finite_keys_change_nothing(impl):
    """Keys hidden by segment ids or a dense mask may hold NaN or inf: the output and dk, dv
    are those of the same call with zeros there (dq goes through dS K, where 0 * NaN is NaN
    in every kernel, the reference and jax.nn included)."""
    q, k, v = _qkv((2,), 24, 40, 2, 2, 16)
    seg_q = jnp.zeros((2, 24), jnp.int32)
    seg_k = jnp.zeros((2, 40), jnp.int32).at[:, 30:].set(1)
    dense = None
    bad = k.at[:, 33, 0, 3].set(jnp.nan)
    clean = k.at[:, 33].set(0.0)
    if _supports(impl, "dense_mask"):
        dense = jnp.ones((2, 1, 24, 40), bool).at[:, :, :, 12].set(False)
        bad = bad.at[:, 12, 1, 0].set(jnp.inf)
        clean = clean.at[:, 12].set(0.0)

    def f(k, v):
        out = jattn.attention(q, k, v, mask=dense, segment_ids=(seg_q, seg_k), implementation=impl)
        return jnp.sum(out * out), out

    (_, got), (dk, dv) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(bad, v)
    (_, want), (dk0, dv0) = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(clean, v)
    for a, b in [(got, want), (dk, dk0), (dv, dv0)]:
        assert np.isfinite(np.asarray(a)).all()
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


# The kernels keep the keys and values past a sequence's length out of their products (a zero
# weight times NaN is NaN): `reference` zeroes what no query sees, `flash` what lies past the
# key range of a block's rows, the Pallas kernels what lies past the length, and the native
# kernel stops its decoding's key blocks at the length and packs a block across it with zeros
# past it. Not `fused`, as in jax.nn: a pass over V would double its decoding's time
# (docs/kernels.md).
_PAST_LENGTH = [
    (impl, t, 4, jnp.float32, None)
    for impl in IMPLS
    if impl not in ("cpu", "fused")
    for t in (1, 24)
]
if "cpu" in IMPLS:
    # native: decoding (dot products; tiles from 32 rows), prefill (one query block; several,
    # from pre-packed blocks), each dtype at the CPU's level, bfloat16 at the levels below
    _PAST_LENGTH += [
        *(
            ("cpu", t, n, dt, None)
            for t, n in [(1, 4), (1, 32), (24, 4), (200, 4)]
            for dt in (jnp.float32, jnp.bfloat16, jnp.float16)
        ),
        *(("cpu", t, 4, jnp.bfloat16, isa) for t in (1, 200) for isa in ("generic", "avx2")),
    ]


@pytest.mark.parametrize(("impl", "t", "n", "dtype", "isa"), _PAST_LENGTH, ids=str)
def test_non_finite_keys_and_values_past_the_length_change_nothing(impl, t, n, dtype, isa):
    """A KV cache past each sequence's length may hold anything, NaN and inf included: the
    output and every gradient are those of the same call with zeros there."""
    config = None
    if isa is not None:
        from jattn.kernels import cpu

        if cpu.ISA_LEVELS.index(isa) > cpu.best_isa():
            pytest.skip(f"this CPU lacks {isa}")
        config = cpu.CpuConfig(isa=isa)
    q, k, v = _qkv((2,), t, 300, n, 2, 128, dtype=dtype)
    lengths = jnp.array([10, 233])
    past = (jnp.arange(300)[None, :] >= lengths[:, None])[:, :, None, None]
    bad_k = k.at[0, 30, 1, 5].set(jnp.nan).at[1, 235, 0, 2].set(jnp.inf)
    bad_v = v.at[0, 12, 0, 3].set(jnp.nan).at[1, 299, 1, 0].set(-jnp.inf)

    def f(q, k, v):
        out = jattn.attention(
            q,
            k,
            v,
            key_value_seq_lengths=lengths,
            is_causal=t > 1,
            implementation=impl,
            config=config,
        )
        return jnp.sum(out.astype(jnp.float32) ** 2), out

    grad = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)
    (_, got), g_got = grad(q, bad_k, bad_v)
    (_, want), g_want = grad(q, jnp.where(past, 0, k), jnp.where(past, 0, v))
    atol = H.tol(dtype)[1]
    for name, a, b in [("out", got, want), *zip("qkv", g_got, g_want, strict=True)]:
        a, b = (np.asarray(x, np.float32) for x in (a, b))
        assert np.isfinite(a).all(), name
        np.testing.assert_allclose(a, b, atol=atol, rtol=atol, err_msg=name)


@pytest.mark.parametrize("impl", IMPLS)
def test_float16_weights_keep_their_precision_at_long_sequences(impl):
    """At S = 4096 the blockwise kernels' weights, scaled by 2^-ceil(log2 S) against overflow,
    fell among float16's subnormals when rounded for P V: 1.8e-4 off the reference where the
    native kernel and fused are 3e-5 (and 0.031 against 0.0007 on a spread softmax, S = 2100).
    float16 values take no such scaling (common.weight_shift)."""
    q, k, v = _qkv((1,), 16, 4096, 2, 1, 64, dtype=jnp.float16)
    got = jattn.attention(q, k, v, implementation=impl)
    H.assert_close(got, H.oracle(q, k, v), 8e-5, what=impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_holds_at_every_cap(impl):
    """c tanh(x / c) to float32 rounding for caps from 1 to 1e8, where x / c is tiny and
    (1 - e) / (1 + e) would cancel."""
    q, k, v = _qkv((1,), 16, 64, 2, 2, 32)
    for cap in [1.0, 1e4, 1e6, 1e8]:
        got = jattn.attention(q, k, v, softcap=cap, implementation=impl)
        with jax.enable_x64():
            want = jattn.attention(
                *(x.astype(jnp.float64) for x in (q, k, v)), softcap=cap, implementation="reference"
            )
        H.assert_close(got, want, 2e-6, what=f"{impl} cap {cap}")


def test_a_softcap_float32_loses_is_refused():
    q, k, v = _qkv((1,), 4, 4, 1, 1, 8)
    with pytest.raises(ValueError, match="softcap=1e-39 is below float32"):
        jattn.attention(q, k, v, softcap=1e-39)


@pytest.mark.parametrize("impl", IMPLS)
def test_dropout_draws_one_pattern_from_the_python_rate(impl):
    """A rate that float32 does not hold exactly (0.5 + 1.5 * 2**-24) gives every kernel the
    pattern the reference draws from the Python float."""
    if not _supports(impl, "dropout"):
        pytest.skip(f"{impl} has no dropout")
    q, k, v = _qkv((1,), 256, 256, 1, 1, 16)
    kw = dict(dropout_rate=0.5 + 1.5 * 2**-24, dropout_rng=jax.random.key(1))
    got = jattn.attention(q, k, v, implementation=impl, **kw)
    want = jattn.attention(q, k, v, implementation="reference", **kw)
    H.assert_close(got, want, 2e-5, what=impl)


def _against_float64(impl, args, kw, argnums, cotangent_key=4):
    """The output, lse and the gradients of (out * dO).sum() with respect to ``args[i]`` for
    ``i`` in ``argnums``, from ``impl`` and from the float64 reference, each as a list."""
    do = H.normal(jax.random.key(cotangent_key), args[0].shape[:-1] + (args[2].shape[-1],))

    def run(impl, args, do):
        def f(*a):
            out, lse = jattn.attention(*a, implementation=impl, return_lse=True, **kw)
            return jnp.sum(out * do), (out, lse)

        grads, (out, lse) = jax.grad(f, argnums=argnums, has_aux=True)(*args)
        return [out, lse, *grads]

    got = run(impl, args, do)
    with jax.enable_x64():
        want = run("reference", [x.astype(jnp.float64) for x in args], do.astype(jnp.float64))
        want = [np.asarray(w) for w in want]
    return got, want


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_a_finite_bias_however_negative_is_a_bias(impl, causal):
    """Biases beyond +-2.4e38, where bias * log2(e) overflows float32, are biases, not masks:
    a row whose every bias is float32's most negative value averages its values (as the
    reference and jax.nn do); rows of such biases keep their order (-1.7e38 beats -3.1e38),
    and one key at bias 0, or a bias of +3.4e38, wins. Output, lse and the gradients of q,
    k, v and the bias against the float64 reference (item 3 of issue 27)."""
    if not _supports(impl, "bias"):
        pytest.skip(f"{impl} takes no bias")
    q, k, v = _qkv((2,), 6, 300, 4, 2, 16)
    fmin = float(np.finfo(np.float32).min)
    bias = H.normal(jax.random.key(5), (2, 4, 6, 300))
    bias = bias.at[:, :, 0].set(fmin)
    bias = bias.at[:, :, 1, :50].set(fmin * 0.5).at[:, :, 1, 50:].set(fmin * 0.9)
    bias = bias.at[:, :, 2].set(fmin).at[:, :, 2, 123].set(0.0)
    bias = bias.at[:, :, 3].set(-fmin).at[:, :, 3, 7].set(-fmin * 0.99)
    bias = bias.at[:, :, 4].set(fmin * 0.7)
    got, want = _against_float64(impl, [q, k, v, bias], dict(is_causal=causal), (0, 1, 2, 3))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv", "dbias"], got, want, strict=True):
        a = np.asarray(a, np.float64)
        assert np.isfinite(a).all(), name
        scale = np.abs(b[np.isfinite(b)]).max() if name == "lse" else np.abs(b).max()
        np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=1e-5, err_msg=f"{impl} {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_values_near_float32s_largest_stay_finite(impl, causal):
    """Values of 1e37 over 300 keys: every output row is a weighted mean of values, finite,
    though an unnormalised sum of them overflows float32 (item 4 of issue 27). Output, lse
    and gradients against the float64 reference, relative to their largest entry."""
    q, k, v = _qkv((2,), 40, 300, 4, 2, 16)
    v = jnp.where(v > -0.5, 1e37, -2e37) * (1 + 0.1 * v)
    got, want = _against_float64(impl, [q, k, v], dict(is_causal=causal), (0, 1, 2))
    for name, a, b in zip(["out", "lse", "dq", "dk", "dv"], got, want, strict=True):
        H.assert_close(a, b, 2e-6 * np.abs(b).max(), 0.0, what=f"{impl} {name}")
