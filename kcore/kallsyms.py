"""/proc/kallsyms: "ADDR TYPE NAME [module]" lines; kcore reads a few core-kernel symbols.

Addresses are hex; with kptr_restrict (or without CAP_SYSLOG) every address reads as 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from kcore.errors import InputError

# The kernel variables discovery reads from memory (their addresses come from kallsyms).
KALLSYMS_WANTED = frozenset({
    "_text", "_stext", "_end", "page_offset_base", "vmalloc_base", "vmemmap_base",
    "phys_base", "arch_task_struct_size", "init_top_pgt", "linux_banner",
})


def parse_kallsyms(text: str, wanted: Iterable[str] = KALLSYMS_WANTED,
                   where: str = "proc/kallsyms",
                   required: tuple[str, ...] = ("_text", "_end")) -> dict[str, int]:
    """The addresses of the wanted core-kernel symbols (no [module] column) in kallsyms text.

    `required` must all be there, the first one non-zero (kptr_restrict hides addresses):
    arm64's 6.1 kallsyms has text symbols only (no _text, no _end), so it asks for _stext.
    """
    found: dict[str, int] = {}
    # ~100k lines, and only a few names matter: find each "ADDR T NAME\n" line directly.
    for name in set(wanted):
        at = text.find(f" {name}\n")
        while at >= 0:
            start = text.rfind("\n", 0, at) + 1
            addr, _, kind = text[start:at].partition(" ")
            if len(kind) == 1:  # "ADDR T": a core-kernel symbol, not part of a longer name
                if not 1 <= len(addr) <= 16 or addr.strip("0123456789abcdefABCDEF"):
                    raise InputError(f"{where}: bad address {addr[:20]!r} of {name} "
                                     f"(a 64-bit hex address)")
                found[name] = int(addr, 16)
                break
            at = text.find(f" {name}\n", at + 1)
    if not required:
        return found
    first = required[0]
    if first not in found:
        raise InputError(f"{where}: no {first} symbol (is this a kallsyms file?)")
    if found[first] == 0:
        raise InputError(f"{where}: addresses read as zero (kptr_restrict): run as root")
    for name in required[1:]:
        if name not in found:
            raise InputError(f"{where}: no {name} symbol")
    return found
