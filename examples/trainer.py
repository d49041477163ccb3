"""The model and its optimizer as one NNX state, with the jitted train and eval steps.

Determinism: every random choice is a pure function of ``--seed`` and the step number (which
windows or examples make up batch ``s``, the dropout masks of step ``s``), so a run resumed
from a checkpoint at step ``s`` sees exactly what an uninterrupted run would have seen. That
is also why checkpoints hold only parameters, optimizer state and a little JSON: there is no
random-generator state to carry over.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Mapping
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jattn
from jattn.nn import sharding

__all__ = ["Trainer", "count_params", "flatten", "make_optimizer"]

Batch = Mapping[str, np.ndarray]


@lru_cache(maxsize=16)
def make_optimizer(
    kind: str,
    lr: float,
    warmup: int,
    steps: int,
    *,
    d_model: int = 0,
    weight_decay: float = 0.0,
    clip: float | None = 1.0,
) -> optax.GradientTransformation:
    """The optimizer of an example, memoised so that equal settings give the same object.

    The optimizer sits in the jitted step's static graph; handing back the very same object
    for equal settings lets a second run in one process (a resumed one, a test) reuse the
    compiled step.

    kind "cosine": AdamW, linear warm-up to ``lr`` then cosine decay to ``lr/10`` at
    ``steps``. kind "noam": Adam(0.9, 0.98, 1e-9) with the Transformer paper's warm-up
    schedule ``lr · d_model^-0.5 · min(s^-0.5, s · warmup^-1.5)`` (``lr`` is its ``scale``).
    """
    from jattn.optim import noam_schedule

    if kind == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, lr, max(warmup, 1), max(steps, warmup + 1), end_value=lr / 10
        )
        tx = optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=weight_decay)
    elif kind == "noam":
        tx = optax.adam(noam_schedule(d_model, warmup, scale=lr), b1=0.9, b2=0.98, eps=1e-9)
    else:
        raise ValueError(f"optimizer kind must be 'cosine' or 'noam', got {kind!r}")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx


def _fold_path(path: tuple[Any, ...], key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    # Each dropout stream gets its own key, derived from the step key and its place in the
    # model (crc32 of the path: stable across processes, unlike hash()).
    key = jax.random.fold_in(key, zlib.crc32(repr(path).encode()))
    return jax.random.split(key, shape) if shape else key


@partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2,))
def _train_step(
    graphdef: Any, loss_fn: Callable, state: Any, batch: Batch, key: jax.Array
) -> tuple[Any, jax.Array]:
    model, optimizer = nnx.merge(graphdef, state)
    # The dropout masks of a step depend on the seed and the step only (see the module doc).
    nnx.reseed(model, dropout=jax.random.fold_in(key, optimizer.step[...]), policy=_fold_path)
    (loss, _), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss


@partial(jax.jit, static_argnums=(0, 1))
def _eval_step(graphdef: Any, loss_fn: Callable, state: Any, batch: Batch) -> dict[str, Any]:
    model, _ = nnx.merge(graphdef, state)
    model.eval()
    return loss_fn(model, batch)[1]


def flatten(tree: Any) -> dict[str, np.ndarray]:
    """A nested dict of arrays as ``{"a/b/0/c": numpy array}``: the key of a leaf whatever
    the container types (an orbax restore without a target names list entries "0", an NNX
    pure dict 0), so checkpoints can be compared, hashed and loaded by path."""
    out: dict[str, np.ndarray] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(_key_name(p) for p in path)
        out[name] = np.asarray(leaf)
    return out


def _key_name(entry: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey, SequenceKey, GetAttrKey
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


class Trainer:
    """A model and its optimizer held as one NNX state, with jitted train and eval steps.

    ``loss_fn(model, batch) -> (loss, stats)`` must be hashable by value (a module-level
    function or a frozen dataclass): it is a static argument of the compiled steps. ``stats``
    is a dict of sums over the batch (e.g. ``nll_sum``, ``tokens``) that :meth:`evaluate`
    adds up over the validation batches.
    """

    def __init__(
        self,
        model: nnx.Module,
        tx: optax.GradientTransformation,
        loss_fn: Callable[[nnx.Module, Batch], tuple[jax.Array, dict[str, jax.Array]]],
        *,
        seed: int,
        mesh: Any = None,
    ):
        model.train()
        optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
        self.graphdef, self.state = nnx.split((model, optimizer))
        self.loss_fn = loss_fn
        self.dropout_key = jax.random.key(seed + 1)
        # On a mesh: parameters and optimizer moments sharded by path rules, batches split
        # over 'data'; the jitted steps then run as one SPMD program (XLA inserts the
        # collectives).
        self.mesh = mesh
        if mesh is not None:
            self.state = jax.device_put(self.state, sharding.state_shardings(self.state, mesh))

    @property
    def model(self) -> nnx.Module:
        """The model in evaluation mode (a fresh view of the current state)."""
        model = nnx.merge(self.graphdef, self.state)[0]
        model.eval()
        return model

    @property
    def step(self) -> int:
        return int(nnx.merge(self.graphdef, self.state)[1].step[...])

    def train_step(self, batch: Batch) -> jax.Array:
        batch = _to_device(batch)
        if self.mesh is not None:
            batch = sharding.shard_batch(batch, self.mesh)
        self.state, loss = _train_step(
            self.graphdef, self.loss_fn, self.state, batch, self.dropout_key
        )
        return loss

    def attention_kernels(self, batch: Batch) -> list[str]:
        """The jattn implementation each attention call of a training step on ``batch`` runs,
        in call order. The step's loss is traced abstractly (``jax.eval_shape``: nothing is
        computed or compiled), so this holds however often the step was compiled before."""

        def loss(state: Any, batch: Batch) -> jax.Array:
            model, _ = nnx.merge(self.graphdef, state)
            return self.loss_fn(model, batch)[0]

        with jattn.kernels.record_choices() as names:
            jax.eval_shape(loss, self.state, dict(batch))
        return names

    def evaluate(self, batches: Iterable[Batch]) -> dict[str, float]:
        """Sums the loss function's stats over ``batches``."""
        totals: dict[str, Any] = {}
        for batch in batches:
            stats = _eval_step(self.graphdef, self.loss_fn, self.state, _to_device(batch))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
        return {k: float(v) for k, v in totals.items()}

    # The pieces a checkpoint holds: parameters and optimizer state (with its step counter).
    def checkpoint_tree(self) -> dict[str, Any]:
        model, optimizer = nnx.merge(self.graphdef, self.state)
        return {
            "params": nnx.to_pure_dict(nnx.state(model, nnx.Param)),
            "optimizer": nnx.to_pure_dict(nnx.state(optimizer)),
        }

    def load_checkpoint_tree(self, saved: Mapping[str, Any]) -> None:
        """Loads a checkpoint tree, matched to this model by :func:`flatten`'s paths (so a
        tree restored without a target loads too). Raises ``ValueError`` on a mismatch."""
        saved = flatten(saved)
        template = self.checkpoint_tree()
        want = flatten(template)
        if want.keys() != saved.keys() or any(want[k].shape != saved[k].shape for k in want):
            diff = (
                sorted(want.keys() ^ saved.keys())[:3]
                or [k for k in want if want[k].shape != saved[k].shape][:3]
            )
            raise ValueError(f"the checkpoint does not fit this model (at {', '.join(diff)})")
        leaves, treedef = jax.tree_util.tree_flatten(template)
        # Host copies, in the model's dtypes: arrays straight from orbax are committed to a
        # device, and committed arguments would make jax compile the steps again.
        order = list(want)
        tree = jax.tree_util.tree_unflatten(
            treedef,
            [jnp.asarray(saved[k].astype(w.dtype)) for k, w in zip(order, leaves, strict=True)],
        )
        model, optimizer = nnx.merge(self.graphdef, self.state)
        for node, pure in ((model, tree["params"]), (optimizer, tree["optimizer"])):
            state = nnx.state(node, nnx.Param) if node is model else nnx.state(node)
            nnx.replace_by_pure_dict(state, pure)
            nnx.update(node, state)
        self.state = nnx.state((model, optimizer))
        if self.mesh is not None:
            self.state = jax.device_put(self.state, sharding.state_shardings(self.state, self.mesh))


def _to_device(batch: Batch) -> dict[str, jax.Array]:
    return {k: jnp.asarray(v) for k, v in batch.items()}


def count_params(model: nnx.Module) -> int:
    return int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
