"""The optional native part of jattn: csrc/ -> jattn/kernels/_jattn_cpu.so.

Everything else about the package is in pyproject.toml. The library is a plain shared library
(XLA FFI handlers, loaded by jattn/kernels/cpu.py with ctypes), not a Python extension module;
setuptools builds it because that needs nothing beyond a C++17 compiler and the XLA FFI headers
that the jaxlib wheel ships (a build requirement). It is compiled for the x86-64 baseline with
AVX2 and AVX-512 code paths picked at run time, so one build runs on any x86-64 CPU.

Where it cannot be built (no compiler, not Linux on x86-64, headers missing) the install goes
on without it and jattn falls back to its pure-JAX kernels. JATTN_BUILD_NATIVE=0 skips it,
JATTN_BUILD_NATIVE=1 tries on any platform.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

LIB = "jattn.kernels._jattn_cpu"
SOURCES = [
    "csrc/ffi.cc",
    "csrc/forward.cc",
    "csrc/backward.cc",
    "csrc/gemm.cc",
    "csrc/lowp.cc",
    "csrc/threads.cc",
]


def _warn(msg: str) -> None:
    print(f"warning: jattn native CPU kernel not built: {msg}", file=sys.stderr)


# Written next to the library when it was not built, with the reason: jattn/kernels/cpu.py
# reports it (jattn.kernels.UNAVAILABLE["cpu"]) instead of a bare "missing".
BUILD_ERROR = "_jattn_cpu.build-error.txt"


def _ffi_include_dir() -> str | None:
    """jaxlib's include/ (what jax.ffi.include_dir() returns), found without importing jax."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        inc = Path(root) / "include"
        if (inc / "xla" / "ffi" / "api" / "ffi.h").is_file():
            return str(inc)
    return None


class BuildNative(build_ext):
    """Builds the library as ``_jattn_cpu.so`` (no ABI tag: it is not a Python module) and
    never fails the install."""

    def get_ext_filename(self, fullname: str) -> str:
        # Called with the full dotted name and (for the build path) with its last part.
        if fullname in (LIB, LIB.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def get_export_symbols(self, ext):  # no PyInit_ function to export
        return [] if ext.name == LIB else super().get_export_symbols(ext)

    def run(self):
        # setuptools clears `inplace` while it builds and copies the results afterwards.
        self._to_source = bool(self.inplace or getattr(self, "editable_mode", False))
        super().run()

    def build_extension(self, ext):
        if ext.name != LIB:
            return super().build_extension(ext)
        # The build folder's copy, and the source tree's for in-place and editable builds
        # (where the library itself is copied next to the sources).
        notes = [Path(self.get_ext_fullpath(ext.name)).with_name(BUILD_ERROR)]
        if self._to_source:
            notes.append(Path(__file__).resolve().parent / "jattn" / "kernels" / BUILD_ERROR)
        for note in notes:
            note.unlink(missing_ok=True)
        reason = self._build_native(ext)
        if reason is not None:
            _warn(reason)
            for note in notes:
                note.parent.mkdir(parents=True, exist_ok=True)
                note.write_text(reason + "\n")

    def _build_native(self, ext) -> str | None:
        """Builds the library; returns why it was not built, or None."""
        want = os.environ.get("JATTN_BUILD_NATIVE", "")
        if want == "0":
            return "skipped: JATTN_BUILD_NATIVE=0"
        supported = sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")
        if not supported and want != "1":
            return f"unsupported platform {sys.platform}/{platform.machine()}"
        inc = _ffi_include_dir()
        if inc is None:
            return "the XLA FFI headers (jaxlib/include) were not found at build time"
        ext.include_dirs = [*ext.include_dirs, inc]
        try:
            super().build_extension(ext)
        except Exception as e:  # noqa: BLE001 - a failing compiler must not fail the install
            # setuptools' CompileError carries the compiler's exit only; its output went to
            # the build log above.
            return f"the build failed: {type(e).__name__}: {e}"
        return None


setup(
    ext_modules=[
        Extension(
            LIB,
            sources=SOURCES,
            include_dirs=["csrc"],
            language="c++",
            extra_compile_args=[
                "-std=c++17",
                "-O3",
                "-g0",
                "-fPIC",
                "-pthread",
                "-ffp-contract=fast",
                # Python's CFLAGS (which setuptools passes first) carry -fwrapv, for CPython's
                # own C. This code never relies on signed overflow wrapping, and the harnesses
                # in csrc/tests measure it built without the flag: ship the code they measure.
                "-fno-wrapv",
                "-fvisibility=hidden",
            ],
            extra_link_args=["-pthread"],
            depends=[str(p) for p in Path("csrc").glob("*") if p.is_file()],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
