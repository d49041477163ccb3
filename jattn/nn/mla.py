"""Multi-head latent attention (DeepSeek-V2/V3): keys and values from one low-rank latent.

Each token is compressed to a latent ``c [r]`` (normalised) and one rotary key ``k_rope
[d_rope]`` that every head shares; per head, the keys are ``[W_uk c, k_rope]`` and the values
``W_uv c``. Queries are ``[q_nope, rotated q_rope]`` per head. So a head's query/key size is
``d_nope + d_rope`` (192 in DeepSeek-V3) and its value size ``d_v`` (128): attention with
``H != Hv``, which every jattn kernel serves.

Decoding caches only ``[c, k_rope]`` per token (``r + d_rope`` = 576 numbers, against
``2 · N · 128`` for plain attention) and attends in the *absorbed* form: ``W_uk`` moves into the
query (``q_nope · W_uk c = (W_ukᵀ q_nope) · c``) and ``W_uv`` after the attention, so all heads
attend to the one latent "head" (``K = 1``) with query/key size ``r + d_rope`` and value size
``r``; the same numbers as the expanded form, up to rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import masks as jmasks
from jattn.api import attention as _attention
from jattn.kernels import ImplementationChoice
from jattn.nn.attention import _and, _dropout_key, _write_cache
from jattn.nn.linear import Linear
from jattn.nn.positions import apply_rotary

__all__ = ["MLAConfig", "MLAttention"]

Dtype = Any
RngsLike = Any


@dataclasses.dataclass(frozen=True)
class MLAConfig:
    """The sizes of multi-head latent attention (DeepSeek-V3's by default).

    Attributes:
      kv_lora_rank: ``r``, the size of the shared key/value latent.
      q_lora_rank: the rank of the query's own low-rank projection, or None for a full one.
      qk_nope_head_dim: ``d_nope``, the part of each head's query/key without position.
      qk_rope_head_dim: ``d_rope``, the rotary part (one key part shared by all heads).
      v_head_dim: ``d_v``, each head's value size.
    """

    kv_lora_rank: int = 512
    q_lora_rank: int | None = None
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name == "q_lora_rank":
                continue
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"MLAConfig.{f.name} must be a positive int, got {v!r}")
        if self.qk_rope_head_dim % 2:
            raise ValueError(
                f"MLAConfig.qk_rope_head_dim must be even, got {self.qk_rope_head_dim}"
            )

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class MLAttention(nnx.Module):
    """Multi-head latent attention with decoupled rotary keys, and a latent KV cache.

    The call takes the keywords of :class:`~jattn.nn.MultiHeadAttention` (self-attention:
    ``inputs_kv`` must be None), so :class:`~jattn.nn.DecoderLayer` and
    :class:`~jattn.nn.DecoderLM` can use it (``attention="mla"``).

    Args:
      num_heads: query heads ``N``.
      in_features: model width.
      out_features: output width; defaults to ``in_features``.
      config: the :class:`MLAConfig` sizes.
      rope_base: the rotary frequency base.
      scale: logit scale; default ``(d_nope + d_rope) ** -0.5`` (in both forms).
      softcap, sinks, implementation, dropout_rate, deterministic: as for
        :class:`~jattn.nn.MultiHeadAttention`.
      absorb: attend in the absorbed (latent) form without a cache too; decoding always
        does.
      dtype, param_dtype, rngs: as for the other modules.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import MLAConfig, MLAttention
      >>> cfg = MLAConfig(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
      >>> layer = MLAttention(4, 32, config=cfg, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 6, 32))
      >>> layer(x, is_causal=True).shape
      (2, 6, 32)
      >>> layer.init_cache(2, 8); layer(x[:, :1], decode=True).shape  # caches [c, k_rope]
      (2, 1, 32)
      >>> layer.cached_latent.shape  # [batch, max_length, 1 latent head, r + d_rope]
      (2, 8, 1, 20)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        out_features: int | None = None,
        *,
        config: MLAConfig = MLAConfig(),  # noqa: B008 - frozen
        rope_base: float = 10000.0,
        scale: float | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        implementation: ImplementationChoice = None,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        absorb: bool = False,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if num_heads < 1:
            raise ValueError(f"num_heads must be positive, got {num_heads=}")
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")
        c = config
        out_features = in_features if out_features is None else out_features
        self.config = c
        self.num_heads = num_heads
        self.in_features = in_features
        self.rope_base = rope_base
        self.scale = c.qk_head_dim**-0.5 if scale is None else scale
        self.softcap = softcap
        self.implementation = implementation
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.absorb = absorb
        self.dtype = dtype
        self.param_dtype = param_dtype
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dense = dict(use_bias=False, **common)
        q_out = num_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_down = nnx.data(None)
            self.q_norm = nnx.data(None)
            self.q_proj = Linear(in_features, q_out, **dense)
        else:
            self.q_down = Linear(in_features, c.q_lora_rank, **dense)
            self.q_norm = nnx.RMSNorm(c.q_lora_rank, **common)
            self.q_proj = Linear(c.q_lora_rank, q_out, **dense)
        self.kv_down = Linear(in_features, c.kv_lora_rank + c.qk_rope_head_dim, **dense)
        self.kv_norm = nnx.RMSNorm(c.kv_lora_rank, **common)
        init = nnx.initializers.normal(stddev=c.kv_lora_rank**-0.5)
        key = rngs.params()
        k1, k2 = jax.random.split(key)
        # Per-head up-projections of the latent, [r, N, d]: einsum weights, so that the
        # absorbed form can contract them with the query instead of with the latent.
        self.k_up = nnx.Param(
            init(k1, (c.kv_lora_rank, num_heads, c.qk_nope_head_dim), param_dtype)
        )
        self.v_up = nnx.Param(init(k2, (c.kv_lora_rank, num_heads, c.v_head_dim), param_dtype))
        self.out = Linear(num_heads * c.v_head_dim, out_features, **dense)
        self.sink_logits = (
            nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks else nnx.data(None)
        )
        self.rngs = rngs["dropout"].fork() if dropout_rate > 0 else nnx.data(None)
        self.cached_latent = nnx.data(None)
        self.cache_index = nnx.data(None)

    def set_view(self, deterministic: bool | None = None) -> None:
        if deterministic is not None:
            self.deterministic = deterministic

    # -- projections -----------------------------------------------------------------------

    def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(q_nope [*B, T, N, d_nope], q_rope [*B, T, N, d_rope])``, the latter rotated."""
        c = self.config
        h = x if self.q_down is None else self.q_norm(self.q_down(x))
        q = self.q_proj(h).reshape(*x.shape[:-1], self.num_heads, c.qk_head_dim)
        q_nope, q_rope = q[..., : c.qk_nope_head_dim], q[..., c.qk_nope_head_dim :]
        return q_nope, apply_rotary(q_rope, positions, base=self.rope_base)

    def _latent(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """``[c, rotated k_rope]`` per token: ``[*B, S, 1, r + d_rope]``."""
        r = self.config.kv_lora_rank
        ckr = self.kv_down(x)
        latent = self.kv_norm(ckr[..., :r])
        k_rope = apply_rotary(ckr[..., None, r:], positions, base=self.rope_base)
        return jnp.concatenate([latent[..., None, :], k_rope.astype(latent.dtype)], axis=-1)

    # -- cache -----------------------------------------------------------------------------

    def init_cache(
        self, batch_shape: int | Sequence[int], max_length: int, *, dtype: Dtype | None = None
    ) -> None:
        """An empty latent cache of ``max_length`` tokens: ``[*batch_shape, max_length, 1,
        r + d_rope]`` and a write index at 0 (as :meth:`MultiHeadAttention.init_cache`)."""
        if isinstance(batch_shape, int):
            batch_shape = (batch_shape,)
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length=}")
        width = self.config.kv_lora_rank + self.config.qk_rope_head_dim
        dtype = dtype or self.dtype or self.param_dtype
        self.cached_latent = nnx.Cache(jnp.zeros((*batch_shape, max_length, 1, width), dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def clear_cache(self) -> None:
        self.cached_latent = None
        self.cache_index = None

    # -- call ------------------------------------------------------------------------------

    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: Any = None,
        is_causal: bool = False,
        query_seq_lengths: jax.Array | None = None,
        key_value_seq_lengths: jax.Array | None = None,
        segment_ids: Any = None,
        positions: jax.Array | None = None,
        kv_positions: jax.Array | None = None,
        decode: bool = False,
        deterministic: bool | None = None,
        rngs: RngsLike = None,
        return_weights: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Self-attention over ``inputs_q [*B, T, in_features]``; the keywords mean what they
        mean for :meth:`MultiHeadAttention.__call__` (``kv_positions`` must be None)."""
        if inputs_kv is not None or kv_positions is not None:
            raise ValueError("MLAttention is self-attention: inputs_kv and kv_positions are None")
        if inputs_q.ndim < 2 or inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q must be [*B, T, {self.in_features}], got shape {inputs_q.shape}"
            )
        t = inputs_q.shape[-2]
        absorb = self.absorb or decode
        if decode:
            if self.cached_latent is None:
                raise ValueError("decode=True but the cache is not initialised: call init_cache")
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported with decode=True")
            index = self.cache_index[...]
            positions = index + jnp.arange(t) if positions is None else positions
            new = self._latent(inputs_q, positions)
            if new.shape[:-3] != self.cached_latent.shape[:-3]:
                raise ValueError(
                    f"batch shape {new.shape[:-3]} of the decoded tokens does not match the "
                    f"cache's {self.cached_latent.shape[:-3]}"
                )
            latent = _write_cache(self.cached_latent[...], new, index)
            self.cached_latent[...] = latent
            self.cache_index[...] = index + t
            mask = _and(jmasks.Causal(offset=index), mask)
            is_causal = False
        else:
            positions = jnp.arange(t) if positions is None else positions
            latent = self._latent(inputs_q, positions)
        q_nope, q_rope = self._queries(inputs_q, positions)

        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout_rate
        dropout_rng = _dropout_key(rngs, self.rngs, type(self).__name__) if rate > 0 else None
        kw = dict(
            mask=mask,
            scale=self.scale,
            is_causal=is_causal,
            query_seq_lengths=query_seq_lengths,
            key_value_seq_lengths=key_value_seq_lengths,
            segment_ids=segment_ids,
            softcap=self.softcap,
            sinks=None if self.sink_logits is None else self.sink_logits[...],
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            implementation=self.implementation,
            return_weights=return_weights,
        )
        dtype = q_nope.dtype
        latent = latent.astype(dtype)
        r = self.config.kv_lora_rank
        k_up, v_up = self.k_up[...].astype(dtype), self.v_up[...].astype(dtype)
        if absorb:
            # All heads against the one latent head: query/key r + d_rope, value r.
            q_latent = jnp.einsum("...tnd,rnd->...tnr", q_nope, k_up)
            q = jnp.concatenate([q_latent, q_rope], axis=-1)
            # The values are the latent itself (the keys' first r features): one array,
            # read once by a kernel that reads them in place.
            result = _attention(q, latent, None, value_dim=r, **kw)
            heads, weights = result if return_weights else (result, None)
            heads = jnp.einsum("...tnr,rnd->...tnd", heads, v_up)
        else:
            c = latent[..., 0, :r]
            k_nope = jnp.einsum("...sr,rnd->...snd", c, k_up)
            k_rope = jnp.broadcast_to(
                latent[..., r:], (*k_nope.shape[:-1], self.config.qk_rope_head_dim)
            )
            k = jnp.concatenate([k_nope, k_rope], axis=-1)
            v = jnp.einsum("...sr,rnd->...snd", c, v_up)
            result = _attention(jnp.concatenate([q_nope, q_rope], axis=-1), k, v, **kw)
            heads, weights = result if return_weights else (result, None)
        out = self.out(heads.reshape(*heads.shape[:-2], -1))
        return (out, weights) if return_weights else out
