"""Safe dump outputs: 0600 files made under a temporary name, renamed into place when complete."""

from __future__ import annotations

import errno
import hashlib
import os
import queue
import re
import secrets
import signal
import stat
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import OutputError
from kcore.manifest import CHUNK, sidecar_path
from kcore.manifest import dumps as manifest_bytes

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


NAME_MAX = 255  # the longest file name Linux filesystems take
SIDECARS = (".sha256", ".json", ".symbols")
_TMP = re.compile(r"^\.(?P<name>.*)\.kcore-(?P<pid>[0-9]+)-[0-9a-f]{12}\.tmp$")


def _create_exclusive(dir_fd: int, name: str) -> int:
    """Create name in the directory dir_fd read-write, O_EXCL|O_NOFOLLOW, 0600; return its fd."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    return os.open(name, flags, FILE_MODE, dir_fd=dir_fd)


def _open_unnamed(dir_fd: int) -> int | None:
    """An unnamed 0600 file in the directory (O_TMPFILE), or None where that is not possible.

    It has no name until linked in at the end (through /proc/self/fd), so a kill leaves
    nothing behind.
    """
    if not hasattr(os, "O_TMPFILE") or not os.path.isdir("/proc/self/fd"):
        return None
    try:
        return os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        return None  # EOPNOTSUPP, EISDIR, EINVAL: the filesystem (or kernel) lacks O_TMPFILE


def _tmp_name(final_name: str) -> str:
    """A fresh temporary name beside final_name, cut to NAME_MAX: .NAME.kcore-PID-RANDOM.tmp."""
    tail = f".kcore-{os.getpid()}-{secrets.token_hex(6)}.tmp"
    return "." + final_name[:NAME_MAX - 1 - len(tail)] + tail


def clean_stale_temps(dir_fd: int, final_name: str) -> list[str]:
    """Remove the temporary files of earlier dumps to final_name whose process is gone."""
    removed: list[str] = []
    try:
        names = os.listdir(dir_fd)
    except OSError:
        return removed
    for name in names:
        m = _TMP.match(name)
        if m is None or not (m["name"] == final_name or (
                len(name) == NAME_MAX and final_name.startswith(m["name"]))):
            continue
        pid = int(m["pid"])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # alive (or another user's): its dump may still be running
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(name, dir_fd=dir_fd)
            removed.append(name)
        except OSError:
            pass
    return removed


def _temp_file(dir_fd: int, final_name: str) -> tuple[int, str | None]:
    """A fresh 0600 file for final_name: unnamed (O_TMPFILE) where possible; (fd, temp name)."""
    fd = _open_unnamed(dir_fd)
    if fd is not None:
        os.fchmod(fd, FILE_MODE)
        return fd, None
    for _ in range(100):
        name = _tmp_name(final_name)
        try:
            fd = _create_exclusive(dir_fd, name)
        except FileExistsError:
            continue
        os.fchmod(fd, FILE_MODE)  # the umask may only have narrowed it; be exact
        return fd, name
    raise OutputError(f"cannot create a temporary file for {final_name}")


def _land(fd: int, tmp: str | None, dir_fd: int, final: str, force: bool, shown: str) -> None:
    """Give a complete file its final name in dir_fd (replace only with force).

    fd is the open file; tmp its temporary name, or None for an unnamed (O_TMPFILE) one.
    """
    if tmp is None:  # link the unnamed file in: under its final name, or a temp to rename
        target = _tmp_name(final) if force else final
        try:
            os.link(f"/proc/self/fd/{fd}", target, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            raise OutputError(f"{shown} appeared while dumping; not replaced (use --force)"
                              ) from None
        if not force:
            return
        tmp = target
    try:
        if force:
            # rename(2) replaces a symlink itself, never its target
            os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        try:
            os.link(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        except FileExistsError:
            raise OutputError(f"{shown} appeared while dumping; not replaced (use --force)"
                              ) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # A filesystem without hard links (vfat...): check, then rename.
            try:
                os.stat(final, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.replace(tmp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
                return
            raise OutputError(f"{shown} appeared while dumping; not replaced (use --force)"
                              ) from None
        os.unlink(tmp, dir_fd=dir_fd)
    except BaseException:
        _unlink_quietly(tmp, dir_fd)
        raise


def _open_dir(directory: str) -> int:
    """An fd of the output directory: every later step works in it, whatever its path becomes."""
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise OutputError(f"directory {directory} does not exist") from None
    except NotADirectoryError:
        raise OutputError(f"{directory} is not a directory") from None
    except PermissionError:
        raise OutputError(f"cannot open {directory}: permission denied") from None


def write_small(path: str, data: bytes, force: bool, dir_fd: int | None = None) -> None:
    """Write a small file safely: temp name, 0600, then into place (replace only with force).

    With dir_fd, path's last part is created in that directory.
    """
    directory, name = os.path.split(os.path.abspath(path))
    own = dir_fd is None
    dfd = _open_dir(directory) if dir_fd is None else dir_fd
    try:
        fd, tmp = _temp_file(dfd, name)
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                f.write(data)
            _land(fd, tmp, dfd, name, force, path)
        except BaseException:
            if tmp is not None:
                _unlink_quietly(tmp, dfd)
            raise
        finally:
            os.close(fd)
    finally:
        if own:
            os.close(dfd)


def _unlink_quietly(path: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(path, dir_fd=dir_fd)
    except OSError:
        pass




class ChunkedSha256:
    """The SHA-256 of a whole output and of each chunk bytes of it (CHUNK by default; a second
    thread hashes the chunks beside the whole, so the two cost one hash's time on two cores)."""

    def __init__(self, chunk: int = CHUNK, whole: bool = True, chunks: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.size = chunk
        self.whole = whole  # False: the chunks' digests only (hexdigest() gives "")
        self.by_chunk = chunks or not whole  # False: the whole's digest only (chunks stays [])
        self._total = hashlib.sha256()
        self._chunk = hashlib.sha256()
        self._left = chunk
        self.chunks: list[str] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kcore-sha256-chunks")

    def update(self, data: Any) -> None:
        """Hash the next bytes of the output."""
        view = memoryview(data).cast("B")
        if not self.whole:
            self._update_chunks(view)
            return
        if not self.by_chunk:
            self._total.update(view)
            return
        job = self._pool.submit(self._update_chunks, view)
        self._total.update(view)
        job.result()

    def _update_chunks(self, view: memoryview) -> None:
        while view:
            take = min(self._left, len(view))
            self._chunk.update(view[:take])
            self._left -= take
            view = view[take:]
            if self._left == 0:
                self.chunks.append(self._chunk.hexdigest())
                self._chunk, self._left = hashlib.sha256(), self.size

    def close(self) -> None:
        """Stop the chunk thread (an abandoned output)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def hexdigest(self) -> str:
        """The whole output's SHA-256; the last partial chunk's digest is added to chunks."""
        if self._left != self.size:
            self.chunks.append(self._chunk.hexdigest())
            self._chunk, self._left = hashlib.sha256(), self.size
        self._pool.shutdown()
        return self._total.hexdigest() if self.whole else ""


class BufferHasher:
    """SHA-256 of an output fed in file order from the writer's own buffers, in a thread.

    The writer takes a buffer (buffer()), fills and writes it, then submit()s it; the
    thread hashes it and hands it back. No read-back of the file.
    """

    def __init__(self, nbuf: int = 8, size: int = HASH_CHUNK) -> None:
        self._hash = ChunkedSha256()
        self._done = 0
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        # Bounded: a writer ahead of the hash waits (back-pressure), whatever it submits.
        self._full: queue.Queue[tuple[Any, int] | None] = queue.Queue(maxsize=2 * nbuf)
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
        """Hash the first n bytes of data next (a buffer() buffer is returned after).

        Waits while the thread is that far behind; data None stands for n zero bytes.
        """
        item = (data, len(data) if n is None else n)
        while True:
            try:
                self._full.put(item, timeout=0.5)
                return
            except queue.Full:
                if self._error is not None or not self._thread.is_alive():
                    raise OutputError(f"the SHA-256 thread stopped: {self._error}") from None

    def submit_zeros(self, n: int) -> None:
        """Hash n zero bytes next (one queue entry however long the run)."""
        self.submit(None, n)

    @property
    def done(self) -> int:
        """Bytes hashed so far."""
        return self._done

    def finish(self, size: int, progress: Callable[[int], None] | None = None) -> str:
        """Wait for the hash of everything submitted (size bytes); return it as hex."""
        self._put_end()
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
        while True:  # make room for the end mark: the thread stops at the next entry
            try:
                self._full.get_nowait()
            except queue.Empty:
                break
        self._put_end()
        self._thread.join()
        self._hash.close()

    def _put_end(self) -> None:
        """Queue the end mark (waits for room while the thread runs)."""
        while True:
            try:
                self._full.put(None, timeout=0.5)
                return
            except queue.Full:
                if not self._thread.is_alive():
                    return

    def _run(self) -> None:
        try:
            zeros = memoryview(bytes(self.size))
            while (item := self._full.get()) is not None and not self._cancel:
                data, n = item
                if data is None:  # a zero run, hashed a block at a time
                    left = n
                    while left and not self._cancel:
                        k = min(left, len(zeros))
                        self._hash.update(zeros[:k])
                        self._done += k
                        left -= k
                    continue
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
    tmp_path: str | None = None  # the temporary name, where the file has one (no O_TMPFILE)
    hasher: BufferHasher | None = None
    sha256: str | None = None
    chunk_sha256: list[str] | None = None
    sidecars: list[str] = field(default_factory=list)
    with_sidecars: bool = True  # OUTPUT.sha256 and OUTPUT.json beside a file (not `kcore read`)
    extra_sidecars: dict[str, bytes] = field(default_factory=dict)  # suffix -> bytes (.symbols)
    notes: list[str] = field(default_factory=list)  # warnings for the summary
    _closed: bool = False
    _directory: str = ""
    _name: str = ""
    _dir_fd: int = -1
    _open: bool = False  # the file exists (named or not) and is not landed or dropped yet

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
        return sidecar_path(self.path)

    def check_space(self, needed: int, *, estimate: bool = False, least: int | None = None
                    ) -> None:
        """Refuse to start when the output filesystem has less than needed bytes free; with
        least (compressed pages: needed is every page stored whole), only when it has less
        than least, and a warning between the two."""
        if self.kind != "file":
            return
        directory = os.path.dirname(os.path.abspath(self.path))
        st = os.statvfs(directory)
        free = st.f_bavail * st.f_frsize
        if needed <= free:
            return
        if least is not None and least <= free:
            self.notes.append(
                f"{directory} has {human(free)} free and the dump may need up to "
                f"{human(needed)} (every page stored whole): started anyway, as compressed "
                f"pages take less; a full disk stops it and removes the partial file")
            return
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

    def resume_at(self, size: int) -> int:
        """Where the copy of a dump of size bytes starts: 0 (a remote output may resume)."""
        return 0

    def start_digest(self) -> None:
        """Start hashing the output (file outputs only): the writer submits every byte, in
        file order, to self.hasher."""
        if self.digest and self.kind == "file" and self.hasher is None:
            self.hasher = BufferHasher()

    def finish(self, size: int, progress: Callable[[int], None] | None = None) -> str | None:
        """Wait for the digest of the first size bytes and flush the file; return the digest."""
        if self.hasher is not None:
            self.sha256 = self.hasher.finish(size, progress)
            self.chunk_sha256 = self.hasher._hash.chunks
            self.hasher = None
        if self.kind == "file" and not self._closed:
            os.fsync(self.fd)
        return self.sha256

    def commit(self, size: int, manifest: dict[str, Any] | None = None,
               landed: Callable[[], object] | None = None) -> None:
        """Finish, move into place, then write OUTPUT.sha256 and OUTPUT.json.

        Ctrl-C/SIGTERM are held meanwhile: the output is in place with its sidecars, or not
        at all. landed() is called once it is, before they are let through again.
        """
        self.finish(size)
        held = (signal.SIGINT, signal.SIGTERM)
        old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
        # The mask holds only this thread's signals: one sent to the process can reach a
        # helper thread (a hasher) and run the handler here all the same. So the handlers
        # only note it meanwhile, and the first noted is handed on once the output landed.
        caught: list[int] = []
        try:
            before = {sig: signal.signal(sig, lambda signum, _f: caught.append(signum))
                      for sig in held}
        except ValueError:  # not the main thread: no Python handler runs here anyway
            before = {}
        try:
            self._complete(manifest)
            if landed is not None:
                landed()
        finally:
            for sig, handler in before.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if caught:
            sig = signal.Signals(caught[0])
            handler = before.get(sig)
            if callable(handler):
                handler(sig, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)

    def _complete(self, manifest: dict[str, Any] | None) -> None:
        """Put the finished output in place (a file: with its sidecars)."""
        if self.kind == "file":
            self._commit_file(manifest)
        else:
            self._close()

    def _commit_file(self, manifest: dict[str, Any] | None) -> None:
        """commit() of a file: land it under its final name, then its sidecars."""
        tmp = self.tmp_path
        _land(self.fd, tmp, self._dir_fd, self._name, self.force, self.path)
        self._open = False
        self.tmp_path = None
        self._close()
        sidecars: list[tuple[str, bytes]] = []
        if self.sha256 is not None and self.with_sidecars:
            line = f"{self.sha256}  {os.path.basename(self.path)}\n"
            sidecars.append((self.sha256_path, line.encode()))
        elif self.force and self.with_sidecars:  # the replaced dump's digest: now untrue
            _unlink_quietly(os.path.basename(self.sha256_path), self._dir_fd)
        if manifest is not None and self.with_sidecars:
            chunks = None if self.chunk_sha256 is None else {"size": CHUNK,
                                                             "sha256": self.chunk_sha256}
            full = dict(manifest, sha256=self.sha256)
            full.setdefault("chunks", chunks)  # the kcore image brings its sparse ones
            sidecars.append((self.manifest_path, manifest_bytes(full)))
        if self.with_sidecars:
            sidecars.extend((self.path + suffix, data)
                            for suffix, data in self.extra_sidecars.items())
        for path, data in sidecars:
            try:
                write_small(path, data, self.force, self._dir_fd)
            except OSError as exc:
                raise OutputError(f"{self.path} is complete, but {path} could not be written: "
                                  f"{exc.strerror or exc}") from None
            self.sidecars.append(path)
        self._close_dir()

    def abort(self) -> None:
        """Drop an unfinished output: nothing is left under the final name."""
        if self.hasher is not None:
            self.hasher.cancel()
            self.hasher = None
        self._close()
        if self.tmp_path is not None and self._open:
            _unlink_quietly(self.tmp_path, self._dir_fd)  # where it is, whatever the path
        self.tmp_path = None
        self._open = False
        self._close_dir()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.kind != "stdout" and self.fd >= 0:
                os.close(self.fd)

    def _close_dir(self) -> None:
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> Output:
        if self.kind == "file" and not self._open and self.fd < 0:
            # Ctrl-C/SIGTERM are held while the temp file is made and recorded, so an
            # interrupt can never strand it: it arrives inside the with block, or before.
            held = {signal.SIGINT, signal.SIGTERM}
            old = signal.pthread_sigmask(signal.SIG_BLOCK, held)
            try:
                try:
                    self._dir_fd = _open_dir(self._directory)
                    clean_stale_temps(self._dir_fd, self._name)
                    self.fd, tmp = _temp_file(self._dir_fd, self._name)
                    self.tmp_path, self._open = tmp, True
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
        if exc_type is not None or self._open:
            self.abort()
        if self.kind == "file":
            removed = "; the partial dump was removed"
        else:
            removed = f"; what {self.path} received is incomplete"
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise OutputError(f"no space left while writing {self.path}{removed}") from exc
        if isinstance(exc, OSError) and exc.errno == errno.EDQUOT:
            raise OutputError(f"disk quota exceeded while writing {self.path}{removed}") from exc


def stdout_fd() -> int:
    """The fd of standard output, or an OutputError when it is closed."""
    stream = sys.stdout
    try:
        if _STDOUT_CLOSED:
            raise ValueError
        stream.flush()
        return stream.fileno()
    except (ValueError, OSError, AttributeError):
        raise OutputError("standard output is closed; give an output file (-o FILE)") from None


_STDOUT_CLOSED = False  # set by guard_std_streams(): fd 1 was closed at start (now /dev/null)


def guard_std_streams() -> None:
    """Put /dev/null on closed fds 0-2, so no file opened later takes their number.

    A closed stderr then swallows messages (never into stdout, which may carry a dump);
    a closed stdout is remembered, and writing a dump or bytes there is an error.
    """
    global _STDOUT_CLOSED
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:
        nul = os.open(os.devnull, os.O_RDWR)
        if nul != fd:
            os.dup2(nul, fd)
            os.close(nul)
    if 1 in closed or sys.stdout is None:
        _STDOUT_CLOSED = True
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - text goes nowhere, data is refused
    if 2 in closed or sys.stderr is None:
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process


def open_output(path: str, *, force: bool = False, digest: bool = True,
                sidecars: bool = True, tty_ok: bool = False) -> Output:
    """Open a dump destination: '-' (stdout), an existing device/FIFO, or a new 0600 file.

    A new file is created (unnamed where the filesystem allows, else under a temporary
    name) when the result's with block is entered, and named when committed. sidecars:
    OUTPUT.sha256 and OUTPUT.json go beside it. tty_ok: stdout may be a terminal.
    (A URL is kcore.destinations.open_output's.)
    """
    if path == "-":
        fd = stdout_fd()
        if not tty_ok and os.isatty(fd):
            raise OutputError("refusing to write a memory dump to a terminal; redirect stdout")
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
    directory, name = os.path.split(os.path.abspath(path))
    if not sidecars:
        final = [path]
    else:
        final = [path, path + ".sha256", path + ".json"] if digest else [path, path + ".json"]
    longest = max(final, key=lambda n: len(os.path.basename(n).encode()))
    if len(os.path.basename(longest).encode()) > NAME_MAX:
        extra = " (or --no-digest)" if longest.endswith(".sha256") else ""
        raise OutputError(f"{os.path.basename(longest)}: a file name longer than {NAME_MAX} "
                          f"bytes; give a shorter output name{extra}")
    if not force:
        for each in final:
            if os.path.lexists(each):
                raise OutputError(f"{each} already exists; use --force to replace it")
    else:
        for each in final[1:]:
            if os.path.islink(each):
                raise OutputError(f"{each} is a symbolic link; refusing to replace it")
    if not os.path.isdir(directory):
        raise OutputError(f"directory {directory} does not exist")
    out = Output(path=path, fd=-1, kind="file", force=force, digest=digest,
                 with_sidecars=sidecars)
    out._directory, out._name = directory, name  # the temp file is made by __enter__
    return out

