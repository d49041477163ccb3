"""`python -m bench train`: whole training steps (forward, backward, AdamW) of jattn's models.

A case is one model at one size and batch (`TrainShape`); each runner builds its model and
optimizer once, compiles its step, and is then timed in turn with every other runner of the
case for `rounds` rounds (`bench.timing.TimingConfig`), as the kernel sweep does. Runners:

- `jattn:<impl>`: `jattn.nn.DecoderLM` / `jattn.nn.Transformer` with `implementation=<impl>`
  ("auto" is None: jattn's own choice), AdamW from optax, the step one jitted function of
  (parameters + optimizer state, batch) with the state donated.
- `jax.nn:xla`: the same jattn model and step with the kernel call replaced by
  `jax.nn.dot_product_attention` (what the model costs with JAX's own attention).
- `torch:eager` / `torch:compile`: the PyTorch twin of the model (`bench.torch_models`), SDPA
  attention, `torch.optim.AdamW` (fused where this torch has it); `torch.compile` of the model
  and loss (the optimizer step stays eager). Where torch.compile fails on the machine, the
  record says "skipped" with the reason.

FLOPs of a step (`train_flops`): 6 x (parameters in matmuls) x (tokens through them) plus the
attention FLOPs of every attention layer by the FlashAttention convention (forward + backward,
3.5 x the forward, halved when causal: `bench.records.attention_flops`). Embedding look-ups,
norms, biases, softmax and the optimizer are not counted. Every record carries the count, the
tokens per second and the FLOP rate; the report gives it as a share of the machine's float32
matmul rate measured at the start of the run (`bench.roofline`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

from bench.records import (
    Record,
    RecordWriter,
    attention_flops,
    host_cores,
    host_cpu,
    measured_fields,
    new_run_id,
    now,
    versions,
)
from bench.timing import SkipCase, Timing, TimingConfig, classify, measure, pool

ModelKind = Literal["DecoderLM", "Transformer"]
MODELS: tuple[ModelKind, ...] = ("DecoderLM", "Transformer")

# AdamW for both libraries: the same hyper-parameters (torch's defaults but the learning rate).
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.01

# XLA's CPU runtime allocates a step's temporary buffers afresh at every step (900 MB for the
# reference DecoderLM at 16 x 256). glibc serves a block that large from a fresh mapping and
# unmaps it when freed, so every step faults its temporaries in again, 4 KiB at a time: 245k
# page faults and 0.35 s of kernel time a step on the 2-core Xeon. With this setting glibc asks
# for transparent huge pages on its mappings: about 1k faults a step (docs/benchmarks.md).
HOST_MEMORY_TUNABLES = "glibc.malloc.hugetlb=1"


def host_memory_note() -> str | None:
    """A line for the log when this Linux process runs without `HOST_MEMORY_TUNABLES`."""
    if not sys.platform.startswith("linux") or "GLIBC_TUNABLES" in os.environ:
        return None
    return (
        "note: GLIBC_TUNABLES is not set, so every CPU step faults XLA's temporary buffers "
        f"in again 4 KiB at a time; GLIBC_TUNABLES={HOST_MEMORY_TUNABLES} uses huge pages "
        "(5-9% of a step here; docs/benchmarks.md)"
    )


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """One model size and batch. For the Transformer, `layers` encoder and `layers` decoder
    layers, source and target both `T` tokens long."""

    model: ModelKind
    d_model: int
    layers: int
    heads: int
    d_ff: int
    vocab: int
    B: int
    T: int

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"TrainShape.model must be one of {MODELS}, got {self.model!r}")
        for name in ("d_model", "layers", "heads", "d_ff", "vocab", "B", "T"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TrainShape.{name} must be a positive int, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(
                f"TrainShape.d_model={self.d_model} must be a multiple of heads={self.heads}"
            )
        if (self.d_model // self.heads) % 2:
            raise ValueError(
                f"TrainShape: the head size d_model / heads = {self.d_model // self.heads} must "
                "be even (rotary embedding)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def tokens(self) -> int:
        """Target tokens per step (what tokens per second counts)."""
        return self.B * self.T

    @property
    def label(self) -> str:
        return (
            f"{self.model} d={self.d_model} L={self.layers} N={self.heads} ff={self.d_ff} "
            f"V={self.vocab} B={self.B} T={self.T}"
        )

    @classmethod
    def parse(cls, text: str) -> TrainShape:
        """`MODEL,d_model,layers,heads,d_ff,vocab,B,T`, e.g. `DecoderLM,384,6,6,1536,96,16,256`."""
        parts = [p.strip() for p in text.split(",")]
        if len(parts) != 8:
            raise ValueError(
                f"{text!r}: expected MODEL,d_model,layers,heads,d_ff,vocab,B,T (8 items), "
                f"got {len(parts)}"
            )
        try:
            numbers = [int(p) for p in parts[1:]]
        except ValueError:
            raise ValueError(f"{text!r}: the seven sizes must be integers") from None
        return cls(parts[0], *numbers)  # type: ignore[arg-type]


def _lm(B: int, T: int) -> TrainShape:
    return TrainShape("DecoderLM", 384, 6, 6, 1536, 96, B, T)


TRAIN_SETS: dict[str, tuple[TrainShape, ...]] = {
    # A few minutes on 2 cores: the reference model at its short batch, a small Transformer.
    "quick": (_lm(16, 256), TrainShape("Transformer", 256, 2, 4, 1024, 96, 8, 128)),
    # The reference: DecoderLM d 384, 6 layers, 6 heads, d_ff 1536, vocab 96.
    "reference": (_lm(16, 256), _lm(4, 1024), _lm(1, 4096)),
    "transformer": (
        TrainShape("Transformer", 256, 3, 4, 1024, 96, 16, 128),
        TrainShape("Transformer", 384, 3, 6, 1536, 96, 4, 512),
    ),
}


# --- FLOPs ---------------------------------------------------------------------------------


def matmul_params(shape: TrainShape) -> int:
    """Weights of the model's matmuls (no embeddings, biases or norms): what 6·P·tokens counts."""
    d, ff, L = shape.d_model, shape.d_ff, shape.layers
    block = 4 * d * d + 2 * d * ff  # q, k, v, out; up, down
    if shape.model == "DecoderLM":
        return L * block + d * shape.vocab
    return L * block + L * (block + 4 * d * d) + d * shape.vocab  # decoder adds cross q, k, v, o


