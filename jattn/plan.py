"""The plan of an attention call: :func:`jattn.attention`'s arguments, validated once.

:func:`make_plan` checks every argument (naming it and the shapes seen when it is wrong) and
brings it to one canonical form, a frozen :class:`Plan`. Kernels, the registry and ring
attention read only the plan, never the user's arguments:

- static facts (part of the compiled program): the shapes, the dtype, ``scale``, ``softcap``,
  ``dropout_rate``, what to return, the registry features the call needs, and the chosen
  implementation's tuning ``config``;
- leaves (arrays): the mask as a :mod:`jattn.masks` object whose arrays are in the canonical
  layout ``[*B', K', G', ...]`` (each leading dim either full or 1: K' the key/value heads, G'
  the query heads of a group), the bias in the same layout, and one dropout seed per head.

Kernels that do not evaluate mask objects read :meth:`Plan.mask_plan`: the mask as static
bounds plus per-batch arrays (:class:`jattn.masks.MaskPlan`). Single-head kernels receive the
plan with its leaves sliced to one batch element and head by :func:`jattn.attention`.

Example:

>>> import jax.numpy as jnp
>>> from jattn.plan import make_plan
>>> q = jnp.ones((2, 16, 4, 8), jnp.float32)
>>> kv = jnp.ones((2, 32, 2, 8), jnp.float32)
>>> plan, *_ = make_plan(q, kv, kv, is_causal=True, key_value_seq_lengths=jnp.array([32, 20]))
>>> plan.group_size, sorted(plan.features)
(2, ['causal', 'gqa', 'lengths'])
>>> mask_plan, arrays = plan.mask_plan()
>>> mask_plan.right, arrays.kv_len.tolist()
(0, [32, 20])
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jattn import _dropout, masks

__all__ = ["FEATURES", "Plan", "make_plan", "parse_segment_ids", "parse_window"]

Array = jax.Array
ArrayLike = Any

# Every feature a call can need (Plan.features); each implementation in the registry lists
# those it supports.
FEATURES = frozenset(
    {
        "bias",
        "causal",
        "local_window",
        "chunked",  # masks.Chunked
        "lengths",
        "segments",
        "dense_mask",
        "mask_algebra",  # `|` and `~` of masks
        "softcap",
        # A learned logit per head in each row's softmax, without a value; jattn.api merges
        # it through the log-sum-exp, so an implementation with "sinks" returns the lse.
        "sinks",
        "dropout",
        "return_weights",
        "return_lse",
        "float64",
        "gqa",
        "value_head_dim",  # value head dim != query head dim
    }
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One attention call, canonical. Shapes: ``query [*B, T, N, H]``, ``key [*B, S, K, H]``,
    ``value [*B, S, K, Hv]``; ``N = K * G``.

    Attributes:
      batch_shape, q_seq_len, kv_seq_len, num_heads, num_kv_heads, head_dim, value_head_dim:
        ``*B``, ``T``, ``S``, ``N``, ``K``, ``H``, ``Hv``.
      dtype: the inputs' dtype.
      scale: the logit scale (a Python float).
      softcap: ``c`` of ``c · tanh(logits / c)``, or None.
      dropout_rate: a Python float in ``[0, 1)``.
      return_weights, return_lse: what the caller wants back.
      features: the :data:`jattn.kernels.FEATURES` the call needs.
      config: the tuning dataclass of the implementation that runs the call (None until
        :func:`jattn.attention` chose one; see :meth:`with_config`).
      mask: a canonical :mod:`jattn.masks` object, or None.
      bias: float ``[*B', K', G', T', S']`` (each dim full or 1), or None.
      dropout_seed: uint32 ``[*B, K, G]``, one per head, or None.
      sinks: float ``[*B', K', G']`` (each dim full or 1), one sink logit per query head, or
        None. Kernels never read it: :func:`jattn.attention` merges it into the kernel's
        output through the log-sum-exp (``return_lse`` is then True for the kernel).
      value_in_key: the values are the keys' first ``value_head_dim`` features (the call
        gave ``value=None, value_dim=...``): the ``value`` a kernel receives is that slice of
        ``key``, and a kernel that can read it in place (the native CPU kernel) may take
        ``key`` instead, so that the one array is read once.
    """

    batch_shape: tuple[int, ...]
    q_seq_len: int
    kv_seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_head_dim: int
    dtype: np.dtype
    scale: float
    softcap: float | None = None
    dropout_rate: float = 0.0
    return_weights: bool = False
    return_lse: bool = False
    features: frozenset[str] = frozenset()
    config: Any = None
    mask: masks.Mask | None = None
    bias: Array | None = None
    dropout_seed: Array | None = None
    sinks: Array | None = None
    value_in_key: bool = False

    @property
    def group_size(self) -> int:
        """``G = N // K``: query heads that share one key/value head."""
        return self.num_heads // max(self.num_kv_heads, 1)

    @property
    def num_scores(self) -> int:
        """``T · S``, the scores of one head."""
        return self.q_seq_len * self.kv_seq_len

    def mask_plan(self) -> tuple[masks.MaskPlan, masks.MaskArrays]:
        """The mask as static bounds plus per-batch arrays (batch flattened to one axis)."""
        return masks.lower(self.mask, self.batch_shape)

    def with_config(self, config: Any) -> Plan:
        return dataclasses.replace(self, config=config)


