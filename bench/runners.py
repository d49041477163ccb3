"""One runner per implementation: jattn's own, and the peers a user would pick instead.

A runner turns a case into a measurement: it makes random inputs on the device, compiles
(JAX) outside the timed region, checks the program fits, and times calls with
`bench.timing.measure`. Anything it cannot serve raises; the sweep records the reason.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

from bench.records import Mode, host_cores
from bench.shapes import Shape
from bench.timing import SkipCase, Timing, TimingConfig, measure

Origin = Literal["ours", "peer"]

DTYPES: dict[str, str] = {
    "float32": "float32",
    "f32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "f16": "float16",
    "fp16": "float16",
}

# Peers by the short name the CLI takes. Each may expand to several runners (tokamax on GPU).
PEERS: tuple[str, ...] = ("xla", "cudnn", "flax", "torch", "tokamax")


@dataclasses.dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    causal: bool
    mode: Mode
    shape_set: str

    @property
    def label(self) -> str:
        mask = "causal" if self.causal else "no mask"
        return f"{self.shape.label} {self.dtype} {mask} {self.mode}"


@dataclasses.dataclass(frozen=True)
class Measurement:
    timing: Timing
    compile_s: float | None = None
    xla_memory: dict[str, int] | None = None  # argument/output/temp/alias/total bytes
    device_peak_bytes: int | None = None
    device_peak_scope: str | None = None
    threads: int | None = None  # CPU threads the library was told to use, where we set it


@dataclasses.dataclass(frozen=True)
class Unavailable:
    """An implementation that cannot run here at all; it becomes one 'absent' record."""

    name: str
    origin: Origin
    reason: str


class Runner(abc.ABC):
    name: str
    origin: Origin

    @abc.abstractmethod
    def run(self, case: Case, config: TimingConfig, *, seed: int) -> Measurement:
        """Measure one case; raise NotImplementedError / SkipCase for what cannot be served."""


# --- JAX-based runners ---------------------------------------------------------------------

# (q, k, v, sinks) -> out; sinks is None unless the case passes them (Shape.sinks), v is None
# in a latent case (Shape.latent: the values are k[..., :Hv], see `_values`)
AttentionFn = Callable[[Any, Any, Any, Any], Any]


def _values(case: Case, k: Any, v: Any) -> Any:
    """The values a peer is given: `v`, or in a latent case (v None) the slice k[..., :Hv],
    taken inside the timed call, as a model that holds only the latent cache must."""
    return k[..., : case.shape.hv] if v is None else v


def _refuse_sinks(case: Case, who: str) -> None:
    """A peer without attention sinks: the case is unsupported, not run without them."""
    if case.shape.sinks:
        raise NotImplementedError(f"{who} takes no attention sinks")


def _fits(memory: dict[str, int], device: Any) -> None:
    """Refuse to run a compiled program that XLA says will not fit in free memory.

    On CPU an attempt would not raise: the kernel's OOM killer would end the whole sweep.
    """
    needed = memory["output"] + memory["temp"]  # the arguments are already allocated
    free: int | None = None
    stats = _memory_stats(device)
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    elif device.platform == "cpu":
        free = _host_available_bytes()
    if free is not None and needed > 0.9 * free:
        raise SkipCase(
            "oom",
            f"XLA memory analysis: the program needs {needed / 2**30:.2f} GiB beyond its "
            f"inputs, {free / 2**30:.2f} GiB is free; not run",
        )


def _memory_stats(device: Any) -> dict[str, Any] | None:
    try:
        return device.memory_stats()
    except Exception:  # some backends raise instead of returning None
        return None


def _host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _xla_memory(compiled: Any) -> dict[str, int] | None:
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # not implemented on every backend
        return None
    if analysis is None:
        return None
    sizes = {
        "argument": int(analysis.argument_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
        "temp": int(analysis.temp_size_in_bytes),
        "alias": int(analysis.alias_size_in_bytes),
    }
    sizes["total"] = sizes["argument"] + sizes["output"] + sizes["temp"] - sizes["alias"]
    return sizes


class JaxRunner(Runner):
    """Times a JAX attention function [B,T,N,H] x [B,S,K,H] x [B,S,K,Hv] -> [B,T,N,Hv] under
    jax.jit; with sinks (Shape.sinks) also one float32 sink logit per query head [N]. A latent
    case (Shape.latent) has no value array: the function gets v None, the values being
    k[..., :Hv], and forward+backward differentiates q and k only."""

    def __init__(self, name: str, origin: Origin) -> None:
        self.name = name
        self.origin = origin

    @abc.abstractmethod
    def attention(self, case: Case) -> AttentionFn:
        """The function to time, with the case's static options bound: it takes
        (q, k, v, sinks), sinks None unless the case passes them, v None in a latent case (the
        values are k[..., :Hv]). Raises NotImplementedError for a case it cannot serve."""

    def run(self, case: Case, config: TimingConfig, *, seed: int) -> Measurement:
        import jax
        import jax.numpy as jnp

        attn = self.attention(case)
        s = case.shape
        key = jax.random.key(seed)
        kq, kk, kv, kd = jax.random.split(key, 4)
        dtype = case.dtype
        q = jax.random.normal(kq, (s.B, s.T, s.N, s.H), dtype)
        k = jax.random.normal(kk, (s.B, s.S, s.K, s.H), dtype)
        # a latent case's values are k[..., :Hv]: no array of their own
        v = None if s.latent else jax.random.normal(kv, (s.B, s.S, s.K, s.hv), dtype)
        # one sink logit per query head, float32 whatever the inputs' dtype (as models keep them)
        sinks = (
            jax.random.normal(jax.random.fold_in(key, 5), (s.N,), jnp.float32) if s.sinks else None
        )
        fn: Callable[..., Any]
        if case.mode == "fwd":
            fn = attn
            args: tuple[Any, ...] = (q, k, v, sinks)
        elif case.mode == "jvp":
            # Forward mode: the output and its tangent along random tangents of q, k, v.
            kt = jax.random.split(kd, 3)
            tangents = tuple(
                None if x is None else jax.random.normal(t, x.shape, dtype)
                for x, t in zip((q, k, v), kt, strict=True)
            )

            def forward_mode(q: Any, k: Any, v: Any, tq: Any, tk: Any, tv: Any, sinks: Any) -> Any:
                if v is None:  # the values are inside k: its tangent carries theirs
                    return jax.jvp(lambda q, k: attn(q, k, None, sinks), (q, k), (tq, tk))
                return jax.jvp(lambda q, k, v: attn(q, k, v, sinks), (q, k, v), (tq, tk, tv))

            fn, args = forward_mode, (q, k, v, *tangents, sinks)
        else:
            # The cotangent is random too: a ones or zeros cotangent can let XLA simplify.
            do = jax.random.normal(kd, (s.B, s.T, s.N, s.hv), dtype)

            def grads(q: Any, k: Any, v: Any, do: Any, sinks: Any) -> Any:
                out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, sinks), q, k, v)
                return out, vjp(do)

            def latent_grads(q: Any, k: Any, do: Any, sinks: Any) -> Any:
                # the values are inside k: its gradient gathers theirs
                out, vjp = jax.vjp(lambda q, k: attn(q, k, None, sinks), q, k)
                return out, vjp(do)

            fn, args = (
                (latent_grads, (q, k, do, sinks)) if s.latent else (grads, (q, k, v, do, sinks))
            )
        jax.block_until_ready(args)

        start = time.perf_counter()
        compiled = jax.jit(fn).lower(*args).compile()
        compile_s = time.perf_counter() - start

        device = jax.devices()[0]
        memory = _xla_memory(compiled)
        if memory is not None:
            _fits(memory, device)
        timing = measure(lambda: jax.block_until_ready(compiled(*args)), config)
        stats = _memory_stats(device)
        peak = stats.get("peak_bytes_in_use") if stats else None
        return Measurement(
            timing=timing,
            compile_s=compile_s,
            xla_memory=memory,
            device_peak_bytes=None if peak is None else int(peak),
            # JAX cannot reset the allocator's high-water mark: it covers the whole process.
            device_peak_scope=None if peak is None else "process",
        )


class JattnRunner(JaxRunner):
    def __init__(self, implementation: str) -> None:
        super().__init__(f"jattn:{implementation}", "ours")
        self.implementation = implementation

    def attention(self, case: Case) -> AttentionFn:
        import jattn

        # a latent case passes the one array: jattn.attention(q, k, None, value_dim=Hv)
        value_dim = case.shape.hv if case.shape.latent else None

        def attn(q: Any, k: Any, v: Any, sinks: Any) -> Any:
            return jattn.attention(
                q, k, v, value_dim=value_dim, is_causal=case.causal, sinks=sinks,
                implementation=self.implementation,
            )  # fmt: skip

        return attn


# --- tuning configs (--config IMPL:FIELD=VALUE,...) ----------------------------------------


def parse_config_value(text: str) -> Any:
    """A config value from the command line: 'true'/'false' -> bool, 'none' -> None, then
    int, float, or else the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _config_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
    """An implementation measured with some fields of its tuning config overridden."""

    implementation: str
    fields: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        """The runner's (and its records') name: 'jattn:flash[block_q=128,block_k=256]'."""
        overrides = ",".join(f"{field}={_config_text(value)}" for field, value in self.fields)
        return f"jattn:{self.implementation}[{overrides}]"

    @classmethod
    def parse(cls, text: str) -> ConfigSpec:
        """`IMPL:FIELD=VALUE[,FIELD=VALUE...]`; raises ValueError saying what is wrong."""
        impl, sep, rest = text.partition(":")
        impl = impl.strip()
        if not sep or not impl or not rest.strip():
            raise ValueError(f"{text!r}: expected IMPL:FIELD=VALUE[,FIELD=VALUE...]")
        fields: dict[str, Any] = {}
        for item in rest.split(","):
            field, eq, value = item.partition("=")
            field = field.strip()
            if not eq or not field.isidentifier() or not value.strip():
                raise ValueError(f"{text!r}: {item.strip()!r} is not FIELD=VALUE")
            if field in fields:
                raise ValueError(f"{text!r}: field {field!r} is given twice")
            fields[field] = parse_config_value(value)
        return cls(impl, tuple(fields.items()))


