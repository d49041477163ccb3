"""Reports from records: text and markdown tables, and PNG plots across backends.

Records from several files (one per machine: a CPU run, a GPU run, a TPU run) are grouped by
device, and every device gets its own table and its own column of plots.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

from bench.records import record_kind
from bench.roofline import rate

BASELINE = "jax.nn:xla"

Rec = dict[str, Any]
CaseKey = tuple[Any, ...]  # (mode, dtype, causal, B, T, S, N, K, H, Hv, sinks, latent)


def value_heads(r: Rec) -> int:
    """The record's value head size: Hv, or H in records from before Hv was recorded."""
    hv = r.get("Hv")
    return r["H"] if hv is None else hv


def has_sinks(r: Rec) -> bool:
    """Whether the case passed attention sinks (never in records from before they were)."""
    return bool(r.get("sinks"))


def is_latent(r: Rec) -> bool:
    """Whether the values were the keys' first Hv features, one array (never in records from
    before that was recorded)."""
    return bool(r.get("latent"))


def case_key(r: Rec) -> CaseKey:
    return (
        r["mode"], r["dtype"], r["causal"], r["B"], r["T"], r["S"], r["N"], r["K"], r["H"],
        value_heads(r), has_sinks(r), is_latent(r),
    )  # fmt: skip


def heads_label(H: int, Hv: int, latent: bool = False) -> str:
    """The H cell of a table: '64', or '192/128' where the value heads differ, and
    '576/512 latent' where the values are the keys' first Hv features (one array)."""
    if latent:
        return f"{H}/{Hv} latent"
    return str(H) if Hv == H else f"{H}/{Hv}"


def mask_label(causal: bool, sinks: bool) -> str:
    """The mask cell of a table: 'causal' or 'none', with '+sinks' where sinks were passed."""
    return ("causal" if causal else "none") + ("+sinks" if sinks else "")


def _lead(key: CaseKey) -> list[str]:
    """The first nine cells of a table row: mode, mask, dtype, B, T, S, N, K, H."""
    mode, dtype, causal, B, T, S, N, K, H, Hv, sinks, latent = key
    return [
        mode, mask_label(causal, sinks), dtype, *map(str, (B, T, S, N, K)),
        heads_label(H, Hv, latent),
    ]  # fmt: skip


def device_key(r: Rec) -> tuple[str, str]:
    """(backend, device): JAX names every CPU just "cpu", so a CPU is told by its model."""
    if r["backend"] == "cpu":
        return ("cpu", f"{r.get('host_cpu', '?')}, {r.get('host_cores', '?')} cores")
    return (r["backend"], r["device_kind"])


def device_label(device: tuple[str, str]) -> str:
    backend, kind = device
    return f"{backend}: {kind}"


# --- selection -----------------------------------------------------------------------------


def attention_only(records: Iterable[Rec]) -> list[Rec]:
    """The attention records (not the machine's limits)."""
    return [r for r in records if record_kind(r) == "attention"]


def limits(records: Iterable[Rec]) -> dict[tuple[str, str], Rec]:
    """{(device, "xla:matmul:<dtype>" or "xla:read"): the newest ok roofline record}."""
    best: dict[tuple[Any, ...], Rec] = {}
    for r in records:
        if record_kind(r) != "roofline" or r["status"] != "ok":
            continue
        what = r["implementation"] + (f":{r['dtype']}" if r.get("tflops") is not None else "")
        key = (device_key(r), what)
        if key not in best or r.get("timestamp", "") >= best[key].get("timestamp", ""):
            best[key] = r
    return best  # type: ignore[return-value]


def latest(records: Iterable[Rec]) -> list[Rec]:
    """One record per (device, implementation, case): the newest, so a rerun replaces."""
    best: dict[tuple[Any, ...], Rec] = {}
    for r in records:
        case = None if r["status"] == "absent" else case_key(r)
        key = (device_key(r), r["implementation"], case)
        if key not in best or r.get("timestamp", "") >= best[key].get("timestamp", ""):
            best[key] = r
    return list(best.values())


def speedups(records: Iterable[Rec], baseline: str = BASELINE) -> dict[tuple[Any, ...], float]:
    """{(device, implementation, case): baseline median / implementation median} for every
    measured record whose device and case also have a measured baseline record."""
    ok = [r for r in records if r["status"] == "ok"]
    base = {
        (device_key(r), case_key(r)): r["median_s"] for r in ok if r["implementation"] == baseline
    }
    out = {}
    for r in ok:
        ref = base.get((device_key(r), case_key(r)))
        if ref is not None and r["median_s"] > 0:
            out[(device_key(r), r["implementation"], case_key(r))] = ref / r["median_s"]
    return out


