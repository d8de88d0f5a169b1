"""The exceptions kcore raises; each one's str() is a one-line message for the user."""

from __future__ import annotations


class KcoreError(Exception):
    """Base of every error kcore reports to the user."""

    exit_code = 1


class InputError(KcoreError):
    """A system-root file (/proc/iomem, kallsyms, vmcoreinfo...) is missing or malformed."""

    exit_code = 2


class SourceError(KcoreError):
    """A memory source cannot be opened, or its contents are malformed."""

    exit_code = 2

    def __init__(self, message: str, errno: int | None = None, *, offset: int | None = None,
                 field: str | None = None) -> None:
        super().__init__(message)
        self.errno = errno  # the OS error behind it, if any (auto explains EPERM, ENOENT...)
        self.offset = offset  # the file offset where the contents stop making sense, if known
        self.field = field  # the name of the field found wrong there, if one is


class ElfFormatError(SourceError):
    """An ELF core (QEMU, kdump, kcore) is truncated or inconsistent."""


class LimeFormatError(SourceError):
    """A LiME or AVML image is truncated or inconsistent."""


class PageTableError(SourceError):
    """The kernel page tables in a memory source loop or map more than the memory holds."""


class FaultError(KcoreError):
    """Memory at an address could not be read (strict mode)."""

    def __init__(self, message: str, address: int) -> None:
        super().__init__(message)
        self.address = address


class OutputError(KcoreError):
    """An output file cannot be created or written."""
