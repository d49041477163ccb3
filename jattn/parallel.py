"""Attention across devices: ring (context-parallel) attention with ``jax.shard_map``.

The sequence axis of query, key and value is split over one mesh axis (the *ring*). Each device
keeps its query shard and passes its key/value shard to the next device with
``jax.lax.ppermute``; after ``P`` steps (``P`` devices on the ring) every query shard has met every
key/value shard. Each step runs a jattn kernel on what the device holds
(``jattn.attention(..., return_lse=True)``) and merges the partial result into a running output
with the log-sum-exp, so the result is exact, not approximate. Per-device memory is that of
attention over the local shard: a sequence ``P`` times longer on ``P`` devices.

Masks are expressed in *global* positions: a key/value block carries no positions of its own, but
the ring step tells where it came from, so each (query chunk, key chunk) pair gets a
``Causal(offset)`` / ``Lengths`` / window mask shifted by the chunks' global offsets, and a pair
that such a mask hides entirely is skipped (``lax.cond``). Segment ids travel around the ring
with the keys.

Layouts (``layout=``): with ``"contiguous"`` device ``d`` holds positions
``[d·T/P, (d+1)·T/P)``; under a causal mask device 0 then has one block of work and device ``P-1``
has ``P``, so most devices idle most of the time. ``"zigzag"`` cuts the sequence into ``2P``
chunks and gives device ``d`` chunks ``d`` and ``2P-1-d``: every device does the same work at
every step. The inputs must then be in that order: permute tokens (and positions, segment ids,
targets) once with :func:`to_layout` before the model and the outputs back with
:func:`from_layout` if needed; everything but attention is position-wise and does not care.

Backward: a ``jax.custom_vjp`` runs a second ring. Autodiff through the forward ring loop would
keep every key/value block the device has seen for the backward pass (``P`` blocks, the whole
sequence), which defeats the purpose. The custom backward keeps only the local shards, the
merged output and its log-sum-exp, and sends the key/value gradients around the ring with the
blocks. Per pair it takes the kernel's own VJP (``jax.vjp`` of ``jattn.attention``, which
recomputes that pair's forward) with the cotangents that the merge implies:
``d o_b = w_b · dO`` and ``d lse_b = w_b · (dO·(o_b - O) + dLSE)`` with
``w_b = exp(lse_b - LSE)``, which is exactly the gradient of the global softmax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jattn import masks
from jattn.api import attention
from jattn.plan import make_plan, parse_segment_ids, parse_window
from jattn.softmax import merge_sinks

__all__ = [
    "LAYOUTS",
    "from_layout",
    "layout_indices",
    "ring_attention",
    "ring_attention_local",
    "to_layout",
]

Array = jax.Array
ArrayLike = Any

LAYOUTS = ("contiguous", "zigzag")

# How many chunks of the sequence each device holds, by layout.
_CHUNKS = {"contiguous": 1, "zigzag": 2}


# ---------------------------------------------------------------------------------------------
# Layouts.


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def layout_indices(seq_len: int, num_shards: int, layout: str = "zigzag") -> np.ndarray:
    """The natural position held at each index of ``layout``: ``x_layout = x[perm]``.

    ``"zigzag"`` cuts ``seq_len`` into ``2 · num_shards`` equal chunks and orders them
    ``0, 2P-1, 1, 2P-2, ...`` so that shard ``d`` (the ``d``-th slice of ``seq_len / P``) holds
    chunks ``d`` and ``2P-1-d``; ``"contiguous"`` is the identity.

    Returns:
      int ``[seq_len]`` (a NumPy array: static, usable to index and to build positions).
    """
    _check_layout(layout)
    chunks = _CHUNKS[layout] * num_shards
    if num_shards < 1 or seq_len % chunks:
        raise ValueError(
            f"layout {layout!r} over {num_shards=} needs seq_len divisible by {chunks}, "
            f"got {seq_len=}"
        )
    c = seq_len // chunks
    order = _chunk_order(num_shards, layout)
    return (order[:, None] * c + np.arange(c)[None, :]).reshape(-1)


def _chunk_order(num_shards: int, layout: str) -> np.ndarray:
    if layout == "contiguous":
        return np.arange(num_shards)
    d = np.arange(num_shards)
    return np.stack([d, 2 * num_shards - 1 - d], axis=1).reshape(-1)


def to_layout(x: ArrayLike, num_shards: int, *, layout: str = "zigzag", axis: int = 1) -> Array:
    """Permutes the sequence axis ``axis`` of ``x`` from natural order into ``layout``.

    Works on any array whose ``axis`` is the sequence: query/key/value ``[B, T, N, H]``
    (``axis=1``), tokens, positions or segment ids ``[B, T]`` (``axis=1``). The permutation moves
    whole chunks, so under ``jit`` on sharded arrays it is a reshuffle of chunks.
    """
    return _permute_chunks(x, num_shards, layout, axis, inverse=False)


def from_layout(x: ArrayLike, num_shards: int, *, layout: str = "zigzag", axis: int = 1) -> Array:
    """Undoes :func:`to_layout`: ``from_layout(to_layout(x, P), P) == x``."""
    return _permute_chunks(x, num_shards, layout, axis, inverse=True)


def _permute_chunks(x, num_shards: int, layout: str, axis: int, inverse: bool) -> Array:
    x = jnp.asarray(x)
    axis = axis % x.ndim
    t = x.shape[axis]
    layout_indices(t, num_shards, layout)  # validates
    if layout == "contiguous":
        return x
    order = _chunk_order(num_shards, layout)
    if inverse:
        order = np.argsort(order)
    n = order.size
    xs = x.reshape(*x.shape[:axis], n, t // n, *x.shape[axis + 1 :])
    index = (slice(None),) * axis + (order,)
    sharding = jax.typeof(xs).sharding
    if any(a == jax.sharding.AxisType.Explicit for a in sharding.mesh.axis_types):
        # With explicit sharding the gather must be told where its result lives: where x was.
        return xs.at[index].get(out_sharding=sharding).reshape(x.shape)
    return xs[index].reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# The global function: shard_map over the user's mesh.


def ring_attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike,
    *,
    mesh: Mesh | None = None,
    axis_name: str,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
    layout: str = "contiguous",
    batch_axis: str | tuple[str, ...] | None = None,
    head_axis: str | tuple[str, ...] | None = None,
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Attention with the sequence split over the mesh axis ``axis_name`` (ring attention).

    Same numbers as :func:`jattn.attention` on the whole sequence, with shapes::

      query [*B, T, N, H]   key [*B, S, K, H]   value [*B, S, K, Hv]   ->   [*B, T, N, Hv]

    where the ``T`` and ``S`` axes are sharded over ``axis_name`` (``P`` devices), in the order
    given by ``layout``. Call it inside or outside ``jax.jit``; inputs that are not sharded that
    way are resharded by ``shard_map``.

    Args:
      query, key, value: as above; ``T`` and ``S`` divisible by ``P`` (``2P`` for zigzag).
      mesh: the device mesh; None uses the mesh set by ``jax.set_mesh``.
      axis_name: the mesh axis the sequence is split over.
      is_causal: key ``j`` visible from query ``i`` iff ``j <= i`` in natural positions.
      query_seq_lengths, key_value_seq_lengths: int ``[*B]``, in natural positions (the same
        numbers whatever the layout); positions at or past them are padding.
      segment_ids: ``[*B, T]`` (self-attention) or ``(q_ids [*B, T], kv_ids [*B, S])``, in the
        layout's order like the inputs; attention stays within equal ids.
      local_window_size: ``w`` or ``(left, right)``: query ``i`` sees keys ``i-left..i+right``.
      scale, softcap, implementation, config: as for :func:`jattn.attention`, used by the
        kernel on each device. For long sequences pick a kernel whose memory is linear in the
        block (``implementation="flash"`` or a Pallas kernel).
      sinks: as for :func:`jattn.attention` (broadcastable to ``[*B, N]``): merged once per
        row, after the partial results of every device are.
      layout: ``"contiguous"`` (natural order) or ``"zigzag"`` (see :func:`to_layout`; balances
        causal work across devices).
      batch_axis: mesh axis (or axes) the first batch dim is split over (data parallelism).
      head_axis: mesh axis the heads are split over (``N`` and ``K`` divisible by its size).
      return_lse: also return the log-sum-exp ``[*B, N, T]`` (float32, ``-inf`` for a row
        that sees no key), sharded like the output.

    Returns:
      ``out`` or ``(out, lse)``, in ``layout`` order, sharded like ``query``.

    There is no ``bias``, dense ``mask`` or dropout: each would need its ``[T, S]`` slices on
    every device at every step.
    """
    _check_layout(layout)
    q, k, v = (jnp.asarray(x) for x in (query, key, value))
    if q.ndim < 3 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            "query, key and value must be [*B, T, N, H] of one rank >= 3, got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    # The arguments mean what they mean in jattn.attention, and are refused in the same words.
    make_plan(
        q,
        k,
        v,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        softcap=softcap,
        sinks=sinks,
    )
    batch = q.shape[:-3]
    t, s = q.shape[-3], k.shape[-3]
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("ring_attention needs mesh= or a mesh set with jax.set_mesh")
    if axis_name not in mesh.axis_names:
        raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {mesh.axis_names}")
    p = mesh.shape[axis_name]
    per = _CHUNKS[layout] * p
    if t % per or s % per:
        raise ValueError(
            f"layout {layout!r} on {p} devices along {axis_name!r} needs sequence lengths "
            f"divisible by {per}, got query length {t} (query {q.shape}) and key length {s} "
            f"(key {k.shape})"
        )
    if batch_axis is not None and not batch:
        raise ValueError(f"batch_axis={batch_axis!r} given but query {q.shape} has no batch dim")

    b_spec = (batch_axis,) + (None,) * (len(batch) - 1) if batch else ()
    qkv_spec = PartitionSpec(*b_spec, axis_name, head_axis, None)
    len_spec = PartitionSpec(*b_spec)
    ids_spec = PartitionSpec(*b_spec, axis_name)
    lse_spec = PartitionSpec(*b_spec, head_axis, axis_name)

    def lengths(x):
        return None if x is None else jnp.broadcast_to(jnp.asarray(x), batch)

    q_len, kv_len = lengths(query_seq_lengths), lengths(key_value_seq_lengths)
    q_ids = kv_ids = None
    if (ids := parse_segment_ids(segment_ids)) is not None:
        q_ids, kv_ids = ids
        q_ids = jnp.broadcast_to(jnp.asarray(q_ids), (*batch, t))
        kv_ids = jnp.broadcast_to(jnp.asarray(kv_ids), (*batch, s))

    if sinks is not None:
        sinks = jnp.broadcast_to(jnp.asarray(sinks), (*batch, q.shape[-2]))
    args = (q, k, v, q_len, kv_len, q_ids, kv_ids, sinks)
    sink_spec = PartitionSpec(*b_spec, head_axis)
    specs = (qkv_spec, qkv_spec, qkv_spec, len_spec, len_spec, ids_spec, ids_spec, sink_spec)
    in_specs = tuple(None if a is None else sp for a, sp in zip(args, specs, strict=True))

    local = functools.partial(
        _local_from_args,
        axis_name=axis_name,
        is_causal=is_causal,
        local_window_size=local_window_size,
        scale=scale,
        softcap=softcap,
        implementation=implementation,
        config=config,
        layout=layout,
    )
    if any(a == jax.sharding.AxisType.Explicit for a in mesh.axis_types):
        # An explicitly sharded mesh wants inputs that already match in_specs.
        args = tuple(
            None if a is None else jax.sharding.reshard(a, sp)
            for a, sp in zip(args, in_specs, strict=True)
        )
    # check_vma=False: the flash kernel's loop carries are not typed as varying over mesh axes
    # (see ring_attention_local), and nothing here relies on the checker's replication rules.
    ring = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=in_specs,
        out_specs=(qkv_spec, lse_spec),
        check_vma=False,
    )
    out, lse = ring(*args)
    return (out, lse) if return_lse else out


