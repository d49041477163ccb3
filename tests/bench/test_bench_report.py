"""The report: tables and plots from records of two backends (a real CPU run, a fake GPU file)."""

from __future__ import annotations

import collections
import itertools
import pathlib
import struct

import jax
import pytest

from bench import __main__ as cli
from bench.records import read_records
from bench.report import (
    causal_overcount,
    latest,
    markdown_report,
    plot,
    plot_lines,
    speedups,
)
from bench.runners import default_jattn_names

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "fake_gpu_records.jsonl"
GPU = ("gpu", "FAKE GPU (test fixture)")


def _png_size(path: pathlib.Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_speedups_are_baseline_time_over_time():
    ups = speedups(list(read_records([FIXTURE])))
    for T in (512, 1024, 2048):
        for mode in ("fwd", "fwd+bwd"):
            case = (mode, "bfloat16", False, 1, T, T, 8, 8, 64, 64, False, False)
            assert ups[(GPU, "jattn:fused", case)] == pytest.approx(2.0)
            assert ups[(GPU, "jax.nn:cudnn", case)] == pytest.approx(4.0)
            assert ups[(GPU, "torch.sdpa", case)] == pytest.approx(1.25)
            assert ups[(GPU, "jax.nn:xla", case)] == pytest.approx(1.0)
    # the OOM record has no time, so no speed-up
    assert not any(key[2][4] == 32768 for key in ups)


def _table(section: str) -> tuple[list[str], list[list[str]]]:
    """The header and body cells of the first markdown table in `section`."""
    lines = list(itertools.takewhile(
        lambda line: line.startswith("|"),
        itertools.dropwhile(lambda line: not line.startswith("|"), section.splitlines()),
    ))  # fmt: skip
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return cells[0], cells[2:]  # cells[1] is the |---| rule


def test_markdown_puts_both_backends_side_by_side(tiny_run):
    records = list(read_records([tiny_run, FIXTURE]))
    md = markdown_report(records)
    cpu_section, gpu_section = md.split("### gpu: FAKE GPU (test fixture)")
    assert "### cpu: " in cpu_section and "FAKE" not in cpu_section

    header, rows = _table(cpu_section)
    ours = default_jattn_names(jax.default_backend())
    impls = [*(f"jattn:{name}" for name in sorted(ours)), "jax.nn:xla", "flax.linen"]
    assert header == ["mode", "mask", "dtype", "B", "T", "S", "N", "K", "H", *impls]
    assert [row[:9] for row in rows] == [
        [mode, mask, "float32", "1", "32", "32", "2", "2", "8"]
        for mode in ("fwd", "fwd+bwd")
        for mask in ("none", "causal")
    ]
    xla = header.index("jax.nn:xla")
    assert all(row[xla].endswith("(1.00×)") for row in rows)  # the baseline against itself
    for row in rows:
        for cell in row[9:]:
            tflops, speedup = cell.split()
            assert float(tflops) > 0 and speedup.startswith("(") and speedup.endswith("×)")

    header, rows = _table(gpu_section)
    assert header[9:] == ["jattn:fused", "jax.nn:xla", "jax.nn:cudnn", "torch.sdpa"]
    assert len(rows) == 8  # 3 lengths x 2 modes measured, one OOM, one decode case
    by_case = {(row[0], row[4]): dict(zip(header[9:], row[9:], strict=True)) for row in rows}
    first = by_case[("fwd", "512")]
    assert first["jattn:fused"].endswith("(2.00×)")
    assert first["jax.nn:cudnn"].endswith("(4.00×)")
    assert first["torch.sdpa"].endswith("(1.25×)")
    # TFLOP/s in the cell: the fixture's fused forward at T=512 took 0.5 ms
    flops = 4 * 8 * 512 * 512 * 64
    assert float(first["jattn:fused"].split()[0]) == pytest.approx(flops / 0.5e-3 / 1e12, rel=1e-2)
    assert by_case[("fwd", "32768")]["jattn:fused"] == "OOM"
    assert "`tokamax`: absent" in gpu_section


def test_plots_are_pngs_with_a_column_per_backend(tiny_run, tmp_path):
    records = list(read_records([tiny_run, FIXTURE]))
    one = plot([r for r in records if r["backend"] == "gpu"], tmp_path / "one.png")
    two = plot(records, tmp_path / "two.png")
    (w1, _), (w2, _) = _png_size(one), _png_size(two)
    assert w2 > 1.5 * w1  # a second column of subplots for the second device
    speed = plot(records, tmp_path / "speedup.png", metric="speedup")
    assert _png_size(speed)[0] > 0
    with pytest.raises(ValueError, match="metric"):
        plot(records, tmp_path / "x.png", metric="latency")


def test_report_cli_writes_markdown_and_plots(tiny_run, tmp_path, capsys):
    out_dir = tmp_path / "report"
    assert cli.main(["report", str(tiny_run), str(FIXTURE), "--out-dir", str(out_dir)]) == 0
    md = (out_dir / "report.md").read_text(encoding="utf-8")
    assert md.startswith("# jattn benchmark report")
    assert "![throughput](throughput.png)" in md
    for name in ("throughput.png", "speedup.png"):
        _png_size(out_dir / name)
    assert "### gpu: FAKE GPU (test fixture)" in capsys.readouterr().out


def test_a_rerun_replaces_the_older_record():
    records = list(read_records([FIXTURE]))
    old = next(r for r in records if r["implementation"] == "jattn:fused" and r["status"] == "ok")
    new = {**old, "median_s": old["median_s"] / 2, "timestamp": "2026-02-01T00:00:00+00:00"}
    kept = latest([*records, new])
    assert len(kept) == len(records)
    assert new in kept and old not in kept


def test_bad_lines_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(FIXTURE.read_text().splitlines()[0] + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(read_records([bad]))


def _with_extra_shapes() -> list[dict]:
    """The fixture plus fused at B=4 (one length shared with B=1, one not) and a causal T < S
    case faster than the matmul rate by the FLOP count."""
    records = list(read_records([FIXTURE]))
    fused = next(
        r
        for r in records
        if r["implementation"] == "jattn:fused" and r["status"] == "ok" and r["T"] == 512
    )
    extra = [
        {**fused, "B": 4, "T": 1024, "S": 1024},
        {**fused, "B": 4, "T": 4096, "S": 4096},
    ]
    matmul = next(
        r for r in records if r["implementation"] == "xla:matmul" and r["dtype"] == fused["dtype"]
    )
    extra.append(
        {**fused, "causal": True, "mask": "causal", "T": 640, "S": 1536,
         "tflops": 1.5 * matmul["tflops"]}
    )  # fmt: skip
    return records + extra


def test_a_plot_line_never_joins_shapes_other_than_by_length():
    records = _with_extra_shapes()
    lines = plot_lines(records)
    fused = [
        line
        for line in lines
        if line.implementation == "jattn:fused" and line.panel == ("fwd", False)
    ]
    by_batch = {line.series[1]: line.xs for line in fused if line.series[-1] is None}
    assert by_batch == {1: (512, 1024, 2048), 4: (1024, 4096)}
    for line in lines:
        members = [
            r
            for r in records
            if r.get("kind", "attention") == "attention"
            and r["status"] == "ok"
            and r["implementation"] == line.implementation
            and (r["mode"], r["causal"]) == line.panel
            and r["S"] in line.xs
        ]
        # every point of a line has the line's batch, heads, dtype and (T != S) query length
        assert {(r["B"], r["N"], r["K"], r["H"], r["dtype"]) for r in members if
                (r["T"] if r["T"] != r["S"] else None) == line.series[-1]
                and r["B"] == line.series[1]} == {
            (line.series[1], line.series[2], line.series[3], line.series[4], line.series[0])
        }  # fmt: skip


def test_each_implementation_has_one_colour_in_both_plots(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures to read their lines
    records = _with_extra_shapes()
    plot(records, tmp_path / "t.png", metric="tflops")
    plot(records, tmp_path / "s.png", metric="speedup")
    colours: dict[str, set] = collections.defaultdict(set)
    for fig in figures:
        for ax in fig.axes:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):  # not the reference line
                    colours[line.get_label().split()[0]].add(tuple(line.get_color()))
        for handle in fig.legends[0].legend_handles:
            if handle.get_label() in colours:
                colours[handle.get_label()].add(tuple(handle.get_color()))
    assert {"jattn:fused", "jax.nn:cudnn", "torch.sdpa", "jax.nn:xla"} <= set(colours)
    assert all(len(c) == 1 for c in colours.values()), colours
    assert len({next(iter(c)) for c in colours.values()}) == len(colours)
    for fig in figures:
        close(fig)


def test_shares_above_the_matmul_rate_are_explained():
    assert causal_overcount(1024, 1024) == pytest.approx(1024 / 1025)
    assert causal_overcount(640, 1536) == pytest.approx(1536 / 641)
    md = markdown_report(_with_extra_shapes())
    gpu = md.split("### gpu: FAKE GPU (test fixture)")[1]
    assert "150%" in gpu
    assert "can pass 100%" in gpu and "skip masked blocks" in gpu
    assert "counted above their visible scores here: T=640 S=1536 2.40×." in gpu
    assert "Shares above 100% here: fwd causal bfloat16 T=640 S=1536." in gpu