def _impl_order(records: Iterable[Rec], baseline: str = BASELINE) -> list[str]:
    """Ours first, then the baseline, then the other peers: one stable order everywhere."""
    names = {
        (r["origin"] != "ours", r["implementation"] != baseline, r["implementation"])
        for r in records
    }
    return [name for *_, name in sorted(names)]


# --- tables --------------------------------------------------------------------------------


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) for c, w in zip(cells, widths, strict=True)]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded).rstrip()

    rule = (
        "|" + "|".join("-" * (w + 2) for w in widths) + "|"
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _sig3(value: float) -> str:
    """Three significant digits, trailing zeros kept so a column reads evenly: 0.0280, 1.07."""
    return f"{value:#.3g}".rstrip(".")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def limits_line(records: Sequence[Any]) -> str:
    """'machine limits: float32 matmul 132 GFLOP/s (2048x2048x2048); memory read ...' from the
    roofline records among ``records`` (one that failed gives its reason); '' when none."""
    machine = []
    for rec in records:
        r = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else rec
        if record_kind(r) == "attention":
            continue
        if r["status"] != "ok":
            machine.append(f"{r['implementation']} {r['dtype']}: {r['reason']}")
        elif r.get("tflops") is not None:
            machine.append(f"{r['dtype']} matmul {rate(r['tflops'])} ({r['problem']})")
        else:
            machine.append(f"memory read {r['gbytes_per_s']:.1f} GB/s ({r['problem']})")
    return "machine limits: " + "; ".join(machine) if machine else ""


def run_table(records: Sequence[Any], *, limits: bool = True) -> str:
    """The table printed after a sweep: one row per record, in the order they were made;
    ``limits``: led by the line of the machine's limits (`python -m bench` prints that line
    when it measures them, and passes False)."""
    headers = [
        "implementation", "mode", "mask", "dtype", "B", "T", "S", "N", "K", "H",
        "median ms", "IQR ms", "TFLOP/s", "compile s", "XLA MiB", "status",
    ]  # fmt: skip
    rows = []
    absent = []
    for rec in records:
        r = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else rec
        if record_kind(r) != "attention":
            continue
        if r["status"] == "absent":
            absent.append(f"  {r['implementation']}: {r['reason']}")
            continue
        rows.append([
            r["implementation"], r["mode"], mask_label(r["causal"], has_sinks(r)), r["dtype"],
            *(str(r[d]) for d in ("B", "T", "S", "N", "K")),
            heads_label(r["H"], value_heads(r), is_latent(r)),
            _ms(r["median_s"]),
            _ms(r["iqr_s"]),
            _num(r["tflops"], ".3f"),
            _num(r["compile_s"], ".2f"),
            _mib(r["xla_total_bytes"]),
            r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}"[:60],
        ])  # fmt: skip
    text = format_table(headers, rows, markdown=False)
    machine = limits_line(records)
    if machine and limits:
        text = machine + "\n\n" + text
    if absent:
        text += "\n\nnot measured:\n" + "\n".join(absent)
    return text


_STATUS_CELL = {"oom": "OOM", "unsupported": "n/a", "error": "error"}