def train_flops(shape: TrainShape) -> float:
    """Matmul FLOPs of one training step: 6 x weights x the tokens each weight sees, plus
    attention (FlashAttention convention, forward + backward)."""
    d, ff, L, N, H = shape.d_model, shape.d_ff, shape.layers, shape.heads, shape.head_dim
    B, T = shape.B, shape.T
    block = 4 * d * d + 2 * d * ff
    causal = attention_flops(B, T, T, N, H, causal=True, mode="fwd+bwd")
    if shape.model == "DecoderLM":
        dense = 6.0 * (L * block + d * shape.vocab) * B * T
        return dense + L * causal
    S = T  # source length
    full = attention_flops(B, S, S, N, H, causal=False, mode="fwd+bwd")
    cross = attention_flops(B, T, S, N, H, causal=False, mode="fwd+bwd")
    encoder = 6.0 * L * block * B * S
    cross_kv = 6.0 * L * 2 * d * d * B * S  # memory -> cross keys and values
    decoder = 6.0 * (L * (block + 2 * d * d) + d * shape.vocab) * B * T
    return encoder + cross_kv + decoder + L * (full + causal + cross)


# --- runners -------------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """A runner's built and compiled step: `step()` runs one training step and waits for it."""

    step: Callable[[], object]
    compile_s: float | None
    params: int
    xla_memory: dict[str, int] | None = None
    threads: int | None = None


class TrainRunner:
    name: str
    origin: Literal["ours", "peer"]

    def prepare(self, shape: TrainShape, *, seed: int) -> Prepared:  # pragma: no cover
        raise NotImplementedError


