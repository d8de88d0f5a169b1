"""kcore: the Linux kernel's /proc/kcore rebuilt in userspace."""

from kcore.errors import (
    ElfFormatError,
    FaultError,
    InputError,
    KcoreError,
    LimeFormatError,
    OutputError,
    SourceError,
)

__version__ = "0.1.0"

__all__ = [
    "ElfFormatError",
    "FaultError",
    "InputError",
    "KcoreError",
    "LimeFormatError",
    "OutputError",
    "SourceError",
    "__version__",
]
