"""Memory hotplug: a DIMM added through QMP and onlined in the guest; kcore's ranges follow the
real kcore's new PT_LOADs on the next open (the seed's kcore_callback + __kcore_update_ram)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest

from kcore.discover import discover
from kcore.elfcore import build_header
from tests.vm import qemu_vm
from tests.vm.guests import Guest, Pool
from tests.vm.test_vm_ranges_header import kcore_ranges, real_loads

DIMM_MIB = 512
Loads = list[tuple[int, int, int, int]]

ONLINE = """\
block=$((0x$(cat /sys/devices/system/memory/block_size_bytes)))
want=$(({size} / block))
i=0
while [ "$(grep -l offline /sys/devices/system/memory/memory*/state | wc -l)" -lt $want ]; do
    i=$((i+1)); [ $i -lt 300 ] || {{ echo "no offline memory blocks appeared" >&2; exit 1; }}
    sleep 0.1
done
"$KCORE_PY" {capture} {share}/offline
blocks=$(grep -l offline /sys/devices/system/memory/memory*/state)
for f in $blocks; do echo online_movable > $f; done
"$KCORE_PY" {capture} {share}/online
for f in $blocks; do echo offline > $f; done
"$KCORE_PY" {capture} {share}/offlined
"""


@dataclass
class Phase:
    """One moment of the hotplug: the real kcore, kcore run afresh, and the kcore kept open."""

    real: Loads
    fresh: Loads
    reopened: Loads


def loads_of(system) -> Loads:
    """(vaddr, paddr, size, offset) of the header kcore builds for `system`."""
    return [(e.vaddr, e.paddr, e.size, off) for e, off in build_header(system).loads]


@pytest.fixture(scope="module")
def hotplug(vm_pool: Pool, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Phase]:
    """Boot (or reuse) the nokaslr guest, add a DIMM, online it, offline it; record each phase."""
    guest: Guest = vm_pool.get("nokaslr")
    vm = guest.vm
    root = tmp_path_factory.mktemp("hotplug") / "root"
    shutil.copytree(guest.root, root)
    with vm.paused(), vm.physical_image() as image:
        system = discover(root, f"raw:{image}")  # kept open across the hotplug, like an fd
    try:
        phases = {"boot": Phase(real_loads(guest.kcore), loads_of(system), loads_of(system))}
        assert vm.qmp is not None
        vm.qmp.execute("object-add", **{"qom-type": "memory-backend-ram", "id": "hp0",
                                         "size": DIMM_MIB << 20})
        vm.qmp.execute("device_add", driver="pc-dimm", id="dimm0", memdev="hp0")
        vm.run(ONLINE.format(size=DIMM_MIB << 20, capture=qemu_vm.HERE / "guest_capture.py",
                             share=vm.share), timeout=120).check()
        for name in ("offline", "online", "offlined"):
            capture = vm.share / name
            with vm.paused(), vm.physical_image() as image:
                fresh = kcore_ranges(capture / "root", f"raw:{image}")
            shutil.rmtree(root)
            shutil.copytree(capture / "root", root)
            system.kclist.refresh()  # the next open
            phases[name] = Phase(
                real=real_loads(json.loads((capture / "kcore.json").read_text())),
                fresh=[tuple(int(r[k], 16) for k in ("vaddr", "paddr", "size", "offset"))
                       for r in fresh["ranges"]],
                reopened=loads_of(system),
            )
    finally:
        system.close()
    return phases


def test_hotplug_online_new_ram_in_real_kcore(nokaslr_guest: Guest, hotplug) -> None:
    """The kernel: once onlined, the DIMM is a new RAM PT_LOAD above 4 GiB (and a vmemmap)."""
    new = [p for p in hotplug["online"].real if p not in hotplug["boot"].real]
    assert sum(p[2] for p in new if p[1] != qemu_vm.ALL_ONES) == DIMM_MIB << 20
    assert all(p[1] >= 1 << 32 for p in new if p[1] != qemu_vm.ALL_ONES)


def test_hotplug_online_fresh(nokaslr_guest: Guest, hotplug) -> None:
    """kcore run on the guest's files after onlining equals the real kcore's new PT_LOADs."""
    assert hotplug["boot"].fresh == hotplug["boot"].real
    assert hotplug["online"].fresh == hotplug["online"].real


def test_hotplug_online_reopened(nokaslr_guest: Guest, hotplug) -> None:
    """A kcore kept open rebuilds its RAM entries on the next open after the onlining."""
    assert hotplug["online"].reopened == hotplug["online"].real


def test_hotplug_offline_dimm_not_in_real_kcore(nokaslr_guest: Guest, hotplug) -> None:
    """The kernel: adding memory is no MEM_ONLINE event, so the real kclist stays as it was."""
    assert hotplug["offline"].real == hotplug["boot"].real


def test_hotplug_offline_reopened(nokaslr_guest: Guest, hotplug) -> None:
    """A kcore kept open does not rebuild for a DIMM that was added but not onlined."""
    assert hotplug["offline"].reopened == hotplug["offline"].real


# kcore_ram_list() walks System RAM only up to the highest node_end_pfn of N_MEMORY nodes:
# memory added but never onlined, or offlined again, lies past it although /proc/iomem lists
# it; kcore bounds the walk at the end of the highest online memory block.


def test_hotplug_offline_fresh(nokaslr_guest: Guest, hotplug) -> None:
    """kcore run on the files of a guest with an added, not onlined DIMM leaves it out."""
    assert hotplug["offline"].fresh == hotplug["offline"].real


def test_hotplug_offlined_real_kcore(nokaslr_guest: Guest, hotplug) -> None:
    """The kernel: offlined again (MEM_OFFLINE), the DIMM leaves the real kclist."""
    assert hotplug["offlined"].real == hotplug["boot"].real


def test_hotplug_offlined_fresh(nokaslr_guest: Guest, hotplug) -> None:
    """kcore run afresh after the DIMM went offline again leaves it out."""
    assert hotplug["offlined"].fresh == hotplug["offlined"].real


def test_hotplug_offlined_reopened(nokaslr_guest: Guest, hotplug) -> None:
    """A kcore kept open drops the DIMM on the next open after it went offline again."""
    assert hotplug["offlined"].reopened == hotplug["offlined"].real