def _xla_attention(q, k, v, **kw):
    """`jax.nn.dot_product_attention` in the place of `jattn.attention` (the xla runner)."""
    import jax

    extra = {
        name: kw[name]
        for name in ("mask", "segment_ids", "softcap", "sinks", "dropout_rng")
        if kw.get(name) is not None
    }
    if extra or kw.get("dropout_rate") or kw.get("return_weights"):
        raise NotImplementedError(f"the xla runner does not pass {sorted(extra)} to jax.nn")
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=kw.get("scale"),
        is_causal=kw.get("is_causal", False),
        query_seq_lengths=kw.get("query_seq_lengths"),
        key_value_seq_lengths=kw.get("key_value_seq_lengths"),
        implementation="xla",
    )


@contextlib.contextmanager
def _kernel_call(replacement: Callable[..., Any] | None) -> Iterator[None]:
    """While tracing: jattn.nn's attention layers call `replacement` instead of jattn.attention."""
    if replacement is None:
        yield
        return
    from jattn.nn import attention as module

    saved = module._attention
    module._attention = replacement
    try:
        yield
    finally:
        module._attention = saved


def build_jax_model(shape: TrainShape, implementation: str | None, *, seed: int = 0):
    """The jattn model of `shape` (no dropout, float32)."""
    from flax import nnx

    import jattn.nn as jn

    common = dict(
        d_model=shape.d_model,
        num_heads=shape.heads,
        d_ff=shape.d_ff,
        dropout_rate=0.0,
        implementation=implementation,
        rngs=nnx.Rngs(seed),
    )
    if shape.model == "DecoderLM":
        return jn.DecoderLM(shape.vocab, num_layers=shape.layers, **common)
    return jn.Transformer(
        shape.vocab,
        num_encoder_layers=shape.layers,
        num_decoder_layers=shape.layers,
        norm_first=True,
        **common,
    )


def count_params(tree: Any) -> int:
    import jax

    return sum(int(x.size) for x in jax.tree.leaves(tree))


class JaxTrainRunner(TrainRunner):
    """A jattn model's training step under one jitted function, state donated."""

    def __init__(self, implementation: str) -> None:
        if implementation == "xla":
            self.name, self.origin = "jax.nn:xla", "peer"
        else:
            self.name, self.origin = f"jattn:{implementation}", "ours"
        self.implementation = implementation

    def prepare(self, shape: TrainShape, *, seed: int) -> Prepared:
        import jax
        import optax
        from flax import nnx

        import jattn.nn as jn
        from bench.runners import _fits, _xla_memory

        impl = {"auto": None, "xla": None}.get(self.implementation, self.implementation)
        model = build_jax_model(shape, impl, seed=seed)
        optimizer = nnx.Optimizer(
            model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY), wrt=nnx.Param
        )
        params = count_params(nnx.state(model, nnx.Param))
        graphdef, state = nnx.split((model, optimizer))
        is_lm = shape.model == "DecoderLM"

        def train_step(state, batch):
            model, optimizer = nnx.merge(graphdef, state)

            def loss_fn(model):
                logits = model(batch[0]) if is_lm else model(batch[0], batch[1])
                return jn.cross_entropy(logits, batch[-1])

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        key = jax.random.key(seed + 1)
        n_inputs = 2 if is_lm else 3
        batch = tuple(
            jax.random.randint(k, (shape.B, shape.T), 0, shape.vocab)
            for k in jax.random.split(key, n_inputs)
        )
        replacement = _xla_attention if self.implementation == "xla" else None
        start = time.perf_counter()
        with _kernel_call(replacement):
            compiled = jax.jit(train_step, donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - start
        memory = _xla_memory(compiled)
        if memory is not None:
            _fits(memory, jax.devices()[0])
        holder = [state]

        def step() -> object:
            holder[0], loss = compiled(holder[0], batch)
            return jax.block_until_ready(loss)

        return Prepared(step, compile_s, params, xla_memory=memory)


class TorchTrainRunner(TrainRunner):
    """The PyTorch twin's training step, eager or under torch.compile."""

    def __init__(self, *, compiled: bool, threads: int | None = None) -> None:
        self.name = "torch:compile" if compiled else "torch:eager"
        self.origin = "peer"
        self.compiled = compiled
        self.threads = threads or host_cores()

    def prepare(self, shape: TrainShape, *, seed: int) -> Prepared:
        import torch
        import torch.nn.functional as F

        from bench import torch_models

        torch.set_num_threads(self.threads)
        torch.manual_seed(seed)
        cls = torch_models.DecoderLM if shape.model == "DecoderLM" else torch_models.Transformer
        model = cls(shape.vocab, shape.d_model, shape.layers, shape.heads, shape.d_ff)
        params = sum(p.numel() for p in model.parameters())
        try:
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=True
            )
        except (RuntimeError, TypeError):  # no fused AdamW for this device in this torch
            optimizer = torch.optim.AdamW(
                model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY
            )
        gen = torch.Generator().manual_seed(seed + 1)
        n_inputs = 2 if shape.model == "DecoderLM" else 3
        batch = [
            torch.randint(0, shape.vocab, (shape.B, shape.T), generator=gen)
            for _ in range(n_inputs)
        ]

        def loss_fn(*inputs: Any) -> Any:
            *x, targets = inputs
            logits = model(*x)
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

        fn = torch.compile(loss_fn) if self.compiled else loss_fn

        def step() -> object:
            optimizer.zero_grad(set_to_none=True)
            loss = fn(*batch)
            loss.backward()
            optimizer.step()
            return loss

        compile_s = None
        if self.compiled:
            # A fresh cache: the previous case's model would otherwise make dynamo recompile
            # for dynamic shapes inside the timed steps.
            torch._dynamo.reset()
            start = time.perf_counter()
            try:
                step()
            except Exception as e:  # no compiler, an inductor bug: skipped, with the reason
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
                raise SkipCase("skipped", f"torch.compile failed here: {reason}"[:500]) from e
            compile_s = time.perf_counter() - start
        return Prepared(step, compile_s, params, threads=self.threads)


