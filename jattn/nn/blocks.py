"""Transformer blocks: position-wise feed-forward, encoder layer and decoder layer.

Each sub-layer is wrapped in a residual connection with dropout and LayerNorm, either
post-norm as in Vaswani et al. (2017), ``LN(x + Dropout(f(x)))``, or pre-norm,
``x + Dropout(f(LN(x)))`` (``norm_first=True``), which trains more stably in deep stacks and
needs a final LayerNorm after the stack (the models add it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from jattn.kernels import ImplementationChoice
from jattn.nn.attention import MultiHeadAttention
from jattn.nn.linear import Linear
from jattn.nn.mla import MLAConfig, MLAttention

__all__ = ["DecoderLayer", "EncoderLayer", "FeedForward"]


class FeedForward(nnx.Module):
    """Position-wise feed-forward network: ``W₂ act(W₁ x + b₁) + b₂``.

    ``__call__(x [..., features]) -> [..., features]``.

    Args:
      features: input and output width (``d_model``).
      hidden_features: inner width (``d_ff``).
      activation: the nonlinearity (ReLU in the paper).
      dropout_rate: dropout on the hidden activations (0 in the paper).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import FeedForward
      >>> ffn = FeedForward(16, 64, rngs=nnx.Rngs(0))
      >>> ffn(jnp.ones((2, 5, 16))).shape
      (2, 5, 16)
    """

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        dropout_rate: float = 0.0,
        use_bias: bool = True,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.up = Linear(features, hidden_features, **common)
        self.down = Linear(hidden_features, features, **common)
        self.activation = activation
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.dropout(self.activation(self.up(x))))


class _Residual(nnx.Module):
    """LayerNorm + dropout + residual around one sub-layer, post-norm or pre-norm."""

    def __init__(
        self,
        features: int,
        *,
        norm_first: bool,
        dropout_rate: float,
        epsilon: float,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.norm_first = norm_first
        self.norm = nnx.LayerNorm(
            features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array, sublayer: Callable[[jax.Array], jax.Array]) -> jax.Array:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


def _mha(
    d_model: int,
    num_heads: int,
    *,
    num_kv_heads: int | None,
    dropout_rate: float,
    rotary: nnx.Module | None,
    implementation: ImplementationChoice,
    sinks: bool,
    dtype: Dtype | None,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads,
        d_model,
        num_kv_heads=num_kv_heads,
        dropout_rate=dropout_rate,
        rotary=rotary,
        implementation=implementation,
        sinks=sinks,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class EncoderLayer(nnx.Module):
    """Self-attention and feed-forward, each with residual + LayerNorm.

    Args:
      d_model: model width.
      num_heads: attention heads (``d_model % num_heads == 0``).
      d_ff: feed-forward inner width.
      num_kv_heads: key/value heads for GQA/MQA; defaults to ``num_heads``.
      dropout_rate: residual dropout (on each sub-layer's output).
      attention_dropout_rate: dropout on the attention weights (none in the paper).
      activation: feed-forward nonlinearity.
      norm_first: pre-norm if True, post-norm (the paper) if False.
      rotary: a :class:`~jattn.nn.RotaryEmbedding` for the self-attention, or None.
      implementation: passed to :func:`jattn.attention`.
      sinks: learned attention-sink logits in the self-attention (one per head; see
        :class:`~jattn.nn.MultiHeadAttention`).
      layer_norm_epsilon: LayerNorm epsilon.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import EncoderLayer
      >>> layer = EncoderLayer(32, 4, 64, dropout_rate=0.0, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 7, 32)), lengths=jnp.array([7, 3])).shape
      (2, 7, 32)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        norm_first: bool = False,
        rotary: nnx.Module | None = None,
        implementation: ImplementationChoice = None,
        sinks: bool = False,
        layer_norm_epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = _mha(
            d_model,
            num_heads,
            num_kv_heads=num_kv_heads,
            dropout_rate=attention_dropout_rate,
            rotary=rotary,
            implementation=implementation,
            sinks=sinks,
            **common,
        )
        self.ffn = FeedForward(d_model, d_ff, activation=activation, **common)
        res = dict(
            norm_first=norm_first, dropout_rate=dropout_rate, epsilon=layer_norm_epsilon, **common
        )
        self.attn_block = _Residual(d_model, **res)
        self.ffn_block = _Residual(d_model, **res)

    def __call__(
        self,
        x: jax.Array,
        *,
        lengths: jax.Array | None = None,
        mask: Any = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``x [*B, S, d_model] -> [*B, S, d_model]``.

        ``lengths`` (int ``[*B]``) marks right padding; ``mask`` (array or ``jattn.masks``
        object) and ``segment_ids`` (``[*B, S]``) restrict attention further; ``positions``
        feed the rotary embedding.
        """
        x = self.attn_block(
            x,
            lambda h: self.self_attn(
                h,
                mask=mask,
                query_seq_lengths=lengths,
                key_value_seq_lengths=lengths,
                segment_ids=segment_ids,
                positions=positions,
            ),
        )
        return self.ffn_block(x, self.ffn)


class DecoderLayer(nnx.Module):
    """Masked self-attention, cross-attention over encoder outputs, and feed-forward.

    With ``cross_attention=False`` it is the block of a decoder-only language model. Arguments
    as for :class:`EncoderLayer`, and ``attention="mla"`` for multi-head latent attention
    (:class:`~jattn.nn.MLAttention` with the sizes of ``mla``) in the self-attention.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import DecoderLayer
      >>> layer = DecoderLayer(32, 4, 64, dropout_rate=0.0, rngs=nnx.Rngs(0))
      >>> memory = jnp.ones((2, 9, 32))  # the encoder's output
      >>> layer(jnp.ones((2, 5, 32)), memory, memory_lengths=jnp.array([9, 4])).shape
      (2, 5, 32)
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        *,
        cross_attention: bool = True,
        num_kv_heads: int | None = None,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        norm_first: bool = False,
        rotary: nnx.Module | None = None,
        implementation: ImplementationChoice = None,
        sinks: bool = False,
        attention: str = "mha",
        mla: MLAConfig | None = None,
        layer_norm_epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attn = dict(
            num_kv_heads=num_kv_heads,
            dropout_rate=attention_dropout_rate,
            implementation=implementation,
            **common,
        )
        res = dict(
            norm_first=norm_first, dropout_rate=dropout_rate, epsilon=layer_norm_epsilon, **common
        )
        if attention == "mha":
            self.self_attn = _mha(d_model, num_heads, rotary=rotary, sinks=sinks, **attn)
        elif attention == "mla":  # its own decoupled rotary keys: `rotary` is not used
            self.self_attn = MLAttention(
                num_heads,
                d_model,
                config=MLAConfig() if mla is None else mla,
                sinks=sinks,
                implementation=implementation,
                dropout_rate=attention_dropout_rate,
                **common,
            )
        else:
            raise ValueError(f"attention must be 'mha' or 'mla', got {attention!r}")
        self.self_attn_block = _Residual(d_model, **res)
        if cross_attention:
            # Positions of source and target are unrelated, so no rotary embedding here.
            self.cross_attn = _mha(d_model, num_heads, rotary=None, sinks=False, **attn)
            self.cross_attn_block = _Residual(d_model, **res)
        else:
            self.cross_attn = nnx.data(None)
            self.cross_attn_block = nnx.data(None)
        self.ffn = FeedForward(d_model, d_ff, activation=activation, **common)
        self.ffn_block = _Residual(d_model, **res)

    def init_cache(
        self,
        batch_shape: int | Sequence[int],
        max_length: int,
        *,
        memory: jax.Array | None = None,
        dtype: Dtype | None = None,
    ) -> None:
        """Allocates the self-attention cache and, given ``memory``, projects the cross keys."""
        self.self_attn.init_cache(batch_shape, max_length, dtype=dtype)
        if memory is not None:
            if self.cross_attn is None:
                raise ValueError("memory given to a DecoderLayer without cross-attention")
            self.cross_attn.init_cross_cache(memory)

    def __call__(
        self,
        x: jax.Array,
        memory: jax.Array | None = None,
        *,
        lengths: jax.Array | None = None,
        memory_lengths: jax.Array | None = None,
        mask: Any = None,
        memory_mask: Any = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        decode: bool = False,
    ) -> jax.Array:
        """``x [*B, T, d_model]``, ``memory [*B, S, d_model]`` -> ``[*B, T, d_model]``.

        Self-attention is causal. ``lengths`` (int ``[*B]``) marks right padding of ``x`` and
        ``memory_lengths`` that of ``memory``; ``mask``/``memory_mask`` restrict self/cross
        attention further. With ``decode=True`` the self-attention appends to its cache (queries
        sit at ``cache_index..``), ``lengths`` must be None (express cache validity with
        ``mask``), and the cross-attention uses its cache when ``init_cache`` was given memory.
        """
        if decode and lengths is not None:
            raise ValueError(
                "lengths refers to whole sequences and is not accepted with decode=True; "
                "pass a jattn.masks object as mask (e.g. Lengths(None, kv)) instead"
            )
        x = self.self_attn_block(
            x,
            lambda h: self.self_attn(
                h,
                mask=mask,
                is_causal=not decode,
                query_seq_lengths=lengths,
                key_value_seq_lengths=lengths,
                segment_ids=segment_ids,
                positions=positions,
                decode=decode,
            ),
        )
        if self.cross_attn is not None:
            cached = decode and self.cross_attn.cached_key is not None
            if memory is None and not cached:
                raise ValueError(
                    "this DecoderLayer has cross-attention: pass memory (the encoder output), "
                    "or init_cache(..., memory=...) before decoding"
                )
            x = self.cross_attn_block(
                x,
                lambda h: self.cross_attn(
                    h,
                    None if cached else memory,
                    mask=memory_mask,
                    query_seq_lengths=lengths,
                    key_value_seq_lengths=memory_lengths,
                    decode=cached,
                ),
            )
        return self.ffn_block(x, self.ffn)
