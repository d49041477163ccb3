"""``jattn.attention``: validation, mask building, implementation choice, vmap over heads/batch."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _dropout, kernels
from jattn import masks as masks_lib
from jattn.kernels.common import KernelOutput, Spec

__all__ = ["attention"]

Array = jax.Array
ArrayLike = Any


def attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    bias: ArrayLike | None = None,
    mask: ArrayLike | masks_lib.Mask | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    softcap: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> Array | tuple[Array, ...]:
    """Scaled dot-product attention, ``softmax(softcap(scale · q kᵀ) + bias) v`` under a mask.

    Shapes follow ``jax.nn.dot_product_attention`` (``*B`` is any number of batch dims)::

      query [*B, T, N, H]   key [*B, S, K, H]   value [*B, S, K, Hv]   ->   [*B, T, N, Hv]

    with ``N % K == 0``: ``K < N`` is grouped-query attention (``K == 1``: multi-query); each
    group of ``N // K`` query heads reads the same K/V head, which is never repeated in memory.

    Args:
      query, key, value: arrays as above, all of one floating dtype.
      bias: additive, broadcastable to ``[*B, N, T, S]``; differentiable.
      mask: boolean broadcastable to ``[*B, N, T, S]`` (True = attend), or a
        :mod:`jattn.masks` object.
      scale: logit scale; default ``1 / sqrt(H)``.
      is_causal: key ``j`` visible from query ``i`` iff ``j <= i`` (top-left aligned, as jax.nn).
      query_seq_lengths, key_value_seq_lengths: int ``[*B]``; positions past them are padding.
        Padded query rows return zeros.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys ``i-left..i+right``.
      segment_ids: int ``[*B, T]`` (self attention, T == S) or a pair ``(q_ids [*B, T],
        kv_ids [*B, S])``: attend only within equal ids (sequence packing).
      softcap: ``c`` applies ``c · tanh(logits / c)`` to the scaled logits, before bias and mask.
      dropout_rate: probability of dropping an attention weight; needs ``dropout_rng``.
      dropout_rng: a PRNG key. The dropout pattern depends only on the key and positions, so
        every implementation draws the same one.
      implementation: None picks the fastest implementation that supports the call on this
        backend; a name forces one (see ``jattn.kernels.REGISTRY``); a list tries each in order.
      config: the tuning dataclass of the chosen implementation (e.g.
        ``jattn.kernels.flash.FlashConfig(block_q=256, block_k=512)``); None uses its
        heuristic default for the backend and shapes. Ignored by implementations of another
        config type only when ``implementation`` lists several names.
      return_weights: also return the attention weights ``[*B, N, T, S]`` (before dropout).
      return_lse: also return the log-sum-exp of each row's logits ``[*B, N, T]`` (float32;
        ``-inf`` for a row with no visible key), to merge partial results exactly.

    Returns:
      ``out``, or ``(out, weights)``, ``(out, lse)``, ``(out, weights, lse)``.

    A row with no key to attend to returns zeros, with zero gradient. Combined masking
    arguments are intersected.
    """
    q, k, v = _as_arrays(query, key, value)
    batch_shape, (t, n, h), (s, kh, hv) = _check_qkv(q, k, v)

    mask_obj = _build_mask(
        mask, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids
    )
    ctx = masks_lib._Context(batch_shape, n, kh, t, s)
    if mask_obj is not None:
        mask_obj = mask_obj._canonical(ctx)

    if bias is not None:
        bias = jnp.asarray(bias)
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be floating point, got dtype {bias.dtype}")
        bias = ctx.leaf(bias, "bias", (t, s), heads=True, broadcast_tail=True)

    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise ValueError(f"softcap must be a positive number, got {softcap!r}")
    if scale is None:
        scale = 1.0 / math.sqrt(h)
    elif not isinstance(scale, (int, float, np.floating)):
        raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")

    seeds = None
    if not (isinstance(dropout_rate, (int, float)) and 0.0 <= dropout_rate < 1.0):
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng (a PRNG key)")
        seed = _dropout.seed_from_key(dropout_rng)
        head_ids = jnp.arange(math.prod(batch_shape) * n, dtype=jnp.uint32)
        seeds = _dropout.head_seed(seed, head_ids).reshape(batch_shape + (kh, n // kh))

    needed = set() if mask_obj is None else set(mask_obj._features())
    needed |= {
        name
        for name, on in [
            ("bias", bias is not None),
            ("softcap", softcap is not None),
            ("dropout", dropout_rate > 0.0),
            ("return_weights", return_weights),
            ("return_lse", return_lse),
            ("float64", q.dtype == jnp.float64),
            ("gqa", kh != n),
            ("value_head_dim", hv != h),
        ]
        if on
    }
    candidates, reasons = _candidates(implementation, needed, t, s)
    for impl in candidates:
        spec = Spec(
            scale=float(scale),
            softcap=None if softcap is None else float(softcap),
            dropout_rate=float(dropout_rate),
            return_weights=bool(return_weights),
            return_lse=bool(return_lse),
            config=_config_for(impl, config, implementation, q, k, needed),
            mask=mask_obj,
            bias=bias,
            dropout_seed=seeds,
        )
        try:
            out, lse, weights = _run(impl.name, q, k, v, spec)
            break
        except NotImplementedError as e:
            # A kernel may refuse a call only it can judge (cuDNN: dtypes, head dims, mask
            # values); the next candidate takes it.
            if len(candidates) == 1 and isinstance(implementation, str):
                raise
            reasons.append(f"{impl.name!r}: {e}")
    else:
        raise NotImplementedError("; ".join(reasons))

    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extra) if extra else out


# ---------------------------------------------------------------------------------------------
# Validation.


def _as_arrays(*xs: ArrayLike) -> list[Array]:
    out = []
    for name, x in zip(("query", "key", "value"), xs, strict=True):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
        out.append(x)
    return out


def _check_qkv(q: Array, k: Array, v: Array):
    if q.ndim < 3:
        raise ValueError(f"query must be [*batch, T, N, H] (rank >= 3), got shape {q.shape}")
    if k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "query, key and value must have the same rank: got query "
            f"{q.shape}, key {k.shape}, value {v.shape}"
        )
    batch = q.shape[:-3]
    if k.shape[:-3] != batch or v.shape[:-3] != batch:
        raise ValueError(
            f"batch dims differ: query {q.shape} has batch {batch}, key {k.shape}, value {v.shape}"
        )
    t, n, h = q.shape[-3:]
    s, kh, hk = k.shape[-3:]
    sv, khv, hv = v.shape[-3:]
    if hk != h:
        raise ValueError(f"query and key head dims differ: query {q.shape}, key {k.shape}")
    if (sv, khv) != (s, kh):
        raise ValueError(
            f"key and value must agree on length and heads: key {k.shape}, value {v.shape}"
        )
    if kh == 0 or n % kh != 0:
        raise ValueError(
            f"the number of query heads ({n}, query {q.shape}) must be a multiple of the "
            f"number of key/value heads ({kh}, key {k.shape})"
        )
    for name, x in (("query", q), ("key", k), ("value", v)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"query, key and value must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    return batch, (t, n, h), (s, kh, hv)


def _build_mask(mask, is_causal, q_lengths, kv_lengths, window, segment_ids):
    parts: list[masks_lib.Mask] = []
    if mask is not None:
        if isinstance(mask, masks_lib.Mask):
            parts.append(mask)
        else:
            parts.append(masks_lib.Dense(mask))
    if is_causal:
        parts.append(masks_lib.Causal(0))
    if window is not None:
        if isinstance(window, (int, np.integer)) and not isinstance(window, bool):
            window = (int(window), int(window))
        if (
            not isinstance(window, (tuple, list))
            or len(window) != 2
            or not all(isinstance(w, (int, np.integer)) for w in window)
        ):
            raise TypeError(f"local_window_size must be an int or a pair of ints, got {window!r}")
        if window[0] < 0 or window[1] < 0:
            raise ValueError(f"local_window_size must be non-negative, got {tuple(window)}")
        parts.append(masks_lib.LocalWindow(int(window[0]), int(window[1])))
    if q_lengths is not None or kv_lengths is not None:
        parts.append(masks_lib.Lengths(q_lengths, kv_lengths))
    if segment_ids is not None:
        if isinstance(segment_ids, (tuple, list)):
            if len(segment_ids) != 2:
                raise ValueError(
                    "segment_ids must be one array or a pair (q_ids, kv_ids), got "
                    f"{len(segment_ids)} items"
                )
            parts.append(masks_lib.Segments(*segment_ids))
        else:
            parts.append(masks_lib.Segments(segment_ids, segment_ids))
    if not parts:
        return None
    return functools.reduce(lambda a, b: a & b, parts)


def _candidates(
    implementation, needed: set[str], t: int, s: int
) -> tuple[list[kernels.Implementation], list[str]]:
    """The implementations to try in order, and why the others were passed over."""
    backend = jax.default_backend()
    reasons: list[str] = []
    if implementation is None:
        out = []
        for name in kernels.default_order(backend, t, s):
            impl = kernels.REGISTRY[name]
            if backend in impl.backends and not impl.missing(needed):
                out.append(impl)
        if not out:
            raise NotImplementedError(f"no implementation supports {sorted(needed)} on {backend}")
        return out, reasons

    names = [implementation] if isinstance(implementation, str) else list(implementation)
    if not names:
        raise ValueError("implementation must be None, a name or a non-empty list of names")
    out = []
    for name in names:
        if not isinstance(name, str) or name not in kernels.REGISTRY:
            raise ValueError(f"unknown implementation {name!r}; known: {sorted(kernels.REGISTRY)}")
        impl = kernels.REGISTRY[name]
        if backend not in impl.backends | impl.interpret_backends:
            reasons.append(f"{name!r} does not run on backend {backend!r}")
        elif missing := impl.missing(needed):
            reasons.append(f"{name!r} does not support {', '.join(missing)}")
        else:
            out.append(impl)
    if not out:
        raise NotImplementedError("; ".join(reasons))
    return out, reasons


def _config_for(
    impl: kernels.Implementation, config, implementation, q: Array, k: Array, needed: set[str]
):
    """The user's config when it is of the implementation's type, else its heuristic one."""
    if config is not None and not (
        impl.config_type is not None and isinstance(config, impl.config_type)
    ):
        if isinstance(implementation, str):
            want = impl.config_type.__name__ if impl.config_type else "no config"
            raise TypeError(
                f"config of type {type(config).__name__} does not fit implementation "
                f"{impl.name!r}, which takes {want}"
            )
        config = None
    if config is None and impl.config_fn is not None:
        backend = jax.default_backend()
        config = impl.config_fn(q.shape, k.shape, q.dtype, backend, features=frozenset(needed))
    return config


# ---------------------------------------------------------------------------------------------
# Layout and vmap.


@functools.partial(jax.jit, static_argnames=("impl_name",))
def _run(impl_name: str, q: Array, k: Array, v: Array, spec: Spec):
    impl = kernels.REGISTRY[impl_name]
    if impl.batched:
        # Whole-array implementations (one Pallas launch, cuDNN) take the user's layout and
        # the spec's leaves in their canonical [*B', K', G', ...] form, and index heads
        # themselves.
        res = impl.fn(q, k, v, spec=spec)
        return res.out, res.lse, res.weights
    nb = q.ndim - 3
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    g = n // kh
    perm = tuple(range(nb))
    # [*B, T, N, H] -> [*B, K, G, T, H]; [*B, S, K, H] -> [*B, K, 1, S, H]
    qh = q.reshape(*batch, t, kh, g, h).transpose(*perm, nb + 1, nb + 2, nb, nb + 3)
    kk = jnp.swapaxes(k, nb, nb + 1)[..., None, :, :]
    vv = jnp.swapaxes(v, nb, nb + 1)[..., None, :, :]

    def one_head(q1, k1, v1, spec1):
        return impl.fn(q1, k1, v1, spec=spec1)

    res: KernelOutput = _vmap_leading(one_head, (qh, kk, vv, spec), (*batch, kh, g))
    out = res.out.reshape(*batch, n, t, hv)
    out = jnp.moveaxis(out, nb, nb + 1)
    lse = None if res.lse is None else res.lse.reshape(*batch, n, t)
    weights = None if res.weights is None else res.weights.reshape(*batch, n, t, s)
    return out, lse, weights


def _vmap_leading(fn, args: tuple, sizes: tuple[int, ...]):
    """Calls ``fn`` on per-head slices through one ``jax.vmap`` per leading axis.

    Every array leaf of ``args`` has the leading axes ``sizes``, each either full or 1; a leaf
    with 1 there is broadcast (``in_axes=None``), so masks, biases and K/V are shared across the
    axes they do not vary along instead of being copied.
    """
    if not sizes:
        return fn(*args)
    size, rest = sizes[0], sizes[1:]
    leaves, treedef = jax.tree.flatten(args)
    axes = [0 if size > 1 and x.shape[0] == size else None for x in leaves]
    sliced = [x if a == 0 else x[0] for x, a in zip(leaves, axes, strict=True)]

    def inner(*ls):
        return _vmap_leading(fn, jax.tree.unflatten(treedef, ls), rest)

    if size == 1:
        return jax.tree.map(lambda y: y[None], inner(*sliced))
    return jax.vmap(inner, in_axes=axes)(*sliced)