def _local_from_args(q, k, v, q_len, kv_len, q_ids, kv_ids, sinks, **kw):
    seg = None if q_ids is None else (q_ids, kv_ids)
    return ring_attention_local(
        q,
        k,
        v,
        query_seq_lengths=q_len,
        key_value_seq_lengths=kv_len,
        segment_ids=seg,
        sinks=sinks,
        return_lse=True,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# The per-device function, for use inside the caller's own shard_map.


@dataclasses.dataclass(frozen=True)
class _Ring:
    """The static part of a ring call (hashable; a nondiff argument of the custom_vjp)."""

    axis_name: Any
    size: int  # P, devices on the ring
    chunks: int  # chunks per device: 2 for zigzag under a positional mask, else 1
    layout: str
    causal: bool
    window: tuple[int | None, int | None] | None
    scale: float | None
    softcap: float | None
    implementation: Any
    config: Any


def ring_attention_local(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: str,
    is_causal: bool = False,
    query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    segment_ids: Array | tuple[Array, Array] | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    sinks: Array | None = None,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
    layout: str = "contiguous",
    return_lse: bool = False,
) -> Array | tuple[Array, Array]:
    """Ring attention on the local shards, inside ``jax.shard_map`` over ``axis_name``.

    What :func:`ring_attention` runs on each device; call it directly from a model that is
    already inside a ``shard_map``. Shapes are per device::

      query [*b, T/P, N, H]   key [*b, S/P, K, H]   value [*b, S/P, K, Hv]   ->   [*b, T/P, N, Hv]

    ``query_seq_lengths``/``key_value_seq_lengths`` are the *global* lengths ``[*b]`` (natural
    positions); ``segment_ids`` are the local shards ``[*b, T/P]`` (or a pair with ``[*b, S/P]``);
    ``sinks`` the local heads' sink logits, broadcastable to ``[*b, N]``.
    Other arguments as for :func:`ring_attention`. Returns ``out`` (the query's dtype) or
    ``(out, lse [*b, N, T/P])``.

    With ``implementation="flash"``, run the enclosing ``shard_map`` with ``check_vma=False``:
    the flash kernel's block loops start from constants that ``check_vma`` types as unvarying
    over the mesh, and ``lax.switch`` then rejects its branches (as :func:`ring_attention` does).
    """
    _check_layout(layout)
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must be [*b, T, N, H] of one rank >= 3, got "
            f"{query.shape}, {key.shape}, {value.shape}"
        )
    p = jax.lax.axis_size(axis_name)
    window = parse_window(local_window_size)
    positional = is_causal or window is not None
    positional |= query_seq_lengths is not None or key_value_seq_lengths is not None
    # Without a mask that depends on positions, the order of positions inside a shard does not
    # matter, and one kernel call per step over the whole shard does the work of four.
    chunks = _CHUNKS[layout] if positional else 1
    t, s = query.shape[-3], key.shape[-3]
    if t % chunks or s % chunks:
        raise ValueError(
            f"layout {layout!r} needs local lengths divisible by {chunks}, got query "
            f"{query.shape} and key {key.shape}"
        )
    if implementation is not None and not isinstance(implementation, str):
        implementation = tuple(implementation)
    r = _Ring(
        axis_name=axis_name,
        size=p,
        chunks=chunks,
        layout=layout,
        causal=bool(is_causal),
        window=window,
        scale=None if scale is None else float(scale),
        softcap=None if softcap is None else float(softcap),
        implementation=implementation,
        config=config,
    )
    q_ids, kv_ids = parse_segment_ids(segment_ids) or (None, None)
    out, lse = _ring(r, query, key, value, query_seq_lengths, key_value_seq_lengths, q_ids, kv_ids)
    if sinks is not None:  # once per row, after every device's partial result is merged
        out, lse, _ = merge_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------
