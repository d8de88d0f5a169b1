"""The live system's memory sources: which one `--source auto` opens, and why each other fails.

`--source auto`, `kcore check` and the dump's manifest all ask these probes, so the three
give the same reason for the same source: proc/kcore, then dev/crash, then dev/mem under the
root, each opened and made to read one page of System RAM (a kcore masked by a container, a
kernel lockdown, STRICT_DEVMEM and a missing driver each say so).
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kcore.errors import InputError, KcoreError, SourceError
from kcore.rootfiles import read_root_text
from kcore.sources.base import Extent, MemorySource
from kcore.sources.devmem import DevmemSource
from kcore.sources.kcore import KcoreSource

# (name, root-relative path), in the order `auto` tries them
AUTO_ORDER = (("kcore", "proc/kcore"), ("crash", "dev/crash"), ("mem", "dev/mem"))
KCORE_MIN_SIZE = 1 << 20  # a real /proc/kcore is ~128 TiB; anything this small is not one
ELF_MAGIC = b"\x7fELF"
LOW_RAM = 0x100000  # STRICT_DEVMEM allows the first MiB: the probe reads above it
PROBE_PAGE = 4096


@dataclass
class SourceProbe:
    """One live source: whether it can be read, and why not."""

    name: str
    path: str
    works: bool
    reason: str


def _read(root: Path, rel: str) -> str | None:
    """A root file's text, or None when it is missing or cannot be read (a probe says why)."""
    try:
        return read_root_text(root, rel, required=False)
    except InputError:
        return None


def lockdown_mode(root: Path) -> tuple[str | None, str]:
    """The lockdown mode ("none", "integrity", "confidentiality") or None, and how it was known."""
    text = _read(root, "sys/kernel/security/lockdown")
    if text is not None:
        start, end = text.find("["), text.find("]")
        if 0 <= start < end:
            return text[start + 1:end], "from sys/kernel/security/lockdown"
        return None, f"sys/kernel/security/lockdown reads {text.strip()!r}"
    cmdline = (_read(root, "proc/cmdline") or "").split()
    asked = [w.split("=", 1)[1] for w in cmdline if w.startswith("lockdown=")]
    security = root / "sys/kernel/security"
    try:
        mounted = security.is_dir() and bool(os.listdir(security))
    except OSError:
        mounted = False
    how = ("no lockdown LSM (sys/kernel/security/lockdown is missing)" if mounted else
           "securityfs is not mounted at sys/kernel/security")
    if asked:
        return asked[-1], f"from the boot command line (lockdown={asked[-1]}); {how}"
    return None, how


def why_errno(err: int | None, lockdown: str | None, euid: int, devmem: bool) -> str:
    """Why opening a live source failed with errno err, in words that say what to do."""
    if err in (errno.EPERM, errno.EACCES):
        if lockdown in ("integrity", "confidentiality") and (devmem or
                                                             lockdown == "confidentiality"):
            return f"kernel lockdown ({lockdown}) forbids it"
        if euid != 0:
            return f"{os.strerror(err)}: run as root"
        return f"{os.strerror(err)} as root (an LSM, or a container without CAP_SYS_RAWIO?)"
    if err == errno.ENOENT:
        return "missing"
    return os.strerror(err) if err else "cannot open"


def kcore_mask(root: Path) -> str | None:
    """Why proc/kcore is masked or not a real kcore (None when it looks real)."""
    path = root / "proc/kcore"
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    if stat.S_ISCHR(st.st_mode):
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        what = " (/dev/null)" if dev == "1:3" else ""
        return f"a character device {dev}{what} is mounted over it (a container's mask)"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size < KCORE_MIN_SIZE:
        return f"{st.st_size} bytes long, not ~128 TiB (masked, or a kernel without kcore)"
    return None


def first_ram_page(src: Any) -> int | None:
    """The physical address of a page of RAM above 1 MiB in a source (below when none)."""
    exts: list[Extent] = [e for e in src.extents if e.length >= PROBE_PAGE]
    above = [e for e in exts if e.paddr + e.length >= LOW_RAM + PROBE_PAGE]
    if above:
        return max(above[0].paddr, LOW_RAM)
    return exts[0].paddr if exts else None


