"""The Pallas kernels and the cuDNN delegation, beyond the shared suite.

On a CPU the Pallas kernels run in interpret mode, which checks their logic; the lowering
tests additionally trace them through the real Triton and Mosaic lowerings (``jax.export`` for
the ``cuda`` and ``tpu`` platforms needs no accelerator), so a kernel that only an emulator
accepts fails here too. What neither checks is the Triton/Mosaic compilation itself and speed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jattn
from jattn import masks as M
from jattn.kernels import _pallas_common as pc
from jattn.kernels import cudnn, pallas_gpu, pallas_tpu
from jattn.kernels.pallas_gpu import PallasGpuConfig
from jattn.kernels.pallas_tpu import PallasTpuConfig
from jattn.plan import make_plan
from tests import helpers as H

GPU_SMALL = PallasGpuConfig(16, 8, 8, 16, 16, 8, num_warps=4, num_stages=1)
TPU_SMALL = PallasTpuConfig(8, 16, 8, 8, 16, 8)
PALLAS = [("pallas_gpu", GPU_SMALL), ("pallas_tpu", TPU_SMALL)]


# ---------------------------------------------------------------------------------------------
# Configs and errors.


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_q=0), "block_q must be a positive int, got 0"),
        (dict(block_k=-16), "block_k must be a positive int"),
        (dict(block_q_dq=48), "block_q_dq must be a power of two"),
        (dict(num_warps=3), "num_warps must be a power of two"),
        (dict(num_stages=1.5), "num_stages must be a positive int"),
        (dict(num_warps_bwd=0), "num_warps_bwd must be a positive int"),
        (dict(num_warps_bwd=6), "num_warps_bwd must be a power of two"),
        (dict(block_k=True), "block_k must be a positive int"),
    ],
)
def test_gpu_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PallasGpuConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_q=0), "block_q must be a positive int"),
        (dict(block_k_dkv=True), "block_k_dkv must be a positive int"),
        (dict(vmem_limit_bytes=-1), "vmem_limit_bytes must be a positive int"),
    ],
)
def test_tpu_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PallasTpuConfig(**kwargs)


def test_configs_are_frozen_and_hashable():
    for cfg in (PallasGpuConfig(), PallasTpuConfig()):
        with pytest.raises(AttributeError):
            cfg.block_q = 1
        assert hash(cfg) == hash(type(cfg)())


def test_hardware_block_constraints(monkeypatch):
    """Off the emulator, Triton needs tiles of at least 16 and Mosaic multiples of 128."""
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 64, 64, 2, 2, 64, dtype=jnp.bfloat16)
    monkeypatch.setattr(pallas_gpu, "_interpret", lambda: False)
    with pytest.raises(ValueError, match="PallasGpuConfig.block_k=8 must be >= 16 on a GPU"):
        jattn.attention(q, k, v, implementation="pallas_gpu", config=PallasGpuConfig(16, 8))
    monkeypatch.setattr(pallas_tpu, "_interpret", lambda: False)
    with pytest.raises(ValueError, match="block_q=64 must be a multiple of 128 on a TPU"):
        jattn.attention(q, k, v, implementation="pallas_tpu", config=PallasTpuConfig(64))


def test_wrong_config_type():
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 4, 2, 2, 8)
    with pytest.raises(TypeError, match="PallasTpuConfig fits none.*configs: PallasGpuConfig"):
        jattn.attention(q, k, v, implementation="pallas_gpu", config=PallasTpuConfig())
    with pytest.raises(TypeError, match="PallasGpuConfig fits none.*configs: PallasTpuConfig"):
        jattn.attention(q, k, v, implementation="pallas_tpu", config=PallasGpuConfig())


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize(
    "feature,kwargs",
    [
        ("bias", lambda q, k: dict(bias=jnp.zeros((q.shape[1], k.shape[1])))),
        ("dense_mask", lambda q, k: dict(mask=jnp.ones((q.shape[1], k.shape[1]), bool))),
        ("mask_algebra", lambda q, k: dict(mask=M.Causal(0) | M.LocalWindow(1, 1))),
        ("mask_algebra", lambda q, k: dict(mask=~M.Causal(0))),
        ("dropout", lambda q, k: dict(dropout_rate=0.1, dropout_rng=jax.random.key(1))),
        ("return_weights", lambda q, k: dict(return_weights=True)),
    ],
)
def test_unsupported_features_are_named(name, feature, kwargs):
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 5, 2, 2, 8)
    with pytest.raises(NotImplementedError, match=f"'{name}' does not support {feature}"):
        jattn.attention(q, k, v, implementation=name, **kwargs(q, k))


def test_float64_is_not_supported():
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 5, 2, 2, 8, dtype=jnp.float64)
    for name in ("pallas_gpu", "pallas_tpu"):
        with pytest.raises(NotImplementedError, match="float64"):
            jattn.attention(q, k, v, implementation=name)


def test_registry_and_default_order():
    reg = jattn.kernels.REGISTRY
    for name in ("pallas_gpu", "pallas_tpu", "cudnn"):
        assert reg[name].batched
        assert name not in jattn.kernels.available("cpu")
    assert {"pallas_gpu", "pallas_tpu"} <= set(jattn.kernels.testable("cpu"))
    assert "cudnn" not in jattn.kernels.testable("cpu")
    # cuDNN first (it refuses what it cannot take when traced), then the pure-JAX kernels: the
    # Pallas kernels have not passed the suite on real hardware, so no default order has them.
    assert jattn.kernels.default_order("gpu", 4096, 4096) == [
        "cudnn",
        "flash",
        "fused",
        "reference",
    ]
    assert jattn.kernels.default_order("gpu", 8, 8) == ["cudnn", "fused", "flash", "reference"]
    assert jattn.kernels.default_order("tpu", 4096, 4096) == ["flash", "fused", "reference"]
    assert jattn.kernels.default_order("tpu", 8, 8) == ["fused", "flash", "reference"]
    # Emulated kernels are never the default on a CPU.
    assert not {"pallas_gpu", "pallas_tpu", "cudnn"} & set(jattn.kernels.default_order("cpu", 8, 8))
    # Still callable by name.
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 5, 2, 2, 8)
    for name in ("pallas_gpu", "pallas_tpu"):
        H.assert_close(jattn.attention(q, k, v, implementation=name), H.oracle(q, k, v), 2e-5)


def test_unverified_kernels_are_left_out_by_data(monkeypatch):
    """VERIFIED_ON_DEVICE alone keeps the Pallas kernels out: naming a backend there returns
    each to its place in DEFAULT_ORDER on that backend only."""
    verified = jattn.kernels.VERIFIED_ON_DEVICE
    assert verified["pallas_gpu"] == frozenset() and verified["pallas_tpu"] == frozenset()
    assert not jattn.kernels.verified("pallas_gpu", "gpu")
    assert jattn.kernels.verified("flash", "gpu") and jattn.kernels.verified("cudnn", "gpu")
    monkeypatch.setattr(
        jattn.kernels,
        "VERIFIED_ON_DEVICE",
        {"pallas_gpu": frozenset({"gpu"}), "pallas_tpu": frozenset({"tpu"})},
    )
    assert jattn.kernels.default_order("gpu", 4096, 4096)[:2] == ["cudnn", "pallas_gpu"]
    assert jattn.kernels.default_order("tpu", 4096, 4096)[0] == "pallas_tpu"
    assert "pallas_tpu" not in jattn.kernels.default_order("gpu", 4096, 4096)


@pytest.mark.parametrize(
    "kind,generation",
    [
        ("NVIDIA H100 80GB HBM3", "hopper"),
        ("NVIDIA H200", "hopper"),
        ("NVIDIA A100-SXM4-80GB", "ampere"),
        ("NVIDIA GeForce RTX 4090", "small"),
        ("Tesla T4", "small"),
    ],
)
def test_gpu_generation(kind, generation):
    assert pallas_gpu._generation(kind) == generation


def _blocks(cfg) -> list[int]:
    return [getattr(cfg, f) for f in pc.BLOCKS]


def _plan(head_dim: int, dtype=jnp.bfloat16):
    q = jnp.zeros((1, 8, 2, head_dim), dtype)
    return make_plan(q, q, q)[0]


class _Device:
    def __init__(self, kind: str):
        self.device_kind = kind


def test_gpu_default_configs_fit_their_head_dims(monkeypatch):
    for gen, table in pallas_gpu._DEFAULTS.items():
        for d, cfg in table.items():
            assert isinstance(cfg, PallasGpuConfig)  # validated: powers of two, positive
            assert min(_blocks(cfg)) >= 16, (gen, d)
    assert PallasGpuConfig.default_for(_plan(64), "cpu") == (
        PallasGpuConfig(32, 32, 32, 32, 32, 32, 4, 1)
    )
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device("NVIDIA H100 80GB HBM3")])
    hopper = pallas_gpu._DEFAULTS["hopper"]
    assert PallasGpuConfig.default_for(_plan(128), "gpu") == hopper[128]
    assert PallasGpuConfig.default_for(_plan(32), "gpu") == hopper[64]
    assert PallasGpuConfig.default_for(_plan(512), "gpu") == hopper[256]
    # float32: half the key tiles of the forward and dK/dV passes, half the dQ query tile.
    f32 = PallasGpuConfig.default_for(_plan(128, jnp.float32), "gpu")
    assert f32 == dataclasses.replace(hopper[128], block_k=64, block_k_dkv=64, block_q_dq=64)


@pytest.mark.parametrize(
    "kind,generation",
    [("TPU v5 lite", "v5e"), ("TPU v6 lite", "large"), ("TPU v5p", "large"), ("TPU v4", "large")],
)
def test_tpu_generation(kind, generation):
    assert pallas_tpu._generation(kind) == generation
    for cfg in pallas_tpu._DEFAULTS.values():
        assert all(b % 128 == 0 for b in _blocks(cfg))


def test_tpu_default_configs(monkeypatch):
    assert PallasTpuConfig.default_for(_plan(64), "cpu") == PallasTpuConfig(32, 32, 32, 32, 32, 32)
    monkeypatch.setattr(jax, "devices", lambda *a: [_Device("TPU v5 lite")])
    v5e = pallas_tpu._DEFAULTS["v5e"]
    assert PallasTpuConfig.default_for(_plan(128), "tpu") == v5e
    # Head dims past 128: key tiles above 256 are halved to stay within VMEM.
    assert PallasTpuConfig.default_for(_plan(256), "tpu") == dataclasses.replace(
        v5e, block_k=256, block_k_dq=256
    )


# ---------------------------------------------------------------------------------------------
# Block ranges: the loop bounds and unmasked ranges against a brute-force mask.


def _brute(plan: pc.MaskPlan, sc: pc.Scalars, tp: int, sp: int, seg=None) -> np.ndarray:
    i = np.arange(tp)[:, None]
    j = np.arange(sp)[None, :]
    ok = np.ones((tp, sp), bool)
    if plan.left is not None:
        ok &= j >= i - plan.left
    if plan.right is not None:
        ok &= j <= i + plan.right
    if plan.chunk is not None:
        ok &= i // plan.chunk == j // plan.chunk
    if plan.offset:
        ok &= j <= i + sc.offset
    if plan.kv_bound is not None:
        ok &= j < plan.kv_bound
    if plan.kv_len:
        ok &= j < sc.kv_len
    if plan.q_len:
        ok &= i < sc.q_len
    return ok


def test_block_ranges_are_sound_and_tight():
    rng = np.random.default_rng(0)
    for _ in range(600):
        bq, bk = int(rng.choice([1, 2, 4, 8])), int(rng.choice([1, 2, 4, 8]))
        tp, sp = bq * int(rng.integers(1, 6)), bk * int(rng.integers(1, 6))
        plan = pc.MaskPlan(
            left=None if rng.random() < 0.5 else int(rng.integers(0, 6)),
            right=None if rng.random() < 0.4 else int(rng.integers(-3, 6)),
            chunk=None if rng.random() < 0.6 else int(rng.integers(1, 9)),
            kv_bound=None if rng.random() < 0.5 else int(rng.integers(1, sp + 1)),
            q_len=bool(rng.random() < 0.5),
            kv_len=bool(rng.random() < 0.5),
            offset=bool(rng.random() < 0.3),
        )
        sc = pc.Scalars(
            q_len=int(rng.integers(0, tp + 1)),
            kv_len=int(rng.integers(0, sp + 1)),
            offset=int(rng.integers(-3, 6)),
        )
        vis = _brute(plan, sc, tp, sp)
        # Masked-entry check without q_len: rows past it are zeroed afterwards instead.
        vis_rows = _brute(dataclasses.replace(plan, q_len=False), sc, tp, sp)
        for qb in range(tp // bq):
            lo, f_lo, f_hi, hi = plan.kv_blocks(sc, qb * bq, bq, bk, sp)
            assert 0 <= lo <= f_lo <= f_hi <= hi <= sp // bk, (plan, sc, qb)
            rows = slice(qb * bq, qb * bq + bq)
            for kb in range(sp // bk):
                blk = slice(kb * bk, kb * bk + bk)
                if vis[rows, blk].any():
                    assert lo <= kb < hi, (plan, sc, qb, kb)
                if f_lo <= kb < f_hi:
                    assert vis_rows[rows, blk].all(), (plan, sc, qb, kb)
        for kb in range(sp // bk):
            lo, f_lo, f_hi, hi = plan.q_blocks(sc, kb * bk, bk, bq, tp, sp)
            assert 0 <= lo <= f_lo <= f_hi <= hi <= tp // bq, (plan, sc, kb)
            blk = slice(kb * bk, kb * bk + bk)
            for qb in range(tp // bq):
                rows = slice(qb * bq, qb * bq + bq)
                if vis[rows, blk].any():
                    assert lo <= qb < hi, (plan, sc, qb, kb)
                if f_lo <= qb < f_hi:
                    assert vis_rows[rows, blk].all(), (plan, sc, qb, kb)


def test_causal_blocks_are_skipped():
    """Causal: a query block loops over the blocks up to its diagonal only, and only the
    diagonal block is masked."""
    plan = pc.MaskPlan(right=0)
    sc = pc.Scalars()
    assert plan.kv_blocks(sc, 0, 16, 16, 64) == (0, 0, 0, 1)
    assert plan.kv_blocks(sc, 32, 16, 16, 64) == (0, 0, 2, 3)
    assert plan.q_blocks(sc, 32, 16, 16, 64, 64) == (2, 3, 4, 4)


def test_chunked_blocks_are_skipped_and_full():
    """Chunked & causal: a query block sees only its own chunk, and the blocks of that chunk
    below the diagonal run unmasked; another chunk's blocks are never visited."""
    plan = pc.MaskPlan(right=0, chunk=64)
    sc = pc.Scalars()
    assert plan.kv_blocks(sc, 64 + 32, 16, 16, 256) == (4, 4, 6, 7)
    assert plan.q_blocks(sc, 64, 16, 16, 256, 256) == (4, 5, 8, 8)


