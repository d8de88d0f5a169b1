"""Wire formats of other tools' dump files, each declared once and both read and written.

Each module's walker checks the structure it reads and raises LayoutError naming the file
offset and the field that makes no sense there; the sources, `kcore verify` and `kcore
rebuild` call the same walkers and say which file it was.
"""

from __future__ import annotations


class LayoutError(ValueError):
    """An impossible field in a dump file: its file offset (None: the whole file), its name,
    and why; str() is the message (by default "FIELD at offset OFFSET: WHY")."""

    def __init__(self, offset: int | None, field: str, why: str,
                 message: str | None = None) -> None:
        where = f" at offset {offset:#x}" if offset is not None else ""
        super().__init__(message or f"{field}{where}: {why}")
        self.offset, self.field, self.why = offset, field, why