def _missing(name: str) -> str:
    return {"kcore": "missing (kernel without CONFIG_PROC_KCORE)",
            "crash": "missing (the out-of-tree crash driver is not loaded)",
            "mem": "missing (kernel without CONFIG_DEVMEM)"}[name]


def _open(root: Path, name: str, rel: str, lockdown: str | None, euid: int
          ) -> tuple[SourceProbe, MemorySource | None]:
    """Open one live source and read a page of RAM through it: the probe, and the source when
    it works (the caller closes it)."""
    path = root / rel
    spath = str(path)
    devmem = name != "kcore"
    try:
        present = os.path.lexists(path)
    except ValueError:
        present = False
    if not present:
        return SourceProbe(name, spath, False, _missing(name)), None
    if not devmem:
        mask = kcore_mask(root)
        if mask is not None:
            return SourceProbe(name, spath, False, f"masked: {mask}"), None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        return SourceProbe(name, spath, False, why_errno(exc.errno, lockdown, euid, devmem)), None
    try:
        head = b"" if devmem else os.pread(fd, 4, 0)
    except OSError as exc:
        return SourceProbe(name, spath, False, f"reading it fails: {exc.strerror}"), None
    finally:
        os.close(fd)
    if not devmem and head != ELF_MAGIC:
        return SourceProbe(name, spath, False,
                           "masked: reads give no ELF header (a container's mask?)"), None
    src: MemorySource
    try:
        src = (DevmemSource.open(spath, "auto", str(root)) if devmem
               else KcoreSource.open(spath, "auto"))
    except SourceError as exc:
        reason = (why_errno(exc.errno, lockdown, euid, devmem) if exc.errno
                  else str(exc).removeprefix(f"{spath}: "))
        return SourceProbe(name, spath, False, reason), None
    except KcoreError as exc:
        return SourceProbe(name, spath, False, str(exc).removeprefix(f"{spath}: ")), None
    unreadable = _read_ram(src, name)
    if unreadable is not None:
        src.close()
        return SourceProbe(name, spath, False, unreadable), None
    return SourceProbe(name, spath, True, "reads RAM"), src


def _read_ram(src: MemorySource, name: str) -> str | None:
    """Why one page of RAM cannot be read through an open source (None when it can)."""
    paddr = first_ram_page(src)
    if paddr is None:
        return ("no RAM segment with a physical address (kernel older than 4.11?)"
                if name == "kcore" else "no System RAM in proc/iomem")
    offset = next(e.offset + paddr - e.paddr for e in src.extents
                  if e.paddr <= paddr < e.paddr + e.length)
    fd = src.fd
    try:
        os.pread(fd, PROBE_PAGE, offset)
    except OSError as exc:
        if exc.errno == errno.EPERM and name == "mem":
            return (f"STRICT_DEVMEM forbids reading RAM above 1 MiB (physical {paddr:#x}; "
                    "CONFIG_STRICT_DEVMEM, boot with iomem=relaxed)")
        return f"reading RAM at physical {paddr:#x} fails: {exc.strerror}"
    return None


def probe(root: Path, name: str, lockdown: str | None, euid: int) -> SourceProbe:
    """Probe one live source by name ("kcore", "crash", "mem") under root; close it again."""
    rel = dict(AUTO_ORDER)[name]
    found, src = _open(root, name, rel, lockdown, euid)
    if src is not None:
        src.close()
    return found


def probe_all(root: Path, lockdown: str | None = None, euid: int | None = None
              ) -> list[SourceProbe]:
    """Every live source under root, in auto's order."""
    if lockdown is None:
        lockdown = lockdown_mode(root)[0]
    who = os.geteuid() if euid is None else euid
    return [probe(root, name, lockdown, who) for name, _rel in AUTO_ORDER]


def open_auto(root: str = "/") -> MemorySource:
    """Open the live system's memory: proc/kcore, then dev/crash, then dev/mem under root."""
    rootp = Path(root)
    mode = lockdown_mode(rootp)[0]
    euid = os.geteuid()
    tried = []
    for name, rel in AUTO_ORDER:
        found, src = _open(rootp, name, rel, mode, euid)
        if src is not None:
            return src
        tried.append(f"{found.path}: {found.reason}")
    raise SourceError("no live memory source works: " + "; ".join(tried))