JATTN_IMPLS: tuple[str, ...] = ("auto", "fused", "flash", "cpu")
TRAIN_PEERS: tuple[str, ...] = ("xla", "torch", "torch-compile")


def train_runners(
    impls: Sequence[str] | None, peers: Sequence[str] | None, *, torch_threads: int | None = None
) -> tuple[list[TrainRunner], list[tuple[str, str, str]]]:
    """The runners, and (name, origin, reason) for each that cannot run here."""
    from bench.runners import _import_error

    runners: list[TrainRunner] = []
    absent: list[tuple[str, str, str]] = []
    try:
        from jattn import kernels

        available = kernels.available()
        missing = dict(getattr(kernels, "UNAVAILABLE", {}))
    except Exception as e:
        available, missing = [], {}
        absent.append(("jattn", "ours", f"jattn is not importable ({type(e).__name__}: {e})"))
    for name in JATTN_IMPLS if impls is None else impls:
        if name == "auto" or name in available:
            runners.append(JaxTrainRunner(name))
        elif name in missing:
            absent.append((f"jattn:{name}", "ours", missing[name]))
        else:
            absent.append((f"jattn:{name}", "ours", "not available on this backend"))
    for peer in TRAIN_PEERS if peers is None else peers:
        if peer == "xla":
            runners.append(JaxTrainRunner("xla"))
            continue
        name = "torch:compile" if peer == "torch-compile" else "torch:eager"
        if (error := _import_error("torch")) is not None:
            absent.append((name, "peer", error))
        else:
            compiled = peer == "torch-compile"
            runners.append(TorchTrainRunner(compiled=compiled, threads=torch_threads))
    return runners, absent


# --- the run -------------------------------------------------------------------------------


