"""Files service: confined, chunked, atomic, and race-free against the sandbox.

Every operation resolves its path below a workspace root's directory fd (see
paths.py) and then acts through directory fds only (`dir_fd=`,
`follow_symlinks=False`, renameat, unlinkat, fchown of an open fd): code in
the sandbox that swaps a directory for a symlink mid-call can make a call
fail, never make the agent act outside the root.

Writes go to a hidden temporary file in the target's directory and are
renamed over the target only after an explicit `commit` and an fsync, so a cut
stream, a full disk or a crashed client never leaves a half file. Blocking file
I/O runs on a thread pool so one large transfer does not stall other RPCs; a
handler waits for its pending I/O before closing the fd it runs on (a
cancelled call must not close an fd a thread is still writing to).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import errno
import hashlib
import os
import stat as statmod
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from cowork.agent.v1 import files_pb2 as pb
from cowork.agent.v1 import files_pb2_grpc as pb_grpc
from cowork.defaults import FILE_CHUNK, LIST_LIMIT, MAX_FILE_CHUNK

from .errors import AgentError, denied, from_oserror, invalid, not_found, precondition
from .fdio import write_all
from .paths import DIR_FLAGS, LIST_FLAGS, READ_FLAGS, STAT_FLAGS, Location, PathPolicy
from .rpc import Context, add_bytes, audit, first_message
from .sandbox import RunUser

T = TypeVar("T")

_TMP_PREFIX = ".cowork-tmp-"
# A directory opened for reading that must not be a symlink.
_SUBDIR_FLAGS = LIST_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC
_SPECIAL = {
    statmod.S_IFIFO: "fifo",
    statmod.S_IFSOCK: "socket",
    statmod.S_IFCHR: "character device",
    statmod.S_IFBLK: "block device",
}
_MAX_LINK_TARGET = 4095  # PATH_MAX - 1: what symlink(2) stores

_POOL = concurrent.futures.ThreadPoolExecutor(
    max_workers=min(32, (os.cpu_count() or 1) + 4), thread_name_prefix="cowork-files"
)


class _Blocking:
    """Runs blocking calls on the pool; `drain()` waits for the one in flight.

    When an RPC is cancelled, awaiting stops but a thread may still be inside
    os.write(fd); closing fd then would let its number be reused by another
    open, and the late write land there.
    """

    def __init__(self) -> None:
        self._fut: concurrent.futures.Future[Any] | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        self._fut = _POOL.submit(fn, *args)
        result: T = await asyncio.wrap_future(self._fut)
        return result

    def drain(self) -> None:
        if self._fut is not None and not self._fut.done():
            concurrent.futures.wait([self._fut])


async def _io(fn: Callable[..., T], *args: Any) -> T:
    """A blocking call that owns all its fds, run off the event loop."""
    return await _Blocking().run(fn, *args)


def file_info(path: str, st: os.stat_result, link_target: str = "") -> pb.FileInfo:
    mode = st.st_mode
    if statmod.S_ISREG(mode):
        kind = pb.FILE_TYPE_FILE
    elif statmod.S_ISDIR(mode):
        kind = pb.FILE_TYPE_DIRECTORY
    elif statmod.S_ISLNK(mode):
        kind = pb.FILE_TYPE_SYMLINK
    else:
        kind = pb.FILE_TYPE_OTHER
    return pb.FileInfo(
        path=path,
        name=os.path.basename(path) or path,
        type=kind,
        size=st.st_size,
        mode=statmod.S_IMODE(mode),
        mtime_ns=st.st_mtime_ns,
        symlink_target=link_target if kind == pb.FILE_TYPE_SYMLINK else "",
        special=_SPECIAL.get(statmod.S_IFMT(mode), ""),
        device=st.st_dev,
        inode=st.st_ino,
    )


def _entry_info(dirfd: int, name: str, path: str, st: os.stat_result | None = None) -> pb.FileInfo:
    """FileInfo of `name` in `dirfd`, not following it."""
    st = st or os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    target = ""
    if statmod.S_ISLNK(st.st_mode):
        try:
            target = os.readlink(name, dir_fd=dirfd)
        except OSError:
            pass  # replaced since the stat: report the link without its target
    return file_info(path, st, target)


def _lstat_or_none(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _close(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


class FilesService(pb_grpc.FilesServicer):
    """Files RPCs; with an `owner` (the sandbox user), what they create belongs to it."""

    def __init__(self, paths: PathPolicy, owner: RunUser | None = None) -> None:
        self.paths = paths
        self.owner = owner

    # -- helpers ------------------------------------------------------------------
    def _locate(self, path: str) -> Location:
        """Locate `path` (see paths.py) and note it and the resolver on the audit line."""
        audit(resolver=self.paths.resolver)
        loc = self.paths.locate(path)
        audit(path=loc.path)
        return loc

    def _parent(self, loc: Location, create: bool) -> int:
        """A directory fd on the parent of `loc`; with `create`, missing ones are made."""
        try:
            return self.paths.open_parent(loc)
        except FileNotFoundError:
            if not create:
                raise not_found(
                    f"parent directory does not exist: {os.path.dirname(loc.shown) or loc.shown}"
                ) from None
        return self._make_dirs(loc.parent(), None)

    def _make_dirs(self, loc: Location, leaf_mode: int | None) -> int:
        """Like `mkdir -p`, through fds: returns an fd on `loc`, creating what is missing.

        Existing directories are found with the confined resolver (in-root
        symlinks allowed); each directory made here is then opened with
        O_NOFOLLOW from its parent's fd and chowned through that open fd, so a
        swap between mkdir and chown makes the call fail, not chown elsewhere.
        """
        n = len(loc.parts)
        fd = -1
        while fd < 0:
            try:
                fd = self.paths.open(loc.prefix(n), DIR_FLAGS)
            except FileNotFoundError:
                if n == 0:
                    raise
                n -= 1
        try:
            for i in range(n, len(loc.parts)):
                name = loc.parts[i]
                mode = leaf_mode if leaf_mode is not None and i == len(loc.parts) - 1 else 0o777
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                except FileExistsError:  # made meanwhile: take it if it is a directory
                    nxt = self.paths.open(loc.prefix(i + 1), DIR_FLAGS)
                else:
                    nxt = os.open(name, _SUBDIR_FLAGS, dir_fd=fd)
                    self._own_fd(nxt)
                os.close(fd)
                fd = nxt
            out, fd = fd, -1
            return out
        finally:
            _close(fd)

    def _own_fd(self, fd: int) -> None:
        if self.owner is not None:
            os.fchown(fd, self.owner.uid, self.owner.gid)

    # -- RPCs --------------------------------------------------------------------
    async def Stat(self, request: pb.StatRequest, context: Context) -> pb.StatResponse:
        return pb.StatResponse(info=self._stat(request))

    def _stat(self, request: pb.StatRequest) -> pb.FileInfo:
        loc = self._locate(request.path)
        try:
            if request.follow_symlinks or loc.is_root:
                fd = self.paths.open(loc, STAT_FLAGS)
                try:
                    return file_info(loc.path, os.fstat(fd))
                finally:
                    os.close(fd)
            pfd = self.paths.open_parent(loc)
            try:
                return _entry_info(pfd, loc.name, loc.path)
            finally:
                os.close(pfd)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None

    async def List(self, request: pb.ListRequest, context: Context) -> pb.ListResponse:
        loc = self._locate(request.path)
        audit(recursive=request.recursive)
        limit = request.limit or LIST_LIMIT
        return await _io(self._list, loc, request.recursive, limit)

    def _list(self, loc: Location, recursive: bool, limit: int) -> pb.ListResponse:
        shown = loc.shown
        try:
            try:
                top = self.paths.open(loc, LIST_FLAGS)
            except NotADirectoryError:
                raise precondition(f"not a directory: {shown}") from None
            except FileNotFoundError:
                raise not_found(f"no such directory: {shown}") from None
            entries: list[pb.FileInfo] = []
            # (fd, path, subdirectories still to visit); one fd per level, never more.
            stack: list[tuple[int, str, list[str] | None]] = [(top, loc.path, None)]
            try:
                while stack:
                    fd, path, pending = stack[-1]
                    if pending is None:
                        pending = []
                        stack[-1] = (fd, path, pending)
                        with os.scandir(fd) as it:
                            for entry in it:
                                if len(entries) >= limit:
                                    raise AgentError(
                                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                                        f"more than {limit} entries under {shown}; raise the limit",
                                    )
                                try:
                                    st = entry.stat(follow_symlinks=False)
                                except FileNotFoundError:
                                    continue  # removed since readdir
                                entries.append(
                                    _entry_info(fd, entry.name, f"{path}/{entry.name}", st)
                                )
                                if recursive and statmod.S_ISDIR(st.st_mode):
                                    pending.append(entry.name)
                    if not pending:
                        stack.pop()
                        os.close(fd)
                        continue
                    name = pending.pop()
                    try:
                        sub = os.open(name, _SUBDIR_FLAGS, dir_fd=fd)
                    except (FileNotFoundError, NotADirectoryError):
                        continue  # removed or replaced since it was listed: nothing below
                    except OSError as exc:
                        if exc.errno != errno.ELOOP:
                            raise
                        continue  # became a symlink: never followed
                    stack.append((sub, f"{path}/{name}", None))
            finally:
                for fd, _, _ in stack:
                    os.close(fd)
        except OSError as exc:
            raise from_oserror(exc, shown) from None
        entries.sort(key=lambda e: e.path)
        return pb.ListResponse(entries=entries)

    async def Read(
        self, request: pb.ReadRequest, context: Context
    ) -> AsyncIterator[pb.ReadResponse]:
        loc = self._locate(request.path)
        audit(offset=request.offset, length=request.length)
        chunk = min(request.chunk_size or FILE_CHUNK, MAX_FILE_CHUNK)
        if request.offset > _MAX_OFFSET:
            raise AgentError(
                grpc.StatusCode.OUT_OF_RANGE,
                f"offset {request.offset} is beyond the largest file offset ({_MAX_OFFSET})",
            )
        try:
            fd = self.paths.open(loc, READ_FLAGS)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        io = _Blocking()
        try:
            st = os.fstat(fd)
            if statmod.S_ISDIR(st.st_mode):
                raise precondition(f"is a directory: {request.path}")
            if not statmod.S_ISREG(st.st_mode):
                kind = _SPECIAL.get(statmod.S_IFMT(st.st_mode), "special file")
                raise precondition(f"not a regular file ({kind}): {request.path}")
            yield pb.ReadResponse(info=file_info(loc.path, st))
            remaining = request.length or None
            offset = request.offset
            while remaining is None or remaining > 0:
                n = chunk if remaining is None else min(chunk, remaining)
                data: bytes = await io.run(os.pread, fd, n, offset)
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
            io.drain()
            os.close(fd)

    async def Write(
        self, request_iterator: AsyncIterator[pb.WriteRequest], context: Context
    ) -> pb.WriteResponse:
        first = await first_message(request_iterator)
        if first is None or first.WhichOneof("msg") != "header":
            raise invalid("the first Write message must be `header`")
        header = first.header
        loc = self._locate(header.path)
        _check_mode(header.mode)
        if loc.is_root:
            raise precondition(f"is a directory: {header.path}")
        name = loc.name
        pfd = fd = -1
        tmp = ""
        committed = False
        io = _Blocking()
        try:
            pfd = self._parent(loc, header.create_parents)
            existing = _lstat_or_none(pfd, name)
            if existing is not None:
                if statmod.S_ISDIR(existing.st_mode):
                    raise precondition(f"is a directory: {header.path}")
                if not header.overwrite:
                    raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {header.path}")
            mode = header.mode or 0o644
            if not header.mode and existing is not None and statmod.S_ISREG(existing.st_mode):
                mode = statmod.S_IMODE(existing.st_mode)  # an overwrite keeps the file's mode
            fd, tmp = _open_temp(pfd, name)
            self._own_fd(fd)
            digest = hashlib.sha256()
            written = 0
            commit: pb.WriteCommit | None = None
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                if kind == "data":
                    if len(req.data) > MAX_FILE_CHUNK:
                        raise invalid(f"chunk larger than {MAX_FILE_CHUNK} bytes")
                    await io.run(write_all, fd, req.data)
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
            await io.run(_finish_temp, closing, mode, header.mtime_ns)
            _rename(pfd, tmp, pfd, name, header.overwrite, header.path)
            committed = True
            add_bytes("bytes", written)
            info = _entry_info(pfd, name, loc.path)
            return pb.WriteResponse(info=info, bytes_written=written, sha256=hexdigest)
        except OSError as exc:
            raise from_oserror(exc, header.path) from None
        finally:
            io.drain()
            _close(fd)
            if tmp and not committed:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except FileNotFoundError:
                    pass
            _close(pfd)

    async def Symlink(self, request: pb.SymlinkRequest, context: Context) -> pb.SymlinkResponse:
        return pb.SymlinkResponse(info=self._symlink(request))

    def _symlink(self, request: pb.SymlinkRequest) -> pb.FileInfo:
        loc = self._locate(request.path)
        audit(target=request.target)
        target = request.target
        if not target:
            raise invalid("symlink target is empty")
        if "\x00" in target:
            raise invalid("symlink target contains a NUL byte")
        if len(os.fsencode(target)) > _MAX_LINK_TARGET:
            raise invalid(f"symlink target longer than {_MAX_LINK_TARGET} bytes")
        if loc.is_root:
            raise precondition(f"is a directory: {request.path}")
        name = loc.name
        pfd = -1
        tmp = ""
        committed = False
        try:
            pfd = self._parent(loc, request.create_parents)
            existing = _lstat_or_none(pfd, name)
            if existing is not None:
                if statmod.S_ISDIR(existing.st_mode):
                    raise precondition(f"is a directory: {request.path}")
                if not request.overwrite:
                    raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {request.path}")
            tmp = _make_temp_link(pfd, name, target)
            if self.owner is not None:
                os.chown(tmp, self.owner.uid, self.owner.gid, dir_fd=pfd, follow_symlinks=False)
            if request.mtime_ns:
                ns = (request.mtime_ns, request.mtime_ns)
                os.utime(tmp, ns=ns, dir_fd=pfd, follow_symlinks=False)
            _rename(pfd, tmp, pfd, name, request.overwrite, request.path)
            committed = True
            return _entry_info(pfd, name, loc.path)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        finally:
            if tmp and not committed:
                try:
                    os.unlink(tmp, dir_fd=pfd)
                except FileNotFoundError:
                    pass
            _close(pfd)

    async def Remove(self, request: pb.RemoveRequest, context: Context) -> pb.RemoveResponse:
        loc = self._locate(request.path)
        audit(recursive=request.recursive)
        if loc.is_root or self.paths.is_root(loc.path):
            raise denied(f"refusing to remove a workspace root: {request.path}")
        pfd = -1
        io = _Blocking()
        try:
            try:
                pfd = self.paths.open_parent(loc)
                st = _lstat_or_none(pfd, loc.name)
            except FileNotFoundError:
                st = None
            if st is None:
                if request.missing_ok:
                    return pb.RemoveResponse(removed=False)
                raise not_found(f"no such file or directory: {request.path}")
            if statmod.S_ISDIR(st.st_mode):
                if request.recursive:
                    await io.run(_rmtree, pfd, loc.name)
                else:
                    os.rmdir(loc.name, dir_fd=pfd)
            else:
                os.unlink(loc.name, dir_fd=pfd)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        finally:
            io.drain()
            _close(pfd)
        return pb.RemoveResponse(removed=True)

    async def MakeDir(self, request: pb.MakeDirRequest, context: Context) -> pb.MakeDirResponse:
        return pb.MakeDirResponse(info=self._make_dir(request))

    def _make_dir(self, request: pb.MakeDirRequest) -> pb.FileInfo:
        loc = self._locate(request.path)
        _check_mode(request.mode)
        mode = request.mode or 0o755
        if loc.is_root:
            if not request.exist_ok:
                raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"file exists: {request.path}")
            return self._stat(pb.StatRequest(path=request.path))
        pfd = -1
        try:
            if request.parents:
                pfd = self._make_dirs(loc.parent(), None)
            else:
                pfd = self._parent(loc, create=False)
            try:
                os.mkdir(loc.name, mode, dir_fd=pfd)
            except FileExistsError:
                if not request.exist_ok:
                    raise
                try:
                    os.close(self.paths.open(loc, DIR_FLAGS))
                except NotADirectoryError:
                    raise precondition(f"exists and is not a directory: {request.path}") from None
            else:
                fd = os.open(loc.name, _SUBDIR_FLAGS, dir_fd=pfd)
                try:
                    self._own_fd(fd)
                finally:
                    os.close(fd)
            return _entry_info(pfd, loc.name, loc.path)
        except OSError as exc:
            raise from_oserror(exc, request.path) from None
        finally:
            _close(pfd)

    async def Rename(self, request: pb.RenameRequest, context: Context) -> pb.RenameResponse:
        return pb.RenameResponse(info=self._move(request))

    def _move(self, request: pb.RenameRequest) -> pb.FileInfo:
        src = self._locate(request.source)
        dst = self.paths.locate(request.destination)
        audit(destination=dst.path)
        if src.is_root or self.paths.is_root(src.path):
            raise denied(f"refusing to rename a workspace root: {request.source}")
        if dst.is_root or self.paths.is_root(dst.path):
            raise denied(f"refusing to replace a workspace root: {request.destination}")
        if dst.path.startswith(src.path.rstrip("/") + "/"):
            raise invalid(f"cannot move {request.source} into itself ({request.destination})")
        spfd = dpfd = -1
        try:
            try:
                spfd = self.paths.open_parent(src)
            except FileNotFoundError:
                raise not_found(f"no such file or directory: {request.source}") from None
            if _lstat_or_none(spfd, src.name) is None:
                raise not_found(f"no such file or directory: {request.source}")
            dpfd = self._parent(dst, create=False)
            _rename(spfd, src.name, dpfd, dst.name, request.overwrite, request.destination)
            return _entry_info(dpfd, dst.name, dst.path)
        except OSError as exc:
            raise from_oserror(exc, request.source) from None
        finally:
            _close(spfd)
            _close(dpfd)


# The largest offset pread/lseek take (off_t is a signed 64-bit integer).
_MAX_OFFSET = 2**63 - 1


def _check_mode(mode: int) -> None:
    """Permission bits are at most 0o7777; anything above is not a mode (chmod would overflow)."""
    if mode > 0o7777:
        raise invalid(f"mode {mode:#o} is not a permission mode (at most 0o7777)")


def _temp_name(name: str) -> str:
    return f"{_TMP_PREFIX}{name[:64]}-{os.urandom(6).hex()}"


def _open_temp(dirfd: int, name: str) -> tuple[int, str]:
    for _ in range(100):
        tmp = _temp_name(name)
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(tmp, flags, 0o600, dir_fd=dirfd), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "could not create a temporary file")


def _make_temp_link(dirfd: int, name: str, target: str) -> str:
    for _ in range(100):
        tmp = _temp_name(name)
        try:
            os.symlink(target, tmp, dir_fd=dirfd)
            return tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "could not create a temporary symlink")


_RENAME_NOREPLACE = 1
_renameat2: Any = None  # None: not looked up yet; False: unavailable


def _rename(sfd: int, sname: str, dfd: int, dname: str, overwrite: bool, shown: str) -> None:
    """renameat; without `overwrite`, atomically refuse an existing destination.

    renameat2(RENAME_NOREPLACE) (glibc >= 2.28) where the libc and file system
    have it, else check-then-rename (a race there stays inside the root).
    """
    global _renameat2
    if overwrite:
        os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
        return
    exists = AgentError(grpc.StatusCode.ALREADY_EXISTS, f"destination exists: {shown}")
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
            fn.argtypes += [ctypes.c_uint]
            fn.restype = ctypes.c_int
            _renameat2 = fn
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        rc = _renameat2(sfd, os.fsencode(sname), dfd, os.fsencode(dname), _RENAME_NOREPLACE)
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise exists
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), sname)
    if _lstat_or_none(dfd, dname) is not None:
        raise exists
    os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)


def _rmtree(parent: int, name: str) -> None:
    """Remove directory `name` in `parent` and all below it, never following a symlink.

    Our own fd-based rmtree (shutil.rmtree takes dir_fd only from Python
    3.11): every directory is opened with O_NOFOLLOW from its parent's fd and
    emptied through that fd, so a directory swapped for a symlink is unlinked
    as a link, never descended into. Holds one fd per level.
    """
    # (fd of the parent, name in it, fd of the directory, subdirectories left)
    stack: list[tuple[int, str, int, list[str] | None]] = []
    try:
        stack.append((parent, name, os.open(name, _SUBDIR_FLAGS, dir_fd=parent), None))
        while stack:
            pfd, nm, fd, pending = stack[-1]
            if pending is None:
                pending = []
                stack[-1] = (pfd, nm, fd, pending)
                with os.scandir(fd) as it:
                    for entry in it:
                        if entry.is_dir(follow_symlinks=False) or not _unlink(fd, entry.name):
                            pending.append(entry.name)
            if pending:
                sub = pending.pop()
                try:
                    subfd = os.open(sub, _SUBDIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    _unlink(fd, sub)  # replaced by a file or a link since listed
                    continue
                stack.append((fd, sub, subfd, None))
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(nm, dir_fd=pfd)
            except FileNotFoundError:
                pass
    finally:
        for _, _, fd, _ in stack:
            os.close(fd)


def _unlink(dirfd: int, name: str) -> bool:
    """Unlink a non-directory; False when it is (now) a directory."""
    try:
        os.unlink(name, dir_fd=dirfd)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        return False
    return True


def _finish_temp(fd: int, mode: int, mtime_ns: int) -> None:
    try:
        os.fchmod(fd, mode)
        if mtime_ns:
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        os.fsync(fd)
    finally:
        os.close(fd)
