"""The cffi builder for kcore._kcore_c (out-of-line API mode); run by setup.py, not installed."""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent

SOURCES = ["copy.c", "memguard.c", "codec.c", "pageclass.c"]
# The core must build warning-free; cffi's generated wrapper gets the same flags.
CFLAGS = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]

ffibuilder = FFI()
# One header is the single source of truth: it is the cdef, verbatim.
ffibuilder.cdef((CSRC / "kcore_api.h").read_text())
ffibuilder.set_source(
    "kcore._kcore_c",
    '#include <stddef.h>\n#include <stdint.h>\n#include "kcore_api.h"\n',
    # Relative paths: setuptools wants sources inside the project tree.
    sources=[f"csrc/{name}" for name in SOURCES],
    include_dirs=["csrc"],
    depends=[f"csrc/{name}" for name in (*SOURCES, "kcore_api.h")],
    extra_compile_args=CFLAGS,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
