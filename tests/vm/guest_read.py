"""Run in the guest: read (offset, length) regions of the real /proc/kcore twice, around a pause.

Usage: guest_read.py REGIONS.json OUTDIR.  REGIONS.json is [[offset, length, zero], ...]; with
zero (the kcore offset of empty_zero_page) the region is read page by page, each page after
a read of that zero page: 6.1's read_kcore() reuses one bounce page per open file and vread()
leaves it untouched where no vmap area is (guard pages, lazily freed areas), so without this
such pages repeat whatever the file read last instead of reading as the holes they are.
Reads every region into a first buffer, creates
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


def read_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill view from the kcore at offset."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            raise SystemExit(f"short read at kcore offset {offset + got:#x}")
        got += n


def read_regions(fd: int, regions: list[list[int]], view: memoryview) -> None:
    """Fill view with the regions, back to back."""
    scratch = memoryview(bytearray(PAGE))
    at = 0
    for offset, length, zero in regions:
        if zero is None:
            read_exact(fd, view[at:at + length], offset)
        else:
            for page in range(0, length, PAGE):
                read_exact(fd, scratch, zero)  # the bounce page now holds zeros
                n = min(PAGE, length - page)
                read_exact(fd, view[at + page:at + page + n], offset + page)
        at += length


def main() -> None:
    """Read, signal, wait, read again, write both."""
    regions = json.load(open(sys.argv[1]))
    out = sys.argv[2]
    total = sum(length for _, length, _ in regions)
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
