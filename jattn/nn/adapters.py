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
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from jattn.api import attention as _attention

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
        qk_attn_weights_einsum: Any = None,
        attn_weights_value_einsum: Any = None,
        promote_dtype: Any = None,
    ) -> jax.Array:
        del broadcast_dropout, precision, promote_dtype
        if qk_attn_weights_einsum is not None or attn_weights_value_einsum is not None:
            raise NotImplementedError(
                "custom einsums (qk_attn_weights_einsum / attn_weights_value_einsum, e.g. AQT "
                "quantisation) cannot run on jattn kernels"
            )
        if dtype is None:
            dtype = jnp.result_type(query, key, value)
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
