"""The native kernel built with AddressSanitizer and UndefinedBehaviorSanitizer, run over a
CI-sized part of its own tests.

What it covers: the forward and backward at every ISA level the CPU has (generic, AVX2,
AVX-512; register tiles and the GEMMs' partial tiles, every sweep feature), the bfloat16
products (AVX-512 BF16 dot products and AMX tiles, where the CPU has them, with partial 16-row
tiles and 32-deep steps), decoding's position-streaming path in every dtype with every mask
feature, its tiles for 9 to 16 rows per KV head at every level (odd head sizes, partial
tiles and chunks), and the release of the kept buffers: out-of-bounds reads and writes, use
after free, misaligned or overflowing arithmetic stop the run (halt_on_error). Leak checking is
off (the interpreter and XLA keep memory until exit). Skipped where the compiler cannot build
with the sanitizers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jattn.kernels import cpu

ROOT = Path(__file__).resolve().parents[2]
SELECTION = "isa_levels or bf16_products or decode_every or decode_tiled or kept_buffers"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def _runtime(cxx: str, name: str) -> str | None:
    path = subprocess.run(
        [cxx, f"-print-file-name={name}"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return path if path and os.path.isabs(path) and os.path.exists(path) else None


@pytest.mark.skipif(not cpu.AVAILABLE, reason="the native kernel is not built here")
@pytest.mark.skipif(sys.platform != "linux", reason="sanitizer runtimes preloaded on Linux")
def test_native_kernel_under_asan_and_ubsan(tmp_path):
    import jax.ffi

    cxx = _compiler()
    asan, ubsan = (_runtime(cxx, n) if cxx else None for n in ("libasan.so", "libubsan.so"))
    if cxx is None or asan is None or ubsan is None:
        pytest.skip("no C++ compiler with the AddressSanitizer and UBSan runtimes")
    lib = tmp_path / "_jattn_cpu.so"
    build = subprocess.run(
        [cxx, "-std=c++17", "-O1", "-g", "-fno-omit-frame-pointer",
         "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
         "-fPIC", "-shared", "-pthread", "-ffp-contract=fast", "-fvisibility=hidden",
         f"-I{ROOT / 'csrc'}", f"-I{jax.ffi.include_dir()}",
         *map(str, sorted((ROOT / "csrc").glob("*.cc"))), "-o", str(lib)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(
        os.environ,
        LD_PRELOAD=f"{asan}:{ubsan}",
        ASAN_OPTIONS="detect_leaks=0:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        JATTN_CPU_LIBRARY=str(lib),
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider",
         "tests/kernels/test_cpu.py", "-k", SELECTION],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-6000:]
    assert " passed" in out and " failed" not in out, out[-2000:]
