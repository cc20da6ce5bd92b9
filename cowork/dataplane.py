"""The data plane's wire format, shared by the guest agent and the host client.

gRPC stays the control plane; file bytes travel on a connection of their own to
the same target, as raw bytes between small framed JSON messages, so either
side can move them with sendfile/splice and hash them on another core.

How the connection reaches the agent:
- unix targets (unix:, local, lima:): a second socket beside the gRPC one,
  `data_socket_path(grpc_socket)` (`agent.sock` -> `agent.data.sock`); Lima
  forwards it with a second portForward rule (lima/cowork.yaml).
- vsock:/hvsock:: the same vsock port as gRPC. The agent already relays every
  vsock connection itself (grpcio has no vsock) and looks at its first bytes:
  MAGIC here, the HTTP/2 preface ("PRI * HTTP/2.0") for gRPC.
- tcp: none (the client falls back to gRPC streaming).

A conversation (every message is a 4-byte big-endian length plus UTF-8 JSON):

    client: MAGIC, {"token": T, "op": ..., ...}
    agent:  {"ok": true, ...}  or  {"ok": false, "code": "NOT_FOUND", "message": ...}

op "upload" (one file; atomic, checked, resumable):
    hello: path, size, mode, mtime_ns, overwrite, create_parents, resume_key, resume
    agent: {"ok", "offset", "prefix_sha256"}   (offset > 0 only for a resumable partial)
    client: {"offset": N}  (N = the agent's offset if the prefix hashes agree, else 0)
    client: size - N raw bytes, then {"sha256": hex of the whole file}
    agent: {"ok", "info", "sha256", "received", "offset"}
op "download" (one file):
    hello: path
    agent: {"ok", "info"}, info["size"] raw bytes, then {"sha256"}
op "tree" (an upload of many entries on one connection):
    hello: path (the destination root)
    agent: {"ok"}
    client, repeated: {"k": "d", "p": rel, "m": mode}
                      {"k": "l", "p": rel, "target": ..., "t": mtime_ns}
                      {"k": "f", "p": rel, "m": mode, "t": mtime_ns, "n": size},
                          n raw bytes, {"sha256": hex}
                      (or, for a small file, "s": hex in the header and no trailer)
    client: {"k": "end"}
    agent: {"ok", "files", "bytes", "symlinks", "dirs", "skipped": [[path, reason], ...]}

Import-free beyond the standard library, for the CLI's fast path.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import socket
import struct
import sys
import threading
from collections.abc import Callable
from typing import Any

MAGIC = b"COWORK-DATA/1\n"
# HTTP/2's client preface starts "PRI * HTTP/2.0"; MAGIC shares no prefix with it.
MAX_MESSAGE = 1 << 20
CAPABILITY = "files.dataplane"


class WireError(ConnectionError):
    """The peer broke the protocol or the connection ended early."""


SOCKET_BUFFER = 4 << 20


def tune(sock: socket.socket) -> None:
    """Bigger socket buffers (best effort, capped by the kernel): more bytes in flight, so a
    busy machine's scheduling makes sender and receiver wait on each other less."""
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass


def data_socket_path(grpc_socket: str) -> str:
    """The data plane's unix socket beside a gRPC socket: x.sock -> x.data.sock, else x.data."""
    if grpc_socket.endswith(".sock"):
        return grpc_socket[: -len(".sock")] + ".data.sock"
    return grpc_socket + ".data"


_ENCODER = json.JSONEncoder(separators=(",", ":"))


def encode(obj: dict[str, Any]) -> bytes:
    body = _ENCODER.encode(obj).encode()
    return len(body).to_bytes(4, "big") + body


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes, or WireError when the connection ends first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise WireError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def read_message(sock: socket.socket) -> dict[str, Any]:
    n = int.from_bytes(recv_exact(sock, 4), "big")
    if n > MAX_MESSAGE:
        raise WireError(f"message of {n} bytes is larger than {MAX_MESSAGE}")
    try:
        obj = json.loads(recv_exact(sock, n))
    except ValueError:
        raise WireError("message is not JSON") from None
    if not isinstance(obj, dict):
        raise WireError("message is not a JSON object")
    return obj


def send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    sock.sendall(encode(obj))


class Cut(ConnectionError):
    """The sending side ended before all bytes arrived; `written` of them reached the file."""

    def __init__(self, reason: str, written: int) -> None:
        super().__init__(reason)
        self.written = written


