"""A dump sent somewhere other than a local file: the writer's pipe, pumped to a Sink in parts."""

from __future__ import annotations

import fcntl
import hashlib
import os
import queue
import random
import select
import signal
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from kcore.errors import KcoreError, OutputError
from kcore.manifest import dumps as manifest_bytes
from kcore.output import ChunkedSha256, Output

PIPE_SIZE = 4 << 20  # the writer's pipe (F_SETPIPE_SZ; else 1 MiB, pipe-max-size's default)
STREAM_CHUNK = 4 << 20  # what a streaming sink is sent at a time, at most
BUFFER_BUDGET = 96 << 20  # part buffers held at once, at most (peak RSS stays bounded)
RETRY_BASE = 0.5  # seconds before the first retry; doubled each time, up to RETRY_CAP
RETRY_CAP = 8.0
SEND_POLL = 0.25  # seconds a stream's send waits before it looks for a cancel again
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGHUP})


class SignalWatch:
    """Cancel an upload when Ctrl-C or SIGTERM arrives, whichever thread the kernel gives it.

    Python runs signal handlers in the main thread only, and that thread may sit in the C
    copy's write() to a full pipe while the upload waits on a receiver that reads nothing:
    the signal then lands on another thread and nothing returns. Python's own C handler
    writes each signal's number to the wakeup fd whatever the thread; a thread of ours
    reads it and sets the upload's cancel event, the pump stops and closes the pipe, the
    write fails with EPIPE, and the main thread raises KeyboardInterrupt (exit 130).
    """

    def __init__(self, cancel: threading.Event) -> None:
        self._cancel = cancel
        self._old = -1
        self._fds: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Watch (from the main thread; elsewhere Python cannot, and the watch is skipped)."""
        if threading.current_thread() is not threading.main_thread():
            return
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:
            os.close(r)
            os.close(w)
            return
        self._fds = (r, w)
        self._thread = threading.Thread(target=self._run, name="kcore-upload-signals",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._fds is not None
        r = self._fds[0]
        while True:
            select.select([r], [], [])
            try:
                data = os.read(r, 64)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data or 0 in data:  # closed, or stop() asks the thread to end
                return
            if any(b in STOP_SIGNALS for b in data):
                self._cancel.set()
                return

    def stop(self) -> None:
        """Give the wakeup fd back and end the thread."""
        if self._fds is None:
            return
        r, w = self._fds
        self._fds = None
        try:
            signal.set_wakeup_fd(self._old, warn_on_full_buffer=False)
        except ValueError:
            pass
        try:
            os.write(w, b"\0")  # signal 0 is no signal: it only wakes the thread to end
        except OSError:
            pass
        if self._thread is not None:
            self._thread.join(5)
        os.close(w)
        os.close(r)


def backoff(attempt: int) -> None:
    """Sleep before try attempt + 2: exponential, capped, with a little jitter."""
    time.sleep(min(RETRY_CAP, RETRY_BASE * 2 ** attempt) * random.uniform(1, 1.25))


@dataclass
class _Done:
    """A digest computed already, read like a hashlib object's."""

    digest: str

    def hexdigest(self) -> str:
        """The digest."""
        return self.digest


class UploadError(OutputError):
    """The destination refused or lost the dump (one line, said to the user; exit 1)."""


class Sink:
    """Where the bytes go. Part sinks (parallel) take whole parts from worker threads;
    stream sinks take the bytes in order from one thread."""

    display: str = ""  # where, for messages (never a signature or token)
    cancel: threading.Event  # set when the upload stops (RemoteOutput.make gives its own)
    parallel: bool = False
    resumable: bool = False

    def open(self) -> None:
        """Connect (or wait for the client), refuse an existing object without force."""

    def already(self, index: int, data: memoryview, sha256: str) -> bool:
        """Whether the server holds part index with these bytes (--resume)."""
        return False

    def held(self, index: int, size: int) -> str | None:
        """The SHA-256 of part index when the server holds it, size bytes long (--resume),
        known without its bytes; else None."""
        return None

    def put_part(self, index: int, data: memoryview, sha256: str) -> None:
        """Upload part index (parallel sinks; retried inside)."""
        raise NotImplementedError

    def send(self, data: memoryview) -> None:
        """Send the next bytes (stream sinks)."""
        raise NotImplementedError

    def finish(self, parts: list[str], sha256: str | None) -> None:
        """The whole object is in: make it one (block list, multipart completion, end)."""

    def abort(self) -> None:
        """Drop the upload: the object is not made (parts may stay for --resume)."""

    def put_beside(self, suffix: str, data: bytes) -> str | None:
        """Upload a small file beside the object (name + suffix); where it went, or None."""
        return None

    def close(self) -> None:
        """Release connections."""