def check_config(spec: ConfigSpec) -> None:
    """Raise ValueError, naming the implementation or field, for a config that cannot be built:
    an unknown implementation, one without a config type, a field its config type lacks, or a
    value the config refuses (where the type can be built with its defaults to check it).
    An implementation the registry could not load passes: its run is an 'absent' record."""
    from jattn import kernels

    impl = kernels.REGISTRY.get(spec.implementation)
    if impl is None:
        if spec.implementation in unavailable_jattn():
            return
        raise ValueError(
            f"unknown jattn implementation {spec.implementation!r}; known: "
            f"{', '.join(known_jattn_names())}"
        )
    config_type = impl.config_type
    if config_type is None:
        tunable = sorted(n for n, i in kernels.REGISTRY.items() if i.config_type is not None)
        raise ValueError(
            f"implementation {spec.implementation!r} has no tuning config; those with one: "
            f"{', '.join(tunable) or 'none'}"
        )
    known = [f.name for f in dataclasses.fields(config_type)]
    for field, _ in spec.fields:
        if field not in known:
            raise ValueError(
                f"{config_type.__name__} of {spec.implementation!r} has no field {field!r}; "
                f"its fields: {', '.join(known)}"
            )
    try:
        default = config_type()
    except Exception:  # no defaults for every field: values are checked when a case runs
        return
    try:
        dataclasses.replace(default, **dict(spec.fields))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{spec.name}: {e}") from None


