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
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jattn import _intmath as im

# The static-or-traced helpers, under the names this module's code uses.
from jattn._intmath import Flag
from jattn._intmath import and_ as _and
from jattn._intmath import imax as _max
from jattn._intmath import imin as _min
from jattn._intmath import is_static as _is_static_int
from jattn._intmath import lt as _lt
from jattn._intmath import not_ as _not
from jattn._intmath import or_ as _or
from jattn._intmath import where as _where

__all__ = [
    "Mask",
    "Causal",
    "LocalWindow",
    "Chunked",
    "Lengths",
    "Segments",
    "Dense",
    "And",
    "Or",
    "Not",
    "CallShape",
    "MaskPlan",
    "MaskArrays",
    "MaskScalars",
    "lower",
    "pad_ids",
]

Array = jax.Array


class Mask:
    """Base class. Subclasses are frozen dataclasses registered as pytrees."""

    def __call__(self, q_idx: Array, kv_idx: Array) -> Array:
        """Visibility for query positions ``q_idx [bq]`` and key positions ``kv_idx [bk]``.

        Returns a boolean ``[bq, bk]`` array. Positions must lie inside the sequence.
        """
        raise NotImplementedError

    def classify(self, q0: Any, k0: Any, bq: int, bk: int) -> tuple[Flag, Flag]:
        """``(any_visible, all_visible)`` for rows ``[q0, q0+bq)`` and columns ``[k0, k0+bk)``.

        ``q0``/``k0`` may be traced; the block sizes ``bq``/``bk`` are static. ``any_visible``
        False means the block is empty (skip it); ``all_visible`` True means no entry is masked
        (skip the masking). Both are sound: when unsure, ``(True, False)``.
        """
        return True, False

    def kv_range(self, q0: Any, q1: Any, kv_len: int) -> tuple[Any, Any]:
        """A range ``[lo, hi)`` of key positions that holds every key visible from rows
        ``[q0, q1)`` (conservative; ints or traced). Kernels loop over that range only."""
        return 0, kv_len

    def block(self, q0: Any, k0: Any, bq: int, bk: int) -> Array:
        """The boolean ``[bq, bk]`` mask of the block at ``(q0, k0)`` (``q0``/``k0`` may be
        traced; the block must lie inside the (padded) sequence)."""
        return self(q0 + jnp.arange(bq), k0 + jnp.arange(bk))

    def pad(self, q_len: int, kv_len: int) -> Mask:
        """The mask extended to padded lengths; padded positions are never more visible than
        what the caller bounds them to (kernels add their own ``kv < S`` bound)."""
        return self

    def materialize(self, q_len: int, kv_len: int) -> Array:
        """The dense ``[q_len, kv_len]`` boolean mask of one head."""
        return self.block(0, 0, q_len, kv_len)

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

    def canonicalize(self, ctx: CallShape) -> Mask:
        """The mask validated against a call and with every array leaf in the canonical
        layout ``[*B', K', G', *per_head]`` (each leading dim either full or 1), as
        :func:`jattn.plan.make_plan` hands it to the kernels."""
        return self

    @property
    def features(self) -> frozenset[str]:
        """The registry features (``jattn.kernels.FEATURES``) a kernel needs for this mask."""
        raise NotImplementedError

    def _lower(self, parts: _LowerParts) -> None:
        """Adds this mask's constraints to ``parts`` (see :func:`lower`)."""
        parts.general = True


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
class CallShape:
    """The shape of a call, which a mask needs to validate and canonicalise its leaves."""

    batch_shape: tuple[int, ...]
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int

    def canonical_leaf(
        self, x: Any, name: str, per_head: tuple[int, ...], *, heads: bool, broadcast_tail: bool
    ) -> Array:
        """Validates ``x`` and returns it as ``[*B', K', G', *per_head']``.

        ``heads``: whether the user's array has a head axis before ``per_head``.
        ``broadcast_tail``: whether the per-head dims may be 1 (broadcast) instead of full.
        """
        x = jnp.asarray(x)
        lead = self.batch_shape + ((self.num_heads,) if heads else ())
        full = lead + per_head
        layout = "[*batch" + (", heads" if heads else "") + ", ..." * bool(per_head) + "]"
        bad = ValueError(f"{name} of shape {x.shape} is not broadcastable to {full} ({layout})")
        if x.ndim > len(full):
            # Extra leading dims of size 1 are accepted, as jax.nn takes a [1, N, T, S] mask
            # for unbatched [T, N, H] inputs.
            extra = x.ndim - len(full)
            if any(d != 1 for d in x.shape[:extra]):
                raise bad
            x = x.reshape(x.shape[extra:])
        shape = (1,) * (len(full) - x.ndim) + x.shape
        for i, (got, want) in enumerate(zip(shape, full, strict=True)):
            tail = i >= len(lead)
            if got != want and not (got == 1 and (broadcast_tail or not tail)):
                raise bad
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

    Examples:
      >>> from jattn import masks
      >>> masks.Causal().materialize(3, 3).astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
      >>> masks.Causal(offset=1).materialize(2, 3).astype(int).tolist()
      [[1, 1, 0], [1, 1, 1]]
    """

    offset: Any = 0

    def __call__(self, q_idx, kv_idx):
        return kv_idx[None, :] <= q_idx[:, None] + self.offset

    def classify(self, q0, k0, bq, bk):
        off = self.offset
        any_, all_ = k0 <= q0 + bq - 1 + off, k0 + bk - 1 <= q0 + off
        if all(_is_static_int(x) for x in (q0, k0, off)):
            return bool(any_), bool(all_)
        return any_, all_

    def kv_range(self, q0, q1, kv_len):
        return 0, _min(kv_len, _max(0, q1 + self.offset))

    def canonicalize(self, ctx):
        if _is_static_int(self.offset):
            # Offsets past either end change nothing more; clamping keeps int32 kernels exact.
            return Causal(max(-ctx.q_len, min(int(self.offset), ctx.kv_len)))
        off = jnp.asarray(self.offset)
        if not jnp.issubdtype(off.dtype, jnp.integer):
            raise TypeError(f"Causal offset must be an integer, got dtype {off.dtype}")
        off = ctx.canonical_leaf(off, "Causal offset", (), heads=False, broadcast_tail=False)
        # The same clamp for a traced offset, in its own dtype before int32: `i + offset`
        # then never overflows (2**31 - 1 would wrap and hide every key), and an int64
        # offset is never cut to its low 32 bits.
        if jnp.issubdtype(off.dtype, jnp.unsignedinteger):
            off = jnp.minimum(off, jnp.asarray(ctx.kv_len, off.dtype))
        else:
            off = jnp.clip(off, -ctx.q_len, ctx.kv_len)
        return Causal(off.astype(jnp.int32))

    @property
    def features(self):
        return frozenset({"causal"})

    def _lower(self, parts):
        if _is_static_int(self.offset):
            parts.tighten("right", self.offset, min)
        else:
            parts.tighten("offset", parts.per_batch(self.offset), jnp.minimum)


class LocalWindow(Mask):
    """Key ``j`` is visible from query ``i`` iff ``i - left <= j <= i + right``.

    This is ``jax.nn``'s ``local_window_size=(left, right)``. ``None`` leaves a side unbounded.

    Examples:
      >>> from jattn import masks
      >>> masks.LocalWindow(1, 0).materialize(3, 3).astype(int).tolist()
      [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
      >>> m = masks.Causal() & masks.LocalWindow(1, 0)  # what jattn.attention builds from both
      >>> m.classify(0, 2, 1, 1)  # rows [0, 1) x keys [2, 3): empty, skipped by block kernels
      (False, False)
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

    def classify(self, q0, k0, bq, bk):
        static = _is_static_int(q0) and _is_static_int(k0)
        any_, all_ = True, True
        if self.left is not None:
            any_ = _and(any_, k0 + bk - 1 >= q0 - self.left)
            all_ = _and(all_, k0 >= q0 + bq - 1 - self.left)
        if self.right is not None:
            any_ = _and(any_, k0 <= q0 + bq - 1 + self.right)
            all_ = _and(all_, k0 + bk - 1 <= q0 + self.right)
        if static:
            return bool(any_), bool(all_)
        return any_, all_

    def kv_range(self, q0, q1, kv_len):
        lo = 0 if self.left is None else _max(0, q0 - self.left)
        hi = kv_len if self.right is None else _min(kv_len, _max(0, q1 + self.right))
        return lo, hi

    def canonicalize(self, ctx):
        # A side that reaches past the sequence bounds nothing: drop it, so that kernels never
        # see a window that overflows int32.
        left = None if self.left is None or self.left >= max(ctx.q_len - 1, 0) else self.left
        right = None if self.right is None or self.right >= max(ctx.kv_len - 1, 0) else self.right
        return LocalWindow(left, right)

    @property
    def features(self):
        return frozenset({"local_window"})

    def _lower(self, parts):
        if self.left is not None:
            parts.tighten("left", self.left, min)
        if self.right is not None:
            parts.tighten("right", self.right, min)


class Chunked(Mask):
    """Chunked attention (Llama 4's local layers): query ``i`` sees key ``j`` iff
    ``i // size == j // size``. Combine it with :class:`Causal` by ``&``.

    Examples:
      >>> from jattn import masks
      >>> masks.Chunked(2).materialize(4, 4).astype(int).tolist()
      [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
      >>> (masks.Chunked(2) & masks.Causal()).materialize(4, 4).astype(int).tolist()
      [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
      >>> masks.Chunked(256).classify(0, 256, 128, 128)  # another chunk: skipped
      (False, False)
    """

    size: int

    def __post_init__(self):
        if not _is_static_int(self.size) or self.size < 1:
            raise ValueError(f"Chunked size must be a positive int, got {self.size!r}")

    def __call__(self, q_idx, kv_idx):
        return q_idx[:, None] // self.size == kv_idx[None, :] // self.size

    def classify(self, q0, k0, bq, bk):
        c = self.size
        q_first, q_last = im.fdiv(q0, c), im.fdiv(q0 + bq - 1, c)
        k_first, k_last = im.fdiv(k0, c), im.fdiv(k0 + bk - 1, c)
        any_ = _and(im.le(q_first, k_last), im.le(k_first, q_last))
        all_ = _and(_and(im.le(q_last, q_first), im.le(k_last, k_first)), _eq(q_first, k_first))
        return any_, all_

    def kv_range(self, q0, q1, kv_len):
        c = self.size
        lo = im.fdiv(q0, c) * c
        return lo, _min(kv_len, _max(lo, (im.fdiv(_max(q1, 1) - 1, c) + 1) * c))

    @property
    def features(self):
        return frozenset({"chunked"})

    def _lower(self, parts):
        old = parts.values.get("chunk")
        if old is None or old % self.size == 0 or self.size % old == 0:
            # One chunking refines the other: their intersection is the finer one.
            parts.values["chunk"] = self.size if old is None else min(old, self.size)
        else:
            parts.general = True


def _eq(a, b) -> Flag:
    return _and(im.le(a, b), im.le(b, a))


# --------------------------------------------------------------------------------------------
# Data masks: hold arrays that vary per batch element (and head).


class Lengths(Mask):
    """Padding: query ``i`` is valid iff ``i < q``; key ``j`` is valid iff ``j < kv``.

    ``q`` and ``kv`` are integer arrays of shape ``[*B]`` (or None). Rows past ``q`` see no key,
    so their output is zero, as in ``jax.nn``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn import masks
      >>> masks.Lengths(kv=jnp.array(2)).materialize(2, 3).astype(int).tolist()
      [[1, 1, 0], [1, 1, 0]]
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

    def classify(self, q0, k0, bq, bk):
        any_, all_ = True, True
        if self.q is not None:
            any_ = _and(any_, _lt(q0, self.q))
            all_ = _and(all_, _lt(q0 + bq - 1, self.q))
        if self.kv is not None:
            any_ = _and(any_, _lt(k0, self.kv))
            all_ = _and(all_, _lt(k0 + bk - 1, self.kv))
        return any_, all_

    def kv_range(self, q0, q1, kv_len):
        hi = kv_len if self.kv is None else _min(kv_len, self.kv)
        if self.q is not None:
            hi = _where(_lt(q0, self.q), hi, 0)
        return 0, hi

    def canonicalize(self, ctx):
        def one(x, name):
            if x is None:
                return None
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
            x = ctx.canonical_leaf(x, name, (), heads=False, broadcast_tail=False)
            # int32 whatever the integer type (unsigned, int64), clipped to [0, length]: the
            # same visibility, and loop bounds every kernel can take.
            bound = ctx.q_len if name.startswith("query") else ctx.kv_len
            if jnp.issubdtype(x.dtype, jnp.unsignedinteger):
                x = jnp.minimum(x, jnp.asarray(bound, x.dtype))
            else:
                x = jnp.clip(x, 0, bound)
            return x.astype(jnp.int32)

        return Lengths(one(self.q, "query_seq_lengths"), one(self.kv, "key_value_seq_lengths"))

    @property
    def features(self):
        return frozenset({"lengths"})

    def _lower(self, parts):
        if self.q is not None:
            parts.tighten("q_len", parts.per_batch(self.q), jnp.minimum)
        if self.kv is not None:
            parts.tighten("kv_len", parts.per_batch(self.kv), jnp.minimum)


class Segments(Mask):
    """Sequence packing: query ``i`` attends to key ``j`` iff ``q_ids[i] == kv_ids[j]``.

    ``q_ids`` is ``[*B, T]`` and ``kv_ids`` is ``[*B, S]`` (integer ids).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn import masks
      >>> ids = jnp.array([0, 0, 1])
      >>> masks.Segments(ids, ids).materialize(3, 3).astype(int).tolist()
      [[1, 1, 0], [1, 1, 0], [0, 0, 1]]
    """

    q_ids: Any
    kv_ids: Any

    def __call__(self, q_idx, kv_idx):
        return self.q_ids[q_idx][:, None] == self.kv_ids[kv_idx][None, :]

    def block(self, q0, k0, bq, bk):
        qb = jax.lax.dynamic_slice_in_dim(self.q_ids, jnp.asarray(q0, jnp.int32), bq)
        kb = jax.lax.dynamic_slice_in_dim(self.kv_ids, jnp.asarray(k0, jnp.int32), bk)
        return qb[:, None] == kb[None, :]

    def pad(self, q_len, kv_len):
        return Segments(*pad_ids(self.q_ids, self.kv_ids, q_len, kv_len))

    def classify(self, q0, k0, bq, bk):
        # Conservative: compare id ranges. Packed ids are usually sorted, where this is exact.
        qb = jax.lax.dynamic_slice_in_dim(self.q_ids, jnp.asarray(q0, jnp.int32), bq)
        kb = jax.lax.dynamic_slice_in_dim(self.kv_ids, jnp.asarray(k0, jnp.int32), bk)
        qmin, qmax, kmin, kmax = qb.min(), qb.max(), kb.min(), kb.max()
        any_ = jnp.logical_and(qmin <= kmax, kmin <= qmax)
        all_ = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        return any_, all_

    def canonicalize(self, ctx):
        def one(x, name, n):
            x = jnp.asarray(x)
            if not jnp.issubdtype(x.dtype, jnp.integer):
                raise TypeError(f"{name} must be an integer array, got dtype {x.dtype}")
            return ctx.canonical_leaf(x, name, (n,), heads=False, broadcast_tail=False)

        q_ids = one(self.q_ids, "segment_ids (query)", ctx.q_len)
        kv_ids = one(self.kv_ids, "segment_ids (key/value)", ctx.kv_len)
        if q_ids.dtype.itemsize > 4 or kv_ids.dtype.itemsize > 4:
            q_ids, kv_ids = _rank_ids(q_ids, kv_ids)
        return Segments(q_ids, kv_ids)

    @property
    def features(self):
        return frozenset({"segments"})

    def _lower(self, parts):
        if "q_seg" in parts.values:  # two id pairs do not reduce to one: leave it general
            parts.general = True
            return
        parts.values["q_seg"] = parts.per_batch(self.q_ids, self.q_ids.shape[-1:])
        parts.values["kv_seg"] = parts.per_batch(self.kv_ids, self.kv_ids.shape[-1:])


def _rank_ids(q_ids: Array, kv_ids: Array) -> tuple[Array, Array]:
    """64-bit ids as int32 ranks with the same equalities: kernels compare ids in int32, where
    ``2**32 + 1`` and ``1`` would be equal. Each id becomes its position among the sorted ids of
    its batch element (query and key ids together), which is below ``T + S``."""
    lead = jnp.broadcast_shapes(q_ids.shape[:-1], kv_ids.shape[:-1])
    q = jnp.broadcast_to(q_ids, lead + q_ids.shape[-1:])
    kv = jnp.broadcast_to(kv_ids, lead + kv_ids.shape[-1:])
    dtype = jnp.promote_types(q.dtype, kv.dtype)
    both = jnp.concatenate([q.astype(dtype), kv.astype(dtype)], axis=-1)
    ranked = jnp.sort(both, axis=-1)
    rank = jnp.vectorize(lambda row, x: jnp.searchsorted(row, x), signature="(n),(m)->(m)")
    n = q.shape[-1]
    ranks = rank(ranked, both).astype(jnp.int32)
    return ranks[..., :n], ranks[..., n:]


class Dense(Mask):
    """An explicit boolean mask broadcastable to ``[*B, N, T, S]`` (True = attend).

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn import masks
      >>> m = masks.Dense(jnp.array([[True, False], [True, True]])) | masks.Causal()
      >>> m.materialize(2, 2).astype(int).tolist()
      [[1, 0], [1, 1]]
    """

    mask: Any

    def __call__(self, q_idx, kv_idx):
        m = self.mask
        qi = jnp.zeros_like(q_idx) if m.shape[0] == 1 else q_idx
        ki = jnp.zeros_like(kv_idx) if m.shape[1] == 1 else kv_idx
        return m[qi[:, None], ki[None, :]]

    def materialize(self, q_len, kv_len):
        return jnp.broadcast_to(self.mask, (q_len, kv_len))

    def _slice(self, q0, k0, bq, bk):
        m = self.mask
        rows = (0, 1) if m.shape[0] == 1 else (q0, bq)
        cols = (0, 1) if m.shape[1] == 1 else (k0, bk)
        start = (jnp.asarray(rows[0], jnp.int32), jnp.asarray(cols[0], jnp.int32))
        return jax.lax.dynamic_slice(m, start, (rows[1], cols[1]))

    def block(self, q0, k0, bq, bk):
        return jnp.broadcast_to(self._slice(q0, k0, bq, bk), (bq, bk))

    def pad(self, q_len, kv_len):
        m = self.mask
        pads = [(0, 0 if d == 1 else n - d) for d, n in zip(m.shape, (q_len, kv_len), strict=True)]
        return Dense(jnp.pad(m, pads, constant_values=False))

    def classify(self, q0, k0, bq, bk):
        block = self._slice(q0, k0, bq, bk)
        return block.any(), block.all()

    def canonicalize(self, ctx):
        m = jnp.asarray(self.mask)
        if m.dtype != jnp.bool_:
            raise TypeError(
                f"mask must be boolean (True = attend), got dtype {m.dtype}; pass an additive "
                "mask as `bias`"
            )
        return Dense(
            ctx.canonical_leaf(m, "mask", (ctx.q_len, ctx.kv_len), heads=True, broadcast_tail=True)
        )

    @property
    def features(self):
        return frozenset({"dense_mask"})

    def _lower(self, parts):
        parts.tighten("dense", parts.per_head(self.mask), jnp.logical_and)


# --------------------------------------------------------------------------------------------
# Combinators.


class And(Mask):
    a: Mask
    b: Mask

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) & self.b(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return self.a.materialize(q_len, kv_len) & self.b.materialize(q_len, kv_len)

    def block(self, q0, k0, bq, bk):
        return self.a.block(q0, k0, bq, bk) & self.b.block(q0, k0, bq, bk)

    def pad(self, q_len, kv_len):
        return And(self.a.pad(q_len, kv_len), self.b.pad(q_len, kv_len))

    def classify(self, q0, k0, bq, bk):
        a_any, a_all = self.a.classify(q0, k0, bq, bk)
        b_any, b_all = self.b.classify(q0, k0, bq, bk)
        return _and(a_any, b_any), _and(a_all, b_all)

    def kv_range(self, q0, q1, kv_len):
        (alo, ahi), (blo, bhi) = self.a.kv_range(q0, q1, kv_len), self.b.kv_range(q0, q1, kv_len)
        return _max(alo, blo), _min(ahi, bhi)

    def canonicalize(self, ctx):
        return And(self.a.canonicalize(ctx), self.b.canonicalize(ctx))

    @property
    def features(self):
        return self.a.features | self.b.features

    def _lower(self, parts):
        self.a._lower(parts)
        self.b._lower(parts)


class Or(Mask):
    a: Mask
    b: Mask

    def __call__(self, q_idx, kv_idx):
        return self.a(q_idx, kv_idx) | self.b(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return self.a.materialize(q_len, kv_len) | self.b.materialize(q_len, kv_len)

    def block(self, q0, k0, bq, bk):
        return self.a.block(q0, k0, bq, bk) | self.b.block(q0, k0, bq, bk)

    def pad(self, q_len, kv_len):
        return Or(self.a.pad(q_len, kv_len), self.b.pad(q_len, kv_len))

    def classify(self, q0, k0, bq, bk):
        a_any, a_all = self.a.classify(q0, k0, bq, bk)
        b_any, b_all = self.b.classify(q0, k0, bq, bk)
        return _or(a_any, b_any), _or(a_all, b_all)

    def kv_range(self, q0, q1, kv_len):
        (alo, ahi), (blo, bhi) = self.a.kv_range(q0, q1, kv_len), self.b.kv_range(q0, q1, kv_len)
        return _min(alo, blo), _max(ahi, bhi)

    def canonicalize(self, ctx):
        return Or(self.a.canonicalize(ctx), self.b.canonicalize(ctx))

    @property
    def features(self):
        return self.a.features | self.b.features | {"mask_algebra"}


class Not(Mask):
    a: Mask

    def __call__(self, q_idx, kv_idx):
        return ~self.a(q_idx, kv_idx)

    def materialize(self, q_len, kv_len):
        return ~self.a.materialize(q_len, kv_len)

    def block(self, q0, k0, bq, bk):
        return ~self.a.block(q0, k0, bq, bk)

    def pad(self, q_len, kv_len):
        return Not(self.a.pad(q_len, kv_len))

    def classify(self, q0, k0, bq, bk):
        a_any, a_all = self.a.classify(q0, k0, bq, bk)
        return _not(a_all), _not(a_any)

    def canonicalize(self, ctx):
        return Not(self.a.canonicalize(ctx))

    @property
    def features(self):
        return self.a.features | {"mask_algebra"}


Causal = dataclasses.dataclass(frozen=True, eq=False)(Causal)
# A Python-int offset stays static (aux data) so kernels can skip blocks at trace time; an array
# offset (a decoding position, possibly per batch element) is a leaf.
jax.tree_util.register_pytree_node(
    Causal,
    lambda m: ((), m.offset) if _is_static_int(m.offset) else ((m.offset,), None),
    lambda aux, ch: Causal(aux) if not ch else Causal(ch[0]),
)
LocalWindow = _register(LocalWindow, [], ["left", "right"])
Chunked = _register(Chunked, [], ["size"])
Lengths = _register(Lengths, ["q", "kv"])
Segments = _register(Segments, ["q_ids", "kv_ids"])
Dense = _register(Dense, ["mask"])
And = _register(And, ["a", "b"])
Or = _register(Or, ["a", "b"])
Not = _register(Not, ["a"])


def block_kind(mask: Mask | None, q0: Any, k0: Any, bq: int, bk: int) -> tuple[Flag, Flag]:
    """``(any_visible, all_visible)`` of a block, for kernels that may have no mask at all."""
    if mask is None:
        return True, True
    return mask.classify(q0, k0, bq, bk)


# --------------------------------------------------------------------------------------------
# The mask as a kernel reads it.


def pad_ids(q_ids: Array, kv_ids: Array, q_len: int, kv_len: int) -> tuple[Array, Array]:
    """Segment ids ``[..., T]`` / ``[..., S]`` padded on their last axis to ``q_len`` /
    ``kv_len`` with distinct negative ids, so that padded queries and keys match nothing."""

    def pad(x, n, fill):
        widths = [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])]
        return jnp.pad(x, widths, constant_values=fill)

    return pad(q_ids, q_len, -1), pad(kv_ids, kv_len, -2)


class MaskScalars(NamedTuple):
    """One batch element's per-batch mask scalars (ints or traced int32, or None when the plan
    has none): what :class:`MaskPlan`'s questions read besides the plan itself. Inside a
    kernel they are scalars; outside, ``[B, 1]`` columns broadcast against ``[1, T]`` rows."""

    q_len: Any = None
    kv_len: Any = None
    offset: Any = None


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """The static structure of a call's mask, for kernels that do not evaluate mask objects
    (Pallas, the native CPU kernel, cuDNN), and the one place in Python that says what such a
    lowered mask means. Key ``j`` is visible from query ``i`` iff every part that is present
    holds:

    ``j >= i - left``; ``j <= i + right``; ``i // chunk == j // chunk``; ``j < kv_bound``;
    and, per batch element ``b`` (and head ``h`` for ``dense``): ``j <= i + offset[b]``,
    ``i < q_len[b]``, ``j < kv_len[b]``, ``q_seg[b, i] == kv_seg[b, j]``, ``dense[b, h, i, j]``.

    The index parts (all but segments and dense) leave each row ``i`` one interval of keys
    ``[lo(i), hi(i))`` whose ends never decrease with ``i``: :meth:`row_bounds`. Kernels ask
    the plan which blocks to visit and which to run unmasked (:meth:`kv_blocks`,
    :meth:`q_blocks`) and which entries of a block are visible (:meth:`visible`).

    ``general`` is True when the mask is not such an intersection (``|``, ``~``, two pairs of
    segment ids, two chunk sizes that do not divide one another): a kernel then needs the
    mask object itself (feature ``mask_algebra``). ``kv_bound`` is never set by
    :func:`lower`; a kernel that pads keys sets it.
    """

    left: int | None = None
    right: int | None = None
    chunk: int | None = None
    kv_bound: int | None = None
    q_len: bool = False
    kv_len: bool = False
    offset: bool = False
    segments: bool = False
    dense: bool = False
    general: bool = False

    @property
    def masks_anything(self) -> bool:
        """Whether any entry can be masked (query lengths aside: rows past them are zeroed)."""
        return (
            self.left is not None
            or self.right is not None
            or self.chunk is not None
            or self.kv_bound is not None
            or self.kv_len
            or self.offset
            or self.segments
            or self.dense
            or self.general
        )

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """The per-batch scalars present, in order."""
        return tuple(n for n in ("q_len", "kv_len", "offset") if getattr(self, n))

    # -- what one row sees --------------------------------------------------------------------

    def _kv_end(self, sc: MaskScalars, kv_len: int) -> Any:
        """One past the last key any row may see, from the key-side bounds."""
        end: Any = kv_len if self.kv_bound is None else self.kv_bound
        if self.kv_len:
            end = im.imin(end, im.imax(sc.kv_len, 0))
        return end

    def _right(self, sc: MaskScalars) -> Any:
        """The tightest ``j <= i + right`` bound, or None."""
        if self.offset:
            return sc.offset if self.right is None else im.imin(sc.offset, self.right)
        return self.right

    def _lo(self, i: Any) -> Any:
        """The first key row ``i`` may see from the left-side parts."""
        lo: Any = 0 if self.left is None else im.imax(0, i - self.left)
        if self.chunk is not None:
            lo = im.imax(lo, im.fdiv(i, self.chunk) * self.chunk)
        return lo

    def _hi(self, sc: MaskScalars, i: Any, kv_len: int) -> Any:
        """One past the last key row ``i`` may see from the right-side parts (q_len aside)."""
        right = self._right(sc)
        hi = self._kv_end(sc, kv_len)
        if right is not None:
            hi = im.imin(hi, im.imax(0, i + right + 1))
        if self.chunk is not None:
            hi = im.imin(hi, (im.fdiv(i, self.chunk) + 1) * self.chunk)
        return hi

    def row_bounds(self, sc: MaskScalars, rows: Any, kv_len: int) -> tuple[Any, Any]:
        """``(lo, hi)``: the keys ``[lo, hi)`` that query positions ``rows`` may see by the
        index parts (segments and dense masks may hide more); ``lo >= hi`` for a row that
        sees nothing, rows past ``q_len`` included."""
        lo, hi = self._lo(rows), self._hi(sc, rows, kv_len)
        if self.q_len:
            hi = im.where(im.lt(rows, sc.q_len), hi, 0)
        return lo, hi

    # -- blocks -------------------------------------------------------------------------------

    def kv_blocks(self, sc: MaskScalars, q0: Any, bq: int, bk: int, sp: int):
        """Key blocks of size ``bk`` (of ``sp`` keys) for the query rows ``[q0, q0 + bq)``:
        ``(lo, full_lo, full_hi, hi)``.

        Blocks ``[lo, hi)`` hold every visible key; of those, ``[full_lo, full_hi)`` have no
        masked entry (rows past ``q_len`` aside: their results are zeroed afterwards, and their
        ``lse`` of ``-inf`` zeroes their gradients). ``lo <= full_lo <= full_hi <= hi <= sp //
        bk``. Row bounds never decrease, so the first row's ``lo`` and the last row's ``hi``
        bound the block, and the last row's ``lo`` and the first row's ``hi`` its full part.
        """
        nk = sp // bk
        q_last = q0 + bq - 1
        hi = self._hi(sc, q_last, sp)
        if self.q_len:
            hi = im.select(q0 < sc.q_len, hi, 0)
        lo_b = im.imin(im.fdiv(self._lo(q0), bk), nk)
        hi_b = im.imax(lo_b, im.cdiv(hi, bk))
        if self.segments:  # ids are only known block by block: every block is masked
            return lo_b, lo_b, lo_b, hi_b
        f_lo = im.cdiv(self._lo(q_last), bk)
        f_hi: Any = nk
        right = self._right(sc)
        if right is not None:
            f_hi = im.fdiv(im.imax(0, q0 + right + 1), bk)
        if self.chunk is not None:
            f_hi = im.imin(f_hi, im.fdiv((im.fdiv(q0, self.chunk) + 1) * self.chunk, bk))
        if self.kv_bound is not None or self.kv_len:
            f_hi = im.imin(f_hi, im.fdiv(self._kv_end(sc, sp), bk))
        f_lo = im.clip(f_lo, lo_b, hi_b)
        f_hi = im.clip(f_hi, f_lo, hi_b)
        return lo_b, f_lo, f_hi, hi_b

    def q_blocks(self, sc: MaskScalars, k0: Any, bk: int, bq: int, tp: int, sp: int):
        """Query blocks (of size ``bq``, of ``tp`` rows) whose rows see keys ``[k0, k0 +
        bk)``: ``(lo, full_lo, full_hi, hi)``, as in :meth:`kv_blocks` with the roles of rows
        and columns swapped."""
        nq = tp // bq
        right = self._right(sc)
        k_last = k0 + bk - 1
        lo: Any = 0 if right is None else im.imax(0, k0 - right)
        hi: Any = tp
        if self.q_len:
            hi = im.imin(hi, im.imax(sc.q_len, 0))
        if self.left is not None:
            hi = im.imin(hi, k0 + bk + self.left)
        if self.chunk is not None:
            c = self.chunk
            lo = im.imax(lo, im.fdiv(k0, c) * c)
            hi = im.imin(hi, (im.fdiv(k_last, c) + 1) * c)
        bounded = self.kv_bound is not None or self.kv_len
        end = self._kv_end(sc, sp)
        if bounded:
            hi = im.select(k0 < end, hi, 0)
        lo_b = im.imin(im.fdiv(lo, bq), nq)
        hi_b = im.imax(lo_b, im.cdiv(hi, bq))
        if self.segments:
            return lo_b, lo_b, lo_b, hi_b
        f_lo: Any = lo_b if right is None else im.cdiv(im.imax(0, k_last - right), bq)
        f_hi: Any = hi_b if self.left is None else im.fdiv(k0 + self.left + 1, bq)
        if self.chunk is not None:
            c = self.chunk
            f_lo = im.imax(f_lo, im.cdiv(im.fdiv(k_last, c) * c, bq))
            f_hi = im.imin(f_hi, im.fdiv((im.fdiv(k0, c) + 1) * c, bq))
        if bounded:  # a key block that straddles the end is masked for every row
            f_hi = im.select(k0 + bk <= end, f_hi, 0)
        f_lo = im.clip(f_lo, lo_b, hi_b)
        f_hi = im.clip(f_hi, f_lo, hi_b)
        return lo_b, f_lo, f_hi, hi_b

    def keys_seen(self, sc: MaskScalars, cols: Array) -> Array | None:
        """Whether key positions ``cols`` (an int32 array) lie below the key-side bounds
        (``kv_len``, ``kv_bound``), or None when there are none. No row sees a key past them:
        kernels zero those keys and values before their products, since a KV cache may hold
        NaN or inf past a sequence's length and a zero weight times NaN is NaN."""
        ok = None
        if self.kv_bound is not None:
            ok = cols < self.kv_bound
        if self.kv_len:
            ok = cols < sc.kv_len if ok is None else jnp.logical_and(ok, cols < sc.kv_len)
        return ok

    def visible(
        self, sc: MaskScalars, rows: Array, cols: Array, q_ids=None, kv_ids=None
    ) -> Array | None:
        """The visibility of query positions ``rows`` and key positions ``cols``
        (broadcastable int32 arrays; the result has their broadcast shape), or None when
        nothing is masked. ``q_len`` and ``dense`` are left out: rows past ``q_len`` are
        zeroed after the loop instead, and kernels that read a dense mask apply it themselves.
        """
        ok = None

        def add(c):
            nonlocal ok
            ok = c if ok is None else jnp.logical_and(ok, c)

        if self.left is not None:
            add(cols >= rows - self.left)
        if self.right is not None:
            add(cols <= rows + self.right)
        if self.chunk is not None:
            add(rows // self.chunk == cols // self.chunk)
        if self.offset:
            add(cols <= rows + sc.offset)
        if self.kv_bound is not None:
            add(cols < self.kv_bound)
        if self.kv_len:
            add(cols < sc.kv_len)
        if self.segments:
            add(q_ids == kv_ids)
        return ok


class MaskArrays(NamedTuple):
    """The data of a :class:`MaskPlan`, the batch flattened to one axis ``B`` (None when
    absent). ``dense`` keeps the canonical head axes and broadcast dims: ``[B or 1, K', G',
    T or 1, S or 1]``."""

    q_len: Array | None = None  # [B] int32
    kv_len: Array | None = None  # [B] int32
    offset: Array | None = None  # [B] int32
    q_seg: Array | None = None  # [B, T] int32
    kv_seg: Array | None = None  # [B, S] int32
    dense: Array | None = None  # [B or 1, K', G', T', S'] bool

    def scalars(self, plan: MaskPlan) -> list[Array]:
        return [getattr(self, n) for n in plan.scalar_names]

    def columns(self) -> MaskScalars:
        """The per-batch scalars as ``[B, 1]`` columns, for questions over ``[1, T]`` rows."""
        col = lambda x: None if x is None else x[:, None]  # noqa: E731
        return MaskScalars(col(self.q_len), col(self.kv_len), col(self.offset))

    def pad(self, q_len: int, kv_len: int) -> MaskArrays:
        """The arrays for sequences padded to ``q_len`` / ``kv_len`` (segment ids padded so
        that padded positions match nothing; the caller bounds the keys in its plan)."""
        if self.q_seg is None:
            return self
        q_seg, kv_seg = pad_ids(self.q_seg, self.kv_seg, q_len, kv_len)
        return self._replace(q_seg=q_seg, kv_seg=kv_seg)


class _LowerParts:
    """What :func:`lower` collects while each mask lowers itself."""

    def __init__(self, batch_shape: tuple[int, ...]):
        self.batch_shape = batch_shape
        self.values: dict[str, Any] = {}
        self.general = False

    def tighten(self, name: str, value: Any, combine) -> None:
        old = self.values.get(name)
        self.values[name] = value if old is None else combine(old, value)

    def per_batch(self, x: Any, tail: tuple[int, ...] = ()) -> Array:
        """A canonical leaf ``[*B', 1, 1, *tail]`` as int32 ``[B, *tail]``."""
        nb = len(self.batch_shape)
        x = jnp.asarray(x)
        x = x.reshape(x.shape[:nb] + x.shape[nb + 2 :])
        nbatch = math.prod(self.batch_shape)
        x = jnp.broadcast_to(x, self.batch_shape + tuple(tail))
        return x.reshape((nbatch, *tail)).astype(jnp.int32)

    def per_head(self, x: Any) -> Array:
        return flatten_batch(x, self.batch_shape)


def flatten_batch(x: Any, batch_shape: tuple[int, ...]) -> Array:
    """A canonical leaf ``[*B', K', G', ...]`` with its batch dims flattened to one: ``[B or 1,
    K', G', ...]`` (1 when it is broadcast over the whole batch)."""
    nb = len(batch_shape)
    x = jnp.asarray(x)
    if all(d == 1 for d in x.shape[:nb]):
        return x.reshape((1,) + x.shape[nb:])
    x = jnp.broadcast_to(x, tuple(batch_shape) + x.shape[nb:])
    return x.reshape((math.prod(batch_shape),) + x.shape[nb:])


def lower(mask: Mask | None, batch_shape: tuple[int, ...]) -> tuple[MaskPlan, MaskArrays]:
    """Lowers a canonical mask (from :meth:`Mask.canonicalize`) to a :class:`MaskPlan` and
    its arrays."""
    parts = _LowerParts(tuple(batch_shape))
    if mask is not None:
        mask._lower(parts)
    v = parts.values
    plan = MaskPlan(
        left=v.get("left"),
        right=v.get("right"),
        chunk=v.get("chunk"),
        q_len="q_len" in v,
        kv_len="kv_len" in v,
        offset="offset" in v,
        segments="q_seg" in v,
        dense="dense" in v,
        general=parts.general,
    )
    return plan, MaskArrays(*(v.get(n) for n in MaskArrays._fields))