# One (query chunk, key chunk) pair: its mask in global positions, whether anything is visible.


def _chunk_start(r: _Ring, device, c: int, length: int):
    """Global position of chunk ``c`` (of ``r.chunks``) of the shard of ``device``."""
    if r.chunks == 1:
        return device * length
    # zigzag: chunk 0 is global chunk d, chunk 1 is global chunk 2P-1-d
    g = device if c == 0 else 2 * r.size - 1 - device
    return g * length


def _pair_mask(r: _Ring, q0, k0, cq: int, ck: int, q_len, kv_len, q_ids, kv_ids):
    parts: list[masks.Mask] = []
    off = q0 - k0  # key j (local) visible from query i (local) iff j <= i + off, causally
    if r.causal:
        parts.append(masks.Causal(off))
    if r.window is not None:
        left, right = r.window
        if right is not None:
            parts.append(masks.Causal(off + right))
        if left is not None:
            parts.append(~masks.Causal(off - left - 1))
    if q_len is not None or kv_len is not None:
        parts.append(
            masks.Lengths(
                None if q_len is None else jnp.clip(q_len - q0, 0, cq),
                None if kv_len is None else jnp.clip(kv_len - k0, 0, ck),
            )
        )
    if q_ids is not None:
        parts.append(masks.Segments(q_ids, kv_ids))
    return functools.reduce(lambda a, b: a & b, parts) if parts else None


