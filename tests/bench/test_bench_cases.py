"""Cases beyond H = Hv without sinks: value heads of their own size (MLA), attention sinks, and
implementations measured with their tuning config changed (--config)."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest

import jattn
from bench import __main__ as cli
from bench.records import (
    RECORD_FIELDS,
    SCHEMA_VERSION,
    Record,
    RecordWriter,
    attention_flops,
    read_records,
    validate,
)
from bench.report import case_key, kv_bytes, latest, markdown_report, memory_bound, run_table
from bench.runners import (
    Case,
    ConfigSpec,
    ConfiguredJattnRunner,
    check_config,
    parse_config_value,
)
from bench.shapes import SHAPE_SETS, Shape, parse_shape
from bench.timing import TimingConfig
from tests.bench.test_bench_cli_errors import RUN, _fails

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
    assert attention_flops(B, T, S, N, 192, causal=False, mode="jvp", Hv=128) == 3 * fwd


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


def test_parse_shape_with_latent_values():
    decode = Shape(8, 1, 4096, 16, 1, 576, allows_causal=False, Hv=512, latent=True)
    assert parse_shape("8,1,4096,16,1,576,512,latent") == decode
    assert parse_shape("8,1,4096,16,1,576,512, Latent") == decode
    assert not parse_shape("8,1,4096,16,1,576,512").latent
    both = dataclasses.replace(decode, sinks=True)
    assert parse_shape("8,1,4096,16,1,576,512,latent,sinks") == both
    assert parse_shape("8,1,4096,16,1,576,512,sinks,latent") == both
    assert parse_shape("1,64,8,16,latent") == Shape(1, 64, 64, 8, 8, 16, latent=True)  # Hv = H
    with pytest.raises(ValueError, match="'latent' is given twice"):
        parse_shape("1,1,64,4,1,48,32,latent,latent")
    with pytest.raises(ValueError, match="'sinks' and/or 'latent'"):
        parse_shape("1,1,64,4,1,48,latent,32")  # the flags come last
    with pytest.raises(ValueError, match="Hv=64 must not exceed H=48"):
        parse_shape("1,1,64,4,1,48,64,latent")  # the values are inside the keys


def test_latent_shapes_validate_and_label():
    shape = Shape(1, 1, 64, 4, 1, 48, allows_causal=False, Hv=32, latent=True)
    assert shape.label == "B=1 T=1 S=64 N=4 K=1 H=48 Hv=32 latent"
    assert Shape(1, 8, 8, 2, 2, 4, Hv=2, sinks=True, latent=True).label.endswith(
        "Hv=2 sinks latent"
    )
    assert shape != dataclasses.replace(shape, latent=False)  # a case of its own
    with pytest.raises(ValueError, match="latent must be a bool"):
        Shape(1, 1, 64, 4, 1, 48, Hv=32, latent=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="must not exceed"):
        Shape(1, 1, 64, 4, 1, 48, Hv=49, latent=True)
    Shape(1, 1, 64, 4, 1, 48, Hv=49)  # values of their own may be larger


def test_mla_and_sinks_shape_sets():
    mla = SHAPE_SETS["mla"]
    assert mla[:2] == (Shape(1, 4096, 4096, 16, 16, 192, Hv=128), Shape(1, 4096, 4096, 16, 16, 128))
    # decode with values of their own, then latent (the values inside the keys), at each S
    assert [(s.S, s.H, s.Hv, s.K, s.allows_causal, s.latent) for s in mla if s.T == 1] == [
        (4096, 576, 512, 1, False, False),
        (4096, 576, 512, 1, False, True),
        (16384, 576, 512, 1, False, False),
        (16384, 576, 512, 1, False, True),
    ]
    latent = [s for s in mla if s.latent]
    assert latent and all(s in SHAPE_SETS["goals"] for s in latent)
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


def test_latent_records_round_trip_and_old_ones_read_as_not_latent(tmp_path):
    fields = {k: v for k, v in _fixture_ok().items() if k in RECORD_FIELDS}
    record = Record(**{**fields, "T": 1, "S": 64, "N": 4, "K": 1, "H": 48, "Hv": 32,
                       "latent": True, "schema_version": SCHEMA_VERSION})  # fmt: skip
    path = tmp_path / "latent.jsonl"
    with RecordWriter(path) as writer:
        writer.write(record)
    (r,) = read_records([path])
    assert (r["H"], r["Hv"], r["latent"], r["sinks"]) == (48, 32, True, False)
    assert r["schema_version"] == SCHEMA_VERSION == 6
    # a record from before latent was recorded (schema 4) reads as values of their own
    old = {k: v for k, v in json.loads(record.to_json()).items() if k != "latent"}
    old["schema_version"] = 4
    path.write_text(json.dumps(old) + "\n", encoding="utf-8")
    (r,) = read_records([path])
    assert r["latent"] is False
    with pytest.raises(ValueError, match="'latent' must be true or false"):
        validate({**old, "latent": "yes"})


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


def test_latent_cases_are_cases_of_their_own_read_once_in_reports():
    records = list(read_records([FIXTURE]))
    decode = next(r for r in records if r["status"] == "ok" and r["T"] == 1)
    mla = []
    for latent in (False, True):
        for impl, ms in (("jattn:fused", 0.2), ("jax.nn:xla", 0.5)):
            mla.append({**decode, "implementation": impl, "origin": "ours" if "jattn" in impl
                        else "peer", "N": 16, "K": 1, "H": 576, "Hv": 512, "latent": latent,
                        "median_s": ms / 1e3, "tflops": 1.0})  # fmt: skip
    assert len({case_key(r) for r in mla}) == 2 and len(latest(mla)) == 4
    # the bytes read once: the one array of keys, whose first Hv features are the values
    sliced, latent = mla[0], mla[2]
    assert kv_bytes(latent) == 8 * 4096 * 1 * 576 * 2
    assert kv_bytes(sliced) == 8 * 4096 * 1 * (576 + 512) * 2
    assert memory_bound(latent, 100.0, 500.0) and memory_bound(sliced, 100.0, 500.0)
    md = markdown_report([*records, *mla])
    assert "`H/Hv latent`" in md and "value_dim=Hv" in md  # the legend says what it is
    assert "B·S·K·H·itemsize in a latent case" in md
    lines = [line for line in md.splitlines() if "| 576/512" in line]
    # the cells table, then the memory-bound table: each latent case right after its twin
    assert [line.split("|")[9].strip() for line in lines] == ["576/512", "576/512 latent"] * 2
    floors = [line.split("|")[10].strip() for line in lines[2:]]  # K+V read ms at 500 GB/s
    assert floors == ["0.143", "0.0755"]
    assert "576/512 latent" in run_table(mla)


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


def test_forward_mode_runs_end_to_end_and_peers_without_it_say_so(tmp_path):
    out = tmp_path / "jvp.jsonl"
    impls = ",".join(n for n in ("flash", "cpu") if n in jattn.kernels.REGISTRY)
    code = cli.main(["--shape", "1,24,24,2,1,8", "--shape", "1,1,40,4,1,48,32,latent",
                     "--modes", "jvp", "--impls", impls, "--peers", "xla,torch,tokamax",
                     *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [r for r in read_records([out]) if r["status"] != "absent"]
    assert {r["mode"] for r in records} == {"jvp"}
    by = {(r["implementation"], r["T"], r["causal"]): r for r in records}
    for (impl, t, causal), r in by.items():
        if impl.startswith("jattn:"):
            assert r["status"] == "ok", r["reason"]
            n, s, h, hv = (2, 24, 8, 8) if t == 24 else (4, 40, 48, 32)
            assert r["flops"] == attention_flops(1, t, s, n, h, causal=causal, mode="jvp", Hv=hv)
        elif impl == "jax.nn:xla" and t == 24:
            assert r["status"] == "ok", r["reason"]
        elif impl != "jax.nn:xla":
            assert r["status"] == "unsupported" and "forward mode" in r["reason"], r
    assert {("jattn:flash", 24, True), ("jattn:flash", 1, False), ("jax.nn:xla", 24, True)} <= set(
        by
    )


def test_a_latent_case_runs_end_to_end(tmp_path):
    out = tmp_path / "latent.jsonl"
    code = cli.main(["--shape", "1,1,64,4,1,48,32,latent", "--impls", "cpu,reference",
                     "--peers", "xla", *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    by = {(r["implementation"], r["mode"]): r for r in read_records([out])}
    assert set(by) == {(impl, mode) for impl in ("jattn:cpu", "jattn:reference", "jax.nn:xla")
                       for mode in ("fwd", "fwd+bwd")}  # fmt: skip
    for (impl, mode), r in by.items():
        assert (r["H"], r["Hv"], r["latent"], r["sinks"]) == (48, 32, True, False)
        if impl == "jax.nn:xla":  # refuses Hv != H, latent or not
            assert r["status"] == "unsupported" and "Hv=32" in r["reason"]
            continue
        assert r["status"] == "ok", r["reason"]
        assert r["flops"] == attention_flops(1, 1, 64, 4, 48, causal=False, mode=mode, Hv=32)
    # the one array passed: q [1,1,4,48] and k [1,64,1,48] in float32, no value array
    assert by[("jattn:cpu", "fwd")]["xla_argument_bytes"] == 4 * (4 * 48 + 64 * 48)
    # a decode case: every ok record timed cold, one call a sample after emptying the caches
    for r in by.values():
        if r["status"] == "ok":
            assert r["evict_bytes"] >= 256 * 2**20 and r["number"] == 1, r
    assert "48/32 latent" in run_table(list(read_records([out])))


@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_a_latent_runner_computes_the_sliced_attention(impl):
    import jax
    import numpy as np

    from bench.runners import JattnRunner

    s = Shape(1, 1, 64, 4, 1, 48, allows_causal=False, Hv=32, latent=True)
    latent = JattnRunner(impl).attention(Case(s, "float32", False, "fwd", "custom"))
    sliced = dataclasses.replace(s, latent=False)
    ref = JattnRunner("reference").attention(Case(sliced, "float32", False, "fwd", "custom"))
    kq, kk, kd = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (1, 1, 4, 48), "float32")
    k = jax.random.normal(kk, (1, 64, 1, 48), "float32")
    do = jax.random.normal(kd, (1, 1, 4, 32), "float32")
    out, vjp = jax.vjp(lambda q, k: latent(q, k, None, None), q, k)
    want, want_vjp = jax.vjp(lambda q, k: ref(q, k, k[..., :32], None), q, k)
    assert out.shape == (1, 1, 4, 32) and out.dtype == "float32"
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    for got, expected in zip(vjp(do), want_vjp(do), strict=True):  # dq; dk with dv inside
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


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


def test_the_bf16_set_runs_in_float32_and_bfloat16_unless_told():
    parser = cli._parser()
    config = cli._config(parser.parse_args(["run", "--shapes", "bf16", "--impls", "cpu"]))
    assert list(config.dtypes) == ["float32", "bfloat16"]
    shapes = [s for _, s in config.shapes]
    assert any(s.T == 1 for s in shapes) and any(s.T != s.S for s in shapes)
    assert any(s.K < s.N for s in shapes)
    config = cli._config(
        parser.parse_args(["run", "--shapes", "bf16,quick", "--dtypes", "bf16", "--impls", "cpu"])
    )
    assert list(config.dtypes) == ["bfloat16"]
    config = cli._config(parser.parse_args(["run", "--shapes", "quick", "--impls", "cpu"]))
    assert list(config.dtypes) == ["float32"]


# --- --config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [("128", 128), ("0.5", 0.5), ("true", True), ("False", False), ("none", None),
     ("xla", "xla"), ("-3", -3)],
)  # fmt: skip
def test_config_values_parse(text, value):
    parsed = parse_config_value(text)
    assert parsed == value and type(parsed) is type(value)


def test_config_specs_parse_and_name_their_runner():
    spec = ConfigSpec.parse("flash:block_q=128, block_k=256")
    assert spec == ConfigSpec("flash", (("block_q", 128), ("block_k", 256)))
    assert spec.name == "jattn:flash[block_q=128,block_k=256]"
    assert ConfigSpec.parse("x:a=TRUE,b=none,c=s").name == "jattn:x[a=true,b=none,c=s]"
    for bad in ("flash", "flash:", ":block_q=1", "flash:block_q", "flash:1x=2",
                "flash:block_q=1,block_q=2"):  # fmt: skip
        with pytest.raises(ValueError):
            ConfigSpec.parse(bad)


def test_a_config_run_is_a_record_named_with_the_overrides(tmp_path):
    out = tmp_path / "config.jsonl"
    code = cli.main(["--shape", "1,32,32,2,2,8", "--impls", "flash", "--peers", "none",
                     "--config", "flash:block_q=8,block_k=16", "--modes", "fwd", *FAST,
                     "--out", str(out)])  # fmt: skip
    assert code == 0
    records = list(read_records([out]))
    names = {r["implementation"] for r in records}
    assert names == {"jattn:flash", "jattn:flash[block_q=8,block_k=16]"}
    for r in records:
        assert r["status"] == "ok" and r["origin"] == "ours", r["reason"]
    md = markdown_report(records)
    assert "jattn:flash[block_q=8,block_k=16]" in md  # a column of its own


def test_a_config_run_uses_the_default_with_the_fields_replaced(monkeypatch):
    import jattn
    from jattn.kernels.flash import FlashConfig

    seen = []
    real = jattn.attention

    def spy(*args, **kwargs):
        seen.append(kwargs.get("config"))
        return real(*args, **kwargs)

    monkeypatch.setattr(jattn, "attention", spy)
    shape = Shape(1, 64, 64, 2, 2, 8, sinks=True)
    runner = ConfiguredJattnRunner(ConfigSpec("flash", (("block_k", 16),)))
    for causal in (False, True):
        case = Case(shape, "float32", causal, "fwd", "custom")
        m = runner.run(case, TimingConfig(repeats=1, min_time=0.0), seed=0)
        assert m.timing.median_s > 0
    # the heuristic default for each case (taller query blocks under a causal mask on a CPU),
    # with block_k replaced
    assert seen[0] == dataclasses.replace(seen[0], block_k=16) and isinstance(seen[0], FlashConfig)
    assert {c.block_k for c in seen} == {16}


def test_check_config_takes_any_config_dataclass(monkeypatch):
    from jattn import kernels

    @dataclasses.dataclass(frozen=True)
    class AnyConfig:
        threads: int | None = None
        mode: str = "auto"
        scale: float = 1.0
        prefetch: bool = True

        @classmethod
        def default_for(cls, plan, backend):
            return cls()

    fake = dataclasses.replace(kernels.REGISTRY["fused"], name="tuned", config_type=AnyConfig)
    monkeypatch.setattr(kernels, "REGISTRY", {**kernels.REGISTRY, "tuned": fake})
    spec = ConfigSpec.parse("tuned:threads=none,mode=eager,scale=0.5,prefetch=false")
    check_config(spec)
    assert dataclasses.replace(AnyConfig(), **dict(spec.fields)) == AnyConfig(
        None, "eager", 0.5, False
    )
    with pytest.raises(ValueError, match="no field 'depth'"):
        check_config(ConfigSpec.parse("tuned:depth=2"))


@pytest.mark.parametrize(
    ("value", "named"),
    [
        ("flash:block_z=64", ("block_z", "block_q", "FlashConfig")),
        ("fused:block_q=64", ("'fused'", "no tuning config", "flash")),
        ("nosuch:block_q=64", ("nosuch", "known")),
        ("flash:block_q=0", ("block_q", "positive")),
        ("flash", ("IMPL:FIELD=VALUE",)),
        ("flash:block_q", ("FIELD=VALUE",)),
    ],
)
def test_bad_configs_are_refused_before_measuring(tmp_path, capsys, value, named):
    out = tmp_path / "r.jsonl"
    _fails([*RUN, "--config", value, "--out", str(out)], capsys, "--config", *named)
    assert not out.exists()
