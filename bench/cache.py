"""Cold caches for the cases that stream their inputs (decoding).

A decode call reads its K/V cache once. In a model that cache is never warm: between two calls
of one layer, every other layer's cache is read. Timed back to back, a cache that fits in the
machine's last-level cache is read from there instead of from memory, and the result is
compared with a floor (reading K and V once at the memory's bandwidth) that it may then beat.
That is no rare case: a cloud VM with 2 cores can share an L3 of hundreds of MiB, and on such
a machine (a 2-core Xeon VM reporting a 480 MiB L3) an MLA decode at S = 4096 in bfloat16 took
1.6 ms back to back and 2.7 ms with the caches emptied before each call.

So the sweep times such cases cold (`bench.sweep`: decode shapes, T = 1, unless
`--cache warm`): an `Evictor` reads a buffer of more than twice the last-level cache before
every timed call, untimed, and every sample is one call.
"""

from __future__ import annotations

import os
import pathlib

MiB = 2**20
# Accelerators: several times a GPU's L2 (50 MB on an H100 or H200).
ACCELERATOR_EVICT_BYTES = 512 * MiB
# CPUs: at least this much even where the caches are small or unknown.
MIN_EVICT_BYTES = 256 * MiB
_ROW = 16384  # floats per row of the buffer (64 KiB)


def _size_bytes(text: str) -> int:
    """Linux's cache sizes: '32K', '1024K', '480M', or plain bytes."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def last_level_cache_bytes(root: str | os.PathLike[str] = "/sys/devices/system/cpu") -> int | None:
    """The bytes of the CPUs' last-level caches, each instance counted once (two L3s of
    32 MiB: 64 MiB), from Linux's sysfs; None where it says nothing."""
    found: dict[tuple[int, str], int] = {}  # (level, the CPUs sharing it) -> bytes
    for index in pathlib.Path(root).glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
            found[(level, shared)] = _size_bytes((index / "size").read_text())
        except (OSError, ValueError):
            continue
    if not found:
        return None
    top = max(level for level, _ in found)
    return sum(size for (level, _), size in found.items() if level == top)


def evict_bytes(backend: str, *, llc: int | None = None, available: int | None = None) -> int:
    """How much an `Evictor` on `backend` reads: on a CPU more than twice its last-level
    caches (`llc` bytes, at least `MIN_EVICT_BYTES`), but never more than an eighth of the
    `available` memory; on an accelerator `ACCELERATOR_EVICT_BYTES`."""
    if backend != "cpu":
        return ACCELERATOR_EVICT_BYTES
    size = max(MIN_EVICT_BYTES, 2 * (llc or 0) + 64 * MiB)
    if available is not None:
        size = min(size, max(64 * MiB, available // 8))
    return size // (4 * _ROW) * (4 * _ROW)  # whole rows


class Evictor:
    """Reads `nbytes` of device memory (XLA's row sums of a float32 buffer on JAX's default
    device) each time it is called, so that what a timed call reads next comes from memory;
    the buffer lives as long as the evictor."""

    def __init__(self, nbytes: int) -> None:
        import jax
        import jax.numpy as jnp

        rows = max(1, nbytes // (4 * _ROW))
        self.nbytes = rows * _ROW * 4
        self._buffer = jnp.ones((rows, _ROW), jnp.float32)
        self._read = jax.jit(lambda x: x.sum(axis=1))
        self()  # compile now, not before the first timed call

    def __call__(self) -> None:
        import jax

        jax.block_until_ready(self._read(self._buffer))


def evictor_for(backend: str) -> Evictor:
    """An `Evictor` sized for `backend` (see `evict_bytes`) on this machine."""
    from bench.runners import _host_available_bytes

    if backend != "cpu":
        return Evictor(evict_bytes(backend))
    return Evictor(
        evict_bytes(backend, llc=last_level_cache_bytes(), available=_host_available_bytes())
    )