def markdown_report(records: Sequence[Rec], *, baseline: str = BASELINE) -> str:
    """Per device: the machine, then one row per case and one column per implementation,
    each cell `TFLOP/s (speed-up over the baseline)`."""
    limit = limits(records)
    train = train_section(records)
    records = latest(attention_only(records))
    if not records:
        return train
    ups = speedups(records, baseline)
    by_device: dict[tuple[str, str], list[Rec]] = collections.defaultdict(list)
    for r in records:
        by_device[device_key(r)].append(r)

    out = [
        "Cells: TFLOP/s by the FlashAttention convention (forward 2·B·N·T·S·(H + Hv), which is "
        "4·B·N·T·S·H when the value heads are as large as the key heads, halved when causal; "
        f"forward+backward 3.5× that), and in brackets the speed-up over `{baseline}` "
        "(its median time divided by this one's). OOM: out of memory; n/a: not supported. "
        "H: head size, `H/Hv` where the value heads differ (MLA); `H/Hv latent`: the values "
        "are each key's first Hv features, one array (MLA decoding on its latent cache: jattn "
        "is given it with `value_dim=Hv`, the peers the slice `k[..., :Hv]`, taken in the timed "
        "call); `+sinks`: with attention sinks.",
    ]
    for device in sorted(by_device):
        recs = by_device[device]
        measured = [r for r in recs if r["status"] != "absent"]
        impls = _impl_order(measured, baseline)
        out.append(f"\n### {device_label(device)}\n")
        out.append(_machine_line(recs))
        limit_line, *limit_tables = _roofline_tables(device, measured, impls, limit)
        out.append("\n" + limit_line)
        cells: dict[tuple[CaseKey, str], str] = {}
        for r in measured:
            if r["status"] == "ok":
                up = ups.get((device, r["implementation"], case_key(r)))
                cell = _sig3(r["tflops"])
                if up is not None:
                    cell += f" ({up:.2f}×)"
            else:
                cell = _STATUS_CELL.get(r["status"], r["status"])
            cells[(case_key(r), r["implementation"])] = cell
        headers = ["mode", "mask", "dtype", "B", "T", "S", "N", "K", "H", *impls]
        rows = []
        for key in sorted({case_key(r) for r in measured}, key=_case_sort):
            rows.append([*_lead(key), *(cells.get((key, impl), "") for impl in impls)])
        if rows:
            out.append("\n" + format_table(headers, rows, markdown=True))
        notes = sorted(
            {
                f"- `{r['implementation']}`: {r['status']}: {r['reason']}"
                for r in recs
                if r["status"] not in ("ok",)
            }
        )
        out.extend(limit_tables)
        if notes:
            out.append("\nNot measured:\n\n" + "\n".join(notes[:20]))
            if len(notes) > 20:
                out.append(f"- ... and {len(notes) - 20} more")
    if train:
        out.append("\n" + train)
    return "\n".join(out) + "\n"


_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def kv_bytes(r: Rec) -> int:
    """Bytes of K and V: what attention must read at least once. B·S·K·(H + Hv)·itemsize, or
    B·S·K·H·itemsize in a latent case, whose values are inside its keys."""
    width = r["H"] if is_latent(r) else r["H"] + value_heads(r)
    return r["B"] * r["S"] * r["K"] * width * _ITEMSIZE.get(r["dtype"], 4)


def _pct(share: float) -> str:
    """A share as a percentage: '54%', '1.1%', '0.27%'."""
    pct = 100 * share
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:.2g}%"


def memory_bound(r: Rec, matmul_tflops: float, read_gbps: float) -> bool:
    """Whether the case's forward FLOPs per byte of q, k, v and the output fall below the
    machine's balance (the matmul rate of its dtype over the read bandwidth): then bandwidth,
    not compute, bounds it (decode: one query row against a long cache)."""
    heads = r["H"] + value_heads(r)  # q and k are H wide, v and the output Hv
    fwd_flops = 2.0 * r["B"] * r["N"] * r["T"] * r["S"] * heads
    io = kv_bytes(r) + r["B"] * r["T"] * r["N"] * heads * _ITEMSIZE.get(r["dtype"], 4)
    return fwd_flops / io < matmul_tflops * 1e12 / (read_gbps * 1e9)