def test_row_bounds_match_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(200):
        t, s = int(rng.integers(1, 30)), int(rng.integers(1, 30))
        plan = pc.MaskPlan(
            left=None if rng.random() < 0.5 else int(rng.integers(0, 6)),
            right=None if rng.random() < 0.4 else int(rng.integers(-3, 6)),
            chunk=None if rng.random() < 0.5 else int(rng.integers(1, 9)),
            q_len=bool(rng.random() < 0.5),
            kv_len=bool(rng.random() < 0.5),
            offset=bool(rng.random() < 0.3),
        )
        sc = pc.Scalars(
            q_len=int(rng.integers(0, t + 1)),
            kv_len=int(rng.integers(0, s + 1)),
            offset=int(rng.integers(-3, 6)),
        )
        vis = _brute(plan, sc, t, s)
        lo, hi = plan.row_bounds(sc, jnp.arange(t), s)
        lo, hi = np.broadcast_to(lo, (t,)), np.broadcast_to(hi, (t,))
        j = np.arange(s)[None, :]
        want = (j >= lo[:, None]) & (j < hi[:, None])
        np.testing.assert_array_equal(want, vis, err_msg=str((plan, sc)))


# ---------------------------------------------------------------------------------------------
# Interpret mode: what the shared suite does not reach.


