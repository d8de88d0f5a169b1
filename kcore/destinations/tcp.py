"""TCP destinations: connect to a receiver (tcp://HOST:PORT), or serve one (tcp-listen:PORT)."""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
import termios
import time

from kcore.destinations.remote import RemoteOptions, Sink, UploadError, backoff, send_all
from kcore.errors import InputError

SIOCOUTQ = termios.TIOCOUTQ  # bytes the socket has not had acknowledged yet
ACK_WAIT = 60.0  # seconds the receiver's TCP has to acknowledge the last bytes


def host_port(text: str, what: str, default_host: str | None = None) -> tuple[str, int]:
    """(host, port) from HOST:PORT, [V6]:PORT or (with default_host) PORT."""
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise InputError(f"{what}: give HOST:PORT")
        host, port = default_host, text
    host = host.strip("[]")
    if not port.isdigit() or not 0 < int(port) < 65536 or (not host and default_host is None):
        raise InputError(f"{what}: not HOST:PORT (a port from 1 to 65535)")
    return host or (default_host or ""), int(port)


class TcpSink(Sink):
    """The dump's bytes on a TCP connection, as LiME sends them: `nc HOST PORT > mem.lime`
    (tcp-listen) or `nc -l PORT > mem.lime` (tcp://) receives it. Success means the
    receiver's TCP acknowledged every byte."""

    parallel = False

    def __init__(self, spec: str, options: RemoteOptions) -> None:
        self.options = options
        self.listen = spec.startswith("tcp-listen:")
        if self.listen:
            self.host, self.port = host_port(spec[len("tcp-listen:"):], spec, "0.0.0.0")
        else:
            self.host, self.port = host_port(spec[len("tcp://"):].rstrip("/"), spec)
        self.display = spec
        self.sock: socket.socket | None = None
        self._sent = 0

    def open(self) -> None:
        """Connect (retried with backoff), or wait for one client."""
        if self.listen:
            self.sock = self._accept()
        else:
            self.sock = self._connect()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def _connect(self) -> socket.socket:
        for attempt in range(self.options.retries + 1):
            try:
                return socket.create_connection((self.host, self.port), timeout=10)
            except OSError as exc:
                if attempt == self.options.retries:
                    raise UploadError(f"connecting to {self.display} failed (after "
                                      f"{attempt + 1} tries): {exc.strerror or exc}") from None
            backoff(attempt)
        raise AssertionError("unreachable")

    def _accept(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        try:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            server.bind((self.host, self.port))
            server.listen(1)
        except OSError as exc:
            server.close()
            raise UploadError(f"cannot listen on {self.display}: {exc.strerror or exc}"
                              ) from None
        print(f"kcore: waiting for a receiver on port {server.getsockname()[1]} "
              f"(nc HOST {self.port} > dump)", file=sys.stderr, flush=True)
        try:
            conn, peer = server.accept()
        finally:
            server.close()
        print(f"kcore: sending to {peer[0]}:{peer[1]}", file=sys.stderr, flush=True)
        conn.settimeout(None)
        return conn

    def send(self, data: memoryview) -> None:
        """The next bytes, all of them."""
        assert self.sock is not None
        send_all(self.sock, (data,), self.display, self._sent, "what it got is incomplete",
                 self.cancel)
        self._sent += len(data)

    def finish(self, parts: list[str], sha256: str | None) -> None:
        """End the stream; wait until the receiver's TCP acknowledged every byte."""
        assert self.sock is not None
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + ACK_WAIT
            while _unacked(self.sock) > 0:
                if time.monotonic() > deadline:
                    raise UploadError(f"{self.display}: the receiver did not acknowledge the "
                                      f"last {_unacked(self.sock)} bytes in {ACK_WAIT:.0f} s")
                time.sleep(0.01)
        except OSError as exc:
            raise UploadError(f"{self.display}: the connection failed at its end "
                              f"({exc.strerror or exc}); what it got may be incomplete"
                              ) from None

    def abort(self) -> None:
        """Reset the connection: the receiver sees an error, not a clean end."""
        if self.sock is not None:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                     struct.pack("ii", 1, 0))
            except OSError:
                pass
            self.close()

    def close(self) -> None:
        """Close the socket."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _unacked(sock: socket.socket) -> int:
    """Bytes sent on sock that the peer has not acknowledged."""
    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])