def _pair_visible(r: _Ring, q0, k0, cq: int, ck: int, q_len, kv_len):
    """False when the pair's positional mask hides everything (the pair is skipped); a traced
    bool, or Python True when there is nothing to decide. The mask objects answer it: a pair
    is one block of rows and keys."""
    mask = _pair_mask(r, q0, k0, cq, ck, q_len, kv_len, None, None)
    if mask is None:
        return True
    any_, _ = mask.classify(0, 0, cq, ck)
    return any_ if isinstance(any_, bool) else jnp.any(any_)


def _attend(r: _Ring, q, k, v, mask):
    return attention(
        q,
        k,
        v,
        mask=mask,
        scale=r.scale,
        softcap=r.softcap,
        implementation=r.implementation,
        config=r.config,
        return_lse=True,
    )


def _maybe(pred, update, carry):
    """``update(carry)`` where ``pred``, else ``carry``; no branch at all when ``pred`` is True."""
    if pred is True:
        return update(carry)
    return jax.lax.cond(pred, update, lambda c: c, carry)


# ---------------------------------------------------------------------------------------------
# Exact merging of partial softmaxes.


def _rows(x: Array) -> Array:
    """``[*B, N, T]`` per-row values -> ``[*B, T, N, 1]``, to scale outputs ``[*B, T, N, H]``."""
    return jnp.swapaxes(x, -1, -2)[..., None]