def _roofline_tables(
    device: tuple[str, str], measured: Sequence[Rec], impls: Sequence[str], limit: dict
) -> list[str]:
    """Every result against the machine's limits of the same device: a share of the matmul
    rate (same dtype) for compute-bound cases; for memory-bound ones (decode) the measured time
    against the time to read K and V once at the measured bandwidth."""
    matmul = {
        what.rsplit(":", 1)[1]: r for (dev, what), r in limit.items()
        if dev == device and what.startswith("xla:matmul:")
    }  # fmt: skip
    read = limit.get((device, "xla:read"))
    if not matmul and read is None:
        return ["No machine limits in these records (files from before they were measured)."]
    parts = ["Machine limits (XLA, measured at the start of the run): " + "; ".join(
        [f"{d} matmul {rate(r['tflops'])} ({r['problem']})" for d, r in sorted(matmul.items())]
        + ([f"memory read {read['gbytes_per_s']:.1f} GB/s ({read['problem']})"] if read else [])
    ) + "."]  # fmt: skip
    ok = [r for r in measured if r["status"] == "ok"]

    def is_memory_bound(r: Rec) -> bool:
        mm = matmul.get(r["dtype"], matmul.get("float32"))
        return bool(read and mm and memory_bound(r, mm["tflops"], read["gbytes_per_s"]))

    bound = {case_key(r): is_memory_bound(r) for r in ok}
    by_cell = {(case_key(r), r["implementation"]): r for r in ok}
    dims = ["mode", "mask", "dtype", "B", "T", "S", "N", "K", "H"]

    compute = sorted((k for k, b in bound.items() if not b), key=_case_sort)
    rows = []
    over: list[CaseKey] = []  # cases where some result passes the matmul rate
    for key in compute:
        mm = matmul.get(key[1])
        if mm is None:
            continue
        cells = []
        for impl in impls:
            r = by_cell.get((key, impl))
            if r is not None and r["tflops"] > mm["tflops"]:
                over.append(key)
            cells.append("" if r is None else _pct(r["tflops"] / mm["tflops"]))
        rows.append([*_lead(key), *cells])
    if rows:
        parts.append(
            "\nCompute-bound cases, each result as a share of the matmul rate of its dtype:\n\n"
            + format_table([*dims, *impls], rows, markdown=True)
            + "\n\n"
            + share_note([k for k in compute if k[1] in matmul], over)
        )
    memory = sorted((k for k, b in bound.items() if b), key=_case_sort)
    rows = []
    for key in memory:
        any_r = next(r for r in ok if case_key(r) == key)
        floor = kv_bytes(any_r) / (read["gbytes_per_s"] * 1e9)  # type: ignore[index]
        cells = []
        for impl in impls:
            r = by_cell.get((key, impl))
            if r is None:
                cells.append("")
            else:
                t = r["median_s"]
                cells.append(f"{_sig3(t * 1e3)} ({_sig3(t / floor)}×)")
        rows.append([*_lead(key), _sig3(floor * 1e3), *cells])
    if rows:
        parts.append(
            "\nMemory-bound cases (decode): the time to read K and V once at the measured "
            "bandwidth (B·S·K·(H + Hv)·itemsize bytes; B·S·K·H·itemsize in a latent case, whose "
            "values are inside its keys), then each measured time in ms and, in brackets, how "
            "many times that floor it takes; "
            + _cache_note([r for r in ok if bound[case_key(r)]])
            + ":\n\n"
            + format_table([*dims, "K+V read ms", *impls], rows, markdown=True)
        )
    return parts


def _cache_note(records: Sequence[Rec]) -> str:
    """How the records were timed: cold (bench.cache), back to back, or some of each."""
    cold = {r.get("evict_bytes") is not None for r in records}
    if cold == {True}:
        return "every call timed with the caches emptied first (cold, as in a model)"
    if cold == {False}:
        return (
            "calls timed back to back (caches warm: K and V that fit in the last-level cache "
            "come from there, and may beat the floor)"
        )
    return "some results timed cold (caches emptied before each call), some back to back"


def causal_overcount(T: int, S: int) -> float:
    """How many times the FLOP count's causal half (T·S/2 scores) exceeds the scores a causal
    mask leaves visible, aligned at the top-left corner as ``jax.nn``'s ``is_causal``
    (query i sees keys 0..i): T(T+1)/2 when T <= S. 1 at T = S (up to the diagonal), S/(T+1)
    for T < S: kernels that skip masked blocks do that much less work than counted."""
    visible = T * (T + 1) / 2 if T <= S else S * (S + 1) / 2 + (T - S) * S
    return (T * S / 2) / visible


def share_note(keys: Sequence[CaseKey], over: Sequence[CaseKey] = ()) -> str:
    """What a share of the matmul rate is, and why one may pass 100%: the FLOP count is a
    convention, not the work done, and the rate is XLA's at one size, not the machine's peak."""
    note = (
        "A share is the result's TFLOP/s, whose FLOPs are counted by the convention above (not "
        "the work the kernel does), over the rate of one XLA matmul of the size shown, which is "
        "not the machine's peak. So a share can pass 100%: a kernel with its own micro-kernels "
        "can outrun XLA's matmul at that size; and with a causal mask the count is half of the "
        "T·S scores while, where T < S, the mask (top-left aligned, as jax.nn's) leaves only "
        "T(T+1)/2 of them, so kernels that skip masked blocks do S/(T+1) times less work than "
        "counted. (The backward is counted as 2.5× the forward whatever a kernel recomputes: that "
        "lowers a share, never raises it.)"
    )
    causal = {(k[4], k[5]) for k in keys if k[2]}  # (T, S) of the causal cases
    overcounted = sorted((T, S) for T, S in causal if causal_overcount(T, S) > 1.05)
    if overcounted:
        note += (
            " Causal cases counted above their visible scores here: "
            + ", ".join(f"T={T} S={S} {causal_overcount(T, S):.2f}×" for T, S in overcounted)
            + "."
        )
    if over:
        note += (
            " Shares above 100% here: "
            + ", ".join(f"{' '.join(_lead(k)[:3])} T={k[4]} S={k[5]}" for k in dict.fromkeys(over))
            + "."
        )
    return note


