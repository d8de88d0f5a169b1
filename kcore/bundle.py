"""The one-file kcore (make dist): its build record, --version's text, the machine check."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from kcore import __version__

RECORD = "dist.json"  # written by packaging/build_dist.py, carried in the file as kcore/dist.json
ARCH_FILE = "/proc/sys/kernel/arch"  # the kernel's machine (uname's can be an emulator's)


def record() -> dict[str, Any] | None:
    """The build record of the one-file kcore running now; None when kcore runs from Python."""
    base = getattr(sys, "_MEIPASS", None)
    if not getattr(sys, "frozen", False) or base is None:
        return None
    try:
        data: dict[str, Any] = json.loads((Path(base) / "kcore" / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return data


def version_text(rec: dict[str, Any] | None = None) -> str:
    """What `kcore --version` prints: version, commit, and the bundled libraries' versions."""
    rec = record() if rec is None else rec
    if rec is None:
        return f"kcore {__version__} (Python {platform.python_version()}, {platform.machine()})"
    lines = [f"kcore {rec['version']} (commit {rec['commit']}, built {rec['built']}, "
             f"one file for linux-{rec['machine']}, Python {rec['python']})"]
    for soname, lib in rec["libraries"].items():
        lines.append(f"  {soname:<16} {lib['package']} {lib['version'] or '?'}")
    return "\n".join(lines)


def kernel_machine(arch_file: str = ARCH_FILE) -> str:
    """The running kernel's machine name (x86_64, aarch64...)."""
    try:
        return Path(arch_file).read_text().strip() or os.uname().machine
    except OSError:
        return os.uname().machine


def machine_mismatch(rec: dict[str, Any] | None, machine: str) -> str | None:
    """One line saying the file was built for another machine, or None when it fits."""
    if rec is None or rec.get("machine") == machine:
        return None
    return (f"this kcore file is built for linux-{rec['machine']} but this machine is "
            f"{machine}: run kcore-{rec['version']}-linux-{machine} instead")
