"""kcore.arch.x86_64 against the real /proc/kcore of Debian's 6.1 (nokaslr and KASLR captures).

discover() builds the address map from the capture's root and memory; kcore_map() from the real
kcore's own program headers and VMCOREINFO; walker() walks the kernel's page tables. Each is
checked against what the kernel itself showed: its kclist's addresses, the region bases read
through its kcore, its NT_TASKSTRUCT size, the bytes it gave for the text and the direct map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import NamedTuple

import pytest

from kcore.addrmap import ALL_ONES, AddressMap
from kcore.arch import ARCHES, by_machine, get, x86_64
from kcore.errors import InputError
from kcore.sources import open_source
from kcore.vmcoreinfo import VmcoreInfo
from tests.commands.test_dump import source_spec
from tests.helpers import FIXTURE_NAMES, shared_fixture

PAGE = 4096


class Seg(NamedTuple):
    """A kclist entry as kcore_map() reads it."""

    vaddr: int
    paddr: int
    size: int


class Capture:
    """A capture's kcore.json, its PT_LOADs by kind, and its memory source (opened)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.folder = shared_fixture(name)
        self.meta = json.loads((self.folder / "expected/kcore.json").read_text())
        self.loads = [p for p in self.meta["phdrs"] if p["p_type"] == 1]
        self.bases = {k: int(v, 16) for k, v in self.meta["values_read_through_kcore"].items()}
        note = next(n for n in self.meta["notes"] if n["name"] == "VMCOREINFO")
        self.info = VmcoreInfo.parse(note["text"].encode())
        self.task_size = next(n["descsz"] for n in self.meta["notes"]
                              if (n["name"], n["type"]) == ("CORE", 4))

    def kind(self, kind: str) -> list[dict]:
        """The PT_LOADs of one kclist kind."""
        return [p for p in self.loads if p["kind"].startswith(kind)]

    def expected(self, file: str) -> tuple[dict, bytes]:
        """A read of the real kcore: its kcore.json entry and bytes."""
        read = next(r for r in self.meta["reads"] if r["file"] == file)
        return read, (self.folder / "expected" / file).read_bytes()


@pytest.fixture(scope="module", params=FIXTURE_NAMES)
def cap(request: pytest.FixtureRequest) -> Capture:
    """Each x86-64 capture."""
    return Capture(request.param)


def _check_map(amap: AddressMap, cap: Capture) -> None:
    """An address map's regions are the real kclist's."""
    text = cap.kind("KCORE_TEXT")[0]
    vmalloc = cap.kind("KCORE_VMALLOC(vmalloc")[0]
    modules = cap.kind("KCORE_VMALLOC(modules")[0]
    ram = cap.kind("KCORE_RAM")
    assert amap.arch == "x86_64"
    assert amap.page_offset == cap.bases["page_offset_base"]
    assert amap.vmalloc_start == cap.bases["vmalloc_base"] == vmalloc["p_vaddr"]
    assert amap.vmemmap_start == cap.bases["vmemmap_base"]
    assert (amap.modules_start, amap.modules_size) == (
        modules["p_vaddr"], modules["p_memsz"])
    assert amap.text_start == text["p_vaddr"]
    assert amap.text_end - amap.text_start == text["p_memsz"]
    assert amap.pa_symbol(text["p_vaddr"]) == text["p_paddr"]
    assert amap.phys_base & ALL_ONES == cap.bases["phys_base"]
    for p in ram:
        assert amap.va(p["p_paddr"]) == p["p_vaddr"]
        assert amap.pa(p["p_vaddr"]) == p["p_paddr"]
    assert amap.pgtable_levels == 4


def test_discover_builds_the_kernels_map(cap: Capture) -> None:
    """From the root and memory: the real kclist's bases (KASLR's read from memory), the text
    at its physical address, NT_TASKSTRUCT's size."""
    with open_source(source_spec(cap.name)) as src:
        system = x86_64.discover(cap.folder / "root", src, "modern")
        _check_map(system.addrmap, cap)
        size = system.task_struct_size_of
        assert (size() if callable(size) else size) == cap.task_size
        assert system.osrelease == cap.info.osrelease


def test_kcore_map_from_the_real_headers(cap: Capture) -> None:
    """From the real kcore's PT_LOADs and VMCOREINFO alone: the same map, the PGD at
    init_top_pgt's physical address."""
    segs = [Seg(p["p_vaddr"], p["p_paddr"], p["p_memsz"]) for p in cap.loads]
    amap = x86_64.kcore_map(cap.info, segs)
    _check_map(amap, cap)
    pgd = cap.info.symbol("init_top_pgt")
    assert pgd is not None and amap.pgd_paddr == amap.pa_symbol(pgd)


def test_walker_reads_what_the_kernel_gave(cap: Capture) -> None:
    """The page walk from init_top_pgt translates the text and the direct map to the physical
    addresses of the kernel's kclist, and reads the bytes its kcore gave."""
    with open_source(source_spec(cap.name)) as src:
        system = x86_64.discover(cap.folder / "root", src, "modern")
        walker = x86_64.walker(system, src)
        assert walker is not None
        for file in ("kcore-text-2M.bin", "kcore-ram0.bin"):
            read, data = cap.expected(file)
            pa, _size = walker.translate(read["vaddr"])
            assert pa == read["paddr"]
            assert walker.read(read["vaddr"], PAGE) == data[:PAGE]
        assert walker.translate(cap.kind("KCORE_VMALLOC(modules")[0]["p_vaddr"] - PAGE) is None


def test_root_of_another_kernel_is_refused(cap: Capture, tmp_path: Path) -> None:
    """A root whose osrelease is not the memory's kernel: one InputError naming both files."""
    root = tmp_path / "root"
    shutil.copytree(cap.folder / "root", root)
    (root / "proc/sys/kernel/osrelease").write_text("6.1.0-99-amd64\n")
    with open_source(source_spec(cap.name)) as src, \
            pytest.raises(InputError, match=f"osrelease says 6.1.0-99-amd64, but the "
                                            f"VMCOREINFO in .* says {cap.info.osrelease}"):
        x86_64.discover(root, src, "modern")


def test_the_record_is_x86_64s(cap: Capture) -> None:
    """The arch record: EM_X86_64 as the real kcore's header has it, 336-byte prstatus."""
    arch = get((cap.folder / "root/proc/sys/kernel/arch").read_text().strip())
    assert arch is ARCHES["x86_64"] is get("amd64") is by_machine(cap.meta["ehdr"]["e_machine"])
    assert arch.prstatus_size == next(n["descsz"] for n in cap.meta["notes"]
                                      if (n["name"], n["type"]) == ("CORE", 1))
    assert arch.prpsinfo_size == next(n["descsz"] for n in cap.meta["notes"]
                                      if (n["name"], n["type"]) == ("CORE", 3))
    with pytest.raises(InputError, match="'riscv64' is not one kcore knows"):
        get("riscv64")
