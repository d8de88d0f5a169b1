"""kcore.arch.arm64 against the real /proc/kcore of Debian's arm64 kernels (tests/data/arm64-*:
6.1 with 48-bit VAs, 6.12 with 52-bit VAs and LPA2, 6.12 on a CPU without LPA2 with a
randomized linear map).

address_map() from VMCOREINFO, kallsyms and iomem, kcore_map() from the real kcore's headers,
task_struct_size() from slabinfo, and the page walker over the kernel's swapper_pg_dir, each
against what the kernel showed: its kclist, its NT_TASKSTRUCT size, the bytes it gave.
"""

from __future__ import annotations

from typing import NamedTuple

import pytest

from kcore.addrmap import ULONG_MAX, AddressMap
from kcore.arch import ARCHES, arm64, by_machine, get
from kcore.errors import InputError
from kcore.kallsyms import parse_kallsyms
from kcore.sources import open_source
from kcore.vmcoreinfo import VmcoreInfo
from tests.arch.test_arm64_commands import FIXTURES, Fixture
from tests.helpers import DATA, scratch_dir

PAGE = 4096


class Seg(NamedTuple):
    """A kclist entry as kcore_map() reads it."""

    vaddr: int
    paddr: int
    size: int


@pytest.fixture(scope="module", params=FIXTURES)
def fx(request: pytest.FixtureRequest) -> Fixture:
    """Each arm64 capture, its memory as a LiME file."""
    return Fixture(request.param, scratch_dir(request, f"arch-{request.param}"))


def _info(fx: Fixture) -> VmcoreInfo:
    note = next(n for n in fx.kcore["notes"] if n["name"] == "VMCOREINFO")
    return VmcoreInfo.parse(bytes.fromhex(note["desc"]))


def _check_map(amap: AddressMap, fx: Fixture) -> None:
    """The map's regions are the kernel's kclist: text, vmalloc, modules, linear map, vmemmap."""
    loads = [p for p in fx.kcore["phdrs"] if p["p_type"] == 1]
    text, vmalloc, modules, ram, vmemmap = loads[:5]
    assert amap.arch == "aarch64"
    assert (amap.text_start, amap.text_end - amap.text_start) == (text["p_vaddr"],
                                                                 text["p_memsz"])
    assert amap.pa_symbol(text["p_vaddr"]) == text["p_paddr"]
    assert (amap.vmalloc_start, amap.vmalloc_size) == (vmalloc["p_vaddr"], vmalloc["p_memsz"])
    assert (amap.modules_start, amap.modules_size) == (modules["p_vaddr"], modules["p_memsz"])
    assert amap.va(ram["p_paddr"]) == ram["p_vaddr"] and amap.pa(ram["p_vaddr"]) == ram["p_paddr"]
    first_page = (amap.vmemmap_start + ram["p_paddr"] // PAGE * amap.struct_page_size)
    assert first_page & ~(PAGE - 1) & ULONG_MAX == vmemmap["p_vaddr"]
    # kcore's file offset of an address: vaddr - PAGE_OFFSET + data_offset
    assert text["p_offset"] - (text["p_vaddr"] - amap.page_offset) == \
        ram["p_offset"] - (ram["p_vaddr"] - amap.page_offset)


def test_address_map_is_the_kernels(fx: Fixture) -> None:
    """From VMCOREINFO, kallsyms and iomem (6.1's kallsyms has no _text or _end)."""
    syms = parse_kallsyms((fx.root / "proc/kallsyms").read_text(), where="kallsyms",
                          required=("_stext",))
    amap = arm64.address_map(_info(fx), syms, (fx.root / "proc/iomem").read_text())
    _check_map(amap, fx)
    levels = {39: 3, 48: 4, 52: 5}[amap.extra["va_bits_actual"]]
    assert amap.pgtable_levels == levels


def test_kcore_map_from_the_real_headers(fx: Fixture) -> None:
    """From the real kcore's PT_LOADs and VMCOREINFO alone: the same map."""
    segs = [Seg(p["p_vaddr"], p["p_paddr"], p["p_memsz"]) for p in fx.kcore["phdrs"]
            if p["p_type"] == 1]
    _check_map(arm64.kcore_map(_info(fx), segs), fx)


def test_task_struct_size_is_nt_taskstruct(fx: Fixture) -> None:
    """slabinfo's task_struct object size is the kernel's NT_TASKSTRUCT descriptor size."""
    task = next(n for n in fx.kcore["notes"] if (n["name"], n["type"]) == ("CORE", 4))
    assert arm64.task_struct_size(fx.root) == task["descsz"]


def test_walker_reads_what_the_kernel_gave(fx: Fixture) -> None:
    """The walk of swapper_pg_dir reads the text, init_uts_ns and banner pages the real kcore
    gave; the 64 KiB before 6.1's _stext are unmapped there and here.  (The linear map is read
    without a walk: the captures hold only the page tables of the kernel image.)"""
    syms = parse_kallsyms((fx.root / "proc/kallsyms").read_text(), where="kallsyms",
                          required=("_stext",))
    amap = arm64.address_map(_info(fx), syms, (fx.root / "proc/iomem").read_text())
    assert amap.pgd_paddr is not None
    with open_source(fx.source) as src:
        walker = arm64.Arm64PageWalker(src.read_phys, amap.pgd_paddr,
                                       amap.extra["va_bits_actual"])
        checked = 0
        for region, real in zip(fx.reads["regions"], fx.real, strict=True):
            if not region["strict"] or region["what"] in ("text head", "linear map"):
                continue
            for at in range(0, region["length"], 16 * PAGE):
                hit = walker.translate(region["vaddr"] + at)
                assert hit is not None, f"{region['what']} {region['vaddr'] + at:#x}"
                assert walker.read(region["vaddr"] + at, PAGE) == real[at:at + PAGE]
                checked += 1
        assert checked >= 4  # two text regions, init_uts_ns, linux_banner
        head = next(r for r in fx.reads["regions"] if r["what"] == "text head")
        if fx.dir.name == "arm64-6.1":
            assert walker.translate(head["vaddr"]) is None


def test_refusals_name_what_is_missing(fx: Fixture) -> None:
    """64 KiB pages and a VMCOREINFO without VA_BITS are refused in one line."""
    text = "\n".join(line for line in _info(fx).data.decode().splitlines()
                     if not line.startswith("NUMBER(VA_BITS)="))
    with pytest.raises(InputError, match=r"no NUMBER\(VA_BITS\)"):
        arm64.address_map(VmcoreInfo.parse(text.encode()), {}, "")
    big = _info(fx).data.decode().replace("PAGESIZE=4096", "PAGESIZE=65536")
    with pytest.raises(InputError, match="64 KiB pages"):
        arm64.address_map(VmcoreInfo.parse(big.encode()), {}, "")


def test_the_record_is_arm64s() -> None:
    """EM_AARCH64 as the real kcore's header has it, 392-byte prstatus, the kernel's name."""
    folder = DATA / FIXTURES[0]
    arch = get((folder / "root/proc/sys/kernel/arch").read_text().strip())
    head = (folder / "kcore-head.bin").read_bytes()
    assert arch is ARCHES["aarch64"] is get("arm64")
    assert by_machine(int.from_bytes(head[18:20], "little")) is arch
    assert arch.prstatus_size == 392
