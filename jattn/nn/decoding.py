"""Autoregressive decoding with the KV cache: greedy, temperature and top-k sampling.

Both entry points are jit-compiled (one compilation per model structure and static option set).
The prompt (or the BOS token) goes through the model once to fill the caches; then a
``jax.lax.while_loop`` runs one model call per generated token, carrying the caches, and stops
as soon as every sequence has produced ``eos_id``. After its end token a sequence emits
``pad_id``. The model given is not modified: decoding runs on a copy in evaluation mode.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jattn import masks
from jattn.nn.models import DecoderLM, Transformer

__all__ = ["generate", "generate_seq2seq", "sample_logits"]


def sample_logits(
    logits: jax.Array,
    rng: jax.Array | None = None,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
) -> jax.Array:
    """Picks one token per row of ``logits [*B, V]``; returns int32 ``[*B]``.

    ``temperature == 0`` is greedy (argmax, no key needed); otherwise samples from
    ``softmax(logits / temperature)``, restricted to the ``top_k`` largest logits when given.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature=}")
    if top_k is not None and not 1 <= top_k <= logits.shape[-1]:
        raise ValueError(f"top_k must be in [1, vocab={logits.shape[-1]}], got {top_k=}")
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs rng (a jax PRNG key)")
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits / temperature, axis=-1).astype(jnp.int32)


