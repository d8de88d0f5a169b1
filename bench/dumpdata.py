"""Benchmark inputs for `kcore dump`: 4 GiB raw images and a matching system root, built once."""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

GIB = 1 << 30
RAM_TOP = 4 * GIB
BLOCK = 1 << 20


def make_root(fixture_root: Path, out: Path) -> Path:
    """A copy of a capture's root whose /proc/iomem says 4 GiB of System RAM."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(fixture_root, out)
    iomem = out / "proc" / "iomem"
    iomem.chmod(0o644)
    iomem.write_text("00000000-00000fff : Reserved\n"
                     "00001000-0009fbff : System RAM\n"
                     "0009fc00-0009ffff : Reserved\n"
                     "000a0000-000bffff : PCI Bus 0000:00\n"
                     "000f0000-000fffff : Reserved\n"
                     f"00100000-{RAM_TOP - 1:08x} : System RAM\n")
    return out


def make_image(fixture_ram: Path, out: Path, zero_fraction: float, seed: int = 1) -> float:
    """Write a 4 GiB raw image: the capture's RAM, then data with zero runs; return zero share."""
    rng = random.Random(seed)
    data = rng.randbytes(BLOCK)
    zero = bytes(BLOCK)
    zero_pages = 0
    with open(fixture_ram, "rb") as src, open(out, "wb") as f:
        head = bytearray(src.read())
        view = memoryview(head)
        for i in range(0, len(head), 4096):
            if not any(view[i:i + 4096]):
                if zero_fraction == 0.0:  # dense: the capture's free pages get data too
                    view[i:i + 4096] = data[i % BLOCK:i % BLOCK + 4096]
                else:
                    zero_pages += 1
        f.write(head)
        pos = len(head)
        while pos < RAM_TOP:
            # Runs of 64 KiB to 4 MiB, zero with probability zero_fraction (free memory).
            n = min(rng.randrange(1, 65) * (64 << 10), RAM_TOP - pos)
            is_zero = rng.random() < zero_fraction
            left = n
            while left:
                k = min(left, BLOCK)
                f.write(zero[:k] if is_zero else data[:k])
                left -= k
            if is_zero:
                zero_pages += n // 4096
            pos += n
        f.flush()
        os.fsync(f.fileno())
    return zero_pages / (RAM_TOP // 4096)