class ConfiguredJattnRunner(JattnRunner):
    """jattn with its tuning config's heuristic default for each case, some fields replaced:
    `dataclasses.replace(config_type.default_for(plan, backend), **fields)`, the plan made
    from the case's own arrays inside the traced function."""

    def __init__(self, spec: ConfigSpec) -> None:
        super().__init__(spec.implementation)
        self.name = spec.name
        self.spec = spec

    def attention(self, case: Case) -> AttentionFn:
        import jax

        import jattn
        from jattn import kernels
        from jattn.plan import make_plan

        config_type = kernels.REGISTRY[self.implementation].config_type
        if config_type is None:
            raise NotImplementedError(f"jattn:{self.implementation} has no tuning config")
        backend = jax.default_backend()
        fields = dict(self.spec.fields)
        value_dim = case.shape.hv if case.shape.latent else None

        def attn(q: Any, k: Any, v: Any, sinks: Any) -> Any:
            plan, *_ = make_plan(q, k, v, value_dim=value_dim, is_causal=case.causal, sinks=sinks)
            config = dataclasses.replace(config_type.default_for(plan, backend), **fields)
            return jattn.attention(
                q, k, v, value_dim=value_dim, is_causal=case.causal, sinks=sinks,
                implementation=self.implementation, config=config,
            )  # fmt: skip

        return attn