def _loop(
    model: nnx.Module,
    first_logits: jax.Array,
    step: Callable[[nnx.Module, jax.Array, jax.Array], jax.Array],
    rng: jax.Array,
    *,
    num_steps: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    pad_id: int,
) -> jax.Array:
    """Samples ``num_steps`` tokens; ``step(model, token [B], k) -> logits [B, V]`` feeds the
    k-th generated token back into the cached model."""
    batch = first_logits.shape[0]
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)
    out = jnp.full((batch, num_steps), pad_id, jnp.int32)
    finished = jnp.zeros((batch,), bool)

    def cond(carry: tuple[Any, ...]) -> jax.Array:
        k, _, finished, _, _, _ = carry
        return (k < num_steps) & ~jnp.all(finished)

    def body(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        k, logits, finished, out, rng, cache = carry
        rng, key = jax.random.split(rng)
        token = sample_logits(logits, key, temperature=temperature, top_k=top_k)
        token = jnp.where(finished, pad_id, token)
        out = jax.lax.dynamic_update_slice(out, token[:, None], (jnp.zeros_like(k), k))
        if eos_id is not None:
            finished = finished | (token == eos_id)
        m = nnx.merge(graphdef, cache, rest)
        logits = step(m, token, k)
        return k + 1, logits, finished, out, rng, nnx.state(m, nnx.Cache)

    init = (jnp.int32(0), first_logits, finished, out, rng, cache)
    return jax.lax.while_loop(cond, body, init)[3]


def _check_common(num_steps: int, temperature: float, rng: jax.Array | None) -> jax.Array:
    if num_steps < 1:
        raise ValueError(f"the number of tokens to generate must be positive, got {num_steps}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature=}")
    if temperature > 0 and rng is None:
        raise ValueError("sampling with temperature > 0 needs rng (a jax PRNG key)")
    return jax.random.key(0) if rng is None else rng


def generate(
    model: DecoderLM,
    prompt: jax.Array,
    *,
    max_new_tokens: int,
    prompt_lengths: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Continues ``prompt`` with up to ``max_new_tokens`` tokens from a :class:`DecoderLM`.

    Args:
      model: the language model (not modified).
      prompt: int ``[B, P]`` with ``P >= 1``, right-padded when ``prompt_lengths`` is given.
      max_new_tokens: number of tokens to generate (the output width).
      prompt_lengths: int ``[B]`` in ``[1, P]``. Each sequence continues from its own last
        prompt token at its own positions; the padding slots of the prompt in the cache are
        masked out.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k: sample among the k most likely tokens only.
      rng: PRNG key, needed when ``temperature > 0``.
      eos_id: end token; a sequence that emitted it emits ``pad_id`` afterwards, and decoding
        stops once every sequence has.
      pad_id: the padding token.

    Returns:
      int32 ``[B, max_new_tokens]``, the generated tokens only.
    """
    if not isinstance(model, DecoderLM):
        raise TypeError(f"generate needs a DecoderLM, got {type(model).__name__}")
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be int [batch, length >= 1], got shape {prompt.shape}")
    rng = _check_common(max_new_tokens, temperature, rng)
    graphdef, state = nnx.split(model)
    return _generate_jit(
        graphdef,
        state,
        prompt,
        prompt_lengths,
        rng,
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
    )


@partial(
    jax.jit,
    static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "eos_id", "pad_id"),
)
def _generate_jit(
    graphdef: Any,
    state: Any,
    prompt: jax.Array,
    prompt_lengths: jax.Array | None,
    rng: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    pad_id: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    batch, plen = prompt.shape
    model.init_cache(batch, plen + max_new_tokens)
    logits = model(prompt, decode=True)  # fills the caches with the whole prompt at once
    if prompt_lengths is None:
        lengths = jnp.full((batch,), plen, jnp.int32)
        hole = None
    else:
        lengths = jnp.asarray(prompt_lengths, jnp.int32)
        # Generated tokens go to slots plen, plen+1, ...: hide the prompt padding in between.
        hole = masks.Lengths(None, lengths) | ~masks.Lengths(
            None, jnp.full((batch,), plen, jnp.int32)
        )
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]

    def step(m: DecoderLM, token: jax.Array, k: jax.Array) -> jax.Array:
        positions = (lengths + k)[:, None]
        return m(token[:, None], positions=positions, mask=hole, decode=True)[:, 0]

    return _loop(
        model,
        last,
        step,
        rng,
        num_steps=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
    )


def generate_seq2seq(
    model: Transformer,
    src: jax.Array,
    *,
    max_length: int,
    bos_id: int,
    src_lengths: jax.Array | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> jax.Array:
    """Translates ``src`` with a :class:`Transformer`: encoder once, decoder token by token.

    Args:
      model: the encoder-decoder model (not modified).
      src: int ``[B, S]``, right-padded when ``src_lengths`` is given.
      max_length: number of target tokens to generate (the output width).
      bos_id: the start token fed to the decoder first (not part of the output).
      src_lengths: int ``[B]`` true source lengths.
      temperature, top_k, rng, eos_id, pad_id: as for :func:`generate`.

    Returns:
      int32 ``[B, max_length]``.
    """
    if not isinstance(model, Transformer):
        raise TypeError(f"generate_seq2seq needs a Transformer, got {type(model).__name__}")
    if src.ndim != 2:
        raise ValueError(f"src must be int [batch, length], got shape {src.shape}")
    rng = _check_common(max_length, temperature, rng)
    graphdef, state = nnx.split(model)
    return _generate_seq2seq_jit(
        graphdef,
        state,
        src,
        src_lengths,
        rng,
        max_length=max_length,
        bos_id=bos_id,
        temperature=float(temperature),
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
    )


@partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "max_length",
        "bos_id",
        "temperature",
        "top_k",
        "eos_id",
        "pad_id",
    ),
)
def _generate_seq2seq_jit(
    graphdef: Any,
    state: Any,
    src: jax.Array,
    src_lengths: jax.Array | None,
    rng: jax.Array,
    *,
    max_length: int,
    bos_id: int,
    temperature: float,
    top_k: int | None,
    eos_id: int | None,
    pad_id: int,
) -> jax.Array:
    model = nnx.merge(graphdef, state)
    model.set_attributes(deterministic=True, raise_if_not_found=False)
    batch = src.shape[0]
    memory = model.encode(src, src_lengths=src_lengths)
    # One slot for BOS and one per generated token.
    model.init_cache(memory, max_length + 1)
    bos = jnp.full((batch, 1), bos_id, jnp.int32)
    first = model.decode(bos, src_lengths=src_lengths, decode=True)[:, 0]

    def step(m: Transformer, token: jax.Array, k: jax.Array) -> jax.Array:
        return m.decode(token[:, None], src_lengths=src_lengths, decode=True)[:, 0]

    return _loop(
        model,
        first,
        step,
        rng,
        num_steps=max_length,
        temperature=temperature,
        top_k=top_k,
        eos_id=eos_id,
        pad_id=pad_id,
    )
