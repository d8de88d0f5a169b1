"""Fixtures for the vm tests: one booted guest at a time, reused by every test that needs it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import helpers
from tests.vm import qemu_vm
from tests.vm.guests import (
    ARM64_CONFIGS,
    CONFIGS,
    EXTRA_CONFIGS,
    FILE_ORDER,
    ONEFILE_ARM64_CONFIGS,
    ONEFILE_CONFIGS,
    POOLS,
    Guest,
    Pool,
)


@pytest.fixture(scope="module", autouse=True)
def _sweep_shares() -> Iterator[None]:
    """After each module, remove the files its tests left in the running guest's share."""
    yield
    for pool in POOLS:
        pool.sweep()


@pytest.fixture(scope="session")
def vm_pool() -> Iterator[Pool]:
    """The session's guests (skips the vm tests only where QEMU cannot run)."""
    reason = qemu_vm.unavailable_reason()
    if reason:
        pytest.skip(f"QEMU cannot run here: {reason}")
    qemu_vm.ensure_built()
    pool = Pool()
    try:
        yield pool
    finally:
        pool.close()


@pytest.fixture(params=[name for name in CONFIGS if not name.startswith("lockdown-")])
def guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """Each guest in turn (tests using it run once per config)."""
    return vm_pool.get(request.param)


@pytest.fixture(params=["nokaslr", "kaslr"])
def small_guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """The guests under 4 GiB, whose RAM file offset is the physical address."""
    return vm_pool.get(request.param)


@pytest.fixture(params=["lockdown-integrity", "lockdown-confidentiality"])
def lockdown_guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """The guests booted with lockdown=integrity and lockdown=confidentiality."""
    return vm_pool.get(request.param)


@pytest.fixture
def nokaslr_guest(vm_pool: Pool) -> Guest:
    """The nokaslr guest (1 GiB, two DIMM slots)."""
    return vm_pool.get("nokaslr")


@pytest.fixture
def kaslr_guest(vm_pool: Pool) -> Guest:
    """The KASLR guest (512 MiB)."""
    return vm_pool.get("kaslr")


@pytest.fixture
def big_guest(vm_pool: Pool) -> Guest:
    """The guest with RAM above 4 GiB."""
    return vm_pool.get("big")


@pytest.fixture(params=list(ARM64_CONFIGS))
def arm64_guest(request: pytest.FixtureRequest, vm_pool: Pool) -> Guest:
    """Each arm64 guest in turn (skipped where qemu-system-aarch64 is missing)."""
    reason = qemu_vm.unavailable_reason("arm64")
    if reason:
        pytest.skip(f"QEMU cannot run arm64 guests here: {reason}")
    return vm_pool.get(request.param)


@pytest.fixture(scope="session")
def onefile() -> Path:
    """The one-file kcore of `make dist` (built once per sources' hash, in the VM cache)."""
    return helpers.onefile(qemu_vm.CACHE)


@pytest.fixture(params=list(ONEFILE_CONFIGS))
def onefile_guest(request: pytest.FixtureRequest, vm_pool: Pool, onefile: Path) -> Guest:
    """Each busybox-only x86-64 guest in turn, the one file in its initramfs as /bin/kcore."""
    config = dataclasses.replace(ONEFILE_CONFIGS[request.param],
                                 extra_files=(("bin/kcore", onefile),))
    return vm_pool.get(request.param, config)


@pytest.fixture(scope="session")
def onefile_aarch64() -> Path:
    """The aarch64 one-file kcore of `make dist-aarch64` (cached as the x86-64 one)."""
    return helpers.onefile(qemu_vm.CACHE, "aarch64")


@pytest.fixture
def onefile_arm64_guest(vm_pool: Pool, onefile_aarch64: Path) -> Guest:
    """The busybox-only arm64 guest, the aarch64 file in its initramfs as /bin/kcore."""
    reason = qemu_vm.unavailable_reason("arm64")
    if reason:
        pytest.skip(f"QEMU cannot run arm64 guests here: {reason}")
    name = "onefile-arm64"
    config = dataclasses.replace(ONEFILE_ARM64_CONFIGS[name],
                                 extra_files=(("bin/kcore", onefile_aarch64),))
    return vm_pool.get(name, config)


def _guest_of(item: pytest.Item) -> str | None:
    """Which config a test item boots: its `guest` mark (a module fixture's vm_pool.get), else
    the guest fixture it takes."""
    mark = item.get_closest_marker("guest")
    if mark is not None:
        return mark.args[0]
    callspec = getattr(item, "callspec", None)
    for argname in ("guest", "small_guest", "lockdown_guest", "arm64_guest", "onefile_guest"):
        if callspec is not None and argname in callspec.params:
            return callspec.params[argname]
    for argname, name in (("nokaslr_guest", "nokaslr"), ("kaslr_guest", "kaslr"),
                           ("big_guest", "big"), ("onefile_arm64_guest", "onefile-arm64")):
        if argname in getattr(item, "fixturenames", ()):
            return name
    return None


def pytest_itemcollected(item: pytest.Item) -> None:
    """Every test under tests/vm is a `vm` test (before -m selects), in the xdist group of the
    guest it boots (one worker runs them all: one boot a run), or of its module when it boots
    guests of its own."""
    path = Path(str(item.fspath))
    if path.is_relative_to(qemu_vm.HERE):
        item.add_marker(pytest.mark.vm)
        guest = _guest_of(item)
        item.add_marker(pytest.mark.xdist_group(f"guest:{guest}" if guest else f"vm/{path.name}"))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Group vm tests by guest (one boot each), then by FILE_ORDER within a group; the tests
    that boot guests of their own go last, in their order (between two tests of one module,
    they would make its module fixtures run twice)."""
    order = [*CONFIGS, *EXTRA_CONFIGS, *ARM64_CONFIGS, *ONEFILE_CONFIGS, *ONEFILE_ARM64_CONFIGS]
    slots = [i for i, item in enumerate(items)
             if Path(str(item.fspath)).is_relative_to(qemu_vm.HERE)]
    chosen = [items[i] for i in slots]

    def key(item: pytest.Item) -> tuple[int, int]:
        guest = _guest_of(item)
        if guest is None:
            return len(order), 0
        stem = Path(str(item.fspath)).stem
        rank = FILE_ORDER.index(stem) if stem in FILE_ORDER else len(FILE_ORDER)
        return order.index(guest), rank

    chosen.sort(key=key)
    for i, item in zip(slots, chosen, strict=True):
        items[i] = item
