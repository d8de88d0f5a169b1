"""The only importer of the compiled C core (kcore._kcore_c): return codes become exceptions."""

from __future__ import annotations

import errno
import os
from typing import Any

from kcore.errors import FaultError

try:
    from kcore._kcore_c import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "kcore's C core is not built: run `python3 setup.py build_ext --inplace` "
        "or `pip install .`"
    ) from exc

__all__ = ["ffi", "lib", "new_stats", "check"]

# A file name for error messages (None: a generic word stands for it).
PathArg = str | bytes | os.PathLike[str] | None

STRICT = lib.KC_STRICT
SPARSE = lib.KC_SPARSE


def new_stats() -> Any:
    """A zeroed struct kc_stats for one C call."""
    return ffi.new("struct kc_stats *")


def _name(path: PathArg, default: str) -> str:
    return os.fsdecode(path) if path is not None else default


def check(rc: int, stats: Any, *, path: PathArg = None, dst_path: PathArg = None) -> None:
    """Raise the exception a kc_* return code stands for (nothing when rc is 0)."""
    if rc == 0:
        return
    err = -rc
    msg = os.strerror(err)
    where = stats.fail_where
    if where == lib.KC_FAIL_FAULT:
        off = stats.fail_offset
        raise FaultError(
            f"cannot read {_name(path, 'the source')} at offset {off:#x}: {msg}", address=off
        )
    if where == lib.KC_FAIL_OUTPUT:
        raise OSError(err, f"{msg} (writing at offset {stats.fail_offset:#x})", dst_path)
    if where == lib.KC_FAIL_SOURCE:
        raise OSError(err, f"{msg} (reading at offset {stats.fail_offset:#x})", path)
    if err == errno.EINVAL:
        raise ValueError(f"invalid argument to the copy engine: {msg}")
    raise OSError(err, msg)
