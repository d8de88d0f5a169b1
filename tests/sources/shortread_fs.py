"""A read-only FUSE pass-through whose reads return 1-64 KiB, as 9p, NFS and FUSE may.

`python tests/sources/shortread_fs.py SOURCE MOUNTPOINT` serves SOURCE's files at MOUNTPOINT in the
foreground (fusermount3 -u MOUNTPOINT ends it). direct_io hands each short read to the
caller as it is (the page cache would otherwise fill it out). Every read asks for a random
length of 1-64 KiB at most (a fixed seed: the same run twice gives the same lengths).
"""

from __future__ import annotations

import errno
import os
import random
import sys

import mfusepy as fuse

STAT_FIELDS = ("st_mode", "st_size", "st_nlink", "st_uid", "st_gid", "st_atime", "st_mtime",
               "st_ctime", "st_blocks")


class ShortReads(fuse.Operations):
    """Pass reads and lookups through to a folder; cut every read short."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.rng = random.Random(20)

    def _path(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def getattr(self, path: str, fh: int | None = None) -> dict:
        try:
            st = os.lstat(self._path(path))
        except OSError as exc:
            raise fuse.FuseOSError(exc.errno or errno.EIO) from None
        return {k: getattr(st, k) for k in STAT_FIELDS}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._path(path))]

    def open(self, path: str, flags: int) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise fuse.FuseOSError(errno.EROFS)
        return os.open(self._path(path), os.O_RDONLY)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        return os.pread(fh, min(size, self.rng.randint(1, 64 << 10)), offset)

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


if __name__ == "__main__":
    fuse.FUSE(ShortReads(sys.argv[1]), sys.argv[2], foreground=True, ro=True, direct_io=True,
              nothreads=True)
