"""The shared suite: written once, run against every implementation in the registry.

Each implementation is compared with the float64 reference, forward and gradients, on random
inputs and random mask combinations. A feature an implementation lacks must raise
NotImplementedError naming it; the suite checks that instead of skipping.

The reference always runs on the host CPU (``H.oracle``, ``H.on_host``). With ``--impls NAMES``
(tests/conftest.py) the suite is the device check that ``python -m bench device`` runs: the named
implementations only, at their default configs, on JAX's default backend, float16 gradients
too and sequences up to 4k in ``test_long_sequences``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn.plan import make_plan
from tests import helpers as H


@pytest.fixture(params=H.variants(), ids=str, scope="module")
def impl(request) -> H.Variant:
    return request.param


def _supports(impl, feature: str) -> bool:
    return not jattn.kernels.REGISTRY[impl.name].missing([feature])


def _check_or_raises(impl, features, fn):
    """Runs ``fn`` if ``impl`` supports ``features``, else checks it raises naming them."""
    missing = jattn.kernels.REGISTRY[impl.name].missing(features)
    if missing:
        with pytest.raises(NotImplementedError, match=missing[0]):
            fn()
        return False
    fn()
    return True


# ---------------------------------------------------------------------------------------------
# The oracle itself, against an independent numpy implementation.


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_numpy(causal):
    q, k, v, b = H.random_qkv(jax.random.key(0), (2,), 5, 7, 4, 2, 8, bias=True)
    q, k, v, b = (x.astype(jnp.float64) for x in (q, k, v, b))
    out = jattn.attention(q, k, v, b, is_causal=causal, softcap=3.0, implementation="reference")
    dense = H.brute_force_mask((2,), 4, 5, 7, is_causal=causal)
    want = H.numpy_attention(q, k, v, b, dense, 1 / np.sqrt(8), softcap=3.0)
    H.assert_close(out, want, 1e-12)


# ---------------------------------------------------------------------------------------------
# Forward and gradients on random inputs.

SHAPES = [
    # batch, T, S, N, K, H
    ((), 1, 1, 1, 1, 8),
    ((2,), 7, 7, 4, 4, 16),
    ((2,), 7, 129, 4, 2, 32),  # GQA, odd lengths past a block size
    ((1, 2), 129, 7, 2, 1, 8),  # two batch dims, MQA, T > S
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_f32(impl, shape, causal):
    batch, t, s, n, kh, h = shape
    if impl.slow:
        # Emulated kernels trace every block: keep the shape's oddness, not its length.
        t, s = min(t, 37), min(s, 37)
    q, k, v, b = H.random_qkv(
        jax.random.key(1), batch, t, s, n, kh, h, bias=_supports(impl, "bias")
    )
    kw = dict(is_causal=causal)
    out = jattn.attention(q, k, v, b, **impl.kw, **kw)
    assert out.dtype == jnp.float32 and out.shape == q.shape
    H.assert_close(out, H.oracle(q, k, v, b, **kw), H.tol(jnp.float32)[0], what=impl)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_forward_low_precision(impl, dtype):
    q, k, v, _ = H.random_qkv(jax.random.key(2), (2,), 33, 65, 4, 2, 32, dtype=dtype)
    out = jattn.attention(q, k, v, is_causal=True, **impl.kw)
    assert out.dtype == dtype
    H.assert_close(out, H.oracle(q, k, v, is_causal=True), H.tol(dtype)[0], what=impl)


GRAD_DTYPES = [jnp.float32, jnp.bfloat16] + ([jnp.float16] if H.DEVICE_RUN else [])


@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients(impl, dtype, causal):
    q, k, v, b = H.random_qkv(
        jax.random.key(3), (2,), 17, 33, 4, 2, 16, dtype=dtype, bias=_supports(impl, "bias")
    )
    # Lengths make some rows empty: their gradients must be exactly zero, not NaN.
    kw = dict(
        is_causal=causal,
        key_value_seq_lengths=jnp.array([33, 20], jnp.int32),
        query_seq_lengths=jnp.array([17, 11], jnp.int32),
    )
    ct = H.normal(jax.random.key(4), q.shape)

    def loss(impl_name, cast):
        def f(q, k, v, b):
            b = None if b is None else cast(b)
            o = jattn.attention(cast(q), cast(k), cast(v), b, **H.impl_kw(impl_name), **kw)
            return jnp.sum(o.astype(jnp.float32 if cast is None else o.dtype) * ct)

        return f

    argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)
    got = jax.grad(loss(impl, lambda x: x), argnums=argnums)(q, k, v, b)
    with H.on_host():
        want = jax.grad(loss("reference", H.to_host64), argnums=argnums)(q, k, v, b)
    gtol = H.tol(dtype)[1]
    for name, g, w in zip("qkvb"[: len(argnums)], got, want, strict=True):
        assert g.dtype == dtype
        scale = float(jnp.max(jnp.abs(w.astype(jnp.float64)))) + 1e-6
        H.assert_close(g / scale, w / scale, gtol, what=f"{impl} d{name}")
    # Padded query rows contribute nothing and get no gradient.
    assert not np.any(np.asarray(got[0][1, 11:], np.float32))


def test_jit_and_no_jit_agree(impl):
    q, k, v, _ = H.random_qkv(jax.random.key(5), (2,), 9, 12, 2, 1, 8)
    f = lambda q, k, v: jattn.attention(q, k, v, is_causal=True, **impl.kw)  # noqa
    np.testing.assert_allclose(f(q, k, v), jax.jit(f)(q, k, v), atol=1e-6)


def test_value_head_dim(impl):
    q, k, v, _ = H.random_qkv(jax.random.key(6), (1,), 6, 10, 2, 2, 8, hv=12)

    def run():
        out = jattn.attention(q, k, v, **impl.kw)
        assert out.shape == (1, 6, 2, 12)
        H.assert_close(out, H.oracle(q, k, v), H.tol(jnp.float32)[0])

    _check_or_raises(impl, ["value_head_dim"], run)


def test_values_inside_the_keys(impl):
    """``value=None, value_dim=d``: the values are each key's first d features (MLA's latent
    cache). The same numbers and gradients as passing that slice, against the float64
    reference, with GQA and a causal mask."""
    q, k, _, _ = H.random_qkv(jax.random.key(7), (2,), 5, 11, 4, 2, 12)
    kw = dict(is_causal=True, **impl.kw)

    def run():
        out = jattn.attention(q, k, None, value_dim=5, **kw)
        assert out.shape == (2, 5, 4, 5)
        H.assert_close(out, H.oracle(q, k, k[..., :5], is_causal=True), H.tol(jnp.float32)[0])
        ct = H.normal(jax.random.key(8), out.shape)
        g_in = jax.grad(lambda q, k: jnp.sum(jattn.attention(q, k, None, value_dim=5, **kw) * ct),
                        argnums=(0, 1))(q, k)  # fmt: skip
        g_cut = jax.grad(lambda q, k: jnp.sum(jattn.attention(q, k, k[..., :5], **kw) * ct),
                         argnums=(0, 1))(q, k)  # fmt: skip
        for name, a, b in zip("qk", g_in, g_cut, strict=True):
            H.assert_close(a, b, 1e-6, what=f"d{name}")

    _check_or_raises(impl, ["value_head_dim"], run)


# Longer calls, forward and gradients against the float64 reference: on the device check at
# their full lengths (up to 4k, some not a multiple of any block size), here at a sixteenth.
_LONG = {
    # name: (batch, T = S, N, K, H, dtype, mask choices as in H.mask_kwargs, softcap)
    "bf16_causal_gqa_lengths": ((1,), 4096, 4, 2, 128, jnp.bfloat16, dict(causal=True), None),
    "f16_window_lengths": ((2,), 4093, 4, 1, 64, jnp.float16, dict(window=(256, 0)), None),
    "bf16_segments_softcap": ((1,), 2048, 4, 2, 64, jnp.bfloat16, dict(segments=True), 20.0),
    "f32_causal": ((1,), 2050, 2, 2, 64, jnp.float32, dict(causal=True, lengths=True), None),
}


@pytest.mark.parametrize("name", list(_LONG))
def test_long_sequences(impl, name):
    batch, t, n, kh, h, dtype, choices, softcap = _LONG[name]
    if H.DEVICE_RUN is None:
        if impl.slow or impl.every > 1:
            pytest.skip("long calls: default configs of native kernels only, off the device check")
        t = t // 16 + 3
    q, k, v, _ = H.random_qkv(jax.random.key(40), batch, t, t, n, kh, h, dtype=dtype)
    choices = {"lengths": name.endswith("lengths"), **choices}
    kw, _ = H.mask_kwargs(np.random.default_rng(40), batch, n, t, t, choices)
    if softcap is not None:
        kw["softcap"] = softcap
    features = sorted(make_plan(q, k, v, **kw)[0].features)
    ct = H.normal(jax.random.key(41), q.shape)

    def loss(impl_kw, cast):
        def f(q, k, v):
            o = jattn.attention(cast(q), cast(k), cast(v), **kw, **impl_kw)
            return jnp.sum(o.astype(jnp.float32 if o.dtype != jnp.float64 else o.dtype) * ct)

        return f

    def run():
        out = jattn.attention(q, k, v, **kw, **impl.kw)
        assert out.dtype == dtype and out.shape == q.shape
        what = f"{impl} {name} T={t}"
        H.assert_close(out, H.oracle(q, k, v, **kw), H.tol(dtype)[0], what=what)
        got = jax.grad(loss(impl.kw, lambda x: x), argnums=(0, 1, 2))(q, k, v)
        with H.on_host():
            want = jax.grad(loss(H.impl_kw("reference"), H.to_host64), argnums=(0, 1, 2))(q, k, v)
        for g_name, g, w in zip("qkv", got, want, strict=True):
            assert g.dtype == dtype
            scale = float(jnp.max(jnp.abs(w))) + 1e-6
            H.assert_close(g / scale, w / scale, H.tol(dtype)[1], what=f"{what} d{g_name}")

    _check_or_raises(impl, features, run)


def test_oracle_runs_on_host():
    """The float64 reference is computed on the host CPU whatever the default backend."""
    q, k, v, _ = H.random_qkv(jax.random.key(42), (1,), 5, 6, 2, 1, 8)
    out = H.oracle(q, k, v, is_causal=True)
    assert out.dtype == jnp.float64
    assert {d.platform for d in out.devices()} == {"cpu"}
    with H.on_host():
        g = jax.grad(lambda q: jnp.sum(H.oracle(q, k, v)))(q)
    assert g.dtype == jnp.float32 and {d.platform for d in g.devices()} == {"cpu"}


# ---------------------------------------------------------------------------------------------
# Masks: random combinations against a brute-force dense mask.


@st.composite
def mask_calls(draw):
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    t = draw(st.integers(1, 19))
    s = draw(st.integers(1, 19))
    kh = draw(st.sampled_from([1, 2]))
    n = kh * draw(st.sampled_from([1, 2]))
    h = draw(st.sampled_from([4, 8]))
    self_attn = t == s
    choices = dict(
        causal=draw(st.booleans()),
        window=draw(
            st.none() | st.integers(0, 4) | st.tuples(st.integers(0, 4), st.integers(0, 4))
        ),
        chunk=draw(st.none() | st.integers(1, 8)),
        lengths=draw(st.booleans()),
        segments=draw(st.booleans()) and (self_attn or draw(st.booleans())),
        dense=draw(st.booleans()),
        bias=draw(st.booleans()),
        softcap=draw(st.none() | st.just(2.5)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    return batch, t, s, n, kh, h, choices, seed


# The mask_calls choices and the features they need.
_CHOICE_FEATURES = {
    "causal": "causal",
    "window": "local_window",
    "chunk": "chunked",
    "lengths": "lengths",
    "segments": "segments",
    "dense": "dense_mask",
    "bias": "bias",
    "softcap": "softcap",
}


_OFF = {
    "window": None,
    "chunk": None,
    "softcap": None,
}  # the value of a choice left out (else False)


def _fit(impl, case):
    """``case`` without the choices ``impl`` does not support (test_features_raise_or_match
    checks that those raise), or None when the variant runs only one case in ``every``."""
    batch, t, s, n, kh, h, choices, seed = case
    if seed % impl.every:
        return None
    choices = {
        c: v if _supports(impl, _CHOICE_FEATURES[c]) else _OFF.get(c, False)
        for c, v in choices.items()
    }
    return batch, t, s, n, kh, h, choices, seed


def _build_call(batch, t, s, n, kh, h, choices, seed) -> H.Call:
    rng = np.random.default_rng(seed)
    q, k, v, b = H.random_qkv(jax.random.key(seed), batch, t, s, n, kh, h, bias=choices["bias"])
    kw, bf = H.mask_kwargs(rng, batch, n, t, s, choices)
    if choices["softcap"] is not None:
        kw["softcap"] = choices["softcap"]
    dense = H.brute_force_mask(batch, n, t, s, **bf)
    return H.Call(q, k, v, b, kw, dense)


@given(mask_calls())
def test_random_masks(impl, case):
    if (case := _fit(impl, case)) is None:
        return
    call = _build_call(*case)
    kw = call.kwargs
    want = H.oracle(
        call.q, call.k, call.v, call.bias, mask=jnp.asarray(call.dense), softcap=kw.get("softcap")
    )
    got = call.run(impl)
    H.assert_close(got, want, H.tol(jnp.float32)[0], what=f"{impl} {sorted(kw)}")
    # Rows with no visible key are exactly zero.
    empty = ~call.dense.any(-1)  # [*B, N, T]
    got_rows = np.moveaxis(np.asarray(got), -2, -3)  # [*B, N, T, H]
    assert not got_rows[empty].any()


@settings(max_examples=10)
@given(mask_calls())
def test_random_masks_gradients(impl, case):
    if (case := _fit(impl, case)) is None:
        return
    call = _build_call(*case)
    ct = H.normal(jax.random.key(7), call.q.shape)

    def grads(impl_name, cast, **kw):
        def f(q, k, v):
            return jnp.sum(
                jattn.attention(cast(q), cast(k), cast(v), **H.impl_kw(impl_name), **kw) * ct
            )

        return jax.grad(f, argnums=(0, 1, 2))(call.q, call.k, call.v)

    mask_only = {k: v for k, v in call.kwargs.items() if k != "softcap"}
    got = grads(impl, lambda x: x, softcap=call.kwargs.get("softcap"), **mask_only)
    with H.on_host():
        want = grads(
            "reference",
            H.to_host64,
            mask=jnp.asarray(call.dense),
            softcap=call.kwargs.get("softcap"),
        )
    for g, w in zip(got, want, strict=True):
        H.assert_close(g, w, 1e-4, what=impl)


@pytest.mark.parametrize("feature", ["bias", "dense_mask", "softcap"])
def test_features_raise_or_match(impl, feature):
    q, k, v, b = H.random_qkv(jax.random.key(16), (2,), 5, 6, 2, 1, 8, bias=True)
    dense = jnp.asarray(np.random.default_rng(0).random((2, 2, 5, 6)) < 0.7)
    kw = {"bias": dict(bias=b), "dense_mask": dict(mask=dense), "softcap": dict(softcap=1.5)}
    kw = kw[feature]

    def run():
        got = jattn.attention(q, k, v, **kw, **impl.kw)
        H.assert_close(got, H.oracle(q, k, v, **kw), H.tol(jnp.float32)[0], what=feature)

    _check_or_raises(impl, [feature], run)


@pytest.mark.parametrize("name", list(H.cases_mask_objects()))
def test_mask_objects(impl, name):
    mask, fn = H.cases_mask_objects()[name]
    t, s = 11, 13
    q, k, v, _ = H.random_qkv(jax.random.key(8), (2,), t, s, 2, 2, 8)
    dense = np.array([[fn(i, j) for j in range(s)] for i in range(t)])

    def run():
        got = jattn.attention(q, k, v, mask=mask, **impl.kw)
        want = H.oracle(q, k, v, mask=jnp.asarray(dense))
        H.assert_close(got, want, H.tol(jnp.float32)[0], what=name)

    _check_or_raises(impl, mask.features, run)


def test_fully_masked_rows(impl):
    q, k, v, b = H.random_qkv(jax.random.key(9), (2,), 6, 8, 2, 2, 8, bias=True)
    mask = np.ones((2, 2, 6, 8), bool)
    mask[0, :, 2] = False  # one empty row for every head
    mask[1] = False  # a wholly empty batch element
    mask = jnp.asarray(mask)
    kw = dict(mask=mask)
    if not (_supports(impl, "dense_mask") and _supports(impl, "bias")):
        # The same empty rows from segment ids and lengths, without a bias.
        b = None
        q_ids = jnp.array([[0, 0, 1, 0, 0, 0], [0] * 6], jnp.int32)
        kv_ids = jnp.zeros((2, 8), jnp.int32)
        kw = dict(segment_ids=(q_ids, kv_ids), key_value_seq_lengths=jnp.array([8, 0]))
    argnums = (0, 1, 2) if b is None else (0, 1, 2, 3)

    def f(q, k, v, b):
        return jattn.attention(q, k, v, b, **kw, **impl.kw)

    out = f(q, k, v, b)
    assert not np.asarray(out[0, 2]).any() and not np.asarray(out[1]).any()
    H.assert_close(out, H.oracle(q, k, v, b, mask=mask), H.tol(jnp.float32)[0])
    grads = jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=argnums)(q, k, v, b)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert not np.asarray(grads[0][1]).any() and not np.asarray(grads[-1][1]).any()
    assert not np.asarray(grads[0][0, 2]).any()


# ---------------------------------------------------------------------------------------------
# Extras: weights, log-sum-exp, dropout.


def test_return_weights(impl):
    q, k, v, _ = H.random_qkv(jax.random.key(10), (2,), 5, 9, 4, 2, 8)

    def run():
        out, w = jattn.attention(q, k, v, is_causal=True, return_weights=True, **impl.kw)
        _, w_ref = H.oracle(q, k, v, is_causal=True, return_weights=True)
        assert w.shape == (2, 4, 5, 9)
        H.assert_close(w, w_ref, 1e-5)
        H.assert_close(w.sum(-1), np.ones((2, 4, 5)), 1e-5)

    _check_or_raises(impl, ["return_weights"], run)


def test_return_lse(impl):
    q, k, v, b = H.random_qkv(
        jax.random.key(11), (2,), 7, 10, 2, 1, 8, bias=_supports(impl, "bias")
    )
    kvl = jnp.array([10, 0], jnp.int32)

    def run():
        _, lse = jattn.attention(q, k, v, b, key_value_seq_lengths=kvl, return_lse=True, **impl.kw)
        logits = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
        logits = logits if b is None else logits + b
        want = jax.nn.logsumexp(logits, axis=-1)
        assert lse.shape == (2, 2, 7) and lse.dtype == jnp.float32
        H.assert_close(lse[0], want[0], 1e-5)
        assert np.all(np.isneginf(np.asarray(lse[1])))  # no visible key: log(0)

    _check_or_raises(impl, ["return_lse"], run)


def test_lse_merges_key_blocks(impl):
    """Attention over [K1; K2] equals the lse-weighted merge of attention over each half."""
    q, k, v, _ = H.random_qkv(jax.random.key(12), (1,), 6, 16, 2, 2, 8)

    def run():
        o1, l1 = jattn.attention(q, k[:, :8], v[:, :8], return_lse=True, **impl.kw)
        o2, l2 = jattn.attention(q, k[:, 8:], v[:, 8:], return_lse=True, **impl.kw)
        lse = jnp.logaddexp(l1, l2)
        w1 = jnp.exp(l1 - lse).transpose(0, 2, 1)[..., None]
        w2 = jnp.exp(l2 - lse).transpose(0, 2, 1)[..., None]
        H.assert_close(w1 * o1 + w2 * o2, H.oracle(q, k, v), 1e-5)

    _check_or_raises(impl, ["return_lse"], run)


def test_dropout(impl):
    q, k, v, _ = H.random_qkv(jax.random.key(13), (2,), 16, 24, 2, 2, 8)
    key = jax.random.key(14)

    def run():
        f = lambda rate, key: jattn.attention(  # noqa: E731
            q, k, v, is_causal=True, dropout_rate=rate, dropout_rng=key, **impl.kw
        )
        out = f(0.25, key)
        # The pattern is a function of key and positions: every implementation agrees.
        ref = H.oracle(q, k, v, is_causal=True, dropout_rate=0.25, dropout_rng=key)
        H.assert_close(out, ref, 1e-5)
        np.testing.assert_array_equal(out, f(0.25, key))  # reproducible
        assert not np.allclose(out, f(0.25, jax.random.key(15)))  # and key dependent
        assert not np.allclose(out, f(0.0, key))

        # Gradients agree with the reference under the same pattern.
        def loss(q, impl_name, cast):
            return jnp.sum(
                jattn.attention(
                    cast(q),
                    cast(k),
                    cast(v),
                    dropout_rate=0.25,
                    dropout_rng=key,
                    **H.impl_kw(impl_name),
                )
            )

        g = jax.grad(loss)(q, impl, lambda x: x)
        with H.on_host():
            g_ref = jax.grad(loss)(q, "reference", H.to_host64)
        H.assert_close(g, g_ref, 1e-4)

    _check_or_raises(impl, ["dropout"], run)


# ---------------------------------------------------------------------------------------------
# Attention sinks: one logit per head in each row's denominator, without a value.


def test_reference_sinks_match_numpy():
    q, k, v, b = H.random_qkv(jax.random.key(30), (2,), 5, 7, 4, 2, 8, bias=True)
    q, k, v, b = (x.astype(jnp.float64) for x in (q, k, v, b))
    sinks = jnp.array([[0.3, -1.0, 2.5, -jnp.inf], [1.0, 0.0, -0.5, 4.0]], jnp.float64)
    kvl = jnp.array([7, 0])
    out = jattn.attention(
        q,
        k,
        v,
        b,
        is_causal=True,
        key_value_seq_lengths=kvl,
        sinks=sinks,
        implementation="reference",
    )
    dense = H.brute_force_mask((2,), 4, 5, 7, is_causal=True, kv_lengths=np.array([7, 0]))
    want = H.numpy_attention(q, k, v, b, dense, 1 / np.sqrt(8), sinks=sinks)
    H.assert_close(out, want, 1e-12)


_SINK_CASES = {
    # name: (batch, T, S, N, K, H, attention keywords); sinks drawn per head
    "gqa_causal_lengths": ((2,), 9, 12, 4, 2, 8, dict(is_causal=True, lengths=True)),
    "window_segments": ((1,), 13, 13, 2, 1, 16, dict(local_window_size=(3, 1), segments=True)),
    "bias_softcap": ((2,), 6, 10, 2, 2, 8, dict(bias=True, softcap=2.0)),
    "chunked": ((1,), 16, 16, 2, 2, 8, dict(chunk=4)),
}


def _sink_call(name: str, dtype=jnp.float32):
    batch, t, s, n, kh, h, opts = _SINK_CASES[name]
    opts = dict(opts)
    q, k, v, b = H.random_qkv(
        jax.random.key(31), batch, t, s, n, kh, h, dtype=dtype, bias=opts.pop("bias", False)
    )
    rng = np.random.default_rng(3)
    sinks = jnp.asarray(rng.normal(size=(*batch, n)) * 2, jnp.float32)
    kw, bf = {}, {}
    if opts.pop("lengths", False):
        kvl = np.array([s, 0] if batch == (2,) else [s // 2])  # an empty batch element
        kw["key_value_seq_lengths"], bf["kv_lengths"] = jnp.asarray(kvl), kvl
    if opts.pop("segments", False):
        ids = np.sort(rng.integers(0, 3, size=(*batch, t))).astype(np.int32)
        kw["segment_ids"], bf["q_seg"], bf["kv_seg"] = jnp.asarray(ids), ids, ids
    if (c := opts.pop("chunk", None)) is not None:
        kw["mask"], bf["chunk"] = jattn.masks.Chunked(c), c
    if opts.get("is_causal"):
        bf["is_causal"] = True
    if "local_window_size" in opts:
        bf["window"] = opts["local_window_size"]
    kw.update(opts)
    dense = H.brute_force_mask(batch, n, t, s, **bf)
    return q, k, v, b, sinks, kw, dense


@pytest.mark.parametrize("name", list(_SINK_CASES))
def test_sinks(impl, name):
    """Forward against the float64 formula, gradients of q, k, v, bias and the sinks against
    the float64 reference, and a sink of -inf gives the no-sink result bit for bit."""
    q, k, v, b, sinks, kw, dense = _sink_call(name)
    features = ["sinks"] + (["bias"] if b is not None else [])
    features += ["softcap"] if "softcap" in kw else []
    features += ["chunked"] if "mask" in kw else []

    def run():
        out = jattn.attention(q, k, v, b, sinks=sinks, **kw, **impl.kw)
        want = H.numpy_attention(
            q, k, v, b, dense, 1 / np.sqrt(q.shape[-1]), kw.get("softcap"), sinks=sinks
        )
        H.assert_close(out, want, H.tol(jnp.float32)[0], what=f"{impl} {name}")

        ct = H.normal(jax.random.key(32), out.shape)
        argnums = (0, 1, 2, 3, 4) if b is not None else (0, 1, 2, 4)

        def grads(impl_kw, cast):
            def f(q, k, v, b, s):
                o, lse = jattn.attention(
                    cast(q),
                    cast(k),
                    cast(v),
                    None if b is None else cast(b),
                    sinks=cast(s),
                    return_lse=True,
                    **kw,
                    **impl_kw,
                )
                # Both results reach the loss: the lse cotangent is part of the contract.
                return jnp.sum(o * ct) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0) * 0.1)

            return jax.grad(f, argnums=argnums)(q, k, v, b, sinks)

        got = grads(impl.kw, lambda x: x)
        with H.on_host():
            ref = grads({"implementation": "reference"}, H.to_host64)
        for g, r in zip(got, ref, strict=True):
            H.assert_close(g, r, 1e-4, what=f"{impl} {name} grad")

        off = jnp.full_like(sinks, -jnp.inf)
        np.testing.assert_array_equal(
            jattn.attention(q, k, v, b, sinks=off, **kw, **impl.kw),
            jattn.attention(q, k, v, b, **kw, **impl.kw),
        )

    _check_or_raises(impl, features, run)


def test_sinks_low_precision_and_weights(impl):
    q, k, v, b, sinks, kw, dense = _sink_call("gqa_causal_lengths", jnp.bfloat16)

    def run():
        out = jattn.attention(q, k, v, sinks=sinks, **kw, **impl.kw)
        assert out.dtype == jnp.bfloat16
        want = H.numpy_attention(q, k, v, None, dense, 1 / np.sqrt(8), sinks=sinks)
        H.assert_close(out, want, H.tol(jnp.bfloat16)[0], what=str(impl))

    _check_or_raises(impl, ["sinks"], run)
    if not _supports(impl, "return_weights"):
        return
    q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    _, w = jattn.attention(q, k, v, sinks=sinks, return_weights=True, **kw, **impl.kw)
    _, w0 = jattn.attention(q, k, v, return_weights=True, **kw, **impl.kw)
    rows = np.asarray(w.sum(-1))
    assert (rows < 1.0).all()  # the sink takes a share of every row
    # Each row is the no-sink row scaled by 1 / (1 + exp(s - lse)).
    _, lse0 = jattn.attention(q, k, v, return_lse=True, **kw, **impl.kw)
    share = 1.0 / (1.0 + np.exp(np.asarray(sinks)[..., None] - np.asarray(lse0)))
    H.assert_close(w, np.asarray(w0) * np.nan_to_num(share)[..., None], 1e-5)


def test_sinks_fully_masked_rows_and_dropout(impl):
    """A row with no visible key stays zero with lse = sink, zero gradients for its q and the
    values; dropout draws the same pattern with and without sinks."""
    q, k, v, _ = H.random_qkv(jax.random.key(33), (2,), 6, 8, 2, 2, 8)
    sinks = jnp.array([[0.5, -2.0], [1.5, 0.0]])
    kvl = jnp.array([8, 0])

    def run():
        out, lse = jattn.attention(
            q, k, v, key_value_seq_lengths=kvl, sinks=sinks, return_lse=True, **impl.kw
        )
        assert not np.asarray(out[1]).any()
        np.testing.assert_allclose(lse[1], np.broadcast_to(sinks[1][:, None], (2, 6)))

        def loss(q, v, s):
            return jnp.sum(
                jattn.attention(q, k, v, key_value_seq_lengths=kvl, sinks=s, **impl.kw) ** 2
            )

        gq, gv, gs = jax.grad(loss, argnums=(0, 1, 2))(q, v, sinks)
        assert not np.asarray(gq[1]).any() and not np.asarray(gv[1]).any()
        assert not np.asarray(gs[1]).any() and np.asarray(gs[0]).all()

    _check_or_raises(impl, ["sinks", "lengths"], run)

    def run_dropout():
        key = jax.random.key(34)
        f = lambda impl_kw, cast: jattn.attention(  # noqa: E731
            cast(q),
            cast(k),
            cast(v),
            sinks=cast(sinks),
            is_causal=True,
            dropout_rate=0.25,
            dropout_rng=key,
            **impl_kw,
        )
        with H.on_host():
            ref = f({"implementation": "reference"}, H.to_host64)
        H.assert_close(f(impl.kw, lambda x: x), ref, 1e-5)

    _check_or_raises(impl, ["sinks", "dropout"], run_dropout)


def test_dropout_keeps_expected_fraction():
    from jattn import _dropout

    seed = _dropout.head_seed(_dropout.seed_from_key(jax.random.key(0)), jnp.uint32(3))
    keep = _dropout.keep_mask(seed, jnp.arange(512), jnp.arange(512), 0.3)
    frac = float(keep.mean())
    assert abs(frac - 0.7) < 0.01, frac
    # Rows and columns are not trivially correlated.
    assert float(jnp.abs(keep[:-1].mean(1) - keep[1:].mean(1)).max()) < 0.2
