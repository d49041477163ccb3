"""PyTorch twins of `jattn.nn.DecoderLM` and `jattn.nn.Transformer` for the training benchmark.

Same sizes and structure as the jattn models built by `bench.train` (so the same parameter
count, which a test checks): token embedding scaled by sqrt(d_model), pre-norm blocks
`x + f(LN(x))` with LayerNorm(eps=1e-6), attention projections with biases, a ReLU
feed-forward, a final LayerNorm and an output projection with bias. Attention is
`torch.nn.functional.scaled_dot_product_attention` (`is_causal=True` in the decoders'
self-attention). The DecoderLM rotates queries and keys with RoPE in the GPT-NeoX layout (pairs
`(i, i + H/2)`, as `jattn.nn.apply_rotary`); the Transformer adds the paper's interleaved
sinusoidal encoding to its embeddings. No dropout: the benchmark measures a step's arithmetic.

Query, key and value are one `Linear(d, 3d)` here, as PyTorch models are usually written
(nanoGPT, torchtune's fused projections); the parameter count is that of three `Linear(d, d)`.

Imported only when torch is installed (it imports torch at the top).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def rope_tables(T: int, head_dim: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[T, 1, H/2]`, computed once per forward and shared by every layer."""
    half = head_dim // 2
    inv_freq = 1.0 / (10000.0 ** (torch.arange(half, device=device, dtype=torch.float32) / half))
    angle = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv_freq
    return angle.cos()[:, None, :], angle.sin()[:, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`x [B, T, N, H]` rotated in pairs `(i, i + H/2)`."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def sinusoidal(T: int, d: int, device: torch.device) -> torch.Tensor:
    """The paper's encoding `[T, d]`, sines and cosines interleaved (as jattn's)."""
    pos = torch.arange(T, device=device, dtype=torch.float32)[:, None]
    dim = torch.arange(d, device=device)
    angle = pos / torch.pow(10000.0, (2 * (dim // 2)).float() / d)
    return torch.where(dim % 2 == 0, angle.sin(), angle.cos())


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, *, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        B, T, d = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, d // self.heads).unbind(2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, N, T, H]: SDPA's layout
        o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out(o.transpose(1, 2).reshape(B, T, d))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        S = memory.shape[1]
        q = self.q(x).view(B, T, self.heads, -1).transpose(1, 2)
        k, v = self.kv(memory).view(B, S, 2, self.heads, -1).unbind(2)
        o = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))
        return self.out(o.transpose(1, 2).reshape(B, T, d))


class FeedForward(nn.Module):
    def __init__(self, d: int, d_ff: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, d_ff)
        self.down = nn.Linear(d_ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.relu(self.up(x)))


class Block(nn.Module):
    """Pre-norm block: self-attention, optional cross-attention, feed-forward."""

    def __init__(self, d: int, heads: int, d_ff: int, *, causal: bool, cross: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, eps=EPS)
        self.attn = SelfAttention(d, heads, causal=causal)
        self.norm_x = nn.LayerNorm(d, eps=EPS) if cross else None
        self.cross = CrossAttention(d, heads) if cross else None
        self.norm2 = nn.LayerNorm(d, eps=EPS)
        self.ffn = FeedForward(d, d_ff)

    def forward(self, x, rope=None, memory=None):
        x = x + self.attn(self.norm1(x), rope)
        if self.cross is not None:
            x = x + self.cross(self.norm_x(x), memory)
        return x + self.ffn(self.norm2(x))


class DecoderLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.d, self.heads = d, heads
        self.embed = nn.Embedding(vocab, d)
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.layers = nn.ModuleList(
            Block(d, heads, d_ff, causal=True, cross=False) for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d, eps=EPS)
        self.output = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) * math.sqrt(self.d)
        rope = rope_tables(tokens.shape[1], self.d // self.heads, tokens.device)
        for layer in self.layers:
            x = layer(x, rope)
        return self.output(self.norm(x))


class Transformer(nn.Module):
    """Pre-norm encoder-decoder, sinusoidal positions: jattn's `Transformer(norm_first=True)`."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, d_ff: int) -> None:
        super().__init__()
        self.d = d
        self.src_embed = nn.Embedding(vocab, d)
        self.tgt_embed = nn.Embedding(vocab, d)
        for emb in (self.src_embed, self.tgt_embed):
            nn.init.normal_(emb.weight, std=d**-0.5)
        self.encoder = nn.ModuleList(
            Block(d, heads, d_ff, causal=False, cross=False) for _ in range(layers)
        )
        self.decoder = nn.ModuleList(
            Block(d, heads, d_ff, causal=True, cross=True) for _ in range(layers)
        )
        self.encoder_norm = nn.LayerNorm(d, eps=EPS)
        self.decoder_norm = nn.LayerNorm(d, eps=EPS)
        self.output = nn.Linear(d, vocab)

    def _embed(self, emb: nn.Embedding, tokens: torch.Tensor) -> torch.Tensor:
        pe = sinusoidal(tokens.shape[1], self.d, tokens.device)
        return emb(tokens) * math.sqrt(self.d) + pe

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x)
        memory = self.encoder_norm(x)
        y = self._embed(self.tgt_embed, tgt)
        for layer in self.decoder:
            y = layer(y, memory=memory)
        return self.output(self.decoder_norm(y))