def receive_to_fd(
    sock: socket.socket,
    fd: int,
    n: int,
    digest: Any,
    progress: Callable[[int], None] | None = None,
    after_write: Callable[[int], None] | None = None,
    buffer: int = 1 << 20,
    buffers: int = 6,
) -> int:
    """Receive exactly n bytes from sock into fd (at its offset) and `digest`; returns n.

    Three stages, each on its own thread, overlap (recv_into, os.write and
    sha256 all release the GIL): this thread receives into one of `buffers`
    reused buffers, a second writes it, a third hashes it and frees it. Memory
    stays at buffers x buffer. When the connection ends early, what was
    received is still written and hashed before Cut (with that count) is
    raised, so a resumable partial holds all of it.
    """
    if n == 0:
        return 0
    size = min(buffer, n)
    free: queue.Queue[bytearray] = queue.Queue()
    for _ in range(buffers if n > size else 1):
        free.put(bytearray(size))
    to_write: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    to_hash: queue.Queue[tuple[bytearray, int] | None] = queue.Queue()
    errors: list[BaseException] = []
    written = [0]

    def writer() -> None:
        while True:
            item = to_write.get()
            if item is None:
                to_hash.put(None)
                return
            buf, k = item
            if not errors:
                try:
                    view = memoryview(buf)[:k]
                    while view:
                        view = view[os.write(fd, view) :]
                    if after_write is not None:
                        after_write(k)
                except BaseException as exc:
                    errors.append(exc)
            to_hash.put(item)

    def hasher() -> None:
        while True:
            item = to_hash.get()
            if item is None:
                return
            buf, k = item
            if not errors:
                digest.update(memoryview(buf)[:k])
                written[0] += k
            free.put(buf)

    threads = [
        threading.Thread(target=writer, name="cowork-data-write", daemon=True),
        threading.Thread(target=hasher, name="cowork-data-hash", daemon=True),
    ]
    for th in threads:
        th.start()
    got = 0
    cut = ""
    try:
        while got < n and not errors and not cut:
            buf = free.get()
            view = memoryview(buf)
            want = min(len(buf), n - got)
            filled = 0
            while filled < want:
                try:
                    k = sock.recv_into(view[filled:want])
                except OSError as exc:
                    cut = str(exc)
                    break
                if k == 0:
                    cut = f"connection closed after {got + filled} of {n} bytes"
                    break
                filled += k
            got += filled
            to_write.put((buf, filled))
            if progress is not None and filled:
                progress(filled)
    finally:
        to_write.put(None)
        for th in threads:
            th.join()
    if errors:
        raise errors[0]
    if cut:
        raise Cut(cut, written[0])
    return got


PIPE_SIZE = 1 << 20
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ on Linux


# File systems where a file is read once, hashing the very bytes that are sent: on
# FUSE (bindfs, virtiofs), 9p, NFS, SMB or Ceph, two readers of one file (splice or
# sendfile, and a hashing thread) need not see the same bytes. Seen in the Lima tier: a
# download of a file the box had just written through bindfs over 9p failed its
# checksum, while the agent had hashed what its second reader saw.
SHARED_FS_MAGIC = frozenset(
    {
        0x65735546,  # FUSE (bindfs: Lima's /workspace; virtiofs)
        0x01021997,  # 9p (Lima's QEMU mounts)
        0x6969,  # NFS
        0xFF534D42,  # CIFS
        0xFE534D42,  # SMB2
        0x00C36400,  # Ceph
    }
)


def on_shared_fs(fd: int) -> bool:
    """True when fd's file lives on a file system in SHARED_FS_MAGIC (Linux; else False)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type (a long) comes first
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.fstatfs(fd, buf) != 0:
            return False
    except (OSError, AttributeError):
        return False
    (f_type,) = struct.unpack_from("l", buf.raw)
    return (f_type & 0xFFFFFFFF) in SHARED_FS_MAGIC


def send_read_hashed(
    sock: socket.socket,
    fd: int,
    start: int,
    end: int,
    digest: Any,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Send [start, end) of fd by pread + sendall, hashing exactly what is sent (one
    reader: for SHARED_FS_MAGIC file systems); returns the bytes sent."""
    buf = bytearray(min(1 << 20, max(end - start, 1)))
    view = memoryview(buf)
    pos = start
    while pos < end:
        k = os.preadv(fd, [view[: min(len(buf), end - pos)]], pos)
        if k == 0:
            raise OSError(errno.EIO, f"{end - pos} bytes short: the file shrank while it was sent")
        digest.update(view[:k])
        sock.sendall(view[:k])
        pos += k
        if progress is not None:
            progress(k)
    return pos - start


class FileSender:
    """Moves file bytes to a socket without copying them through Python.

    Linux: splice(2) file -> a 1 MiB pipe -> socket (measured here: 4.4-5.3 GB/s into a
    unix socket, sendfile(2) 0.4-4 GB/s, pread + send 2.2-2.7 GB/s); elsewhere, or where
    the file system cannot splice, sendfile(2). Use as a context manager (owns the pipe).
    """

    def __init__(self) -> None:
        self._pipe: tuple[int, int] | None = None
        self._splice = hasattr(os, "splice")

    def send(self, sock_fd: int, fd: int, offset: int, count: int) -> int:
        """Up to `count` bytes of fd from `offset` into the socket; 0 at the file's end."""
        if self._splice:
            try:
                return self._send_splice(sock_fd, fd, offset, count)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                self._splice = False  # this file (system) cannot splice: sendfile from here
        return os.sendfile(sock_fd, fd, offset, count)

    def _send_splice(self, sock_fd: int, fd: int, offset: int, count: int) -> int:
        if self._pipe is None:
            r, w = os.pipe()
            try:
                import fcntl

                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
            except OSError:
                pass
            self._pipe = (r, w)
        r, w = self._pipe
        n: int = os.splice(fd, w, min(count, PIPE_SIZE), offset_src=offset)
        left = n
        while left:
            left -= os.splice(r, sock_fd, left)
        return n

    def __enter__(self) -> FileSender:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe is not None:
            for p in self._pipe:
                os.close(p)
            self._pipe = None
