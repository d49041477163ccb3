"""Every mode of differentiation through `jattn.attention`, on every implementation: forward
mode (jax.jvp, jacfwd), per-example gradients (vmap of grad), rematerialisation, and second
derivatives where an implementation gives them, against the float64 reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from tests import helpers as H

VARIANTS = H.variants()
# The native kernel, the blockwise one and a plain-JAX one, where they run.
THREE = [name for name in ("cpu", "flash", "fused") if name in jattn.kernels.REGISTRY]

# (dtype, B, T, S, N, K, H, Hv, keyword arguments, bias, sinks)
CASES = {
    "gqa_causal_lengths_bias_sinks": (
        jnp.float32, 2, 12, 12, 4, 2, 16, 16,
        dict(is_causal=True, key_value_seq_lengths=np.array([12, 5])), True, True,
    ),
    # Many blocks for the small-block configs: skipped, full and masked ones, partial ones.
    "blocks_causal_window_lengths": (
        jnp.float32, 2, 37, 70, 2, 1, 8, 16,
        dict(is_causal=True, local_window_size=(30, 2), key_value_seq_lengths=np.array([70, 29])),
        False, True,
    ),
    "dropout_segments": (
        jnp.float32, 2, 9, 9, 2, 2, 8, 8,
        dict(dropout_rate=0.25, segment_ids=np.array([[0] * 4 + [1] * 5, [0] * 9])),
        False, False,
    ),
    "cross_window_softcap_latent": (
        jnp.float32, 1, 5, 23, 2, 1, 24, 8,
        dict(local_window_size=(6, 3), softcap=4.0, value_dim=8), False, False,
    ),
    "bf16_decode_lengths": (
        jnp.bfloat16, 3, 1, 40, 4, 1, 32, 32,
        dict(key_value_seq_lengths=np.array([40, 1, 17])), False, True,
    ),
}  # fmt: skip


def _inputs(case, seed=0):
    dt, b, t, s, n, kh, h, hv, kw, bias, sinks = CASES[case]
    rng = np.random.default_rng(seed)
    kw = dict(kw, dropout_rng=jax.random.key(seed)) if "dropout_rate" in kw else dict(kw)

    def draw(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    primals = {
        "q": draw(b, t, n, h, scale=1.5).astype(dt),
        "k": draw(b, s, kh, h).astype(dt),
        "v": None if "value_dim" in kw else draw(b, s, kh, hv).astype(dt),
        "bias": draw(b, n, t, s).astype(dt) if bias else None,
        "sinks": draw(n) if sinks else None,
    }
    tangents = {
        name: None if x is None else draw(*x.shape).astype(x.dtype) for name, x in primals.items()
    }
    return primals, tangents, kw, dt


def _fn(kw, implementation, config=None, **extra):
    def f(args):
        return jattn.attention(
            args["q"],
            args["k"],
            args["v"],
            args["bias"],
            sinks=args["sinks"],
            implementation=implementation,
            config=config,
            **kw,
            **extra,
        )

    return f


def _skip_unsupported(variant, kw, primals):
    plan = jattn.plan.make_plan(
        primals["q"], primals["k"], primals["v"], primals["bias"], sinks=primals["sinks"], **kw
    )[0]
    if missing := jattn.kernels.REGISTRY[variant.name].missing(plan.features):
        pytest.skip(f"{variant} lacks {missing}")


def _live(tree):
    return {k: v for k, v in tree.items() if v is not None}


def _with(tree, live):
    return {**tree, **live}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_forward_mode_matches_the_reference(variant, case):
    primals, tangents, kw, dt = _inputs(case)
    _skip_unsupported(variant, kw, primals)
    f = _fn(kw, variant.name, variant.config, return_lse=True)
    live_p, live_t = _live(primals), _live(tangents)

    (out, lse), (t_out, t_lse) = jax.jvp(lambda p: f(_with(primals, p)), (live_p,), (live_t,))
    # The primal is the kernel's own forward, bit for bit.
    plain_out, plain_lse = f(primals)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(plain_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(plain_lse))

    ref = _fn(kw, "reference", return_lse=True)
    with H.on_host():
        p64 = {k: H.to_host64(v) for k, v in live_p.items()}
        t64 = {k: H.to_host64(v) for k, v in live_t.items()}
        _, (w_out, w_lse) = jax.jvp(lambda p: ref(_with(primals, p)), (p64,), (t64,))
    atol = H.tol(dt)[1]
    scale = max(1.0, float(np.abs(np.asarray(w_out)).max()))
    H.assert_close(t_out, w_out, atol * scale, what=f"{variant} {case}: d out")
    finite = np.isfinite(np.asarray(w_lse))
    H.assert_close(
        np.asarray(t_lse, np.float64)[finite], np.asarray(w_lse)[finite], atol, what="d lse"
    )
    # The tangent is not zero: the comparison above could fail.
    assert float(jnp.abs(t_out.astype(jnp.float32)).max()) > 0.1


@pytest.mark.parametrize("implementation", THREE)
def test_jacfwd_equals_jacrev(implementation):
    primals, _, kw, _ = _inputs("gqa_causal_lengths_bias_sinks", seed=1)
    f = _fn(kw, implementation)

    def g(q):
        return f({**primals, "q": q})[:, :4].sum(axis=(-1, -2))

    fwd = jax.jacfwd(g)(primals["q"])
    rev = jax.jacrev(g)(primals["q"])
    np.testing.assert_allclose(np.asarray(fwd), np.asarray(rev), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("implementation", THREE)
def test_per_example_gradients(implementation):
    """vmap of grad (DP-SGD, influence functions): each example's gradients as if alone."""
    primals, _, kw, _ = _inputs("gqa_causal_lengths_bias_sinks", seed=2)
    lengths = kw.pop("key_value_seq_lengths")
    w = jnp.asarray(np.random.default_rng(3).standard_normal((1, 12, 4, 16)), jnp.float32)

    def loss(q, k, v, bias, length):
        out = jattn.attention(
            q[None], k[None], v[None], bias[None], sinks=primals["sinks"],
            key_value_seq_lengths=length[None], implementation=implementation, **kw,
        )  # fmt: skip
        return jnp.sum(out * w)

    args = (primals["q"], primals["k"], primals["v"], primals["bias"], jnp.asarray(lengths))
    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)))(*args)
    for i in range(2):
        alone = jax.grad(loss, argnums=(0, 1, 2, 3))(*(a[i] for a in args))
        for got, want in zip(per_example, alone, strict=True):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), atol=1e-6)


