"""Cold timing of decode cases (bench/cache.py): the caches emptied before every timed call."""

from __future__ import annotations

import pytest

from bench import __main__ as cli
from bench import cache
from bench.records import read_records
from bench.report import _cache_note
from bench.runners import Case
from bench.shapes import Shape
from bench.sweep import SweepConfig, cold
from bench.timing import TimingConfig, measure, pool

MiB = 2**20
FAST = ["--repeats", "2", "--min-time", "0", "--no-progress", "--no-roofline"]


def _cache_dir(root, cpu, index, level, size, shared, kind="Unified"):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    for name, text in (("level", level), ("size", size), ("shared_cpu_list", shared),
                       ("type", kind)):  # fmt: skip
        (d / name).write_text(f"{text}\n")


def test_the_last_level_cache_counts_each_instance_once(tmp_path):
    # two CPUs with their own L1 and L2 sharing one L3: the L3 once
    for cpu in (0, 1):
        _cache_dir(tmp_path, cpu, 0, 1, "48K", str(cpu), "Data")
        _cache_dir(tmp_path, cpu, 1, 1, "32K", str(cpu), "Instruction")
        _cache_dir(tmp_path, cpu, 2, 2, "2048K", str(cpu))
        _cache_dir(tmp_path, cpu, 3, 3, "491520K", "0-1")
    assert cache.last_level_cache_bytes(tmp_path) == 480 * MiB
    # two L3 instances (two CCDs): both
    two = tmp_path / "two"
    for cpu in (0, 1):
        _cache_dir(two, cpu, 0, 2, "1M", str(cpu))
        _cache_dir(two, cpu, 1, 3, "32M", str(cpu))
    assert cache.last_level_cache_bytes(two) == 64 * MiB
    # an instruction cache is never the last level; an unreadable size is skipped
    odd = tmp_path / "odd"
    _cache_dir(odd, 0, 0, 1, "32K", "0", "Data")
    _cache_dir(odd, 0, 1, 2, "64K", "0", "Instruction")
    _cache_dir(odd, 0, 2, 3, "lots", "0")
    assert cache.last_level_cache_bytes(odd) == 32 * 2**10
    assert cache.last_level_cache_bytes(tmp_path / "none") is None


def test_the_eviction_reads_more_than_twice_the_last_level_cache():
    assert cache.evict_bytes("cpu", llc=480 * MiB) > 2 * 480 * MiB
    assert cache.evict_bytes("cpu", llc=32 * MiB) == cache.MIN_EVICT_BYTES  # small or unknown
    assert cache.evict_bytes("cpu", llc=None) == cache.MIN_EVICT_BYTES
    # never more than an eighth of the free memory (nor under 64 MiB)
    assert cache.evict_bytes("cpu", llc=480 * MiB, available=4096 * MiB) == 512 * MiB
    assert cache.evict_bytes("cpu", llc=480 * MiB, available=16 * MiB) == 64 * MiB
    assert cache.evict_bytes("gpu", llc=None) == cache.ACCELERATOR_EVICT_BYTES
    assert cache.evict_bytes("cpu", llc=33 * MiB + 7) % (64 * 2**10) == 0  # whole rows


def test_an_evictor_reads_its_buffer_on_every_call():
    ev = cache.Evictor(3 * MiB + 5)
    assert ev.nbytes == 3 * MiB  # whole 64 KiB rows
    ev()  # runs and waits; reading it twice is no error


class _Counting:
    nbytes = 1234

    def __init__(self, log):
        self.log = log

    def __call__(self):
        self.log.append("evict")


def test_measure_evicts_before_every_timed_call():
    log: list[str] = []
    config = TimingConfig(repeats=3, warmup=2, min_time=1.0, evict=_Counting(log))
    timing = measure(lambda: log.append("call"), config)
    # the warm-up calls, then one eviction before each sample of one call (min_time unused)
    assert log == ["call", "call"] + ["evict", "call"] * 3
    assert (timing.number, timing.repeats, timing.evict_bytes) == (1, 3, 1234)
    assert pool([timing, timing]).evict_bytes == 1234
    warm = measure(lambda: None, TimingConfig(repeats=2, min_time=0.0))
    assert warm.evict_bytes is None and pool([warm]).evict_bytes is None


def test_decode_cases_are_cold_unless_told():
    one_row = Shape(8, 1, 4096, 32, 8, 128, allows_causal=False)
    decode = Case(one_row, "float32", False, "fwd", "decode")
    prefill = Case(Shape(1, 1024, 1024, 8, 8, 64), "float32", True, "fwd", "quick")
    assert cold(decode, "auto") and not cold(prefill, "auto")
    assert cold(decode, "cold") and cold(prefill, "cold")
    assert not cold(decode, "warm") and not cold(prefill, "warm")
    assert SweepConfig(shapes=()).cache == "auto"


@pytest.mark.parametrize(
    ("shape", "option", "expect_cold"),
    [("1,1,64,4,1,16", "auto", True), ("1,1,64,4,1,16", "warm", False),
     ("1,16,16,2,2,8", "auto", False), ("1,16,16,2,2,8", "cold", True)],
)  # fmt: skip
def test_the_cache_option_reaches_the_records(tmp_path, monkeypatch, shape, option, expect_cold):
    monkeypatch.setattr(cache, "evict_bytes", lambda backend, **kw: 4 * MiB)  # a quick one
    out = tmp_path / "r.jsonl"
    code = cli.main(["--shape", shape, "--impls", "cpu,reference", "--peers", "xla",
                     "--causal", "no", "--cache", option, *FAST, "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [r for r in read_records([out]) if r["status"] == "ok"]
    assert len(records) == 6  # three implementations, two modes
    for r in records:
        assert r["evict_bytes"] == (4 * MiB if expect_cold else None), r
        if expect_cold:
            assert r["number"] == 1


def test_the_report_says_how_decode_was_timed():
    assert "cold" in _cache_note([{"evict_bytes": 4}, {"evict_bytes": 4}])
    assert "back to back" in _cache_note([{"evict_bytes": None}, {}])  # old records: no field
    assert "some" in _cache_note([{"evict_bytes": 4}, {"evict_bytes": None}])
