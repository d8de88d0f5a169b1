"""A Volatility 3 ISF (symbol table) from a kernel's own BTF and kallsyms, no debug package.

The types (structs and unions with their field offsets, enums, base types) come from
`sys/kernel/btf/vmlinux`, the symbols from `proc/kallsyms` moved back to their link-time
addresses (minus VMCOREINFO's KERNELOFFSET: Volatility finds the KASLR shift itself), and
`linux_banner`'s constant data (how Volatility matches an ISF to an image) from
`proc/version`. The BTF parsing and the ISF layout are pakunoda's (PyPI: its BTF parser and
ISF generator, which know which symbol Volatility's plugins read with which type); kcore gives
it the files a dump keeps (kcore.symbols) instead of a scan of the memory image.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from kcore.errors import InputError
from kcore.extras import require
from kcore.symbols import KALLSYMS, UNAME, VERSION, VMCOREINFO, SymbolFiles

# Volatility opens .json, .json.gz, .json.xz and .json.bz2; gzip level 6 writes ~20 MB of
# JSON in under a second (xz took several)
SUFFIX = ".json.gz"
PAKUNODA_ARCH = {"x86_64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}
EM_TO_ARCH = {62: "x86_64", 183: "aarch64"}


def _kernel_offset(files: SymbolFiles, text_addr: int | None = None) -> int:
    """VMCOREINFO's KERNELOFFSET (hex; 0 when the kernel was not relocated). Without
    VMCOREINFO, on x86-64: _text's distance from its link address (preflight's)."""
    from kcore.preflight import DEFAULT_TEXT_BASE

    text = files.text(VMCOREINFO)
    if text is None:
        if text_addr and arch_of(files) == "x86_64":
            return text_addr - DEFAULT_TEXT_BASE
        return 0
    m = re.search(r"^KERNELOFFSET=([0-9a-fA-F]+)$", text, re.M)
    return int(m.group(1), 16) if m else 0


def release_of(files: SymbolFiles) -> str | None:
    """The kernel release: VMCOREINFO's OSRELEASE, else uname's third word."""
    m = re.search(r"^OSRELEASE=(\S+)$", files.text(VMCOREINFO) or "", re.M)
    if m:
        return m.group(1)
    words = (files.text(UNAME) or "").split()
    return words[2] if len(words) > 2 else None


def arch_of(files: SymbolFiles) -> str:
    """The architecture: the dump's ELF machine, else uname's machine."""
    if files.machine in EM_TO_ARCH:
        return EM_TO_ARCH[files.machine]
    words = (files.text(UNAME) or "").split()
    for w in reversed(words):
        if w in PAKUNODA_ARCH:
            return PAKUNODA_ARCH[w]
    return "x86_64"


def link_time_symbols(files: SymbolFiles) -> dict[str, int]:
    """The core kernel's kallsyms symbols at their link-time addresses.

    Module symbols (lines with [module]) are left out; image symbols (from _text on) lose
    KERNELOFFSET; per-CPU offsets on x86-64 (below _text) stay as they are.
    """
    text = files.text(KALLSYMS)
    if text is None:
        raise InputError("no proc/kallsyms among the symbol files: the ISF needs its symbols")
    symbols: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # a module's symbol (4 columns) or not a symbol line
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        symbols.setdefault(parts[2], addr)
    base = symbols.get("_text") or symbols.get("_stext")
    if not base:
        raise InputError("proc/kallsyms has no _text or _stext with a real address "
                         "(kptr_restrict hid them when the dump was taken)")
    shift = _kernel_offset(files, symbols.get("_text"))
    if shift:
        symbols = {n: a - shift if a >= base else a for n, a in symbols.items()}
    return symbols


def build(files: SymbolFiles) -> dict[str, Any]:
    """The ISF of the kernel whose symbol files these are (pakunoda required)."""
    btf = files.btf
    if btf is None:
        raise InputError("no sys/kernel/btf/vmlinux among the symbol files: the kernel "
                         "was built without CONFIG_DEBUG_INFO_BTF, or the dump was taken "
                         "with --no-symbols")
    require("pakunoda", "volatility", "pakunoda")
    from pakunoda.arch.registry import get_arch
    from pakunoda.generators.isf_generator import ISFGenerator
    from pakunoda.parsers.btf.parser import BTFParser

    symbols = link_time_symbols(files)
    try:
        table = BTFParser().parse(btf)
    except Exception as exc:  # pakunoda's parser raises its own errors, and struct's
        raise InputError(f"sys/kernel/btf/vmlinux: not BTF pakunoda can parse "
                         f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
                         ) from None
    banner = files.get(VERSION)
    arch = get_arch(arch_of(files))
    if arch is None:
        raise InputError(f"pakunoda knows no architecture {arch_of(files)}")
    generator = ISFGenerator(table, arch, symbols,
                             banner_bytes=banner.rstrip(b"\0") if banner else None,
                             kernel_release=release_of(files))
    isf: dict[str, Any] = generator.generate().to_isf_dict()
    # Volatility's schema takes no key of ours in metadata: the producer record takes them
    isf["metadata"].setdefault("producer", {})["kcore"] = {
        "release": release_of(files),
        "kernel_offset": hex(_kernel_offset(files, symbols.get("_text"))),
        "btf_sha256": hashlib.sha256(btf).hexdigest()}
    return isf


def identity(files: SymbolFiles) -> str:
    """A short digest of the BTF, kallsyms and banner: one ISF per kernel boot."""
    h = hashlib.sha256()
    for path in ("sys/kernel/btf/vmlinux", KALLSYMS, VERSION, VMCOREINFO):
        h.update(path.encode() + b"\0" + (files.get(path) or b"") + b"\0")
    return h.hexdigest()[:16]


def file_name(files: SymbolFiles) -> str:
    """The ISF's file name: the release and the identity."""
    release = re.sub(r"[^A-Za-z0-9._+-]", "_", release_of(files) or "linux")
    return f"{release}-{identity(files)}{SUFFIX}"


def encode(isf: dict[str, Any]) -> bytes:
    """The ISF as gzip-compressed JSON."""
    return gzip.compress(json.dumps(isf, separators=(",", ":")).encode(), 6, mtime=0)


def cached(files: SymbolFiles, folder: Path) -> Path:
    """folder/NAME, built now unless an earlier run built it (written atomically)."""
    import os

    out = folder / file_name(files)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(encode(build(files)))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
