"""Run Flax's own attention modules on jattn's kernels.

``flax.linen.MultiHeadDotProductAttention`` and ``flax.nnx.MultiHeadAttention`` both call an
``attention_fn(query, key, value, ...)`` with the layout jattn uses, ``[*batch, length, heads,
head_dim]``. :func:`make_attention_fn` returns such a function that calls
:func:`jattn.attention`::

    from flax import nnx
    import jattn.nn

    layer = nnx.MultiHeadAttention(
        8, 512, decode=False, rngs=nnx.Rngs(0),
        attention_fn=jattn.nn.make_attention_fn(implementation="flash"),
    )

Flax passes a boolean mask ``[batch, heads or 1, q, kv]`` (built by ``nn.make_causal_mask`` /
``make_attention_mask``, or by the module itself when decoding with its cache); it goes to the
kernel as is. ``is_causal`` (nnx) is forwarded as ``is_causal``. Differences from Flax's
``dot_product_attention``: a query row with no visible key gives zeros (Flax averages all the
values), dropout masks are drawn by jattn (same rate, different random bits; no
``broadcast_dropout``), and ``precision`` is not used (jattn accumulates in float32). The
softmax is float32 whatever the dtype, so ``force_fp32_for_softmax`` only changes the sown
weights, which are then float32 as in Flax.

Custom products (linen's ``qk_attn_weights_einsum`` / ``attn_weights_value_einsum``, e.g. AQT
quantisation, and ``einsum_dot_general``) cannot run inside a fused kernel: with any of them
the function computes the logits and the weighted sum with those products and only the
softmax with jattn's (:func:`jattn.masked_softmax`), so the products are exactly the ones the
user chose. Complex inputs are refused (jattn's kernels are real): keep Flax's own
``dot_product_attention`` for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from jattn.api import attention as _attention
from jattn.softmax import masked_softmax

__all__ = ["attention_fn", "make_attention_fn"]


def make_attention_fn(
    *, implementation: str | Sequence[str] | None = None, **attention_kwargs: Any
) -> Callable[..., jax.Array]:
    """Builds an ``attention_fn`` for Flax attention modules (linen and nnx).

    Args:
      implementation: passed to :func:`jattn.attention` (a name, a list of names, or None).
      **attention_kwargs: further fixed keyword arguments of :func:`jattn.attention`
        (e.g. ``softcap=50.0``, ``local_window_size=(128, 0)``).

    Returns:
      ``fn(query, key, value, bias=None, mask=None, ...) -> [*B, T, N, H]`` taking the keyword
      arguments that Flax passes. When Flax asks to sow the weights (``module`` given, i.e.
      ``sow_weights=True``), the weights are computed by the kernel and sown as Flax does, under
      ``"attention_weights"``.
    """
    reserved = {"bias", "mask", "is_causal", "dropout_rate", "dropout_rng", "return_weights"}
    clash = reserved & set(attention_kwargs)
    if clash:
        raise ValueError(f"{sorted(clash)} are set per call by Flax, not in make_attention_fn")

    # The explicit keyword list matters: linen keeps only the arguments that appear in the
    # signature of attention_fn.
    def fn(
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        bias: jax.Array | None = None,
        mask: jax.Array | None = None,
        broadcast_dropout: bool = True,
        dropout_rng: jax.Array | None = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        dtype: Any = None,
        precision: Any = None,
        module: Any = None,
        is_causal: bool = False,
        force_fp32_for_softmax: bool = False,
        einsum_dot_general: Any = None,
        qk_attn_weights_einsum: Any = None,
        attn_weights_value_einsum: Any = None,
        promote_dtype: Any = None,
    ) -> jax.Array:
        del broadcast_dropout, promote_dtype
        if dtype is None:
            dtype = jnp.result_type(query, key, value)
        for name, x in (("query", query), ("key", key), ("value", value), ("dtype", dtype)):
            if jnp.issubdtype(getattr(x, "dtype", x), jnp.complexfloating):
                raise TypeError(
                    f"jattn's attention_fn takes real inputs, got {name} of dtype "
                    f"{jnp.dtype(getattr(x, 'dtype', x))}; for complex attention keep Flax's "
                    "own dot_product_attention (leave attention_fn unset)"
                )
        custom = (qk_attn_weights_einsum, attn_weights_value_einsum, einsum_dot_general)
        if any(c is not None for c in custom):
            return _custom_products(
                query,
                key,
                value,
                bias,
                mask,
                dropout_rng,
                dropout_rate,
                deterministic,
                dtype,
                precision,
                module,
                is_causal,
                *custom,
                attention_kwargs,
            )
        query, key, value = (x.astype(dtype) for x in (query, key, value))
        rate = 0.0 if deterministic else dropout_rate
        if rate > 0 and dropout_rng is None:
            raise ValueError("dropout_rate > 0 and deterministic=False but dropout_rng is None")
        if mask is not None:
            mask = jnp.asarray(mask, bool)
        want_weights = module is not None
        if want_weights and force_fp32_for_softmax and jnp.dtype(dtype).itemsize < 4:
            # jattn's softmax is float32 already; Flax's flag also makes the sown weights
            # float32, which the kernels return only for float32 inputs.
            query, key, value = (x.astype(jnp.float32) for x in (query, key, value))
            if bias is not None:
                bias = jnp.asarray(bias, jnp.float32)
        result = _attention(
            query,
            key,
            value,
            bias=bias,
            mask=mask,
            is_causal=is_causal,
            dropout_rate=rate,
            dropout_rng=dropout_rng if rate > 0 else None,
            implementation=implementation,
            return_weights=want_weights,
            **attention_kwargs,
        )
        if not want_weights:
            return result
        out, weights = result
        _sow(module, weights)
        return out.astype(dtype)

    return fn


def _custom_products(
    query,
    key,
    value,
    bias,
    mask,
    dropout_rng,
    dropout_rate,
    deterministic,
    dtype,
    precision,
    module,
    is_causal,
    qk_einsum,
    av_einsum,
    dot_general,
    attention_kwargs,
) -> jax.Array:
    """Flax's materialised attention with the user's products and jattn's masked softmax."""
    unsupported = sorted(set(attention_kwargs) - {"scale"})
    if unsupported:
        raise NotImplementedError(
            f"with custom einsums the adapter computes attention itself and cannot apply "
            f"{unsupported}; drop them or the custom einsums"
        )
    if query.shape[-2] != key.shape[-2]:
        raise NotImplementedError(
            "custom einsums need as many key/value heads as query heads (no GQA), got "
            f"query {query.shape} and key {key.shape}"
        )
    query, key, value = (x.astype(dtype) for x in (query, key, value))
    einsum_kw = {"precision": precision}
    if dot_general is not None:
        einsum_kw["_dot_general"] = dot_general
    qk = qk_einsum or functools.partial(jnp.einsum, **einsum_kw)
    av = av_einsum or functools.partial(jnp.einsum, **einsum_kw)
    scale = attention_kwargs.get("scale")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = qk("...qhd,...khd->...hqk", query * jnp.asarray(scale, dtype), key)
    if bias is not None:
        logits = logits + bias
    if is_causal:
        t, s = logits.shape[-2:]
        causal = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        mask = causal if mask is None else jnp.logical_and(mask, causal)
    weights = masked_softmax(logits, None if mask is None else jnp.asarray(mask, bool))
    if module is not None:
        _sow(module, weights)
    weights = weights.astype(dtype)
    if dropout_rate > 0 and not deterministic:
        if dropout_rng is None:
            raise ValueError("dropout_rate > 0 and deterministic=False but dropout_rng is None")
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / jnp.asarray(1.0 - dropout_rate, dtype), 0)
    return av("...hqk,...khd->...qhd", weights, value)


def _sow(module: Any, weights: jax.Array) -> None:
    # Same collection and name as Flax's own dot_product_attention_weights.
    if isinstance(module, nnx.Module):
        module.sow(nnx.Intermediate, "attention_weights", weights)
    elif isinstance(module, linen.Module):
        module.sow("intermediates", "attention_weights", weights)
    else:
        raise TypeError(f"cannot sow attention weights into {type(module).__name__}")


attention_fn = make_attention_fn()
"""``make_attention_fn()`` with default options: ``attention_fn=jattn.nn.attention_fn``."""
