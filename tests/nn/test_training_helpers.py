"""The Noam schedule against its formula, and the label-smoothed cross-entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jattn.nn import cross_entropy
from jattn.optim import noam_schedule


def formula(step, d_model, warmup, scale=1.0):
    return scale * d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)


@pytest.mark.parametrize("d_model,warmup,scale", [(512, 4000, 1.0), (64, 10, 2.0)])
def test_noam_matches_formula(d_model, warmup, scale):
    sched = noam_schedule(d_model, warmup, scale=scale)
    for step in [1, 2, 3, warmup // 2, warmup - 1, warmup, warmup + 1, 5 * warmup, 100 * warmup]:
        assert float(sched(step)) == pytest.approx(formula(step, d_model, warmup, scale), rel=1e-5)
    # Rises to the peak at step == warmup, then decays.
    values = np.array([float(sched(s)) for s in range(1, 3 * warmup)])
    assert int(np.argmax(values)) + 1 == warmup
    assert float(sched(warmup)) == pytest.approx(scale * (d_model * warmup) ** -0.5, rel=1e-5)


def test_noam_step_zero_is_finite_and_jittable():
    sched = noam_schedule(512, 4000)
    v0 = jax.jit(sched)(jnp.int32(0))
    assert np.isfinite(float(v0)) and float(v0) > 0
    assert float(v0) == pytest.approx(float(sched(1)))
    # Works as an optax learning rate: the first update moves the parameters.
    opt = optax.adam(sched)
    params = {"w": jnp.ones(3)}
    state = opt.init(params)
    updates, _ = opt.update({"w": jnp.ones(3)}, state, params)
    assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) != 0)
    with pytest.raises(ValueError):
        noam_schedule(0)


def np_smoothed_ce(logits, targets, eps):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    v = logits.shape[-1]
    q = np.full(logits.shape, eps / v)
    np.put_along_axis(q, np.asarray(targets)[..., None], 1 - eps + eps / v, axis=-1)
    return -(q * logp).sum(-1)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_numpy_and_ignores_padding(eps):
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = jax.random.normal(k1, (3, 5, 7), jnp.float32) * 3
    targets = jax.random.randint(k2, (3, 5), 1, 7)
    targets = targets.at[0, 3:].set(0).at[2, 1:].set(0)  # pad_id 0
    keep = np.asarray(targets) != 0
    per_token = np_smoothed_ce(logits, targets, eps)
    want = per_token[keep].mean()
    got = cross_entropy(logits, targets, label_smoothing=eps, pad_id=0)
    assert float(got) == pytest.approx(want, rel=1e-5)
    # Logits at padded positions do not matter.
    noisy = logits + 100.0 * jnp.asarray(~keep)[..., None] * jax.random.normal(
        k2, logits.shape, jnp.float32
    )
    assert float(cross_entropy(noisy, targets, label_smoothing=eps, pad_id=0)) == pytest.approx(
        float(got), rel=1e-6
    )
    none = cross_entropy(logits, targets, label_smoothing=eps, pad_id=0, reduction="none")
    np.testing.assert_allclose(none, np.where(keep, per_token, 0.0), rtol=1e-5)
    total = cross_entropy(logits, targets, label_smoothing=eps, pad_id=0, reduction="sum")
    assert float(total) == pytest.approx(per_token[keep].sum(), rel=1e-5)


def test_cross_entropy_where_and_empty():
    logits = jnp.zeros((2, 3, 4))
    targets = jnp.ones((2, 3), jnp.int32)
    assert float(cross_entropy(logits, targets, where=jnp.zeros((2, 3), bool))) == 0.0
    assert float(cross_entropy(logits, targets)) == pytest.approx(np.log(4), rel=1e-6)
    # Gradients at ignored positions are zero.
    where = jnp.array([[True, False, True], [False, False, True]])
    g = jax.grad(lambda x: cross_entropy(x, targets, where=where, label_smoothing=0.1))(logits)
    assert np.all(np.asarray(g)[~np.asarray(where)] == 0)
    with pytest.raises(ValueError, match="targets.shape"):
        cross_entropy(logits, targets[:, :2])
    with pytest.raises(ValueError, match="label_smoothing"):
        cross_entropy(logits, targets, label_smoothing=1.0)
