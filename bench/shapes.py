"""Named shape sets: the sizes a sweep measures, kept as data.

Every shape follows the layout of `jax.nn.dot_product_attention`: query [B, T, N, H],
key [B, S, K, H] (K < N is grouped-query attention), value [B, S, K, Hv] (Hv = H unless given:
multi-head latent attention has value heads smaller than its query/key heads).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Shape:
    """One attention problem size.

    B: batch, T: query length, S: key/value length, N: query heads, K: key/value heads,
    H: head dimension of queries and keys. `allows_causal` is False for decode-style shapes: a
    single new query attends to the whole cache, so there is nothing for a causal mask to remove.
    Hv: head dimension of values (and of the output); None means H, and is stored as H, so a
    shape given with Hv=H equals the one given without. sinks: the call passes one sink logit
    per query head (`jattn.attention(..., sinks=s)`, gpt-oss attention sinks). latent: the
    values are each key's first Hv features, as in multi-head latent attention's decoding on its
    latent cache: jattn is called with the one array, `jattn.attention(q, k, None,
    value_dim=Hv)`, the peers with the slice `k[..., :Hv]` (so Hv <= H).
    """

    B: int
    T: int
    S: int
    N: int
    K: int
    H: int
    allows_causal: bool = True
    Hv: int | None = None
    sinks: bool = False
    latent: bool = False

    def __post_init__(self) -> None:
        if self.Hv is None:
            object.__setattr__(self, "Hv", self.H)
        for name in ("B", "T", "S", "N", "K", "H", "Hv"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Shape.{name} must be a positive int, got {value!r}")
        if self.N % self.K:
            raise ValueError(f"query heads N={self.N} must be a multiple of K={self.K}")
        if not isinstance(self.sinks, bool):
            raise ValueError(f"Shape.sinks must be a bool, got {self.sinks!r}")
        if not isinstance(self.latent, bool):
            raise ValueError(f"Shape.latent must be a bool, got {self.latent!r}")
        if self.latent and self.Hv > self.H:
            raise ValueError(
                f"a latent shape's values are the keys' first Hv features: Hv={self.Hv} must "
                f"not exceed H={self.H}"
            )

    @property
    def hv(self) -> int:
        """The value head size (Hv, which is never None after construction)."""
        return self.H if self.Hv is None else self.Hv

    @property
    def label(self) -> str:
        text = f"B={self.B} T={self.T} S={self.S} N={self.N} K={self.K} H={self.H}"
        if self.hv != self.H:
            text += f" Hv={self.hv}"
        if self.sinks:
            text += " sinks"
        if self.latent:
            text += " latent"
        return text


def _self(
    B: int, T: int, N: int, H: int, K: int | None = None, *, Hv: int | None = None,
    sinks: bool = False, latent: bool = False,
) -> Shape:  # fmt: skip
    """Self-attention shape: T = S, K = N unless given."""
    K = N if K is None else K
    return Shape(B=B, T=T, S=T, N=N, K=K, H=H, Hv=Hv, sinks=sinks, latent=latent)


def _decode(
    B: int, S: int, N: int, K: int, H: int, *, Hv: int | None = None, sinks: bool = False,
    latent: bool = False,
) -> Shape:  # fmt: skip
    """One new query token against a cache of S keys."""
    return Shape(
        B=B, T=1, S=S, N=N, K=K, H=H, allows_causal=False, Hv=Hv, sinks=sinks, latent=latent
    )


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

# Multi-head latent attention (DeepSeek-V2/V3, `jattn.nn.MLAttention`). Prefill attends in the
# expanded form: 16 heads of 192 (128 no-position + 64 rotary) for queries and keys, 128 for
# values. Decode attends in the absorbed form: one latent KV head (K = 1) of 576 (512 latent +
# 64 rotary) for keys and 512 for values, shared by the 16 query heads. Each decode shape
# twice: with a value array of its own (k and v two arrays), and latent (the values are the
# keys' first 512 features, one array: jattn reads it with `value_dim=512`; the peers take the
# slice k[..., :512] inside the timed call, as a model holding only the latent cache would).
MLA_PREFILL = Shape(1, 4096, 4096, 16, 16, 192, Hv=128)
MLA_DECODE: tuple[Shape, ...] = tuple(
    _decode(8, S, 16, 1, 576, Hv=512, latent=latent)
    for S in (4096, 16384)
    for latent in (False, True)
)
MLA: tuple[Shape, ...] = (
    MLA_PREFILL,
    Shape(1, 4096, 4096, 16, 16, 128),  # the same problem at 128/128: what 192/128 costs
    *MLA_DECODE,
    *(_self(1, 2048, 8, H) for H in (80, 96, 112)),  # head sizes that are not powers of two
)

# Attention sinks (gpt-oss): each shape with and without, so one run gives what sinks cost.
SINKS: tuple[Shape, ...] = (
    _self(1, 2048, 8, 64),
    _self(1, 2048, 8, 64, sinks=True),
    _decode(8, 4096, 32, 8, 128),
    _decode(8, 4096, 32, 8, 128, sinks=True),
)

# The shapes the native CPU kernel's speed goals are stated on (issue 11): quick, gqa, cross,
# decode at S = 4k and 16k, MLA prefill (192/128) and decode (576/512 at S = 4k and 16k, with
# values of their own and latent), and the quick T = 2048 shape with sinks:
# `python -m bench --shapes goals`.
GOALS: tuple[Shape, ...] = (
    *QUICK,
    *GQA,
    *CROSS,
    *(s for s in DECODE if s.S in (4096, 16384)),
    MLA_PREFILL,
    *MLA_DECODE,
    _self(1, 2048, 8, 64, sinks=True),
)

# The bfloat16 set (issue 24): the quick shapes, GQA, T != S and decode at S = 4k, run in
# float32 and bfloat16 unless --dtypes says otherwise (SET_DTYPES), so one run gives bfloat16
# against the peers' bfloat16 and against our own float32.
BF16: tuple[Shape, ...] = (
    *QUICK,
    *GQA,
    *CROSS,
    *(s for s in DECODE if s.S == 4096),
)

SHAPE_SETS: dict[str, tuple[Shape, ...]] = {
    "quick": QUICK,
    "gqa": GQA,
    "cross": CROSS,
    "decode": DECODE,
    "goals": GOALS,
    "mla": MLA,
    "sinks": SINKS,
    "bf16": BF16,
    "full": FULL,
    "long": LONG,
}


_FLAGS = ("sinks", "latent")


def parse_shape(text: str) -> Shape:
    """Parse `B,T,S,N,K,H`, `B,T,S,N,K,H,Hv` (value heads of another size) or `B,T,N,H`
    (self-attention with K = N) into a Shape; last items `sinks` (attention sinks) and
    `latent` (the values are the keys' first Hv features), in either order, set those flags."""
    items = [p.strip() for p in text.replace("x", ",").split(",") if p.strip()]
    flags: set[str] = set()
    while items and items[-1].lower() in _FLAGS:
        flag = items.pop().lower()
        if flag in flags:
            raise ValueError(f"shape {text!r}: {flag!r} is given twice")
        flags.add(flag)
    sinks, latent = "sinks" in flags, "latent" in flags
    try:
        parts = [int(p) for p in items]
    except ValueError:
        raise ValueError(
            f"shape {text!r}: expected integers B,T,S,N,K,H[,Hv] or B,T,N,H, then optionally "
            "'sinks' and/or 'latent'"
        ) from None
    if len(parts) == 4:
        B, T, N, H = parts
        return _self(B, T, N, H, sinks=sinks, latent=latent)
    if len(parts) in (6, 7):
        B, T, S, N, K, H, *rest = parts
        Hv = rest[0] if rest else None
        return Shape(
            B=B, T=T, S=S, N=N, K=K, H=H, allows_causal=T > 1, Hv=Hv, sinks=sinks, latent=latent
        )
    raise ValueError(
        f"shape {text!r}: expected 6 or 7 numbers B,T,S,N,K,H[,Hv] or 4 numbers B,T,N,H"
    )


# The dtypes a set runs in when --dtypes is not given (float32 for the others).
SET_DTYPES: dict[str, tuple[str, ...]] = {"bf16": ("float32", "bfloat16")}
