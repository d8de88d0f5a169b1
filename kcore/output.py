"""Safe dump outputs: 0600 files made under a temporary name, renamed into place when complete."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import OutputError

FILE_MODE = 0o600
HASH_CHUNK = 1 << 20  # bytes of one hasher buffer


def human(n: int) -> str:
    """Format a byte count with a binary unit (e.g. '512.0 MiB')."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")


def _create_exclusive(directory: str, name: str) -> int:
    """Create directory/name read-write with O_EXCL|O_NOFOLLOW, mode 0600; return its fd."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(os.path.join(directory, name), flags, FILE_MODE)


def _temp_file(directory: str, final_name: str) -> tuple[int, str]:
    """Create a fresh 0600 file with a random name beside the final one; return (fd, path)."""
    for _ in range(100):
        name = f".{final_name}.kcore-{secrets.token_hex(6)}.tmp"
        try:
            fd = _create_exclusive(directory, name)
        except FileExistsError:
            continue
        os.fchmod(fd, FILE_MODE)  # the umask may only have narrowed it; be exact
        return fd, os.path.join(directory, name)
    raise OutputError(f"cannot create a temporary file in {directory}")


def _land(tmp: str, final: str, force: bool) -> None:
    """Move a complete temporary file to its final name (replace only with force)."""
    if force:
        os.replace(tmp, final)  # rename(2) replaces a symlink itself, never its target
        return
    try:
        os.link(tmp, final)  # atomic "create if absent": fails with EEXIST, never follows
    except FileExistsError:
        raise OutputError(f"{final} appeared while dumping; not replaced (use --force)") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        # A filesystem without hard links (vfat...): check, then rename.
        if os.path.lexists(final):
            raise OutputError(
                f"{final} appeared while dumping; not replaced (use --force)"
            ) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def write_small(path: str, data: bytes, force: bool) -> None:
    """Write a small file safely: temp name, 0600, then into place (replace only with force)."""
    directory, name = os.path.split(os.path.abspath(path))
    fd, tmp = _temp_file(directory, name)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            f.write(data)
        _land(tmp, path, force)
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class BufferHasher:
    """SHA-256 of an output fed in file order from the writer's own buffers, in a thread.

    The writer takes a buffer (buffer()), fills and writes it, then submit()s it; the
    thread hashes it and hands it back. No read-back of the file.
    """

    def __init__(self, nbuf: int = 8, size: int = HASH_CHUNK) -> None:
        self._hash = hashlib.sha256()
        self._done = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        self._full: queue.SimpleQueue[tuple[Any, int] | None] = queue.SimpleQueue()
        pool = [bytearray(size) for _ in range(nbuf)]
        self._pool = {id(b) for b in pool}
        for b in pool:
            self._free.put(b)
        self.size = size
        self._error: BaseException | None = None
        self._cancel = False
        self._thread = threading.Thread(target=self._run, name="kcore-sha256", daemon=True)
        self._thread.start()

    def buffer(self) -> bytearray:
        """A buffer of self.size bytes to fill, write and submit (waits for a free one)."""
        while True:
            try:
                return self._free.get(timeout=0.5)
            except queue.Empty:
                if self._error is not None or not self._thread.is_alive():
                    raise OutputError(f"the SHA-256 thread stopped: {self._error}") from None

    def submit(self, data: Any, n: int | None = None) -> None:
        """Hash the first n bytes of data next (a buffer() buffer is returned after)."""
        self._full.put((data, len(data) if n is None else n))

    @property
    def done(self) -> int:
        """Bytes hashed so far."""
        return self._done

    def finish(self, size: int, progress: Callable[[int], None] | None = None) -> str:
        """Wait for the hash of everything submitted (size bytes); return it as hex."""
        self._full.put(None)
        seen = self._done
        while self._thread.is_alive():
            self._thread.join(0.2)
            if progress is not None:
                now = self._done
                progress(now - seen)
                seen = now
        if self._error is not None:
            raise self._error
        if self._done != size:
            raise AssertionError(f"hashed {self._done} bytes of a {size}-byte output")
        return self._hash.hexdigest()

    def cancel(self) -> None:
        """Stop the thread without a result."""
        self._cancel = True
        self._full.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            while (item := self._full.get()) is not None and not self._cancel:
                data, n = item
                self._hash.update(memoryview(data)[:n])
                self._done += n
                if id(data) in self._pool:
                    self._free.put(data)
        except BaseException as exc:  # reported by finish()
            self._error = exc


@dataclass
class Output:
    """An open dump destination; use as a context manager, call commit() when complete."""

    path: str
    fd: int
    kind: str  # "file" (temp + rename), "stdout", or "device" (an existing char device/FIFO)
    force: bool = False
    digest: bool = True
    tmp_path: str | None = None
    hasher: BufferHasher | None = None
    sha256: str | None = None
    sidecars: list[str] = field(default_factory=list)
    _closed: bool = False
    _directory: str = ""
    _name: str = ""

    @property
    def seekable(self) -> bool:
        """True when data may be written at offsets (pwrite): a file (holes left), /dev/null."""
        if self.kind == "file":
            return True
        if self.kind != "device":
            return False
        from kcore.engine import discards

        # /dev/null discards writes at any offset: threads may write in any order.
        return stat.S_ISREG(os.fstat(self.fd).st_mode) or discards(self.fd)

    @property
    def sha256_path(self) -> str:
        """Where the `sha256sum -c` file goes."""
        return self.path + ".sha256"

    @property
    def manifest_path(self) -> str:
        """Where the JSON manifest goes."""
        return self.path + ".json"

    def check_space(self, needed: int, *, estimate: bool = False) -> None:
        """Refuse to start when the output filesystem has less than needed bytes free."""
        if self.kind != "file":
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            what = "up to " if estimate else ""
            note = " (a conservative estimate: zero pages will take less)" if estimate else ""
            raise OutputError(
                f"not enough space in {directory}: the dump needs {what}{human(needed)}{note}, "
                f"{human(free)} free; free some space or write elsewhere (-o PATH, or - for stdout)"
            )

    def set_size(self, size: int) -> None:
        """Give a seekable file its final size up front (holes where nothing is written)."""
        if self.kind != "file":
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as exc:
            if exc.errno in (errno.EFBIG, errno.EINVAL):
                raise OutputError(
                    f"the filesystem holding {self.path} cannot hold a {human(size)} sparse file "
                    f"(ext4 stops at 16 TiB); write it on tmpfs, xfs or btrfs, "
                    f"or choose --format elf"
                ) from None
            raise

    def start_digest(self) -> None:
        """Start hashing the output (file outputs only): the writer submits every byte, in
        file order, to self.hasher."""
        if self.digest and self.kind == "file" and self.hasher is None:
            self.hasher = BufferHasher()

    def finish(self, size: int, progress: Callable[[int], None] | None = None) -> str | None:
        """Wait for the digest of the first size bytes and flush the file; return the digest."""
        if self.hasher is not None:
            self.sha256 = self.hasher.finish(size, progress)
            self.hasher = None
        if self.kind == "file" and not self._closed:
            os.fsync(self.fd)
        return self.sha256

    def commit(self, size: int, manifest: dict[str, Any] | None = None) -> None:
        """Finish, move into place, then write OUTPUT.sha256 and OUTPUT.json."""
        self.finish(size)
        if self.kind != "file":
            self._close()
            return
        assert self.tmp_path is not None
        self._close()
        _land(self.tmp_path, self.path, self.force)
        self.tmp_path = None
        sidecars = []
        if self.sha256 is not None:
            line = f"{self.sha256}  {os.path.basename(self.path)}\n"
            sidecars.append((self.sha256_path, line.encode()))
        if manifest is not None:
            text = json.dumps(dict(manifest, sha256=self.sha256), indent=2) + "\n"
            sidecars.append((self.manifest_path, text.encode()))
        for path, data in sidecars:
            try:
                write_small(path, data, self.force)
            except OSError as exc:
                raise OutputError(f"{self.path} is complete, but {path} could not be written: "
                                  f"{exc.strerror or exc}") from None
            self.sidecars.append(path)

    def abort(self) -> None:
        """Drop an unfinished output: nothing is left under the final name."""
        if self.hasher is not None:
            self.hasher.cancel()
            self.hasher = None
        self._close()
        if self.tmp_path is not None:
            _unlink_quietly(self.tmp_path)
            self.tmp_path = None

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.kind != "stdout" and self.fd >= 0:
                os.close(self.fd)

    def __enter__(self) -> Output:
        if self.kind == "file" and self.tmp_path is None and self.fd < 0:
            # Ctrl-C/SIGTERM are held while the temp file is made and recorded, so an
            # interrupt can never strand it: it arrives inside the with block, or before.
            held = {signal.SIGINT, signal.SIGTERM}
            old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
            try:
                try:
                    self.fd, self.tmp_path = _temp_file(self._directory, self._name)
                except PermissionError:
                    raise OutputError(
                        f"cannot create files in {self._directory}: permission denied"
                    ) from None
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
            except BaseException:
                self.abort()
                raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc_type is not None or self.tmp_path is not None:
            self.abort()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OutputError(
                f"no space left while writing {self.path}; the partial dump was removed"
            ) from exc
        if isinstance(exc, OSError) and exc.errno == errno.EDQUOT:
            raise OutputError(
                f"disk quota exceeded while writing {self.path}; the partial dump was removed"
            ) from exc


def open_output(path: str, *, force: bool = False, digest: bool = True) -> Output:
    """Open a dump destination: '-' (stdout), an existing device/FIFO, or a new 0600 file.

    A new file is created (under a temporary name) when the result's with block is entered.
    """
    if path == "-":
        fd = sys.stdout.fileno()
        if os.isatty(fd):
            raise OutputError("refusing to write a memory dump to a terminal; redirect stdout")
        sys.stdout.flush()
        return Output(path="-", fd=fd, kind="stdout", digest=False)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(
                f"{path} is a symbolic link; refusing to write through it (give the real path)"
            )
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path} is a directory; give a file name (-o DIR/dump.elf)")
        if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
            # /dev/null, a named pipe: written in place, no temp file and no sidecars.
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            return Output(path=path, fd=fd, kind="device", digest=False)
        if not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{path} is not a regular file; refusing to replace it")
    final = [path, path + ".sha256", path + ".json"] if digest else [path, path + ".json"]
    if not force:
        for name in final:
            if os.path.lexists(name):
                raise OutputError(f"{name} already exists; use --force to replace it")
    else:
        for name in final[1:]:
            if os.path.islink(name):
                raise OutputError(f"{name} is a symbolic link; refusing to replace it")
    directory, name = os.path.split(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise OutputError(f"directory {directory} does not exist")
    out = Output(path=path, fd=-1, kind="file", force=force, digest=digest)
    out._directory, out._name = directory, name  # the temp file is made by __enter__
    return out

