"""The mask vocabulary: small immutable pytrees combined with ``&``, ``|`` and ``~``.

A mask says, for query position ``i`` and key position ``j`` of one head, whether ``i`` may
attend to ``j`` (True = attend). Masks are written for one head: the arrays they hold are the
slices of one batch element and head once :func:`jattn.attention` has vmapped over those axes.

Every mask can also classify a block of rows ``[q0, q1)`` and columns ``[k0, k1)`` as having
*no* visible entry (the block is skipped), *only* visible entries (the mask is not applied) or a
mix. The classification is sound but may be conservative: ``"mixed"`` is always a correct answer.
It returns Python bools for masks whose structure is static (causal, window) and traced booleans
for masks that depend on data (lengths, segments, dense), so blockwise kernels can skip blocks
statically where they can and dynamically where they must.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Mask",
    "Causal",
    "LocalWindow",
    "Lengths",
    "Segments",
    "Dense",
    "And",
    "Or",
    "Not",
]

Array = jax.Array
# A classification result: Python bool when static, traced bool scalar when data dependent.
Flag = Any


def _and(a: Flag, b: Flag) -> Flag:
    if isinstance(a, bool) and isinstance(b, bool):
        return a and b
    if a is False or b is False:
        return False
    if a is True:
        return b
    if b is True:
        return a
    return jnp.logical_and(a, b)


def _or(a: Flag, b: Flag) -> Flag:
    if isinstance(a, bool) and isinstance(b, bool):
        return a or b
    if a is True or b is True:
        return True
    if a is False:
        return b
    if b is False:
        return a
    return jnp.logical_or(a, b)


def _not(a: Flag) -> Flag:
    return (not a) if isinstance(a, bool) else jnp.logical_not(a)


def _is_static_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


class Mask:
    """Base class. Subclasses are frozen dataclasses registered as pytrees."""

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        """Visibility for query positions ``q_idx [bq]`` and key positions ``kv_idx [bk]``.

        Returns a boolean ``[bq, bk]`` array. Positions must lie inside the sequence.
        """
        raise NotImplementedError

    def classify(self, q0: Any, q1: Any, k0: Any, k1: Any) -> tuple[Flag, Flag]:
        """Returns ``(any_visible, all_visible)`` for rows ``[q0, q1)`` and columns ``[k0, k1)``.

        ``any_visible`` False means the block is empty (skip it); ``all_visible`` True means no
        entry is masked (skip the masking). Both are sound: when unsure, ``(True, False)``.
        """
        return True, False

    def materialize(self, q_len: int, kv_len: int) -> Array:
        """The dense ``[q_len, kv_len]`` boolean mask of one head."""
        return self(jnp.arange(q_len), jnp.arange(kv_len))

    # Composition. ``__bool__`` raises so that ``and``/``or`` misuse fails loudly.
    def __and__(self, other: Mask) -> Mask:
        return And(_as_mask(self), _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(_as_mask(self), _as_mask(other))

    def __invert__(self) -> Mask:
        return Not(self)

    def __bool__(self) -> bool:
        raise TypeError(
            "a jattn mask has no truth value: combine masks with `&`, `|` and `~`, "
            "not with `and`, `or` and `not`"
        )

    # Used by jattn.api: validate the user's arrays against the call and bring every leaf to
    # the canonical layout [*B', K', G', *per_head] (each leading dim either full or 1).
    def _canonical(self, ctx: _Context) -> Mask:
        return self

    def _features(self) -> frozenset[str]:
        raise NotImplementedError


def _as_mask(x: Any) -> Mask:
    if isinstance(x, Mask):
        return x
    raise TypeError(f"cannot combine a jattn mask with {type(x).__name__}; wrap arrays in Dense")


def _register(cls: type, data_fields: Sequence[str], meta_fields: Sequence[str] = ()) -> type:
    cls = dataclasses.dataclass(frozen=True, eq=False)(cls)
    jax.tree_util.register_dataclass(
        cls, data_fields=list(data_fields), meta_fields=list(meta_fields)
    )
    return cls


@dataclasses.dataclass(frozen=True)
class _Context:
    """What a mask needs to know about the call to validate and canonicalise its leaves."""

    batch_shape: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int

    def leaf(
        self, x: Any, name: str, per_head: tuple[int, ...], *, heads: bool, broadcast_tail: bool
    ) -> Array:
        """Validates ``x`` and returns it as ``[*B', K', G', *per_head']``.

        ``heads``: whether the user's array has a head axis before ``per_head``.
        ``broadcast_tail``: whether the per-head dims may be 1 (broadcast) instead of full.
        """
        x = jnp.asarray(x)
        lead = self.batch_shape + ((self.num_heads,) if heads else ())
        full = lead + per_head
        if x.ndim > len(full):
            raise ValueError(
                f"{name} has shape {x.shape}, which has more dimensions than the {full} "
                f"([*batch{', heads' if heads else ''}{', ...' if per_head else ''}]) it must "
                "broadcast to"
            )
        shape = (1,) * (len(full) - x.ndim) + x.shape
        for i, (got, want) in enumerate(zip(shape, full, strict=True)):
            tail = i >= len(lead)
            if got != want and not (got == 1 and (broadcast_tail or not tail)):
                raise ValueError(f"{name} of shape {x.shape} is not broadcastable to {full}")
        x = x.reshape(shape)
        nb = len(self.batch_shape)
        if heads:
            n = shape[nb]
            g = self.num_heads // self.num_kv_heads
            kg = (self.num_kv_heads, g) if n != 1 else (1, 1)
            x = x.reshape(shape[:nb] + kg + shape[nb + 1 :])
        else:
            x = x.reshape(shape[:nb] + (1, 1) + shape[nb:])
        return x


# --------------------------------------------------------------------------------------------
# Index masks: static structure, defined by positions only.


class Causal(Mask):
    """Key ``j`` is visible from query ``i`` iff ``j <= i + offset``.

    ``offset=0`` is ``jax.nn``'s ``is_causal`` (aligned at the top-left corner). For a query block
    that continues a sequence (KV-cache decoding), ``offset`` is the position of the first query;
    it may be a traced integer.
    """

    offset: Any = 0

    def __call__(self, q_idx, kv_idx):
        return kv_idx[None, :] <= q_idx[:, None] + self.offset

    def classify(self, q0, q1, k0, k1):
        off = self.offset
        if all(_is_static_int(v) for v in (q0, q1, k0, k1, off)):
            return bool(k0 <= q1 - 1 + off), bool(k1 - 1 <= q0 + off)
        return k0 <= q1 - 1 + off, k1 - 1 <= q0 + off

    def _canonical(self, ctx):
        if _is_static_int(self.offset):
            return Causal(int(self.offset))
        off = jnp.asarray(self.offset)
        if not jnp.issubdtype(off.dtype, jnp.integer):
            raise TypeError(f"Causal offset must be an integer, got dtype {off.dtype}")
        return Causal(ctx.leaf(off, "Causal offset", (), heads=False, broadcast_tail=False))

    def _features(self):
        return frozenset({"causal"})


class LocalWindow(Mask):
    """Key ``j`` is visible from query ``i`` iff ``i - left <= j <= i + right``.

    This is ``jax.nn``'s ``local_window_size=(left, right)``. ``None`` leaves a side unbounded.
    """

    left: int | None = None
    right: int | None = None

    def __post_init__(self):
        for side in ("left", "right"):
            v = getattr(self, side)
            if v is not None and (not _is_static_int(v) or v < 0):
                raise ValueError(
                    f"LocalWindow {side} must be a non-negative int or None, got {v!r}"
                )

    def __call__(self, q_idx, kv_idx):
        q, k = q_idx[:, None], kv_idx[None, :]
        ok = jnp.ones((q.shape[0], k.shape[1]), bool)
        if self.left is not None:
            ok &= k >= q - self.left
        if self.right is not None:
            ok &= k <= q + self.right
        return ok

    def classify(self, q0, q1, k0, k1):
        static = all(_is_static_int(v) for v in (q0, q1, k0, k1))
        any_, all_ = True, True
        if self.left is not None:
            any_ = _and(any_, k1 - 1 >= q0 - self.left)
            all_ = _and(all_, k0 >= q1 - 1 - self.left)
        if self.right is not None:
            any_ = _and(any_, k0 <= q1 - 1 + self.right)
            all_ = _and(all_, k1 - 1 <= q0 + self.right)
        if static:
            return bool(any_), bool(all_)
        return any_, all_

    def _features(self):
        return frozenset({"local_window"})


# --------------------------------------------------------------------------------------------
# Data masks: hold arrays that vary per batch element (and head).


class Lengths(Mask):
    """Padding: query ``i`` is valid iff ``i < q``; key ``j`` is valid iff ``j < kv``.

    ``q`` and ``kv`` are integer arrays of shape ``[*B]`` (or None). Rows past ``q`` see no key,
    so their output is zero, as in ``jax.nn``.
    """

    q: Any = None
    kv: Any = None

    def __call__(self, q_idx, kv_idx):
        ok = jnp.ones((q_idx.shape[0], kv_idx.shape[0]), bool)
        if self.q is not None:
            ok &= (q_idx < self.q)[:, None]
        if self.kv is not None:
            ok &= (kv_idx < self.kv)[None, :]
        return ok

    def classify(self, q0, q1, k0, k1):
        any_, all_ = True, True
        if self.q is not None:
            any_ = _and(any_, q0 < self.q)
            all_ = _and(all_, q1 <= self.q)
        if self.kv is not None:
            any_ = _and(any_, k0 < self.kv)
            all_ = _and(all_, k1 <= self.kv)
        return any_, all_

    def _canonical(self, ctx):
        def one(x, name):
            if x is None:
                return None
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
            return ctx.leaf(x, name, (), heads=False, broadcast_tail=False)

        return Lengths(one(self.q, "query_seq_lengths"), one(self.kv, "key_value_seq_lengths"))

    def _features(self):
        return frozenset({"lengths"})


class Segments(Mask):
    """Sequence packing: query ``i`` attends to key ``j`` iff ``q_ids[i] == kv_ids[j]``.

    ``q_ids`` is ``[*B, T]`` and ``kv_ids`` is ``[*B, S]`` (integer ids).
    """

    q_ids: Any
    kv_ids: Any

    def __call__(self, q_idx, kv_idx):
        return self.q_ids[q_idx][:, None] == self.kv_ids[kv_idx][None, :]

    def materialize(self, q_len, kv_len):
        return self.q_ids[:, None] == self.kv_ids[None, :]

    def classify(self, q0, q1, k0, k1):
        # Conservative: compare id ranges. Packed ids are usually sorted, where this is exact.
        qb = jax.lax.dynamic_slice_in_dim(self.q_ids, q0, q1 - q0) if q1 > q0 else None
        kb = jax.lax.dynamic_slice_in_dim(self.kv_ids, k0, k1 - k0) if k1 > k0 else None
        if qb is None or kb is None:
            return False, True
        qmin, qmax, kmin, kmax = qb.min(), qb.max(), kb.min(), kb.max()
        any_ = jnp.logical_and(qmin <= kmax, kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_, all_

    def _canonical(self, ctx):
        def one(x, name, n):
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
            return ctx.leaf(x, name, (n,), heads=False, broadcast_tail=False)

        return Segments(
            one(self.q_ids, "segment_ids (query)", ctx.q_len),
            one(self.kv_ids, "segment_ids (key/value)", ctx.kv_len),
        )

    def _features(self):
        return frozenset({"segments"})


class Dense(Mask):
    """An explicit boolean mask broadcastable to ``[*B, N, T, S]`` (True = attend)."""

    mask: Any

    def __call__(self, q_idx, kv_idx):
        m = self.mask
        qi = jnp.zeros_like(q_idx) if m.shape[0] == 1 else q_idx
        ki = jnp.zeros_like(kv_idx) if m.shape[1] == 1 else kv_idx
        return m[qi[:, None], ki[None, :]]

    def materialize(self, q_len, kv_len):
        return jnp.broadcast_to(self.mask, (q_len, kv_len))

    def classify(self, q0, q1, k0, k1):
        m = self.mask
        rows = (0, 1) if m.shape[0] == 1 else (q0, q1 - q0)
        cols = (0, 1) if m.shape[1] == 1 else (k0, k1 - k0)
        block = jax.lax.dynamic_slice(m, (rows[0], cols[0]), (rows[1], cols[1]))
        return block.any(), block.all()

    def _canonical(self, ctx):
        m = jnp.asarray(self.mask)
        if m.dtype != jnp.bool_:
            raise TypeError(
                f"mask must be boolean (True = attend), got dtype {m.dtype}; pass an additive "
                "mask as `bias`"
            )
        return Dense(ctx.leaf(m, "mask", (ctx.q_len, ctx.kv_len), heads=True, broadcast_tail=True))

    def _features(self):
        return frozenset({"dense_mask"})


# --------------------------------------------------------------------------------------------
# Combinators.


class And(Mask):
    a: Mask
    b: Mask

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) & self.b(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return self.a.materialize(q_len, kv_len) & self.b.materialize(q_len, kv_len)

    def classify(self, q0, q1, k0, k1):
        a_any, a_all = self.a.classify(q0, q1, k0, k1)
        b_any, b_all = self.b.classify(q0, q1, k0, k1)
        return _and(a_any, b_any), _and(a_all, b_all)

    def _canonical(self, ctx):
        return And(self.a._canonical(ctx), self.b._canonical(ctx))

    def _features(self):
        return self.a._features() | self.b._features()


class Or(Mask):
    a: Mask
    b: Mask

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) | self.b(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return self.a.materialize(q_len, kv_len) | self.b.materialize(q_len, kv_len)

    def classify(self, q0, q1, k0, k1):
        a_any, a_all = self.a.classify(q0, q1, k0, k1)
        b_any, b_all = self.b.classify(q0, q1, k0, k1)
        return _or(a_any, b_any), _or(a_all, b_all)

    def _canonical(self, ctx):
        return Or(self.a._canonical(ctx), self.b._canonical(ctx))

    def _features(self):
        return self.a._features() | self.b._features() | {"mask_algebra"}


class Not(Mask):
    a: Mask

    def __call__(self, q_idx, kv_idx):
        return ~self.a(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return ~self.a.materialize(q_len, kv_len)

    def classify(self, q0, q1, k0, k1):
        a_any, a_all = self.a.classify(q0, q1, k0, k1)
        return _not(a_all), _not(a_any)

    def _canonical(self, ctx):
        return Not(self.a._canonical(ctx))

    def _features(self):
        return self.a._features() | {"mask_algebra"}


Causal = dataclasses.dataclass(frozen=True, eq=False)(Causal)
# A Python-int offset stays static (aux data) so kernels can skip blocks at trace time; an array
# offset (a decoding position, possibly per batch element) is a leaf.
jax.tree_util.register_pytree_node(
    Causal,
    lambda m: ((), m.offset) if _is_static_int(m.offset) else ((m.offset,), None),
    lambda aux, ch: Causal(aux) if not ch else Causal(ch[0]),
)
LocalWindow = _register(LocalWindow, [], ["left", "right"])
Lengths = _register(Lengths, ["q", "kv"])
Segments = _register(Segments, ["q_ids", "kv_ids"])
Dense = _register(Dense, ["mask"])
And = _register(And, ["a", "b"])
Or = _register(Or, ["a", "b"])
Not = _register(Not, ["a"])


def block_kind(mask: Mask | None, q0: Any, q1: Any, k0: Any, k1: Any) -> tuple[Flag, Flag]:
    """``(any_visible, all_visible)`` of a block, for kernels that may have no mask at all."""
    if mask is None:
        return True, True
    return mask.classify(q0, q1, k0, k1)