def _case_sort(key: CaseKey) -> tuple[Any, ...]:
    mode, dtype, causal, B, T, S, N, K, H, Hv, sinks, latent = key
    # a latent case right after the same shape with values of their own
    return (mode != "fwd", dtype, causal, N, K, H, Hv, T == S, S, T, B, sinks, latent)


def _machine_line(recs: Sequence[Rec]) -> str:
    r = max(recs, key=lambda r: r.get("timestamp", ""))
    v = r.get("versions", {})
    libs = ", ".join(
        f"{name} {v[name]}" for name in ("jax", "jaxlib", "flax", "torch") if v.get(name)
    )
    jattn = v.get("jattn") or "?"
    if v.get("jattn_commit"):
        jattn += f" ({v['jattn_commit']})"
    dates = sorted({x["timestamp"][:10] for x in recs if x.get("timestamp")})
    when = (
        f", measured {dates[0]}" + (f" to {dates[-1]}" if len(dates) > 1 else "") if dates else ""
    )
    host = f"Host CPU {r.get('host_cpu', '?')} ({r.get('host_cores', '?')} cores)"
    return f"{host}; jattn {jattn}; {libs}{when}."


# --- plots ---------------------------------------------------------------------------------


def _series_key(r: Rec) -> tuple[Any, ...]:
    """What a line joins: points of one implementation whose shapes differ only in length
    (S, and T with it when T = S). Everything else, batch size included, makes another line."""
    return (
        r["dtype"], r["B"], r["N"], r["K"], r["H"], value_heads(r), has_sinks(r), is_latent(r),
        r["T"] if r["T"] != r["S"] else None,
    )  # fmt: skip


def _series_label(key: tuple[Any, ...]) -> str:
    dtype, B, N, K, H, Hv, sinks, latent, T = key
    label = f"{dtype} B={B} N={N}" + (f" K={K}" if K != N else "") + f" H={H}"
    if Hv != H:
        label += f" Hv={Hv}"
    if sinks:
        label += " sinks"
    if latent:
        label += " latent"
    if T is not None:
        label += f" T={T}"
    return label


def _length(x: float) -> str:
    """Axis label for a sequence length: 512, 1k, 32k."""
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


@dataclasses.dataclass(frozen=True)
class PlotLine:
    """One line of a plot: one implementation's points of one shape series in one panel."""

    device: tuple[str, str]
    panel: tuple[str, bool]  # (mode, causal)
    implementation: str
    series: tuple[Any, ...]  # _series_key
    xs: tuple[int, ...]  # key/value lengths S, increasing
    ys: tuple[float, ...]


def implementation_colors(records: Iterable[Rec], baseline: str = BASELINE) -> dict[str, Any]:
    """One colour per implementation measured in ``records`` (the baseline included): the same
    in every plot of a report, whether or not a plot draws the implementation."""
    import matplotlib

    cmap = matplotlib.colormaps[
        "tab10" if len(names := _measured(records, baseline)) <= 10 else "tab20"
    ]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _measured(records: Iterable[Rec], baseline: str) -> list[str]:
    ok = [r for r in latest(attention_only(records)) if r["status"] == "ok"]
    return _impl_order(ok, baseline)


def plot_lines(
    records: Sequence[Rec], *, metric: str = "tflops", baseline: str = BASELINE
) -> list[PlotLine]:
    """The lines :func:`plot` draws: y is TFLOP/s (``metric="tflops"``) or the speed-up over
    ``baseline`` (``"speedup"``; the baseline itself is the reference line at 1)."""
    if metric not in ("tflops", "speedup"):
        raise ValueError(f"metric must be 'tflops' or 'speedup', got {metric!r}")
    ok = [r for r in latest(attention_only(records)) if r["status"] == "ok"]
    ups = speedups(ok, baseline)

    def y_of(r: Rec) -> float | None:
        if metric == "tflops":
            return r["tflops"]
        if r["implementation"] == baseline:
            return None  # 1 by definition: drawn as the reference line instead
        return ups.get((device_key(r), r["implementation"], case_key(r)))

    grouped: dict[tuple[Any, ...], list[tuple[int, float]]] = collections.defaultdict(list)
    for r in ok:
        if (y := y_of(r)) is not None:
            key = (device_key(r), (r["mode"], r["causal"]), r["implementation"], _series_key(r))
            grouped[key].append((r["S"], y))
    lines = []
    for (device, panel, impl, series), pts in sorted(grouped.items(), key=lambda i: str(i[0])):
        pts.sort()
        xs = tuple(x for x, _ in pts)
        assert len(set(xs)) == len(xs), f"two points of one line at one length: {series}"
        lines.append(PlotLine(device, panel, impl, series, xs, tuple(y for _, y in pts)))
    return lines


