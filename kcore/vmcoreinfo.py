"""VMCOREINFO: the kernel's self-description note, parsed and located in physical memory."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kcore.errors import InputError
from kcore.wire.elf import NHDR, VMCOREINFO_NAME, align4

MAX_VMCOREINFO_BYTES = 1 << 16  # VMCOREINFO_BYTES is one page; anything far larger is garbage

_HEX = re.compile(r"[0-9a-fA-F]{1,16}")
_DECIMAL = re.compile(r"[0-9]{1,20}")
_SIGNED = re.compile(r"-?[0-9]{1,20}")
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
        """SYMBOL(name), a hex address (the kernel writes %lx)."""
        return self._value(f"SYMBOL({name})", _HEX, 16, "a hex address")

    def number(self, name: str) -> int | None:
        """NUMBER(name), a signed decimal (%ld), or 0x hex (%llx) as arm64's own numbers are
        written (kimage_voffset, PHYS_OFFSET, TCR_EL1_T1SZ, MODULES_VADDR...)."""
        key = f"NUMBER({name})"
        v = self.values.get(key)
        if v is not None and v.startswith("0x"):
            if not _HEX.fullmatch(v[2:]):
                raise InputError(f"VMCOREINFO {key}={v[:40]!r} is not a hex number")
            return int(v, 16)
        return self._value(key, _SIGNED, 10, "a decimal number")

    def size(self, name: str) -> int | None:
        """SIZE(name), a decimal (%lu)."""
        return self._value(f"SIZE({name})", _DECIMAL, 10, "a decimal size")

    def offset(self, name: str) -> int | None:
        """OFFSET(name), a decimal (%lu)."""
        return self._value(f"OFFSET({name})", _DECIMAL, 10, "a decimal offset")

    def length(self, name: str) -> int | None:
        """LENGTH(name), a decimal (%lu)."""
        return self._value(f"LENGTH({name})", _DECIMAL, 10, "a decimal length")

    @property
    def pagesize(self) -> int | None:
        """PAGESIZE, a decimal (%ld)."""
        return self._value("PAGESIZE", _DECIMAL, 10, "a decimal page size")

    def _value(self, key: str, form: re.Pattern[str], base: int, what: str) -> int | None:
        """The value of key parsed in base; InputError naming it when it is not `what`."""
        v = self.values.get(key)
        if v is None:
            return None
        if not form.fullmatch(v):
            raise InputError(f"VMCOREINFO {key}={v[:40]!r} is not {what}")
        n = int(v, base)
        if not -(1 << 63) <= n < 1 << 64:
            raise InputError(f"VMCOREINFO {key}={v[:40]!r} does not fit in 64 bits")
        return n

    @property
    def osrelease(self) -> str | None:
        """The kernel release (uname -r) the note was written by."""
        return self.values.get("OSRELEASE")

    @property
    def kerneloffset(self) -> int:
        """KERNELOFFSET: the KASLR slide of the kernel image (0 without KASLR)."""
        return self._value("KERNELOFFSET", _HEX, 16, "a hex offset") or 0


def parse_sysfs_vmcoreinfo(text: str, where: str) -> tuple[int, int]:
    """Parse /sys/kernel/vmcoreinfo ("PADDR SIZE", both hex) into (paddr, note buffer size)."""
    parts = text.split()
    try:
        # sprintf("%pa %x\n", ...): unsigned hex (the address with 0x), 64 and 32 bits
        if len(parts) != 2 or not all(_HEX.fullmatch(p.removeprefix("0x")) for p in parts):
            raise ValueError
        paddr, size = int(parts[0], 16), int(parts[1], 16)
        if size >= 1 << 32:
            raise ValueError
        return paddr, size
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
