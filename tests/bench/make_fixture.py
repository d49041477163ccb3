"""Writes fixtures/fake_gpu_records.jsonl: made-up records of a second backend for the report tests.

Run `python -m tests.bench.make_fixture` from the repository root after a schema change. The
numbers are invented (device kind "FAKE GPU"), chosen so speed-ups over jax.nn:xla are exact:
fused takes half the baseline's time, cudnn a quarter, torch 0.8 of it. The machine's limits
(roofline records) are invented too, with two decode cases timed at exact multiples of the time
to read K and V once at the fixture's bandwidth.
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
MATMUL_TFLOPS = {"bfloat16": 100.0, "float32": 50.0}
READ_GBPS = 500.0
DECODE = {"B": 8, "T": 1, "S": 4096, "N": 32, "K": 8, "H": 128}  # bfloat16, forward
DECODE_KV_BYTES = 2 * 8 * 4096 * 8 * 128 * 2
DECODE_FLOOR_FACTOR = {"jax.nn:xla": 4.0, "jattn:fused": 2.0}  # times the K+V read time


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
    for dtype, tflops in MATMUL_TFLOPS.items():
        flops = 2.0 * 8192**3
        median = flops / (tflops * 1e12)
        out.append(
            Record(
                implementation="xla:matmul",
                origin="machine",
                status="ok",
                reason=None,
                kind="roofline",
                dtype=dtype,
                problem="8192x8192x8192",
                repeats=3,
                number=1,
                warmup=1,
                median_s=median,
                iqr_s=0.0,
                min_s=median,
                max_s=median,
                compile_s=0.1,
                flops=flops,
                tflops=tflops,
                **base,
            )  # fmt: skip
        )
    nbytes = 512 * 2**20
    median = nbytes / (READ_GBPS * 1e9)
    out.append(
        Record(
            implementation="xla:read",
            origin="machine",
            status="ok",
            reason=None,
            kind="roofline",
            dtype="float32",
            problem="512 MiB",
            repeats=3,
            number=1,
            warmup=1,
            median_s=median,
            iqr_s=0.0,
            min_s=median,
            max_s=median,
            compile_s=0.1,
            bytes=nbytes,
            gbytes_per_s=READ_GBPS,
            **base,
        )  # fmt: skip
    )
    floor = DECODE_KV_BYTES / (READ_GBPS * 1e9)
    flops = attention_flops(8, 1, 4096, 32, 128, causal=False, mode="fwd")
    for impl, factor in DECODE_FLOOR_FACTOR.items():
        median = floor * factor
        out.append(
            Record(
                implementation=impl,
                origin="ours" if impl.startswith("jattn:") else "peer",
                status="ok",
                reason=None,
                shape_set="decode",
                **DECODE,
                dtype="bfloat16",
                causal=False,
                mask="none",
                mode="fwd",
                repeats=3,
                number=1,
                warmup=1,
                median_s=median,
                iqr_s=0.0,
                min_s=median,
                max_s=median,
                compile_s=0.5,
                flops=flops,
                tflops=flops / median / 1e12,
                **base,
            )  # fmt: skip
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