class JaxNnRunner(JaxRunner):
    def __init__(self, implementation: Literal["xla", "cudnn"]) -> None:
        super().__init__(f"jax.nn:{implementation}", "peer")
        self.implementation = implementation

    def attention(self, case: Case) -> AttentionFn:
        import jax

        if self.implementation == "cudnn" and case.dtype not in ("bfloat16", "float16"):
            raise NotImplementedError(f"cuDNN attention takes float16/bfloat16, not {case.dtype}")
        _refuse_sinks(case, "jax.nn.dot_product_attention")
        s = case.shape
        if s.hv != s.H:
            raise NotImplementedError(
                f"jax.nn.dot_product_attention needs value heads as large as the key heads "
                f"(H={s.H}, Hv={s.hv})"
            )
        dpa = functools.partial(
            jax.nn.dot_product_attention,
            is_causal=case.causal,
            implementation=self.implementation,
        )
        return lambda q, k, v, sinks: dpa(q, k, _values(case, k, v))


class FlaxLinenRunner(JaxRunner):
    """`flax.linen.dot_product_attention`: the einsum + softmax path that linen's
    MultiHeadDotProductAttention calls. (nnx's version forwards to jax.nn when there is no
    dropout, so it would only measure jax.nn:xla again.)"""

    def __init__(self) -> None:
        super().__init__("flax.linen", "peer")

    def attention(self, case: Case) -> AttentionFn:
        import jax.numpy as jnp
        from flax import linen

        s = case.shape
        _refuse_sinks(case, "flax.linen.dot_product_attention")
        if s.K != s.N:
            raise NotImplementedError(
                f"flax.linen needs as many KV heads as query heads (N={s.N}, K={s.K})"
            )

        def attn(q: Any, k: Any, v: Any, sinks: Any) -> Any:
            mask = None
            if case.causal:  # what linen users build with nn.make_causal_mask
                mask = jnp.tril(jnp.ones((s.T, s.S), dtype=jnp.bool_))[None, None]
            return linen.dot_product_attention(q, k, _values(case, k, v), mask=mask)

        return attn


