"""drgn on any kcore source: a drgn.Program whose memory is read through kcore, no dump between.

The Program sees what drgn sees when it opens the kernel's own /proc/kcore: one virtual
segment per kcore PT_LOAD (kernel text, vmalloc and modules areas, the direct map of each
System RAM range, vmemmap), one physical segment per System RAM range, and the kernel's
VMCOREINFO (KASLR offset, page-table root, page size) given to
`Program.set_linux_kernel_custom()`, which also sets up drgn's own page-table walks for
addresses outside the segments. Every read goes through `KcoreFile.pread()`, so RAM comes
from the C engine in one call. Addresses outside the kclist (and physical addresses outside
System RAM) raise drgn.FaultError; inside it, what /proc/kcore gives: zeros for unmapped
vmalloc pages and for pages the source lacks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kcore.errors import KcoreError
from kcore.integrations import require
from kcore.kclist import KcoreType

if TYPE_CHECKING:
    import drgn as drgn_types

    from kcore.kcorefile import KcoreFile

log = logging.getLogger("kcore.drgn")
# Sources whose memory changes while drgn reads it: the Program is flagged IS_LIVE.
LIVE_KINDS = frozenset({"kcore", "devmem", "pid"})
# Pages of a non-live source kept after a read (kcore's segments are page-aligned in the file).
CACHE_PAGES = 8192  # 32 MiB
_PAGE = 4096
_PAGE_MASK = _PAGE - 1


def _import_drgn() -> Any:
    return require("drgn", "drgn")


def is_live(kfile: KcoreFile) -> bool:
    """Whether the kcore file reads a running kernel (/proc/kcore, /dev/mem, a VM's process)."""
    return getattr(kfile.source, "kind", "") in LIVE_KINDS


def _reader(kfile: KcoreFile, base: int, fault: Any,
            cache: dict[int, bytes] | None) -> Callable[[int, int, int, bool], bytes]:
    """drgn's read_fn for a segment that starts at kcore file offset `base`.

    With a cache (sources that do not change: files), reads within one page are served from
    that page, read once through KcoreFile.pread; drgn reads a structure field by field.
    """
    pread = kfile.pread

    def read(address: int, count: int, offset: int, physical: bool) -> bytes:
        try:
            return pread(count, base + offset)
        except KcoreError as exc:
            raise fault(f"kcore: {exc}", address) from None

    if cache is None:
        return read

    def read_cached(address: int, count: int, offset: int, physical: bool) -> bytes:
        pos = base + offset
        at = pos & _PAGE_MASK
        if at + count > _PAGE:  # crosses a page: straight through
            return read(address, count, offset, physical)
        page = pos - at
        data = cache.get(page)
        if data is None:
            if len(cache) >= CACHE_PAGES:
                cache.clear()
            data = cache[page] = read(address - at, _PAGE, offset - at, physical)
        return data[at:at + count]

    return read_cached


def attach(prog: drgn_types.Program, kfile: KcoreFile, *, live: bool | None = None) -> None:
    """Give `prog` (made with the kernel's platform, no target yet) the kernel in `kfile`.

    Live kernels are read afresh each time; other sources through a page cache.
    """
    drgn = _import_drgn()
    live = is_live(kfile) if live is None else live
    cache: dict[int, bytes] | None = None if live else {}
    loads = [(entry, offset) for entry, offset in kfile.header.loads if entry.size > 0]
    # Physical segments first: set_linux_kernel_custom() reads the page tables through them.
    for entry, offset in loads:
        if entry.type == KcoreType.RAM:
            prog.add_memory_segment(entry.paddr, entry.size,
                                    _reader(kfile, offset, drgn.FaultError, cache), True)
    prog.set_linux_kernel_custom(kfile.system.vmcoreinfo.data, live)
    # Then the virtual ones, which take precedence over drgn's page-table walk where they are.
    for entry, offset in loads:
        prog.add_memory_segment(entry.vaddr, entry.size,
                                _reader(kfile, offset, drgn.FaultError, cache), False)


def load_debug_info(prog: drgn_types.Program, symbols: Sequence[str] = (), *,
                    default: bool = True) -> str | None:
    """Load vmlinux (and module) debug info: the given files, then drgn's usual places.

    Returns None when the kernel's own debug info is loaded, else why not (one line).
    """
    drgn = _import_drgn()
    try:
        prog.load_debug_info(list(symbols), default=default, main=True)
    except drgn.MissingDebugInfoError as exc:
        try:
            main = prog.main_module()
            missing = main.wants_debug_file() or main.wants_loaded_file()
        except LookupError:
            missing = True
        if missing:
            return str(exc).splitlines()[0]
        log.info("%s", exc)
    return None


def program(root: str = "/", source: Any = "auto", *, symbols: Iterable[str] = (),
            default_symbols: bool = True, debug_info: bool = True) -> drgn_types.Program:
    """A drgn.Program for the kernel at `root`, its memory read from `source` through kcore.

    `symbols` are vmlinux or module files with debug info to try first; with
    `default_symbols` drgn also looks where it usually does (/usr/lib/debug, /boot,
    /lib/modules). Missing debug info is logged (logger "kcore.drgn"), not an error: the
    Program still reads memory. `debug_info=False` loads none.
    """
    drgn = _import_drgn()
    import kcore

    kfile = kcore.open(root, source)
    try:
        arch = getattr(kfile.system, "addrmap", None)
        arch = getattr(arch, "arch", "x86_64")
        platform = drgn.Platform(drgn.Architecture.AARCH64 if arch == "aarch64"
                                 else drgn.Architecture.X86_64,
                                 drgn.PlatformFlags.IS_64_BIT
                                 | drgn.PlatformFlags.IS_LITTLE_ENDIAN)
        prog = drgn.Program(platform)
        attach(prog, kfile)
    except BaseException:
        kfile.close()
        raise
    if debug_info:
        why = load_debug_info(prog, list(symbols), default=default_symbols)
        if why is not None:
            log.warning("no debug info for the kernel %s: %s (install its -dbg package or "
                        "pass its vmlinux)", kfile.system.osrelease or "", why)
    return prog


def kallsyms_index(text: str) -> Any:
    """A drgn.SymbolIndex of /proc/kallsyms text (modules' symbols included): each symbol's
    size runs to the next address, its binding and kind come from nm's type letter."""
    drgn = _import_drgn()
    entries: list[tuple[int, str, str]] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 3 or len(parts[1]) != 1:
            continue
        try:
            entries.append((int(parts[0], 16), parts[1], parts[2]))
        except ValueError:
            continue
    entries.sort()
    out = []
    for i, (addr, letter, name) in enumerate(entries):
        size = entries[i + 1][0] - addr if i + 1 < len(entries) else 0
        if letter in "wWvV":
            binding = drgn.SymbolBinding.WEAK
        elif letter.isupper():
            binding = drgn.SymbolBinding.GLOBAL
        else:
            binding = drgn.SymbolBinding.LOCAL
        kind = (drgn.SymbolKind.FUNC if letter in "tT" else drgn.SymbolKind.OBJECT
                if letter.lower() in "dbrgsvc" else drgn.SymbolKind.UNKNOWN)
        out.append(drgn.Symbol(name, addr, size, binding, kind))
    return drgn.SymbolIndex(out)


def dump_program(path: str, *, symbols: Iterable[str] = (), default_symbols: bool = False
                 ) -> drgn_types.Program:
    """A drgn.Program on a dump drgn opens itself (an ELF core or a kdump file), with the
    kallsyms kcore kept in it as a symbol finder: symbols resolve with no debug info.

    Debug info is loaded only from `symbols` (and drgn's usual places with
    `default_symbols`); without it drgn has symbols and memory, not types.
    """
    drgn = _import_drgn()
    from kcore import symbols as kept

    prog = drgn.Program()
    try:
        prog.set_core_dump(path)
    except (OSError, ValueError) as exc:
        raise KcoreError(f"{path}: drgn cannot open it ({exc})") from None
    found = kept.read_dump(path)
    text = found[0].text(kept.KALLSYMS) if found is not None else None
    if text is None:
        log.warning("%s keeps no kallsyms (dumped with --no-symbols, or not by kcore): "
                    "symbols need the kernel's debug info", path)
    else:
        prog.register_symbol_finder("kcore-kallsyms", kallsyms_index(text), enable_index=0)
    wanted = list(symbols)
    if wanted or default_symbols:
        why = load_debug_info(prog, wanted, default=default_symbols)
        if why is not None:
            log.info("no debug info for the kernel: %s (kallsyms only)", why)
    return prog


__all__ = ["LIVE_KINDS", "attach", "dump_program", "is_live", "kallsyms_index",
           "load_debug_info", "program"]
