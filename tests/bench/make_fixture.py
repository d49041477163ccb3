"""Writes fixtures/fake_gpu_records.jsonl: made-up records of a second backend for the report tests.

Run `python -m tests.bench.make_fixture` from the repository root after a schema change. The
numbers are invented (device kind "FAKE GPU"), chosen so speed-ups over jax.nn:xla are exact:
fused takes half the baseline's time, cudnn a quarter, torch 0.8 of it.
"""

from __future__ import annotations

import pathlib

from bench.records import Record, attention_flops

PATH = pathlib.Path(__file__).parent / "fixtures" / "fake_gpu_records.jsonl"
DEVICE_KIND = "FAKE GPU (test fixture)"
TIME_FACTOR = {"jax.nn:xla": 1.0, "jattn:fused": 0.5, "jax.nn:cudnn": 0.25, "torch.sdpa": 0.8}
LENGTHS = (512, 1024, 2048)
# seconds of jax.nn:xla forward at T = S = 512; longer sequences run at higher efficiency
XLA_FWD_512 = 1e-3
EFFICIENCY = {512: 1.0, 1024: 1.25, 2048: 1.6}


def records() -> list[Record]:
    base = {
        "backend": "gpu",
        "device_kind": DEVICE_KIND,
        "host_cpu": "fixture CPU",
        "host_cores": 8,
        "versions": {
            "python": "3.11.0",
            "jax": "0.0.0",
            "jaxlib": "0.0.0",
            "flax": "0.0.0",
            "numpy": "0.0.0",
            "torch": "0.0.0",
            "tokamax": None,
            "jattn": "0.0.0",
            "jattn_commit": "fixture",
        },
        "run_id": "fixture",
        "timestamp": "2026-01-01T00:00:00+00:00",
    }
    out = [
        Record(
            implementation="tokamax",
            origin="peer",
            status="absent",
            reason="tokamax is not importable (fixture)",
            **base,
        )
    ]
    for mode in ("fwd", "fwd+bwd"):
        for T in LENGTHS:
            flops = attention_flops(1, T, T, 8, 64, causal=False, mode=mode)
            xla = XLA_FWD_512 * (T / 512) ** 2 / EFFICIENCY[T] * (3.5 if mode == "fwd+bwd" else 1)
            for impl, factor in TIME_FACTOR.items():
                median = xla * factor
                out.append(
                    Record(
                        implementation=impl,
                        origin="ours" if impl.startswith("jattn:") else "peer",
                        status="ok",
                        reason=None,
                        shape_set="quick",
                        B=1,
                        T=T,
                        S=T,
                        N=8,
                        K=8,
                        H=64,  # fmt: skip
                        dtype="bfloat16",
                        causal=False,
                        mask="none",
                        mode=mode,
                        repeats=3,
                        number=1,
                        warmup=1,
                        median_s=median,
                        iqr_s=0.02 * median,
                        min_s=0.99 * median,
                        max_s=1.03 * median,
                        compile_s=None if impl == "torch.sdpa" else 0.5,
                        flops=flops,
                        tflops=flops / median / 1e12,
                        **base,
                    )
                )
    out.append(
        Record(
            implementation="jattn:fused",
            origin="ours",
            status="oom",
            reason="XlaRuntimeError: RESOURCE_EXHAUSTED: fixture",
            shape_set="long",
            B=1,
            T=32768,
            S=32768,
            N=8,
            K=8,
            H=128,  # fmt: skip
            dtype="bfloat16",
            causal=False,
            mask="none",
            mode="fwd",
            flops=attention_flops(1, 32768, 32768, 8, 128, causal=False, mode="fwd"),
            **base,
        )
    )
    return out


if __name__ == "__main__":
    PATH.parent.mkdir(exist_ok=True)
    with PATH.open("w", encoding="utf-8") as f:
        for record in records():
            f.write(record.to_json() + "\n")
    print(f"wrote {PATH}")