def plot(
    records: Sequence[Rec],
    path: str | os.PathLike[str],
    *,
    metric: str = "tflops",
    baseline: str = BASELINE,
) -> pathlib.Path:
    """Write a PNG with one column per device and one row per (mode, mask).

    x is the key/value length S (the sequence length when T = S, the cache length for decode
    shapes); y is TFLOP/s (`metric="tflops"`) or the speed-up over `baseline`
    (`metric="speedup"`). Colour = implementation (the same in every plot of the records:
    :func:`implementation_colors`), line style and marker = shape series; a line joins only
    points that differ in length (:func:`plot_lines`).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    lines = plot_lines(records, metric=metric, baseline=baseline)
    colors = implementation_colors(records, baseline)
    devices = sorted({line.device for line in lines}) or [("none", "none")]
    panels = sorted({line.panel for line in lines}, key=lambda p: (p[0] != "fwd", p[1]))
    panels = panels or [("fwd", False)]
    impls = [name for name in colors if any(line.implementation == name for line in lines)]
    all_series = sorted({line.series for line in lines}, key=str)
    style_of = {k: (_STYLES[i % 4], _MARKERS[i % 7]) for i, k in enumerate(all_series)}

    fig, axes = plt.subplots(
        len(panels), len(devices), figsize=(5.5 * len(devices), 3.8 * len(panels)), squeeze=False
    )
    for col, device in enumerate(devices):
        for row, (mode, causal) in enumerate(panels):
            ax = axes[row][col]
            drawn = [
                line for line in lines if (line.device, line.panel) == (device, (mode, causal))
            ]
            for line in drawn:
                style, marker = style_of[line.series]
                ax.plot(
                    line.xs,
                    line.ys,
                    linestyle=style,
                    marker=marker,
                    markersize=4,
                    color=colors[line.implementation],
                    label=f"{line.implementation} {_series_label(line.series)}",
                )
            if metric == "speedup":
                ax.axhline(1.0, color="grey", linewidth=0.8)
                ax.set_ylim(bottom=0)
                ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}×"))
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: _length(x)))
            mask = "causal" if causal else "no mask"
            ax.set_title(f"{device_label(device)}\n{mode}, {mask}", fontsize=9)
            ax.set_xlabel("key/value length S")
            ax.set_ylabel("TFLOP/s" if metric == "tflops" else f"speed-up over {baseline}")
            ax.grid(True, which="both", alpha=0.3)
            if not drawn:
                ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)

    handles = [Line2D([], [], color=colors[name], label=name) for name in impls]
    for key in all_series:
        style, marker = style_of[key]
        handles.append(
            Line2D([], [], color="black", linestyle=style, marker=marker, label=_series_label(key))
        )
    if metric == "speedup":
        handles.append(Line2D([], [], color="grey", linewidth=0.8, label=f"{baseline} = 1"))
    fig.tight_layout()
    if handles:
        fig.legend(
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, 0.0),
            ncol=min(4, len(handles)),
            fontsize=8,
            frameon=False,
        )
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def write_report(
    records: Sequence[Rec], out_dir: str | os.PathLike[str], *, baseline: str = BASELINE
) -> dict[str, pathlib.Path]:
    """Write report.md, and throughput.png and speedup.png when there are attention records
    and train.png when there are training-step records, into `out_dir`; return their paths."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = markdown_report(records, baseline=baseline)
    paths: dict[str, pathlib.Path] = {}
    if any(r["status"] == "ok" for r in attention_only(records)):
        throughput = plot(records, out / "throughput.png", metric="tflops", baseline=baseline)
        speedup = plot(records, out / "speedup.png", metric="speedup", baseline=baseline)
        md += f"\n![throughput]({throughput.name})\n\n![speed-up over {baseline}]({speedup.name})\n"
        paths.update(throughput=throughput, speedup=speedup)
    if any(r["status"] == "ok" for r in train_only(records)):
        paths["train"] = plot_train(records, out / "train.png")
        md += f"\n\n![training steps]({paths['train'].name})\n"
    report = out / "report.md"
    report.write_text("# jattn benchmark report\n\n" + md, encoding="utf-8")
    return {"markdown": report, **paths}


