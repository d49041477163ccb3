"""Attention layers built on :func:`jattn.attention`.

Layout everywhere: ``[*batch, length, heads, head_dim]`` for per-head arrays and
``[*batch, length, features]`` for module inputs and outputs. Masks reach the kernels as lengths,
``jattn.masks`` objects or the keyword arguments of :func:`jattn.attention`, never as a dense
``[T, S]`` array built here, so blockwise kernels can skip the blocks that are fully masked.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.typing import Dtype

from jattn import masks as jmasks
from jattn.api import attention as _attention
from jattn.kernels import ImplementationChoice
from jattn.nn.linear import Linear

__all__ = ["AdditiveAttention", "DotProductAttention", "MultiHeadAttention"]

RngsLike = nnx.Rngs | nnx.RngStream | jax.Array | None

_default_kernel_init = nnx.initializers.lecun_normal()
_zeros = nnx.initializers.zeros_init()


def _dropout_key(rngs: RngsLike, own: nnx.RngStream | None, who: str) -> jax.Array:
    if rngs is None:
        rngs = own
    if rngs is None:
        raise ValueError(
            f"{who}: dropout is active (deterministic=False, dropout_rate > 0) but no rngs were "
            "given: pass rngs=nnx.Rngs(...) to the constructor or to the call, or call "
            "model.eval() / nnx.view(model, deterministic=True)."
        )
    if isinstance(rngs, nnx.Rngs):
        return rngs["dropout"]()
    if isinstance(rngs, nnx.RngStream):
        return rngs()
    return rngs


def _and(a: Any, b: Any) -> Any:
    """Combines two masks (arrays, mask objects or None) into one ``jattn.masks`` object."""
    if a is None:
        return b
    if b is None:
        return a
    return _as_mask_object(a) & _as_mask_object(b)


def _as_mask_object(m: Any) -> Any:
    # Arrays (jax or numpy) become Dense masks; anything else is taken to be a jattn.masks object.
    if isinstance(m, (jax.Array, np.ndarray)):
        return jmasks.Dense(_bool_mask(m))
    return m


def _bool_mask(mask: Any) -> jax.Array:
    """``mask`` as a boolean array; refused, as :func:`jattn.attention` refuses it, otherwise."""
    m = jnp.asarray(mask)
    if m.dtype != jnp.bool_:
        raise TypeError(
            f"mask must be boolean (True = attend), got dtype {m.dtype}; pass an additive "
            "mask as `bias`, or compare (e.g. `mask != 0`) to say which entries attend"
        )
    return m


class MultiHeadAttention(nnx.Module):
    """Multi-head attention (Vaswani et al., 2017) with GQA/MQA and a KV cache.

    Self-attention when ``inputs_kv`` is None, cross-attention otherwise. Queries get
    ``num_heads`` heads; keys and values get ``num_kv_heads`` heads (GQA; 1 is MQA), which the
    kernels share between query-head groups without copying them.

    Args:
      num_heads: number of query heads ``N``.
      in_features: width of ``inputs_q``.
      qkv_features: ``N * head_dim``; defaults to ``in_features``.
      out_features: width of the output; defaults to ``in_features``.
      num_kv_heads: number of key/value heads ``K`` (``N % K == 0``); defaults to ``N``.
      kv_features: width of ``inputs_kv``; defaults to ``in_features``.
      use_bias: whether the four projections have biases.
      dropout_rate: dropout on the attention weights, applied by the kernel.
      deterministic: disables dropout; toggled by ``model.eval()`` / ``model.train()`` and
        ``nnx.view(model, deterministic=...)``, overridden by the call's ``deterministic``.
      rotary: a :class:`~jattn.nn.RotaryEmbedding` to rotate queries and keys by position.
      scale: logit scale; ``None`` is ``head_dim ** -0.5``.
      softcap: ``softcap * tanh(logits / softcap)`` before masking.
      sinks: learn one attention-sink logit per query head (gpt-oss), initialised to 0: it
        joins each row's softmax without a value, so a head may attend to nothing (see
        :func:`jattn.attention`'s ``sinks``). Stored as the parameter ``sink_logits [N]``.
      implementation: passed to :func:`jattn.attention` (a name, a list of names, or None).
      sow_weights: also store each call's attention weights ``[*B, N, T, S]`` with
        ``self.sow(nnx.Intermediate, "attention_weights", weights)`` (needs a materialising
        implementation such as "fused"); collect them with ``nnx.capture``. An attribute, so
        it can be switched on in a trained model (``layer.sow_weights = True``).
      kernel_init, bias_init: initialisers of the projections.
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: parameter initialisation and (when ``dropout_rate > 0``) the dropout stream.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import MultiHeadAttention
      >>> layer = MultiHeadAttention(4, 32, num_kv_heads=2, rngs=nnx.Rngs(0))  # 4 heads, GQA
      >>> x = jnp.ones((2, 10, 32))
      >>> layer(x, is_causal=True, key_value_seq_lengths=jnp.array([10, 6])).shape
      (2, 10, 32)
      >>> out, weights = layer(x, is_causal=True, return_weights=True)
      >>> weights.shape  # [batch, heads, T, S]
      (2, 4, 10, 10)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        qkv_features: int | None = None,
        out_features: int | None = None,
        *,
        num_kv_heads: int | None = None,
        kv_features: int | None = None,
        use_bias: bool = True,
        dropout_rate: float = 0.0,
        deterministic: bool = False,
        rotary: nnx.Module | None = None,
        scale: float | None = None,
        softcap: float | None = None,
        sinks: bool = False,
        implementation: ImplementationChoice = None,
        sow_weights: bool = False,
        kernel_init: nnx.Initializer = _default_kernel_init,
        bias_init: nnx.Initializer = _zeros,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        qkv_features = in_features if qkv_features is None else qkv_features
        out_features = in_features if out_features is None else out_features
        kv_features = in_features if kv_features is None else kv_features
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_heads < 1 or num_kv_heads < 1:
            raise ValueError(f"head counts must be positive, got {num_heads=}, {num_kv_heads=}")
        if qkv_features % num_heads:
            raise ValueError(
                f"qkv_features must be divisible by num_heads, got {qkv_features=}, {num_heads=}"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_heads must be a multiple of num_kv_heads, got {num_heads=}, {num_kv_heads=}"
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate=}")

        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = qkv_features // num_heads
        self.in_features = in_features
        self.kv_features = kv_features
        self.out_features = out_features
        self.dropout_rate = dropout_rate
        self.deterministic = deterministic
        self.scale = scale
        self.softcap = softcap
        self.implementation = implementation
        self.sow_weights = sow_weights
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.rotary = rotary

        def linear(din: int, dout: int) -> nnx.Linear:
            return Linear(
                din,
                dout,
                use_bias=use_bias,
                kernel_init=kernel_init,
                bias_init=bias_init,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

        kv_dim = num_kv_heads * self.head_dim
        self.query = linear(in_features, num_heads * self.head_dim)
        self.key = linear(kv_features, kv_dim)
        self.value = linear(kv_features, kv_dim)
        self.out = linear(num_heads * self.head_dim, out_features)
        self.rngs = rngs["dropout"].fork() if dropout_rate > 0 else nnx.data(None)
        self.sink_logits = (
            nnx.Param(jnp.zeros((num_heads,), param_dtype)) if sinks else nnx.data(None)
        )

        # KV cache: absent until init_cache / init_cross_cache. cache_index is None for a
        # cross-attention cache (fixed keys) and a scalar int for a self-attention cache.
        self.cached_key = nnx.data(None)
        self.cached_value = nnx.data(None)
        self.cache_index = nnx.data(None)

    def set_view(self, deterministic: bool | None = None) -> None:
        """Used by ``nnx.view``: sets ``deterministic``."""
        if deterministic is not None:
            self.deterministic = deterministic

    # -- projections -----------------------------------------------------------------------

    def _heads(self, x: jax.Array, heads: int) -> jax.Array:
        return x.reshape(*x.shape[:-1], heads, self.head_dim)

    def _project_qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Self-attention's query, key and value heads of ``x`` from one matmul.

        The three kernels (and biases) are concatenated for the call, so the parameters stay
        ``query``, ``key`` and ``value`` (checkpoints, sharding rules) while the step runs one
        ``[d, (N + 2K) * head_dim]`` product forward and one for each gradient instead of
        three of each; the result is the same as three ``nnx.Linear`` calls.
        """
        layers = (self.query, self.key, self.value)
        kernel = jnp.concatenate([layer.kernel[...] for layer in layers], axis=-1)
        bias = None
        if self.query.bias is not None:
            bias = jnp.concatenate([layer.bias[...] for layer in layers], axis=-1)
        x, kernel, bias = self.query.promote_dtype((x, kernel, bias), dtype=self.query.dtype)
        y = self.query.dot_general(
            x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=self.query.precision
        )
        if bias is not None:
            y = y + bias
        nq = self.num_heads * self.head_dim
        nk = self.num_kv_heads * self.head_dim
        q, k, v = jnp.split(y, [nq, nq + nk], axis=-1)
        return (
            self._heads(q, self.num_heads),
            self._heads(k, self.num_kv_heads),
            self._heads(v, self.num_kv_heads),
        )

    def _fuses_qkv(self) -> bool:
        """Whether the three projections can be one matmul (same input width, one dtype
        policy, no custom dot_general on one of them)."""
        q, k, v = self.query, self.key, self.value
        return (
            self.kv_features == self.in_features
            and q.dtype == k.dtype == v.dtype
            and q.precision == k.precision == v.precision
            and q.dot_general is k.dot_general is v.dot_general
            and q.preferred_element_type is None
            and k.preferred_element_type is None
            and v.preferred_element_type is None
        )

    def _project_kv(
        self,
        inputs_kv: jax.Array,
        positions: jax.Array | None,
        projected: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Key and value heads of ``inputs_kv`` (or the ``projected`` ones), keys rotated."""
        if projected is not None:
            k, v = projected
        else:
            if inputs_kv.shape[-1] != self.kv_features:
                raise ValueError(
                    f"inputs_kv has {inputs_kv.shape[-1]} features but the module expects "
                    f"kv_features={self.kv_features} (inputs_kv.shape={inputs_kv.shape})"
                )
            k = self._heads(self.key(inputs_kv), self.num_kv_heads)
            v = self._heads(self.value(inputs_kv), self.num_kv_heads)
        if self.rotary is not None:
            if positions is None:
                positions = jnp.arange(inputs_kv.shape[-2])
            k = self.rotary(k, positions)
        return k, v

    # -- cache -----------------------------------------------------------------------------

    def init_cache(
        self, batch_shape: int | Sequence[int], max_length: int, *, dtype: Dtype | None = None
    ) -> None:
        """Allocates an empty self-attention KV cache of ``max_length`` positions.

        The cache holds ``[*batch_shape, max_length, num_kv_heads, head_dim]`` keys and values and
        a write index starting at 0. Each ``__call__(x, decode=True)`` appends ``x``'s ``t``
        tokens at the index and advances it by ``t``; the caller keeps the total within
        ``max_length`` (an overflowing write is clamped by ``dynamic_update_slice``).
        """
        if isinstance(batch_shape, int):
            batch_shape = (batch_shape,)
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length=}")
        dtype = dtype or self.dtype or self.param_dtype
        shape = (*batch_shape, max_length, self.num_kv_heads, self.head_dim)
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
        self.cache_index = nnx.Cache(jnp.array(0, jnp.int32))

    def init_cross_cache(
        self, inputs_kv: jax.Array, *, kv_positions: jax.Array | None = None
    ) -> None:
        """Projects fixed keys/values (e.g. encoder outputs ``[*B, S, kv_features]``) once.

        Later ``__call__(x, decode=True)`` calls attend to them without projecting again, which
        is what step-by-step decoding of an encoder-decoder model wants.
        """
        k, v = self._project_kv(inputs_kv, kv_positions)
        self.cached_key = nnx.Cache(k)
        self.cached_value = nnx.Cache(v)
        self.cache_index = None

    def clear_cache(self) -> None:
        """Drops the cache (back to plain, uncached calls)."""
        self.cached_key = None
        self.cached_value = None
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
        """Attends from ``inputs_q`` to ``inputs_kv`` (or to itself).

        Args:
          inputs_q: ``[*B, T, in_features]``.
          inputs_kv: ``[*B, S, kv_features]``; None for self-attention. With a cross cache
            (``init_cross_cache``) and ``decode=True`` it is ignored and may be None.
          mask: a boolean array broadcastable to ``[*B, N, T, S]`` (True = attend) or a
            ``jattn.masks`` object, combined with everything below.
          is_causal: causal self-attention (query i sees keys j <= i).
          query_seq_lengths: int ``[*B]``; queries at or beyond it are padding (their rows are 0).
          key_value_seq_lengths: int ``[*B]``; keys at or beyond it are padding.
          segment_ids: ``[*B, T]`` (self) or a pair ``(q_ids [*B, T], kv_ids [*B, S])``:
            attend only within equal ids (packed sequences).
          positions: int ``[*B, T]`` or ``[T]`` query positions for the rotary embedding;
            default ``arange(T)``, or ``cache_index + arange(T)`` when decoding.
          kv_positions: key positions for the rotary embedding; defaults to ``positions`` in
            self-attention and ``arange(S)`` in cross-attention.
          decode: use the KV cache. With a self-attention cache, the ``t`` new tokens' keys and
            values are written at ``cache_index`` and the queries, at positions
            ``cache_index..cache_index+t-1``, attend causally to the whole cache. With a cross
            cache, queries attend to the cached keys.
          deterministic: overrides the module's ``deterministic``.
          rngs: dropout key source for this call (Rngs, RngStream or a key).
          return_weights: also return the attention weights ``[*B, N, T, S]`` (needs a
            materialising implementation such as "fused" or "reference"). See also
            ``sow_weights``.

        Returns:
          ``[*B, T, out_features]``, or ``(output, weights)``.
        """
        if inputs_q.ndim < 2:
            raise ValueError(f"inputs_q must be [*B, T, features], got shape {inputs_q.shape}")
        if inputs_q.shape[-1] != self.in_features:
            raise ValueError(
                f"inputs_q has {inputs_q.shape[-1]} features but the module expects "
                f"in_features={self.in_features} (inputs_q.shape={inputs_q.shape})"
            )
        t = inputs_q.shape[-2]
        # Self-attention that projects its own keys (not decoding against a cross cache):
        # query, key and value in one matmul.
        own_kv = inputs_kv is None and not (decode and self.cache_index is None)
        kv_new = None
        if own_kv and self._fuses_qkv():
            q, *kv_new = self._project_qkv(inputs_q)
        else:
            q = self._heads(self.query(inputs_q), self.num_heads)

        if decode:
            if self.cached_key is None:
                raise ValueError(
                    "decode=True but the KV cache is not initialised: call init_cache(batch_shape, "
                    "max_length) (self-attention) or init_cross_cache(inputs_kv) first"
                )
            if self.cache_index is None:  # fixed (cross-attention) keys
                if is_causal:
                    raise ValueError("is_causal=True makes no sense against a cross cache")
                k, v = self.cached_key[...], self.cached_value[...]
                if self.rotary is not None:
                    q = self.rotary(q, jnp.arange(t) if positions is None else positions)
            else:
                if inputs_kv is not None:
                    raise ValueError(
                        "a self-attention cache takes inputs_kv=None; for cross-attention "
                        "decoding use init_cross_cache(inputs_kv)"
                    )
                if segment_ids is not None:
                    raise ValueError("segment_ids are not supported with decode=True")
                index = self.cache_index[...]
                if positions is None:
                    positions = index + jnp.arange(t)
                if self.rotary is not None:
                    q = self.rotary(q, positions)
                k_new, v_new = self._project_kv(inputs_q, positions, kv_new)
                cache_shape = self.cached_key.shape
                if k_new.shape[:-3] != cache_shape[:-3]:
                    raise ValueError(
                        f"batch shape {k_new.shape[:-3]} of the decoded tokens does not match "
                        f"the cache's {cache_shape[:-3]}"
                    )
                k = _write_cache(self.cached_key[...], k_new, index)
                v = _write_cache(self.cached_value[...], v_new, index)
                self.cached_key[...] = k
                self.cached_value[...] = v
                self.cache_index[...] = index + t
                # Query i sits at cache slot index + i: it sees slots up to there, which also
                # hides the slots not written yet.
                mask = _and(jmasks.Causal(offset=index), mask)
                is_causal = False
        else:
            if inputs_kv is None:
                k, v = self._project_kv(
                    inputs_q, positions if kv_positions is None else kv_positions, kv_new
                )
            else:
                k, v = self._project_kv(inputs_kv, kv_positions)
            if self.rotary is not None:
                q = self.rotary(q, jnp.arange(t) if positions is None else positions)

        deterministic = self.deterministic if deterministic is None else deterministic
        rate = 0.0 if deterministic else self.dropout_rate
        dropout_rng = _dropout_key(rngs, self.rngs, type(self).__name__) if rate > 0 else None

        result = _attention(
            q,
            k.astype(q.dtype),
            v.astype(q.dtype),
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
            return_weights=return_weights or self.sow_weights,
        )
        out, weights = result if return_weights or self.sow_weights else (result, None)
        if self.sow_weights:
            self.sow(nnx.Intermediate, "attention_weights", weights)
        out = self.out(out.reshape(*out.shape[:-2], self.num_heads * self.head_dim))
        return (out, weights) if return_weights else out


