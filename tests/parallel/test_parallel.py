"""Ring attention and sharded training.

The multi-device checks need 8 host devices, which JAX fixes when it starts, so they run in a
subprocess (``python -m tests.parallel._checks``) that prints its measurements as JSON; the tests
here assert on them. Layout helpers, sharding rules and argument errors run in this process on
one device.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

import jattn
from jattn import parallel
from jattn.nn import sharding as sh

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Case names of tests/parallel/_checks.py (not imported here: it sets XLA_FLAGS on import).
RING_CASES = [
    "contiguous",
    "contiguous_causal_lengths",
    "zigzag_causal",
    "zigzag_causal_lengths_segments",
    "zigzag_lengths_segments",
    "zigzag_window",
    "zigzag_causal_window_softcap",
    "cross_causal_t_ne_s",
    "head_axis_explicit_set_mesh",
    "zigzag_causal_lengths_sinks",
    "ring_of_8",
    "flash_float32",
    "fused_float32",
]
TRAIN_CASES = ["lm_fsdp_tp", "lm_data_parallel", "transformer_fsdp_tp"]

# Against the float64 reference on one device: float64 ring steps merge exactly up to rounding;
# float32 kernels carry float32 rounding (tests/helpers.py TOL).
TOL = {"float64": (1e-12, 1e-12), "float32": (2e-5, 2e-4)}


def _run_checks(group: str) -> dict[str, dict]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.parallel._checks", group],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"checks {group} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            res = json.loads(line)
            results[res["name"]] = res
    return results


@pytest.fixture(scope="module")
def ring_results() -> dict[str, dict]:
    return _run_checks("ring")


@pytest.fixture(scope="module")
def train_results() -> dict[str, dict]:
    return _run_checks("train")


def _result(results: dict[str, dict], name: str) -> dict:
    assert name in results, f"check {name} printed nothing; got {sorted(results)}"
    res = results[name]
    assert "error" not in res, res["error"]
    return res


# ---------------------------------------------------------------------------------------------
# Ring attention on 8 host devices.


def test_ring_cases_all_ran(ring_results):
    assert sorted(ring_results) == sorted(RING_CASES)


@pytest.mark.parametrize("name", RING_CASES)
def test_ring_matches_single_device(ring_results, name):
    """Output, log-sum-exp and the gradients of q, k, v (through both) equal one device's."""
    res = _result(ring_results, name)
    fwd, grad = TOL[res["dtype"]]
    errs = res["errors"]
    assert errs["out"] <= fwd and errs["lse"] <= fwd, errs
    assert max(errs["dq"], errs["dk"], errs["dv"]) <= grad, errs
    assert res["finite"], "NaN or inf in the ring's output or gradients"
    assert res["lse_neginf_match"], "rows that see no key differ"


def test_ring_cases_cover_empty_rows(ring_results):
    # the length cases include a batch element with no key at all: zero rows, zero gradients
    assert _result(ring_results, "zigzag_causal_lengths_segments")["empty_rows"] > 0
    assert _result(ring_results, "flash_float32")["empty_rows"] > 0


# ---------------------------------------------------------------------------------------------
# Sharded training step on 8 host devices.


def test_train_cases_all_ran(train_results):
    assert sorted(train_results) == sorted(TRAIN_CASES)


@pytest.mark.parametrize("name", TRAIN_CASES)
def test_sharded_step_matches_unsharded(train_results, name):
    res = _result(train_results, name)
    assert res["devices"] == 8
    unsharded, sharded = res["losses"]
    np.testing.assert_allclose(sharded, unsharded, rtol=2e-6)
    assert unsharded[1] < unsharded[0]  # the steps did train
    # parameters after two SGD-momentum steps: equal up to float32 reordering of sums
    assert res["max_param_change"] > 1e-2
    assert res["max_param_err"] < 1e-5