# --- training steps (`python -m bench train`) ----------------------------------------------

TRAIN_BASELINE = "torch:eager"

TrainKey = tuple[Any, ...]  # (model, d_model, layers, heads, d_ff, vocab, B, T)


def train_only(records: Iterable[Rec]) -> list[Rec]:
    """The training-step records."""
    return [r for r in records if record_kind(r) == "train"]


def train_key(r: Rec) -> TrainKey:
    return (r["model"], r["d_model"], r["layers"], r["N"], r["d_ff"], r["vocab"], r["B"], r["T"])


def latest_train(records: Iterable[Rec]) -> list[Rec]:
    """One training record per (device, implementation, case): the newest."""
    best: dict[tuple[Any, ...], Rec] = {}
    for r in train_only(records):
        case = None if r["status"] == "absent" else train_key(r)
        key = (device_key(r), r["implementation"], case)
        if key not in best or r.get("timestamp", "") >= best[key].get("timestamp", ""):
            best[key] = r
    return list(best.values())


def _train_lead(key: TrainKey) -> list[str]:
    model, d, L, N, ff, V, B, T = key
    return [model, str(d), str(L), str(N), str(ff), str(V), str(B), str(T)]


_TRAIN_DIMS = ["model", "d_model", "layers", "heads", "d_ff", "vocab", "B", "T"]


def train_run_table(records: Sequence[Any]) -> str:
    """The table printed after `python -m bench train`: one row per training record."""
    headers = [*_TRAIN_DIMS, "implementation", "step ms", "IQR ms", "tokens/s", "GFLOP/s",
               "compile s", "status"]  # fmt: skip
    rows, absent = [], []
    for rec in records:
        r = dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else rec
        if record_kind(r) != "train":
            continue
        if r["status"] == "absent":
            absent.append(f"  {r['implementation']}: {r['reason']}")
            continue
        ok = r["status"] == "ok"
        rows.append([
            *_train_lead(train_key(r)), r["implementation"],
            _ms(r["median_s"]), _ms(r["iqr_s"]),
            _num(r.get("tokens_per_s"), ".0f"),
            _num(None if r["tflops"] is None else r["tflops"] * 1e3, ".1f"),
            _num(r["compile_s"], ".1f"),
            "ok" if ok else f"{r['status']}: {r['reason']}"[:70],
        ])  # fmt: skip
    text = format_table(headers, rows, markdown=False)
    if absent:
        text += "\n\nnot measured:\n" + "\n".join(absent)
    return text


def train_speedups(records: Iterable[Rec], baseline: str = TRAIN_BASELINE) -> dict[Any, float]:
    """{(device, implementation, case): baseline median step time / this one's}."""
    ok = [r for r in train_only(records) if r["status"] == "ok"]
    base = {(device_key(r), train_key(r)): r["median_s"] for r in ok
            if r["implementation"] == baseline}  # fmt: skip
    out = {}
    for r in ok:
        ref = base.get((device_key(r), train_key(r)))
        if ref is not None and r["median_s"] > 0:
            out[(device_key(r), r["implementation"], train_key(r))] = ref / r["median_s"]
    return out