def _write_cache(cache: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
    """``cache [*B, L, heads, d]`` with ``new [*B, t, heads, d]`` written at position
    ``index`` (in the cache's dtype)."""
    # dynamic_update_slice wants indices of one dtype (int64 zeros under x64).
    zero = jnp.zeros((), index.dtype)
    start = (zero,) * (new.ndim - 3) + (index, zero, zero)
    return jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), start)


def _single_head(
    query: jax.Array, keys: jax.Array, values: jax.Array | None
) -> tuple[jax.Array, jax.Array, jax.Array, bool]:
    """Shapes a classic seq2seq attention call into ``[*B, T, 1, H]`` heads."""
    if keys.ndim < 2:
        raise ValueError(f"keys must be [*B, S, features], got shape {keys.shape}")
    values = keys if values is None else values
    if values.shape[:-1] != keys.shape[:-1]:
        raise ValueError(
            f"values must match keys up to the last axis, got {values.shape=} and {keys.shape=}"
        )
    single = query.ndim == keys.ndim - 1
    if single:
        query = query[..., None, :]
    if query.ndim != keys.ndim or query.shape[:-2] != keys.shape[:-2]:
        raise ValueError(
            f"query must be [*B, features] or [*B, T, features] with the batch of keys "
            f"[*B, S, features], got {query.shape=} and {keys.shape=}"
        )
    return query[..., None, :], keys[..., None, :], values[..., None, :], single