def test_fsdp_tp_placement(train_results):
    specs = _result(train_results, "lm_fsdp_tp")["specs"]
    assert specs["layers/0/self_attn/query/kernel"] == ["data", "model"]
    assert specs["layers/1/ffn/down/kernel"] == ["model", "data"]
    assert specs["embedder/embed/embedding"] == ["model", "data"]
    assert specs["final_norm/scale"] == []
    # the optimizer's momentum sits with its parameter
    opt = _result(train_results, "lm_fsdp_tp")["opt_specs"]
    assert opt["opt_state/0/trace/layers/0/self_attn/query/kernel"] == ["data", "model"]


def test_data_parallel_replicates(train_results):
    specs = _result(train_results, "lm_data_parallel")["specs"]
    assert all(all(a is None for a in spec) for spec in specs.values()), specs


# ---------------------------------------------------------------------------------------------
# In this process, one device.


def test_zigzag_indices():
    # 2 shards, 4 chunks of 2: shard 0 holds chunks 0 and 3, shard 1 chunks 1 and 2
    np.testing.assert_array_equal(parallel.layout_indices(8, 2, "zigzag"), [0, 1, 6, 7, 2, 3, 4, 5])
    np.testing.assert_array_equal(parallel.layout_indices(6, 3, "contiguous"), np.arange(6))


@pytest.mark.parametrize("layout", parallel.LAYOUTS)
def test_layout_round_trip(layout):
    x = jnp.arange(2 * 24 * 3).reshape(2, 24, 3)
    y = parallel.to_layout(x, 3, layout=layout, axis=1)
    np.testing.assert_array_equal(y, x[:, parallel.layout_indices(24, 3, layout)])
    np.testing.assert_array_equal(parallel.from_layout(y, 3, layout=layout, axis=1), x)
    ids = jnp.arange(24)
    np.testing.assert_array_equal(
        parallel.from_layout(
            parallel.to_layout(ids, 3, layout=layout, axis=0), 3, layout=layout, axis=0
        ),
        ids,
    )


def test_layout_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        parallel.layout_indices(12, 4, "zigzag")
    with pytest.raises(ValueError, match="layout must be one of"):
        parallel.to_layout(jnp.zeros((1, 8)), 2, layout="striped")


def test_zigzag_balances_causal_work():
    """Per ring step, the number of (query chunk, key chunk) pairs each device computes under a
    causal mask: equal across devices with zigzag, from 0 to 1 with contiguous."""
    p = 4

    def work(layout: str) -> np.ndarray:
        n = {"contiguous": 1, "zigzag": 2}[layout]
        r = parallel._Ring("seq", p, n, layout, True, None, None, None, None, None)
        c = 64 // (p * n)
        w = np.zeros((p, p))
        for s in range(p):
            for d in range(p):
                src = (d - s) % p
                for a in range(n):
                    for b in range(n):
                        q0 = parallel._chunk_start(r, d, a, c)
                        k0 = parallel._chunk_start(r, src, b, c)
                        # a diagonal pair costs half of a full one
                        vis = bool(parallel._pair_visible(r, q0, k0, c, c, None, None))
                        w[s, d] += vis * (0.5 if q0 == k0 else 1.0) / n**2
        return w

    zig, cont = work("zigzag"), work("contiguous")
    assert zig.sum() == cont.sum() == p * p / 2  # the causal triangle, either way
    assert np.all(zig == zig[:, :1])  # every device the same work at every step
    assert cont.sum(axis=0).tolist() == [0.5, 1.5, 2.5, 3.5]  # device 0 mostly idles


def _one_device_mesh():
    return jax.make_mesh((1,), ("seq",), (jax.sharding.AxisType.Auto,))


