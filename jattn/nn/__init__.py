"""Flax NNX modules built on :func:`jattn.attention`: attention layers, positions, blocks,
the Transformer and a decoder-only LM, KV-cache decoding, a loss, and Flax adapters."""

from jattn.nn.adapters import attention_fn, make_attention_fn
from jattn.nn.attention import AdditiveAttention, DotProductAttention, MultiHeadAttention
from jattn.nn.blocks import DecoderLayer, EncoderLayer, FeedForward
from jattn.nn.decoding import generate, generate_seq2seq, sample_logits
from jattn.nn.losses import cross_entropy
from jattn.nn.mla import MLAConfig, MLAttention
from jattn.nn.models import DecoderLM, Transformer
from jattn.nn.positions import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    apply_rotary,
    sinusoidal_encoding,
)

__all__ = [
    "AdditiveAttention",
    "DecoderLM",
    "DecoderLayer",
    "DotProductAttention",
    "EncoderLayer",
    "FeedForward",
    "LearnedPositionalEmbedding",
    "MLAConfig",
    "MLAttention",
    "MultiHeadAttention",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "Transformer",
    "apply_rotary",
    "attention_fn",
    "cross_entropy",
    "generate",
    "generate_seq2seq",
    "make_attention_fn",
    "sample_logits",
    "sinusoidal_encoding",
]
