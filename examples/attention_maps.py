"""Attention weights of one layer of a trained model, for the heatmaps.

The layer sows them: :class:`jattn.nn.MultiHeadAttention` with ``sow_weights`` on stores
each call's weights as ``nnx.Intermediate`` ``attention_weights``, and ``nnx.capture``
collects them. Kernels that never materialise the weights (``flash``) cannot sow them, so the
copy that is run leaves the choice of kernel to jattn, which then takes one that can.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

__all__ = ["sown_attention"]


def sown_attention(
    model: nnx.Module, path: Sequence[str | int], run: Callable[[nnx.Module], Any]
) -> np.ndarray:
    """The attention weights ``[*B, heads, T, S]`` of one layer while ``run(model)`` runs.

    ``path`` names a :class:`jattn.nn.MultiHeadAttention` inside ``model`` (e.g.
    ``("layers", -1, "self_attn")``); the model itself is not touched (an evaluation-mode copy
    runs, with that layer sowing).
    """
    copy = nnx.clone(model)
    copy.eval()
    layer = copy
    for part in path:
        layer = layer[part] if isinstance(part, int) else getattr(layer, part)
    layer.sow_weights = True
    layer.implementation = None  # a kernel that returns weights, whichever trained the model
    graphdef, state = nnx.split(copy)

    @jax.jit  # one compiled forward pass rather than hundreds of eager operations
    def weights(state: Any) -> jax.Array:
        _, sown = nnx.capture(run, nnx.Intermediate)(nnx.merge(graphdef, state))
        found = [
            leaf
            for p, leaf in jax.tree_util.tree_leaves_with_path(sown)
            if any(getattr(k, "key", None) == "attention_weights" for k in p)
        ]
        if not found:
            raise RuntimeError(f"the attention layer at {tuple(path)} was not called")
        return found[-1]  # the layer's last call

    return np.asarray(weights(state))
