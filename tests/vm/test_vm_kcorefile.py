"""KcoreFile against a running kernel's own /proc/kcore: vmalloc, modules, vmemmap and text.

A KASLR guest boots under QEMU; inside it, the real /proc/kcore is read at the areas its
/proc/vmallocinfo and /proc/modules list (as root: real addresses). Then the guest is paused
and the host reads the same offsets through KcoreFile, from the guest's RAM file and the
system files captured at boot; then the guest reads again. Every page where the two real
reads agree must be what KcoreFile gave (pages the kernel changed in between are left out).
"""

from __future__ import annotations

import json

import pytest

from kcore.kcorefile import open_kcore
from tests.vm import qemu_vm
from tests.vm.guests import Guest, Pool
from tests.vm.pagecmp import stable_mismatches

pytestmark = pytest.mark.vm
PAGE = 4096
PT_LOAD = 1
ALL_ONES = (1 << 64) - 1

# Linux 6.1's read_kcore() reads vmalloc pages through one bounce buffer per open file
# (file->private_data), and vread() returns without touching it for a page above the last
# vmap area: such a page repeats whatever the previous read left there. The seed zeroed a
# buffer per page (kzalloc), as KcoreFile does. So before each page the reader reads the
# first page of the vmalloc area, where vread() zero-fills the buffer (areas lie above it),
# and the page then shows what the seed would.
READER = """\
import json, os, sys
prime, areas = json.load(open(sys.argv[1]))
fd = os.open("/proc/kcore", os.O_RDONLY)
zeros = 0
with open(sys.argv[2], "wb") as out:
    for off, n in areas:
        for pos in range(off, off + n, 4096):
            zeros += os.pread(fd, 4096, prime) == bytes(4096)
            out.write(os.pread(fd, 4096, pos).ljust(4096, b"\\0"))
print(zeros)
"""


@pytest.fixture(scope="module")
def guest():
    """The KASLR guest, booted for this module."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    qemu_vm.ensure_built()
    pool = Pool()
    try:
        yield pool.get("kaslr")
    finally:
        pool.close()


def _segment(kcore: dict, vaddr: int) -> dict:
    return next(p for p in kcore["phdrs"] if p["p_type"] == PT_LOAD
                and p["p_vaddr"] <= vaddr < p["p_vaddr"] + p["p_filesz"])


def _areas(guest) -> list[tuple[str, int, int, int]]:
    """(what, vaddr, size, mapped pages) of module and vmalloc areas, from the guest's files."""
    out = []
    for line in (guest.root / "proc/modules").read_text().splitlines():
        parts = line.split()
        size, base = int(parts[1]), int(parts[-1], 16)
        pages = (size + PAGE - 1) // PAGE
        out.append((f"module {parts[0]}", base, (pages + 1) * PAGE, pages))
    seen = 0
    for line in (guest.root / "proc/vmallocinfo").read_text().splitlines():
        parts = line.split()
        if " vmalloc" not in line or "pages=" not in line or "ioremap" in line:
            continue
        start, _end = (int(x, 16) for x in parts[0].split("-"))
        size = int(parts[1])
        pages = int(next(p for p in parts if p.startswith("pages=")).split("=")[1])
        out.append((f"vmalloc {parts[2]}", start, size, pages))
        seen += 1
        if seen >= 40:
            break
    return out


