"""kcore ranges and kcore header, built from the guest's /proc and /sys and its RAM as the host
sees it, against the real /proc/kcore of the same boot."""

from __future__ import annotations

import json
from pathlib import Path

from tests.vm.guests import Guest, assert_same_header
from tests.vm.qemu_vm import host_kcore

PT_LOAD = 1


def real_loads(kcore: dict) -> list[tuple[int, int, int, int]]:
    """(vaddr, paddr, size, offset) of the real kcore's PT_LOADs, in file order."""
    return [(p["p_vaddr"], p["p_paddr"], p["p_filesz"], p["p_offset"])
            for p in kcore["phdrs"] if p["p_type"] == PT_LOAD]


def kcore_ranges(root: Path, source: str) -> dict:
    """`kcore ranges --json` run on the host."""
    r = host_kcore("ranges", "--json", "--root", str(root), "--source", source)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)


def test_ranges_equal_real_kcore(guest: Guest) -> None:
    """Every PT_LOAD, field by field and in order; data_offset and the file size too."""
    with guest.vm.paused(), guest.vm.physical_image() as image:
        ours = kcore_ranges(guest.root, f"raw:{image}")
    rows = [(int(r["vaddr"], 16), int(r["paddr"], 16), int(r["size"], 16), int(r["offset"], 16))
            for r in ours["ranges"]]
    assert rows == real_loads(guest.kcore)
    assert int(ours["data_offset"], 16) == guest.kcore["data_offset"]
    assert int(ours["file_size"], 16) == guest.kcore["st_size"]


def test_header_equals_real_kcore(guest: Guest, tmp_path: Path) -> None:
    """The whole header region byte for byte, except the reading task's NT_TASKSTRUCT bytes."""
    out = tmp_path / "head.bin"
    with guest.vm.paused(), guest.vm.physical_image() as image:
        r = host_kcore("header", "--root", str(guest.root), "--source", f"raw:{image}",
                       "-o", str(out))
    assert r.returncode == 0, r.stderr.decode()
    assert_same_header(guest, out.read_bytes())