@dataclass
class RemoteOptions:
    """What `kcore dump` passes to a remote destination."""

    threads: int = 4
    part_size: int = 16 << 20
    resume: bool = False
    retries: int = 5
    manifest_url: str | None = None


def send_all(sock: socket.socket, pieces: tuple[Any, ...], where: str, sent: int, lost: str,
             cancel: threading.Event) -> None:
    """Send each piece on sock (plain or TLS); a dropped connection is an UploadError saying
    lost. Never blocks for long: a cancelled upload (Ctrl-C) stops between two waits."""
    before = sock.gettimeout()
    sock.settimeout(SEND_POLL)  # send() then waits at most that long, and sends what fits
    try:
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view:
                if cancel.is_set():
                    raise UploadError(f"{where}: the upload was cancelled")
                try:
                    view = view[sock.send(view):]
                except TimeoutError:
                    continue
    except OSError as exc:
        raise UploadError(f"{where}: the receiver dropped the connection after {sent} bytes "
                          f"({exc.strerror or exc}); {lost}") from None
    finally:
        sock.settimeout(before)


def _read_full(fd: int, view: memoryview) -> int:
    """Fill view from fd; fewer bytes only at end of file."""
    got = 0
    while got < len(view):
        n = os.readv(fd, [view[got:]])
        if n == 0:
            break
        got += n
    return got


