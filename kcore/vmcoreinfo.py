"""VMCOREINFO: the kernel's self-description note, parsed and located in physical memory."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kcore.errors import InputError
from kcore.wire.elf import NHDR, VMCOREINFO_NAME, align4

MAX_VMCOREINFO_BYTES = 1 << 16  # VMCOREINFO_BYTES is one page; anything far larger is garbage

_KEY = re.compile(r"^(?:(SYMBOL|SIZE|OFFSET|LENGTH|NUMBER)\((.+)\)|([A-Z_-]+))$")


@dataclass(frozen=True)
class VmcoreInfo:
    """The VMCOREINFO text (exact bytes, as the kcore note carries them) and its key=value map."""

    data: bytes
    values: dict[str, str]

    @classmethod
    def parse(cls, data: bytes) -> VmcoreInfo:
        """Parse VMCOREINFO text; keys like SYMBOL(x) are kept verbatim."""
        values: dict[str, str] = {}
        for line in data.decode("ascii", "replace").splitlines():
            key, sep, value = line.partition("=")
            if sep and _KEY.match(key):
                values[key] = value
        if "OSRELEASE" not in values and "PAGESIZE" not in values:
            raise InputError("VMCOREINFO text has neither OSRELEASE nor PAGESIZE: not a VMCOREINFO")
        return cls(data=data, values=values)

    def get(self, key: str, default: str | None = None) -> str | None:
        """The raw value of a key such as 'SYMBOL(_stext)' or 'OSRELEASE'."""
        return self.values.get(key, default)

    def symbol(self, name: str) -> int | None:
        """SYMBOL(name), a hex address."""
        v = self.values.get(f"SYMBOL({name})")
        return None if v is None else int(v, 16)

    def number(self, name: str) -> int | None:
        """NUMBER(name), a signed decimal."""
        v = self.values.get(f"NUMBER({name})")
        return None if v is None else int(v, 0)

    def size(self, name: str) -> int | None:
        """SIZE(name), a decimal."""
        v = self.values.get(f"SIZE({name})")
        return None if v is None else int(v)

    @property
    def osrelease(self) -> str | None:
        """The kernel release (uname -r) the note was written by."""
        return self.values.get("OSRELEASE")

    @property
    def kerneloffset(self) -> int:
        """KERNELOFFSET: the KASLR slide of the kernel image (0 without KASLR)."""
        return int(self.values.get("KERNELOFFSET", "0"), 16)


def parse_sysfs_vmcoreinfo(text: str, where: str) -> tuple[int, int]:
    """Parse /sys/kernel/vmcoreinfo ("PADDR SIZE", both hex) into (paddr, note buffer size)."""
    parts = text.split()
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0], 16), int(parts[1], 16)  # sprintf("%lx %x\n", ...)
    except ValueError:
        raise InputError(f"{where}: expected 'PADDR SIZE', got {text.strip()[:60]!r}") from None


def parse_note(buf: bytes, where: str) -> bytes:
    """Extract the VMCOREINFO descriptor from the note kept at paddr_vmcoreinfo_note."""
    if len(buf) < NHDR.size:
        raise InputError(f"{where}: VMCOREINFO note truncated")
    namesz, descsz, _ntype = NHDR.unpack_from(buf)
    name_end = NHDR.size + namesz
    desc_start = NHDR.size + align4(namesz)
    name = buf[NHDR.size:name_end].rstrip(b"\0")
    if name != VMCOREINFO_NAME:
        raise InputError(
            f"{where}: no VMCOREINFO note there (name {name[:16]!r}, namesz {namesz}); "
            "the memory source does not match this system root"
        )
    if descsz == 0 or descsz > MAX_VMCOREINFO_BYTES or desc_start + descsz > len(buf):
        raise InputError(f"{where}: VMCOREINFO note descsz {descsz} is out of range")
    return bytes(buf[desc_start:desc_start + descsz])
