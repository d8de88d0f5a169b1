"""Make a small arm64 fixture for the fast suite from one boot of an arm64 guest.

    python -m tests.vm.arm64_fixture GUEST OUTDIR      (GUEST: a name in guests.ARM64_CONFIGS)

OUTDIR gets what the guest's real /proc/kcore showed and just enough of its memory:
- root/: the guest's proc/ and sys/ files (kallsyms cut to the lines kcore and the tests
  use: arm64's is 2-6 MB), kcore.json and kcore-head.bin (the real header, notes included);
- reads.json + reads.bin.xz: regions of the real /proc/kcore read in the guest with dd
  (kernel text from _text, text, its linear-map alias, struct pages, the vmalloc area's start,
  a module, init_uts_ns, linux_banner), each {what, vaddr, offset, length, strict};
- memory.lime.xz: a LiME image of the physical pages these need, taken while the guest was
  paused right after the reads: the VMCOREINFO note, every page-table page the walks touch,
  and the pages behind each region.
"""

from __future__ import annotations

import json
import lzma
import shutil
import sys
from pathlib import Path

import kcore
from kcore.wire.lime import pack_header
from tests.vm import guests
from tests.vm.arm64 import PAGE, guest_read, kcore_offset, loads, symbol, vmcoreinfo

HERE = Path(__file__).resolve().parent

ALL_ONES = (1 << 64) - 1
KEEP_SYMBOLS = ("_text", "_stext", "_etext", "_end", "_sinittext", "swapper_pg_dir",
                "linux_banner", "init_uts_ns", "empty_zero_page")


def regions(g: guests.Guest) -> list[dict]:
    """The areas read in the guest: (what, vaddr, pages, strict)."""
    info = vmcoreinfo(g)
    text = next(p for p in loads(g) if p["p_paddr"] != ALL_ONES and
                p["p_vaddr"] >= int(info["NUMBER(MODULES_VADDR)"], 16))
    ram = next(p for p in loads(g) if p["p_paddr"] != ALL_ONES and p is not text)
    voff = int(info["NUMBER(kimage_voffset)"], 16)
    mid = text["p_vaddr"] + (1 << 20)
    linear = ram["p_vaddr"] + (mid - voff - ram["p_paddr"])
    vmemmap = next(p for p in loads(g) if p["p_vaddr"] >= int(info["NUMBER(VMEMMAP_START)"], 16))
    vmalloc = int(info.get("NUMBER(VMALLOC_START)") or info["NUMBER(MODULES_END)"], 16)
    module = min(int(line.split()[-1], 16) for line in
                 (g.root / "proc/modules").read_text().splitlines())
    uts = int(info["SYMBOL(init_uts_ns)"], 16)
    banner = banner_address(g, text)
    out = [("text head", text["p_vaddr"], 16, g.vm.config.kaslr),
           ("text", text["p_vaddr"] + 16 * PAGE, 16, True), ("text", mid, 16, True),
           ("linear map", linear, 16, True), ("vmemmap", vmemmap["p_vaddr"], 8, False),
           ("vmalloc", vmalloc, 48, False), ("module", module, 8, False),
           ("init_uts_ns", uts & ~(PAGE - 1), 1, True)]
    if banner is not None:
        out.append(("linux_banner", banner & ~(PAGE - 1), 2, True))
    return [dict(what=w, vaddr=va, pages=n, strict=s) for w, va, n, s in out]


def banner_address(g: guests.Guest, text: dict) -> int | None:
    """linux_banner's address: kallsyms (6.12), else where the kernel image holds the text of
    /proc/version (6.1's kallsyms has no data symbols; Debian's System.map is a placeholder)."""
    try:
        return symbol(g, "linux_banner")
    except KeyError:
        pass
    want = (g.root / "proc/version").read_bytes().rstrip(b"\n")
    with open(g.vm.ram_files[0], "rb") as f:
        f.seek(text["p_paddr"] - g.vm.arch.ram_base)
        image = f.read(text["p_memsz"])
    at = image.find(want + b"\n")
    return None if at < 0 else text["p_vaddr"] + at


