"""The client side of the data plane: file bytes on their own connection (cowork/dataplane.py).

gRPC stays the control plane. A transfer dials a second connection to the
same target (unix targets: the `.data.sock` beside the agent's socket, which
Lima forwards too; vsock/hvsock: the same guest port, dialled directly
without the gRPC relay), presents the token, and moves raw bytes:
sendfile(2) from the file while a second thread computes the SHA-256 the
agent checks before it renames anything into place; downloads receive into
reused buffers that a second thread writes and hashes.

`DataPlane.for_target()` returns None where there is no data path (tcp
targets, an agent without the `files.dataplane` capability, a data socket that
is not there): the callers then use gRPC streaming as before.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from cowork.dataplane import (
    CAPABILITY,
    MAGIC,
    Cut,
    FileSender,
    WireError,
    data_socket_path,
    encode,
    on_shared_fs,
    read_message,
    receive_to_fd,
    send_message,
    send_read_hashed,
    tune,
)

from .errors import _BY_CODE, CoworkError
from .models import FileInfo, Skipped, TransferResult
from .targets import Target

Progress = Callable[[int], None]
BUFFER = 1 << 20
BUFFERS = 6
SMALL = 1 << 20  # tree files up to this size travel inside the write batches
BATCH = 1 << 20
_TYPES = {1: "file", 2: "directory", 3: "symlink", 4: "other"}


class NoDataPlane(CoworkError):
    """Nothing that speaks the data plane answered the hello: use gRPC streaming instead."""

    code = "UNAVAILABLE"


class TransferCut(CoworkError):
    """The data connection ended mid-transfer; an upload can continue with resume=True."""

    code = "UNAVAILABLE"


def resume_key(local: str, remote: str, size: int, mtime_ns: int) -> str:
    """Names the agent's resumable partial: the same source, size, mtime and destination."""
    text = f"{os.path.abspath(local)}\0{remote}\0{size}\0{mtime_ns}"
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _info(d: dict[str, Any]) -> FileInfo:
    return FileInfo(
        path=d.get("path", ""),
        name=d.get("name", ""),
        type=_TYPES.get(int(d.get("type", 0)), "other"),
        size=int(d.get("size", 0)),
        mode=int(d.get("mode", 0)),
        mtime_ns=int(d.get("mtime_ns", 0)),
    )


def error(code: str, message: str) -> CoworkError:
    """The CoworkError subclass for a status name, as gRPC errors map (errors.from_rpc_error)."""
    return _BY_CODE.get(code, CoworkError)(message, code)