jax.tree_util.register_dataclass(
    Plan,
    data_fields=["mask", "bias", "dropout_seed", "sinks"],
    meta_fields=[
        f.name
        for f in dataclasses.fields(Plan)
        if f.name not in ("mask", "bias", "dropout_seed", "sinks")
    ],
)


def make_plan(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike | None,
    bias: ArrayLike | None = None,
    mask: ArrayLike | masks.Mask | None = None,
    *,
    value_dim: int | None = None,
    scale: Any = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
) -> tuple[Plan, Array, Array, Array]:
    """Validates the arguments of :func:`jattn.attention` and returns ``(plan, q, k, v)``.

    ``q``/``k``/``v`` are the inputs as arrays; a traced ``scale`` is folded into ``q``
    (the plan's ``scale`` is then 1), and a head dim of 0 becomes 1 with zero entries (the
    logits are 0 either way). Raises ``TypeError``/``ValueError`` naming the argument.
    """
    q, k, v = _as_arrays(query, key, _value_of(key, value, value_dim))
    batch_shape, (t, n, h), (s, kh, hv) = _check_qkv(q, k, v)
    for name, flag in (
        ("is_causal", is_causal),
        ("return_weights", return_weights),
        ("return_lse", return_lse),
    ):
        if not isinstance(flag, (bool, np.bool_)):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__} {flag!r}")

    if segment_ids is not None and not isinstance(segment_ids, (tuple, list)) and t != s:
        raise ValueError(
            f"one segment_ids array needs T == S, got T={t} (query {q.shape}) and S={s} "
            f"(key {k.shape}); pass a pair (q_ids, kv_ids)"
        )
    shape = masks.CallShape(batch_shape, n, kh, t, s)
    mask_obj = _build_mask(
        mask, is_causal, query_seq_lengths, key_value_seq_lengths, local_window_size, segment_ids
    )
    if mask_obj is not None:
        mask_obj = mask_obj.canonicalize(shape)

    if bias is not None:
        bias = _as_array(bias, "bias")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise TypeError(f"bias must be floating point, got dtype {bias.dtype}")
        bias = shape.canonical_leaf(bias, "bias", (t, s), heads=True, broadcast_tail=True)

    if sinks is not None:
        sinks = _as_array(sinks, "sinks")
        if not jnp.issubdtype(sinks.dtype, jnp.floating):
            raise TypeError(f"sinks must be floating point (one logit per head), got {sinks.dtype}")
        sinks = shape.canonical_leaf(sinks, "sinks", (), heads=True, broadcast_tail=False)

    softcap = _static_number(softcap, "softcap", positive=True)
    if softcap is not None and softcap < np.finfo(np.float32).tiny:
        # Kernels take the cap as float32: there it would be 0 (no softcap) or subnormal.
        raise ValueError(
            f"softcap={softcap!r} is below float32's smallest normal number "
            f"({np.finfo(np.float32).tiny:.3g}), where kernels lose it; use a larger cap"
        )
    dropout_rate = _static_number(dropout_rate, "dropout_rate")
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")

    if scale is None:
        scale = 1.0 / math.sqrt(h) if h > 0 else 1.0
    elif isinstance(scale, jax.core.Tracer):
        scale = jnp.asarray(scale)
        real = jnp.issubdtype(scale.dtype, jnp.floating) or jnp.issubdtype(scale.dtype, jnp.integer)
        if scale.ndim != 0 or not real:
            raise TypeError(f"scale must be a real scalar, got {scale.dtype}{list(scale.shape)}")
        q = (q * scale.astype(q.dtype)).astype(q.dtype)
        scale = 1.0
    else:
        scale = _static_number(scale, "scale")
        if not math.isfinite(scale):
            raise ValueError(f"scale must be finite, got {scale!r}")

    seeds = None
    if dropout_rate > 0.0:
        if dropout_rng is None:
            raise ValueError(f"dropout_rate={dropout_rate} needs a dropout_rng (a PRNG key)")
        try:
            seed = _dropout.seed_from_key(dropout_rng)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"dropout_rng must be a PRNG key (jax.random.key or PRNGKey), got "
                f"{getattr(dropout_rng, 'dtype', type(dropout_rng).__name__)}"
                f"{list(getattr(dropout_rng, 'shape', ()))}"
            ) from e
        head_ids = jnp.arange(math.prod(batch_shape) * n, dtype=jnp.uint32)
        seeds = _dropout.head_seed(seed, head_ids).reshape(batch_shape + (kh, n // max(kh, 1)))

    if h == 0:  # zero-width heads: every logit is 0, the output an average of the values
        q = jnp.zeros((*q.shape[:-1], 1), q.dtype)
        k = jnp.zeros((*k.shape[:-1], 1), k.dtype)
        h = 1

    features = set() if mask_obj is None else set(mask_obj.features)
    if mask_obj is not None and masks.lower(mask_obj, batch_shape)[0].general:
        # An intersection that does not reduce to one of each part (two pairs of segment ids,
        # two chunk sizes that do not divide one another) needs the mask object itself.
        features.add("mask_algebra")
    features |= {
        name
        for name, on in [
            ("bias", bias is not None),
            ("softcap", softcap is not None),
            ("sinks", sinks is not None),
            ("dropout", dropout_rate > 0.0),
            ("return_weights", return_weights),
            ("return_lse", return_lse),
            ("float64", q.dtype == jnp.float64),
            ("gqa", kh != n),
            ("value_head_dim", hv != h),
        ]
        if on
    }
    plan = Plan(
        batch_shape=batch_shape,
        q_seq_len=t,
        kv_seq_len=s,
        num_heads=n,
        num_kv_heads=kh,
        head_dim=h,
        value_head_dim=hv,
        dtype=np.dtype(q.dtype),
        scale=float(scale),
        softcap=softcap,
        dropout_rate=dropout_rate,
        return_weights=bool(return_weights),
        return_lse=bool(return_lse) or sinks is not None,
        features=frozenset(features),
        mask=mask_obj,
        bias=bias,
        dropout_seed=seeds,
        sinks=sinks,
        value_in_key=value is None,
    )
    return plan, q, k, v


def parse_window(local_window_size: Any) -> tuple[int | None, int | None] | None:
    """``local_window_size`` as ``(left, right)`` (or None), as jax.nn reads it; a side may
    also be None (unbounded)."""
    w = local_window_size
    if w is None:
        return None
    if _is_int(w):
        w = (w, w)
    if (
        not isinstance(w, (tuple, list))
        or len(w) != 2
        or not all(x is None or _is_int(x) for x in w)
    ):
        raise TypeError(f"local_window_size must be an int or a pair of ints, got {w!r}")
    if any(x is not None and x < 0 for x in w):
        raise ValueError(f"local_window_size must be non-negative, got {tuple(w)}")
    return tuple(None if x is None else int(x) for x in w)


def parse_segment_ids(segment_ids: Any) -> tuple[Any, Any] | None:
    """``segment_ids`` as a pair ``(q_ids, kv_ids)`` (or None): one array means both."""
    if segment_ids is None:
        return None
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                "segment_ids must be one array or a pair (q_ids, kv_ids), got "
                f"{len(segment_ids)} items"
            )
        return segment_ids[0], segment_ids[1]
    return segment_ids, segment_ids


# ---------------------------------------------------------------------------------------------
# Validation.


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _static_number(x: Any, name: str, *, positive: bool = False) -> float | None:
    """A concrete real number (Python, NumPy or a concrete 0-d array) as a Python float."""
    if x is None:
        if positive:
            return None
        raise TypeError(f"{name} must be a number, got None")
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a static number (it shapes the compiled kernel), got a traced "
            f"value {x.aval}; pass it as a Python float or mark it static"
        )
    if isinstance(x, (bool, np.bool_)) or not (
        isinstance(x, numbers.Real) or (hasattr(x, "shape") and np.shape(x) == ())
    ):
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}")
    try:
        value = float(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be a real number, got {type(x).__name__} {x!r}") from e
    if positive and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {x!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {x!r}")
    return value


def _as_array(x: ArrayLike, name: str) -> Array:
    try:
        return jnp.asarray(x)
    except TypeError as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def _as_arrays(*xs: ArrayLike) -> list[Array]:
    return [_as_array(x, name) for name, x in zip(("query", "key", "value"), xs, strict=True)]


def _value_of(key: ArrayLike, value: ArrayLike | None, value_dim: Any) -> ArrayLike:
    """``value``, or with ``value=None`` the first ``value_dim`` features of each key."""
    if value is not None:
        if value_dim is not None:
            raise ValueError(
                f"pass value or value_dim, not both (value_dim={value_dim!r} says the values "
                "are the keys' first features)"
            )
        return value
    if value_dim is None:
        raise ValueError(
            "value is None: pass value_dim=d too (the values are then each key's first d "
            "features, as in multi-head latent attention's latent cache)"
        )
    if not _is_int(value_dim):
        raise TypeError(f"value_dim must be an int, got {type(value_dim).__name__} {value_dim!r}")
    k = _as_array(key, "key")
    h = k.shape[-1] if k.ndim else 0
    if not 1 <= value_dim <= h:
        raise ValueError(
            f"value_dim must be in [1, H] for key {k.shape} (H = {h}), got {value_dim}"
        )
    return k[..., :value_dim]


def _check_qkv(q: Array, k: Array, v: Array):
    if q.ndim < 3:
        raise ValueError(f"query must be [*batch, T, N, H] (rank >= 3), got shape {q.shape}")
    if k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "query, key and value must have the same rank: got query "
            f"{q.shape}, key {k.shape}, value {v.shape}"
        )
    batch = tuple(q.shape[:-3])
    if tuple(k.shape[:-3]) != batch or tuple(v.shape[:-3]) != batch:
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
    if (kh == 0) != (n == 0) or (kh != 0 and n % kh != 0):
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


def _build_mask(mask, is_causal, query_seq_lengths, key_value_seq_lengths, window, segment_ids):
    parts: list[masks.Mask] = []
    if mask is not None:
        parts.append(mask if isinstance(mask, masks.Mask) else masks.Dense(mask))
    if is_causal:
        parts.append(masks.Causal(0))
    if (w := parse_window(window)) is not None:
        parts.append(masks.LocalWindow(*w))
    if query_seq_lengths is not None or key_value_seq_lengths is not None:
        parts.append(masks.Lengths(query_seq_lengths, key_value_seq_lengths))
    if (ids := parse_segment_ids(segment_ids)) is not None:
        parts.append(masks.Segments(*ids))
    if not parts:
        return None
    return functools.reduce(lambda a, b: a & b, parts)
