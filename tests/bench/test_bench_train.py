"""`python -m bench train`: FLOP counts, the twin models, records and the report (tiny sizes)."""

from __future__ import annotations

import json

import pytest

from bench import __main__ as cli
from bench.records import read_records, validate
from bench.report import markdown_report, train_key, train_section
from bench.train import (
    TRAIN_SETS,
    TrainShape,
    build_jax_model,
    count_params,
    matmul_params,
    train_flops,
)

LM = TrainShape("DecoderLM", 8, 2, 2, 16, 5, 3, 4)
SEQ2SEQ = TrainShape("Transformer", 8, 2, 2, 16, 5, 3, 4)
TINY_CASE = "DecoderLM,16,1,2,32,7,2,8"


def test_decoder_lm_flops_by_hand():
    # per layer q, k, v, out 4·8·8 = 256, up and down 2·8·16 = 256; output 8·5 = 40
    assert matmul_params(LM) == 2 * 512 + 40 == 1064
    # dense: 6 · 1064 weights · 12 tokens; attention per layer, causal, fwd+bwd:
    # 4·B·N·T·T·H / 2 · 3.5 = 4·3·2·4·4·4 / 2 · 3.5 = 2688
    assert train_flops(LM) == 6 * 1064 * 12 + 2 * 2688


def test_transformer_flops_by_hand():
    # encoder layers 512 each; decoder layers 512 + cross q, k, v, out 256; output 40
    assert matmul_params(SEQ2SEQ) == 2 * 512 + 2 * 768 + 40
    enc = 6 * 2 * 512 * 12  # encoder weights see the 12 source tokens
    cross_kv = 6 * 2 * 128 * 12  # cross keys and values: memory tokens
    dec = 6 * (2 * (512 + 128) + 40) * 12  # the rest of the decoder: target tokens
    full = 4 * 3 * 2 * 4 * 4 * 4 * 3.5  # non-causal 5376 per layer (encoder and cross)
    assert train_flops(SEQ2SEQ) == enc + cross_kv + dec + 2 * (full + full / 2 + full)


@pytest.mark.parametrize("shape", [LM, SEQ2SEQ], ids=["DecoderLM", "Transformer"])
def test_torch_twin_has_the_jattn_models_parameters(shape):
    import jax

    torch = pytest.importorskip("torch")  # the bench extra
    from flax import nnx

    from bench import torch_models
    from jattn.nn.sharding import param_path

    model = build_jax_model(shape, None)
    jax_params = nnx.state(model, nnx.Param)
    cls = getattr(torch_models, shape.model)
    twin = cls(shape.vocab, shape.d_model, shape.layers, shape.heads, shape.d_ff)
    assert count_params(jax_params) == sum(p.numel() for p in twin.parameters())
    # matmul_params counts the 2-D kernels of the jattn model (embeddings are look-ups)
    flat, _ = jax.tree_util.tree_flatten_with_path(jax_params)
    leaves = [x for path, x in flat if param_path(path).endswith("/kernel") and x.ndim == 2]
    assert sum(int(x.size) for x in leaves) == matmul_params(shape)
    with torch.no_grad():
        args = [torch.zeros(2, 3, dtype=torch.long)] * (1 if shape.model == "DecoderLM" else 2)
        assert twin(*args).shape == (2, 3, shape.vocab)