@pytest.mark.parametrize("name,cfg", PALLAS, ids=[p[0] for p in PALLAS])
def test_traced_causal_offset_decoding(name, cfg):
    """KV-cache decoding: a per-batch traced causal offset, a few queries against a long cache,
    forward and gradients."""
    q, k, v, _ = H.random_qkv(jax.random.key(20), (2,), 3, 40, 4, 2, 16)
    mask = M.Causal(jnp.array([5, 30], jnp.int32)) & M.Lengths(kv=jnp.array([9, 40], jnp.int32))
    kw = dict(mask=mask)
    got = jattn.attention(q, k, v, implementation=name, config=cfg, **kw)
    H.assert_close(got, H.oracle(q, k, v, **kw), H.tol(jnp.float32)[0], what=name)

    def loss(impl, c):
        extra = {"config": cfg} if impl == name else {}
        return lambda q, k, v: jnp.sum(
            jattn.attention(c(q), c(k), c(v), implementation=impl, **extra, **kw) ** 2
        )

    got = jax.grad(loss(name, lambda x: x), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference", lambda x: x.astype(jnp.float64)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        H.assert_close(g, w, 1e-4, what=name)


@pytest.mark.parametrize("name,cfg", PALLAS, ids=[p[0] for p in PALLAS])
def test_packed_window_softcap_bf16(name, cfg):
    """Segments, a window, lengths, softcap, GQA and the log-sum-exp together, in bfloat16,
    forward and gradients (through both outputs)."""
    b, t, n, kh, h = 2, 24, 4, 1, 32
    q, k, v, _ = H.random_qkv(jax.random.key(21), (b,), t, t, n, kh, h, dtype=jnp.bfloat16)
    seg = jnp.asarray(np.repeat([[0, 1, 2], [0, 0, 1]], [5, 11, 8], axis=1).astype(np.int32))
    kw = dict(
        segment_ids=seg,
        local_window_size=(6, 2),
        query_seq_lengths=jnp.array([24, 17], jnp.int32),
        softcap=3.0,
        return_lse=True,
    )
    out, lse = jattn.attention(q, k, v, implementation=name, config=cfg, **kw)
    out_ref, lse_ref = H.oracle(q, k, v, **kw)
    fwd_tol, grad_tol = H.tol(jnp.bfloat16)
    H.assert_close(out, out_ref, fwd_tol, what=name)
    finite = np.isfinite(np.asarray(lse_ref))
    np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
    H.assert_close(jnp.where(finite, lse, 0), jnp.where(finite, lse_ref, 0), 2e-2)

    ct = H.normal(jax.random.key(22), out.shape)

    def loss(impl, c):
        extra = {"config": cfg} if impl == name else {}

        def f(q, k, v):
            o, l = jattn.attention(c(q), c(k), c(v), implementation=impl, **extra, **kw)
            return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(jnp.where(finite, l, 0))

        return f

    got = jax.grad(loss(name, lambda x: x), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(loss("reference", lambda x: x.astype(jnp.float64)), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        scale = float(jnp.max(jnp.abs(w))) + 1e-6
        H.assert_close(g.astype(jnp.float32) / scale, w / scale, grad_tol, what=name)


@pytest.mark.parametrize("name", ["pallas_gpu", "pallas_tpu"])
def test_default_config_runs(name):
    q, k, v, _ = H.random_qkv(jax.random.key(23), (1,), 40, 40, 2, 2, 16)
    got = jattn.attention(q, k, v, is_causal=True, implementation=name)
    H.assert_close(got, H.oracle(q, k, v, is_causal=True), H.tol(jnp.float32)[0], what=name)


# ---------------------------------------------------------------------------------------------
# Lowering through Triton (cuda) and Mosaic (tpu) without the hardware.

_MASKS = {
    "none": lambda b, t: {},
    "causal_lengths": lambda b, t: dict(
        is_causal=True,
        query_seq_lengths=jnp.full((b,), t - 3, jnp.int32),
        key_value_seq_lengths=jnp.full((b,), t - 7, jnp.int32),
    ),
    "packed_window_softcap": lambda b, t: dict(
        segment_ids=jnp.zeros((b, t), jnp.int32), local_window_size=(64, 0), softcap=30.0
    ),
    "decode_offset": lambda b, t: dict(mask=M.Causal(jnp.arange(b, dtype=jnp.int32) + 100)),
}


def _export(fn, platform, *args):
    checks = [
        jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton"),
        jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call"),
    ]
    return jax.export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(*args)


def _lower_fwd_bwd(name, cfg, platform, dtype, head_dim, masks):
    b, t, n, kh = 2, 300, 4, 2
    q = jax.ShapeDtypeStruct((b, t, n, head_dim), dtype)
    kv = jax.ShapeDtypeStruct((b, t, kh, head_dim), dtype)
    kw = _MASKS[masks](b, t)

    def loss(q, k, v):
        o, lse = jattn.attention(q, k, v, implementation=name, config=cfg, return_lse=True, **kw)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

    exp = _export(jax.grad(loss, argnums=(0, 1, 2)), platform, q, kv, kv)
    assert name.replace("pallas_", "jattn_pallas_") in exp.mlir_module()


@pytest.mark.parametrize(
    "generation,head_dim,dtype,masks",
    [
        ("hopper", 128, jnp.bfloat16, "causal_lengths"),
        ("hopper", 64, jnp.float16, "packed_window_softcap"),
        ("ampere", 256, jnp.bfloat16, "decode_offset"),
        ("small", 96, jnp.float32, "none"),
    ],
)
def test_lowers_to_triton(monkeypatch, generation, head_dim, dtype, masks):
    monkeypatch.setattr(pallas_gpu, "_interpret", lambda: False)
    table = pallas_gpu._DEFAULTS[generation]
    cfg = table[min(d for d in table if d >= max(head_dim, 64))]
    _lower_fwd_bwd("pallas_gpu", cfg, "cuda", dtype, head_dim, masks)


@pytest.mark.parametrize(
    "generation,head_dim,dtype,masks",
    [
        ("large", 128, jnp.bfloat16, "causal_lengths"),
        ("v5e", 64, jnp.bfloat16, "packed_window_softcap"),
        ("large", 256, jnp.float32, "decode_offset"),
        ("v5e", 128, jnp.float16, "none"),
    ],
)
def test_lowers_to_mosaic(monkeypatch, generation, head_dim, dtype, masks):
    monkeypatch.setattr(pallas_tpu, "_interpret", lambda: False)
    cfg = pallas_tpu._DEFAULTS[generation]
    _lower_fwd_bwd("pallas_tpu", cfg, "tpu", dtype, head_dim, masks)


# ---------------------------------------------------------------------------------------------
# cuDNN: the delegation's feature checks, and its arguments checked by running them through
# jax.nn's XLA implementation in place of cuDNN.


def test_cudnn_needs_a_gpu():
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 4, 2, 2, 8, dtype=jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="'cudnn' does not run on backend 'cpu'"):
        jattn.attention(q, k, v, implementation="cudnn")


@pytest.fixture
def fake_gpu(monkeypatch):
    """jax.nn.dot_product_attention(implementation="cudnn") run by XLA, on a "gpu" backend;
    returns the list of keyword arguments it was called with."""
    real = jax.nn.dot_product_attention
    calls = []

    def fake(query, key, value, bias=None, mask=None, *, implementation=None, **kw):
        assert implementation == "cudnn" and bias is None and mask is None
        calls.append(kw)
        return real(query, key, value, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(cudnn, "_max_head_dim", lambda: 128)
    return calls


@pytest.mark.parametrize(
    "kwargs,expect",
    [
        (dict(), dict(is_causal=False)),
        (dict(is_causal=True), dict(is_causal=True)),
        (dict(local_window_size=(3, 0)), dict(is_causal=True, local_window_size=(3, 0))),
        (dict(is_causal=True, local_window_size=(2, 5)), dict(local_window_size=(2, 0))),
        (
            dict(
                is_causal=True,
                query_seq_lengths=jnp.array([9, 4]),
                key_value_seq_lengths=jnp.array([11, 0]),
            ),
            dict(is_causal=True),
        ),
    ],
    ids=["plain", "causal", "left_window", "causal_window", "causal_lengths"],
)
def test_cudnn_delegation(fake_gpu, kwargs, expect):
    q, k, v, _ = H.random_qkv(jax.random.key(24), (2,), 9, 11, 4, 2, 16, dtype=jnp.bfloat16)
    got = jattn.attention(q, k, v, implementation="cudnn", **kwargs)
    (call,) = fake_gpu
    assert call["scale"] == pytest.approx(0.25)
    for key, value in expect.items():
        assert call[key] == value, (key, call)
    for key in ("query_seq_lengths", "key_value_seq_lengths"):
        if key in kwargs:  # traced here: their values show in the result
            assert call[key].shape == (2,) and call[key].dtype == jnp.int32
    H.assert_close(got, H.oracle(q, k, v, **kwargs), H.tol(jnp.bfloat16)[0])


def test_cudnn_zeroes_rows_without_keys(fake_gpu):
    q, k, v, _ = H.random_qkv(jax.random.key(25), (2,), 6, 6, 2, 2, 8, dtype=jnp.bfloat16)
    kw = dict(query_seq_lengths=jnp.array([6, 2]), key_value_seq_lengths=jnp.array([0, 6]))
    got = np.asarray(jattn.attention(q, k, v, implementation="cudnn", **kw), np.float32)
    assert not got[0].any() and not got[1, 2:].any()
    H.assert_close(got, H.oracle(q, k, v, **kw), H.tol(jnp.bfloat16)[0])


@pytest.mark.parametrize(
    "dtype,h,hv,kwargs,match",
    [
        (jnp.float32, 16, 16, {}, "cudnn does not support float32"),
        (jnp.bfloat16, 12, 12, {}, "head dim 12"),
        (jnp.bfloat16, 256, 256, {}, "head dim 256"),
        (jnp.bfloat16, 16, 8, {}, "value_head_dim"),
        (jnp.bfloat16, 16, 16, dict(local_window_size=(2, 1)), "right window"),
        (jnp.bfloat16, 16, 16, dict(mask=M.Causal(2)), "causal with an offset"),
        (jnp.bfloat16, 16, 16, dict(mask=M.LocalWindow(2, None)), "unbounded right"),
    ],
)
def test_cudnn_rejects_what_it_cannot_do(fake_gpu, dtype, h, hv, kwargs, match):
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 4, 2, 2, h, hv=hv, dtype=dtype)
    with pytest.raises(NotImplementedError, match=match):
        jattn.attention(q, k, v, implementation="cudnn", **kwargs)
    assert not fake_gpu  # rejected before calling cuDNN


@pytest.mark.parametrize(
    "feature,kwargs",
    [
        ("softcap", dict(softcap=5.0)),
        ("segments", dict(segment_ids=jnp.zeros((1, 4), jnp.int32))),
        ("bias", dict(bias=jnp.zeros((4, 4), jnp.bfloat16))),
        ("dense_mask", dict(mask=jnp.ones((4, 4), bool))),
        ("return_lse", dict(return_lse=True)),
        ("dropout", dict(dropout_rate=0.1, dropout_rng=jax.random.key(0))),
    ],
)
def test_cudnn_unsupported_features_are_named(fake_gpu, feature, kwargs):
    q, k, v, _ = H.random_qkv(jax.random.key(0), (1,), 4, 4, 2, 2, 16, dtype=jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=f"'cudnn' does not support {feature}"):
        jattn.attention(q, k, v, implementation="cudnn", **kwargs)


@pytest.mark.parametrize(
    "kwargs, feature",
    [
        (dict(sinks=jnp.zeros((4,))), "sinks"),
        (dict(mask=M.Chunked(4)), "chunked"),
    ],
)
def test_cudnn_refuses_by_name(fake_gpu, kwargs, feature):
    q, k, v, _ = H.random_qkv(jax.random.key(26), (2,), 8, 8, 4, 2, 16, dtype=jnp.bfloat16)
    with pytest.raises(NotImplementedError, match=f"'cudnn' does not support {feature}"):
        jattn.attention(q, k, v, implementation="cudnn", **kwargs)
