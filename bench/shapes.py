"""Named shape sets: the sizes a sweep measures, kept as data.

Every shape follows the layout of `jax.nn.dot_product_attention`: query [B, T, N, H],
key/value [B, S, K, H] (K < N is grouped-query attention).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem size.

    B: batch, T: query length, S: key/value length, N: query heads, K: key/value heads,
    H: head dimension. `allows_causal` is False for decode-style shapes: a single new query
    attends to the whole cache, so there is nothing for a causal mask to remove.
    """

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    allows_causal: bool = True

    def __post_init__(self) -> None:
        for name in ("B", "T", "S", "N", "K", "H"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Shape.{name} must be a positive int, got {value!r}")
        if self.N % self.K:
            raise ValueError(f"query heads N={self.N} must be a multiple of K={self.K}")

    @property
    def label(self) -> str:
        return f"B={self.B} T={self.T} S={self.S} N={self.N} K={self.K} H={self.H}"


def _self(B: int, T: int, N: int, H: int, K: int | None = None) -> Shape:
    """Self-attention shape: T = S, K = N unless given."""
    return Shape(B=B, T=T, S=T, N=N, K=N if K is None else K, H=H)


def _decode(B: int, S: int, N: int, K: int, H: int) -> Shape:
    """One new query token against a cache of S keys."""
    return Shape(B=B, T=1, S=S, N=N, K=K, H=H, allows_causal=False)


QUICK: tuple[Shape, ...] = (
    _self(1, 1024, 8, 64),
    _self(1, 2048, 8, 64),
    _self(4, 512, 8, 64),
)

# FlashAttention-paper style sweeps: the number of tokens B*T stays fixed while T grows, so
# every point does the same work per token and the curve shows the effect of length alone.
_TOKENS = 16384
FULL: tuple[Shape, ...] = (
    *QUICK,
    _self(1, 4096, 8, 128),
    *(_self(_TOKENS // T, T, 16, 64) for T in (512, 1024, 2048, 4096, 8192, 16384)),
    *(_self(_TOKENS // T, T, 8, 128) for T in (512, 1024, 2048, 4096, 8192, 16384)),
    _self(2, 4096, 32, 128, K=8),  # grouped-query attention, 4 query heads per KV head
)

LONG: tuple[Shape, ...] = tuple(_self(1, T, 8, 128) for T in (8192, 16384, 32768))

DECODE: tuple[Shape, ...] = tuple(
    _decode(8, S, 32, 8, 128) for S in (1024, 2048, 4096, 8192, 16384)
)

# Grouped-query attention: 4 query heads per KV head.
GQA: tuple[Shape, ...] = (Shape(2, 1024, 1024, 16, 4, 64),)

# Queries and keys of different lengths (T != S) with GQA and a head size that is not a power of
# two: the shape a kernel tuned on square powers of two gets wrong first.
CROSS: tuple[Shape, ...] = (Shape(2, 640, 1536, 6, 2, 96),)

# The shapes the native CPU kernel's speed goals are stated on (issue 11): quick, gqa, cross,
# and decode at S = 4k and 16k: `python -m bench --shapes goals`.
GOALS: tuple[Shape, ...] = (*QUICK, *GQA, *CROSS, *(s for s in DECODE if s.S in (4096, 16384)))

SHAPE_SETS: dict[str, tuple[Shape, ...]] = {
    "quick": QUICK,
    "gqa": GQA,
    "cross": CROSS,
    "decode": DECODE,
    "goals": GOALS,
    "full": FULL,
    "long": LONG,
}


def parse_shape(text: str) -> Shape:
    """Parse `B,T,S,N,K,H` (or `B,T,N,H` for self-attention with K = N) into a Shape."""
    try:
        parts = [int(p) for p in text.replace("x", ",").split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"shape {text!r}: expected integers B,T,S,N,K,H or B,T,N,H") from None
    if len(parts) == 4:
        B, T, N, H = parts
        return _self(B, T, N, H)
    if len(parts) == 6:
        B, T, S, N, K, H = parts
        return Shape(B=B, T=T, S=S, N=N, K=K, H=H, allows_causal=T > 1)
    raise ValueError(f"shape {text!r}: expected 6 numbers B,T,S,N,K,H or 4 numbers B,T,N,H")
