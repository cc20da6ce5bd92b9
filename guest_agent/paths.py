"""Path confinement, done by the kernel on directory file descriptors.

Why not check a string: code in the sandbox owns the workspace and can swap a
directory for a symlink at any moment. A path checked with realpath() and then
used by name is resolved twice, and between the two the agent (root) can be
steered outside the root. So the Files service never reuses a checked string:

1. `PathPolicy.locate` normalises the client's path *as text* (made absolute
   under the first root; `.` and `..` collapsed like os.path.normpath) and
   finds the root it lies under. A path that is not textually under a root is
   refused before the disk is touched.
2. `PathPolicy.open` opens that root and resolves the rest *relative to the
   root's fd*: with openat2(RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS) where the
   kernel has it (Linux >= 5.6), else with a component-by-component O_NOFOLLOW
   walk (`_walk`) that applies the same rules in user space. The environment
   variable COWORK_FILES_RESOLVER=walk forces the walk (tests cover both);
   the agent's audit line of each Files call names the resolver used.
3. The caller then acts on the final entry through its parent's fd
   (`dir_fd=`, `follow_symlinks=False`, renameat, unlinkat, fchown of an open
   fd), never through a path string again.

Symlink semantics (the same for both resolvers; refusals are PERMISSION_DENIED):

- A symlink met on the way (and the final one for Read, List and
  Stat(follow_symlinks), which act on what the path names) is followed only
  while it stays beneath the root: a *relative* target that does not climb
  out of it. An *absolute* symlink is refused even when it names a place
  inside the root, which is RESOLVE_BENEATH's rule. The alternative,
  RESOLVE_IN_ROOT, would re-anchor "/etc/shadow" at "<root>/etc/shadow" and
  quietly act on a different file than the link names; refusing tells the
  client the truth ("this leaves the workspace").
- A final symlink is never followed by operations on the entry itself: Stat
  reports the link, Write and Symlink replace it, Remove removes it, Rename
  moves it.
- A link the agent creates (Files.Symlink) may point anywhere: its target is
  just a string, and by the rules above the agent never follows it out of
  the root (processes in the sandbox follow it with their own rights).

A directory the agent holds open can still be *moved* by the sandbox while an
operation runs; what the agent then does lands where that directory now is,
which is somewhere the sandbox could write to anyway.

With `unrestricted` (--unrestricted-files) paths resolve from "/" and
symlinks are followed as usual (still through fds).

`resolve()` is the older string check, kept for a process's working
directory: there the process itself runs as the sandbox user, so the
kernel's permission checks, not this module, confine what it does.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat as statmod
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from .errors import AgentError, denied, invalid

# O_PATH is Linux-only; elsewhere directories are opened for reading.
O_PATH: int = getattr(os, "O_PATH", 0)
# Flags to hold a directory as an anchor for *at() calls.
DIR_FLAGS = (O_PATH or os.O_RDONLY) | os.O_DIRECTORY
# Flags to read a directory's entries (scandir needs a real open, not O_PATH).
LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY
# Flags to open a file for reading without blocking on a FIFO or taking a terminal.
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY
# Flags to look at whatever a path names (fstat only).
STAT_FLAGS = O_PATH or READ_FLAGS

_SYS_OPENAT2 = 437  # the same number on every Linux architecture that has it
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
_MAX_SYMLINKS = 40  # the kernel's limit for one lookup
_EAGAIN_RETRIES = 16  # openat2 says EAGAIN when a rename raced a ".." lookup


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64),
        ("mode", ctypes.c_uint64),
        ("resolve", ctypes.c_uint64),
    ]


_libc: ctypes.CDLL | None = None
_openat2_state: bool | None = None  # None = not probed yet


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    """openat2(2) through syscall(2): Python has no wrapper. Raises OSError."""
    assert _libc is not None
    how = _OpenHow(flags | os.O_CLOEXEC, 0, resolve)
    fd = int(
        _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(path)),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
    )
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


def openat2_available() -> bool:
    """Whether this kernel (and any seccomp filter around us) lets openat2 through.

    Probed once: ENOSYS on kernels before 5.6, EPERM/ENOSYS under container
    filters that do not know the call.
    """
    global _libc, _openat2_state
    if _openat2_state is None:
        _openat2_state = False
        if hasattr(os, "O_PATH"):
            try:
                _libc = ctypes.CDLL(None, use_errno=True)
                _libc.syscall.restype = ctypes.c_long
                root = os.open("/", DIR_FLAGS | os.O_CLOEXEC)
                try:
                    os.close(_openat2(root, ".", DIR_FLAGS, _RESOLVE_BENEATH))
                finally:
                    os.close(root)
                _openat2_state = True
            except (OSError, AttributeError):
                _openat2_state = False
    return _openat2_state


def resolver_name() -> str:
    """The default resolver: "openat2" when the kernel has it, else "walk".

    COWORK_FILES_RESOLVER=walk in the agent's environment forces the walk
    (so tests run both on a kernel that has openat2).
    """
    if os.environ.get("COWORK_FILES_RESOLVER", "") == "walk":
        return "walk"
    return "openat2" if openat2_available() else "walk"


@dataclass(frozen=True)
class Location:
    """A client path after lexical normalisation: which root, and the names below it."""

    shown: str  # as the client wrote it (for messages)
    path: str  # absolute and normalised: what FileInfo.path reports
    root: str  # the root it lies under ("/" when unrestricted)
    parts: tuple[str, ...]  # names below the root; () is the root itself

    @property
    def is_root(self) -> bool:
        return not self.parts

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""

    def parent(self) -> Location:
        return Location(self.shown, os.path.dirname(self.path), self.root, self.parts[:-1])

    def prefix(self, n: int) -> Location:
        """The location of the first `n` names below the root."""
        path = os.path.join(self.root, *self.parts[:n]) if n else self.root
        return Location(self.shown, path, self.root, self.parts[:n])

    def child(self, name: str) -> Location:
        return Location(self.shown, os.path.join(self.path, name), self.root, (*self.parts, name))


def escape(loc: Location) -> AgentError:
    return denied(
        f"path outside the workspace roots (through '..', an absolute symlink or a symlink"
        f" that leaves the root): {loc.shown}"
    )


class PathPolicy:
    """Maps client paths to roots, and opens them the confined way (see the module doc)."""

    def __init__(
        self, roots: Sequence[str], unrestricted: bool = False, resolver: str | None = None
    ) -> None:
        """`resolver`: "openat2", "walk", or None for openat2 when the kernel has it."""
        self.roots = [os.path.realpath(r) for r in roots]
        self.unrestricted = unrestricted
        if resolver not in (None, "openat2", "walk"):
            raise ValueError(f"unknown resolver {resolver!r}")
        if resolver == "openat2" and not openat2_available():
            raise ValueError("openat2 is not available here")
        self.resolver = resolver or resolver_name()

    @property
    def default_dir(self) -> str:
        return self.roots[0] if self.roots else "/"

    def _absolute(self, path: str) -> str:
        if not path:
            raise invalid("path is empty")
        if "\x00" in path:
            raise invalid("path contains a NUL byte")
        if not os.path.isabs(path):
            path = os.path.join(self.default_dir, path)
        return os.path.normpath(path)

    def _inside(self, real: str) -> bool:
        if self.unrestricted:
            return True
        return any(real == r or real.startswith(r.rstrip("/") + "/") for r in self.roots)

    def resolve(self, path: str) -> str:
        """Fully resolved path (symlinks followed), which must be inside a root.

        A string check, so only for what the kernel confines anyway (a process's
        cwd); the Files service uses `locate` + `open`.
        """
        absolute = self._absolute(path)
        real = os.path.realpath(absolute)
        if not self._inside(real):
            raise denied(f"path outside the workspace roots: {path}")
        return real

    def is_root(self, real: str) -> bool:
        return real in self.roots

    # -- the fd-based side, for the Files service --------------------------------
    def locate(self, path: str) -> Location:
        """Normalise `path` as text and pick its root; PERMISSION_DENIED if under none."""
        absolute = self._absolute(path)
        if absolute.startswith("//"):  # POSIX keeps a leading "//"; it means "/" here
            absolute = "/" + absolute.lstrip("/")
        best = ""
        for r in self.roots:
            if (absolute == r or absolute.startswith(r.rstrip("/") + "/")) and len(r) > len(best):
                best = r
        if not best:
            if not self.unrestricted:
                raise denied(f"path outside the workspace roots: {path}")
            best = "/"
        rest = absolute[len(best) :].strip("/")
        return Location(path, absolute, best, tuple(rest.split("/")) if rest else ())

    def open_root(self, loc: Location) -> int:
        """An fd on the root `loc` lies under (the operator's directory: trusted)."""
        return os.open(loc.root, DIR_FLAGS | os.O_CLOEXEC)

    def open(self, loc: Location, flags: int) -> int:
        """Open what `loc` names with `flags`, following symlinks only beneath the root.

        The caller owns (and closes) the fd. Raises OSError for what the file
        system says (ENOENT, ENOTDIR, ...) and AgentError(PERMISSION_DENIED)
        for a path that would leave the root.
        """
        if self.unrestricted:
            return os.open(loc.path, flags | os.O_CLOEXEC)
        root = self.open_root(loc)
        try:
            if not loc.parts:
                if flags == DIR_FLAGS:
                    fd, root = root, -1
                    return fd
                return os.open(".", flags | os.O_CLOEXEC, dir_fd=root)
            if self.resolver == "openat2":
                return _open_beneath(root, loc, flags)
            return _walk(root, loc, flags)
        finally:
            if root >= 0:
                os.close(root)

    def open_parent(self, loc: Location) -> int:
        """A directory fd on the parent of `loc` (which must not be a root itself)."""
        assert loc.parts, "a root has no parent inside the workspace"
        return self.open(loc.parent(), DIR_FLAGS)


def _open_beneath(root: int, loc: Location, flags: int) -> int:
    rel = "/".join(loc.parts)
    for _ in range(_EAGAIN_RETRIES):
        try:
            return _openat2(root, rel, flags, _RESOLVE_BENEATH | _RESOLVE_NO_MAGICLINKS)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise escape(loc) from None
            if exc.errno != errno.EAGAIN:
                raise
    raise AgentError(
        grpc.StatusCode.ABORTED,
        f"the workspace kept changing during the lookup (renames racing it); retry: {loc.shown}",
    )


def _walk(root: int, loc: Location, flags: int) -> int:
    """openat2(RESOLVE_BENEATH)'s rules in user space, one O_NOFOLLOW step at a time.

    `stack` holds the directories walked so far (the root is borrowed, the
    rest are ours), so a ".." from a symlink target goes back to the directory
    actually walked through, and a ".." at the root is an escape.
    """
    todo = deque(loc.parts)
    stack: list[int] = []
    links = 0
    try:
        while todo:
            name = todo.popleft()
            if name in ("", "."):
                continue
            if name == "..":
                if not stack:
                    raise escape(loc)
                os.close(stack.pop())
                continue
            cur = stack[-1] if stack else root
            last = not todo
            want = flags if last else DIR_FLAGS
            try:
                fd = os.open(name, want | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                fd = -1
                mode = os.lstat(name, dir_fd=cur).st_mode
                if not statmod.S_ISLNK(mode):
                    if exc.errno == errno.ENOTDIR and not statmod.S_ISDIR(mode):
                        raise  # a file where a directory is needed
                    # Not a link any more (it was one at the open): look again.
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise
                    todo.appendleft(name)
                    continue
            # O_PATH|O_NOFOLLOW opens a symlink itself rather than failing.
            is_o_path = want & O_PATH and not want & os.O_DIRECTORY
            if fd >= 0 and is_o_path and statmod.S_ISLNK(os.fstat(fd).st_mode):
                os.close(fd)
                fd = -1
            if fd >= 0:
                if last:
                    return fd
                stack.append(fd)
                continue
            links += 1
            if links > _MAX_SYMLINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), loc.shown)
            try:
                target = os.readlink(name, dir_fd=cur)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: no longer a link (raced): look again
                    raise
                todo.appendleft(name)
                continue
            if target.startswith("/"):
                raise escape(loc)
            todo.extendleft(reversed(target.split("/")))
            if not todo:  # "" target: the kernel says ENOENT
                raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), loc.shown)
        # Only "." and "..": the directory we ended in.
        cur = stack[-1] if stack else root
        return os.open(".", flags | os.O_CLOEXEC, dir_fd=cur)
    finally:
        for fd in stack:
            os.close(fd)
