"""One of two CPU processes of a multi-host rehearsal (see test_parallel.py::test_two_processes).

``python -m tests.parallel._multihost PORT PROCESS_ID``: 4 host devices per process, Gloo
collectives, ``jax.distributed.initialize``; ring attention over all 8 devices and two sharded
training steps fed with ``make_array_from_process_local_data``, each next to the same computation
on this process's first device. Prints one JSON line.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")


def main(port: int, pid: int) -> None:
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=pid)

    import numpy as np
    import optax
    from flax import nnx
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    import jattn
    from jattn import parallel
    from jattn.nn import DecoderLM, cross_entropy
    from jattn.nn import sharding as sh

    here = jax.local_devices()[0]
    res = {"process": pid, "devices": len(jax.devices()), "local": len(jax.local_devices())}

    # Ring attention over both processes.
    mesh = jax.make_mesh((8,), ("seq",), (jax.sharding.AxisType.Auto,))
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 32, 2, 8)).astype(np.float32) for _ in range(3))
    seq = NamedSharding(mesh, PartitionSpec(None, "seq"))

    def global_array(x):
        x = np.asarray(parallel.to_layout(x, 8))
        return jax.make_array_from_callback(x.shape, seq, lambda idx: x[idx])

    out = jax.jit(
        lambda q, k, v: parallel.ring_attention(
            q, k, v, mesh=mesh, axis_name="seq", is_causal=True, layout="zigzag"
        )
    )(*map(global_array, (q, k, v)))
    out = parallel.from_layout(np.asarray(multihost_utils.process_allgather(out, tiled=True)), 8)
    want = jattn.attention(*(jax.device_put(x, here) for x in (q, k, v)), is_causal=True)
    res["ring_err"] = float(np.max(np.abs(out - np.asarray(want))))

    # Sharded training, each process feeding its half of the batch.
    def build():
        return DecoderLM(
            32, d_model=32, num_layers=1, num_heads=4, d_ff=64, dropout_rate=0.0, rngs=nnx.Rngs(0)
        )

    def loss_fn(m, batch):
        return cross_entropy(m(batch["inputs"]), batch["targets"])

    toks = np.random.default_rng(1).integers(0, 32, (8, 17))
    mesh2 = sh.make_mesh(data=4, model=2)
    model = sh.create_sharded(build, mesh2)
    opt = sh.shard_model(nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param), mesh2)
    step = sh.make_train_step(loss_fn, mesh=mesh2)
    mine = toks[pid * 4 : (pid + 1) * 4]
    data = NamedSharding(mesh2, PartitionSpec("data"))
    batch = {
        "inputs": jax.make_array_from_process_local_data(data, mine[:, :-1]),
        "targets": jax.make_array_from_process_local_data(data, mine[:, 1:]),
    }
    res["losses"] = [float(step(model, opt, batch)) for _ in range(2)]

    with jax.default_device(here):
        m1 = build()
        o1 = nnx.Optimizer(m1, optax.sgd(0.1), wrt=nnx.Param)
        step1 = sh.make_train_step(loss_fn)
        whole = {"inputs": toks[:, :-1], "targets": toks[:, 1:]}
        res["want_losses"] = [float(step1(m1, o1, whole)) for _ in range(2)]
    print(json.dumps(res), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
