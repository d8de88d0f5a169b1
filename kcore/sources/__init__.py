"""Memory sources: where kernel memory is read (raw, padded, lime, elf, kcore, devmem, pid)."""

from __future__ import annotations

import errno
import os
import stat

from kcore.errors import InputError, SourceError
from kcore.sources.base import PAGE_SIZE, Extent, MemorySource, open_readonly
from kcore.sources.devmem import DevmemSource
from kcore.sources.elf import ELF_MAGIC, ElfSource, parse_elf_core
from kcore.sources.kcore import KcoreSource, looks_like_kcore
from kcore.sources.lime import AVML_MAGIC, LIME_MAGIC, LimeSource
from kcore.sources.padded import PaddedSource
from kcore.sources.pid import PidSource
from kcore.sources.raw import RawSource

__all__ = [
    "DevmemSource",
    "ElfSource",
    "Extent",
    "KcoreSource",
    "LimeSource",
    "MemorySource",
    "PaddedSource",
    "PidSource",
    "RawSource",
    "detect",
    "open_source",
]

KINDS = ("raw", "padded", "lime", "elf", "kcore", "devmem", "pid")
# `auto`: the live system's sources, in the order they are tried (root-relative).
AUTO_ORDER = ("proc/kcore", "dev/crash", "dev/mem")


def open_source(spec: str, root: str = "/") -> MemorySource:
    """Open a memory source from a spec: KIND:PATH, a bare PATH (detected), or auto."""
    if spec == "auto":
        return open_auto(root)
    kind, sep, rest = spec.partition(":")
    if sep and kind in KINDS:
        if not rest:
            raise SourceError(f"{spec}: missing path after {kind}:")
        if kind == "pid":
            return PidSource.open(rest, root, spec)
        if kind == "devmem":
            return DevmemSource.open(rest, root, spec)
        cls = {"raw": RawSource, "padded": PaddedSource, "lime": LimeSource,
               "elf": ElfSource, "kcore": KcoreSource}[kind]
        return cls.open(rest, spec)
    return detect(spec, root)


def detect(path: str, root: str = "/") -> MemorySource:
    """Open `path` as the source its contents say it is: kcore, ELF core, LiME, or raw."""
    fd = open_readonly(path)
    try:
        st = os.fstat(fd)
        if stat.S_ISCHR(st.st_mode):
            if os.path.basename(os.path.realpath(path)) in ("mem", "crash"):
                return DevmemSource.open(path, root, path)
            raise SourceError(f"{path}: a character device that is not /dev/mem or /dev/crash")
        try:
            head = os.pread(fd, 8, 0)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read at offset 0x0: {os.strerror(exc.errno)}") \
                from None
        if stat.S_ISREG(st.st_mode) and st.st_size == 0 or not head:
            raise SourceError(f"{path}: empty file at offset 0x0 (no memory to read)")
        if head[:4] == ELF_MAGIC:
            kcore = looks_like_kcore(parse_elf_core(fd, path))
            return (KcoreSource if kcore else ElfSource).open(path, path)
        magic = int.from_bytes(head[:4], "little")
        if magic in (LIME_MAGIC, AVML_MAGIC):
            return LimeSource.open(path, path)
        return RawSource.open(path, path)
    finally:
        os.close(fd)


def _lockdown(root: str) -> str | None:
    """The active kernel lockdown mode under root, if any ("integrity"/"confidentiality")."""
    try:
        with open(os.path.join(root, "sys/kernel/security/lockdown"), encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    mode = text[start + 1:end] if 0 <= start < end else ""
    return None if mode in ("", "none") else mode


def _why(err: int, root: str, devmem: bool) -> str:
    """Why opening a live source failed with errno `err`, for the `auto` error."""
    if err in (errno.EPERM, errno.EACCES):
        mode = _lockdown(root)
        if mode and (devmem or mode == "confidentiality"):
            return f"kernel lockdown ({mode}) forbids it"
        if os.geteuid() != 0:
            return f"{os.strerror(err)} (run as root)"
        return os.strerror(err) + (" (kernel lockdown or an LSM?)" if mode is None else "")
    if err == errno.ENOENT:
        return "missing"
    return os.strerror(err)


def _probe_devmem(src: DevmemSource) -> None:
    """Read one page of RAM above 1 MiB: with STRICT_DEVMEM that fails with EPERM."""
    above = [e for e in src.extents if e.paddr + e.length > 0x100000]
    if not above:
        return
    paddr = max(above[0].paddr, 0x100000)
    try:
        os.pread(src.fd, PAGE_SIZE, paddr)
    except OSError as exc:
        if exc.errno == errno.EPERM:
            raise SourceError("STRICT_DEVMEM forbids reading RAM above 1 MiB "
                              "(CONFIG_STRICT_DEVMEM / iomem=relaxed)") from None
        raise SourceError(f"reading {paddr:#x} fails: {os.strerror(exc.errno)}") from None


def open_auto(root: str = "/") -> MemorySource:
    """Open the live system's memory: proc/kcore, then dev/crash, then dev/mem under root."""
    tried = []
    for rel in AUTO_ORDER:
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            tried.append(f"{path}: missing")
            continue
        devmem = rel.startswith("dev/")
        try:
            if devmem:
                src: MemorySource = DevmemSource.open(path, root, "auto")
                try:
                    _probe_devmem(src)
                except BaseException:
                    src.close()
                    raise
            else:
                src = KcoreSource.open(path, "auto")
            return src
        except (SourceError, InputError) as exc:
            err = getattr(exc, "errno", None)
            reason = _why(err, root, devmem) if err else str(exc).removeprefix(f"{path}: ")
            tried.append(f"{path}: {reason}")
    raise SourceError("no live memory source works: " + "; ".join(tried))
