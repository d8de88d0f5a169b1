"""kcore: the Linux kernel's /proc/kcore rebuilt in userspace."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kcore.errors import (
    ElfFormatError,
    FaultError,
    InputError,
    KcoreError,
    LimeFormatError,
    OutputError,
    SourceError,
)

if TYPE_CHECKING:
    from kcore.kcorefile import KcoreFile

__version__ = "0.1.0"


def open(root: str = "/", source: Any = "auto", layout: str = "modern") -> KcoreFile:  # noqa: A001
    """Open the /proc/kcore of the system at root, read from source, as a read-only file."""
    from kcore.kcorefile import open_kcore

    return open_kcore(root, source, layout)


__all__ = [
    "ElfFormatError",
    "FaultError",
    "InputError",
    "KcoreError",
    "LimeFormatError",
    "OutputError",
    "SourceError",
    "__version__",
    "open",
]