def _real_read(guest, areas: list[tuple[int, int]], tag: str) -> list[bytes]:
    """The real /proc/kcore's bytes at each (offset, length), read inside the guest."""
    share = guest.vm.share
    vmalloc = next(p for p in guest.kcore["phdrs"] if p["p_type"] == PT_LOAD
                   and p["p_paddr"] == ALL_ONES and p["p_filesz"] > 1 << 40)
    (share / f"areas-{tag}.json").write_text(json.dumps([vmalloc["p_offset"], areas]))
    (share / "reader.py").write_text(READER)
    r = guest.vm.run(f'"$KCORE_PY" {share}/reader.py {share}/areas-{tag}.json '
                     f'{share}/real-{tag}.bin\n')
    r.check()
    pages = sum(n // PAGE for _off, n in areas)
    assert int(r.stdout) == pages, "the first vmalloc page did not read as zeros"
    blob = (share / f"real-{tag}.bin").read_bytes()
    out, pos = [], 0
    for _off, n in areas:
        out.append(blob[pos:pos + n])
        pos += n
    return out


class La57Vm(qemu_vm.Vm):
    """A guest whose CPU has LA57: the kernel runs with 5-level page tables."""

    def qemu_argv(self) -> list[str]:
        """The harness's command line with la57 left on."""
        return [a.replace("max,la57=off", "max") for a in super().qemu_argv()]


@pytest.fixture(scope="module")
def la57_guest():
    """A KASLR guest with 5-level paging, captured like the harness's guests."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    qemu_vm.ensure_built()
    kernel = qemu_vm.fetch_kernel()
    vm = La57Vm(qemu_vm.VmConfig("la57", mem_mib=512, kaslr=True), kernel,
                qemu_vm.build_initramfs(kernel))
    try:
        vm.start()
        capture = vm.share / "capture"
        vm.run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_capture.py"} {capture}\n').check()
        yield Guest(vm, capture, json.loads((capture / "kcore.json").read_text()))
    finally:
        vm.close()


def test_vmalloc_and_module_areas_equal_the_real_kcore(guest) -> None:
    """Module and vmalloc areas: mapped pages equal the kernel's; guard pages read zeros."""
    _check_areas(guest)


def test_five_level_paging_guest(la57_guest) -> None:
    """The same with 5-level page tables (LA57): layout, offsets and the walk from the PGD."""
    vmci = next(n for n in la57_guest.kcore["notes"] if n["name"] == "VMCOREINFO")
    assert b"NUMBER(pgtable_l5_enabled)=1" in bytes.fromhex(vmci["desc"])
    _check_areas(la57_guest)


def _check_areas(guest) -> None:
    """Read the areas in the guest, through KcoreFile, and in the guest again; compare."""
    areas = _areas(guest)
    assert len(areas) > 10
    # Text (first 4 MiB) and the start of vmemmap ride along: walked like the kernel does.
    text = next(p for p in guest.kcore["phdrs"] if p["p_type"] == PT_LOAD
                and p["p_vaddr"] >= 0xFFFFFFFF80000000 and p["p_paddr"] != ALL_ONES)
    areas.append(("text", text["p_vaddr"], 4 << 20, 1024))
    offsets = []
    for _what, vaddr, size, _pages in areas:
        seg = _segment(guest.kcore, vaddr)
        offsets.append((seg["p_offset"] + vaddr - seg["p_vaddr"], size))
    # No EOF in 6.1: 2^47 (2^56 with LA57) further on, text again: kc_offset_to_vaddr()
    # is o | ~__VIRTUAL_MASK.
    vmci = next(n for n in guest.kcore["notes"] if n["name"] == "VMCOREINFO")
    shift = 56 if b"NUMBER(pgtable_l5_enabled)=1" in bytes.fromhex(vmci["desc"]) else 47
    areas.append(("text, one period on", text["p_vaddr"], 16 * PAGE, 16))
    offsets.append((text["p_offset"] + (1 << shift), 16 * PAGE))
    before = _real_read(guest, offsets, "before")
    with guest.vm.paused(), guest.vm.physical_image() as image:
        with open_kcore(str(guest.root), f"raw:{image}") as f:
            ours = [f.pread(n, off) for off, n in offsets]
    after = _real_read(guest, offsets, "after")
    changed_total = 0
    for (what, vaddr, size, pages), b, o, a in zip(areas, before, ours, after, strict=True):
        wrong, changed = stable_mismatches(b, o, a, base=vaddr)
        changed_total += len(changed)
        assert not wrong, f"{what} at {vaddr:#x}: pages {[hex(p) for p in wrong[:4]]} differ"
        if what.startswith(("module", "vmalloc")):
            assert any(o[:pages * PAGE]), f"{what}: no content"
            guard = o[pages * PAGE:size]
            assert guard == bytes(len(guard)) == b[pages * PAGE:size], what
    print(f"{len(areas)} areas, {changed_total} pages changed while they were read")


LIVE = """\
import json, os, sys
import kcore
f = kcore.open("/", "auto")
fd = os.open("/proc/kcore", os.O_RDONLY)
nph = len(f.header.loads) + 1
text_off = f.header.loads[0][1]
ram0_off = next(o for e, o in f.header.loads if e.type.name == "RAM")
print(json.dumps({
    "kind": f.source.kind,
    "size": f.size(),
    "st_size": os.fstat(fd).st_size,
    "ehdr_phdrs": f.pread(64 + 56 * nph, 0) == os.pread(fd, 64 + 56 * nph, 0),
    "text": f.pread(1 << 20, text_off) == os.pread(fd, 1 << 20, text_off),
    "ram0": f.pread(1 << 16, ram0_off) == os.pread(fd, 1 << 16, ram0_off),
    "past_end": all(f.pread(4096, o) == os.pread(fd, 4096, o) for o in (
        f.size() - 8, f.size(), f.size() + (1 << 30), 1 << 47, 1 << 62)),
    "alias": all(f.pread(4096, text_off + k) == os.pread(fd, 4096, text_off + k)
                 for k in (1 << 47, 3 << 47, (1 << 63) - (1 << 47))),
}))
"""


def test_auto_on_a_live_system_is_its_proc_kcore(guest) -> None:
    """In the guest, kcore.open("/", "auto") is /proc/kcore itself: same headers and bytes.

    Past st_size too: 6.1's read_kcore() has no EOF, and repeats the data every 2^47 bytes.
    """
    r = guest.vm.python(LIVE)
    r.check()
    got = json.loads(r.stdout)
    assert got == {"kind": "kcore", "size": guest.kcore["st_size"],
                   "st_size": guest.kcore["st_size"], "ehdr_phdrs": True, "text": True,
                   "ram0": True, "past_end": True, "alias": True}


STRICT_DEVMEM = """\
R=/tmp/devmem-root
rm -rf $R; mkdir -p $R/proc $R/dev
cp /proc/iomem $R/proc/iomem
ln -s /dev/mem $R/dev/mem
"$KCORE_PY" -m kcore read --root $R --source auto --offset 0 --length 16 -o $R/out || echo "rc=$?"
"""


def test_auto_reports_strict_devmem(guest) -> None:
    """A root whose only source is /dev/mem of a STRICT_DEVMEM kernel: one line says so."""
    if guest.vm.kernel.config("STRICT_DEVMEM") != "y":
        pytest.skip("the guest kernel is built without STRICT_DEVMEM")
    r = guest.vm.run(STRICT_DEVMEM)
    assert r.stdout.strip() == "rc=2", (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("kcore: error: no live memory source works: ")
    assert "/tmp/devmem-root/proc/kcore: missing" in lines[0]
    assert "/tmp/devmem-root/dev/crash: missing" in lines[0]
    assert "/tmp/devmem-root/dev/mem: STRICT_DEVMEM" in lines[0]