def trim_kallsyms(text: str) -> str:
    """The kallsyms lines of KEEP_SYMBOLS (core kernel only), in file order."""
    keep = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[2] in KEEP_SYMBOLS:
            keep.append(line + "\n")
    return "".join(keep)


def pages_needed(system: object, regs: list[dict], g: guests.Guest) -> set[int]:
    """Physical page numbers behind the regions, page tables and VMCOREINFO included."""
    from kcore.arch import walker_for

    walker = walker_for(system)
    amap = system.addrmap  # type: ignore[attr-defined]
    pfns: set[int] = set()
    paddr, size = (int(x, 16) for x in (g.root / "sys/kernel/vmcoreinfo").read_text().split())
    pfns.update(range(paddr // PAGE, (paddr + size + PAGE - 1) // PAGE))
    pfns.add(amap.pgd_paddr // PAGE)
    ram = [(p["p_vaddr"], p["p_paddr"], p["p_memsz"]) for p in loads(g)
           if p["p_paddr"] != ALL_ONES and p["p_vaddr"] < amap.modules_start]
    for r in regs:
        length = r["pages"] * PAGE
        lin = [(va, pa, n) for va, pa, n in ram if va <= r["vaddr"] < va + n]
        if lin:
            va, pa, _ = lin[0]
            start = pa + r["vaddr"] - va
            pfns.update(range(start // PAGE, (start + length) // PAGE))
            continue
        for _va, pa, n in walker.runs(r["vaddr"], length):
            pfns.update(range(pa // PAGE, (pa + n + PAGE - 1) // PAGE))
    pfns.update(pa // PAGE for pa in walker._cache)  # every page-table page the walks read
    return pfns


def lime_of(image: Path, pfns: set[int]) -> bytes:
    """A LiME image of the pages (runs of consecutive pages one range each)."""
    out = bytearray()
    runs: list[list[int]] = []
    for pfn in sorted(pfns):
        if runs and runs[-1][1] == pfn:
            runs[-1][1] += 1
        else:
            runs.append([pfn, pfn + 1])
    with open(image, "rb") as f:
        for lo, hi in runs:
            f.seek(lo * PAGE)
            out += pack_header(lo * PAGE, (hi - lo) * PAGE) + f.read((hi - lo) * PAGE)
    return bytes(out)


def make(name: str, out: Path) -> None:
    """Boot the guest, capture, write the fixture."""
    pool = guests.Pool()
    try:
        g = pool.get(name)
        regs = regions(g)
        for r in regs:
            r["offset"] = kcore_offset(g, r["vaddr"])
        real = guest_read(g, [(r["offset"], r["pages"], 0) for r in regs])
        shutil.rmtree(out, ignore_errors=True)
        (out / "root").mkdir(parents=True)
        shutil.copytree(g.root, out / "root", dirs_exist_ok=True)
        kall = out / "root/proc/kallsyms"
        kall.write_text(trim_kallsyms(kall.read_text()))
        for f in ("kcore.json", "kcore-head.bin"):
            shutil.copy(g.capture / f, out / f)
        with g.vm.paused(), g.vm.physical_image() as image:
            with kcore.open(str(g.root), f"raw:{image}") as kf:
                pfns = pages_needed(kf.system, regs, g)
            (out / "memory.lime.xz").write_bytes(lzma.compress(lime_of(image, pfns)))
        blob = b"".join(real)
        for r, data in zip(regs, real, strict=True):
            r["length"] = len(data)
        (out / "reads.json").write_text(json.dumps(
            dict(guest=name, release=g.vm.kernel.release, kaslr=g.vm.config.kaslr,
                 regions=regs), indent=1))
        (out / "reads.bin.xz").write_bytes(lzma.compress(blob))
    finally:
        pool.close()


if __name__ == "__main__":
    make(sys.argv[1], Path(sys.argv[2]))
