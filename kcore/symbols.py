"""The dumped kernel's own symbols, kept with its memory: BTF, kallsyms, modules, release.

At dump time kcore gathers these files of the system (from the root: the live one or a saved
one) and keeps them in the dump, so Volatility and drgn need no debug package later:

- `sys/kernel/btf/vmlinux` and the loaded modules' `sys/kernel/btf/MODULE` (the kernel's
  types, Documentation/bpf/btf.rst; modules' BTF is split BTF on top of vmlinux's),
- `proc/kallsyms` (real addresses only as root: kptr_restrict reads them as zeros),
- `proc/modules` (with load addresses, as root), `proc/version` (or `linux_banner` read from
  memory), `etc/os-release`, `uname` (`uname -a`'s line, made from `proc/sys/kernel`),
- `sys/kernel/vmcoreinfo` (VMCOREINFO's text: the sidecar's copy; ELF and kdump have the note).

Each is one ELF note of owner "KCORE" (`NT_KCORE_FILE`: the path, NUL, the bytes as a zlib
stream). An ELF dump carries them in its PT_NOTE after the kernel's notes; a kdump file in its
sub header blocks right after the notes `size_note` counts (readers jump past those blocks);
LiME, raw, padded, AVML and kcore images in a sidecar `OUTPUT.symbols`, an ELF file holding
only that PT_NOTE.
"""

from __future__ import annotations

import contextlib
import os
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kcore.errors import InputError, KcoreError
from kcore.rootfiles import read_bounded
from kcore.sources.files import open_readonly
from kcore.wire.elf import (
    EHDR,
    EM_BY_ARCH,
    KCORE_NAME,
    NT_KCORE_FILE,
    PHDR,
    PT_NOTE,
    VMCOREINFO_NAME,
    ehdr,
    note,
    parse_notes,
    phdr,
)

SIDECAR = ".symbols"  # beside formats that have no room of their own for notes
BTF_DIR = "sys/kernel/btf"
KALLSYMS = "proc/kallsyms"
MODULES = "proc/modules"
VERSION = "proc/version"
OS_RELEASE = "etc/os-release"
UNAME = "uname"
VMCOREINFO = "sys/kernel/vmcoreinfo"
ZLIB_LEVEL = 1  # 3-4x on kallsyms and BTF at ~50 MB/s; level 6 gains 20% for 3x the time
MAX_FILE = 256 << 20  # no kernel's BTF or kallsyms comes near; a larger one is not ours
MAX_TOTAL = 1 << 30  # inflated bytes of one dump's symbol files, all told


@dataclass
class SymbolFiles:
    """The symbol files of one kernel: path under the root -> bytes, and what was missing."""

    files: dict[str, bytes] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)  # "path: why", for the summary
    machine: int | None = None  # the dump's ELF e_machine, where known
    _notes: dict[frozenset[str], bytes] = field(default_factory=dict, repr=False)

    def get(self, path: str) -> bytes | None:
        """A file's bytes, or None."""
        return self.files.get(path)

    def text(self, path: str) -> str | None:
        """A text file's contents, or None."""
        data = self.files.get(path)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def btf(self) -> bytes | None:
        """vmlinux's BTF."""
        return self.files.get(f"{BTF_DIR}/vmlinux")

    def module_btf(self) -> dict[str, bytes]:
        """Each loaded module's split BTF, by module name."""
        prefix = BTF_DIR + "/"
        return {p[len(prefix):]: d for p, d in self.files.items()
                if p.startswith(prefix) and p != prefix + "vmlinux"}

    def summary(self) -> dict[str, Any]:
        """What is kept, for the manifest and `kcore verify`: file sizes and what was not."""
        return {"files": {p: len(d) for p, d in sorted(self.files.items())},
                "missing": list(self.missing)}


@contextlib.contextmanager
def _reading(path: str) -> Iterator[int]:
    """A read-only fd of path, closed on leaving."""
    fd = open_readonly(path)
    try:
        yield fd
    finally:
        os.close(fd)


