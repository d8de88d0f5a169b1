"""Which page frames a dump holds, read from the files real tools wrote (for the -d tests).

A page set is a bytearray bitmap: bit n (byte n // 8, bit n % 8) set when page frame n is held.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

from elftools.elf.elffile import ELFFile

PAGE = 4096
PFN_EXCLUDED = 256  # makedumpfile.h: -E writes excluded runs shorter than this
LIME = struct.Struct("<IIQQ8s")  # LiME's range header: magic, version, start, end (inclusive)
LIME_MAGIC = 0x4C694D45


def _set(bm: bytearray, lo: int, hi: int) -> None:
    for pfn in range(lo, min(hi, (lo + 7) // 8 * 8)):
        bm[pfn >> 3] |= 1 << (pfn & 7)
    a, b = (lo + 7) // 8, hi // 8
    if a < b:
        bm[a:b] = b"\xff" * (b - a)
    for pfn in range(max(lo, b * 8), hi):
        bm[pfn >> 3] |= 1 << (pfn & 7)


def loads(path: Path) -> list[tuple[int, int, int]]:
    """(p_paddr, p_filesz, p_memsz) of an ELF core's PT_LOADs with a physical address."""
    with open(path, "rb") as f:
        return [(s["p_paddr"], s["p_filesz"], s["p_memsz"]) for s in ELFFile(f).iter_segments()
                if s["p_type"] == "PT_LOAD" and s["p_paddr"] != (1 << 64) - 1]


def elf_held(path: Path, npfn: int) -> bytearray:
    """The pages an ELF core holds file bytes for (p_filesz), by physical address."""
    bm = bytearray(-(-npfn // 8))
    for pa, filesz, _memsz in loads(path):
        if filesz:
            _set(bm, pa // PAGE, min(npfn, (pa + filesz) // PAGE))
    return bm


def kdump_held(path: Path) -> bytearray:
    """The 2nd bitmap of a kdump-compressed file (makedumpfile's dumpable pages)."""
    with open(path, "rb") as f:
        head = f.read(464)
        assert head[:8] == b"KDUMP   ", f"{path}: not a kdump-compressed file"
        block_size, sub_hdr_size, bitmap_blocks, max_mapnr = struct.unpack_from("<iiII", head, 428)
        f.seek((1 + sub_hdr_size) * block_size)
        bitmaps = f.read(bitmap_blocks * block_size)
    half = len(bitmaps) // 2
    return bytearray(bitmaps[half:half + -(-max_mapnr // 8)])


def e_closure(held: bytearray, dense_loads: list[tuple[int, int, int]]) -> bytearray:
    """What makedumpfile -E writes for an exact page set (write_elf_pages_cyclic).

    Within each input PT_LOAD, a run of fewer than PFN_EXCLUDED excluded pages that a
    dumpable page follows is written anyway; only longer runs, or one ending the load,
    are left out.
    """
    out = bytearray(held)
    npfn = len(held) * 8

    def bit(p: int) -> bool:
        return p < npfn and bool(held[p >> 3] >> (p & 7) & 1)

    for pa, filesz, _memsz in dense_loads:
        lo, hi = pa // PAGE, min(npfn, (pa + filesz) // PAGE)
        run = 0
        for p in range(lo, hi):
            if not bit(p):
                run += 1
                continue
            if 0 < run < PFN_EXCLUDED:
                _set(out, p - run, p)
            run = 0
    return out


def differences(a: bytearray, b: bytearray, limit: int = 20) -> tuple[int, list[int]]:
    """How many pfns differ between two page sets, and the first few of them."""
    n = max(len(a), len(b))
    x = int.from_bytes(bytes(a).ljust(n, b"\0"), "little") ^ int.from_bytes(
        bytes(b).ljust(n, b"\0"), "little")
    count = x.bit_count()
    first: list[int] = []
    while x and len(first) < limit:
        low = x & -x
        first.append(low.bit_length() - 1)
        x ^= low
    return count, first


def pages(bm: bytearray) -> int:
    """Pages in a set."""
    return int.from_bytes(bm, "little").bit_count()


def makedumpfile(args: list[str], src: Path, out: Path, timeout: int = 600) -> str:
    """Run makedumpfile (its progress lines dropped); return its last messages."""
    out.unlink(missing_ok=True)
    r = subprocess.run(["makedumpfile", *args, str(src), str(out)], capture_output=True,
                       text=True, timeout=timeout)
    text = (r.stdout + r.stderr).rsplit("\r", 1)[-1]
    assert r.returncode == 0, text[-2000:]
    return text