@dataclass
class RemoteOutput(Output):
    """An Output whose fd is a pipe; a pump thread sends what arrives to a Sink."""

    sink: Sink = field(default_factory=Sink)
    options: RemoteOptions = field(default_factory=RemoteOptions)
    where: list[str] = field(default_factory=list)  # the object, then its files beside it
    _rfd: int = -1
    _error: BaseException | None = None
    _failed: BaseException | None = None  # the pump's error, when it stopped the dump
    _aborted: bool = False
    _cancel: threading.Event = field(default_factory=threading.Event)
    _pump: threading.Thread | None = None
    _received: int = 0
    _parts: list[str] = field(default_factory=list)
    _skipped: int = 0
    _first_part: int = 0  # parts before it are held, and were not read again (--resume)
    _held: list[str] = field(default_factory=list)
    _whole: Any = None
    _watch: SignalWatch | None = None

    @classmethod
    def make(cls, sink: Sink, options: RemoteOptions, *, force: bool, digest: bool
             ) -> RemoteOutput:
        """A destination for sink (opened when its with block is entered)."""
        out = cls(path=sink.display, fd=-1, kind="remote", force=force, digest=digest,
                  sink=sink, options=options, _whole=hashlib.sha256() if digest else None)
        sink.cancel = out._cancel
        return out

    @property
    def seekable(self) -> bool:
        """Never: the destination takes the bytes in order."""
        return False

    @property
    def _one_commit(self) -> bool:
        """A stream that cannot resume: it commits once, all or nothing."""
        return not self.sink.parallel and not self.sink.resumable

    @property
    def _one_part(self) -> bool:
        """A stream that cannot resume, hashed whole: its one part is the whole dump."""
        return self._whole is not None and self._one_commit

    @property
    def _unhashed(self) -> bool:
        """--no-digest on a stream that cannot resume: no part needs a digest, none is made."""
        return self._whole is None and self._one_commit

    @property
    def part_size(self) -> int:
        """Bytes per part (the manifest's unit)."""
        return self.options.part_size

    def resume_at(self, size: int) -> int:
        """Where a resumed stream of size bytes starts: after the parts the server holds from
        the first one on, whose SHA-256 it knows without their bytes (an Azure block id holds
        it). Those are neither read nor sent; the last part always is. 0 without --resume."""
        if not self.options.resume or self._received:
            return 0
        part = self.part_size
        held: list[str] = []
        while (len(held) + 1) * part < size:
            digest = self.sink.held(len(held), part)
            if digest is None:
                break
            held.append(digest)
        if held:
            self._held, self._first_part = held, len(held)
            self._skipped = len(held)
            self._received = len(held) * part
            if self._whole is not None:  # it needs every byte: the parts' digests stand
                self._whole = None
                self.notes.append(f"resumed after {len(held)} parts that were not read "
                                  f"again: no SHA-256 of the whole dump (the manifest "
                                  f"holds every part's)")
        return self._received

    def __enter__(self) -> RemoteOutput:
        if self._pump is None:
            try:
                self.sink.open()
                self._rfd, self.fd = os.pipe2(os.O_CLOEXEC)
                for size in (PIPE_SIZE, 1 << 20):
                    try:
                        fcntl.fcntl(self.fd, fcntl.F_SETPIPE_SZ, size)
                        break
                    except OSError:
                        continue  # above pipe-max-size (unprivileged): try smaller
                self._open = True
                self._pump = threading.Thread(target=self._run, name="kcore-upload",
                                              daemon=True)
                self._pump.start()
                self._watch = SignalWatch(self._cancel)
                self._watch.start()
            except BaseException:
                self.abort()
                raise
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        super().__exit__(exc_type, exc, tb)  # abort() unless committed
        err = self._failed
        if exc is None or isinstance(exc, KeyboardInterrupt | SystemExit):
            return
        if err is not None and err is not exc:
            if isinstance(err, KcoreError):
                raise err from None
            raise UploadError(f"{self.path}: {err}") from None
        if isinstance(exc, OSError) and not isinstance(exc, KcoreError):
            raise UploadError(f"writing to {self.path}: {exc.strerror or exc}; "
                              f"nothing was committed") from None

    # the pump (its own thread)

    def _run(self) -> None:
        try:
            if self.sink.parallel:
                self._run_parts()
            else:
                self._run_stream()
        except BaseException as exc:
            self._error = exc
            self._cancel.set()
        finally:
            os.close(self._rfd)  # the writer now gets EPIPE, if it still writes
            self._rfd = -1

    def _run_stream(self) -> None:
        buf = bytearray(STREAM_CHUNK)
        # hashed on a thread of its own while the same bytes are sent. A stream that cannot
        # resume commits once, so it is one part: the whole's SHA-256 is the part's (one hash
        # pass, not two); with --no-digest no part needs one and nothing is hashed. A sink
        # that resumes has each part hashed.
        one_part = self._one_part
        hasher = None if self._unhashed else ChunkedSha256(
            self.part_size, whole=self._whole is not None, chunks=not one_part)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="kcore-upload-sha256") as pool:
                while not self._cancel.is_set():
                    n = os.readv(self._rfd, [buf])
                    if n == 0:
                        break
                    view = memoryview(buf)[:n]
                    hashed = pool.submit(hasher.update, view) if hasher is not None else None
                    try:
                        self.sink.send(view)
                    finally:
                        if hashed is not None:
                            hashed.result()
                    self._received += n
        finally:
            whole = hasher.hexdigest() if hasher is not None else ""
        if self._whole is not None:
            self._whole = _Done(whole)
        if hasher is not None:
            self._parts = [whole] if one_part and self._received else hasher.chunks

    def _run_parts(self) -> None:
        size = self.part_size
        nbuf = max(2, min(self.options.threads + 1, BUFFER_BUDGET // size))
        free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(nbuf):
            free.put(bytearray(size))
        digests: dict[int, str] = {}
        jobs: list[Future[None]] = []
        index = -1  # known once the writer sends: it calls resume_at() first

        def upload(index: int, buf: bytearray, n: int) -> None:
            try:
                if self._cancel.is_set():
                    return
                view = memoryview(buf)[:n]
                sha = hashlib.sha256(view).hexdigest()
                if self.options.resume and self.sink.already(index, view, sha):
                    self._skipped += 1
                else:
                    self.sink.put_part(index, view, sha)
                digests[index] = sha
            except BaseException as exc:
                if self._error is None:
                    self._error = exc
                self._cancel.set()
            finally:
                free.put(buf)

        with ThreadPoolExecutor(nbuf - 1, thread_name_prefix="kcore-upload-part") as pool:
            try:
                while not self._cancel.is_set():
                    buf = self._take(free)
                    if buf is None:
                        break
                    n = _read_full(self._rfd, memoryview(buf))
                    if index < 0:
                        index = self._first_part
                        digests.update(enumerate(self._held))
                    if n == 0:
                        free.put(buf)
                        break
                    if self._whole is not None:
                        self._whole.update(memoryview(buf)[:n])
                    self._received += n
                    jobs.append(pool.submit(upload, index, buf, n))
                    index += 1
                    jobs = [j for j in jobs if not j.done()]
            finally:
                for job in jobs:
                    job.result()
        if self._error is not None:
            raise self._error
        if not self._cancel.is_set():
            self._parts = [digests[i] for i in range(max(index, 0))]

    def _take(self, free: queue.SimpleQueue[bytearray]) -> bytearray | None:
        """A free part buffer, or None once the upload is cancelled."""
        while not self._cancel.is_set():
            try:
                return free.get(timeout=0.2)
            except queue.Empty:
                continue
        return None

    # the writer's side (main thread)

    def _drain(self, size: int) -> None:
        """End the stream and wait for the pump to send (or hold) every byte."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        pump = self._pump
        while pump is not None and pump.is_alive():
            pump.join(0.2)  # in slices: Ctrl-C is seen meanwhile
        if self._error is not None:
            raise self._error
        if self._received != size:
            raise UploadError(f"{self.path}: {self._received} bytes were sent of a "
                              f"{size}-byte dump; nothing was committed")

    def finish(self, size: int, progress: Any = None) -> str | None:
        """Wait until every byte is uploaded; the object is not made yet (commit() does)."""
        if self._pump is not None and (self.fd >= 0 or self._pump.is_alive()):
            self._drain(size)
            if self._whole is not None:
                self.sha256 = self._whole.hexdigest()
        if self._watch is not None:  # every byte is sent: commit() holds Ctrl-C from here
            self._watch.stop()
            self._watch = None
        return self.sha256

    def _complete(self, manifest: dict[str, Any] | None) -> None:
        """Make the object, then upload its manifest and SHA-256 beside it."""
        self.sink.finish(self._parts, self.sha256)
        self._open = False
        self.where.append(self.path)
        beside: list[tuple[str, bytes]] = []
        if self.sha256 is not None:
            name = os.path.basename(self.path.split("?", 1)[0]) or "dump"
            beside.append((".sha256", f"{self.sha256}  {name}\n".encode()))
        if manifest is not None:
            parts = None if self._unhashed else {
                "size": self._received if self._one_part else self.part_size,
                "count": len(self._parts), "sha256": self._parts, "resumed": self._skipped}
            full = dict(manifest, sha256=self.sha256, chunks=None, parts=parts)
            beside.append((".json", manifest_bytes(full)))
        for suffix, data in beside:
            try:
                at = self.sink.put_beside(suffix, data)
            except KcoreError as exc:
                raise UploadError(f"{self.path} is complete, but its {suffix} file could not "
                                  f"be uploaded: {exc}") from None
            if at is not None:
                self.where.append(at)
                self.sidecars.append(at)
            elif suffix == ".json":
                self.notes.append(f"the manifest was not uploaded: no URL signs one beside "
                                  f"{self.path} (give --manifest-url)")
        self._close()

    def abort(self) -> None:
        """Stop the upload; the object is never made."""
        if not self._aborted:  # a failure of the pump's own, if it came first
            self._aborted, self._failed = True, self._error
        self._cancel.set()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._pump is not None:
            self._pump.join(30)
        if self._open:
            try:
                self.sink.abort()
            except (KcoreError, OSError):
                pass
        self._open = False
        self._close()

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
        if not self._closed:
            self._closed = True
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1
            self.sink.close()

    @property
    def received(self) -> int:
        """Bytes the pump took from the writer."""
        return self._received

    @property
    def resumed_parts(self) -> int:
        """Parts the server held already (--resume) and that were not sent again."""
        return self._skipped

