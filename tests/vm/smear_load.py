"""A guest load for the smear tests: processes fork, write memory and exit all the time.

python3 smear_load.py SHARE [CHILDREN]: keeps CHILDREN (default 6) children named kcoreload, each
writing a few MiB for a random moment, then exiting, and rewrites a buffer of its own;
writes SHARE/load.ready once started and stops when SHARE/load.stop appears.
On the host, start_load(vm) and stop_load(vm) run it in a guest (tests/vm/qemu_vm.Vm).
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

PR_SET_NAME = 15


def start_load(vm: Any, children: int = 6) -> None:
    """Start this script in the guest's background; wait until it runs."""
    for name in ("load.ready", "load.stop"):
        (vm.share / name).unlink(missing_ok=True)
    here = Path(__file__).resolve()
    vm.run(f'"$KCORE_PY" {here} {vm.share} {children} > /dev/null 2>&1 &\n').check()
    vm._wait_for(lambda: (vm.share / "load.ready").exists(), 120, "the load")


def stop_load(vm: Any) -> None:
    """Ask the load to stop (it exits within milliseconds)."""
    (vm.share / "load.stop").write_text("")


def child() -> None:
    """Write a few MiB page by page for a moment, then exit."""
    ctypes.CDLL(None).prctl(PR_SET_NAME, b"kcoreload", 0, 0, 0)
    buf = bytearray(random.randint(1, 4) << 20)
    end = time.monotonic() + random.uniform(0.01, 0.3)
    k = 0
    while time.monotonic() < end:
        k = k % 250 + 1
        buf[::4096] = bytes([k]) * (len(buf) // 4096)
        time.sleep(0.005)  # under TCG a spinning load would starve the dump itself
    os._exit(0)


def main() -> None:
    share = sys.argv[1]
    want = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    stop = os.path.join(share, "load.stop")
    kids: set[int] = set()
    own = bytearray(8 << 20)
    with open(os.path.join(share, "load.ready"), "w") as f:
        f.write(str(os.getpid()))
    k = 0
    while not os.path.exists(stop):
        while len(kids) < want:
            pid = os.fork()
            if pid == 0:
                child()
            kids.add(pid)
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            pid = 0
        if pid:
            kids.discard(pid)
        else:
            k = k % 250 + 1
            own[::4096] = bytes([k]) * (len(own) // 4096)
            time.sleep(0.01)
    for pid in kids:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except OSError:
            pass


if __name__ == "__main__":
    main()