def train_section(records: Sequence[Rec], *, baseline: str = TRAIN_BASELINE) -> str:
    """Markdown for the training-step records, per device: tokens per second with the
    speed-up over `baseline`, then the median step time with its share of the machine's
    float32 matmul rate. Empty when there are no training records."""
    limit = limits(records)
    recs = latest_train(records)
    if not recs:
        return ""
    ups = train_speedups(recs, baseline)
    by_device: dict[tuple[str, str], list[Rec]] = collections.defaultdict(list)
    for r in recs:
        by_device[device_key(r)].append(r)
    out = [
        "### Training step\n",
        "A whole training step (forward, backward, AdamW update; float32, no dropout) of "
        "each model. First table: tokens per second and, in brackets, the speed-up over "
        f"`{baseline}` (its median step time divided by this one's). Second: the median step "
        "time in ms and, in brackets, the step's matmul FLOPs (6 x weights in matmuls x tokens, "
        "plus attention by the FlashAttention convention) per second as a share of the "
        "machine's float32 matmul rate measured in the same run.",
    ]
    for device in sorted(by_device):
        drecs = by_device[device]
        measured = [r for r in drecs if r["status"] != "absent"]
        impls = _impl_order(measured, baseline)
        mm = limit.get((device, "xla:matmul:float32"))
        # Each record against the rate measured at the start of its own run (the newest on
        # the device for a run without one): a shared machine's rate drifts between runs.
        own = {
            r["run_id"]: r for r in records
            if record_kind(r) == "roofline" and r["status"] == "ok" and device_key(r) == device
            and r["implementation"] == "xla:matmul" and r["dtype"] == "float32"
        }  # fmt: skip
        runs = sorted({r.get("run_id", "") for r in measured})
        out.append(f"\n#### {device_label(device)}\n")
        out.append(_machine_line(drecs))
        rates = [own[run] for run in runs if run in own] or ([mm] if mm is not None else [])
        if rates:
            out.append(
                f"Float32 matmul rate (XLA, {rates[0]['problem']}) at the start of "
                + ("the run" if len(rates) == 1 else "each run")
                + ": "
                + ", ".join(rate(x["tflops"]) for x in rates)
                + "."
            )
        speed: dict[tuple[TrainKey, str], str] = {}
        times: dict[tuple[TrainKey, str], str] = {}
        for r in measured:
            key = (train_key(r), r["implementation"])
            if r["status"] != "ok":
                speed[key] = times[key] = _STATUS_CELL.get(r["status"], r["status"])
                continue
            up = ups.get((device, r["implementation"], train_key(r)))
            speed[key] = f"{r['tokens_per_s']:.0f}" + ("" if up is None else f" ({up:.2f}×)")
            ref = own.get(r.get("run_id", ""), mm)
            share = "" if ref is None else f" ({_pct(r['tflops'] / ref['tflops'])})"
            ms = r["median_s"] * 1e3
            times[key] = f"{ms:.0f}{share}" if ms >= 100 else f"{_sig3(ms)}{share}"
        # a model's cases by length, then batch
        keys = sorted({train_key(r) for r in measured}, key=lambda k: (*k[:6], k[7], k[6]))
        for title, cells in (("tokens/s", speed), ("step ms", times)):
            rows = [[*_train_lead(k), *(cells.get((k, i), "") for i in impls)] for k in keys]
            if rows:
                out.append(f"\n{title}:\n\n" + format_table([*_TRAIN_DIMS, *impls], rows,
                                                             markdown=True))  # fmt: skip
        notes = sorted({f"- `{r['implementation']}`: {r['status']}: {r['reason']}"
                        for r in drecs if r["status"] != "ok"})  # fmt: skip
        if notes:
            out.append("\nNot measured:\n\n" + "\n".join(notes))
    return "\n".join(out)


def plot_train(records: Sequence[Rec], path: str | os.PathLike[str]) -> pathlib.Path:
    """A PNG of tokens per second, one panel per device, a group of bars per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in latest_train(records) if r["status"] == "ok"]
    devices = sorted({device_key(r) for r in ok}) or [("none", "none")]
    impls = _impl_order(ok, TRAIN_BASELINE)
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(impls)}
    fig, axes = plt.subplots(1, len(devices), figsize=(7 * len(devices), 4), squeeze=False)
    for col, device in enumerate(devices):
        ax = axes[0][col]
        recs = [r for r in ok if device_key(r) == device]
        keys = sorted({train_key(r) for r in recs})
        width = 0.8 / max(1, len(impls))
        by = {(train_key(r), r["implementation"]): r["tokens_per_s"] for r in recs}
        for j, impl in enumerate(impls):
            xs = [i + j * width for i, k in enumerate(keys) if (k, impl) in by]
            ys = [by[(k, impl)] for k in keys if (k, impl) in by]
            ax.bar(xs, ys, width, label=impl, color=colors[impl])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(keys))])
        ax.set_xticklabels([f"{k[0]} d={k[1]}\nB={k[6]} T={k[7]}" for k in keys], fontsize=8)
        ax.set_ylabel("tokens / s")
        ax.set_title(f"{device_label(device)}\ntraining step, float32", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        if not recs:
            ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes)
    if impls:
        fig.legend(loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(impls)),
                   fontsize=8, frameon=False)  # fmt: skip
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
