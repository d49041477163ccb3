"""Models: the encoder-decoder ``Transformer`` (Vaswani et al., 2017) and ``DecoderLM``.

Token inputs are right-padded int arrays ``[B, T]`` with their true lengths given as ``[B]``
ints, which reach the kernels as lengths (no dense padding mask is built).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from jattn.kernels import ImplementationChoice
from jattn.nn.blocks import DecoderLayer, EncoderLayer
from jattn.nn.linear import Linear, tied_logits
from jattn.nn.mla import MLAConfig
from jattn.nn.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
)

__all__ = ["DecoderLM", "Transformer"]

PositionEncoding = Literal["sinusoidal", "learned", "rope", "none"]
_POSITION_KINDS = ("sinusoidal", "learned", "rope", "none")


class _Embedder(nnx.Module):
    """Token embedding (optionally shared), scaled by sqrt(d_model), plus additive positions."""

    def __init__(
        self,
        embed: nnx.Embed,
        d_model: int,
        *,
        position_encoding: str,
        max_length: int | None,
        scale: bool,
        dropout_rate: float,
        dtype: Dtype | None,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        self.embed = embed
        self.scale = math.sqrt(d_model) if scale else 1.0
        if position_encoding == "sinusoidal":
            self.positions = SinusoidalPositionalEncoding(d_model)
        elif position_encoding == "learned":
            if max_length is None:
                raise ValueError('position_encoding="learned" needs max_length')
            self.positions = LearnedPositionalEmbedding(
                max_length, d_model, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )
        else:  # rope (applied inside attention) or none
            self.positions = nnx.data(None)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.embed(tokens) * self.scale
        if self.positions is not None:
            x = x + self.positions(positions).astype(x.dtype)
        return self.dropout(x)


def _check_kind(position_encoding: str) -> None:
    if position_encoding not in _POSITION_KINDS:
        raise ValueError(
            f"position_encoding must be one of {_POSITION_KINDS}, got {position_encoding!r}"
        )


def _check_tokens(name: str, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be int [batch, length], got {tokens.dtype}{list(tokens.shape)}"
        )


def _cache_start(layer: DecoderLayer) -> jax.Array:
    index = layer.self_attn.cache_index
    if index is None:
        raise ValueError("decode=True but the KV cache is not initialised: call init_cache first")
    return index[...]


def _default_positions(tokens: jax.Array, start: Any = 0) -> jax.Array:
    return jnp.broadcast_to(start + jnp.arange(tokens.shape[-1]), tokens.shape)


class Transformer(nnx.Module):
    """Encoder-decoder Transformer; the defaults are the base model of the paper.

    Args:
      src_vocab_size: source vocabulary size.
      tgt_vocab_size: target vocabulary size; defaults to ``src_vocab_size``.
      d_model, num_heads, d_ff: widths (512, 8, 2048 in the paper).
      num_encoder_layers, num_decoder_layers: depths (6 and 6).
      dropout_rate: residual and embedding dropout (0.1).
      attention_dropout_rate: dropout on the attention weights (none in the paper).
      num_kv_heads: key/value heads for GQA/MQA.
      activation: feed-forward nonlinearity (ReLU).
      norm_first: pre-norm if True; post-norm (the paper) by default.
      position_encoding: "sinusoidal" (the paper), "learned" (needs ``max_length``),
        "rope" (rotary, in the self-attentions) or "none".
      max_length: size of the learned position table.
      share_embeddings: one embedding matrix for source and target (one vocabulary).
      tie_output: the output projection is the transposed target embedding (the paper ties
        both embeddings and the pre-softmax projection: set both flags).
      implementation: passed to :func:`jattn.attention` by every attention layer.
      sinks: learned attention-sink logits (one per head) in every self-attention.
      layer_norm_epsilon: LayerNorm epsilon.
      dtype, param_dtype: computation and parameter dtypes.
      rngs: initialisation and dropout streams.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import Transformer
      >>> model = Transformer(50, d_model=32, num_heads=2, num_encoder_layers=1,
      ...                     num_decoder_layers=1, d_ff=64, rngs=nnx.Rngs(0))
      >>> src, tgt = jnp.ones((2, 7), jnp.int32), jnp.ones((2, 5), jnp.int32)
      >>> model(src, tgt).shape  # teacher-forced logits [batch, T, target vocabulary]
      (2, 5, 50)
    """

    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int | None = None,
        *,
        d_model: int = 512,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        d_ff: int = 2048,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        num_kv_heads: int | None = None,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        norm_first: bool = False,
        position_encoding: PositionEncoding = "sinusoidal",
        max_length: int | None = None,
        share_embeddings: bool = False,
        tie_output: bool = False,
        implementation: ImplementationChoice = None,
        sinks: bool = False,
        layer_norm_epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_kind(position_encoding)
        tgt_vocab_size = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        if share_embeddings and tgt_vocab_size != src_vocab_size:
            raise ValueError(
                f"share_embeddings needs one vocabulary, got {src_vocab_size=} and "
                f"{tgt_vocab_size=}"
            )
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got {d_model=}, {num_heads=}"
            )
        self.d_model = d_model
        self.src_vocab_size = src_vocab_size
        self.tgt_vocab_size = tgt_vocab_size
        self.norm_first = norm_first
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Unit-variance embeddings after the sqrt(d_model) scale, and sensible logits when tied.
        embed_init = nnx.initializers.normal(stddev=d_model**-0.5)

        def embed(vocab: int) -> nnx.Embed:
            return nnx.Embed(vocab, d_model, embedding_init=embed_init, **common)

        src_embed = embed(src_vocab_size)
        tgt_embed = src_embed if share_embeddings else embed(tgt_vocab_size)
        emb = dict(
            position_encoding=position_encoding,
            max_length=max_length,
            scale=True,
            dropout_rate=dropout_rate,
            **common,
        )
        self.src_embedder = _Embedder(src_embed, d_model, **emb)
        self.tgt_embedder = _Embedder(tgt_embed, d_model, **emb)

        layer = dict(
            num_kv_heads=num_kv_heads,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            activation=activation,
            norm_first=norm_first,
            rotary=RotaryEmbedding() if position_encoding == "rope" else None,
            implementation=implementation,
            sinks=sinks,
            layer_norm_epsilon=layer_norm_epsilon,
            **common,
        )
        self.encoder_layers = nnx.List(
            [EncoderLayer(d_model, num_heads, d_ff, **layer) for _ in range(num_encoder_layers)]
        )
        self.decoder_layers = nnx.List(
            [DecoderLayer(d_model, num_heads, d_ff, **layer) for _ in range(num_decoder_layers)]
        )
        if norm_first:
            norm = dict(epsilon=layer_norm_epsilon, **common)
            self.encoder_norm = nnx.LayerNorm(d_model, **norm)
            self.decoder_norm = nnx.LayerNorm(d_model, **norm)
        else:
            self.encoder_norm = nnx.data(None)
            self.decoder_norm = nnx.data(None)
        if tie_output:
            self.output = nnx.data(None)
        else:
            self.output = Linear(d_model, tgt_vocab_size, **common)

    def encode(
        self,
        src: jax.Array,
        *,
        src_lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """``src`` int ``[B, S]`` (right-padded to ``src_lengths [B]``) -> memory ``[B, S, d]``."""
        _check_tokens("src", src)
        positions = _default_positions(src) if positions is None else positions
        x = self.src_embedder(src, positions)
        for layer in self.encoder_layers:
            x = layer(x, lengths=src_lengths, positions=positions)
        return x if self.encoder_norm is None else self.encoder_norm(x)

    def decode(
        self,
        tgt: jax.Array,
        memory: jax.Array | None = None,
        *,
        tgt_lengths: jax.Array | None = None,
        src_lengths: jax.Array | None = None,
        positions: jax.Array | None = None,
        mask: Any = None,
        decode: bool = False,
    ) -> jax.Array:
        """Target logits ``[B, T, tgt_vocab]`` from ``tgt`` int ``[B, T]`` and ``memory``.

        ``tgt`` is the decoder input (the target shifted right, starting with a BOS token).
        With ``decode=True`` (after :meth:`init_cache`) ``tgt`` holds the next token(s), which
        are appended to the caches; ``memory`` may then be None and ``positions`` default to
        the cache index.
        """
        _check_tokens("tgt", tgt)
        if positions is None:
            start = _cache_start(self.decoder_layers[0]) if decode else 0
            positions = _default_positions(tgt, start)
        x = self.tgt_embedder(tgt, positions)
        for layer in self.decoder_layers:
            x = layer(
                x,
                memory,
                lengths=tgt_lengths,
                memory_lengths=src_lengths,
                mask=mask,
                positions=positions,
                decode=decode,
            )
        if self.decoder_norm is not None:
            x = self.decoder_norm(x)
        if self.output is None:
            return tied_logits(self.tgt_embedder.embed, x)
        return self.output(x)

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        src_lengths: jax.Array | None = None,
        tgt_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced logits ``[B, T, tgt_vocab]`` for ``src [B, S]`` and ``tgt [B, T]``."""
        memory = self.encode(src, src_lengths=src_lengths)
        return self.decode(tgt, memory, tgt_lengths=tgt_lengths, src_lengths=src_lengths)

    def init_cache(self, memory: jax.Array, max_length: int, *, dtype: Dtype | None = None) -> None:
        """Prepares step-by-step decoding against ``memory [B, S, d]`` (the encoder output).

        Allocates every decoder layer's self-attention cache for ``max_length`` target tokens
        and projects the cross-attention keys/values of ``memory`` once.
        """
        for layer in self.decoder_layers:
            layer.init_cache(memory.shape[:-2], max_length, memory=memory, dtype=dtype)