def _merge(o1: Array, l1: Array, o2: Array, l2: Array) -> tuple[Array, Array]:
    """Combines two partial results over disjoint key sets into the result over their union.

    ``o`` are normalised outputs ``[*B, T, N, H]`` and ``l`` their log-sum-exps ``[*B, N, T]``;
    a row whose ``l`` is ``-inf`` saw no key and contributes nothing, and a row that is
    ``-inf`` on both sides stays zero with ``-inf`` (no ``inf - inf``).
    """
    m = jnp.maximum(l1, l2)
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)
    tot = w1 + w2
    seen = tot > 0
    safe = jnp.where(seen, tot, 1.0)
    lse = jnp.where(seen, m + jnp.log(safe), -jnp.inf)
    o = o1 * _rows(w1 / safe) + o2 * _rows(w2 / safe)
    return o, lse


def _weight(lse_part: Array, lse: Array) -> Array:
    """``exp(lse_part - lse)``: the share of a partial result in the merged one (0 where the
    part saw no key, without computing ``-inf - -inf``)."""
    safe = jnp.where(jnp.isneginf(lse), 0.0, lse)
    return jnp.where(jnp.isneginf(lse_part), 0.0, jnp.exp(lse_part - safe))


# ---------------------------------------------------------------------------------------------
# The ring, forward and backward.


