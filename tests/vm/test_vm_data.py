"""Data: kernel text, the direct map, vmalloc and module areas read through kcore (the guest's
files and its paused RAM) the same as through the real /proc/kcore (the kernel's own vread).

The guest reads the real kcore just before the host pauses it and again just after; pages
that differ between those two reads are the running kernel's own changes (drift), measured
and bounded.  Every other page must be equal."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kcore.kcorefile import open_kcore
from tests.vm import qemu_vm
from tests.vm.guests import Guest
from tests.vm.pagecmp import PAGE, differing_pages
from tests.vm.qemu_vm import host_kcore
from tests.vm.test_vm_harness import loads
from tests.vm.test_vm_ranges_header import real_loads

MIB = 1 << 20
AREA_CAP = 4 * MIB  # at most this much of one vmalloc area
# Most pages a region may see change between the two real reads (measured drift is far lower).
DRIFT_BOUND = {"text": 0.0, "direct": 0.10, "vmalloc": 0.35, "modules": 0.05, "ioremap": 0.0}
# Pages that read the same twice in the guest yet differ at the pause, allowed in the direct
# map only, as a share of its pages: the reading itself keeps them so (read_kcore()'s bounce
# page, the reading task's kernel state in slab pages). Measured 1-6 of 4096 (0.02-0.15%).
SELF_OBSERVED = {"direct": 1 / 256}


def segment_offset(guest: Guest, vaddr: int, length: int) -> int | None:
    """The real kcore file offset of [vaddr, vaddr+length) if one PT_LOAD holds it."""
    for p in loads(guest):
        if p["p_vaddr"] <= vaddr and vaddr + length <= p["p_vaddr"] + p["p_filesz"]:
            return p["p_offset"] + vaddr - p["p_vaddr"]
    return None


def _symbol(guest: Guest, wanted: str) -> int:
    """A symbol's address in the guest's /proc/kallsyms."""
    for line in (guest.root / "proc/kallsyms").open():
        addr, _t, name = line.split()[:3]
        if name == wanted:
            return int(addr, 16)
    raise AssertionError(f"no {wanted} in kallsyms")


def _empty_zero_page(guest: Guest) -> int:
    """The real kcore offset of empty_zero_page (4 KiB of zeros in the TEXT segment)."""
    off = segment_offset(guest, _symbol(guest, "empty_zero_page"), PAGE)
    assert off is not None
    return off


def regions(guest: Guest) -> dict[str, list[tuple[int, int]]]:
    """Kcore (offset, length) regions to compare, by kind."""
    segs = loads(guest)
    text, vmalloc, modules = segs[0], segs[1], segs[2]
    out: dict[str, list[tuple[int, int]]] = {
        "text": [(text["p_offset"], _symbol(guest, "_etext") - text["p_vaddr"])],
        "direct": [], "vmalloc": [], "modules": [], "ioremap": []}
    ram = segs[3::2]
    page_offset = ram[0]["p_vaddr"] - ram[0]["p_paddr"]
    low_end = max(p["p_paddr"] + p["p_filesz"] for p in ram if p["p_paddr"] < 1 << 32)
    for phys in (1 * MIB, 16 * MIB, 64 * MIB, low_end - 4 * MIB, 1 << 32):
        off = segment_offset(guest, page_offset + phys, 4 * MIB)
        if off is not None:
            out["direct"].append((off, 4 * MIB))
    for line in (guest.root / "proc/vmallocinfo").read_text().splitlines():
        start, end = (int(x, 16) for x in line.split()[0].split("-"))
        length = min(end - start, AREA_CAP)  # with the unmapped guard page
        for name, seg in (("vmalloc", vmalloc), ("modules", modules)):
            if length > 0 and seg["p_vaddr"] <= start and end <= seg["p_vaddr"] + seg["p_filesz"]:
                kind = "ioremap" if line.split()[-1] == "ioremap" else name
                out[kind].append((seg["p_offset"] + start - seg["p_vaddr"], length))
    return out


def _explain(guest: Guest, kind: str, rs: list[tuple[int, int]], real: bytes, ours: bytes,
             wrong: list[int]) -> None:
    """Print where each wrong page is and what both sides hold (KCORE_VM_DEBUG=1)."""
    info = (guest.root / "proc/vmallocinfo").read_text().splitlines()
    for w in wrong:
        at = 0
        for off, length in rs:
            if at <= w < at + length:
                seg = next(p for p in loads(guest)
                           if p["p_offset"] <= off + w - at < p["p_offset"] + p["p_filesz"])
                va = seg["p_vaddr"] + off + w - at - seg["p_offset"]
                line = next((x for x in info if int(x.split("-")[0], 16) <= va
                             < int(x.split()[0].split("-")[1], 16)), "")
                print(f"  {kind} wrong page va={va:#x} real_zero={not any(real[w:w + PAGE])} "
                      f"ours_zero={not any(ours[w:w + PAGE])} {line}")
            at += length


@dataclass
class Compared:
    """One region kind: pages compared, pages the kernel changed, pages kcore got wrong."""

    pages: int
    drift: list[int]
    wrong: list[int]


def _elf_views(guest: Guest, vmcore: Path, tmp_path: Path) -> tuple[dict, bytes]:
    """`kcore ranges --json` and `kcore header` with QEMU's core as the memory source."""
    system = ("--root", str(guest.root), "--source", f"elf:{vmcore}")
    r = host_kcore("ranges", "--json", *system)
    assert r.returncode == 0, r.stderr.decode()
    head = tmp_path / "elf-head.bin"
    h = host_kcore("header", *system, "-o", str(head))
    assert h.returncode == 0, h.stderr.decode()
    return json.loads(r.stdout), head.read_bytes()


