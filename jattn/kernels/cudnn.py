"""``implementation="cudnn"``: delegation to ``jax.nn.dot_product_attention`` with cuDNN.

cuDNN's fused attention takes a subset of what jattn does: float16/bfloat16 inputs, one head
dim for queries, keys and values (a multiple of 8, at most 128, or 256 from Hopper on),
grouped-query attention, top-left causal masking, per-batch sequence lengths and left-only
sliding windows. The registry refuses the features outside :data:`SUPPORTS` (softcap, bias,
dense masks, segment ids, dropout, the log-sum-exp and the weights are left to the other
implementations: ``jax.nn`` passes neither softcap nor segment ids nor dropout to cuDNN, and a
bias's gradient and the residual's are not exported for every shape); what cuDNN lacks beyond
features (dtypes, head dims, the shape of the causal mask and window) raises
NotImplementedError here, naming it, before anything runs.

Rows with no visible key are zeroed here, whatever cuDNN returns for them, so the result keeps
jattn's contract (zeros, never NaN).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jattn.kernels.common import KernelOutput
from jattn.plan import Plan

Array = jax.Array

SUPPORTS = frozenset({"causal", "lengths", "local_window", "gqa"})

_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def _max_head_dim() -> int:
    """cuDNN flash attention takes head dims up to 256 from Hopper (sm90) on, 128 before."""
    try:
        cap = jax.devices("gpu")[0].compute_capability
        return 256 if tuple(int(x) for x in cap.split(".")) >= (9, 0) else 128
    except (RuntimeError, AttributeError, ValueError):
        return 256


def jax_nn_kwargs(plan: Plan) -> dict:
    """The ``jax.nn.dot_product_attention`` keyword arguments that make cuDNN compute this call
    (besides ``implementation``), or NotImplementedError naming what cuDNN does not take beyond
    what the registry states (``SUPPORTS``): dtypes, head dims, mask shapes."""
    if plan.dtype not in _DTYPES:
        raise NotImplementedError(
            f"cudnn does not support {plan.dtype} inputs (cuDNN takes float16 and bfloat16)"
        )
    h = plan.head_dim
    limit = _max_head_dim()
    if h % 8 or h > limit:
        raise NotImplementedError(
            f"cudnn does not support head dim {h} (cuDNN takes multiples of 8 up to {limit})"
        )
    mask_plan, arrays = plan.mask_plan()
    if mask_plan.offset or mask_plan.right not in (None, 0):
        raise NotImplementedError(
            "cudnn does not support causal with an offset or a right window other than 0 "
            "(cuDNN's causal mask is top-left aligned, its window left-only)"
        )
    if mask_plan.left is not None and mask_plan.right is None:
        raise NotImplementedError(
            "cudnn does not support local_window with an unbounded right side"
        )
    kw: dict = {"scale": plan.scale, "is_causal": mask_plan.right == 0}
    if mask_plan.left is not None:
        # With causal masking a window (left, right) is (left, 0); cuDNN takes exactly that.
        kw["local_window_size"] = (mask_plan.left, 0)
    if mask_plan.q_len:
        kw["query_seq_lengths"] = arrays.q_len
    if mask_plan.kv_len:
        kw["key_value_seq_lengths"] = arrays.kv_len
    return kw


def _empty_rows(plan: Plan, t: int, s: int) -> Array | None:
    """``[B or 1, T]``: True for the query rows that see no key, or None when none can."""
    mask_plan, arrays = plan.mask_plan()
    if not (mask_plan.kv_len or mask_plan.q_len or t > s):
        return None  # causal rows always see key 0, windows always see the diagonal
    lo, hi = mask_plan.row_bounds(arrays.columns(), jnp.arange(t, dtype=jnp.int32)[None, :], s)
    return lo >= hi


def cudnn_attention(q: Array, k: Array, v: Array, *, plan: Plan) -> KernelOutput:
    """Attention over whole arrays via cuDNN: ``q [*B, T, N, H]``, ``k/v [*B, S, K, H]`` ->
    ``out [*B, T, N, H]``; the mask leaves of ``plan`` are in :func:`jattn.attention`'s
    canonical ``[*B', K', G', ...]`` layout."""
    kw = jax_nn_kwargs(plan)
    *batch, t, n, h = q.shape
    s, kh = k.shape[-3], k.shape[-2]
    nb = math.prod(batch)
    out = jax.nn.dot_product_attention(
        q.reshape(nb, t, n, h),
        k.reshape(nb, s, kh, h),
        v.reshape(nb, s, kh, h),
        implementation="cudnn",
        **kw,
    )
    empty = _empty_rows(plan, t, s)
    if empty is not None:
        out = jnp.where(empty[:, :, None, None], jnp.zeros((), out.dtype), out)
    return KernelOutput(out.reshape(*batch, t, n, h), None, None)
