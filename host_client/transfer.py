"""What a copy does with each kind of entry, in both directions: `cp -a` / `tar` semantics.

Shared by CoworkClient and AsyncCoworkClient (they differ only in how they
wait); the rules:

- Regular files are copied (each atomically, checked by size and SHA-256).
- Directories are recreated.
- Symlinks are copied *as symlinks*, their target string unchanged, never
  read through, in both directions, unless the caller asks to follow them
  (`follow_symlinks=True`, like `cp -L`). Following, a dangling link, a loop,
  or (downloading) a guest link the agent refuses to follow (absolute, or
  leaving the workspace) is skipped with its reason.
- Sockets, FIFOs and devices are skipped, each with its reason, in
  `TransferResult.skipped` (coworkctl prints one line per skip).
- Downloading, nothing is ever written *through* a symlink on this host
  below the destination: a file or link lands by rename (replacing a link
  that is in the way), a directory that lands where a symlink is replaces
  the symlink (GNU tar's default), and an entry whose local parent is not a
  real directory is skipped. The guest is not trusted to send safe names:
  entries with "..", "." or empty components are skipped.
"""

from __future__ import annotations

import os
import stat as statmod
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cowork.defaults import AUTH_METADATA_KEY

from .errors import CoworkError
from .models import FileInfo, Skipped, TransferResult

_KINDS = {
    statmod.S_IFIFO: "fifo",
    statmod.S_IFSOCK: "socket",
    statmod.S_IFCHR: "character device",
    statmod.S_IFBLK: "block device",
}


LOOP = "symlink loop: that directory is already being copied"
UNSAFE_PARENT = "its directory on this host is not a real directory (a symlink?): not written"


def special_reason(kind: str) -> str:
    return f"{kind or 'special file'}: only files, directories and symlinks are copied"


def entry_error(exc: CoworkError) -> str | None:
    """Why one entry of a tree was not copied, or None when the error ends the whole copy.

    The guest tree can change while it is copied, and with `follow_symlinks`
    the agent refuses links that leave the workspace: those cost one entry.
    """
    if exc.code == "PERMISSION_DENIED":
        return f"refused by the agent: {exc.message}"
    if exc.code == "NOT_FOUND":
        return f"gone, or a dangling symlink: {exc.message}"
    if exc.code == "FAILED_PRECONDITION":
        return exc.message
    return None


def local_mode(mode: int) -> int:
    """Permission bits for a downloaded file: the guest's, without setuid/setgid/sticky.

    The guest is not trusted; a setuid bit from it has no business on this host.
    """
    return (mode & 0o777) or 0o644


@dataclass(frozen=True)
class UploadItem:
    """One step of an upload: make a directory, send a file, or create a symlink."""

    kind: str  # "dir" | "file" | "symlink"
    local: str
    remote: str
    size: int = 0
    target: str = ""  # for "symlink"
    mtime_ns: int = 0  # for "symlink" (files carry theirs in the Write header)


def _remote_join(base: str, rel: str) -> str:
    return base if not rel else f"{base.rstrip('/')}/{rel}"


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes came through as surrogates
        return False