@pytest.mark.parametrize("layout", parallel.LAYOUTS)
def test_ring_of_one_is_attention(layout):
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (2, 8, 2, 4))
    k = jax.random.normal(ks[1], (2, 8, 2, 4))
    v = jax.random.normal(ks[2], (2, 8, 2, 4))
    lengths = jnp.array([8, 3])
    kw = dict(is_causal=True, key_value_seq_lengths=lengths, return_lse=True)
    out, lse = parallel.ring_attention(
        q, k, v, mesh=_one_device_mesh(), axis_name="seq", layout=layout, **kw
    )
    want, want_lse = jattn.attention(q, k, v, implementation="reference", **kw)
    np.testing.assert_allclose(out, want, atol=1e-12)
    np.testing.assert_allclose(lse, want_lse, atol=1e-12)


def test_ring_errors():
    mesh = _one_device_mesh()
    x = jnp.zeros((1, 6, 2, 4))
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        parallel.ring_attention(x, x, x, mesh=mesh, axis_name="sequence")
    with pytest.raises(ValueError, match="divisible by 2"):
        parallel.ring_attention(
            jnp.zeros((1, 5, 2, 4)), x, x, mesh=mesh, axis_name="seq", layout="zigzag"
        )
    with pytest.raises(ValueError, match="layout must be one of"):
        parallel.ring_attention(x, x, x, mesh=mesh, axis_name="seq", layout="striped")
    with pytest.raises(ValueError, match="needs mesh="):
        parallel.ring_attention(x, x, x, axis_name="seq")
    with pytest.raises(ValueError, match="T == S"):
        parallel.ring_attention(
            x,
            jnp.zeros((1, 4, 2, 4)),
            jnp.zeros((1, 4, 2, 4)),
            mesh=mesh,
            axis_name="seq",
            segment_ids=jnp.zeros((1, 6), int),
        )


def test_partition_spec_rules():
    mesh = AbstractMesh((2, 4), ("data", "model"))
    rules = sh.default_rules()
    spec = sh.partition_spec
    assert spec("layers/3/self_attn/query/kernel", (16, 32), mesh, rules) == PartitionSpec(
        "data", "model"
    )
    # a dim the axis does not divide stays whole; the other dim is still split
    assert spec("layers/0/ffn/down/kernel", (30, 16), mesh, rules) == PartitionSpec(None, "data")
    # optimizer moments follow their parameter
    assert spec("opt_state/0/mu/output/kernel", (16, 32), mesh, rules) == PartitionSpec(
        "data", "model"
    )
    # no rule: replicated; a rule of another rank: replicated
    assert spec("layers/0/ffn_block/norm/scale", (16,), mesh, rules) == PartitionSpec()
    assert spec("layers/0/self_attn/query/kernel", (16,), mesh, rules) == PartitionSpec()
    # "key" of an RNG stream is not the key projection
    assert spec("layers/0/dropout/rngs/key", (), mesh, rules) == PartitionSpec()
    # an axis the mesh lacks is ignored
    assert spec("out/kernel", (8, 8), AbstractMesh((2,), ("data",)), rules) == PartitionSpec(
        None, "data"
    )
    plain = sh.default_rules(fsdp=False, tensor_parallel=False)
    assert spec("up/kernel", (16, 32), mesh, plain) == PartitionSpec(None, None)


def test_make_mesh_errors():
    with pytest.raises(ValueError, match="needs"):
        sh.make_mesh(data=len(jax.devices()) + 1)
    mesh = sh.make_mesh()
    assert mesh.axis_names == ("data", "model")
    assert mesh.shape["data"] == len(jax.devices())


# ---------------------------------------------------------------------------------------------
# Two processes with jax.distributed (the multi-host path), on this machine's CPU.


@pytest.mark.slow
def test_two_processes():
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.parallel._multihost", str(port), str(pid)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for pid in (0, 1)
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-4000:]
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("{"))))
    for res in results:
        assert (res["devices"], res["local"]) == (8, 4)
        assert res["ring_err"] < 2e-6
        np.testing.assert_allclose(res["losses"], res["want_losses"], rtol=2e-6)
