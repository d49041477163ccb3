"""Per-device memory of ring attention against single-device attention, from compiled programs.

    python -m bench.ring_memory [--devices 8] [--seq 4096 8192 16384 32768] [--impl flash fused]

Nothing runs: each program is compiled (on ``--devices`` host CPU devices, which this script
asks XLA for before JAX starts) and its ``memory_analysis()`` read. XLA's numbers are per
device for a sharded program: arguments (the device's shards of q, k, v), outputs and temporaries
(everything else the program holds live at its peak). The shapes are ``[1, T, N, H]`` in
float32, causal, forward and backward (the gradient of a sum of the output), the ring in the
zigzag layout. Prints a markdown table; ``--json FILE`` also writes the rows.
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ring_memory", description=__doc__)
    ap.add_argument("--devices", type=int, default=8, help="host CPU devices on the ring")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    ap.add_argument("--impl", nargs="+", default=["flash", "fused"], help="jattn kernels")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--mode", choices=["forward", "forward+backward"], default="forward+backward")
    ap.add_argument("--json", help="also write the rows as JSON lines to this file")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    # Must precede JAX's start: the number of host devices is fixed then.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import json

    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import jattn
    from jattn import parallel

    if len(jax.devices()) < args.devices:
        sys.exit(f"JAX sees {len(jax.devices())} devices, not {args.devices}: start it afresh")
    p = args.devices
    mesh = jax.make_mesh((p,), ("seq",), (jax.sharding.AxisType.Auto,))
    n, h = args.heads, args.head_dim

    def program(fn):
        if args.mode == "forward":
            return fn

        def loss(q, k, v):
            return jnp.sum(fn(q, k, v))

        return jax.grad(loss, argnums=(0, 1, 2))

    def analyse(fn, t: int, sharding) -> dict:
        spec = jax.ShapeDtypeStruct((1, t, n, h), jnp.float32, sharding=sharding)
        compiled = jax.jit(program(fn)).lower(spec, spec, spec).compile()
        m = compiled.memory_analysis()
        return {
            "args": m.argument_size_in_bytes,
            "out": m.output_size_in_bytes,
            "temp": m.temp_size_in_bytes,
            "peak": m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes,
        }

    rows = []
    for impl in args.impl:
        for t in args.seq:

            def single(q, k, v, impl=impl):
                return jattn.attention(q, k, v, is_causal=True, implementation=impl)

            def ring(q, k, v, impl=impl):
                return parallel.ring_attention(
                    q,
                    k,
                    v,
                    mesh=mesh,
                    axis_name="seq",
                    is_causal=True,
                    layout="zigzag",
                    implementation=impl,
                )

            seq_sharded = NamedSharding(mesh, PartitionSpec(None, "seq"))
            for kind, fn, sharding in (("single", single, None), ("ring", ring, seq_sharded)):
                row = {"impl": impl, "kind": kind, "T": t, "devices": 1 if kind == "single" else p}
                row.update(analyse(fn, t, sharding))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)

    mib = 2.0**20
    print(f"\n{args.mode}, causal, [1, T, {n}, {h}] float32; MiB per device\n")
    print("| kernel | T | single: temp | single: peak | ring: T/dev | ring: temp | ring: peak |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    by = {(r["impl"], r["kind"], r["T"]): r for r in rows}
    for impl in args.impl:
        for t in args.seq:
            s, r = by[(impl, "single", t)], by[(impl, "ring", t)]
            print(
                f"| {impl} | {t} | {s['temp'] / mib:.1f} | {s['peak'] / mib:.1f} | {t // p} | "
                f"{r['temp'] / mib:.1f} | {r['peak'] / mib:.1f} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