@pytest.mark.parametrize("implementation", THREE)
def test_remat_gradients_equal_plain_ones(implementation):
    primals, _, kw, _ = _inputs("gqa_causal_lengths_bias_sinks", seed=4)
    f = _fn(kw, implementation)

    def loss(p):
        return jnp.sum(jnp.tanh(f(_with(primals, p))))

    live = _live(primals)
    plain = jax.grad(loss)(live)
    remat = jax.jit(jax.grad(jax.checkpoint(loss)))(live)
    for name in live:
        np.testing.assert_allclose(np.asarray(remat[name]), np.asarray(plain[name]), atol=1e-6)


@pytest.mark.parametrize("implementation", ["reference", "fused"])
def test_second_derivatives_of_plain_jax_kernels(implementation):
    """A Hessian-vector product (forward over reverse) and a gradient of a gradient."""
    primals, tangents, kw, _ = _inputs("gqa_causal_lengths_bias_sinks", seed=5)

    def loss(f, cast):
        def g(q, k):
            p = {n: cast(x) for n, x in _live(primals).items()}
            return jnp.sum(jnp.sin(f({**primals, **p, "q": q, "k": k})))

        return g

    def hvp(f, cast, q, k, tq, tk):
        return jax.jvp(jax.grad(loss(f, cast), argnums=(0, 1)), (q, k), (tq, tk))[1]

    got = hvp(_fn(kw, implementation), lambda x: x, primals["q"], primals["k"],
              tangents["q"], tangents["k"])  # fmt: skip
    with H.on_host():
        want = hvp(_fn(kw, "reference"), H.to_host64, *(
            H.to_host64(x) for x in (primals["q"], primals["k"], tangents["q"], tangents["k"])
        ))  # fmt: skip
    for a, b in zip(got, want, strict=True):
        scale = max(1.0, float(np.abs(np.asarray(b)).max()))
        H.assert_close(a, b, 2e-4 * scale)
    gg = jax.grad(lambda q: jnp.sum(jax.grad(loss(_fn(kw, implementation), lambda x: x))(
        q, primals["k"]) ** 2))(primals["q"])  # fmt: skip
    assert np.isfinite(np.asarray(gg)).all() and float(jnp.abs(gg).max()) > 0


@pytest.mark.parametrize("implementation", [n for n in THREE if n != "fused"])
def test_second_derivatives_of_fast_kernels_are_refused_by_name(implementation):
    primals, tangents, kw, _ = _inputs("gqa_causal_lengths_bias_sinks", seed=6)
    f = _fn(kw, implementation)

    def loss(q):
        return jnp.sum(f({**primals, "q": q}))

    match = rf"implementation '{implementation}' gives first derivatives only.*'fused'"
    with pytest.raises(NotImplementedError, match=match):
        jax.jvp(jax.grad(loss), (primals["q"],), (tangents["q"],))
    with pytest.raises(NotImplementedError, match=match):
        jax.grad(lambda q: jnp.sum(jax.grad(loss)(q) ** 2))(primals["q"])
