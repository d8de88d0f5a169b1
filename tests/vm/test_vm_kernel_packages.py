"""Debian's split kernel packages (7.x: linux-image-R depends on linux-binary-R, -modules-R and
-base-R, its files under usr/lib/modules/R) unpack into a Kernel the harness can boot.

Runs on the .debs a guest boot of such a kernel left in KCORE_VM_CACHE/debs
(KCORE_VM_KERNEL=linux-image-7.2.13+deb14-amd64); no network, skipped without them.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest

from tests.vm import qemu_vm


def _cached(name: str) -> Path | None:
    found = sorted((qemu_vm.CACHE / "debs").glob(f"{name}_*_amd64.deb"))
    return found[-1] if found else None


def _split_image() -> tuple[Path, str, list[Path]]:
    """A cached split linux-image .deb, its release and its parts' cached .debs (or skip)."""
    for deb in sorted((qemu_vm.CACHE / "debs").glob("linux-image-[0-9]*_amd64.deb")):
        release = deb.name.split("_")[0].removeprefix("linux-image-")
        if release.endswith("-dbg"):
            continue
        depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                                 text=True, check=True).stdout
        # the modules (110 MB of .xz, 8 s to unpack) are left to the guest boots
        debs = [_cached(f"linux-{part}-{release}") for part in ("binary", "base")]
        if f"linux-binary-{release}" in depends and all(debs):
            return deb, release, [d for d in debs if d]
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
    if deb is None:
        pytest.skip(f"{qemu_vm.PINNED_PACKAGE} is not cached in {qemu_vm.CACHE / 'debs'}")
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
