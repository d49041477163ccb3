"""The mask vocabulary: values against brute force, and sound block classification."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jattn import masks

T, S = 13, 17


@st.composite
def random_masks(draw, depth=2):
    """A random mask tree over one head of size T x S, with its brute-force value."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(["causal", "window", "chunked", "lengths", "segments", "dense"]))
    if depth > 0 and draw(st.booleans()):
        op = draw(st.sampled_from(["and", "or", "not"]))
        a, av = draw(random_masks(depth - 1))
        if op == "not":
            return ~a, ~av
        b, bv = draw(random_masks(depth - 1))
        return (a & b, av & bv) if op == "and" else (a | b, av | bv)
    i, j = np.arange(T)[:, None], np.arange(S)[None, :]
    if kind == "causal":
        off = draw(st.integers(-4, 6))
        return masks.Causal(off), np.broadcast_to(j <= i + off, (T, S))
    if kind == "window":
        left = draw(st.none() | st.integers(0, 5))
        right = draw(st.none() | st.integers(0, 5))
        val = np.ones((T, S), bool)
        if left is not None:
            val &= j >= i - left
        if right is not None:
            val &= j <= i + right
        return masks.LocalWindow(left, right), val
    if kind == "chunked":
        c = draw(st.integers(1, 8))
        return masks.Chunked(c), i // c == j // c
    if kind == "lengths":
        ql, kl = int(rng.integers(0, T + 1)), int(rng.integers(0, S + 1))
        return masks.Lengths(jnp.int32(ql), jnp.int32(kl)), (i < ql) & (j < kl)
    if kind == "segments":
        qs = np.sort(rng.integers(0, 4, T))
        ks = np.sort(rng.integers(0, 4, S))
        return masks.Segments(jnp.asarray(qs), jnp.asarray(ks)), qs[:, None] == ks[None, :]
    d = rng.random((T, S)) < draw(st.sampled_from([0.0, 0.5, 1.0]))
    return masks.Dense(jnp.asarray(d)), d


@given(
    random_masks(),
    st.integers(0, T - 1),
    st.integers(0, S - 1),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_block_classification_is_sound(case, q0, k0, bq, bk):
    mask, value = case
    bq, bk = min(bq, T - q0), min(bk, S - k0)
    np.testing.assert_array_equal(mask.materialize(T, S), value)
    np.testing.assert_array_equal(mask.block(q0, k0, bq, bk), value[q0 : q0 + bq, k0 : k0 + bk])
    blk = value[q0 : q0 + bq, k0 : k0 + bk]
    any_, all_ = (bool(x) for x in mask.classify(q0, k0, bq, bk))
    if not any_:
        assert not blk.any(), "classified empty but has visible entries"
    if all_:
        assert blk.all(), "classified full but has masked entries"
    # Traced offsets classify the same way as static ones.
    any_t, all_t = (bool(x) for x in mask.classify(jnp.int32(q0), jnp.int32(k0), bq, bk))
    assert (any_t or not blk.any()) and (not all_t or blk.all())


@given(random_masks(), st.integers(0, T - 1), st.integers(1, 6))
def test_kv_range_holds_every_visible_key(case, q0, bq):
    mask, value = case
    q1 = min(T, q0 + bq)
    lo, hi = (int(x) for x in mask.kv_range(q0, q1, S))
    cols = np.nonzero(value[q0:q1].any(0))[0]
    if cols.size:
        assert lo <= cols.min() and cols.max() < hi


def test_static_masks_classify_statically():
    flags = (masks.Causal(0) & masks.LocalWindow(4, 0)).classify(0, 8, 4, 4)
    assert flags == (False, False)  # Python bools: kernels skip such blocks at trace time
    assert masks.Causal(0).classify(8, 0, 4, 4) == (True, True)


def test_pad_keeps_values_and_hides_padding():
    seg = masks.Segments(jnp.array([0, 0, 1]), jnp.array([0, 1]))
    dense = masks.Dense(jnp.array([[True, False], [False, True], [True, True]]))
    for m in (seg, dense, seg & ~dense):
        padded = np.asarray(m.pad(5, 4).materialize(5, 4))
        np.testing.assert_array_equal(padded[:3, :2], np.asarray(m.materialize(3, 2)))
    padded = np.asarray(seg.pad(5, 4).materialize(5, 4))
    assert not padded[3:].any() and not padded[:, 2:].any()


def test_window_validation():
    with pytest.raises(ValueError, match="left must be a non-negative int"):
        masks.LocalWindow(-1, 0)


def test_chunked_validation_and_lowering():
    with pytest.raises(ValueError, match="Chunked size must be a positive int"):
        masks.Chunked(0)
    plan, _ = masks.lower(masks.Chunked(8) & masks.Chunked(4) & masks.Causal(), ())
    assert (plan.chunk, plan.right, plan.general) == (4, 0, False)
    plan, _ = masks.lower(masks.Chunked(6) & masks.Chunked(4), ())
    assert plan.general  # 6 and 4: no single chunk size says it
    assert masks.Chunked(4).features == {"chunked"}