def _split(x: Array | None, n: int, axis: int) -> tuple:
    """``x`` cut into ``n`` equal chunks along ``axis`` (a tuple of ``n`` Nones for None)."""
    if x is None:
        return (None,) * n
    return tuple(jnp.split(x, n, axis=axis))


def _join(xs: Sequence[Array], axis: int) -> Array:
    return xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis=axis)


def _send(r: _Ring, x):
    """Every device passes ``x`` (a pytree) to the next device on the ring."""
    if r.size == 1:
        return x
    perm = [(i, (i + 1) % r.size) for i in range(r.size)]
    return jax.tree.map(lambda a: jax.lax.ppermute(a, r.axis_name, perm), x)


def _ring_loop(r: _Ring, step, held, carry):
    """Runs ``step(s, held, carry) -> carry`` for ``s = 0..P-1``, where ``held`` is the block
    device ``d`` has at step ``s`` (the one of device ``d - s``).

    The next block is sent at the start of each step, so the transfer overlaps the step's
    compute. The last step's send is wasted, but hidden behind that step's compute, and it keeps
    the steps identical: one loop body, so the program (and its compile time) does not double.
    """

    def body(s, c):
        held, carry = c
        nxt = _send(r, held)
        return nxt, step(s, held, carry)

    return jax.lax.fori_loop(0, r.size, body, (held, carry))


def _forward(r: _Ring, q, k, v, q_len, kv_len, q_ids, kv_ids):
    me = jax.lax.axis_index(r.axis_name)
    n = r.chunks
    acc_dt = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64
    cq, ck = q.shape[-3] // n, k.shape[-3] // n
    qs, q_idss = _split(q, n, -3), _split(q_ids, n, -1)
    held = (_split(k, n, -3), _split(v, n, -3), _split(kv_ids, n, -1))

    def step(s, held, acc):
        ks, vs, kv_idss = held
        src = (me - s) % r.size  # whose keys these are
        acc = list(acc)
        for a in range(n):
            q0 = _chunk_start(r, me, a, cq)
            for b in range(n):
                k0 = _chunk_start(r, src, b, ck)
                mask = _pair_mask(r, q0, k0, cq, ck, q_len, kv_len, q_idss[a], kv_idss[b])

                def update(c, a=a, b=b, mask=mask):
                    o, lse = _attend(r, qs[a], ks[b], vs[b], mask)
                    return _merge(*c, o.astype(acc_dt), lse.astype(acc_dt))

                vis = _pair_visible(r, q0, k0, cq, ck, q_len, kv_len)
                acc[a] = _maybe(vis, update, acc[a])
        return tuple(acc)

    hv = v.shape[-1]
    acc0 = []
    for qa in qs:
        # zeros_like keeps the shard_map type of q (varying over its mesh axes), as the carry
        # of the ring loop must.
        o0 = jnp.zeros_like(qa, acc_dt, shape=(*qa.shape[:-1], hv))
        lse0 = jnp.swapaxes(jnp.full_like(qa[..., 0], -jnp.inf, acc_dt), -1, -2)
        acc0.append((o0, lse0))
    _, acc = _ring_loop(r, step, held, tuple(acc0))
    o = _join([a[0] for a in acc], -3)
    lse = _join([a[1] for a in acc], -1)
    return o, lse


