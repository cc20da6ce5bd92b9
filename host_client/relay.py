"""In-process relay from a private unix socket to a `vsock:` or `hvsock:` target.

gRPC cannot dial AF_VSOCK or a hybrid-vsock socket itself, so a `Relay`
listens on a unix socket in a fresh 0700 directory and, for every connection
gRPC opens there, dials the guest anew and moves bytes both ways:

- `vsock:CID:PORT`: Linux AF_VSOCK `connect((CID, PORT))` (QEMU vhost-vsock-pci
  and other VMMs with kernel vhost).
- `hvsock:PATH:PORT`: the hybrid-vsock unix socket of Firecracker, Cloud
  Hypervisor and vhost-device-vsock: connect to PATH, send `CONNECT PORT\\n`,
  expect `OK <n>\\n`; from then on the stream is the guest connection.

One relay per client channel, created lazily (by host_client.transports) and
closed with the client. Because every gRPC (re)connection is a new accepted
connection here, a restarted agent or guest is simply dialled again.
A failed dial closes gRPC's connection at once (gRPC reports UNAVAILABLE and
retries with backoff); the reason, naming the path/CID and port, is kept in
`Relay.last_error`, and `dial()` raises it as a `RelayError` for callers that
want it directly (e.g. `coworkctl doctor`).

Bytes move with `os.splice` through a pipe on Linux, or a recv/send loop
elsewhere (macOS); half-close is passed on with shutdown(SHUT_WR), an error on
either side aborts both, and back-pressure holds because each direction only
reads after it has written the previous chunk.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable

from .targets import Target, TargetError

CHUNK = 1 << 20
PIPE_SIZE = 1 << 20
VSOCK_BUFFER = 2 << 20
DIAL_TIMEOUT = 10.0  # seconds for connect + hybrid-vsock handshake (TCG guests are slow)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; Python 3.10 has it, older stubs may not)
_MAX_REPLY = 128


class RelayError(ConnectionError):
    """The guest end of a vsock/hvsock target could not be reached; the message says where/why."""


def dial(target: Target, timeout: float = DIAL_TIMEOUT) -> socket.socket:
    """Open one stream to the guest port of a vsock/hvsock target (blocking socket)."""
    if target.kind == "hvsock":
        return _dial_hvsock(target.path, target.port, timeout)
    if target.kind == "vsock":
        return _dial_vsock(target.cid, target.port, timeout)
    raise TargetError(f"{target.spec}: not a vsock/hvsock target")


def _dial_hvsock(path: str, port: int, timeout: float) -> socket.socket:
    where = f"hvsock {path} port {port}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except FileNotFoundError:
            raise RelayError(
                f"{where}: socket {path} does not exist (is the VM / vsock backend running?)"
            ) from None
        except ConnectionRefusedError:
            raise RelayError(
                f"{where}: nothing accepts on {path} (VM or vsock backend stopped?)"
            ) from None
        except TimeoutError:
            raise RelayError(f"{where}: timed out connecting to {path}") from None
        except OSError as exc:
            raise RelayError(f"{where}: cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            s.sendall(f"CONNECT {port}\n".encode())
            reply = _read_line(s)
        except TimeoutError:
            raise RelayError(
                f"{where}: no reply to 'CONNECT {port}' within {timeout:g}s "
                "(guest not booted or too slow?)"
            ) from None
        except OSError as exc:
            raise RelayError(f"{where}: handshake failed: {exc.strerror or exc}") from None
        if reply is None:
            raise RelayError(
                f"{where}: the guest refused the connection (nothing listening on vsock port "
                f"{port} in the guest? is the agent running?)"
            )
        text = reply.decode("ascii", "replace").strip()
        if not text.startswith("OK"):
            raise RelayError(f"{where}: unexpected handshake reply {text!r} (want 'OK <port>')")
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise


def _read_line(s: socket.socket) -> bytes | None:
    """Read the handshake reply byte by byte: whatever follows it belongs to the stream."""
    buf = bytearray()
    while len(buf) < _MAX_REPLY:
        b = s.recv(1)
        if not b:
            return None
        buf += b
        if b == b"\n":
            return bytes(buf)
    return bytes(buf)


def _dial_vsock(cid: int, port: int, timeout: float) -> socket.socket:
    where = f"vsock CID {cid} port {port}"
    family = getattr(socket, "AF_VSOCK", None)
    if family is None:
        raise RelayError(f"{where}: AF_VSOCK is not available on this platform")
    try:
        s = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise RelayError(
            f"{where}: cannot create an AF_VSOCK socket ({exc.strerror}); "
            "load vhost_vsock/vsock modules?"
        ) from None
    try:
        _tune_vsock(s)
        s.settimeout(timeout)
        try:
            s.connect((cid, port))
        except TimeoutError:
            raise RelayError(f"{where}: timed out connecting") from None
        except ConnectionResetError:
            raise RelayError(
                f"{where}: the guest refused the connection (agent not listening on port {port}?)"
            ) from None
        except OSError as exc:
            hint = " (no such CID: is the VM running?)" if exc.errno == errno.ENODEV else ""
            raise RelayError(f"{where}: {exc.strerror or exc}{hint}") from None
        s.settimeout(None)
        return s
    except BaseException:
        s.close()
        raise


def _tune_vsock(s: socket.socket) -> None:
    for opt in ("SO_VM_SOCKETS_BUFFER_MAX_SIZE", "SO_VM_SOCKETS_BUFFER_SIZE"):
        num = getattr(socket, opt, None)
        if num is not None:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.AF_VSOCK, num, VSOCK_BUFFER)


# -- byte pumps -----------------------------------------------------------------

_splice_ok = hasattr(os, "splice")


class _SpliceUnsupported(Exception):
    pass


def pump(src: socket.socket, dst: socket.socket) -> int:
    """Copy src to dst until EOF on src; returns the byte count. Raises OSError on failure."""
    global _splice_ok
    if _splice_ok:
        try:
            return _pump_splice(src, dst)
        except _SpliceUnsupported:
            _splice_ok = False
    return _pump_copy(src, dst)


def _pump_splice(src: socket.socket, dst: socket.socket) -> int:
    import fcntl

    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, getattr(fcntl, "F_SETPIPE_SZ", _F_SETPIPE_SZ), PIPE_SIZE)
        sfd, dfd = src.fileno(), dst.fileno()
        total = 0
        while True:
            try:
                n = os.splice(sfd, w, CHUNK)
            except OSError as exc:
                if total == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise _SpliceUnsupported from exc
                raise
            if n == 0:
                return total
            left = n
            while left:
                left -= os.splice(r, dfd, left)
            total += n
    finally:
        os.close(r)
        os.close(w)


def _pump_copy(src: socket.socket, dst: socket.socket) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return total
        dst.sendall(view[:n])
        total += n


class _Pair:
    """One relayed connection: two sockets, two pump threads; the last one out closes both."""

    def __init__(
        self, a: socket.socket, b: socket.socket, on_done: Callable[[_Pair], None]
    ) -> None:
        self.a, self.b = a, b
        self.on_done = on_done
        self._lock = threading.Lock()
        self._running = 2

    def run(self) -> None:
        """a→b in a new thread, b→a in the calling thread."""
        threading.Thread(target=self._pump, args=(self.a, self.b), daemon=True).start()
        self._pump(self.b, self.a)

    def abort(self) -> None:
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            pump(src, dst)
        except OSError:
            self.abort()  # reset / broken pipe: the connection is gone both ways
        else:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                for s in (self.a, self.b):
                    with contextlib.suppress(OSError):
                        s.close()
                self.on_done(self)


class Relay:
    """Listens on a private unix socket; each accepted connection is spliced to the guest.

    Thread-safe; `address` is the gRPC address to dial ("unix:/…/relay.sock").
    """

    def __init__(self, target: Target, dial_timeout: float = DIAL_TIMEOUT) -> None:
        if target.kind not in ("vsock", "hvsock"):
            raise TargetError(f"{target.spec}: a relay is only for vsock: and hvsock: targets")
        if target.kind == "vsock" and not hasattr(socket, "AF_VSOCK"):
            raise TargetError(f"{target.spec}: AF_VSOCK is not available on this platform")
        self.target = target
        self.dial_timeout = dial_timeout
        self.last_error: str | None = None
        self.connections = 0  # successful dials, for tests and diagnostics
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._closed = False
        self._dir = tempfile.mkdtemp(prefix="cowork-relay-")  # 0700
        self._path = os.path.join(self._dir, "relay.sock")
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(self._path)
            self._listener.listen(64)
        except OSError:
            self._listener.close()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise
        self._thread = threading.Thread(
            target=self._accept_loop, name=f"cowork-relay {target.spec}", daemon=True
        )
        self._thread.start()

    @property
    def address(self) -> str:
        return f"unix:{self._path}"

    @property
    def path(self) -> str:
        return self._path

    def dial(self) -> socket.socket:
        """One new stream to the guest; raises RelayError (recorded in last_error)."""
        try:
            s = dial(self.target, self.dial_timeout)
        except RelayError as exc:
            self.last_error = str(exc)
            raise
        self.last_error = None
        return s

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # listener closed
            if self._closed:
                conn.close()
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            guest = self.dial()
        except (RelayError, OSError):
            conn.close()  # gRPC sees the connection drop: UNAVAILABLE, retried with backoff
            return
        pair = _Pair(conn, guest, self._forget)
        with self._lock:
            if self._closed:
                pair.abort()
            self._pairs.add(pair)
            self.connections += 1
        pair.run()

    def _forget(self, pair: _Pair) -> None:
        with self._lock:
            self._pairs.discard(pair)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._pairs)

    def close(self) -> None:
        """Stop accepting, abort relayed connections, remove the private socket. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pairs = list(self._pairs)
        # Wake the accept loop (a blocked accept() is not interrupted by close()).
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            poke = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            poke.settimeout(0.5)
            with contextlib.suppress(OSError):
                poke.connect(self._path)
            poke.close()
        self._thread.join(timeout=2.0)
        self._listener.close()
        for pair in pairs:
            pair.abort()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
