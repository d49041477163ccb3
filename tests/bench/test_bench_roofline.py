"""The machine's limits: measured, recorded, and every result shown against them in the report."""

from __future__ import annotations

import dataclasses
import itertools
import json
import pathlib

import pytest

from bench.records import read_records, validate
from bench.report import kv_bytes, limits, markdown_report, memory_bound
from bench.roofline import RooflineConfig, default_dtypes, describe, matmul_limit, read_limit
from bench.shapes import SHAPE_SETS, Shape
from bench.sweep import SweepConfig, cases, current_platform, roofline_records
from bench.timing import TimingConfig

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fake_gpu_records.jsonl"
GPU = ("gpu", "FAKE GPU (test fixture)")
FAST = TimingConfig(repeats=2, warmup=1, min_time=0.0)


def _table_after(text: str, marker: str) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the first markdown table after the line holding `marker`."""
    lines = text[text.index(marker) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    return cells[0], cells[2:]


def test_matmul_and_read_limits_are_rates_of_what_they_ran():
    mm = matmul_limit(256, "float32", FAST)
    assert mm.flops == 2 * 256**3 and mm.problem == "256x256x256"
    assert mm.tflops == pytest.approx(mm.flops / mm.timing.min_s / 1e12)
    assert mm.tflops > 0 and mm.gbytes_per_s is None
    rd = read_limit(8 * 2**20, FAST)
    assert rd.bytes == 8 * 2**20 and rd.problem == "8 MiB"
    assert rd.gbytes_per_s == pytest.approx(rd.bytes / rd.timing.min_s / 1e9)
    assert "float32 matmul" in describe([mm, rd]) and "memory read" in describe([mm, rd])


def test_limits_become_valid_records_and_failures_are_recorded():
    # an unknown dtype cannot be made at all: it must become an error record, not raise
    config = RooflineConfig(dtypes=("float32", "no-such-dtype"), matmul_n=128, read_bytes=2**20)
    records, found = roofline_records(config, current_platform(), "t")
    by = {(r.implementation, r.dtype): r for r in records}
    assert set(by) == {
        ("xla:matmul", "float32"),
        ("xla:matmul", "no-such-dtype"),
        ("xla:read", "float32"),
    }
    assert by[("xla:matmul", "float32")].status == "ok"
    assert by[("xla:matmul", "no-such-dtype")].status == "error"
    assert by[("xla:matmul", "no-such-dtype")].reason
    assert len(found) == 2
    for r in records:
        assert r.kind == "roofline" and r.origin == "machine"
        validate(json.loads(r.to_json()))
    with pytest.raises(ValueError, match="matmul_n"):
        RooflineConfig(matmul_n=0)


def test_low_precision_matmul_rate_accumulates_in_float32():
    """The bfloat16 limit is what attention kernels do with bfloat16 inputs: a float32
    accumulation and result (`preferred_element_type`), not a bfloat16 product."""
    import jax
    import jax.numpy as jnp

    from bench.roofline import matmul_fn

    a = jnp.ones((8, 8), jnp.bfloat16)
    assert matmul_fn("bfloat16")(a, a).dtype == jnp.float32
    assert "xf32>" in jax.jit(matmul_fn("bfloat16")).lower(a, a).as_text().split("->")[-1]
    assert matmul_fn("float32")(a.astype(jnp.float32), a.astype(jnp.float32)).dtype == jnp.float32
    mm = matmul_limit(64, "bfloat16", FAST)
    assert mm.dtype == "bfloat16" and mm.problem == "64x64x64, float32 accumulation"
    assert mm.flops == 2 * 64**3 and mm.tflops > 0
    # a bfloat16 sweep measures the bfloat16 rate in the same run, on a CPU too
    config = RooflineConfig(matmul_n=64, read_bytes=2**20, timing=FAST)
    records, _ = roofline_records(config, current_platform(), "t", ["bfloat16"])
    rates = {r.dtype: r for r in records if r.implementation == "xla:matmul"}
    assert set(rates) == {"float32", "bfloat16"}
    assert rates["bfloat16"].status == "ok" and "float32 accumulation" in rates["bfloat16"].problem


def test_roofline_dtypes_cover_the_sweep():
    assert default_dtypes("cpu", ["float32"]) == ["float32"]
    assert default_dtypes("gpu", ["float32"]) == ["float32", "bfloat16"]
    assert default_dtypes("cpu", ["bfloat16", "float32"]) == ["float32", "bfloat16"]


def test_report_gives_shares_of_the_matmul_rate_and_the_kv_read_floor():
    records = list(read_records([FIXTURE]))
    found = limits(records)
    mm = found[(GPU, "xla:matmul:bfloat16")]
    read = found[(GPU, "xla:read")]
    md = markdown_report(records)
    assert "memory read 500.0 GB/s (512 MiB)" in md
    assert "bfloat16 matmul 100 TFLOP/s (8192x8192x8192)" in md

    header, rows = _table_after(md, "share of the matmul rate")
    impls = header[9:]
    ok = {
        (r["mode"], r["T"], r["implementation"]): r
        for r in records
        if r.get("kind") == "attention" and r["status"] == "ok"
    }
    assert rows and all(row[4] != "1" for row in rows)  # no decode row among compute-bound ones
    for row in rows:
        for impl, cell in zip(impls, row[9:], strict=True):
            r = ok[(row[0], int(row[4]), impl)]
            assert float(cell.rstrip("%")) == pytest.approx(
                100 * r["tflops"] / mm["tflops"], rel=0.05
            )

    header, rows = _table_after(md, "Memory-bound cases")
    decode = ["fwd", "none", "bfloat16", "8", "1", "4096", "32", "8", "128"]
    assert [row[:9] for row in rows] == [decode]
    floor_ms = 2 * 8 * 4096 * 8 * 128 * 2 / (read["gbytes_per_s"] * 1e9) * 1e3
    assert float(rows[0][9]) == pytest.approx(floor_ms, rel=1e-2)
    cells = dict(zip(header[10:], rows[0][10:], strict=True))
    assert cells["jattn:fused"].endswith("(2.00×)")  # the fixture times it at 2x the floor
    assert cells["jax.nn:xla"].endswith("(4.00×)")
    assert cells["torch.sdpa"] == ""


def test_memory_bound_follows_the_machine_balance():
    decode = dict(B=8, T=1, S=4096, N=32, K=8, H=128, dtype="float32")
    square = dict(B=1, T=2048, S=2048, N=8, K=8, H=64, dtype="float32")
    assert kv_bytes(decode) == 2 * 8 * 4096 * 8 * 128 * 4
    # a CPU: 0.1 TFLOP/s, 20 GB/s -> balance 5 FLOP/byte; decode does 2, T=2048 about 1000
    assert memory_bound(decode, 0.1, 20.0)
    assert not memory_bound(square, 0.1, 20.0)
    # a machine with absurdly fast memory: nothing is memory-bound
    assert not memory_bound(decode, 0.1, 1e6)


def test_records_without_limits_still_report():
    records = [r for r in read_records([FIXTURE]) if r.get("kind") != "roofline"]
    md = markdown_report(records)
    assert "No machine limits in these records" in md
    assert "share of the matmul rate" not in md


def test_schema_1_records_read_as_attention_records(tmp_path):
    line = next(r for r in read_records([FIXTURE]) if r["status"] == "ok" and r["T"] == 512)
    old = {k: v for k, v in line.items() if k not in ("kind", "problem", "bytes", "gbytes_per_s")}
    old["schema_version"] = 1
    path = tmp_path / "v1.jsonl"
    path.write_text(json.dumps(old) + "\n", encoding="utf-8")
    (r,) = read_records([path])
    assert "1 | 512" in markdown_report([r]).replace("  ", " ")


def test_issue_shape_sets():
    assert SHAPE_SETS["gqa"] == (Shape(2, 1024, 1024, 16, 4, 64),)
    assert SHAPE_SETS["cross"] == (Shape(2, 640, 1536, 6, 2, 96),)
    goals = SHAPE_SETS["goals"]
    assert goals[:3] == SHAPE_SETS["quick"]
    assert set(SHAPE_SETS["gqa"]) | set(SHAPE_SETS["cross"]) <= set(goals)
    decode = [s for s in goals if s.T == 1]
    assert [(s.B, s.S, s.N, s.K, s.H, s.Hv, s.latent) for s in decode] == [
        (8, 4096, 32, 8, 128, 128, False),
        (8, 16384, 32, 8, 128, 128, False),
        (8, 4096, 16, 1, 576, 512, False),  # MLA decode, absorbed: one latent KV head
        (8, 4096, 16, 1, 576, 512, True),  # the values inside the keys (value_dim=512)
        (8, 16384, 16, 1, 576, 512, False),
        (8, 16384, 16, 1, 576, 512, True),
    ]
    assert Shape(1, 4096, 4096, 16, 16, 192, Hv=128) in goals  # MLA prefill
    # the quick T = 2048 shape with and without sinks: what sinks cost, read off one run
    plain = Shape(1, 2048, 2048, 8, 8, 64)
    assert plain in goals and dataclasses.replace(plain, sinks=True) in goals
    todo = cases(SweepConfig(shapes=[("goals", s) for s in goals], roofline=None))
    # 7 shapes x 2 masks x 2 modes, decode (6 shapes) without a causal variant
    assert len(todo) == 7 * 2 * 2 + 6 * 2