def _absl_flags_parsed() -> None:
    """Parse absl's flags with no arguments if nobody has: tokamax reads its config flags on
    first use and would otherwise parse `sys.argv`, which holds this suite's own options."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS(["bench"], known_only=True)


class TokamaxRunner(JaxRunner):
    def __init__(self, implementation: str | None) -> None:
        super().__init__(f"tokamax:{implementation or 'auto'}", "peer")
        self.implementation = implementation

    def attention(self, case: Case) -> AttentionFn:
        import tokamax

        _refuse_sinks(case, "tokamax.dot_product_attention")
        if case.mode == "jvp":  # (JAX: "can't apply forward-mode autodiff to a custom_vjp")
            raise NotImplementedError("tokamax.dot_product_attention has no forward mode")
        _absl_flags_parsed()
        dpa = functools.partial(
            tokamax.dot_product_attention,
            is_causal=case.causal,
            implementation=self.implementation,
        )
        return lambda q, k, v, sinks: dpa(q, k, _values(case, k, v))


# --- PyTorch -------------------------------------------------------------------------------


class TorchRunner(Runner):
    """`torch.nn.functional.scaled_dot_product_attention`, eager, on the device JAX uses.

    PyTorch's layout is [B, N, T, H]; inputs are made in that layout so no transpose is timed.
    A latent case's values are the view k[..., :Hv], made in the timed step (so that the
    backward reaches k through it).
    """

    def __init__(self, device: str, *, threads: int | None = None) -> None:
        import torch

        self.name = "torch.sdpa"
        self.origin = "peer"
        self.device = device
        # By default the same parallelism as XLA's CPU backend: every core it may run on.
        self.threads = threads or host_cores()
        torch.set_num_threads(self.threads)

    def _sync(self) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()

    def run(self, case: Case, config: TimingConfig, *, seed: int) -> Measurement:
        import torch
        import torch.nn.functional as F

        s = case.shape
        _refuse_sinks(case, "torch.nn.functional.scaled_dot_product_attention")
        if case.mode == "jvp":
            # (torch.func.jvp: "Trying to use forward AD with
            # _scaled_dot_product_flash_attention_for_cpu that does not support it", torch 2.14)
            raise NotImplementedError("scaled_dot_product_attention has no forward mode")
        dtype = getattr(torch, case.dtype)
        gen = torch.Generator(device=self.device).manual_seed(seed)

        def randn(*shape: int) -> Any:
            return torch.randn(*shape, generator=gen, device=self.device, dtype=dtype)

        q, k = randn(s.B, s.N, s.T, s.H), randn(s.B, s.K, s.S, s.H)
        v = None if s.latent else randn(s.B, s.K, s.S, s.hv)
        leaves = (q, k) if v is None else (q, k, v)  # what the backward differentiates
        kwargs: dict[str, Any] = {"is_causal": case.causal}
        if s.K != s.N:
            kwargs["enable_gqa"] = True

        def values() -> Any:
            return k[..., : s.hv] if v is None else v

        if case.mode == "fwd":

            def step() -> None:
                with torch.no_grad():
                    F.scaled_dot_product_attention(q, k, values(), **kwargs)
                self._sync()

        else:
            do = randn(s.B, s.N, s.T, s.hv)
            for t in leaves:
                t.requires_grad_(True)

            def step() -> None:
                for t in leaves:
                    t.grad = None  # no accumulation into old gradients
                F.scaled_dot_product_attention(q, k, values(), **kwargs).backward(do)
                self._sync()

        self._sync()
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timing = measure(step, config)
        peak = torch.cuda.max_memory_allocated() if self.device == "cuda" else None
        return Measurement(
            timing=timing,
            device_peak_bytes=peak,
            device_peak_scope=None if peak is None else "case",
            threads=self.threads if self.device == "cpu" else None,
        )


# --- discovery -----------------------------------------------------------------------------


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything else
        return f"{module} is not importable ({type(e).__name__}: {e})"
    return None


def jattn_names(backend: str) -> tuple[list[str], list[str]]:
    """(every registry name, the names that run on `backend`). Raises ImportError without jattn.

    Both come from the registry alone: the sweep measures every implementation that
    `jattn.kernels.available(backend)` lists (those that run only emulated there, Pallas in
    interpret mode on a CPU, are not listed), whatever they are called, except the test oracle
    (`Implementation.oracle`), which runs when named (see `our_runners`)."""
    from jattn import kernels

    return sorted(kernels.REGISTRY), list(kernels.available(backend))


def default_jattn_names(backend: str) -> list[str]:
    """What `--impls all` measures: every implementation that runs on `backend` but the test
    oracle (`Implementation.oracle`)."""
    from jattn import kernels

    return [n for n in kernels.available(backend) if not kernels.REGISTRY[n].oracle]


def unavailable_jattn() -> dict[str, str]:
    """Implementations the registry left out because they could not load, with the reason."""
    from jattn import kernels

    return dict(getattr(kernels, "UNAVAILABLE", {}))


def known_jattn_names() -> list[str]:
    """Every name `--impls` may give: registered ones and those that could not load."""
    every, _ = jattn_names("cpu")
    return sorted({*every, *unavailable_jattn()})


def our_runners(
    backend: str, names: Sequence[str] | None
) -> tuple[list[Runner], list[Unavailable]]:
    """jattn's implementations: `names`, or every one that runs on `backend` when None.

    One that cannot run here (another backend, or it could not load: a native library that was
    not built) is an Unavailable with the registry's reason."""
    try:
        every, runnable = jattn_names(backend)
    except Exception as e:
        return [], [
            Unavailable("jattn", "ours", f"jattn is not importable ({type(e).__name__}: {e})")
        ]
    from jattn import kernels

    missing = unavailable_jattn()
    runners: list[Runner] = []
    absent: list[Unavailable] = []
    if names is None:
        absent += [Unavailable(f"jattn:{n}", "ours", why) for n, why in sorted(missing.items())]
    for name in default_jattn_names(backend) if names is None else names:
        if name in missing and name not in kernels.REGISTRY:
            absent.append(Unavailable(f"jattn:{name}", "ours", missing[name]))
        elif name not in kernels.REGISTRY:
            raise ValueError(f"unknown jattn implementation {name!r}; known: {every}")
        elif name not in runnable:
            impl = kernels.REGISTRY[name]
            where = sorted(impl.backends)
            why = f"runs on {', '.join(where)}, not {backend}"
            if backend in impl.interpret_backends:
                why += f" (only emulated on {backend}: callable for tests, not a contender)"
            absent.append(Unavailable(f"jattn:{name}", "ours", why))
        else:
            runners.append(JattnRunner(name))
    return runners, absent


