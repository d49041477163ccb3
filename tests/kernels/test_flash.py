"""Flash-specific properties: O(seq) memory, and its block-size config."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import jattn
from jattn.kernels.flash import FlashConfig
from jattn.plan import make_plan


def _temp_bytes(fn, *shapes) -> int:
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("causal", [False, True])
def test_memory_grows_linearly_with_sequence(causal):
    """Compiled temporary memory, forward and forward+backward, at T = S = 2k and 8k.

    Materialising the [T, S] scores would multiply it by 16; flash must stay near 4x (the
    O(T) residuals and gradients), while the fused kernel is shown to grow quadratically.
    """

    def fwd(impl):
        return lambda q, k, v: jattn.attention(q, k, v, is_causal=causal, implementation=impl)

    def fwd_bwd(impl):
        return lambda q, k, v: jax.grad(lambda *a: fwd(impl)(*a).sum(), argnums=(0, 1, 2))(q, k, v)

    n, h = 2, 32
    for make in (fwd, fwd_bwd):
        small = _temp_bytes(make("flash"), *[(1, 2048, n, h)] * 3)
        large = _temp_bytes(make("flash"), *[(1, 8192, n, h)] * 3)
        assert large <= 5 * small, (make.__name__, small, large)
        scores_large = 8192 * 8192 * n * 4
        assert large < scores_large / 8, (make.__name__, large)
    fused_small = _temp_bytes(fwd("fused"), *[(1, 2048, n, h)] * 3)
    fused_large = _temp_bytes(fwd("fused"), *[(1, 8192, n, h)] * 3)
    assert fused_large > 10 * fused_small  # the contrast: materialised scores are quadratic


def test_default_config_and_override():
    x = jnp.zeros((1, 4096, 8, 64), jnp.float32)
    plan, *_ = make_plan(x, x, x)
    assert FlashConfig.default_for(plan, "cpu") == FlashConfig(256, 512)
    causal, *_ = make_plan(x, x, x, is_causal=True)
    assert FlashConfig.default_for(causal, "cpu") == FlashConfig(512, 256)
    short, *_ = make_plan(x, x, x, is_causal=True)
    short = dataclasses.replace(short, q_seq_len=512)  # four query blocks kept: 128 rows
    assert FlashConfig.default_for(short, "cpu") == FlashConfig(128, 256)
    assert FlashConfig.default_for(plan, "gpu") == FlashConfig(128, 128)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        FlashConfig(block_k=-2)
    q = jax.random.normal(jax.random.key(0), (1, 40, 2, 8))
    a = jattn.attention(q, q, q, is_causal=True, implementation="flash")
    b = jattn.attention(q, q, q, is_causal=True, implementation="flash", config=FlashConfig(8, 8))
    assert jnp.allclose(a, b, atol=1e-5)


def test_runs_inside_shard_map_with_type_checks():
    """Loop carries must vary across devices like the inputs (shard_map's check_vma)."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("x",), (AxisType.Auto,))

    def local(q):
        return jattn.attention(q, q, q, is_causal=True, implementation="flash")

    f = jax.shard_map(local, mesh=mesh, in_specs=P("x"), out_specs=P("x"))
    x = jax.random.normal(jax.random.key(0), (2, 8, 1, 4))
    assert jnp.allclose(f(x), local(x), atol=1e-6)
    g = jax.grad(lambda x: f(x).sum())(x)
    assert jnp.allclose(g, jax.grad(lambda x: local(x).sum())(x), atol=1e-5)
