"""The C unit tests (csrc/tests/*.c), each built with its sources and run under ASan + UBSan."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
WARN = ["-Wall", "-Wextra", "-Werror"]

# test file: (the core sources it links, extra libraries)
C_TESTS = {
    # the copy engine: real faults (holes in /proc/self/mem, a truncated memfd, /dev/full)
    "test_copy.c": (["copy.c", "memguard.c"], ["-lpthread"]),
    # makedumpfile's -d rules on 6.1-shaped struct pages
    "test_pageclass.c": (["pageclass.c"], []),
    # every codec through a kdump data area and back; snappy framing; CRC-32C
    "test_codec.c": (["codec.c", "copy.c"], ["-lpthread", "-ldl"]),
}


@pytest.mark.parametrize("test", sorted(C_TESTS))
def test_c_unit_tests_under_asan_and_ubsan(test: str, tmp_path: Path) -> None:
    """Build csrc/tests/TEST with its sources under the sanitizers; every check must pass."""
    cc = shutil.which(os.environ.get("CC", "gcc"))
    if cc is None:
        pytest.skip("no C compiler (gcc) to build the sanitizer tests")
    sources, libs = C_TESTS[test]
    exe = tmp_path / Path(test).stem
    build = subprocess.run(
        [cc, "-std=gnu11", "-g", "-O1", *SANITIZE, *WARN, f"-I{CSRC}",
         *(str(CSRC / s) for s in sources), str(CSRC / "tests" / test), "-o", str(exe), *libs],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:halt_on_error=1",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # a codec whose library is missing would be skipped: CI installs them all
    assert "all passed" in run.stdout and "skipped" not in run.stdout, run.stdout
    assert "runtime error" not in run.stderr  # UBSan reports