def _backward(r: _Ring, q, k, v, q_len, kv_len, q_ids, kv_ids, o, lse, g_o, g_lse):
    me = jax.lax.axis_index(r.axis_name)
    n = r.chunks
    cq, ck = q.shape[-3] // n, k.shape[-3] // n
    acc_dt = jnp.promote_types(q.dtype, jnp.float32)  # float64 stays float64
    qs, q_idss = _split(q, n, -3), _split(q_ids, n, -1)
    os_, lses = _split(o, n, -3), _split(lse, n, -1)
    gos, glses = _split(g_o.astype(acc_dt), n, -3), _split(g_lse.astype(acc_dt), n, -1)
    ks, vs, kv_idss = _split(k, n, -3), _split(v, n, -3), _split(kv_ids, n, -1)
    held = (ks, vs, kv_idss)
    dq0 = tuple(jnp.zeros_like(x, acc_dt) for x in qs)
    dkv0 = (
        tuple(jnp.zeros_like(x, acc_dt) for x in ks),
        tuple(jnp.zeros_like(x, acc_dt) for x in vs),
    )

    def pair_grads(a, b, ks, vs, mask, c):
        dq, dk, dv = c

        def f(qa, kb, vb):
            return _attend(r, qa, kb, vb, mask)

        (o_b, lse_b), vjp = jax.vjp(f, qs[a], ks[b], vs[b])
        w = _weight(lse_b, lses[a])
        g_o_b = _rows(w) * gos[a]
        dot = jnp.sum(gos[a] * (o_b.astype(acc_dt) - os_[a]), axis=-1)  # [*B, T, N]
        g_lse_b = w * (jnp.swapaxes(dot, -1, -2) + glses[a])
        dqa, dkb, dvb = vjp((g_o_b.astype(o_b.dtype), g_lse_b))
        return dq + dqa.astype(acc_dt), dk + dkb.astype(acc_dt), dv + dvb.astype(acc_dt)

    def step(s, blk, dq, dkv):
        ks, vs, kv_idss = blk
        dq, dks, dvs = list(dq), list(dkv[0]), list(dkv[1])
        src = (me - s) % r.size
        for a in range(n):
            q0 = _chunk_start(r, me, a, cq)
            for b in range(n):
                k0 = _chunk_start(r, src, b, ck)
                mask = _pair_mask(r, q0, k0, cq, ck, q_len, kv_len, q_idss[a], kv_idss[b])
                upd = functools.partial(pair_grads, a, b, ks, vs, mask)
                vis = _pair_visible(r, q0, k0, cq, ck, q_len, kv_len)
                dq[a], dks[b], dvs[b] = _maybe(vis, upd, (dq[a], dks[b], dvs[b]))
        return tuple(dq), (tuple(dks), tuple(dvs))

    def body(s, c):
        blk, dq, dkv = c
        nxt = _send(r, blk)
        dq, dkv = step(s, blk, dq, dkv)
        # The kv gradients of this step's block travel on with it; after the last step they
        # arrive at the block's own device.
        return nxt, dq, _send(r, dkv)

    _, dq, (dks, dvs) = jax.lax.fori_loop(0, r.size, body, (held, dq0, dkv0))
    return (
        _join(dq, -3).astype(q.dtype),
        _join(dks, -3).astype(k.dtype),
        _join(dvs, -3).astype(v.dtype),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(r: _Ring, q, k, v, q_len, kv_len, q_ids, kv_ids):
    o, lse = _forward(r, q, k, v, q_len, kv_len, q_ids, kv_ids)
    return o.astype(q.dtype), lse


def _ring_fwd(r, q, k, v, q_len, kv_len, q_ids, kv_ids):
    o, lse = _forward(r, q, k, v, q_len, kv_len, q_ids, kv_ids)
    # The float32 output is kept for the backward's dO·(o_b - O) terms.
    return (o.astype(q.dtype), lse), (q, k, v, q_len, kv_len, q_ids, kv_ids, o, lse)


def _ring_bwd(r, res, cts):
    q, k, v, q_len, kv_len, q_ids, kv_ids, o, lse = res
    g_o, g_lse = cts
    dq, dk, dv = _backward(r, q, k, v, q_len, kv_len, q_ids, kv_ids, o, lse, g_o, g_lse)
    return dq, dk, dv, None, None, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