def _read_dump(path: Path, flat: list[tuple[int, int]]) -> bytes:
    """The regions read from a `kcore dump --format kcore` file (a sparse kcore image)."""
    with open(path, "rb") as f:
        return b"".join(os.pread(f.fileno(), length, offset).ljust(length, b"\0")
                        for offset, length in flat)


def compare(guest: Guest, tmp_path: Path) -> dict[str, dict[str, Compared]]:
    """Real reads before and after a pause; kcore's reads (raw: the RAM) during it.

    Two readers: kcore.open (and `kcore read` for the text), and the file that
    `kcore dump --format kcore` writes.
    """
    vm = guest.vm
    spec = regions(guest)
    flat = [r for kind in spec.values() for r in kind]
    zero = _empty_zero_page(guest)
    paged = [(off, n, None if kind in ("text", "direct") else zero)
             for kind, rs in spec.items() for off, n in rs]
    (vm.share / "regions.json").write_text(json.dumps(paged))
    work = vm.share / "data"
    work.mkdir(exist_ok=True)
    job = vm.start_run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_read.py"} '
                       f'{vm.share / "regions.json"} {work}\n')
    vm.wait_file(job, work / "read-1.done")
    t0 = time.monotonic()
    cli = tmp_path / "text.bin"
    dump = qemu_vm.SHM / (vm.workdir.name + ".kcore")
    vmcore = qemu_vm.SHM / (vm.workdir.name + ".vmcore")
    ours: dict[str, bytes] = {}
    try:
        with vm.paused(), vm.physical_image() as image:
            system = ("--root", str(guest.root), "--source", f"raw:{image}")
            # the kernel text through the CLI (`kcore read`), everything else through kcore.open
            (off, n), = spec["text"]
            r = host_kcore("read", *system, "--offset", hex(off), "--length", hex(n),
                           "-o", str(cli))
            assert r.returncode == 0, r.stderr.decode()
            with open_kcore(str(guest.root), f"raw:{image}") as f:
                ours["open"] = cli.read_bytes() + b"".join(f.pread(length, offset)
                                                           for offset, length in flat[1:])
            r = host_kcore("dump", *system, "--format", "kcore", "--quiet", "--no-digest",
                           "-o", str(dump))
            assert r.returncode == 0, r.stderr.decode()
            ours["dump"] = _read_dump(dump, flat)
            if guest.vm.config.mem_mib << 20 > qemu_vm.ram_below_4g(guest.vm.config.mem_mib):
                # RAM above the PCI hole: QEMU's own core (p_paddr) as the source too
                vm.dump_guest_memory(vmcore)
                with open_kcore(str(guest.root), f"elf:{vmcore}") as f:
                    ours["elf"] = b"".join(f.pread(length, offset) for offset, length in flat)
                guest.elf_views = _elf_views(guest, vmcore, tmp_path)  # type: ignore[attr-defined]
    finally:
        for path in (dump, dump.with_name(dump.name + ".json"), vmcore):
            path.unlink(missing_ok=True)
        (work / "go").touch()
    print(f"{guest.name}: kcore read and dump in {time.monotonic() - t0:.1f} s (paused)")
    vm.wait(job).check()
    before, after = (work / "before.bin").read_bytes(), (work / "after.bin").read_bytes()
    shutil.rmtree(work)
    result: dict[str, dict[str, Compared]] = {reader: {} for reader in ours}
    at = 0
    for kind, rs in spec.items():
        n = sum(length for _, length in rs)
        a, b = before[at:at + n], after[at:at + n]
        drift = differing_pages(a, b)
        for reader, data in ours.items():
            o = data[at:at + n]
            wrong = [p for p in differing_pages(a, o) if p not in set(drift)]
            if os.environ.get("KCORE_VM_DEBUG"):
                _explain(guest, f"{reader} {kind}", rs, a, o, wrong)
            result[reader][kind] = Compared(-(-n // PAGE), drift, wrong)
        at += n
    return result


def compared_for(guest: Guest, tmp_path: Path) -> dict[str, dict[str, Compared]]:
    """The comparison for a guest (made once per guest), by reader and region kind."""
    cached = getattr(guest, "_compared", None)
    if cached is None:
        cached = compare(guest, tmp_path)
        guest._compared = cached  # type: ignore[attr-defined]
        for reader, kinds in cached.items():
            for kind, c in kinds.items():
                print(f"{guest.name} {reader} {kind}: {c.pages} pages, drift {len(c.drift)}, "
                      f"wrong {[hex(p) for p in c.wrong[:8]]}")
    return cached


@pytest.fixture
def compared_all(guest: Guest, tmp_path: Path) -> dict[str, dict[str, Compared]]:
    """The comparison for this guest, for every reader."""
    return compared_for(guest, tmp_path)


@pytest.fixture
def compared(compared_all: dict[str, dict[str, Compared]]) -> dict[str, Compared]:
    """The comparison of kcore.open's reads."""
    return compared_all["open"]


def check(c: Compared, kind: str) -> None:
    """Every page the kernel left alone reads the same; the drift stays under its bound."""
    assert c.pages > 0
    assert len(c.wrong) <= SELF_OBSERVED.get(kind, 0) * c.pages, [hex(p) for p in c.wrong]
    assert len(c.drift) <= DRIFT_BOUND[kind] * c.pages


@pytest.mark.parametrize("kind", ["text", "direct", "vmalloc", "modules"])
def test_data_equals_real_kcore(compared: dict[str, Compared], kind: str) -> None:
    """kcore.open / `kcore read`: the real kcore's bytes where the kernel left them alone."""
    check(compared[kind], kind)


@pytest.mark.parametrize("kind", ["text", "direct", "vmalloc", "modules", "ioremap"])
def test_dump_kcore_format_equals_real_kcore(compared_all: dict[str, dict[str, Compared]],
                                             kind: str) -> None:
    """`kcore dump --format kcore`: the real kcore's bytes at the same file offsets."""
    check(compared_all["dump"][kind], kind)


def test_ioremap_reads_as_zeros(compared: dict[str, Compared]) -> None:
    """ioremap areas (ACPI tables, BIOS memremap) read as zeros, as the real kcore gives them."""
    c = compared["ioremap"]
    assert c.pages > 0
    assert c.wrong == []


@pytest.mark.parametrize("kind", ["text", "direct", "vmalloc", "modules"])
def test_elf_source_equals_real_kcore(big_guest: Guest, tmp_path: Path, kind: str) -> None:
    """RAM above 4 GiB through QEMU's dump-guest-memory core (elf:) reads as the real kcore."""
    check(compared_for(big_guest, tmp_path)["elf"][kind], kind)


def test_elf_source_ranges_and_header(big_guest: Guest, tmp_path: Path) -> None:
    """With elf: as the source, ranges and header equal the real kcore's too."""
    compared_for(big_guest, tmp_path)
    ranges, head = big_guest.elf_views  # type: ignore[attr-defined]
    rows = [tuple(int(r[k], 16) for k in ("vaddr", "paddr", "size", "offset"))
            for r in ranges["ranges"]]
    assert rows == real_loads(big_guest.kcore)
    real = bytearray((big_guest.capture / "kcore-head.bin").read_bytes())
    ours = bytearray(head)
    task = next(n for n in big_guest.kcore["notes"] if (n["name"], n["type"]) == ("CORE", 4))
    at, size = task["desc_offset"], task["descsz"]
    ours[at:at + size] = real[at:at + size] = bytes(size)
    assert ours == real
