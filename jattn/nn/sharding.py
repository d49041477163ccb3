"""Putting jattn's Flax NNX models on a device mesh: data parallel, FSDP and tensor parallel.

Nothing here is specific to one model: parameters are placed by *rules*, regular expressions on
their path in the module tree (``"layers/0/self_attn/query/kernel"``) that map to a
``PartitionSpec``. The same rules place the optimizer's state, whose moments live under paths
that end like the parameters' (``"opt_state/0/mu/layers/0/self_attn/query/kernel"``). Under
``jax.jit`` the compiler (GSPMD) then partitions the computation to follow the parameters and
the batch, inserting the all-gathers and reductions itself; the numbers are those of one
device, up to the order of float sums.

Typical use::

    mesh = make_mesh(data=4, model=2)                 # 8 devices
    model = shard_model(DecoderLM(...), mesh)         # parameters placed by default_rules()
    optimizer = shard_model(nnx.Optimizer(model, optax.adamw(3e-4), wrt=nnx.Param), mesh)
    step = make_train_step(loss_fn, mesh=mesh)        # loss_fn(model, batch) -> scalar
    loss = step(model, optimizer, shard_batch(batch, mesh))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "Rules",
    "create_sharded",
    "default_rules",
    "make_mesh",
    "make_train_step",
    "param_path",
    "partition_spec",
    "shard_batch",
    "shard_model",
    "state_shardings",
]

# (regular expression searched in the path, one mesh axis / tuple of axes / None per dim).
Rules = Sequence[tuple[str, Sequence[str | tuple[str, ...] | None]]]


def make_mesh(
    data: int = -1,
    model: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
    data_axis: str = "data",
    model_axis: str = "model",
) -> Mesh:
    """A 2-D mesh ``(data, model)`` over ``devices`` (default: all of ``jax.devices()``).

    ``data=-1`` takes every device that ``model`` leaves. The axes are ``Auto`` (the compiler
    propagates shardings), which is what :func:`make_train_step` and ``NamedSharding``
    annotations expect.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1:
        raise ValueError(f"model must be a positive number of devices, got {model=}")
    if data == -1:
        if len(devices) % model:
            raise ValueError(f"{model=} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data < 1 or data * model > len(devices):
        raise ValueError(
            f"a mesh of data={data} x model={model} needs {data * model} devices, "
            f"{len(devices)} available"
        )
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh(
        (data, model), (data_axis, model_axis), (auto, auto), devices=devices[: data * model]
    )


def default_rules(
    *,
    fsdp: bool = True,
    tensor_parallel: bool = True,
    data_axis: str = "data",
    model_axis: str = "model",
) -> tuple[tuple[str, tuple], ...]:
    """Placement rules for :class:`~jattn.nn.Transformer`, :class:`~jattn.nn.DecoderLM` and
    their layers.

    ``tensor_parallel`` splits every attention layer by heads and every feed-forward layer by
    its hidden units over ``model_axis`` (Megatron-LM's layout: the query/key/value and "up"
    kernels by columns, the output and "down" kernels by rows, so each layer needs one
    reduction), and the vocabulary of embeddings and the output projection likewise. ``fsdp``
    also splits the other dimension of every matrix over ``data_axis`` (ZeRO-3 / FSDP: each
    data-parallel replica stores a slice of the weights and gathers them when used). Neither:
    plain data parallelism, every parameter replicated. Vectors (biases, norms) not listed stay
    replicated. A dim that the mesh axis does not divide is left unsplit.
    """
    m = model_axis if tensor_parallel else None
    d = data_axis if fsdp else None
    return (
        (r"(^|/)(query|key|value)/kernel$", (d, m)),  # [d_model, heads * head_dim]
        (r"(^|/)(query|key|value)/bias$", (m,)),
        (r"(^|/)out/kernel$", (m, d)),  # [heads * head_dim, d_model]
        (r"(^|/)up/kernel$", (d, m)),  # [d_model, d_ff]
        (r"(^|/)up/bias$", (m,)),
        (r"(^|/)down/kernel$", (m, d)),  # [d_ff, d_model]
        (r"(^|/)embedding$", (m, d)),  # [vocab or max_length, d_model]
        (r"(^|/)output/kernel$", (d, m)),  # [d_model, vocab]
        (r"(^|/)output/bias$", (m,)),
    )


def param_path(path: Sequence[Any]) -> str:
    """A ``jax.tree_util`` key path of a state leaf -> ``"layers/0/self_attn/query/kernel"``."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":  # nnx.Variable's own field
                parts.append(k.name)
        else:
            parts.append(str(k))
    return "/".join(parts)


def partition_spec(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """The ``PartitionSpec`` of the first rule whose pattern is found in ``path``.

    A rule written for another rank, an axis the mesh lacks, and a dim that the mesh axes do
    not divide all fall back to leaving that dim unsplit, so one rule set serves models of any
    size. No match: replicated.
    """
    for pattern, spec in rules:
        if re.search(pattern, path) is None:
            continue
        if len(spec) != len(shape):
            return PartitionSpec()
        out = []
        for dim, axes in zip(shape, spec, strict=True):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if any(a not in mesh.shape for a in names):
                names = ()
            size = 1
            for a in names:
                size *= mesh.shape[a]
            ok = names and size > 1 and dim % size == 0
            out.append((names[0] if len(names) == 1 else names) if ok else None)
        return PartitionSpec(*out)
    return PartitionSpec()


def state_shardings(state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A ``NamedSharding`` for every leaf of an NNX state (or any pytree), by path rules.

    Returns a pytree of the same structure as ``state`` (``nnx.State`` included), to pass to
    ``jax.device_put``, ``jax.lax.with_sharding_constraint`` or ``jax.jit``'s shardings.
    """
    rules = default_rules() if rules is None else rules

    def one(path, leaf):
        shape = getattr(leaf, "shape", ())
        return NamedSharding(mesh, partition_spec(param_path(path), shape, mesh, rules))

    return jax.tree_util.tree_map_with_path(one, state)


def shard_model(node: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Places the state of ``node`` (a model, an ``nnx.Optimizer``, any NNX object) on
    ``mesh`` by ``rules`` (default :func:`default_rules`), in place; returns ``node``.

    Parameters, optimizer moments, RNG keys and counters alike: whatever no rule matches is
    replicated on every device.
    """
    state = nnx.state(node)
    nnx.update(node, jax.device_put(state, state_shardings(state, mesh, rules)))
    return node


def create_sharded(factory: Callable[[], Any], mesh: Mesh, rules: Rules | None = None) -> Any:
    """Builds ``factory()`` (e.g. ``lambda: DecoderLM(..., rngs=nnx.Rngs(0))``) with its state
    created where ``rules`` place it.

    The constructor runs under ``jit`` with sharding constraints on its output, so every device
    computes and stores only its own shards: no host ever holds the whole model, which is what
    models larger than one device, and several hosts, need. The values are those of
    ``shard_model(factory(), mesh, rules)``, up to the rounding of initialisers under ``jit``.
    """

    @nnx.jit
    def create():
        node = factory()
        state = nnx.state(node)
        nnx.update(
            node, jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, rules))
        )
        return node

    return create()


def shard_batch(batch: Any, mesh: Mesh, *, data_axis: str = "data") -> Any:
    """Splits the leading (batch) dim of every array in ``batch`` over ``data_axis``.

    The batch size must be divisible by the size of that axis. For a batch that each host loads
    for itself, see ``jax.make_array_from_process_local_data`` (the multi-host README section).
    """
    size = mesh.shape[data_axis]

    def one(x):
        if x.ndim == 0:
            return jax.device_put(x, NamedSharding(mesh, PartitionSpec()))
        if x.shape[0] % size:
            raise ValueError(
                f"batch dim {x.shape[0]} (array {x.shape}) is not divisible by the "
                f"{size} devices of mesh axis {data_axis!r}"
            )
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(data_axis)))

    return jax.tree.map(one, batch)


def make_train_step(
    loss_fn: Callable[[Any, Any], jax.Array],
    *,
    mesh: Mesh | None = None,
    rules: Rules | None = None,
    data_axis: str = "data",
    has_aux: bool = False,
) -> Callable[..., Any]:
    """A jitted training step ``step(model, optimizer, batch) -> loss`` (or ``(loss, aux)``).

    ``loss_fn(model, batch)`` returns the scalar loss (and ``aux`` with ``has_aux``); the step
    takes its gradient with respect to the ``nnx.Param`` state, applies ``optimizer.update``
    and updates ``model`` and ``optimizer`` in place. With a ``mesh``, the batch is split over
    ``data_axis`` and the new parameters and optimizer state are kept where ``rules`` put them
    (by ``with_sharding_constraint``, so they never drift to what the compiler prefers); place
    them there first with :func:`shard_model`. Without one it is an ordinary single-device step.
    """
    grad_fn = nnx.value_and_grad(loss_fn, has_aux=has_aux)

    def constrain(node):
        state = nnx.state(node)
        nnx.update(
            node, jax.lax.with_sharding_constraint(state, state_shardings(state, mesh, rules))
        )

    @nnx.jit
    def step(model, optimizer, batch):
        if mesh is not None:
            batch = jax.tree.map(
                lambda x: jax.lax.with_sharding_constraint(
                    x, NamedSharding(mesh, PartitionSpec(data_axis) if x.ndim else PartitionSpec())
                ),
                batch,
            )
        out, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        if mesh is not None:
            constrain(model)
            constrain(optimizer)
        return out

    return step
