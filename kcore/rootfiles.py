"""The system root's files (--root DIR: its proc/ and sys/), read bounded, with errors that
name the file: what discovery, the live sources and the kept symbols read them with."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO, Literal, overload

from kcore.errors import InputError

MAX_ROOT_FILE = 1 << 28  # bytes read of a root file at most (kallsyms: ~10 MiB a big kernel)
READ_CHUNK = 1 << 20


def read_bounded(f: BinaryIO, limit: int) -> bytes:
    """At most limit bytes of f, read 1 MiB at a time: f.read(limit) allocates limit bytes at
    once for a /proc file (size 0), 256 MiB that a small host or guest does not have, and a
    sysctl file (proc_sys_call_handler) fails a read of KMALLOC_MAX_SIZE or more with ENOMEM."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = f.read(min(READ_CHUNK, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


@overload
def read_root(root: Path, rel: str, *, required: Literal[True] = True) -> bytes: ...


@overload
def read_root(root: Path, rel: str, *, required: bool) -> bytes | None: ...


def read_root(root: Path, rel: str, *, required: bool = True) -> bytes | None:
    """A file under the root, as bytes (decoded where parsed); None if missing and optional."""
    path = root / rel
    try:
        with open(path, "rb") as f:
            data = read_bounded(f, MAX_ROOT_FILE + 1)
    except FileNotFoundError:
        if required:
            raise InputError(
                f"{path}: missing (is --root a system root with proc/ and sys/?)"
            ) from None
        return None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except ValueError:  # a NUL byte in the root's own path
        raise InputError(f"{root}: not a usable --root (a NUL byte in the path)") from None
    if len(data) > MAX_ROOT_FILE:
        raise InputError(f"{path}: larger than {MAX_ROOT_FILE >> 20} MiB: not a /proc or /sys "
                         "file")
    return data


@overload
def read_root_text(root: Path, rel: str, *, required: Literal[True] = True) -> str: ...


@overload
def read_root_text(root: Path, rel: str, *, required: bool) -> str | None: ...


def read_root_text(root: Path, rel: str, *, required: bool = True) -> str | None:
    """A text file under the root (undecodable bytes kept as surrogates for its parser)."""
    data = read_root(root, rel, required=required)
    return None if data is None else data.decode("utf-8", "surrogateescape")


def root_word(root: Path, rel: str) -> str | None:
    """A one-line /proc value (osrelease, arch), checked: printable ASCII; None if missing."""
    data = read_root(root, rel, required=False)
    if data is None:
        return None
    word = data.strip()
    if not all(0x20 <= b < 0x7F for b in word):
        raise InputError(f"{root / rel}: {word[:40]!r} is not one line of printable text "
                         "(a kernel writes one)")
    return word.decode("ascii")