def test_reference_set_is_the_issues():
    lm = [s for s in TRAIN_SETS["reference"]]
    assert {(s.B, s.T) for s in lm} == {(16, 256), (4, 1024), (1, 4096)}
    assert {(s.d_model, s.layers, s.heads, s.d_ff, s.vocab) for s in lm} == {(384, 6, 6, 1536, 96)}


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "train.jsonl"
    code = cli.main(
        ["train", "--case", TINY_CASE, "--impls", "cpu,flash", "--peers", "xla,torch",
         "--rounds", "2", "--repeats", "1", "--no-roofline", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    return out


def test_cli_writes_one_train_record_per_runner(train_run):
    pytest.importorskip("torch")  # the bench extra: without it torch's record is "absent"
    records = list(read_records([train_run]))
    assert {r["implementation"] for r in records} == {
        "jattn:cpu", "jattn:flash", "jax.nn:xla", "torch:eager",
    }  # fmt: skip
    shape = TrainShape.parse(TINY_CASE)
    for r in records:
        assert r["kind"] == "train" and r["status"] == "ok", r
        assert r["schema_version"] == 6 and r["evict_bytes"] is None  # steps back to back
        assert r["repeats"] == 2  # one sample in each of two rounds, pooled
        assert r["flops"] == train_flops(shape)
        assert r["matmul_params"] == matmul_params(shape)
        assert r["tokens_per_s"] == pytest.approx(shape.tokens / r["median_s"])
        assert r["tflops"] == pytest.approx(r["flops"] / r["median_s"] / 1e12)
        assert r["min_s"] <= r["median_s"] <= r["max_s"]
    # the twins have the same parameters
    assert len({r["params"] for r in records}) == 1


def test_report_has_speedups_over_torch_and_matmul_shares(train_run):
    pytest.importorskip("torch")
    records = list(read_records([train_run]))
    section = train_section(records)
    assert "### Training step" in section
    torch_r = next(r for r in records if r["implementation"] == "torch:eager")
    cpu_r = next(r for r in records if r["implementation"] == "jattn:cpu")
    ratio = torch_r["median_s"] / cpu_r["median_s"]
    assert f"{cpu_r['tokens_per_s']:.0f} ({ratio:.2f}×)" in section
    assert f"{torch_r['tokens_per_s']:.0f} (1.00×)" in section
    assert "%" not in section.split("step ms:")[1]  # no matmul rate in these records
    # with the machine's matmul rate in the records, each time gets its share of that rate
    rate = dict(records[0], kind="roofline", origin="machine", implementation="xla:matmul",
                problem="2048x2048x2048", tflops=cpu_r["tflops"] * 4, dtype="float32",
                median_s=1.0)  # fmt: skip
    validate(rate)
    md = markdown_report([*records, rate])
    assert "(25%)" in md.split("step ms:")[1]
    assert train_key(cpu_r) == ("DecoderLM", 16, 1, 2, 32, 7, 2, 8)


def test_report_cli_takes_a_train_only_file(train_run, tmp_path):
    assert cli.main(["report", str(train_run), "--out-dir", str(tmp_path)]) == 0
    assert (tmp_path / "train.png").read_bytes()[:4] == b"\x89PNG"
    assert "Training step" in (tmp_path / "report.md").read_text()


def test_torch_compile_failure_is_a_skipped_record(monkeypatch, tmp_path):
    torch = pytest.importorskip("torch")

    def broken(fn, *a, **k):
        def call(*args):
            raise RuntimeError("no C++ compiler found")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "t.jsonl"
    code = cli.main(["train", "--case", TINY_CASE, "--impls", "none", "--peers", "torch-compile",
                     "--repeats", "1", "--no-roofline", "--out", str(out)])  # fmt: skip
    assert code == 1  # nothing measured
    (record,) = read_records([out])
    assert record["status"] == "skipped"
    assert "torch.compile failed here" in record["reason"]
    assert "no C++ compiler found" in record["reason"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--case", "DecoderLM,16,1,2"], "--case"),
        (["--case", "Decoder,16,1,2,32,7,2,8"], "TrainShape.model"),
        (["--case", "DecoderLM,16,1,3,32,7,2,8"], "multiple of heads"),
        (["--case", "DecoderLM,0,1,2,32,7,2,8"], "d_model"),
        (["--sets", "huge"], "--sets"),
        (["--impls", "pallas"], "--impls"),
        (["--peers", "jax"], "--peers"),
        (["--rounds", "0"], "--rounds"),
        (["--impls", "none", "--peers", "none"], "nothing"),
    ],
)
def test_bad_options_are_named(argv, message, capsys, tmp_path):
    assert cli.main(["train", *argv, "--out", str(tmp_path / "x.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_an_ok_train_record_needs_its_throughput(train_run):
    records = [json.loads(line) for line in train_run.read_text().splitlines()]
    record = next(r for r in records if r["status"] == "ok")
    del record["tokens_per_s"]
    with pytest.raises(ValueError, match="tokens_per_s"):
        validate(record)


def test_host_memory_note_names_the_tunables_when_unset(monkeypatch):
    from bench import train
    from bench.records import versions

    monkeypatch.setattr(train.sys, "platform", "linux")
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    note = train.host_memory_note()
    assert note is not None and f"GLIBC_TUNABLES={train.HOST_MEMORY_TUNABLES}" in note
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=1")
    assert train.host_memory_note() is None
    monkeypatch.setattr(train.sys, "platform", "darwin")
    monkeypatch.delenv("GLIBC_TUNABLES")
    assert train.host_memory_note() is None
    assert "glibc_tunables" in versions()
