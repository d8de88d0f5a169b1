"""Run in the guest: read (offset, length) regions of the real /proc/kcore twice, around a pause.

Usage: guest_read.py REGIONS.json OUTDIR.  Reads every region into a first buffer, creates
OUTDIR/read-1.done, waits for OUTDIR/go (the host pauses the guest in between), reads them
into a second buffer, then writes OUTDIR/before.bin and OUTDIR/after.bin.  Both buffers are
allocated and touched first, so the reader's own pages hold the same data at both reads
and at the pause (except the pages it is filling: those count as the kernel's drift).
Standard library only.
"""

from __future__ import annotations

import json
import os
import sys
import time

PAGE = 4096


def read_regions(fd: int, regions: list[list[int]], view: memoryview) -> None:
    """Fill view with the regions, back to back."""
    at = 0
    for offset, length in regions:
        got = 0
        while got < length:
            n = os.preadv(fd, [view[at + got:at + length]], offset + got)
            if n <= 0:
                raise SystemExit(f"short read at kcore offset {offset + got:#x}")
            got += n
        at += length


def main() -> None:
    """Read, signal, wait, read again, write both."""
    regions = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    total = sum(length for _, length in regions)
    bufs = [bytearray(total), bytearray(total)]
    for b in bufs:
        for i in range(0, total, PAGE):
            b[i] = 1
            b[i] = 0
    fd = os.open("/proc/kcore", os.O_RDONLY)
    read_regions(fd, regions, memoryview(bufs[0]))
    open(os.path.join(out, "read-1.done"), "w").close()
    go = os.path.join(out, "go")
    while not os.path.exists(go):
        time.sleep(0.01)
    read_regions(fd, regions, memoryview(bufs[1]))
    os.close(fd)
    for name, b in zip(("before.bin", "after.bin"), bufs, strict=True):
        with open(os.path.join(out, name), "wb") as f:
            f.write(b)


if __name__ == "__main__":
    main()
