"""AF_VSOCK listeners, relayed byte for byte into the agent's own gRPC server.

PyPI grpcio cannot bind AF_VSOCK ("VSOCK is not supported"), so for every
`--listen vsock:[CID:]PORT` the agent:

1. binds a *private* gRPC listener: a unix socket in a fresh 0700 directory
   (under $RUNTIME_DIRECTORY, /run or the temp dir), never an abstract socket,
   so no other guest user can reach it by name;
2. accepts AF_VSOCK connections itself (on the agent's event loop), refuses
   peers whose CID is not allowed (default: only the host, CID 2, as Lima's
   own guest agent does), and
3. relays each accepted connection to the private socket with two blocking
   pump threads, one per direction, moving bytes with `os.splice` through a
   pipe (zero-copy where the kernel can; a plain recv/send loop otherwise).

Semantics the pumps keep: a half-close (EOF in one direction) becomes
`shutdown(SHUT_WR)` on the other side while the other direction keeps
flowing; an error (reset, broken pipe) in either direction aborts both sides;
back-pressure is natural because a pump only reads when it could write the
previous chunk. The relay is transparent to gRPC: HTTP/2 runs end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import Any

import grpc.aio

from .listeners import Listen, ListenError

log = logging.getLogger("cowork.agent.vsock")

VMADDR_CID_HOST = 2
# The host only, like Lima's guest agent. None = any peer.
DEFAULT_ALLOWED_CIDS: frozenset[int] | None = frozenset({VMADDR_CID_HOST})

CHUNK = 1 << 20  # bytes per splice / recv
PIPE_SIZE = 1 << 20  # pipe buffer between the two splices (best effort)
# Each vsock connection's receive buffer: the credit the peer may send before
# waiting for us. The kernel default (256 KiB) limits throughput under TCG.
VSOCK_BUFFER = 2 << 20
UPSTREAM_CONNECT_TIMEOUT = 5.0
# How long a new connection may take to send its first byte (gRPC sends its
# preface at once; so does the data plane its magic).
SNIFF_TIMEOUT = 30.0
DATA_PLANE_FIRST_BYTE = b"C"
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def private_socket_dir() -> str:
    """A fresh 0700 directory for the private gRPC socket (not cleaned by tmpfiles ageing)."""
    candidates = [
        (os.environ.get("RUNTIME_DIRECTORY") or "").split(":")[0],
        os.environ.get("XDG_RUNTIME_DIR") or "",
        "/run" if os.geteuid() == 0 else "",
        tempfile.gettempdir(),
    ]
    for base in candidates:
        if base and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            # mkdtemp creates the directory 0700.
            path = tempfile.mkdtemp(prefix="cowork-vsock-", dir=base)
            if len(path) + len("/grpc.sock") < 100:
                return path
            os.rmdir(path)
    raise ListenError("no writable directory with a short enough path for the private socket")


# -- the byte pumps -----------------------------------------------------------


class Splice:
    """Bidirectional relay of one connection pair; owns both sockets and closes them."""

    def __init__(
        self,
        a: socket.socket,
        b: socket.socket,
        name: str = "",
        on_done: Callable[[Splice], None] | None = None,
    ) -> None:
        self.a = a
        self.b = b
        self.name = name
        self.on_done = on_done
        self.bytes_ab = 0
        self.bytes_ba = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._running = 2
        self._closed = False

    def start(self, daemon: bool = True) -> None:
        """Start both directions, each in its own thread."""
        threading.Thread(
            target=self._pump, args=(self.a, self.b, True), name=f"relay>{self.name}", daemon=daemon
        ).start()
        threading.Thread(
            target=self._pump,
            args=(self.b, self.a, False),
            name=f"relay<{self.name}",
            daemon=daemon,
        ).start()

    def run_b_to_a_here(self) -> None:
        """Start a→b in a thread and run b→a in the calling thread (saves a thread)."""
        threading.Thread(
            target=self._pump, args=(self.a, self.b, True), name=f"relay>{self.name}", daemon=True
        ).start()
        self._pump(self.b, self.a, False)

    def abort(self) -> None:
        """Tear both directions down now: blocked pumps wake up (their sockets are shut down)."""
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def _pump(self, src: socket.socket, dst: socket.socket, forward: bool) -> None:
        try:
            pump(src, dst, self._count(forward))
        except OSError as exc:
            # A reset or broken pipe on either side: the whole connection is gone.
            if exc.errno not in (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.EBADF):
                log.debug("vsock relay %s: %s", self.name, exc)
            with self._lock:
                if self.error is None:
                    self.error = os.strerror(exc.errno) if exc.errno else str(exc)
            self.abort()
        else:
            # EOF from src: pass the half-close on, keep the other direction open.
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        finally:
            with self._lock:
                self._running -= 1
                last = self._running == 0
            if last:
                self._close()

    def _count(self, forward: bool) -> Callable[[int], None]:
        def add(n: int) -> None:
            if forward:
                self.bytes_ab += n
            else:
                self.bytes_ba += n

        return add

    def _close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.close()
        if self.on_done is not None:
            self.on_done(self)


_splice_ok = hasattr(os, "splice")


def pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> int:
    """Copy src to dst until EOF on src; returns bytes moved. Raises OSError on failure."""
    global _splice_ok
    if _splice_ok:
        try:
            return _pump_splice(src, dst, count)
        except _SpliceUnsupported:
            _splice_ok = False
    return _pump_copy(src, dst, count)


class _SpliceUnsupported(Exception):
    pass


def _pump_splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> int:
    r, w = os.pipe()
    try:
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
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
            count(n)
    finally:
        os.close(r)
        os.close(w)


def _pump_copy(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> int:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    total = 0
    while True:
        n = src.recv_into(buf)
        if n == 0:
            return total
        dst.sendall(view[:n])
        total += n
        count(n)


# -- the agent side -----------------------------------------------------------


def connect_upstream(path: str, timeout: float = UPSTREAM_CONNECT_TIMEOUT) -> socket.socket:
    """Connect to the private gRPC socket, waiting briefly while the server is starting."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError as exc:
            s.close()
            retry = exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
            if not retry or time.monotonic() >= deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class RelayListener:
    """Accepts connections on `sock` (AF_VSOCK in production) and relays each to `upstream`.

    The accept loop runs on the asyncio loop (a reader callback on the
    non-blocking listener); each connection's bytes move in threads.
    `peer_ok(addr)` decides whether an accepted peer may stay.
    """

    def __init__(
        self,
        sock: socket.socket,
        upstream: str,
        name: str,
        peer_ok: Callable[[Any], bool] = lambda addr: True,
        tune: Callable[[socket.socket], None] | None = None,
        divert: Callable[[socket.socket, Any], None] | None = None,
    ) -> None:
        self.sock = sock
        # Connections whose first byte is the data plane's ("C" of COWORK-DATA; gRPC's
        # HTTP/2 preface starts "P") go to `divert` instead of the gRPC server.
        self.divert = divert
        self.upstream = upstream
        self.name = name
        self.peer_ok = peer_ok
        self.tune = tune
        self.active: set[Splice] = set()
        self.accepted = 0
        self.refused = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.sock.setblocking(False)
        self._loop = loop
        loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        # Drain the accept queue; each connection is handed to a thread at once.
        for _ in range(64):
            try:
                conn, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("vsock %s: accept failed: %s", self.name, exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                raise
            if not self.peer_ok(addr):
                self.refused += 1
                log.warning(
                    "vsock %s: refused connection from %s (CID not allowed)", self.name, addr
                )
                conn.close()
                continue
            self.accepted += 1
            conn.setblocking(True)
            if self.tune is not None:
                self.tune(conn)
            threading.Thread(
                target=self._serve, args=(conn, addr), name=f"vsock-{addr}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        if self.divert is not None:
            try:
                conn.settimeout(SNIFF_TIMEOUT)
                first = conn.recv(1, socket.MSG_PEEK)
                conn.settimeout(None)
            except OSError:
                conn.close()
                return
            if first == DATA_PLANE_FIRST_BYTE:
                self.divert(conn, addr)
                return
        try:
            up = connect_upstream(self.upstream)
        except OSError as exc:
            log.error(
                "vsock %s: cannot reach the gRPC server at %s: %s", self.name, self.upstream, exc
            )
            conn.close()
            return
        sp = Splice(conn, up, name=f"{addr}", on_done=self._done)
        with self._lock:
            if self._closed:
                sp.abort()
            self.active.add(sp)
        log.debug("vsock %s: connection from %s", self.name, addr)
        sp.run_b_to_a_here()

    def _done(self, sp: Splice) -> None:
        with self._lock:
            self.active.discard(sp)
        log.debug(
            "vsock %s: %s closed (in %d, out %d bytes%s)",
            self.name,
            sp.name,
            sp.bytes_ab,
            sp.bytes_ba,
            f", {sp.error}" if sp.error else "",
        )

    def close(self) -> None:
        """Stop accepting and abort every relayed connection."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            active = list(self.active)
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self.sock.fileno())
        self.sock.close()
        for sp in active:
            sp.abort()


class VsockRelays:
    """What start_relays returns per agent: the listeners plus the private socket directory."""

    def __init__(self, listeners: list[RelayListener], private_dir: str) -> None:
        self.listeners = listeners
        self.private_dir = private_dir

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()
        shutil.rmtree(self.private_dir, ignore_errors=True)


def tune_vsock(s: socket.socket) -> None:
    """Larger vsock buffers: more bytes in flight per credit update (matters under TCG)."""
    level = socket.AF_VSOCK
    for opt in ("SO_VM_SOCKETS_BUFFER_MAX_SIZE", "SO_VM_SOCKETS_BUFFER_SIZE"):
        num = getattr(socket, opt, None)
        if num is not None:
            with contextlib.suppress(OSError):
                s.setsockopt(level, num, VSOCK_BUFFER)


def bind_vsock(listen: Listen) -> socket.socket:
    if not hasattr(socket, "AF_VSOCK"):
        raise ListenError(f"cannot listen on {listen}: this Python has no AF_VSOCK")
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {listen}: AF_VSOCK unavailable ({exc.strerror}); "
            "is the vsock transport loaded (vmw_vsock_virtio_transport)?"
        ) from None
    cid = socket.VMADDR_CID_ANY if listen.cid < 0 else listen.cid
    try:
        tune_vsock(s)
        s.bind((cid, listen.port))
        s.listen(128)
    except OSError as exc:
        s.close()
        raise ListenError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return s


def peer_filter(allowed_cids: Collection[int] | None) -> Callable[[Any], bool]:
    if allowed_cids is None:
        return lambda addr: True
    allowed = frozenset(allowed_cids)
    return lambda addr: isinstance(addr, tuple) and bool(addr) and addr[0] in allowed


def bind_private(server: grpc.aio.Server) -> tuple[str, str]:
    """Bind the agent's private unix listener for the relays; returns (directory, socket path)."""
    d = private_socket_dir()
    path = os.path.join(d, "grpc.sock")
    old = os.umask(0o177)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError as exc:
        shutil.rmtree(d, ignore_errors=True)
        raise ListenError(f"cannot bind the private relay socket {path}: {exc}") from None
    finally:
        os.umask(old)
    return d, path


async def start_relays(
    server: grpc.aio.Server,
    listens: Sequence[Listen],
    allowed_cids: Collection[int] | None = DEFAULT_ALLOWED_CIDS,
    divert: Callable[[socket.socket, Any], None] | None = None,
) -> list[VsockRelays]:
    """Bind every vsock listen address and relay it into `server` (call before server.start())."""
    socks: list[tuple[Listen, socket.socket]] = []
    try:
        for listen in listens:
            socks.append((listen, bind_vsock(listen)))
    except ListenError:
        for _, s in socks:
            s.close()
        raise
    d, path = bind_private(server)
    loop = asyncio.get_running_loop()
    ok = peer_filter(allowed_cids)
    relays = []
    for listen, s in socks:
        lst = RelayListener(s, path, str(listen), ok, tune_vsock, divert)
        lst.start(loop)
        relays.append(lst)
    who = "any CID" if allowed_cids is None else "CID " + ",".join(map(str, sorted(allowed_cids)))
    log.info("vsock: relaying %s to %s (peers: %s)", ", ".join(map(str, listens)), path, who)
    return [VsockRelays(relays, d)]
