"""The agent's data plane: file bytes on their own connection (wire format: cowork/dataplane.py).

Why: gRPC streaming moved 256 MiB at 280-330 MB/s here; every byte was copied
into a protobuf message, through HTTP/2 framing and flow control, and back out,
on the event loop's thread. Here the bytes are raw on a stream socket: the
agent sends a file with sendfile(2) while another thread hashes it, and
receives into a few reused buffers that a second thread writes and hashes.

What it keeps from Files.Write/Read:
- Authenticated: the hello carries the agent's token (compared in constant
  time); nothing is done before it checks.
- Confined: every path goes through FilesService's fd-based resolution (the
  same `_locate`, `_parent`, `_make_dirs`, READ_FLAGS opens, temp files and
  renameat2 as the gRPC handlers), so the sandbox racing the paths can make a
  transfer fail, never make the agent act outside the root.
- Atomic and checked: a file is written to a hidden temporary beside the
  target and renamed over it only when size and SHA-256 match what the client
  sent, after it is on disk (fsync; one syncfs per batch for trees).
- Bounded: at most MAX_CONNECTIONS transfers at once, each with at most
  BUFFERS x BUFFER bytes in flight.

Resumable uploads: with a `resume_key` the temporary file is named for it
(`.cowork-part-KEY` beside the target) and kept when the connection is cut.
`resume` reopens it: the agent reports its length and the SHA-256 of that
prefix, and the client sends only the rest if its own prefix hashes the same.
A partial that is not a plain, singly linked regular file is discarded.

One audit line per transfer, like every RPC ("method": "/cowork.dataplane/<op>").
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import hmac
import io
import json
import logging
import os
import re
import socket
import stat as statmod
import threading
import time
from typing import Any

import grpc

from cowork.dataplane import (
    MAGIC,
    MAX_MESSAGE,
    Cut,
    FileSender,
    WireError,
    on_shared_fs,
    read_message,
    receive_to_fd,
    recv_exact,
    send_message,
    send_read_hashed,
    tune,
)

from .errors import AgentError, from_oserror, invalid, precondition
from .fdio import write_all
from .files import (
    FilesService,
    _check_mode,
    _entry_info,
    _finish_temp,
    _lstat_or_none,
    _make_temp_link,
    _open_temp,
    _rename,
)
from .paths import READ_FLAGS
from .rpc import _audit, bound_record

log = logging.getLogger("cowork.agent.dataplane")
audit_log = logging.getLogger("cowork.audit")

MAX_CONNECTIONS = 16
BUFFER = 1 << 20
BUFFERS = 6
WRITEBACK_EVERY = 64 << 20
HELLO_TIMEOUT = 30.0
IO_TIMEOUT = 120.0  # a peer that sends nothing for this long is dropped
TREE_BATCH = 2048  # files written before one syncfs and their renames
TREE_PARENTS = 256  # directory fds a batch may hold
SMALL = 1 << 20
_PART_PREFIX = ".cowork-part-"
_KEY = re.compile(r"[0-9a-f]{16,64}")
_SYNC_FILE_RANGE_WRITE = 2

_libc: Any = None


def _lib() -> Any:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _syncfs(fd: int) -> None:
    """syncfs(2): flush the file system holding fd (fsync of every file, at once)."""
    if _lib().syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Begin writing a range to disk now, so the final fsync has little left to wait for."""
    with contextlib.suppress(Exception):
        _lib().sync_file_range(fd, ctypes.c_int64(offset), ctypes.c_int64(length), 2)


def _info_dict(info: Any) -> dict[str, Any]:
    return {
        "path": info.path,
        "name": info.name,
        "type": int(info.type),
        "size": info.size,
        "mode": info.mode,
        "mtime_ns": info.mtime_ns,
    }


class _Cut(Exception):
    """The client's connection ended mid-transfer."""


