"""Cases beyond H = Hv without sinks: value heads of their own size (MLA) and attention sinks."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

from bench import __main__ as cli
from bench.records import attention_flops, read_records
from bench.report import case_key, kv_bytes, latest, markdown_report, memory_bound, run_table
from bench.shapes import SHAPE_SETS, Shape, parse_shape

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fake_gpu_records.jsonl"
FAST = ["--repeats", "1", "--min-time", "0", "--no-progress", "--no-roofline"]


# --- shapes and FLOPs ------------------------------------------------------------------------


def test_flops_count_the_value_heads():
    B, T, S, N = 2, 64, 128, 4
    fwd = attention_flops(B, T, S, N, 192, causal=False, mode="fwd", Hv=128)
    assert fwd == 2 * B * N * T * S * (192 + 128)
    assert attention_flops(B, T, S, N, 64, causal=False, mode="fwd", Hv=64) == (
        4 * B * N * T * S * 64
    )
    assert attention_flops(B, T, S, N, 64, causal=False, mode="fwd") == 4 * B * N * T * S * 64
    assert attention_flops(B, T, S, N, 192, causal=True, mode="fwd", Hv=128) == fwd / 2
    assert attention_flops(B, T, S, N, 192, causal=False, mode="fwd+bwd", Hv=128) == 3.5 * fwd


def test_parse_shape_with_value_heads_and_sinks():
    assert parse_shape("8,1,4096,16,1,576,512") == Shape(
        8, 1, 4096, 16, 1, 576, allows_causal=False, Hv=512
    )
    assert parse_shape("1,64,64,4,4,24,24") == parse_shape("1,64,64,4,4,24")  # Hv = H
    assert parse_shape("1,64,64,4,4,24").Hv == 24
    assert parse_shape("1,64,8,16,sinks") == Shape(1, 64, 64, 8, 8, 16, sinks=True)
    assert parse_shape("1,64,64,4,2,24,16,sinks") == Shape(1, 64, 64, 4, 2, 24, Hv=16, sinks=True)
    with pytest.raises(ValueError, match="6 or 7 numbers"):
        parse_shape("1,2,3,4,5,6,7,8")
    with pytest.raises(ValueError, match="Hv"):
        parse_shape("1,8,8,2,2,4,0")
    labels = (Shape(1, 8, 8, 2, 2, 4).label, Shape(1, 8, 8, 2, 2, 4, Hv=2, sinks=True).label)
    assert labels == ("B=1 T=8 S=8 N=2 K=2 H=4", "B=1 T=8 S=8 N=2 K=2 H=4 Hv=2 sinks")


def test_mla_and_sinks_shape_sets():
    mla = SHAPE_SETS["mla"]
    assert mla[:2] == (Shape(1, 4096, 4096, 16, 16, 192, Hv=128), Shape(1, 4096, 4096, 16, 16, 128))
    assert [(s.S, s.H, s.Hv, s.K, s.allows_causal) for s in mla if s.T == 1] == [
        (4096, 576, 512, 1, False),
        (16384, 576, 512, 1, False),
    ]
    assert {s.H for s in mla if s.T == 2048} == {80, 96, 112}
    sinks = SHAPE_SETS["sinks"]
    with_sinks = [s for s in sinks if s.sinks]
    assert with_sinks and all(dataclasses.replace(s, sinks=False) in sinks for s in with_sinks)


# --- records and reports -------------------------------------------------------------------


def _fixture_ok() -> dict:
    return next(r for r in read_records([FIXTURE]) if r["status"] == "ok" and r.get("T") == 512)


def test_records_without_value_heads_or_sinks_still_read(tmp_path):
    new = _fixture_ok()
    assert (new["Hv"], new["sinks"]) == (64, False)
    old = {k: v for k, v in new.items() if k not in ("Hv", "sinks")}
    old["schema_version"] = 2
    path = tmp_path / "v2.jsonl"
    path.write_text(json.dumps(old) + "\n", encoding="utf-8")
    (r,) = read_records([path])
    assert (r["Hv"], r["sinks"]) == (r["H"], False)
    assert case_key(r) == case_key(new)  # the same case: a newer record replaces it
    assert len(latest([r, {**new, "timestamp": "2027-01-01T00:00:00+00:00"}])) == 1
    assert "| 64 |" in markdown_report([r]).replace("  ", " ")
    # a dict made without reading a file (no defaults filled in) reports too
    assert case_key(old) == case_key(new)
    assert "8  8  64  " in run_table([old])


def test_value_heads_and_sinks_are_cases_of_their_own_in_reports():
    base = _fixture_ok()
    mla = {**base, "H": 192, "Hv": 128}
    sinks = {**base, "sinks": True}
    keys = {case_key(r) for r in (base, mla, sinks)}
    assert len(keys) == 3
    assert len(latest([base, mla, sinks])) == 3
    md = markdown_report([base, mla, sinks])
    assert "| 192/128 " in md and "| none+sinks " in md
    table = run_table([base, mla, sinks])
    assert "192/128" in table and "none+sinks" in table
    # bytes and balance count the value heads at their own size
    decode = dict(B=8, T=1, S=4096, N=16, K=1, H=576, Hv=512, dtype="bfloat16")
    assert kv_bytes(decode) == 8 * 4096 * 1 * (576 + 512) * 2
    assert memory_bound(decode, 1.0, 20.0)


# --- runs ------------------------------------------------------------------------------------


def test_value_heads_of_their_own_size_run_end_to_end(tmp_path):
    out = tmp_path / "hv.jsonl"
    code = cli.main(["--shape", "1,16,16,2,1,12,8", "--impls", "fused,flash", "--peers",
                     "xla,flax", "--causal", "no", *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    by = {(r["implementation"], r["mode"]): r for r in read_records([out])}
    for impl in ("jattn:fused", "jattn:flash"):
        for mode in ("fwd", "fwd+bwd"):
            r = by[(impl, mode)]
            assert r["status"] == "ok", r["reason"]
            assert (r["H"], r["Hv"], r["sinks"]) == (12, 8, False)
            assert r["flops"] == attention_flops(1, 16, 16, 2, 12, causal=False, mode=mode, Hv=8)
    # q [1,16,2,12], k [1,16,1,12], v [1,16,1,8] in float32
    assert by[("jattn:fused", "fwd")]["xla_argument_bytes"] == 4 * 16 * (2 * 12 + 12 + 8)
    xla = by[("jax.nn:xla", "fwd")]
    assert xla["status"] == "unsupported" and "Hv=8" in xla["reason"]
    assert by[("flax.linen", "fwd")]["status"] == "unsupported"  # K < N, as before


def test_a_sinks_case_is_unsupported_by_the_peers_and_measured_by_jattn(tmp_path):
    out = tmp_path / "sinks.jsonl"
    code = cli.main(["--shape", "1,16,16,2,2,8,sinks", "--impls", "fused,flash", "--peers",
                     "xla,flax,torch,tokamax", *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    records = list(read_records([out]))
    measured = [r for r in records if r["status"] != "absent"]
    assert measured and all(r["sinks"] is True for r in measured)
    for r in measured:
        if r["origin"] == "ours":
            assert r["status"] == "ok", r["reason"]
        else:
            assert r["status"] == "unsupported", (r["implementation"], r["reason"])
            assert "sinks" in r["reason"]
    peers = {r["implementation"] for r in measured if r["origin"] == "peer"}
    assert {"jax.nn:xla", "flax.linen"} <= peers
    assert "none+sinks" in run_table(records)


def test_bfloat16_runs_with_the_xla_and_torch_peers(tmp_path):
    out = tmp_path / "bf16.jsonl"
    code = cli.main(["--shape", "1,16,16,2,2,8", "--dtypes", "bfloat16", "--impls", "fused",
                     "--peers", "xla,torch", "--causal", "yes", *FAST,
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [r for r in read_records([out]) if r["status"] != "absent"]
    assert {r["implementation"] for r in records} >= {"jattn:fused", "jax.nn:xla"}
    for r in records:
        assert r["dtype"] == "bfloat16" and r["status"] == "ok", r["reason"]
