"""Capture tests/data/x86_64-7.2-mem_map: real struct pages of a kernel's slab compound pages.

    KCORE_VM_KERNEL=linux-image-7.2.13+deb14-amd64 PYTHONPATH=. python3 tests/vm/capture_mem_map.py

Boots a 512 MiB tests/vm guest of that kernel, writes QEMU's core, and with drgn (the
kernel's -dbg vmlinux, tests.helpers.debug_vmlinux) picks the first 512-page group of the
mem_map holding slab pages of order 1 or more (heads and tails). Saved: the guest's
VMCOREINFO (from QEMU's core), the group's struct pages as the kernel left them, and what
the kernel says each page is (slab or not: PGTY_slab in the head's page_type).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from tests.helpers import debug_vmlinux
from tests.vm import qemu_vm

GROUP = 512
OUT = Path(__file__).resolve().parents[1] / "data" / "x86_64-7.2-mem_map"


def main() -> int:
    import drgn
    from drgn.helpers.linux.mm import page_to_pfn, pfn_to_page

    sys.path.insert(0, str(qemu_vm.REPO / "bench"))
    from pagejudge import _flags, _head, _is_slab

    package = os.environ["KCORE_VM_KERNEL"]
    vmlinux = debug_vmlinux(package + "-dbg")
    with tempfile.TemporaryDirectory(dir=qemu_vm.CACHE / "runs") as tmp:
        vm = qemu_vm.boot(qemu_vm.VmConfig("memmap", mem_mib=512, kaslr=True))
        try:
            vm.qmp.execute("stop")
            core = Path(tmp) / "vmcore.elf"
            vm.dump_guest_memory(core)
        finally:
            vm.close()
        prog = drgn.Program()
        prog.set_core_dump(str(core))
        prog.load_debug_info([str(vmlinux)])
        info = prog["vmcoreinfo_data"]
        text = prog.read(int(info), int(prog["vmcoreinfo_size"])).decode()
        size = prog.type("struct page").size
        max_pfn = int(prog["max_pfn"])
        for start in range(0x1000, max_pfn, GROUP):
            kinds = []
            for pfn in range(start, start + GROUP):
                page = pfn_to_page(prog, pfn)
                head = _head(prog, page)
                kinds.append("tail" if head.value_() != page.value_() else "head-or-single")
                kinds[-1] += "-slab" if _is_slab(prog, head, _flags(head)) else ""
            if any(k == "tail-slab" for k in kinds):
                break
        else:
            raise SystemExit("no slab compound page found")
        first = pfn_to_page(prog, start)
        assert int(page_to_pfn(first)) == start
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "vmcoreinfo").write_text(text)
        (OUT / "struct-pages.bin").write_bytes(prog.read(first.value_(), GROUP * size))
        (OUT / "kernel-says.json").write_text(json.dumps(
            {"first_pfn": start, "struct_page_size": size, "kinds": kinds}, indent=0) + "\n")
    print(f"{OUT}: pfns {start:#x}-{start + GROUP - 1:#x}, "
          f"{sum(k.endswith('-slab') for k in kinds)} slab pages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