def _key_padding(mask: jax.Array | None) -> jax.Array | None:
    # A [*B, S] padding mask broadcasts over the head and query axes of [*B, N, T, S].
    if mask is None:
        return None
    return _bool_mask(mask)[..., None, None, :]


class DotProductAttention(nnx.Module):
    """Luong "dot" attention over encoder states: ``score(s, h_j) = sᵀ h_j``.

    The weights are the softmax of the scores over j (padded positions excluded) and the context
    is ``Σ_j w_j v_j`` with ``v = h`` unless values are given. A query whose every key is
    masked gets a zero context and zero weights. Parameter-free.

    Args:
      scaled: divide scores by ``sqrt(features)`` (off in Luong et al. 2015).
      implementation: passed to :func:`jattn.attention`; needs one that returns weights.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jattn.nn import DotProductAttention
      >>> luong = DotProductAttention()
      >>> state, memory = jnp.ones((2, 16)), jnp.ones((2, 7, 16))  # one decoder step, encoder
      >>> context, weights = luong(state, memory, lengths=jnp.array([7, 3]))
      >>> context.shape, weights.shape, weights[1, 3:].tolist()  # no weight past the length
      ((2, 16), (2, 7), [0.0, 0.0, 0.0, 0.0])
    """

    def __init__(self, *, scaled: bool = False, implementation: ImplementationChoice = None):
        self.scaled = scaled
        self.implementation = implementation

    def __call__(
        self,
        query: jax.Array,
        keys: jax.Array,
        values: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        lengths: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attends from decoder states to encoder states.

        Args:
          query: decoder state(s) ``s``: ``[*B, D]`` (one step) or ``[*B, T, D]``.
          keys: encoder states ``h``: ``[*B, S, D]``.
          values: ``[*B, S, Dv]``; defaults to ``keys``.
          mask: bool ``[*B, S]``, True at real (non-padded) encoder positions.
          lengths: int ``[*B]``, the number of real encoder positions (an alternative to mask).

        Returns:
          ``(context [*B, (T,) Dv], weights [*B, (T,) S])``.
        """
        if query.shape[-1] != keys.shape[-1]:
            raise ValueError(
                f"dot attention needs query and keys of one width, got {query.shape=} and "
                f"{keys.shape=}"
            )
        q, k, v, single = _single_head(query, keys, values)
        scale = keys.shape[-1] ** -0.5 if self.scaled else 1.0
        out, w = _attention(
            q,
            k,
            v,
            mask=_key_padding(mask),
            scale=scale,
            key_value_seq_lengths=lengths,
            implementation=self.implementation,
            return_weights=True,
        )
        out, w = out[..., 0, :], w[..., 0, :, :]  # drop the single head
        if single:
            out, w = out[..., 0, :], w[..., 0, :]
        return out, w


class AdditiveAttention(nnx.Module):
    """Bahdanau (additive) attention: ``score(s, h_j) = vᵀ tanh(W₁ h_j + W₂ s)``.

    The scores go to :func:`jattn.attention` as an additive bias (with zero queries and keys),
    so masking, the softmax and the weighted sum run in the chosen kernel. A query whose every
    key is masked gets a zero context and zero weights.

    Args:
      query_features: width of the decoder state ``s``.
      key_features: width of the encoder states ``h``.
      units: width of the hidden layer (the size of ``v``); defaults to ``key_features``.
      use_bias: bias in ``W₂`` (the one bias of the score, as in Bahdanau et al.).
      implementation: passed to :func:`jattn.attention`; needs one that takes a bias and
        returns weights.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jattn.nn import AdditiveAttention
      >>> bahdanau = AdditiveAttention(16, 24, rngs=nnx.Rngs(0))
      >>> state, memory = jnp.ones((2, 16)), jnp.ones((2, 7, 24))
      >>> context, weights = bahdanau(state, memory)
      >>> context.shape, weights.shape
      ((2, 24), (2, 7))
    """

    def __init__(
        self,
        query_features: int,
        key_features: int,
        units: int | None = None,
        *,
        use_bias: bool = True,
        implementation: ImplementationChoice = None,
        kernel_init: nnx.Initializer = _default_kernel_init,
        dtype: Dtype | None = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        units = key_features if units is None else units
        self.key_features = key_features
        self.query_features = query_features
        self.implementation = implementation
        common = dict(kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.key_proj = Linear(key_features, units, use_bias=False, **common)  # W₁
        self.query_proj = Linear(query_features, units, use_bias=use_bias, **common)  # W₂
        self.score = Linear(units, 1, use_bias=False, **common)  # v

    def project_keys(self, keys: jax.Array) -> jax.Array:
        """``W₁ h``: ``[*B, S, key_features] -> [*B, S, units]``; compute once per source."""
        if keys.shape[-1] != self.key_features:
            raise ValueError(
                f"keys have {keys.shape[-1]} features, expected key_features="
                f"{self.key_features} (keys.shape={keys.shape})"
            )
        return self.key_proj(keys)

    def __call__(
        self,
        query: jax.Array,
        keys: jax.Array,
        values: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        lengths: jax.Array | None = None,
        projected_keys: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """Attends from decoder states to encoder states.

        Args:
          query: ``[*B, query_features]`` (one step) or ``[*B, T, query_features]``.
          keys: ``[*B, S, key_features]``.
          values: ``[*B, S, Dv]``; defaults to ``keys``.
          mask: bool ``[*B, S]``, True at real encoder positions.
          lengths: int ``[*B]``, the number of real encoder positions.
          projected_keys: ``project_keys(keys)``, to skip recomputing it at every step.

        Returns:
          ``(context [*B, (T,) Dv], weights [*B, (T,) S])``.
        """
        if query.shape[-1] != self.query_features:
            raise ValueError(
                f"query has {query.shape[-1]} features, expected query_features="
                f"{self.query_features} (query.shape={query.shape})"
            )
        pk = self.project_keys(keys) if projected_keys is None else projected_keys
        _, _, v, single = _single_head(query, keys, values)
        pq = self.query_proj(query if not single else query[..., None, :])  # [*B, T, U]
        hidden = jnp.tanh(pk[..., None, :, :] + pq[..., :, None, :])  # [*B, T, S, U]
        scores = self.score(hidden)[..., 0]  # [*B, T, S]
        dv = v.shape[-1]
        # Zero queries and keys make the logits equal to the bias; their head_dim matches the
        # values' so the call has the shape every implementation accepts.
        zq = jnp.zeros((*pq.shape[:-1], 1, dv), v.dtype)
        zk = jnp.zeros((*keys.shape[:-1], 1, dv), v.dtype)
        out, w = _attention(
            zq,
            zk,
            v,
            bias=scores[..., None, :, :].astype(jnp.float32),
            mask=_key_padding(mask),
            scale=1.0,
            key_value_seq_lengths=lengths,
            implementation=self.implementation,
            return_weights=True,
        )
        out, w = out[..., 0, :], w[..., 0, :, :]
        if single:
            out, w = out[..., 0, :], w[..., 0, :]
        return out, w
