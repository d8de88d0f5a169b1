"""Helpers of the arm64 vm tests: reads of the guest's real /proc/kcore with busybox dd."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.vm.guests import Guest

PAGE = 4096
PT_LOAD = 1


def loads(guest: Guest) -> list[dict]:
    """The real kcore's PT_LOAD program headers, in file order."""
    return [p for p in guest.kcore["phdrs"] if p["p_type"] == PT_LOAD]


def kcore_offset(guest: Guest, vaddr: int) -> int:
    """The real kcore's file offset of a kernel address (from its program headers)."""
    for p in loads(guest):
        if p["p_vaddr"] <= vaddr < p["p_vaddr"] + p["p_memsz"]:
            return p["p_offset"] + vaddr - p["p_vaddr"]
    raise AssertionError(f"{vaddr:#x} is in no PT_LOAD of the real kcore")


def symbol(guest: Guest, name: str) -> int:
    """A core-kernel symbol's address in the guest's kallsyms."""
    for line in (guest.root / "proc/kallsyms").read_text().splitlines():
        addr, _kind, rest = line.split(" ", 2)
        if rest == name:
            return int(addr, 16)
    raise KeyError(name)


def vmcoreinfo(guest: Guest) -> dict[str, str]:
    """The VMCOREINFO note of the real kcore, as KEY -> value text."""
    note = next(n for n in guest.kcore["notes"] if n["name"] == "VMCOREINFO")
    out = {}
    for line in bytes.fromhex(note["desc"]).decode().splitlines():
        key, _, value = line.partition("=")
        out[key] = value
    return out


def guest_read(guest: Guest, regions: list[tuple[int, int, int]], name: str = "reads"
               ) -> list[bytes]:
    """Read (kcore offset, pages, zero-page offset or 0) regions of the guest's real kcore."""
    out = guest.vm.share / name
    shutil.rmtree(out, ignore_errors=True)
    spec = guest.vm.share / f"{name}.regions"
    spec.write_text("".join(f"{off} {pages} {zero}\n" for off, pages, zero in regions))
    guest.vm.run(f"sh {guest.vm.share / 'guest_read.sh'} {spec} {out}\n", timeout=600).check()
    return [(out / f"{i}.bin").read_bytes() for i in range(len(regions))]


def phys_read(image: Path, paddr: int, length: int) -> bytes:
    """Bytes of the guest's physical memory image."""
    with open(image, "rb") as f:
        f.seek(paddr)
        return f.read(length)