def _check(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise error(str(reply.get("code", "UNKNOWN")), str(reply.get("message", "refused")))
    return reply


class DataPlane:
    """Opens data connections to one target; stateless between transfers, thread-safe."""

    def __init__(self, target: Target, token: bytes, timeout: float = 10.0) -> None:
        self.target = target
        self.token = token.decode()
        self.timeout = timeout
        self.bytes_sent = 0  # raw file bytes put on data connections (for tests / stats)

    @staticmethod
    def reachable(target: Target) -> bool:
        if target.kind in ("unix", "local", "lima"):
            return os.path.exists(data_socket_path(target.path))
        return target.kind in ("vsock", "hvsock")

    @classmethod
    def for_target(cls, target: Target, token: bytes, capabilities: list[str]) -> DataPlane | None:
        if CAPABILITY not in capabilities or not cls.reachable(target):
            return None
        return cls(target, token)

    def connect(self, hello: dict[str, Any]) -> socket.socket:
        t = self.target
        try:
            if t.kind in ("vsock", "hvsock"):
                from .relay import dial

                s = dial(t, self.timeout)
            else:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    s.settimeout(self.timeout)
                    s.connect(data_socket_path(t.path))
                    s.settimeout(None)
                except BaseException:
                    s.close()
                    raise
        except OSError as exc:
            raise error("UNAVAILABLE", f"{t.spec}: cannot open a data connection: {exc}") from None
        tune(s)
        try:
            s.sendall(MAGIC + encode({"token": self.token, **hello}))
        except OSError as exc:
            s.close()
            raise error("UNAVAILABLE", f"{t.spec}: data connection failed: {exc}") from None
        return s

    def _refusal(self, s: socket.socket, exc: OSError, what: str) -> CoworkError:
        """Why the agent closed on us mid-send (its error reply), else a TransferCut."""
        try:
            s.settimeout(2.0)
            reply = read_message(s)
        except (OSError, WireError):
            reply = {}
        if reply and not reply.get("ok"):
            return error(str(reply.get("code", "UNKNOWN")), str(reply.get("message", "")))
        return TransferCut(f"{what} cut: {exc}")

    def _first_reply(self, s: socket.socket) -> dict[str, Any]:
        """The agent's answer to the hello; NoDataPlane when what answered is not one
        (e.g. a vsock peer that relays everything to gRPC: the caller falls back)."""
        try:
            reply = read_message(s)
        except (WireError, OSError) as exc:
            raise NoDataPlane(f"{self.target.spec}: no data plane answered: {exc}") from None
        return _check(reply)

    def _reply(self, s: socket.socket) -> dict[str, Any]:
        try:
            return _check(read_message(s))
        except (WireError, OSError) as exc:
            raise TransferCut(f"{self.target.spec}: data connection ended: {exc}") from None

    # -- one file up ----------------------------------------------------------------
    def upload_file(
        self,
        local: str,
        remote: str,
        *,
        progress: Progress | None = None,
        resume: bool = False,
        mode: int = 0,
        cut_after: int | None = None,
    ) -> TransferResult:
        """Send one local file; atomic on the agent; with `resume`, continue a cut upload.

        `cut_after` (tests) drops the connection after that many bytes of this send.
        """
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            key = resume_key(local, remote, size, st.st_mtime_ns)
            hello = {
                "op": "upload",
                "path": remote,
                "size": size,
                "mode": mode or (st.st_mode & 0o7777),
                "mtime_ns": st.st_mtime_ns,
                "overwrite": True,
                "create_parents": True,
                "resume_key": key,
                "resume": resume,
            }
            s = self.connect(hello)
            try:
                first = self._first_reply(s)
                offset = int(first.get("offset", 0))
                digest = hashlib.sha256()
                if offset:
                    _hash_range(f.fileno(), 0, offset, digest)
                    if digest.hexdigest() != first.get("prefix_sha256"):
                        offset, digest = 0, hashlib.sha256()
                send_message(s, {"offset": offset})
                sent = self._send_range(s, f.fileno(), offset, size, digest, progress, cut_after)
                send_message(s, {"sha256": digest.hexdigest()})
                done = self._reply(s)
            except OSError as exc:
                err = self._refusal(s, exc, f"upload of {local}")
                if isinstance(err, TransferCut):
                    err = TransferCut(
                        f"upload of {local} cut ({exc}); run again with --resume to continue"
                    )
                raise err from None
            finally:
                s.close()
        info = _info(done["info"])
        result = TransferResult(info.path, size, str(done.get("sha256", "")))
        result.extra.update(resumed_from=int(done.get("offset", 0)), sent=sent)
        return result

    def _send_range(
        self,
        s: socket.socket,
        fd: int,
        start: int,
        end: int,
        digest: Any,
        progress: Progress | None,
        cut_after: int | None = None,
    ) -> int:
        """sendfile [start, end) of fd while a thread hashes it into digest; returns bytes sent."""
        if cut_after is None and on_shared_fs(fd):  # one reader there (cowork.dataplane)
            sent = send_read_hashed(s, fd, start, end, digest, progress)
            self.bytes_sent += sent
            return sent
        error: list[BaseException] = []

        def hasher() -> None:
            try:
                _hash_range(fd, start, end, digest)
            except BaseException as exc:
                error.append(exc)

        th = threading.Thread(target=hasher, name="cowork-dataplane-hash", daemon=True)
        th.start()
        sent = 0
        sender = FileSender()
        try:
            pos = start
            step = 8 << 20 if progress is not None or cut_after is not None else 1 << 30
            while pos < end:
                n = min(step, end - pos)
                if cut_after is not None:
                    n = min(n, cut_after - sent)
                    if n <= 0:
                        s.shutdown(socket.SHUT_RDWR)
                        raise ConnectionAbortedError("connection cut on purpose (test)")
                k = sender.send(s.fileno(), fd, pos, n)
                if k == 0:
                    raise OSError(f"{end - pos} bytes short: the file shrank while it was sent")
                pos += k
                sent += k
                self.bytes_sent += k
                if progress is not None:
                    progress(k)
        finally:
            sender.__exit__()
            th.join()
        if error:
            raise error[0]
        return sent

    # -- one file down -------------------------------------------------------------------
    def download_file(
        self, remote: str, local: str, progress: Progress | None = None
    ) -> tuple[FileInfo, TransferResult]:
        """Receive one guest file into `local` atomically (temp file + rename), checked."""
        s = self.connect({"op": "download", "path": remote})
        tmp = f"{local}.cowork-{os.urandom(4).hex()}.tmp"
        try:
            first = self._first_reply(s)
            info = _info(first["info"])
            digest = hashlib.sha256()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                receive_to_fd(s, fd, info.size, digest, progress, buffer=BUFFER, buffers=BUFFERS)
            finally:
                os.close(fd)
            trailer = read_message(s)
            if trailer.get("sha256") != digest.hexdigest():
                raise error(
                    "DATA_LOSS",
                    f"{remote} changed while it was read (sha256 mismatch); not written",
                )
            os.chmod(tmp, (info.mode & 0o777) or 0o644)
            os.utime(tmp, ns=(info.mtime_ns, info.mtime_ns))
            os.replace(tmp, local)
            tmp = ""
        except (WireError, Cut, OSError) as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise TransferCut(f"download of {remote} cut: {exc}") from None
        finally:
            s.close()
            if tmp:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        return info, TransferResult(local, info.size, digest.hexdigest())

    # -- a tree up ---------------------------------------------------------------------
    def upload_tree(
        self,
        items: list[Any],
        base: str,
        progress: Progress | None = None,
    ) -> TransferResult:
        """Send planned upload items (host_client.transfer.plan_upload) on one connection."""
        s = self.connect({"op": "tree", "path": base})
        buf = bytearray()
        prefix = base.rstrip("/") + "/"
        try:
            self._first_reply(s)
            for item in items:
                rel = "" if item.remote == base else item.remote[len(prefix) :]
                if item.kind == "dir":
                    buf += encode({"k": "d", "p": rel, "m": 0})
                elif item.kind == "symlink":
                    buf += encode({"k": "l", "p": rel, "target": item.target, "t": item.mtime_ns})
                else:
                    self._tree_file(s, buf, item.local, rel, progress)
                if len(buf) >= BATCH:
                    s.sendall(buf)
                    buf.clear()
            buf += encode({"k": "end"})
            s.sendall(buf)
            done = self._reply(s)
        except OSError as exc:
            raise self._refusal(s, exc, f"upload of {base}") from None
        finally:
            s.close()
        result = TransferResult(base, int(done.get("bytes", 0)), "", files=int(done["files"]))
        result.symlinks = int(done.get("symlinks", 0))
        result.skipped = [Skipped(p, r) for p, r in done.get("skipped", [])]
        return result

    def _tree_file(
        self, s: socket.socket, buf: bytearray, local: str, rel: str, progress: Progress | None
    ) -> None:
        with open(local, "rb") as f:
            st = os.fstat(f.fileno())
            head = {"k": "f", "p": rel, "m": st.st_mode & 0o7777, "t": st.st_mtime_ns}
            if st.st_size <= SMALL:
                data = f.read(st.st_size + 1)
                if len(data) > st.st_size:  # grew meanwhile: send it the long way
                    f.seek(0)
                else:  # the checksum rides in the header: one message per small file
                    sha = hashlib.sha256(data).hexdigest()
                    buf += encode({**head, "n": len(data), "s": sha})
                    buf += data
                    self.bytes_sent += len(data)
                    if progress is not None:
                        progress(len(data))
                    return
            size = os.fstat(f.fileno()).st_size
            buf += encode({**head, "n": size})
            s.sendall(buf)
            buf.clear()
            digest = hashlib.sha256()
            self._send_range(s, f.fileno(), 0, size, digest, progress)
            buf += encode({"sha256": digest.hexdigest()})


def _hash_range(fd: int, start: int, end: int, digest: Any) -> None:
    buf = bytearray(BUFFER)
    view = memoryview(buf)
    off = start
    while off < end:
        k = os.preadv(fd, [view[: min(len(buf), end - off)]], off)
        if k == 0:
            raise OSError(f"the file shrank while it was hashed (at {off} of {end} bytes)")
        digest.update(view[:k])
        off += k
