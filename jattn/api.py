"""``jattn.attention``: validation, mask building, implementation choice, vmap over heads/batch."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import batching

from jattn import kernels, masks
from jattn.kernels import flash
from jattn.kernels.common import KernelOutput
from jattn.plan import Plan, make_plan
from jattn.softmax import merge_sinks

__all__ = ["attention"]

Array = jax.Array
ArrayLike = Any


def attention(
    query: ArrayLike,
    key: ArrayLike,
    value: ArrayLike | None,
    bias: ArrayLike | None = None,
    mask: ArrayLike | masks.Mask | None = None,
    *,
    value_dim: int | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: ArrayLike | None = None,
    key_value_seq_lengths: ArrayLike | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: ArrayLike | tuple[ArrayLike, ArrayLike] | None = None,
    softcap: float | None = None,
    sinks: ArrayLike | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: Array | None = None,
    implementation: str | Sequence[str] | None = None,
    config: Any = None,
    return_weights: bool = False,
    return_lse: bool = False,
    return_residual: bool = False,
) -> Array | tuple[Array, ...]:
    """Scaled dot-product attention, ``softmax(softcap(scale · q kᵀ) + bias) v`` under a mask.

    Shapes follow ``jax.nn.dot_product_attention`` (``*B`` is any number of batch dims)::

      query [*B, T, N, H]   key [*B, S, K, H]   value [*B, S, K, Hv]   ->   [*B, T, N, Hv]

    with ``N % K == 0``: ``K < N`` is grouped-query attention (``K == 1``: multi-query); each
    group of ``N // K`` query heads reads the same K/V head, which is never repeated in memory.

    Args:
      query, key, value: arrays as above, all of one floating dtype. ``value`` may be None
        with ``value_dim``.
      value_dim: with ``value=None``: the values are each key's first ``value_dim`` features
        (``Hv = value_dim``), as in multi-head latent attention's decoding on its latent cache
        (keys ``[latent, rope]``, values ``latent``). The same numbers as passing
        ``key[..., :value_dim]``, but the native CPU kernel then reads the one array once
        instead of a copy beside it.
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
      sinks: float broadcastable to ``[*B, N]``: one learned logit ``s`` per query head that
        joins each row's softmax denominator without a value (gpt-oss attention sinks):
        ``out_i = sum_j exp(l_ij) v_j / (exp(s) + sum_j exp(l_ij))``. Differentiable; the
        returned ``lse`` includes it, the returned weights do not (their rows sum to less than
        one); ``-inf`` is no sink. Every implementation takes it except ``cudnn``.
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
      return_residual: as ``jax.nn.dot_product_attention``'s: also return the log-sum-exp
        in the query's layout and dtype, ``[*B, T, N]`` (``-inf`` for a row with no visible
        key, where ``jax.nn`` gives a large negative number); after the others.
        Differentiable, like ``lse`` (``jax.nn``'s residual has a zero gradient).

    Returns:
      ``out``, or ``(out, weights)``, ``(out, lse)``, ``(out, weights, lse)``, each with the
      residual last when ``return_residual``.

    A row with no key to attend to returns zeros, with zero gradient. Combined masking
    arguments are intersected.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jattn
      >>> q = jnp.ones((2, 16, 4, 8))  # [batch, T, heads, head_dim]
      >>> kv = jnp.ones((2, 16, 2, 8))  # 2 key/value heads: grouped-query attention
      >>> jattn.attention(q, kv, kv, is_causal=True).shape
      (2, 16, 4, 8)
      >>> out, lse = jattn.attention(q, kv, kv, key_value_seq_lengths=jnp.array([16, 0]),
      ...                            return_lse=True)
      >>> lse.shape, bool(jnp.isneginf(lse[1]).all()), float(jnp.abs(out[1]).max())
      ((2, 4, 16), True, 0.0)
    """
    plan, q, k, v = make_plan(
        query,
        key,
        value,
        bias,
        mask,
        value_dim=value_dim,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        softcap=softcap,
        sinks=sinks,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        return_weights=return_weights,
        return_lse=return_lse or return_residual,
    )
    candidates, reasons = kernels.select(plan, implementation, config)
    if _is_empty(plan):
        out, lse, weights = _empty_result(plan, q.dtype)
        if plan.sinks is not None and lse is not None:
            lse = merge_sinks(out, lse, _sinks_per_head(plan))[1]
    else:
        for impl, impl_plan in candidates:
            try:
                out, lse, weights = _run(impl.name, q, k, v, impl_plan)
                kernels.note_choice(impl.name)
                break
            except NotImplementedError as e:
                # A kernel may refuse a call only it can judge (cuDNN: dtypes, head dims, mask
                # values); the next candidate takes it.
                if len(candidates) == 1 and isinstance(implementation, str):
                    raise
                reasons.append(f"{impl.name!r}: {e}")
        else:
            raise NotImplementedError(
                "no implementation could take this call: " + "; ".join(reasons)
            )

    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    if return_residual:
        extra.append(jnp.moveaxis(lse, -1, -2).astype(out.dtype))
    return (out, *extra) if extra else out


def _is_empty(plan: Plan) -> bool:
    """Whether the call has no output entry or no key (every row then sees nothing)."""
    sizes = (*plan.batch_shape, plan.q_seq_len, plan.num_heads, plan.value_head_dim)
    return any(_is_zero(d) for d in sizes) or _is_zero(plan.kv_seq_len)


def _is_zero(d: Any) -> bool:
    return isinstance(d, (int, np.integer)) and d == 0


def _is_one(d: Any) -> bool:
    return isinstance(d, (int, np.integer)) and d == 1


def _empty_result(plan: Plan, dtype):
    """What every kernel returns when there is nothing to compute: zero outputs and weights,
    ``lse = -inf`` (rows with no visible key)."""
    *b, t, n, s, hv = (
        *plan.batch_shape,
        plan.q_seq_len,
        plan.num_heads,
        plan.kv_seq_len,
        plan.value_head_dim,
    )
    out = jnp.zeros((*b, t, n, hv), dtype)
    lse = jnp.full((*b, n, t), -jnp.inf, jnp.float32) if plan.return_lse else None
    weights = jnp.zeros((*b, n, t, s), dtype) if plan.return_weights else None
    return out, lse, weights


_PLAIN_JAX = ("reference", "fused")


@functools.partial(jax.jit, static_argnames=("impl_name",))
def _run(impl_name: str, q: Array, k: Array, v: Array, plan: Plan):
    if impl_name in _PLAIN_JAX:  # differentiable in every mode as they stand
        return _run_kernel(impl_name, q, k, v, plan)
    rest = dataclasses.replace(plan, bias=None, sinks=None)
    return _any_mode(impl_name, q, k, v, plan.bias, plan.sinks, rest)


# ---------------------------------------------------------------------------------------------
# Forward-mode differentiation.
#
# The fast kernels define their reverse mode only (a custom_vjp: the saved output and log-sum-
# exp, a backward kernel), and JAX refuses forward mode (jax.jvp, jacfwd, linearize) through a
# custom_vjp. The seam below adds it without touching their reverse mode: a custom_jvp whose
# tangent is a `linear_call` that computes forward-mode tangents blockwise (`flash`'s JVP, O(T
# + S) memory) and transposes to the kernel's own backward (reverse mode: the kernel's forward
# and backward, once each, as before). Differentiating the backward again (second order) is
# refused by name: `reference` and `fused` are plain JAX and take every order.


def _differentiable(impl_name: str | kernels.Implementation, rest: Plan):
    """The kernel as a function of its differentiable inputs (q, k, v, bias, sinks); ``rest``
    is the plan without them (its arrays, masks and dropout seeds, are integers)."""

    def fn(q, k, v, bias, sinks):
        return _run_kernel(impl_name, q, k, v, dataclasses.replace(rest, bias=bias, sinks=sinks))

    return fn


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _any_mode(impl_name: str, q, k, v, bias, sinks, rest: Plan):
    return _differentiable(impl_name, rest)(q, k, v, bias, sinks)


@functools.partial(_any_mode.defjvp, symbolic_zeros=True)
def _any_mode_jvp(impl_name: str, primals, tangents):
    *xs, rest = primals
    xs = _first_order_only(impl_name, tuple(xs))
    out, pullback = jax.vjp(_differentiable(impl_name, rest), *xs)
    # Only the inputs with a tangent are the linear call's: a transpose gives cotangents to
    # every linear input, so a zero tangent (an input not differentiated) stays out.
    live = [not isinstance(t, SymbolicZero) for t in tangents[:-1]]

    def tangent(res, lin):
        _, xs, rest = res
        lin = iter(lin)
        full = [
            next(lin) if on else None if x is None else jnp.zeros_like(x)
            for x, on in zip(xs, live, strict=True)
        ]
        # (flash's own blocks when the kernel is flash: the ones its user chose)
        config = rest.config if impl_name == "flash" else None
        engine = _differentiable(_TANGENTS, dataclasses.replace(rest, config=config))
        return jax.jvp(engine, xs, tuple(full))[1]

    def transpose(res, ct):
        return [g for g, on in zip(res[0](ct), live, strict=True) if on]

    lin = [t for t, on in zip(tangents[:-1], live, strict=True) if on]
    res = (pullback, xs, rest)
    return out, jax.custom_derivatives.linear_call(tangent, transpose, res, lin)


# Forward mode's tangents: `flash` with a JVP of its own (one more blockwise pass from the saved
# log-sum-exp), which serves every feature a kernel under the seam can take.
_TANGENTS = dataclasses.replace(kernels.REGISTRY["flash"], fn=flash.flash_attention_jvp)


def _batch_linear_call(args, dims, **params):
    """vmap of a `linear_call`: the call's function, vmapped. JAX gives the primitive no rule
    of its own, and per-example gradients (vmap of grad) run the seam's transpose under vmap.
    The batched result is not transposed again (a second derivative is refused anyway)."""
    call = _linear_call_p.impl
    outs = jax.vmap(lambda *a: call(*a, **params), in_axes=tuple(dims))(*args)
    return outs, [0] * len(outs)


# (The primitive has no public name; a JAX without it, or with a rule of its own, is left as
# it is: vmap of grad through the fast kernels would then fail there, loudly.)
_linear_call_p = getattr(jax._src.custom_derivatives, "linear_call_p", None)
if _linear_call_p is not None and _linear_call_p not in getattr(
    batching, "fancy_primitive_batchers", {}
):
    batching.primitive_batchers[_linear_call_p] = _batch_linear_call


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _first_order_only(impl_name: str, primals):
    """``primals`` as they are; differentiating them is differentiating a derivative of the
    kernel (a Hessian, forward over reverse, reverse over forward), which is refused here,
    with what to do, before the kernel's own calls fail less clearly."""
    return primals


@_first_order_only.defjvp
def _first_order_only_jvp(impl_name: str, primals, tangents):
    raise NotImplementedError(
        f"implementation {impl_name!r} gives first derivatives only (reverse mode: jax.grad, "
        "jax.vjp; forward mode: jax.jvp, jax.jacfwd); a derivative of a derivative (a "
        "Hessian, jax.jvp of jax.grad, jax.grad of jax.grad) needs a plain-JAX kernel: "
        "implementation='fused' or 'reference'"
    )


# ---------------------------------------------------------------------------------------------
# Layout and vmap.


def _run_kernel(impl_name: str | kernels.Implementation, q: Array, k: Array, v: Array, plan: Plan):
    impl = kernels.REGISTRY[impl_name] if isinstance(impl_name, str) else impl_name
    if impl.batched:
        # Whole-array implementations (one Pallas launch, cuDNN, the native CPU kernel) take
        # the user's layout and the plan's leaves in their canonical [*B', K', G', ...] form,
        # and index heads themselves.
        res = impl.fn(q, k, v, plan=plan)
        if impl.applies_sinks:
            return res.out, res.lse, res.weights
        return _with_sinks(plan, res.out, res.lse, res.weights)
    nb = q.ndim - 3
    *batch, t, n, h = q.shape
    s, kh, hv = k.shape[-3], k.shape[-2], v.shape[-1]
    g = n // kh
    perm = tuple(range(nb))
    # [*B, T, N, H] -> [*B, K, G, T, H]; [*B, S, K, H] -> [*B, K, 1, S, H]
    qh = q.reshape(*batch, t, kh, g, h).transpose(*perm, nb + 1, nb + 2, nb, nb + 3)
    kk = jnp.swapaxes(k, nb, nb + 1)[..., None, :, :]
    vv = jnp.swapaxes(v, nb, nb + 1)[..., None, :, :]

    def one_head(q1, k1, v1, plan1):
        return impl.fn(q1, k1, v1, plan=plan1)

    res: KernelOutput = _vmap_leading(one_head, (qh, kk, vv, plan), (*batch, kh, g))
    out = res.out.reshape(*batch, n, t, hv)
    out = jnp.moveaxis(out, nb, nb + 1)
    lse = None if res.lse is None else res.lse.reshape(*batch, n, t)
    weights = None if res.weights is None else res.weights.reshape(*batch, n, t, s)
    return _with_sinks(plan, out, lse, weights)


def _with_sinks(plan: Plan, out: Array, lse: Array | None, weights: Array | None):
    """The kernel's results with the plan's sinks merged in (as they are without sinks)."""
    if plan.sinks is None:
        return out, lse, weights
    return merge_sinks(out, lse, _sinks_per_head(plan), weights)


def _sinks_per_head(plan: Plan) -> Array:
    """The canonical ``[*B', K', G']`` sinks as ``[*B, N]``."""
    nb = len(plan.batch_shape)
    s = jnp.broadcast_to(plan.sinks, (*plan.sinks.shape[:nb], plan.num_kv_heads, plan.group_size))
    return s.reshape(*s.shape[:nb], plan.num_heads)


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
    # A leaf's leading dim is either full or 1 (canonical layout); sizes may be symbolic
    # (jax.export), so only a static 1 counts as broadcast.
    axes = [None if _is_one(size) or _is_one(x.shape[0]) else 0 for x in leaves]
    sliced = [x if a == 0 else x[0] for x, a in zip(leaves, axes, strict=True)]

    def inner(*ls):
        return _vmap_leading(fn, jax.tree.unflatten(treedef, ls), rest)

    if _is_one(size):
        return jax.tree.map(lambda y: y[None], inner(*sliced))
    return jax.vmap(inner, in_axes=axes)(*sliced)