def config_runners(
    backend: str, specs: Sequence[ConfigSpec]
) -> tuple[list[Runner], list[Unavailable]]:
    """A runner per `--config`: the implementation with its config's fields overridden. One
    that cannot run here is an Unavailable with the reason, as in `our_runners`; a spec
    `check_config` refuses raises ValueError."""
    if not specs:
        return [], []
    try:
        _, runnable = jattn_names(backend)
    except Exception as e:
        reason = f"jattn is not importable ({type(e).__name__}: {e})"
        return [], [Unavailable(spec.name, "ours", reason) for spec in specs]
    from jattn import kernels

    runners: list[Runner] = []
    absent: list[Unavailable] = []
    for spec in specs:
        check_config(spec)
        if spec.implementation not in kernels.REGISTRY:
            absent.append(Unavailable(spec.name, "ours", unavailable_jattn()[spec.implementation]))
        elif spec.implementation not in runnable:
            where = ", ".join(sorted(kernels.REGISTRY[spec.implementation].backends))
            absent.append(Unavailable(spec.name, "ours", f"runs on {where}, not {backend}"))
        else:
            runners.append(ConfiguredJattnRunner(spec))
    return runners, absent


def peer_runners(
    backend: str,
    device_kind: str,
    names: Sequence[str] | None,
    *,
    torch_threads: int | None = None,
) -> tuple[list[Runner], list[Unavailable]]:
    """The peers measured alongside: `names` (short names from PEERS), or all when None.

    `torch_threads`: CPU threads for PyTorch (default: every core, as XLA uses)."""
    runners: list[Runner] = []
    absent: list[Unavailable] = []
    nvidia = backend == "gpu" and "nvidia" in device_kind.lower()
    for name in PEERS if names is None else names:
        if name == "xla":
            runners.append(JaxNnRunner("xla"))
        elif name == "cudnn":
            if nvidia:
                runners.append(JaxNnRunner("cudnn"))
            elif names is not None:  # asked for by name: say why there is nothing
                absent.append(
                    Unavailable("jax.nn:cudnn", "peer", f"needs an NVIDIA GPU, not {device_kind}")
                )
        elif name == "flax":
            runners.append(FlaxLinenRunner())
        elif name == "torch":
            if (error := _import_error("torch")) is not None:
                absent.append(Unavailable("torch.sdpa", "peer", error))
                continue
            import torch

            if backend == "cpu":
                runners.append(TorchRunner("cpu", threads=torch_threads))
            elif backend == "gpu" and torch.cuda.is_available():
                runners.append(TorchRunner("cuda"))
            else:
                why = (
                    "this torch build has no CUDA" if backend == "gpu" else f"no torch on {backend}"
                )
                absent.append(Unavailable("torch.sdpa", "peer", why))
        elif name == "tokamax":
            if (error := _import_error("tokamax")) is not None:
                absent.append(Unavailable("tokamax", "peer", error))
                continue
            runners.append(TokamaxRunner(None))
            if backend == "gpu":
                runners.extend(TokamaxRunner(impl) for impl in ("triton", "mosaic"))
        else:
            raise ValueError(f"unknown peer {name!r}; known: {list(PEERS)}")
    return runners, absent
