"""Debian's split kernel packages (7.x: linux-image-R depends on linux-binary-R, -modules-R and
-base-R, its files under usr/lib/modules/R) unpack into a Kernel the harness can boot.

Runs on the .debs a guest boot of such a kernel left in KCORE_VM_CACHE/debs
(KCORE_VM_KERNEL=linux-image-7.2.13+deb14-amd64); where there are none, the newest image of
Debian unstable and its binary and base parts (15 MB, not the 110 MB of modules) are fetched
once into that cache with apt-get; skipped only where neither is possible.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.helpers import locked
from tests.vm import qemu_vm


def _cached(name: str) -> Path | None:
    found = sorted((qemu_vm.CACHE / "debs").glob(f"{name}_*_amd64.deb"))
    return found[-1] if found else None


def _fetch_newest() -> None:
    """Fetch unstable's newest linux-image and its binary and base parts into the cache."""
    arch = qemu_vm.ARCHES["x86_64"]
    with locked(qemu_vm.CACHE / "kernel.lock"):
        package = qemu_vm._apt_package(arch, arch.meta, suite=qemu_vm.NEWEST_SUITE)
        release = package.removeprefix("linux-image-")
        deb = qemu_vm._download(package, arch, qemu_vm.CACHE / "debs")
        for part in qemu_vm.split_parts(deb, release):
            if not part.startswith("linux-modules-"):
                qemu_vm._download(part, arch, qemu_vm.CACHE / "debs")


def _split_image(fetch: bool = True) -> tuple[Path, str, list[Path]]:
    """A cached split linux-image .deb, its release and its parts' cached .debs (fetched once
    where missing, or skip)."""
    for deb in sorted((qemu_vm.CACHE / "debs").glob("linux-image-[0-9]*_amd64.deb")):
        release = deb.name.split("_")[0].removeprefix("linux-image-")
        if release.endswith("-dbg"):
            continue
        # the modules (110 MB of .xz, 8 s to unpack) are left to the guest boots
        debs = [_cached(f"linux-{part}-{release}") for part in ("binary", "base")]
        if f"linux-binary-{release}" in qemu_vm.split_parts(deb, release) and all(debs):
            return deb, release, [d for d in debs if d]
    if fetch and shutil.which("apt-get"):
        try:
            _fetch_newest()
        except qemu_vm.VmError as exc:
            pytest.skip(f"cannot fetch Debian {qemu_vm.NEWEST_SUITE}'s kernel: {exc}")
        return _split_image(fetch=False)
    pytest.skip(f"no split kernel package (Debian unstable's 7.x) cached in "
                f"{qemu_vm.CACHE / 'debs'}: boot one with KCORE_VM_KERNEL=linux-image-<7.x>-amd64")


def test_split_image_names_its_parts() -> None:
    """The image package's Depends name the binary, modules and base packages of its release."""
    deb, release, _ = _split_image()
    assert sorted(qemu_vm.split_parts(deb, release)) == [
        f"linux-base-{release}", f"linux-binary-{release}", f"linux-modules-{release}"]


def test_one_package_kernel_has_no_parts() -> None:
    """6.1's linux-image holds everything itself: nothing more is fetched for it."""
    deb = _cached(qemu_vm.PINNED_PACKAGE)
    if deb is None:  # the package the vm tests boot: fetched once for all of them
        if qemu_vm.unavailable_reason() is not None:
            pytest.skip(f"{qemu_vm.PINNED_PACKAGE} is not cached in {qemu_vm.CACHE / 'debs'}")
        with locked(qemu_vm.CACHE / "kernel.lock"):
            deb = qemu_vm._download(qemu_vm.PINNED_PACKAGE, qemu_vm.ARCHES["x86_64"],
                                    qemu_vm.CACHE / "debs")
    assert qemu_vm.split_parts(deb, qemu_vm.PINNED_PACKAGE.removeprefix("linux-image-")) == []


def test_split_kernel_unpacks_bootable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vmlinuz is a bzImage of that release; its config and modules.builtin (which
    module_load_order reads) come with it."""
    deb, release, parts = _split_image()
    monkeypatch.setattr(qemu_vm, "CACHE", tmp_path)  # _unpack's scratch folder
    kernel = qemu_vm.Kernel(f"linux-image-{release}", release, tmp_path / "k")
    qemu_vm._unpack(deb, kernel.root, *parts)
    assert kernel.vmlinuz == kernel.root / "usr/lib/modules" / release / "vmlinuz"
    image = kernel.vmlinuz.read_bytes()
    assert image[0x202:0x206] == b"HdrS"  # the x86 boot protocol's setup header
    version_at = struct.unpack_from("<H", image, 0x20E)[0] + 0x200
    assert image[version_at:].startswith(release.encode() + b" ")
    assert kernel.config("X86_64") == "y"
    builtin = (kernel.modules / "modules.builtin").read_text().splitlines()
    assert "kernel/drivers/virtio/virtio.ko" in builtin  # built in: not insmodded
