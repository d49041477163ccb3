"""Multi-device checks, run in a subprocess with 8 host CPU devices (see test_parallel.py).

``python -m tests.parallel._checks ring|train`` sets ``XLA_FLAGS`` before JAX starts, runs each
check and prints one JSON line per check: its name and the measured errors. The pytest side
asserts on them, so the tolerances live in the tests; a check that raises prints its error.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)  # the float64 reference is the oracle

import jattn  # noqa: E402
from jattn import parallel  # noqa: E402
from jattn.kernels.flash import FlashConfig  # noqa: E402

AUTO = jax.sharding.AxisType.Auto


def _mesh(shape, names):
    return jax.make_mesh(shape, names, (AUTO,) * len(shape))


# ---------------------------------------------------------------------------------------------
# Ring attention against jattn.attention on one device.


def _inputs(b, t, s, n, k, h, dtype, seed=0):
    # numpy draws: jax.random.normal would compile once per shape and dtype.
    rng = np.random.default_rng(seed)
    shapes = [(b, t, n, h), (b, s, k, h), (b, s, k, h), (b, t, n, h), (b, n, t)]
    return tuple(
        jnp.asarray(rng.standard_normal(shape, dtype=np.float32)).astype(dtype) for shape in shapes
    )


def _outputs_and_grads(f, q, k, v, g_o, g_lse):
    """``(out, lse, dq, dk, dv)`` of ``f(q, k, v) -> (out, lse)`` for cotangents on both."""
    (out, lse), vjp = jax.vjp(f, q, k, v)
    g_lse = jnp.where(jnp.isneginf(lse), 0, g_lse)  # rows that see no key: any cotangent is 0
    return (out, lse, *vjp((g_o.astype(out.dtype), g_lse.astype(lse.dtype))))


def ring_case(
    name,
    *,
    mesh_shape=(2, 4),
    mesh_names=("data", "seq"),
    batch_axis="data",
    head_axis=None,
    layout="zigzag",
    b=2,
    t=32,
    s=None,
    n=4,
    k=2,
    h=8,
    dtype=jnp.float64,
    lengths=None,
    segments=False,
    use_set_mesh=False,
    explicit=False,
    **kw,
):
    s = t if s is None else s
    mesh = jax.make_mesh(mesh_shape, mesh_names) if explicit else _mesh(mesh_shape, mesh_names)
    p = mesh.shape["seq"]
    q, kk, v, g_o, g_lse = _inputs(b, t, s, n, k, h, dtype)
    extra = {}
    if lengths is not None:
        extra["query_seq_lengths"] = jnp.asarray(lengths[0])
        extra["key_value_seq_lengths"] = jnp.asarray(lengths[1])
    rng = np.random.default_rng(1)
    q_ids = kv_ids = None
    if segments:  # packed sequences: sorted ids with random boundaries
        q_ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1))
        kv_ids = q_ids if s == t else jnp.asarray(np.sort(rng.integers(0, 3, (b, s)), axis=1))

    def single(q, kk, v):
        seg = None if q_ids is None else (q_ids, kv_ids)
        q64, k64, v64 = (x.astype(jnp.float64) for x in (q, kk, v))
        return jattn.attention(
            q64,
            k64,
            v64,
            segment_ids=seg,
            implementation="reference",
            return_lse=True,
            **extra,
            **{a: b for a, b in kw.items() if a not in ("implementation", "config")},
        )

    def to(x, axis=1):
        return parallel.to_layout(x, p, layout=layout, axis=axis)

    def ring(q, kk, v):
        seg = None if q_ids is None else (to(q_ids), to(kv_ids))
        out, lse = parallel.ring_attention(
            to(q),
            to(kk),
            to(v),
            mesh=None if use_set_mesh else mesh,
            axis_name="seq",
            batch_axis=batch_axis,
            head_axis=head_axis,
            layout=layout,
            segment_ids=seg,
            return_lse=True,
            **extra,
            **kw,
        )
        back = functools.partial(parallel.from_layout, num_shards=p, layout=layout)
        return back(out, axis=1), back(lse, axis=-1)

    run = jax.jit(functools.partial(_outputs_and_grads, ring))
    if use_set_mesh:
        with jax.set_mesh(mesh):
            got = run(q, kk, v, g_o, g_lse)
    else:
        got = run(q, kk, v, g_o, g_lse)
    want = jax.jit(functools.partial(_outputs_and_grads, single))(q, kk, v, g_o, g_lse)
    want_lse, got_lse = want[1], got[1]
    errors = {}
    for label, w, g in zip(("out", "lse", "dq", "dk", "dv"), want, got, strict=True):
        w, g = np.asarray(w, np.float64), np.asarray(g, np.float64)
        both = np.isfinite(w) & np.isfinite(g)
        w, g = w[both], g[both]
        errors[label] = float(np.max(np.abs(w - g) / (1 + np.abs(w))))
    return {
        "name": name,
        "dtype": jnp.dtype(dtype).name,
        "errors": errors,
        "finite": all(bool(np.isfinite(np.asarray(x)).all()) for i, x in enumerate(got) if i != 1),
        "lse_neginf_match": bool(
            np.array_equal(np.isneginf(np.asarray(want_lse)), np.isneginf(np.asarray(got_lse)))
        ),
        "empty_rows": int(np.isneginf(np.asarray(want_lse)).sum()),
    }


LENGTHS = ([32, 11], [27, 0])  # batch 1: no key at all; batch 0: padded queries and keys

RING_CASES = {
    # without a positional mask a shard is one block, whatever the layout
    "contiguous": dict(layout="contiguous"),
    "contiguous_causal_lengths": dict(layout="contiguous", is_causal=True, lengths=LENGTHS),
    "zigzag_causal": dict(is_causal=True),
    "zigzag_causal_lengths_segments": dict(is_causal=True, lengths=LENGTHS, segments=True),
    "zigzag_lengths_segments": dict(lengths=LENGTHS, segments=True),
    "zigzag_window": dict(local_window_size=(5, 2), lengths=LENGTHS),
    "zigzag_causal_window_softcap": dict(
        is_causal=True, local_window_size=(6, 0), softcap=2.0, scale=0.5
    ),
    "cross_causal_t_ne_s": dict(t=32, s=16, is_causal=True, lengths=([30, 7], [16, 9])),
    # heads split over a second mesh axis (GQA groups stay whole), an Explicit-axes mesh set
    # with jax.set_mesh instead of passed
    "head_axis_explicit_set_mesh": dict(
        mesh_names=("model", "seq"),
        batch_axis=None,
        head_axis="model",
        is_causal=True,
        use_set_mesh=True,
        explicit=True,
    ),
    # one sink logit per head, counted once per row after the devices' partial results merge
    "zigzag_causal_lengths_sinks": dict(
        is_causal=True,
        lengths=LENGTHS,
        sinks=jnp.array([[0.5, -1.0, 2.0, 0.0], [1.0, -jnp.inf, 0.3, 3.0]]),
    ),
    "ring_of_8": dict(mesh_shape=(1, 8), b=1, t=16, is_causal=True, lengths=([13], [15])),
    "flash_float32": dict(
        dtype=jnp.float32,
        is_causal=True,
        lengths=LENGTHS,
        segments=True,
        implementation="flash",
        config=FlashConfig(4, 2),  # two key blocks per 4-long chunk: some skipped
    ),
    "fused_float32": dict(dtype=jnp.float32, is_causal=True, implementation="fused"),
}


# ---------------------------------------------------------------------------------------------
# A sharded training step against the unsharded one.


def train_case(name, *, model_kind, data, model, fsdp=True, tensor_parallel=True):
    import optax
    from flax import nnx

    from jattn.nn import DecoderLM, Transformer, cross_entropy
    from jattn.nn import sharding as sh

    jax.config.update("jax_enable_x64", False)  # the models train in float32
    vocab, b, t = 32, 8, 16
    toks = jax.random.randint(jax.random.key(1), (b, t + 1), 1, vocab)
    lengths = jnp.array([16, 5, 16, 9, 16, 16, 1, 12])
    where = jnp.arange(t)[None] < lengths[:, None]
    batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "lengths": lengths, "where": where}
    common = dict(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.0)
    if model_kind == "lm":

        def build():  # a fresh Rngs each time: every build has the same initial parameters
            return DecoderLM(vocab, num_layers=2, num_kv_heads=2, rngs=nnx.Rngs(0), **common)

        def loss_fn(m, batch):
            logits = m(batch["inputs"], lengths=batch["lengths"])
            return cross_entropy(logits, batch["targets"], where=batch["where"])
    else:

        def build():
            return Transformer(
                vocab, num_encoder_layers=1, num_decoder_layers=1, rngs=nnx.Rngs(0), **common
            )

        def loss_fn(m, batch):
            logits = m(
                batch["targets"],
                batch["inputs"],
                src_lengths=batch["lengths"],
                tgt_lengths=batch["lengths"],
            )
            return cross_entropy(logits, batch["targets"], where=batch["where"])

    def tx():
        return optax.sgd(0.5, momentum=0.9)

    m1 = build()
    o1 = nnx.Optimizer(m1, tx(), wrt=nnx.Param)
    step1 = sh.make_train_step(loss_fn)
    mesh = sh.make_mesh(data=data, model=model)
    rules = sh.default_rules(fsdp=fsdp, tensor_parallel=tensor_parallel)
    m2 = sh.shard_model(build(), mesh, rules)
    o2 = sh.shard_model(nnx.Optimizer(m2, tx(), wrt=nnx.Param), mesh, rules)
    step2 = sh.make_train_step(loss_fn, mesh=mesh, rules=rules)

    losses1, losses2 = [], []
    for _ in range(2):  # the second step also checks the momentum state
        losses1.append(float(step1(m1, o1, batch)))
        losses2.append(float(step2(m2, o2, sh.shard_batch(batch, mesh))))
    p1, p2 = nnx.state(m1, nnx.Param), nnx.state(m2, nnx.Param)

    def max_abs_diff(a, c):
        return float(jnp.max(jnp.abs(a - c)))

    init = nnx.state(build(), nnx.Param)
    specs = {}
    for path, x in jax.tree_util.tree_leaves_with_path(p2):
        key = sh.param_path(path)
        if key.endswith(("query/kernel", "down/kernel", "final_norm/scale", "embedding")):
            specs[key] = [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    opt_specs = {
        sh.param_path(path): [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
        for path, x in jax.tree_util.tree_leaves_with_path(nnx.state(o2))
        if sh.param_path(path).endswith("query/kernel")
    }
    return {
        "name": name,
        "losses": [losses1, losses2],
        "max_param_err": max(jax.tree.leaves(jax.tree.map(max_abs_diff, p1, p2))),
        "max_param_change": max(jax.tree.leaves(jax.tree.map(max_abs_diff, p1, init))),
        "specs": specs,
        "opt_specs": opt_specs,
        "devices": len(jax.devices()),
    }


TRAIN_CASES = {
    "lm_fsdp_tp": dict(model_kind="lm", data=4, model=2),
    "lm_data_parallel": dict(model_kind="lm", data=8, model=1, fsdp=False, tensor_parallel=False),
    "transformer_fsdp_tp": dict(model_kind="transformer", data=2, model=4),
}


def main(group: str) -> None:
    if group == "ring":
        cases = {k: functools.partial(ring_case, k, **v) for k, v in RING_CASES.items()}
    elif group == "train":
        cases = {k: functools.partial(train_case, k, **v) for k, v in TRAIN_CASES.items()}
    else:
        raise SystemExit(f"unknown group {group!r}: ring or train")
    only = set(sys.argv[2:])
    for name, fn in cases.items():
        if only and name not in only:
            continue
        try:
            res = fn()
        except Exception:  # reported to the test, which fails on it
            res = {"name": name, "error": traceback.format_exc()}
        print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