class DecoderLM(nnx.Module):
    """Decoder-only language model: token embedding, causal decoder layers, output projection.

    Args:
      vocab_size: vocabulary size.
      d_model, num_layers, num_heads, d_ff: sizes (the paper's base sizes by default).
      dropout_rate, attention_dropout_rate, num_kv_heads, activation: as for
        :class:`Transformer`.
      norm_first: pre-norm by default here (as GPT-2 and later); False for post-norm.
      position_encoding: "rope" by default; "sinusoidal", "learned" (needs ``max_length``) or
        "none".
      scale_embeddings: multiply token embeddings by sqrt(d_model).
      tie_output: the output projection is the transposed token embedding.
      implementation: passed to :func:`jattn.attention`.
      sinks: learned attention-sink logits (one per head) in every layer (gpt-oss).
      attention: "mha" (multi-head, GQA with ``num_kv_heads``) or "mla" (multi-head latent
        attention, DeepSeek-V2/V3, with the sizes of ``mla``; it brings its own rotary keys).
      mla: the :class:`~jattn.nn.MLAConfig` of ``attention="mla"`` (default: DeepSeek-V3's).

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import DecoderLM, generate
      >>> model = DecoderLM(100, d_model=32, num_layers=1, num_heads=2, d_ff=64, rngs=nnx.Rngs(0))
      >>> model(jnp.ones((2, 10), jnp.int32)).shape
      (2, 10, 100)
      >>> model.eval()
      >>> generate(model, jnp.ones((2, 3), jnp.int32), max_new_tokens=4).shape  # new tokens
      (2, 4)
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 512,
        num_layers: int = 6,
        num_heads: int = 8,
        d_ff: int = 2048,
        dropout_rate: float = 0.1,
        attention_dropout_rate: float = 0.0,
        num_kv_heads: int | None = None,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        norm_first: bool = True,
        position_encoding: PositionEncoding = "rope",
        max_length: int | None = None,
        scale_embeddings: bool = True,
        tie_output: bool = False,
        implementation: ImplementationChoice = None,
        sinks: bool = False,
        attention: str = "mha",
        mla: MLAConfig | None = None,
        layer_norm_epsilon: float = 1e-6,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_kind(position_encoding)
        if d_model % num_heads:
            raise ValueError(
                f"d_model must be divisible by num_heads, got {d_model=}, {num_heads=}"
            )
        self.d_model = d_model
        self.vocab_size = vocab_size
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        embed = nnx.Embed(
            vocab_size,
            d_model,
            embedding_init=nnx.initializers.normal(stddev=d_model**-0.5),
            **common,
        )
        self.embedder = _Embedder(
            embed,
            d_model,
            position_encoding=position_encoding,
            max_length=max_length,
            scale=scale_embeddings,
            dropout_rate=dropout_rate,
            **common,
        )
        self.layers = nnx.List(
            [
                DecoderLayer(
                    d_model,
                    num_heads,
                    d_ff,
                    cross_attention=False,
                    num_kv_heads=num_kv_heads,
                    dropout_rate=dropout_rate,
                    attention_dropout_rate=attention_dropout_rate,
                    activation=activation,
                    norm_first=norm_first,
                    rotary=RotaryEmbedding() if position_encoding == "rope" else None,
                    implementation=implementation,
                    sinks=sinks,
                    attention=attention,
                    mla=mla,
                    layer_norm_epsilon=layer_norm_epsilon,
                    **common,
                )
                for _ in range(num_layers)
            ]
        )
        if norm_first:
            self.final_norm = nnx.LayerNorm(d_model, epsilon=layer_norm_epsilon, **common)
        else:
            self.final_norm = nnx.data(None)
        self.output = nnx.data(None) if tie_output else Linear(d_model, vocab_size, **common)

    def init_cache(
        self, batch_shape: int | Sequence[int], max_length: int, *, dtype: Dtype | None = None
    ) -> None:
        """Allocates every layer's KV cache for ``max_length`` tokens."""
        for layer in self.layers:
            layer.init_cache(batch_shape, max_length, dtype=dtype)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        lengths: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
        mask: Any = None,
        decode: bool = False,
    ) -> jax.Array:
        """Next-token logits ``[B, T, vocab]`` for ``tokens`` int ``[B, T]``.

        Args:
          tokens: input ids, right-padded.
          lengths: int ``[B]`` true lengths (not with ``decode=True``).
          segment_ids: ``[B, T]`` ids of packed sequences (attention stays within a segment;
            pass matching ``positions`` that restart per segment).
          positions: int ``[B, T]``; ``arange(T)``, or the cache index onwards when decoding.
          mask: extra mask (array or ``jattn.masks`` object) for the self-attentions.
          decode: append ``tokens`` to the KV caches (after :meth:`init_cache`) and attend to
            everything cached so far.
        """
        _check_tokens("tokens", tokens)
        if positions is None:
            start = _cache_start(self.layers[0]) if decode else 0
            positions = _default_positions(tokens, start)
        x = self.embedder(tokens, positions)
        for layer in self.layers:
            x = layer(
                x,
                lengths=lengths,
                mask=mask,
                segment_ids=segment_ids,
                positions=positions,
                decode=decode,
            )
        if self.final_norm is not None:
            x = self.final_norm(x)
        if self.output is None:
            return tied_logits(self.embedder.embed, x)
        return self.output(x)
