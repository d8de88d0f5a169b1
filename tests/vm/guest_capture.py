"""Run in the guest: record what the real /proc/kcore shows, and the system files kcore reads.

Usage: guest_capture.py OUTDIR.  Writes OUTDIR/kcore.json (ELF header, program headers, notes),
OUTDIR/kcore-head.bin (the file's first data_offset bytes) and OUTDIR/root/ (a copy of the
guest's /proc and /sys files that a userspace kcore reads).  Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from collections.abc import Iterator
from contextlib import contextmanager

KCORE = "/proc/kcore"
PAGE = 4096
ROOT_FILES = (
    "proc/iomem", "proc/kallsyms", "proc/cmdline", "proc/meminfo", "proc/modules",
    "proc/vmallocinfo", "proc/version", "proc/sys/kernel/osrelease", "proc/sys/kernel/arch",
    "sys/kernel/vmcoreinfo",
    "sys/kernel/btf/vmlinux",  # the kernel's types, kept by dumps made from this root
)
KPTR_RESTRICT = "/proc/sys/kernel/kptr_restrict"


def pread_all(fd: int, offset: int, length: int) -> bytes:
    """Read exactly length bytes (fewer only at end of file)."""
    out = bytearray()
    while len(out) < length:
        chunk = os.pread(fd, length - len(out), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def parse_kcore(fd: int) -> dict:
    """The ELF header, program headers and notes of an open kcore."""
    ehdr = pread_all(fd, 0, 64)
    (_ident, e_type, e_machine, _ver, _entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum, *_rest) = struct.unpack("<16sHHIQQQIHHHHHH", ehdr)
    raw = pread_all(fd, e_phoff, e_phnum * e_phentsize)
    phdrs = []
    for i in range(e_phnum):
        f = struct.unpack_from("<IIQQQQQQ", raw, i * e_phentsize)
        phdrs.append(dict(zip(("p_type", "p_flags", "p_offset", "p_vaddr", "p_paddr", "p_filesz",
                               "p_memsz", "p_align"), f, strict=True)))
    notes = []
    for ph in phdrs:
        if ph["p_type"] != 4:
            continue
        data = pread_all(fd, ph["p_offset"], ph["p_filesz"])
        pos = 0
        while pos + 12 <= len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
            name = data[pos + 12:pos + 12 + namesz].rstrip(b"\0").decode()
            desc_at = pos + 12 + (namesz + 3) // 4 * 4
            notes.append(dict(name=name, type=ntype, descsz=descsz,
                              desc_offset=ph["p_offset"] + desc_at,
                              desc=data[desc_at:desc_at + descsz].hex()))
            pos = desc_at + (descsz + 3) // 4 * 4
    note = next(p for p in phdrs if p["p_type"] == 4)
    data_offset = (note["p_offset"] + note["p_filesz"] + PAGE - 1) // PAGE * PAGE
    return dict(e_type=e_type, e_machine=e_machine, e_phoff=e_phoff, e_phnum=e_phnum,
                phdrs=phdrs, notes=notes, data_offset=data_offset,
                st_size=os.fstat(fd).st_size)


@contextmanager
def real_pointers() -> Iterator[None]:
    """kptr_restrict=1 for the body, so root reads real addresses (restored afterwards)."""
    with open(KPTR_RESTRICT) as f:
        saved = f.read()
    with open(KPTR_RESTRICT, "w") as f:
        f.write("1\n")
    try:
        yield
    finally:
        with open(KPTR_RESTRICT, "w") as f:
            f.write(saved)


def copy_root(out: str, files: tuple[str, ...] = ROOT_FILES, memory_blocks: bool = True) -> None:
    """Copy the system files into OUTDIR/root, with real pointers (and the memory blocks)."""
    with real_pointers():
        for rel in files:
            dst = os.path.join(out, "root", rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            with open("/" + rel, "rb") as src, open(dst, "wb") as f:
                shutil.copyfileobj(src, f)
    if not memory_blocks:
        return
    # memory blocks (hotplug): block size and each block's online/offline state
    memory = "sys/devices/system/memory"
    for name in ["block_size_bytes"] + sorted(n + "/state" for n in os.listdir("/" + memory)
                                               if n.startswith("memory")):
        dst = os.path.join(out, "root", memory, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join("/" + memory, name), dst)


def main() -> None:
    """Capture into sys.argv[1]."""
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    copy_root(out)
    fd = os.open(KCORE, os.O_RDONLY)
    info = parse_kcore(fd)
    with open(os.path.join(out, "kcore-head.bin"), "wb") as f:
        f.write(pread_all(fd, 0, info["data_offset"]))
    os.close(fd)
    with open(os.path.join(out, "kcore.json"), "w") as f:
        json.dump(info, f, indent=1)


if __name__ == "__main__":
    main()
