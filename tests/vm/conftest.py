"""Fixtures for the vm tests: one booted guest at a time, reused by every test that needs it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import qemu_vm
from qemu_vm import Vm, VmConfig

# The guests the suite boots, in the order the tests run.  "nokaslr" can take a DIMM (hotplug
# tests run last on it); "big" has more than 4 GiB, so part of System RAM sits above the PCI
# hole at 4 GiB, where RAM-file offsets stop being physical addresses.
CONFIGS = {
    "nokaslr": VmConfig("nokaslr", mem_mib=1024, hotplug_slots=2, maxmem_mib=2048),
    "kaslr": VmConfig("kaslr", mem_mib=512, kaslr=True),
    "big": VmConfig("big", mem_mib=4608, kaslr=True),
}
# Tests that change the guest for good (memory hotplug) run after the others on their guest.
LAST_ON_GUEST = ("hotplug",)


@dataclass
class Guest:
    """A booted guest and the capture of its real /proc/kcore taken right after boot."""

    vm: Vm
    capture: Path
    kcore: dict

    @property
    def name(self) -> str:
        """The config name."""
        return self.vm.config.name

    @property
    def root(self) -> Path:
        """The captured system root (proc/, sys/ files) on the host."""
        return self.capture / "root"


class Pool:
    """Boots guests on demand, keeps only one running (2 cores), closes them all at the end."""

    def __init__(self) -> None:
        self.current: Guest | None = None

    def get(self, name: str) -> Guest:
        """The running guest `name`, booting it (and closing any other) if needed."""
        if self.current is not None and self.current.name == name:
            return self.current
        self.close()
        vm = qemu_vm.boot(CONFIGS[name])
        try:
            capture = vm.share / "capture"
            vm.run(f'"$KCORE_PY" {qemu_vm.HERE / "guest_capture.py"} {capture}\n').check()
            kcore = json.loads((capture / "kcore.json").read_text())
        except BaseException:
            vm.close()
            raise
        self.current = Guest(vm, capture, kcore)
        return self.current

    def close(self) -> None:
        """Shut the running guest down."""
        if self.current is not None:
            guest, self.current = self.current, None
            guest.vm.close()


@pytest.fixture(scope="session")
def vm_pool() -> Iterator[Pool]:
    """The session's guests (skips the vm tests only where QEMU cannot run)."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    pool = Pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=list(CONFIGS))
def guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """Each guest in turn (tests using it run once per config)."""
    return vm_pool.get(request.param)


@pytest.fixture(params=["nokaslr", "kaslr"])
def small_guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """The guests under 4 GiB, whose RAM file offset is the physical address."""
    return vm_pool.get(request.param)


@pytest.fixture
def nokaslr_guest(vm_pool: Pool) -> Guest:
    """The nokaslr guest (1 GiB, two DIMM slots)."""
    return vm_pool.get("nokaslr")


@pytest.fixture
def big_guest(vm_pool: Pool) -> Guest:
    """The guest with RAM above 4 GiB."""
    return vm_pool.get("big")


def _guest_of(item: pytest.Item) -> str | None:
    """Which config a test item boots."""
    callspec = getattr(item, "callspec", None)
    for argname in ("guest", "small_guest"):
        if callspec is not None and argname in callspec.params:
            return callspec.params[argname]
    for argname, name in (("nokaslr_guest", "nokaslr"), ("big_guest", "big")):
        if argname in getattr(item, "fixturenames", ()):
            return name
    return None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests/vm as `vm`; group them by guest (one boot each), guest-changing tests last."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(qemu_vm.HERE):
            item.add_marker(pytest.mark.vm)
    order = list(CONFIGS)
    slots = [i for i, item in enumerate(items) if _guest_of(item) is not None]
    chosen = [items[i] for i in slots]
    chosen.sort(key=lambda it: (order.index(_guest_of(it) or order[0]),
                                any(k in it.nodeid for k in LAST_ON_GUEST)))
    for i, item in zip(slots, chosen, strict=True):
        items[i] = item
