"""The public function: parity with jax.nn, argument validation, implementation choice."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jattn
from jattn import masks
from tests import helpers as H


def test_public_names():
    assert sorted(jattn.__all__) == [
        "attention",
        "kernels",
        "masked_softmax",
        "masks",
        "nn",
        "optim",
        "parallel",
        "plan",
    ]
    for name in jattn.__all__:
        assert hasattr(jattn, name)
    assert {"reference", "fused", "flash"} <= set(jattn.kernels.REGISTRY)
    assert {"Causal", "LocalWindow", "Lengths", "Segments", "Dense"} <= set(masks.__all__)


# ---------------------------------------------------------------------------------------------
# Parity with jax.nn.dot_product_attention on random calls it accepts.


@st.composite
def jax_nn_calls(draw):
    b = draw(st.integers(1, 2))
    t, s = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    kh = draw(st.sampled_from([1, 2]))
    n = kh * draw(st.sampled_from([1, 3]))
    h = draw(st.sampled_from([8, 12, 16]))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    kw = {}
    if draw(st.booleans()):
        kw["is_causal"] = True
    if draw(st.booleans()):
        kw["local_window_size"] = draw(
            st.integers(0, 5) | st.tuples(st.integers(0, 5), st.integers(0, 5))
        )
    if draw(st.booleans()):
        kw["key_value_seq_lengths"] = jnp.asarray(rng.integers(1, s + 1, b), jnp.int32)
    if draw(st.booleans()):
        kw["query_seq_lengths"] = jnp.asarray(rng.integers(1, t + 1, b), jnp.int32)
    if draw(st.booleans()):
        mshape = draw(st.sampled_from([(b, n, t, s), (b, 1, t, s), (1, 1, t, s), (1, 1, 1, s)]))
        kw["mask"] = jnp.asarray(rng.random(mshape) < 0.8)
    if draw(st.booleans()):
        bshape = draw(st.sampled_from([(b, n, t, s), (1, n, 1, s), (1, 1, t, s)]))
        kw["bias"] = jnp.asarray(rng.normal(size=bshape), jnp.float32)
    if draw(st.booleans()):
        kw["scale"] = draw(st.floats(0.05, 1.0))
    if draw(st.booleans()):
        kw["return_residual"] = True
    return (b, t, s, n, kh, h, seed), kw


@settings(max_examples=10)
@given(jax_nn_calls())
def test_parity_with_jax_nn(case):
    (b, t, s, n, kh, h, seed), kw = case
    q, k, v, _ = H.random_qkv(jax.random.key(seed), (b,), t, s, n, kh, h)
    want = jax.nn.dot_product_attention(q, k, v, **kw)
    # Rows with no visible key differ by design (jax.nn averages them; we return zeros).
    bias = kw.pop("bias", None)
    mask = kw.pop("mask", None)
    dense = H.brute_force_mask(
        (b,),
        n,
        t,
        s,
        is_causal=kw.get("is_causal", False),
        window=_pair(kw.get("local_window_size")),
        q_lengths=None if "query_seq_lengths" not in kw else np.asarray(kw["query_seq_lengths"]),
        kv_lengths=(
            None if "key_value_seq_lengths" not in kw else np.asarray(kw["key_value_seq_lengths"])
        ),
        dense=None if mask is None else np.asarray(mask),
    )
    live = np.moveaxis(dense.any(-1), -2, -1)  # [B, T, N]
    for impl in (None, *(n for n in jattn.kernels.REGISTRY if n in jattn.kernels.available())):
        got = jattn.attention(q, k, v, bias, mask, implementation=impl, **kw)
        if kw.get("return_residual"):
            (got, res), (want_out, want_res) = got, want
            assert res.shape == want_res.shape == (b, t, n) and res.dtype == want_res.dtype
            np.testing.assert_allclose(
                np.asarray(res)[live], np.asarray(want_res)[live], atol=2e-5, rtol=2e-5
            )
            assert np.isneginf(np.asarray(res)[~live]).all()
        else:
            want_out = want
        np.testing.assert_allclose(
            np.asarray(got)[live], np.asarray(want_out)[live], atol=2e-5, rtol=2e-5, err_msg=impl
        )
        assert not np.asarray(got)[~live].any()


def _pair(w):
    return None if w is None else ((w, w) if isinstance(w, int) else w)


def test_unbatched_input_like_jax_nn():
    q, k, v, _ = H.random_qkv(jax.random.key(0), (), 5, 6, 2, 2, 8)
    got = jattn.attention(q, k, v, is_causal=True)
    want = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    assert got.shape == (5, 2, 8)
    np.testing.assert_allclose(got, want, atol=1e-6)
    (_, res), (_, want_res) = (
        f(q, k, v, is_causal=True, return_residual=True)
        for f in (jattn.attention, jax.nn.dot_product_attention)
    )
    assert res.shape == want_res.shape == (5, 2)
    np.testing.assert_allclose(res, want_res, atol=1e-6)


def test_residual_comes_last_and_carries_gradients():
    q, k, v, _ = H.random_qkv(jax.random.key(3), (2,), 6, 9, 4, 2, 8, dtype=jnp.bfloat16)
    out, w, lse, res = jattn.attention(
        q, k, v, implementation="fused", return_weights=True, return_lse=True, return_residual=True
    )
    assert w.shape == (2, 4, 6, 9) and res.dtype == jnp.bfloat16
    np.testing.assert_array_equal(res, jnp.moveaxis(lse, -1, -2).astype(jnp.bfloat16))

    def loss(f, q):
        return jnp.sum(f(q, k, v, return_residual=True)[1].astype(jnp.float32))

    def direct(q):  # the log-sum-exp written out (jax.nn's residual has a zero gradient)
        s = jnp.einsum("btnh,bsnh->bnts", q, jnp.repeat(k, 2, axis=2)) / np.sqrt(8)
        return jnp.sum(jax.nn.logsumexp(s.astype(jnp.float32), -1))

    want = jax.grad(direct)(q)
    assert float(jnp.abs(want.astype(jnp.float32)).max()) > 0.1
    for impl in jattn.kernels.available():
        got = jax.grad(
            functools.partial(loss, functools.partial(jattn.attention, implementation=impl))
        )(q)
        np.testing.assert_allclose(
            np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.05, err_msg=impl
        )


def test_three_batch_dims():
    q, k, v, _ = H.random_qkv(jax.random.key(0), (2, 1, 3), 4, 5, 2, 1, 8)
    got = jattn.attention(q, k, v)
    flat = jax.nn.dot_product_attention(
        q.reshape(6, 4, 2, 8), k.reshape(6, 5, 1, 8), v.reshape(6, 5, 1, 8)
    )
    np.testing.assert_allclose(got, flat.reshape(got.shape), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Validation: clear errors naming the argument and the shapes.

Q, K, V, _ = H.random_qkv(jax.random.key(1), (2,), 4, 6, 4, 2, 8)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((Q[0, 0], K, V), {}, ValueError, r"query must be \[\*batch, T, N, H\].*\(4, 8\)"),
        ((Q, K[0], V), {}, ValueError, r"same rank.*\(6, 2, 8\)"),
        ((Q[:1], K, V), {}, ValueError, r"batch dims differ.*\(1, 4, 4, 8\)"),
        ((Q[..., :3, :], K, V), {}, ValueError, r"query heads \(3, query.*multiple of"),
        ((Q, K[..., :4], V), {}, ValueError, r"head dims differ.*\(2, 6, 2, 4\)"),
        ((Q, K, V[:, :5]), {}, ValueError, r"key and value.*\(2, 5, 2, 8\)"),
        ((Q, K, V.astype(jnp.bfloat16)), {}, TypeError, "share a dtype"),
        ((Q.astype(jnp.int32), K, V), {}, TypeError, "query must be floating"),
        ((Q, K, V), {"mask": jnp.ones((2, 4, 4, 5), bool)}, ValueError, r"mask of shape"),
        ((Q, K, V), {"mask": jnp.ones((4, 6))}, TypeError, "mask must be boolean"),
        ((Q, K, V), {"bias": jnp.ones((3, 4, 4, 6))}, ValueError, r"bias of shape \(3, 4, 4, 6\)"),
        ((Q, K, V), {"local_window_size": -1}, ValueError, "non-negative"),
        ((Q, K, V), {"local_window_size": (2, -3)}, ValueError, r"non-negative.*\(2, -3\)"),
        (
            (Q, K, V),
            {"key_value_seq_lengths": jnp.ones((2, 3), jnp.int32)},
            ValueError,
            r"key_value_seq_lengths of shape \(2, 3\)",
        ),
        (
            (Q, K, V),
            {"query_seq_lengths": jnp.ones((3,), jnp.int32)},
            ValueError,
            r"query_seq_lengths of shape \(3,\) is not broadcastable to \(2,\)",
        ),
        ((Q, K, V), {"query_seq_lengths": jnp.ones((2,))}, TypeError, "integer"),
        ((Q, K, V), {"segment_ids": jnp.zeros((2, 4), jnp.int32)}, ValueError, "segment_ids"),
        ((Q, K, V), {"dropout_rate": 0.1}, ValueError, "dropout_rng"),
        ((Q, K, V), {"dropout_rate": 1.0}, ValueError, r"dropout_rate must be in \[0, 1\)"),
        ((Q, K, V), {"softcap": -1.0}, ValueError, "softcap"),
        ((Q, K, V), {"sinks": jnp.zeros((3,))}, ValueError, r"sinks of shape \(3,\) is not"),
        ((Q, K, V), {"sinks": jnp.zeros((4,), jnp.int32)}, TypeError, "sinks must be floating"),
        ((Q, K, None), {}, ValueError, r"value is None: pass value_dim"),
        ((Q, K, V), {"value_dim": 4}, ValueError, "pass value or value_dim, not both"),
        ((Q, K, None), {"value_dim": 9}, ValueError, r"in \[1, H\] for key \(2, 6, 2, 8\)"),
        ((Q, K, None), {"value_dim": 0}, ValueError, r"value_dim must be in \[1, H\]"),
        ((Q, K, None), {"value_dim": 2.0}, TypeError, "value_dim must be an int"),
        ((Q, K, V), {"implementation": "nope"}, ValueError, "unknown implementation 'nope'"),
        ((Q, K, V), {"implementation": []}, ValueError, "non-empty"),
        (
            (Q, K, V),
            {"implementation": "flash", "config": jattn.kernels.KernelOutput(None)},
            TypeError,
            "config of type KernelOutput fits none of the implementations",
        ),
    ],
)
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jattn.attention(*args, **kwargs)


def test_mask_objects_refuse_python_logic():
    with pytest.raises(TypeError, match="no truth value"):
        _ = masks.Causal() and masks.LocalWindow(1, 1)
    with pytest.raises(TypeError, match="cannot combine"):
        _ = masks.Causal() & jnp.ones((2, 2), bool)


# ---------------------------------------------------------------------------------------------
# Choosing an implementation.


def test_named_implementation_lacking_a_feature_raises():
    with pytest.raises(NotImplementedError, match="'flash' does not support return_weights"):
        jattn.attention(Q, K, V, implementation="flash", return_weights=True)


def test_list_tries_each_in_order():
    out, w = jattn.attention(Q, K, V, implementation=["flash", "fused"], return_weights=True)
    assert w.shape == (2, 4, 4, 6)
    with pytest.raises(NotImplementedError, match="flash.*return_weights"):
        jattn.attention(Q, K, V, implementation=["flash"], return_weights=True)


def test_default_choice_supports_the_call():
    # return_weights is served only by materialising kernels: the default must find one.
    out, w = jattn.attention(Q, K, V, return_weights=True)
    H.assert_close(out, H.oracle(Q, K, V), 2e-5)


def test_config_reaches_the_kernel():
    from jattn.kernels.flash import FlashConfig

    with pytest.raises(ValueError, match="block_q must be a positive int"):
        FlashConfig(block_q=0)
    a = jattn.attention(Q, K, V, implementation="flash", config=FlashConfig(2, 3))
    H.assert_close(a, H.oracle(Q, K, V), 2e-5)


def test_a_kernel_refusing_at_trace_time_passes_to_the_next(monkeypatch):
    """Kernels that judge a call only when traced (cuDNN) raise NotImplementedError; a list
    (and the default order) then moves on to the next candidate."""

    def refuse(q, k, v, *, plan):
        raise NotImplementedError("refuses head dim 8")

    fake = jattn.kernels.Implementation(
        "refuser", refuse, jattn.kernels.FEATURES, frozenset({"cpu"})
    )
    with pytest.raises(TypeError):  # the registry is read-only; tests patch its backing dict
        jattn.kernels.REGISTRY["refuser"] = fake
    monkeypatch.setitem(jattn.kernels._REGISTRY, "refuser", fake)
    out = jattn.attention(Q, K, V, implementation=["refuser", "fused"])
    H.assert_close(out, H.oracle(Q, K, V), 2e-5)
    with pytest.raises(NotImplementedError, match="refuses head dim 8"):
        jattn.attention(Q, K, V, implementation="refuser")
    with pytest.raises(NotImplementedError, match="'refuser': refuses head dim 8"):
        jattn.attention(Q, K, V, implementation=["refuser"])


def test_record_choices_names_the_implementation_each_call_runs():
    q = jnp.ones((1, 8, 2, 4))
    with jattn.kernels.record_choices() as outer:
        jattn.attention(q, q, q)  # implementation=None: the first of the default order
        with jattn.kernels.record_choices() as inner:
            # flash cannot return weights: the list's next name runs
            jattn.attention(q, q, q, implementation=["flash", "fused"], return_weights=True)
        jax.eval_shape(lambda q: jattn.attention(q, q, q, implementation="reference"), q)
    default = jattn.kernels.select(jattn.plan.make_plan(q, q, q)[0])[0][0].impl.name
    assert default in jattn.kernels.default_order(jax.default_backend(), 8, 8)
    assert outer == [default, "fused", "reference"]
    assert inner == ["fused"]
    jattn.attention(q, q, q)  # outside any block: recorded nowhere
    assert len(outer) == 3

    step = jax.jit(lambda q: jattn.attention(q, q, q, implementation="flash"))
    with jattn.kernels.record_choices() as ran:
        step(q)
        step(q)  # the compiled program again: not traced, not recorded
    assert ran == ["flash"]