def plan_upload(
    local: str, remote: str, follow_symlinks: bool = False
) -> tuple[list[UploadItem], list[Skipped]]:
    """Walk `local` (never following a symlink unless asked) into the steps of an upload.

    Raises FileNotFoundError when `local` itself does not exist.
    """
    items: list[UploadItem] = []
    skipped: list[Skipped] = []
    os.lstat(local)  # the top must exist (a dangling top symlink is still copied as a link)
    # (local path, remote path, (dev, ino) of the directories above it when following)
    todo: list[tuple[str, str, tuple[tuple[int, int], ...]]] = [(local, remote, ())]
    while todo:
        lpath, rpath, above = todo.pop()
        try:
            st = os.lstat(lpath)
            if follow_symlinks and statmod.S_ISLNK(st.st_mode):
                try:
                    st = os.stat(lpath)
                except FileNotFoundError:
                    skipped.append(Skipped(lpath, "dangling symlink (not followed: -L)"))
                    continue
                except OSError as exc:
                    if exc.strerror is None:
                        raise
                    skipped.append(Skipped(lpath, f"symlink not followed: {exc.strerror}"))
                    continue
            mode = st.st_mode
            if statmod.S_ISLNK(mode):
                target = os.readlink(lpath)
                if not _utf8(target):
                    skipped.append(Skipped(lpath, "symlink target is not valid UTF-8"))
                    continue
                items.append(
                    UploadItem("symlink", lpath, rpath, target=target, mtime_ns=st.st_mtime_ns)
                )
            elif statmod.S_ISREG(mode):
                items.append(UploadItem("file", lpath, rpath, size=st.st_size))
            elif statmod.S_ISDIR(mode):
                key = (st.st_dev, st.st_ino)
                if key in above:
                    skipped.append(Skipped(lpath, LOOP))
                    continue
                items.append(UploadItem("dir", lpath, rpath))
                names = sorted(os.listdir(lpath), reverse=True)  # popped in order
                for name in names:
                    child = os.path.join(lpath, name)
                    if not _utf8(name):
                        skipped.append(Skipped(child, "name is not valid UTF-8"))
                        continue
                    todo.append((child, _remote_join(rpath, name), (*above, key)))
            else:
                skipped.append(Skipped(lpath, special_reason(_KINDS.get(statmod.S_IFMT(mode), ""))))
        except OSError as exc:
            if lpath == local:
                raise
            skipped.append(Skipped(lpath, exc.strerror or str(exc)))
    return items, skipped


def local_size(local: str, follow_symlinks: bool = False) -> int:
    """Bytes an upload of `local` sends (for a progress bar)."""
    items, _ = plan_upload(local, "", follow_symlinks)
    return sum(i.size for i in items)


# -- downloads ------------------------------------------------------------------
def relative_name(base: str, entry: FileInfo) -> str | None:
    """`entry.path` relative to `base`, or None when the agent sent an unsafe name."""
    prefix = base.rstrip("/") + "/"
    if not entry.path.startswith(prefix):
        return None
    rel = entry.path[len(prefix) :]
    parts = rel.split("/")
    if any(p in ("", ".", "..") or "\x00" in p for p in parts):
        return None
    return rel


def local_parent_is_safe(root: str, rel: str) -> bool:
    """True when every directory between `root` and `rel`'s parent is a real directory."""
    path = root
    for part in rel.split("/")[:-1]:
        path = os.path.join(path, part)
        try:
            if not statmod.S_ISDIR(os.lstat(path).st_mode):
                return False
        except FileNotFoundError:
            return False
    return True


def make_local_dir(path: str) -> str | None:
    """Make directory `path` (its parent exists); a symlink in the way is replaced.

    Returns a reason to skip, or None.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.mkdir(path)
        return None
    if statmod.S_ISDIR(st.st_mode):
        return None
    if statmod.S_ISLNK(st.st_mode):
        os.unlink(path)  # never write through it: the directory takes its place
        os.mkdir(path)
        return None
    return "exists on this host and is not a directory"


def make_local_symlink(target: str, path: str, mtime_ns: int = 0) -> str | None:
    """Create symlink `path` -> `target` atomically (replacing a file or link, never a dir)."""
    try:
        if statmod.S_ISDIR(os.lstat(path).st_mode):
            return "exists on this host as a directory"
    except FileNotFoundError:
        pass
    d, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(d, f".{name}.cowork-link-{os.urandom(4).hex()}")
    os.symlink(target, tmp)
    try:
        if mtime_ns and os.utime in os.supports_follow_symlinks:
            os.utime(tmp, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return None


def local_blocker(path: str) -> str | None:
    """Why a downloaded file cannot land at `path` (a directory is there), or None."""
    try:
        if statmod.S_ISDIR(os.lstat(path).st_mode):
            return "exists on this host as a directory"
    except FileNotFoundError:
        pass
    return None


def dir_keys(base: FileInfo, entries: list[FileInfo]) -> dict[str, tuple[int, int]]:
    """Guest path -> (device, inode) of every directory in a listing (for loop checks)."""
    keys = {base.path.rstrip("/") or "/": (base.device, base.inode)}
    for e in entries:
        if e.is_dir:
            keys[e.path] = (e.device, e.inode)
    return keys


def chain(keys: dict[str, tuple[int, int]], base: str, rel: str) -> Iterator[tuple[int, int]]:
    """(device, inode) of the directories from `base` down to `rel`'s parent."""
    path = base.rstrip("/") or "/"
    if path in keys:
        yield keys[path]
    for part in rel.split("/")[:-1]:
        path = f"{path}/{part}"
        if path in keys:
            yield keys[path]


