"""A child process whose memory has holes: the real-fault source for engine tests and benches.

The child maps a file (MAP_SHARED, read-only) and munmaps chosen pages; reading its
/proc/PID/mem then gives the file's bytes where mapped and real kernel faults where not
(docs/kernel-facts.md section 6: a short read ending at the hole, EIO when a read starts on one).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable

PAGE = 4096

_CHILD = r"""
import ctypes, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                      ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE = 4096
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "map":
        path, npages = args[0], int(args[1])
        holes = [int(x) for x in args[2].split(",") if x] if len(args) > 2 else []
        noaccess = [int(x) for x in args[3].split(",") if x] if len(args) > 3 else []
        fd = os.open(path, os.O_RDONLY)
        addr = libc.mmap(None, npages * PAGE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        os.close(fd)
        if addr in (None, ctypes.c_void_p(-1).value):
            sys.exit("mmap failed: " + os.strerror(ctypes.get_errno()))
        for h in holes:
            if libc.munmap(addr + h * PAGE, PAGE):
                sys.exit("munmap failed")
        for h in noaccess:
            if libc.mprotect(addr + h * PAGE, PAGE, 0):  # PROT_NONE
                sys.exit("mprotect failed")
        print(addr, flush=True)
    elif cmd == "unmap":
        libc.munmap(int(args[0]), int(args[1]))
        print("ok", flush=True)
"""


class MemChild:
    """A child process that maps files with holes; .fd is its /proc/PID/mem, open for reading."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )
        self.fd = os.open(f"/proc/{self.proc.pid}/mem", os.O_RDONLY)

    def _ask(self, line: str) -> str:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline()
        if not reply:
            raise RuntimeError(f"memory child died (status {self.proc.wait()})")
        return reply.strip()

    def map(self, path: os.PathLike | str, npages: int, holes: Iterable[int] = (),
            noaccess: Iterable[int] = ()) -> int:
        """Map npages of path in the child, unmap the pages in holes; return the address.

        Pages in noaccess become PROT_NONE: /proc/PID/mem still reads them (FOLL_FORCE),
        process_vm_readv does not.
        """
        hole_list = ",".join(str(h) for h in sorted(set(holes))) or ","
        none_list = ",".join(str(h) for h in sorted(set(noaccess))) or ","
        return int(self._ask(f"map {os.fspath(path)} {npages} {hole_list} {none_list}"))

    def unmap(self, addr: int, npages: int) -> None:
        """Unmap a region mapped by map()."""
        self._ask(f"unmap {addr} {npages * PAGE}")

    def close(self) -> None:
        """Close the mem fd and end the child."""
        os.close(self.fd)
        assert self.proc.stdin
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self) -> MemChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def expected_memory(data: bytes, holes: Iterable[int]) -> bytes:
    """What the child's mapping of data reads as: zeros on the hole pages."""
    out = bytearray(data)
    for h in holes:
        out[h * PAGE:(h + 1) * PAGE] = bytes(PAGE)
    return bytes(out)
