"""Files service: confined, chunked, atomic.

Writes go to a hidden temporary file in the target's directory and are
renamed over the target only after an explicit `commit` and an fsync, so a cut
stream, a full disk or a crashed client never leaves a half file. Blocking file
I/O runs in the default executor so one large transfer does not stall other RPCs.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import stat as statmod
from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio

from cowork.agent.v1 import files_pb2 as pb
from cowork.agent.v1 import files_pb2_grpc as pb_grpc
from cowork.defaults import FILE_CHUNK, LIST_LIMIT, MAX_FILE_CHUNK

from .errors import AgentError, denied, from_oserror, invalid, not_found, precondition
from .paths import PathPolicy
from .rpc import Context, add_bytes, audit, first_message
from .sandbox import RunUser

_TMP_PREFIX = ".cowork-tmp-"


def file_info(path: str, st: os.stat_result | None = None) -> pb.FileInfo:
    st = st or os.lstat(path)
    mode = st.st_mode
    if statmod.S_ISREG(mode):
        kind = pb.FILE_TYPE_FILE
    elif statmod.S_ISDIR(mode):
        kind = pb.FILE_TYPE_DIRECTORY
    elif statmod.S_ISLNK(mode):
        kind = pb.FILE_TYPE_SYMLINK
    else:
        kind = pb.FILE_TYPE_OTHER
    info = pb.FileInfo(
        path=path,
        name=os.path.basename(path) or path,
        type=kind,
        size=st.st_size,
        mode=statmod.S_IMODE(mode),
        mtime_ns=st.st_mtime_ns,
    )
    if kind == pb.FILE_TYPE_SYMLINK:
        try:
            info.symlink_target = os.readlink(path)
        except OSError:
            pass
    return info


async def _io(fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _missing_dirs(path: str) -> list[str]:
    """`path` and its ancestors that do not exist yet, outermost first."""
    out: list[str] = []
    while path and not os.path.lexists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out[::-1]


class FilesService(pb_grpc.FilesServicer):
    """Files RPCs; with an `owner` (the sandbox user), what they create belongs to it."""

    def __init__(self, paths: PathPolicy, owner: RunUser | None = None) -> None:
        self.paths = paths
        self.owner = owner

    def _own(self, paths: list[str]) -> None:
        if self.owner is None:
            return
        for p in paths:
            os.lchown(p, self.owner.uid, self.owner.gid)

    async def Stat(self, request: pb.StatRequest, context: Context) -> pb.FileInfo:
        path = self.paths.resolve_entry(request.path)
        audit(path=path)
        try:
            return file_info(path)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        path = self.paths.resolve(request.path)
        audit(path=path, recursive=request.recursive)
        limit = request.limit or LIST_LIMIT
        resp: pb.ListResponse = await _io(self._list, path, request.path, request.recursive, limit)
        return resp

    def _list(self, path: str, shown: str, recursive: bool, limit: int) -> pb.ListResponse:
        try:
            if not os.path.isdir(path):
                if os.path.exists(path):
                    raise precondition(f"not a directory: {shown}")
                raise not_found(f"no such directory: {shown}")
            entries: list[pb.FileInfo] = []
            stack = [path]
            while stack:
                current = stack.pop()
                with os.scandir(current) as it:
                    for entry in it:
                        if len(entries) >= limit:
                            raise AgentError(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"more than {limit} entries under {shown}; raise the limit",
                            )
                        entries.append(file_info(entry.path, entry.stat(follow_symlinks=False)))
                        if recursive and entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
        except OSError as exc:
            raise from_oserror(exc, shown) from None
        entries.sort(key=lambda e: e.path)
        return pb.ListResponse(entries=entries)

    async def Read(
        self, request: pb.ReadRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        path = self.paths.resolve(request.path)
        audit(path=path, offset=request.offset, length=request.length)
        chunk = min(request.chunk_size or FILE_CHUNK, MAX_FILE_CHUNK)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        try:
            st = os.fstat(fd)
            if statmod.S_ISDIR(st.st_mode):
                raise precondition(f"is a directory: {request.path}")
            yield pb.ReadResponse(info=file_info(path, st))
            remaining = request.length or None
            offset = request.offset
            while remaining is None or remaining > 0:
                n = chunk if remaining is None else min(chunk, remaining)
                data: bytes = await _io(os.pread, fd, n, offset)
                if not data:
                    break
                offset += len(data)
                if remaining is not None:
                    remaining -= len(data)
                add_bytes("bytes", len(data))
                yield pb.ReadResponse(data=data)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        finally:
            os.close(fd)

    async def Write(
        self, request_iterator: AsyncIterator[pb.WriteRequest], context: Context
    ) -> pb.WriteResponse:
        first = await first_message(request_iterator)
        if first is None or first.WhichOneof("msg") != "header":
            raise invalid("the first Write message must be `header`")
        header = first.header
        target = self.paths.resolve_entry(header.path)
        audit(path=target)
        parent = os.path.dirname(target)
        try:
            if not os.path.isdir(parent):
                if not header.create_parents:
                    raise not_found(
                        f"parent directory does not exist: {os.path.dirname(header.path) or parent}"
                    )
                self._check_parents_inside(parent, header.path)
                created = _missing_dirs(parent)
                os.makedirs(parent, exist_ok=True)
                self._own(created)
            existing = _lstat_or_none(target)
            if existing is not None:
                if statmod.S_ISDIR(existing.st_mode):
                    raise precondition(f"is a directory: {header.path}")
                if not header.overwrite:
                    raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {header.path}")
            mode = header.mode or (statmod.S_IMODE(existing.st_mode) if existing else 0o644)
            fd, tmp = _open_temp(parent, os.path.basename(target))
            if self.owner is not None:
                os.fchown(fd, self.owner.uid, self.owner.gid)
        except OSError as exc:
            raise from_oserror(exc, header.path) from None
        committed = False
        try:
            digest = hashlib.sha256()
            written = 0
            commit: pb.WriteCommit | None = None
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                if kind == "data":
                    if len(req.data) > MAX_FILE_CHUNK:
                        raise invalid(f"chunk larger than {MAX_FILE_CHUNK} bytes")
                    await _io(_write_all, fd, req.data)
                    digest.update(req.data)
                    written += len(req.data)
                elif kind == "commit":
                    commit = req.commit
                    break
                else:
                    raise invalid("unexpected `header` after the first Write message")
            if commit is None:
                raise AgentError(
                    grpc.StatusCode.ABORTED,
                    f"write stream ended without commit; {header.path} left untouched",
                )
            hexdigest = digest.hexdigest()
            if commit.expected_size and commit.expected_size != written:
                raise AgentError(
                    grpc.StatusCode.DATA_LOSS,
                    f"size mismatch: got {written} bytes, expected {commit.expected_size}",
                )
            if commit.sha256 and commit.sha256.lower() != hexdigest:
                raise AgentError(
                    grpc.StatusCode.DATA_LOSS, "sha256 mismatch; target left untouched"
                )
            closing, fd = fd, -1
            await _io(_finish_temp, closing, mode, header.mtime_ns, tmp)
            if not header.overwrite and os.path.lexists(target):
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {header.path}")
            os.rename(tmp, target)
            committed = True
            add_bytes("bytes", written)
            return pb.WriteResponse(info=file_info(target), bytes_written=written, sha256=hexdigest)
        except OSError as exc:
            raise from_oserror(exc, header.path) from None
        finally:
            if fd >= 0:
                os.close(fd)
            if not committed:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def _check_parents_inside(self, parent: str, shown: str) -> None:
        # The nearest existing ancestor must resolve inside a root; then every
        # directory we create lies inside it too.
        probe = parent
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        self.paths.resolve(probe)
        if os.path.islink(probe):
            raise denied(f"path outside the workspace roots: {shown}")

    async def Remove(self, request: pb.RemoveRequest, context: Context) -> pb.RemoveResponse:
        path = self.paths.resolve_entry(request.path)
        audit(path=path, recursive=request.recursive)
        if self.paths.is_root(path):
            raise denied(f"refusing to remove a workspace root: {request.path}")
        st = _lstat_or_none(path)
        if st is None:
            if request.missing_ok:
                return pb.RemoveResponse(removed=False)
            raise not_found(f"no such file or directory: {request.path}")
        try:
            if statmod.S_ISDIR(st.st_mode):
                if request.recursive:
                    await _io(shutil.rmtree, path)
                else:
                    os.rmdir(path)
            else:
                os.unlink(path)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        return pb.RemoveResponse(removed=True)

    async def MakeDir(self, request: pb.MakeDirRequest, context: Context) -> pb.FileInfo:
        path = self.paths.resolve_entry(request.path)
        audit(path=path)
        mode = request.mode or 0o755
        created = _missing_dirs(path)
        try:
            if request.parents:
                self._check_parents_inside(os.path.dirname(path), request.path)
                os.makedirs(path, mode=mode, exist_ok=request.exist_ok)
            else:
                try:
                    os.mkdir(path, mode)
                except FileExistsError:
                    if not (request.exist_ok and os.path.isdir(path)):
                        raise
            if not os.path.isdir(path):
                raise precondition(f"exists and is not a directory: {request.path}")
            self._own(created)
            return file_info(path)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None

    async def Rename(self, request: pb.RenameRequest, context: Context) -> pb.FileInfo:
        src = self.paths.resolve_entry(request.source)
        dst = self.paths.resolve_entry(request.destination)
        audit(path=src, destination=dst)
        if self.paths.is_root(src):
            raise denied(f"refusing to rename a workspace root: {request.source}")
        try:
            if _lstat_or_none(src) is None:
                raise not_found(f"no such file or directory: {request.source}")
            if request.overwrite:
                os.replace(src, dst)
            else:
                # renameat2(RENAME_NOREPLACE) is not in the stdlib; link+unlink is
                # atomic for files, and directories fall back to check+rename.
                if os.path.lexists(dst):
                    raise AgentError(
                        grpc.StatusCode.ALREADY_EXISTS, f"destination exists: {request.destination}"
                    )
                os.rename(src, dst)
            return file_info(dst)
        except OSError as exc:
            raise from_oserror(exc, request.source) from None


def _lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _open_temp(parent: str, name: str) -> tuple[int, str]:
    for _ in range(100):
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{name[:64]}-{os.urandom(6).hex()}")
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            return fd, tmp
        except FileExistsError:
            continue
    raise OSError("could not create a temporary file")


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _finish_temp(fd: int, mode: int, mtime_ns: int, tmp: str) -> None:
    try:
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    if mtime_ns:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