def train_record(
    runner: TrainRunner,
    shape: TrainShape,
    set_name: str,
    prepared: Prepared | None,
    rounds: Sequence[Timing | BaseException],
    base: dict[str, Any],
) -> Record:
    """One record of kind "train" from a runner's rounds on one case (the first failure wins)."""
    flops = train_flops(shape)
    fields = {
        **base,
        "implementation": runner.name,
        "origin": runner.origin,
        "kind": "train",
        "shape_set": set_name,
        "model": shape.model,
        "d_model": shape.d_model,
        "layers": shape.layers,
        "d_ff": shape.d_ff,
        "vocab": shape.vocab,
        "B": shape.B,
        "T": shape.T,
        "S": shape.T,
        "N": shape.heads,
        "K": shape.heads,
        "H": shape.head_dim,
        "Hv": shape.head_dim,
        "dtype": "float32",
        "causal": True,
        "mask": "causal",
        "mode": "train",
        "flops": flops,
        "matmul_params": matmul_params(shape),
        "tokens": shape.tokens,
    }
    for item in rounds:
        if isinstance(item, BaseException):
            status, reason = classify(item)
            return Record(**fields, status=status, reason=reason)
    assert prepared is not None
    t = pool(list(rounds)) if len(rounds) > 1 else rounds[0]  # type: ignore[arg-type]
    return Record(
        **fields,
        **measured_fields(t, prepared.xla_memory),
        status="ok",
        reason=None,
        params=prepared.params,
        compile_s=prepared.compile_s,
        tflops=flops / t.median_s / 1e12,
        tokens_per_s=shape.tokens / t.median_s,
        threads=prepared.threads,
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    shapes: Sequence[tuple[str, TrainShape]]
    impls: Sequence[str] | None = None  # None: JATTN_IMPLS
    peers: Sequence[str] | None = None  # None: TRAIN_PEERS
    timing: TimingConfig = TimingConfig(repeats=3, warmup=1, min_time=0.0)
    seed: int = 0
    torch_threads: int | None = None
    roofline: Any = None  # a bench.roofline.RooflineConfig, or None: not measured


def run_train(
    config: TrainConfig,
    out_path: Any,
    *,
    log: Callable[[str], None] | None = None,
) -> list[Record]:
    """Every runner on every case, in interleaved rounds; one record each, appended to
    `out_path` as it is made (after the machine's limits when `config.roofline` is set)."""
    from bench.sweep import current_platform, roofline_records

    say = log or (lambda _: None)
    platform = current_platform()
    run_id = new_run_id()
    base = {
        "backend": platform.backend,
        "device_kind": platform.device_kind,
        "host_cpu": host_cpu(),
        "host_cores": host_cores(),
        "versions": versions(),
        "run_id": run_id,
    }
    if platform.backend == "cpu" and (note := host_memory_note()) is not None:
        say(note)
    runners, absent = train_runners(config.impls, config.peers, torch_threads=config.torch_threads)
    records: list[Record] = []
    with RecordWriter(out_path) as writer:

        def emit(record: Record) -> None:
            writer.write(record)
            records.append(record)

        for name, origin, reason in absent:
            emit(Record(**base, implementation=name, origin=origin, kind="train",
                        status="absent", reason=reason, timestamp=now()))  # fmt: skip
        if not runners:
            return records
        if config.roofline is not None:
            limit_records, _ = roofline_records(config.roofline, platform, run_id, ("float32",))
            for record in limit_records:
                emit(record)
                if record.status == "ok" and record.tflops is not None:
                    say(f"machine: {record.dtype} matmul {record.tflops * 1e3:.0f} GFLOP/s")
        for set_name, shape in config.shapes:
            prepared: list[Prepared | None] = []
            tries: list[list[Timing | BaseException]] = []
            for runner in runners:
                say(f"{shape.label}: building {runner.name}")
                try:
                    prepared.append(runner.prepare(shape, seed=config.seed))
                    tries.append([])
                except Exception as e:
                    prepared.append(None)
                    tries.append([e])
            n = len(runners)
            for r in range(config.timing.rounds):
                # Each round starts one runner further on, so that no runner is always the one
                # that follows a given other (PyTorch's idle threads, caches another left cold).
                for i in [(r + j) % n for j in range(n)]:
                    runner = runners[i]
                    p = prepared[i]
                    if p is None or (tries[i] and isinstance(tries[i][-1], BaseException)):
                        continue
                    try:
                        tries[i].append(measure(p.step, config.timing))
                    except Exception as e:
                        tries[i].append(e)
                    last = tries[i][-1]
                    if isinstance(last, Timing):
                        say(f"  round {r + 1} {runner.name}: {last.median_s * 1e3:.1f} ms/step")
            for i, runner in enumerate(runners):
                record = train_record(
                    runner, shape, set_name, prepared[i], tries[i], {**base, "timestamp": now()}
                )
                emit(record)
                if record.status != "ok":
                    say(f"{record.status}: {runner.name} {shape.label}: {record.reason}")
            del prepared
            gc.collect()
    return records