# -- the data plane (host_client.dataplane): file bytes beside gRPC --------------------
_PLANES: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_NONE = object()


def data_plane(conn: Any) -> Any:
    """The DataPlane for a client connection (host_client.api.connection.Connection), or None.

    None when the target has no data path (tcp) or the agent lacks the
    "files.dataplane" capability (an older agent): the caller then streams over
    gRPC. Decided once per connection.
    """
    cached = _PLANES.get(conn)
    if cached is None:
        from cowork.dataplane import CAPABILITY

        from .dataplane import DataPlane

        cached = _NONE
        if CAPABILITY in conn.capabilities() and DataPlane.reachable(conn.target):
            token = dict(conn.metadata)[AUTH_METADATA_KEY].split(" ", 1)[1]
            cached = DataPlane(conn.target, token.encode())
        _PLANES[conn] = cached
    return None if cached is _NONE else cached


def fast_upload(
    conn: Any,
    local: str,
    remote: str,
    items: list[UploadItem],
    skipped: list[Skipped],
    progress: Callable[[int], None] | None,
    resume: bool = False,
) -> TransferResult | None:
    """Upload planned `items` over the data plane; None when there is none (use gRPC).

    One file: its own connection, resumable. A tree: one connection for all of
    it (10,000 small files are a stream, not 10,000 calls).
    """
    from .dataplane import NoDataPlane

    dp = data_plane(conn)
    if dp is None:
        return None
    try:
        if len(items) == 1 and items[0].kind == "file" and items[0].local == local:
            r: TransferResult = dp.upload_file(local, remote, progress=progress, resume=resume)
            r.skipped = skipped
            return r
        r = dp.upload_tree(items, remote, progress)
    except NoDataPlane:
        _PLANES[conn] = _NONE  # this target's path does not reach one: gRPC from now on
        return None
    r.path = remote
    r.skipped = [*skipped, *r.skipped]
    return r


def fast_download(
    conn: Any, remote: str, local: str, progress: Callable[[int], None] | None
) -> TransferResult | None:
    """Download one guest file over the data plane; None when there is none (use gRPC)."""
    from .dataplane import NoDataPlane

    dp = data_plane(conn)
    if dp is None:
        return None
    try:
        _, r = dp.download_file(remote, local, progress)
    except NoDataPlane:
        _PLANES[conn] = _NONE
        return None
    return r  # type: ignore[no-any-return]


def resume_upload(
    conn: Any, local: str, remote: str, progress: Callable[[int], None] | None = None
) -> TransferResult:
    """Continue a cut upload of one file from the agent's last verified offset.

    Needs the data plane (raises Unsupported, naming the capability, without it).
    """
    from cowork.dataplane import CAPABILITY

    from .errors import Unsupported

    dp = data_plane(conn)
    if dp is None:
        raise Unsupported(
            f"agent at {conn.target.spec} has no data plane for this target (capability "
            f"{CAPABILITY!r}; tcp targets have none): --resume needs it",
            "UNIMPLEMENTED",
        )
    if not os.path.isfile(local):
        raise CoworkError(
            f"--resume copies one regular file; {local} is not one", "INVALID_ARGUMENT"
        )
    r: TransferResult = dp.upload_file(local, remote, progress=progress, resume=True)
    return r
