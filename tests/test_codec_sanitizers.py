"""The codec layer's C tests (csrc/tests/test_codec.c), built and run under ASan + UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
WARN = ["-Wall", "-Wextra", "-Werror"]


def test_codecs_under_asan_and_ubsan(tmp_path):
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.skip("no C compiler (gcc) to build the sanitizer tests")
    exe = tmp_path / "test_codec"
    build = subprocess.run(
        [cc, "-std=gnu11", "-g", "-O1", *SANITIZE, *WARN, f"-I{CSRC}", str(CSRC / "codec.c"),
         str(CSRC / "copy.c"), str(CSRC / "tests" / "test_codec.c"), "-o", str(exe),
         "-lpthread", "-ldl"],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "all passed" in run.stdout and "skipped" not in run.stdout, run.stdout
    assert "runtime error" not in run.stderr