def _read_file(path: Path) -> bytes:
    """All of a file (proc and sysfs files report no size: read to EOF)."""
    with open(path, "rb", buffering=0) as f:
        data = read_bounded(f, MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise InputError(f"{path}: larger than {MAX_FILE >> 20} MiB")
    return data


def _uname(root: Path, arch: str | None) -> bytes | None:
    """`uname -a`'s line from proc/sys/kernel (ostype, hostname, osrelease, version)."""
    parts = []
    for name in ("ostype", "hostname", "osrelease", "version"):
        try:
            parts.append((root / "proc/sys/kernel" / name).read_text().strip())
        except OSError:
            return None
    machine = arch or ""
    try:
        machine = (root / "proc/sys/kernel/arch").read_text().strip() or machine
    except OSError:
        pass
    return (" ".join([*parts, machine, "GNU/Linux"]) + "\n").encode()


def _loaded_modules(modules: bytes | None) -> list[str]:
    """The module names of /proc/modules' lines."""
    if not modules:
        return []
    return [line.split(None, 1)[0] for line in modules.decode("utf-8", "replace").splitlines()
            if line.strip()]


def banner_in_memory(root: Path, system: Any) -> str | None:
    """linux_banner read from memory (its address from kallsyms), for roots without
    proc/version."""
    try:
        text = _read_file(root / KALLSYMS).decode("utf-8", "replace")
    except (OSError, ValueError, InputError):  # ValueError: a NUL byte in the root's path
        return None
    at = text.find(" linux_banner\n")
    if at < 0:
        return None
    try:
        vaddr = int(text[text.rfind("\n", 0, at) + 1:at].split()[0], 16)
        data, _stats = system.source.read_phys(system.addrmap.pa_symbol(vaddr), 512)
    except (KcoreError, OSError, ValueError, IndexError, AttributeError, TypeError):
        return None
    banner = data.split(b"\0")[0].decode("utf-8", "replace").strip()
    return banner if banner.startswith("Linux version ") else None


def gather(root: str | Path, system: Any = None) -> SymbolFiles:
    """The symbol files of the system at root (what is missing is listed, not an error)."""
    rootp = Path(root)
    out = SymbolFiles()

    def take(rel: str, required: bool = True) -> bytes | None:
        try:
            data = _read_file(rootp / rel)
        except FileNotFoundError:
            if required:
                out.missing.append(f"{rel}: not there")
            return None
        except (OSError, InputError) as exc:
            out.missing.append(f"{rel}: {getattr(exc, 'strerror', None) or exc}")
            return None
        out.files[rel] = data
        return data

    take(f"{BTF_DIR}/vmlinux")
    modules = take(MODULES)
    btf_dir = rootp / BTF_DIR
    for name in _loaded_modules(modules):
        if (btf_dir / name).exists():
            take(f"{BTF_DIR}/{name}", required=False)
    kallsyms = take(KALLSYMS)
    if kallsyms is not None and _hidden(kallsyms):
        del out.files[KALLSYMS]
        out.missing.append(f"{KALLSYMS}: addresses read as zeros (kptr_restrict): run as root")
    if take(VERSION, required=False) is None and system is not None:
        banner = banner_in_memory(rootp, system)
        if banner is not None:
            out.files[VERSION] = (banner + "\n").encode()
    if take(OS_RELEASE, required=False) is None:
        take("usr/lib/os-release", required=False)
        if "usr/lib/os-release" in out.files:
            out.files[OS_RELEASE] = out.files.pop("usr/lib/os-release")
    uname = _uname(rootp, getattr(getattr(system, "addrmap", None), "arch", None))
    if uname is not None:
        out.files[UNAME] = uname
    out.machine = EM_BY_ARCH.get(getattr(getattr(system, "addrmap", None), "arch", ""))
    vmcoreinfo = getattr(getattr(system, "vmcoreinfo", None), "data", None)
    if vmcoreinfo:
        out.files[VMCOREINFO] = bytes(vmcoreinfo)
    return out


def _hidden(kallsyms: bytes) -> bool:
    """Whether kallsyms' addresses all read as zero (kptr_restrict, or not root)."""
    head = kallsyms[:4096].split(b"\n")[:-1] or kallsyms.split(b"\n")[:1]
    return all(not line.split(b" ", 1)[0].strip(b"0") for line in head if line)


def to_notes(files: SymbolFiles, skip: Iterable[str] = ()) -> bytes:
    """The KCORE notes holding files (those in skip left out), in path order."""
    left = frozenset(skip)
    made = files._notes.get(left)
    if made is not None:
        return made
    from concurrent.futures import ThreadPoolExecutor

    paths = [p for p in sorted(files.files) if p not in left]
    # zlib drops the GIL: BTF and kallsyms (most of the bytes) compress on two CPUs at once,
    # before the dump's own threads start
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        packed = list(pool.map(lambda p: zlib.compress(files.files[p], ZLIB_LEVEL), paths))
    out = [note(KCORE_NAME, NT_KCORE_FILE, p.encode() + b"\0" + z)
           for p, z in zip(paths, packed, strict=True)]
    made = files._notes[left] = b"".join(out)
    return made


def elf_notes(files: SymbolFiles) -> bytes:
    """The notes an ELF or kdump dump carries (its own VMCOREINFO note is there already)."""
    return to_notes(files, skip=(VMCOREINFO,))


def sidecar(files: SymbolFiles, machine: int) -> bytes:
    """OUTPUT.symbols: an ELF core of the dump's machine holding only the KCORE notes."""
    notes = to_notes(files)
    offset = EHDR.size + PHDR.size
    return ehdr(machine, 1) + phdr(PT_NOTE, 0, offset, 0, 0, len(notes), 0, 0) + notes


def from_notes(notes: Iterable[tuple[bytes, int, bytes]], where: str) -> SymbolFiles:
    """The files in parsed (name, type, desc) notes; other owners' notes are skipped."""
    out = SymbolFiles()
    total = 0
    for name, ntype, desc in notes:
        if name != KCORE_NAME or ntype != NT_KCORE_FILE:
            continue
        path, nul, packed = desc.partition(b"\0")
        rel = path.decode("utf-8", "replace")
        if not nul or not rel or rel.startswith("/") or ".." in rel.split("/"):
            raise InputError(f"{where}: a KCORE note has a bad path {path[:40]!r}")
        d = zlib.decompressobj()
        try:
            data = d.decompress(packed, MAX_TOTAL - total + 1)
        except zlib.error as exc:
            raise InputError(f"{where}: the KCORE note of {rel} is damaged ({exc})") from None
        if not d.eof:
            raise InputError(f"{where}: the KCORE note of {rel} is truncated or too large")
        total += len(data)
        out.files[rel] = data
    return out


def _notes_of_elf(fd: int, path: str) -> tuple[int, list[tuple[bytes, int, bytes]]]:
    """An ELF file's e_machine and notes."""
    from kcore.errors import ElfFormatError
    from kcore.sources.elf import parse_elf_core

    try:
        core = parse_elf_core(fd, path)
    except ElfFormatError as exc:
        raise InputError(str(exc)) from None
    return core.e_machine, core.notes


def _notes_of_kdump(fd: int, path: str) -> tuple[int | None, list[tuple[bytes, int, bytes]]]:
    """A kdump file's machine (utsname's) and the notes in its sub header blocks, those
    after size_note included."""
    from kcore.errors import ElfFormatError
    from kcore.sources.files import file_size, pread_exact
    from kcore.wire import diskdump

    hdr = diskdump.DiskDumpHeader.unpack(pread_exact(fd, 0, diskdump.HEADER.size, path,
                                                     "kdump header"))
    if not 0 < hdr.block_size <= 1 << 20 or not 0 < hdr.sub_hdr_size <= 1 << 16:
        raise InputError(f"{path}: kdump header has block_size {hdr.block_size}, "
                         f"sub_hdr_size {hdr.sub_hdr_size}")
    end = min(file_size(fd), (1 + hdr.sub_hdr_size) * hdr.block_size)
    sub = diskdump.SubHeader.unpack(pread_exact(fd, hdr.block_size, diskdump.SUB_HEADER.size,
                                                path, "kdump sub header"), hdr.header_version)
    machine = EM_BY_ARCH.get(hdr.utsname[4].split(b"\0")[0].decode("ascii", "replace"))
    if not hdr.block_size < sub.offset_note < end:
        return machine, []
    data = pread_exact(fd, sub.offset_note, end - sub.offset_note, path, "kdump notes")
    try:
        return machine, parse_notes(data, sub.offset_note, path)
    except ElfFormatError:  # not kcore's: what follows the notes is another writer's
        return machine, parse_notes(data[:sub.size_note], sub.offset_note, path)


def read_dump(path: str) -> tuple[SymbolFiles, str] | None:
    """The symbol files a dump carries, and where they were (the dump, or its sidecar)."""
    from kcore.wire.diskdump import KDUMP_SIGNATURE
    from kcore.wire.elf import ELF_MAGIC

    notes: list[tuple[bytes, int, bytes]] = []
    machine = None
    with _reading(path) as fd:
        head = os.pread(fd, 8, 0)
        if head.startswith(ELF_MAGIC):
            machine, notes = _notes_of_elf(fd, path)
        elif head == KDUMP_SIGNATURE:
            machine, notes = _notes_of_kdump(fd, path)
    found, where = from_notes(notes, path), path
    if not found.files and os.path.exists(path + SIDECAR):
        where = path + SIDECAR
        with _reading(where) as fd:
            machine, side_notes = _notes_of_elf(fd, where)
        found = from_notes(side_notes, where)
    if not found.files:
        return None
    found.machine = machine
    if VMCOREINFO not in found.files:  # an ELF or kdump file's own VMCOREINFO note
        for name, _ntype, desc in notes:
            if name == VMCOREINFO_NAME:
                found.files[VMCOREINFO] = desc
                break
    return found, where