class DataPlane:
    """Serves data connections (each in its own thread) for one agent."""

    def __init__(self, files: FilesService, token: bytes) -> None:
        self.files = files
        self.token = token
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.active = 0
        self._lock = threading.Lock()

    # -- connections ----------------------------------------------------------------
    def serve(self, conn: socket.socket, peer: str, magic_read: bool = False) -> None:
        """Handle one connection to its end; closes it."""
        record: dict[str, Any] = {"method": "/cowork.dataplane/?", "peer": peer}
        t0 = time.perf_counter()
        tok = _audit.set(record)
        code, message = grpc.StatusCode.OK, ""
        got_slot = self._slots.acquire(blocking=False)
        with self._lock:
            self.active += 1
        try:
            conn.settimeout(HELLO_TIMEOUT)
            if not magic_read and recv_exact(conn, len(MAGIC)) != MAGIC:
                raise invalid("not a cowork data connection")
            hello = read_message(conn)
            given = str(hello.get("token", "")).encode()
            if not hmac.compare_digest(given, self.token):
                raise AgentError(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or invalid token on data connection"
                )
            op = hello.get("op")
            record["method"] = f"/cowork.dataplane/{op}"
            if not got_slot:
                raise AgentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"more than {MAX_CONNECTIONS} transfers at once; try again",
                )
            conn.settimeout(IO_TIMEOUT)
            tune(conn)
            if op == "upload":
                self._upload(conn, hello)
            elif op == "download":
                self._download(conn, hello)
            elif op == "tree":
                self._tree(conn, hello)
            else:
                raise invalid(f"unknown data plane op {op!r}")
        except AgentError as exc:
            code, message = exc.code, exc.message
            with contextlib.suppress(OSError):
                send_message(conn, {"ok": False, "code": exc.code.name, "message": exc.message})
        except (_Cut, WireError, OSError) as exc:
            code, message = grpc.StatusCode.CANCELLED, f"connection ended: {exc}"
        except Exception as exc:  # a bug: say so to the client and in the log
            log.exception("data plane %s failed", record["method"])
            code, message = grpc.StatusCode.INTERNAL, f"agent error: {exc!r}"
            with contextlib.suppress(OSError):
                send_message(conn, {"ok": False, "code": "INTERNAL", "message": message})
        finally:
            with self._lock:
                self.active -= 1
            if got_slot:
                self._slots.release()
            with contextlib.suppress(OSError):
                conn.close()
            record["code"] = code.name
            if message:
                record["message"] = message
            record["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
            audit_log.info("rpc", extra={"audit": bound_record(record)})
            with contextlib.suppress(ValueError):
                _audit.reset(tok)

    # -- upload of one file -----------------------------------------------------------
    def _upload(self, conn: socket.socket, hello: dict[str, Any]) -> None:
        path = _str(hello, "path")
        size = _int(hello, "size")
        mode_req = _int(hello, "mode")
        mtime_ns = _int(hello, "mtime_ns", signed=True)
        overwrite = bool(hello.get("overwrite", True))
        key = str(hello.get("resume_key") or "")
        if key and not _KEY.fullmatch(key):
            raise invalid("resume_key must be 16 to 64 lowercase hex digits")
        _check_mode(mode_req)
        files = self.files
        loc = files._locate(path)
        if loc.is_root:
            raise precondition(f"is a directory: {path}")
        name = loc.name
        pfd = fd = -1
        tmp = ""
        keep = False
        committed = False
        try:
            pfd = files._parent(loc, bool(hello.get("create_parents", True)))
            existing = _lstat_or_none(pfd, name)
            if existing is not None:
                if statmod.S_ISDIR(existing.st_mode):
                    raise precondition(f"is a directory: {path}")
                if not overwrite:
                    raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {path}")
            mode = mode_req or 0o644
            if not mode_req and existing is not None and statmod.S_ISREG(existing.st_mode):
                mode = statmod.S_IMODE(existing.st_mode)
            digest = hashlib.sha256()
            offset = 0
            if key:
                tmp = f"{_PART_PREFIX}{key}"
                fd, offset = self._open_partial(pfd, tmp, size, bool(hello.get("resume")))
                if offset:
                    _hash_prefix(fd, offset, digest)
            else:
                fd, tmp = _open_temp(pfd, name)
                files._own_fd(fd)
            send_message(conn, {"ok": True, "offset": offset, "prefix_sha256": digest.hexdigest()})
            start = _int(read_message(conn), "offset")
            if start not in (0, offset):
                raise invalid(f"resume offset {start} is neither 0 nor the agent's {offset}")
            if start != offset:
                os.ftruncate(fd, 0)
                digest = hashlib.sha256()
            os.lseek(fd, start, os.SEEK_SET)
            audit_kw = {"path": loc.path, "offset": start}
            _audit_fields(**audit_kw)
            keep = bool(key)  # from here on a cut keeps what arrived
            t_recv = time.perf_counter()
            received = _receive(conn, fd, size - start, digest, start)
            _audit_fields(recv_ms=round((time.perf_counter() - t_recv) * 1000))
            trailer = read_message(conn)
            keep = False
            hexdigest = digest.hexdigest()
            if str(trailer.get("sha256", "")).lower() != hexdigest:
                raise AgentError(
                    grpc.StatusCode.DATA_LOSS, "sha256 mismatch; target left untouched"
                )
            closing, fd = fd, -1
            t_sync = time.perf_counter()
            _finish_temp(closing, mode, mtime_ns)
            _rename(pfd, tmp, pfd, name, overwrite, path)
            _audit_fields(sync_ms=round((time.perf_counter() - t_sync) * 1000))
            committed = True
            info = _entry_info(pfd, name, loc.path)
            send_message(
                conn,
                {
                    "ok": True,
                    "info": _info_dict(info),
                    "sha256": hexdigest,
                    "received": received,
                    "offset": start,
                },
            )
        except OSError as exc:
            if isinstance(exc, (ConnectionError, TimeoutError)):
                raise
            raise from_oserror(exc, path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp and not committed and not keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp, dir_fd=pfd)
            if pfd >= 0:
                os.close(pfd)

    def _open_partial(self, pfd: int, name: str, size: int, resume: bool) -> tuple[int, int]:
        """The resumable temporary: reopened (fd, length) with `resume`, else made afresh."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        if resume:
            try:
                fd = os.open(name, flags, dir_fd=pfd)
            except FileNotFoundError:
                fd = -1
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                    raise
                fd = -1
            if fd >= 0:
                st = os.fstat(fd)
                plain = statmod.S_ISREG(st.st_mode) and st.st_nlink == 1
                if plain and st.st_size <= size:
                    os.set_blocking(fd, True)
                    return fd, st.st_size
                os.close(fd)
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=pfd)
        fd = os.open(
            name,
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=pfd,
        )
        self.files._own_fd(fd)
        return fd, 0

    # -- download of one file ---------------------------------------------------------
    def _download(self, conn: socket.socket, hello: dict[str, Any]) -> None:
        path = _str(hello, "path")
        loc = self.files._locate(path)
        try:
            fd = self.files.paths.open(loc, READ_FLAGS)
        except OSError as exc:
            raise from_oserror(exc, path) from None
        try:
            st = os.fstat(fd)
            if statmod.S_ISDIR(st.st_mode):
                raise precondition(f"is a directory: {path}")
            if not statmod.S_ISREG(st.st_mode):
                raise precondition(f"not a regular file: {path}")
            from .files import file_info

            info = file_info(loc.path, st)
            send_message(conn, {"ok": True, "info": _info_dict(info)})
            digest = _send_file(conn, fd, st.st_size)
            _add_bytes(st.st_size)
            send_message(conn, {"sha256": digest})
        finally:
            os.close(fd)

    # -- many entries on one connection -------------------------------------------------
    def _tree(self, conn: socket.socket, hello: dict[str, Any]) -> None:
        base = _str(hello, "path").rstrip("/") or "/"
        files = self.files
        files._locate(base)  # refuses a base outside the roots before anything is sent
        send_message(conn, {"ok": True})
        counts = {"files": 0, "bytes": 0, "symlinks": 0, "dirs": 0}
        skipped: list[list[str]] = []
        batch = _Batch()
        buf = bytearray(SMALL)
        # Entries are small and many: read them through one buffer, not 4 recv()s each.
        rf = io.BufferedReader(socket.SocketIO(conn, "rb"), SMALL)
        try:
            while True:
                msg = _read_buffered(rf)
                kind = msg.get("k")
                if kind == "end":
                    break
                rel = _str(msg, "p")
                if rel and any(p in ("", ".", "..") for p in rel.split("/")):
                    raise invalid(f"unsafe entry name in a tree: {rel!r}")
                path = f"{base}/{rel}" if rel else base
                try:
                    if kind == "d":
                        _check_mode(_int(msg, "m"))
                        fd = files._make_dirs(files.paths.locate(path), None)
                        os.close(fd)
                        counts["dirs"] += 1
                    elif kind == "l":
                        self._tree_link(path, _str(msg, "target"), _int(msg, "t", signed=True))
                        counts["symlinks"] += 1
                    elif kind == "f":
                        n = _int(msg, "n")
                        self._tree_file(rf, path, msg, n, batch, buf)
                        counts["files"] += 1
                        counts["bytes"] += n
                    else:
                        raise invalid(f"unknown tree entry kind {kind!r}")
                except _Skip as skip:
                    if not rel:  # the destination itself: the whole copy fails, as over gRPC
                        raise AgentError(skip.code, skip.reason) from None
                    skipped.append([path, skip.reason])
                except AgentError as exc:
                    if not rel or exc.code not in _ENTRY_ERRORS:
                        raise
                    skipped.append([path, exc.message])
                if batch.full():
                    skipped += batch.commit()
            skipped += batch.commit()
        finally:
            batch.abort()
        _audit_fields(path=base, files=counts["files"])
        send_message(conn, {"ok": True, **counts, "skipped": skipped[:1000]})

    def _tree_link(self, path: str, target: str, mtime_ns: int) -> None:
        files = self.files
        if not target or "\x00" in target:
            raise _Skip("bad symlink target")
        pfd = -1
        tmp = ""
        try:
            loc = files.paths.locate(path)
            pfd = files._parent(loc, True)
            existing = _lstat_or_none(pfd, loc.name)
            if existing is not None and statmod.S_ISDIR(existing.st_mode):
                raise _Skip(f"is a directory: {path}", grpc.StatusCode.FAILED_PRECONDITION)
            tmp = _make_temp_link(pfd, loc.name, target)
            if files.owner is not None:
                os.chown(tmp, files.owner.uid, files.owner.gid, dir_fd=pfd, follow_symlinks=False)
            if mtime_ns:
                os.utime(tmp, ns=(mtime_ns, mtime_ns), dir_fd=pfd, follow_symlinks=False)
            _rename(pfd, tmp, pfd, loc.name, True, path)
            tmp = ""
        except AgentError as exc:
            raise _Skip(exc.message, exc.code) from None
        except OSError as exc:
            err = from_oserror(exc, path)
            raise _Skip(err.message, err.code) from None
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)
            if pfd >= 0:
                os.close(pfd)

    def _tree_file(
        self,
        rf: io.BufferedReader[Any],
        path: str,
        msg: dict[str, Any],
        n: int,
        batch: _Batch,
        buf: bytearray,
    ) -> None:
        """One file of a tree: written to a temporary now, renamed when its batch is synced."""
        files = self.files
        fd = -1
        tmp = ""
        reason = ""
        code = grpc.StatusCode.ABORTED
        pfd = -1
        try:
            mode = _int(msg, "m") & 0o7777 or 0o644
            loc = files.paths.locate(path)
            pfd = batch.parent(files, loc)
            fd, tmp = _open_temp(pfd, loc.name)
            files._own_fd(fd)
        except AgentError as exc:
            reason, code = exc.message, exc.code
        except OSError as exc:
            err = from_oserror(exc, path)
            reason, code = err.message, err.code
        digest = hashlib.sha256()
        try:
            if fd < 0:  # refused: the bytes still have to be read off the stream
                _discard(rf, n, buf)
                if "s" not in msg:
                    _read_buffered(rf)
                raise _Skip(reason, code)
            if n <= len(buf):
                view = memoryview(buf)[:n]
                _recv_into(rf, view)
                digest.update(view)
                write_all(fd, view)
                _add_bytes(n)
            else:
                _receive_buffered(rf, fd, n, digest, buf)
            # Small files carry their checksum in the header ("s"), others after the bytes.
            want = msg["s"] if "s" in msg else _read_buffered(rf).get("sha256", "")
            if str(want).lower() != digest.hexdigest():
                raise _Skip("sha256 mismatch; not written")
            os.fchmod(fd, mode)
            t = _int(msg, "t", signed=True)
            if t:
                os.utime(fd, ns=(t, t))
            batch.add(pfd, tmp, loc.name, path, fd)
            fd = -1
            tmp = ""
        finally:
            if fd >= 0:
                os.close(fd)
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=pfd)


class _Skip(Exception):
    """One entry of a tree not written; the copy goes on (listed in `skipped`)."""

    def __init__(self, reason: str, code: grpc.StatusCode = grpc.StatusCode.ABORTED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


# What costs a tree one entry rather than the whole copy (host_client.transfer.entry_error).
_ENTRY_ERRORS = (
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
)


class _Batch:
    """Files of a tree written to temporaries, waiting for one syncfs and then their renames.

    Each file's fd is closed once it is written (one is kept for the syncfs), so a batch
    holds at most TREE_PARENTS directory fds plus one, whatever TREE_BATCH is.
    """

    def __init__(self) -> None:
        self.items: list[tuple[int, str, str, str]] = []
        self.sync_fd = -1
        self.parents: dict[str, int] = {}

    def parent(self, files: FilesService, loc: Any) -> int:
        key = os.path.dirname(loc.path)
        fd = self.parents.get(key)
        if fd is None:
            fd = files._parent(loc, True)
            self.parents[key] = fd
        return fd

    def add(self, pfd: int, tmp: str, name: str, path: str, fd: int) -> None:
        self.items.append((pfd, tmp, name, path))
        if self.sync_fd < 0:
            self.sync_fd = fd
        else:
            os.close(fd)

    def full(self) -> bool:
        return len(self.items) >= TREE_BATCH or len(self.parents) >= TREE_PARENTS

    def commit(self) -> list[list[str]]:
        """syncfs, then rename each into place; returns [path, reason] of those refused
        (a directory where the file goes: renameat says so, no lstat per file needed)."""
        skipped: list[list[str]] = []
        if self.items:
            _syncfs(self.sync_fd)
            os.close(self.sync_fd)
            self.sync_fd = -1
            for pfd, tmp, name, path in self.items:
                try:
                    _rename(pfd, tmp, pfd, name, True, path)
                except OSError as exc:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp, dir_fd=pfd)
                    if isinstance(exc, (IsADirectoryError, FileExistsError)) or exc.errno in (
                        errno.ENOTEMPTY,
                        errno.EEXIST,
                    ):
                        skipped.append([path, f"is a directory: {path}"])
                    else:
                        skipped.append([path, from_oserror(exc, path).message])
            self.items = []
        self._close_parents()
        return skipped

    def abort(self) -> None:
        if self.sync_fd >= 0:
            os.close(self.sync_fd)
            self.sync_fd = -1
        for pfd, tmp, _, _ in self.items:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=pfd)
        self.items = []
        self._close_parents()

    def _close_parents(self) -> None:
        for fd in self.parents.values():
            os.close(fd)
        self.parents = {}


# -- byte movers --------------------------------------------------------------------


def _recv_into(rf: io.BufferedReader[Any], view: memoryview) -> None:
    got = 0
    n = len(view)
    while got < n:
        k = rf.readinto(view[got:])
        if not k:
            raise _Cut(f"after {got} of {n} bytes")
        got += k


def _discard(rf: io.BufferedReader[Any], n: int, buf: bytearray) -> None:
    view = memoryview(buf)
    while n:
        k = rf.readinto(view[: min(n, len(buf))])
        if not k:
            raise _Cut("mid-entry")
        n -= k


def _read_buffered(rf: io.BufferedReader[Any]) -> dict[str, Any]:
    head = rf.read(4)
    if len(head) < 4:
        raise _Cut("between tree entries")
    n = int.from_bytes(head, "big")
    if n > MAX_MESSAGE:
        raise invalid(f"message of {n} bytes is larger than {MAX_MESSAGE}")
    body = rf.read(n)
    if len(body) < n:
        raise _Cut("mid-message")
    try:
        obj = json.loads(body)
    except ValueError:
        raise invalid("message is not JSON") from None
    if not isinstance(obj, dict):
        raise invalid("message is not a JSON object")
    return obj


def _receive_buffered(
    rf: io.BufferedReader[Any], fd: int, n: int, digest: Any, buf: bytearray
) -> None:
    """A large file inside a tree: chunks through the buffer, written and hashed here."""
    view = memoryview(buf)
    while n:
        k = rf.readinto(view[: min(n, len(buf))])
        if not k:
            raise _Cut("mid-file")
        write_all(fd, view[:k])
        digest.update(view[:k])
        _add_bytes(k)
        n -= k


def _receive(conn: socket.socket, fd: int, n: int, digest: Any, base: int) -> int:
    """Receive n bytes into fd (cowork.dataplane.receive_to_fd: recv, write and hash each on
    a thread); writeback starts every 64 MiB so the final fsync has little left to do.
    The audit line counts what reached the file, also when the connection was cut."""
    done = [base]

    def wrote(k: int) -> None:
        if (done[0] // WRITEBACK_EVERY) != ((done[0] + k) // WRITEBACK_EVERY):
            _start_writeback(fd, 0, 0)
        done[0] += k

    try:
        got = receive_to_fd(conn, fd, n, digest, after_write=wrote, buffer=BUFFER, buffers=BUFFERS)
    except Cut as exc:
        _add_bytes(exc.written)
        raise _Cut(str(exc)) from None
    _add_bytes(got)
    return got


def _hash_prefix(fd: int, length: int, digest: Any) -> None:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    off = 0
    while off < length:
        k = os.preadv(fd, [view[: min(len(buf), length - off)]], off)
        if k == 0:
            raise OSError(errno.EIO, "partial file shrank while it was read")
        digest.update(view[:k])
        off += k


def _send_file(conn: socket.socket, fd: int, size: int) -> str:
    """sendfile() `size` bytes of fd to conn while another thread hashes them; the hex digest.

    Hashes what it reads with pread; when the file changes during the send the
    client's check fails (DATA_LOSS) rather than keeping a mix.
    """
    digest = hashlib.sha256()
    if on_shared_fs(fd):  # one reader there: hash what goes out (cowork.dataplane)
        timeout = conn.gettimeout()
        conn.setblocking(True)
        try:
            send_read_hashed(conn, fd, 0, size, digest)
        finally:
            conn.settimeout(timeout)
        return digest.hexdigest()
    error: list[BaseException] = []

    def hasher() -> None:
        try:
            _hash_prefix(fd, size, digest)
        except BaseException as exc:
            error.append(exc)

    th = threading.Thread(target=hasher, name="cowork-dataplane-hash", daemon=True)
    th.start()
    try:
        sent = 0
        out = conn.fileno()
        timeout = conn.gettimeout()
        conn.setblocking(True)
        try:
            with FileSender() as sender:
                while sent < size:
                    k = sender.send(out, fd, sent, size - sent)
                    if k == 0:
                        raise _Cut(f"file shrank to {sent} bytes while it was sent")
                    sent += k
        finally:
            conn.settimeout(timeout)
    finally:
        th.join()
    if error:
        raise error[0]
    return digest.hexdigest()


# -- small helpers -------------------------------------------------------------------


def _str(msg: dict[str, Any], key: str) -> str:
    v = msg.get(key, "")
    if not isinstance(v, str):
        raise invalid(f"{key!r} must be a string")
    return v


def _int(msg: dict[str, Any], key: str, signed: bool = False) -> int:
    v = msg.get(key, 0)
    if not isinstance(v, int) or isinstance(v, bool):
        raise invalid(f"{key!r} must be an integer")
    if v < (-(2**63) if signed else 0) or v > 2**63 - 1:
        raise invalid(f"{key!r} is out of range")
    return v


def _audit_fields(**fields: Any) -> None:
    record = _audit.get()
    if record is not None:
        record.update(fields)


def _add_bytes(n: int) -> None:
    record = _audit.get()
    if record is not None:
        record["bytes"] = record.get("bytes", 0) + n


# -- listeners -----------------------------------------------------------------------


class UnixDataListener:
    """The data plane's own unix socket beside a gRPC one; a thread accepts, a thread per peer."""

    def __init__(self, plane: DataPlane, path: str) -> None:
        self.plane = plane
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        self.sock.listen(64)
        self._closed = False
        self._thread = threading.Thread(
            target=self._accept, name=f"cowork-dataplane {path}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._closed or exc.errno == errno.EBADF:
                    return
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    time.sleep(0.05)
                continue
            threading.Thread(
                target=self.plane.serve,
                args=(conn, f"unix:{self.path}"),
                name="cowork-dataplane-conn",
                daemon=True,
            ).start()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):  # wake a blocked accept()
            poke = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            poke.settimeout(0.5)
            with contextlib.suppress(OSError):
                poke.connect(self.path)
            poke.close()
        self.sock.close()
        self._thread.join(timeout=2.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
