"""The second wall: who a process runs as, and the bubblewrap box it runs in.

Shape of a sandboxed launch (the agent is root in the VM):

    bwrap --die-with-parent --unshare-{pid,ipc,uts,net,cgroup-try} --ro-bind / / ...
          --seccomp FD --info-fd FD --block-fd FD [--new-session]
      -- [setsid --ctty] setpriv --reuid U --regid G --init-groups
             --inh-caps=-all --bounding-set=-all --no-new-privs -- EXE ARGS

Why these choices:
- bwrap runs as root (no user namespace) so that files the process writes are
  owned by the real sandbox user; the switch to that user is done inside the box
  by util-linux setpriv, which also empties every capability set. (Popen(user=)
  would fork the multi-threaded agent in Python: see claude._spawn.)
- The command is a session leader inside the box (`--new-session`, or setsid
  --ctty for a PTY), so the agent signals *its* process group for a graceful
  stop, and kills bwrap (hence the whole pid namespace) to finish.
- The box's network namespace has only loopback. bwrap waits on --block-fd
  until the agent has opened a listener *inside* that namespace (a thread that
  setns()es, binds 127.0.0.1:3128, and returns); connections to it are served
  by the agent's egress proxy, which applies the domain policy.
- What the agent holds secret (token, sockets, policy, logs) is under paths
  replaced by empty tmpfs mounts; /proc is the box's own, so `ps` shows no agent.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import pwd
import shutil
import socket
import stat
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from .cgroups import Cgroups, RunCgroup
from .errors import AgentError, denied, precondition
from .policy import Limits

PROXY_PORT = 3128
# The API relay's port inside a box (api_relay.py): the run's ANTHROPIC_BASE_URL.
RELAY_PORT = 3129
RELAY_URL = f"http://127.0.0.1:{RELAY_PORT}"
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
NO_PROXY = "localhost,127.0.0.1,::1"
SANDBOX_HOSTNAME = "cowork-sandbox"
CLONE_NEWNET = 0x40000000
# Always hidden from the box, whatever the configuration says.
ALWAYS_HIDDEN = ("/etc/cowork", "/run", "/root", "/home", "/var/log")


@dataclass(frozen=True)
class RunUser:
    name: str
    uid: int
    gid: int
    home: str
    shell: str

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


def lookup_user(run_as: str | None) -> RunUser:
    """`run_as` (name or uid), or the agent's own user; FAILED_PRECONDITION if unknown."""
    try:
        if run_as:
            entry = pwd.getpwuid(int(run_as)) if run_as.isdigit() else pwd.getpwnam(run_as)
        else:
            entry = pwd.getpwuid(os.geteuid())
    except KeyError:
        raise AgentError(
            grpc.StatusCode.FAILED_PRECONDITION, f"--run-as user does not exist: {run_as}"
        ) from None
    return RunUser(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir, entry.pw_shell)


@dataclass(frozen=True)
class Identity:
    """Who processes run as. `mode`: user (a dedicated account), root (--allow-root), self."""

    user: RunUser
    mode: str

    def describe(self) -> str:
        if self.mode == "user":
            return f"user {self.user.name} (uid {self.user.uid})"
        if self.mode == "root":
            return "root (allowed by --allow-root)"
        return f"the agent's own user {self.user.name} (agent is not root)"


def resolve_identity(run_as: str | None, allow_root: bool) -> Identity:
    """The identity the agent will use; raise SystemExit-worthy AgentError if unsafe."""
    if os.geteuid() != 0:
        me = lookup_user(None)
        if run_as and lookup_user(run_as).uid != me.uid:
            raise precondition(f"--run-as {run_as} needs the agent to run as root")
        return Identity(me, "self")
    if run_as:
        user = lookup_user(run_as)
        if user.uid == 0:
            if not allow_root:
                raise precondition("--run-as root needs --allow-root")
            return Identity(user, "root")
        return Identity(user, "user")
    if not allow_root:
        raise precondition(
            "the agent runs as root: give --run-as USER (a dedicated unprivileged user) "
            "or --allow-root to run processes as root"
        )
    return Identity(lookup_user(None), "root")


def require_tool(name: str) -> str:
    """Absolute path of a helper the agent execs (bwrap, setpriv, setsid).

    Exec'ing small helpers instead of a Popen preexec_fn keeps Python out of
    the fork-to-exec window of the multi-threaded agent (that crashed: SIGSEGV
    in the child); FAILED_PRECONDITION names the package when one is missing.
    """
    found = shutil.which(name) or f"/usr/bin/{name}"
    if not os.path.exists(found):
        package = "bubblewrap" if name == "bwrap" else "util-linux"
        raise precondition(f"the agent needs {name} (Debian/Ubuntu package: {package})")
    return found


def drop_to(user: RunUser) -> list[str]:
    """argv prefix that becomes `user` with no capabilities (empty when already that user)."""
    if user.is_self:
        return []
    return [
        require_tool("setpriv"),
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--init-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


@dataclass
class Launch:
    """A command line ready for Popen plus what the agent must do around it."""

    argv: list[str]
    env: dict[str, str]
    pass_fds: tuple[int, ...] = ()
    # Parent ends: bwrap's --info-fd (read) and --block-fd (write); None when not boxed.
    info_r: int | None = None
    block_w: int | None = None
    # Child ends, closed by the parent once the child is started.
    child_fds: list[int] = field(default_factory=list)
    # The run's cgroup (limits): its own, removed when the run is over, unless
    # `owns_cgroup` is False (a named box's, shared by the box's runs).
    cgroup: RunCgroup | None = None
    owns_cgroup: bool = True
    # Serves the run's API relay listener (127.0.0.1:RELAY_PORT in the box), if any.
    relay: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] | None = None

    def close_child_fds(self) -> None:
        for fd in self.child_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.child_fds = []

    def abandon(self) -> None:
        """The child never started: release the parent's ends and the run's cgroup."""
        self.close_parent_fds()
        if self.cgroup is not None and self.owns_cgroup:
            self.cgroup.remove()
        self.cgroup = None

    def close_parent_fds(self) -> None:
        for fd in (self.info_r, self.block_w):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.info_r = self.block_w = None


class Boxed:
    """A started sandbox: finds the command inside it and owns its network bridge."""

    def __init__(self, bwrap_pid: int) -> None:
        self.bwrap_pid = bwrap_pid
        self.init_pid: int | None = None  # the box's pid 1 (bwrap's reaper), host numbering
        self._command: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self.relay_server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    def serving(
        self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        """`handler`, with each connection's task remembered so that close() can end it."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._connections.add(task)
            try:
                await handler(reader, writer)
            finally:
                self._connections.discard(task)

        return serve

    def command_group(self) -> int | None:
        """Host id of the command's process group inside the box, once the command exists.

        Non-PTY, bwrap's --new-session puts the box's reaper and the command in
        one new session and group; with a PTY, setsid --ctty gives the command
        its own. Either way the group of the reaper's first child is the one
        that job control (and a graceful stop) must signal.
        """
        if self._command is None and self.init_pid is not None:
            try:
                with open(f"/proc/{self.init_pid}/task/{self.init_pid}/children") as f:
                    kids = f.read().split()
                if kids:
                    self._command = os.getpgid(int(kids[0]))
            except OSError:
                pass
        return self._command

    def close(self) -> None:
        """Stop the box's proxy listener and end its connections still in flight.

        Closing a server leaves its accepted connections running (before Python
        3.13); a request the box made just before it ended would otherwise hold
        an upstream connection for as long as the origin keeps it open.
        """
        for server in (self.server, self.relay_server):
            if server is not None:
                server.close()
        self.server = self.relay_server = None
        for task in self._connections:
            task.cancel()
        self._connections.clear()


def _setns_listener(ns_path: str, ports: tuple[int, ...] = (PROXY_PORT,)) -> list[socket.socket]:
    """TCP listeners on 127.0.0.1:PORT (each of `ports`) created inside the network namespace
    `ns_path`.

    setns(CLONE_NEWNET) changes only the calling thread, and a socket keeps the
    namespace it was created in, so a fresh thread switches and then simply ends
    (nothing needs switching back). The join takes well under a millisecond.
    """
    result: dict[str, Any] = {}

    def work() -> None:
        try:
            target = os.open(ns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(target, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(target)
            made: list[socket.socket] = []
            result["socks"] = made
            for port in ports:
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                made.append(s)
                s.setsockopt(socket.SOL_IP, 15, 1)  # IP_FREEBIND: lo may not be up yet
                s.bind(("127.0.0.1", port))
                s.listen(64)
                s.setblocking(False)
        except BaseException as exc:
            result["error"] = exc

    t = threading.Thread(target=work, name="cowork-netns")
    t.start()
    t.join()
    socks: list[socket.socket] = result.get("socks", [])
    if "error" in result:
        for s in socks:
            s.close()
        raise result["error"]
    return socks


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


@dataclass
class _Layout:
    """The box's view of the file system: tmpfs'd directories, /dev/null'd files, binds."""

    emptied: list[str] = field(default_factory=list)
    hidden_files: list[str] = field(default_factory=list)
    binds: list[tuple[str, str]] = field(default_factory=list)  # (--bind|--ro-bind|--tmpfs, path)


def executable_by(path: str, user: RunUser) -> bool:
    """Whether `user` may execute the regular file `path` (root: any execute bit)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if user.uid == 0:
        return bool(st.st_mode & 0o111)
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    try:
        groups = os.getgrouplist(user.name, user.gid)
    except OSError:
        groups = [user.gid]
    if st.st_gid in groups:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


@dataclass
class Sandbox:
    """Builds launches for one agent: identity + (optionally) bubblewrap + egress bridge."""

    identity: Identity
    roots: list[str]
    mode: Callable[[], str]  # "none" | "bwrap", read per launch (the policy can change)
    hidden: list[str] = field(default_factory=list)
    # Serves one client connection of the box's proxy listener (the egress proxy).
    proxy_handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any] | None = None
    # cgroup v2 limits: the agent's subtree, and the policy's (defaults, ceiling).
    cgroups: Cgroups | None = None
    limits: Callable[[], tuple[Limits, Limits]] | None = None
    # Directories the box must see read-only even under a hidden or private path
    # (the Claude CLI the agent runs, wherever it was installed).
    read_only: list[str] = field(default_factory=list)

    def effective_limits(self, asked: Limits | None) -> Limits:
        """What a run gets: what it asked for (else the policy default), capped by the maximum."""
        if self.limits is None:
            return Limits()
        default, ceiling = self.limits()
        asked = asked or Limits()
        want = Limits(
            memory_bytes=asked.memory_bytes or default.memory_bytes,
            pids=asked.pids or default.pids,
            cpus=asked.cpus or default.cpus,
        )
        return want.capped(ceiling)

    def _layout(self) -> _Layout:
        """What the box hides and what it shows again (one source for _launch and visible)."""
        layout = _Layout(emptied=["/tmp", "/var/tmp"])
        for path in dict.fromkeys([*ALWAYS_HIDDEN, *self.hidden]):
            if path == "/" or _under_any(path, layout.emptied):
                continue  # already out of sight
            if os.path.isdir(path):
                layout.emptied.append(path)
            elif os.path.exists(path):
                layout.hidden_files.append(path)
        user = self.identity.user
        if self.identity.mode == "user":
            home = user.home
            layout.binds.append(("--bind" if os.path.isdir(home) else "--tmpfs", home))
        layout.binds += [("--bind", root) for root in self.roots]
        layout.binds += [("--ro-bind", path) for path in self.read_only if os.path.isdir(path)]
        return layout

    def visible(self, path: str) -> bool:
        """Whether `path` (absolute) exists as itself inside a box of the current policy."""
        real = os.path.realpath(path)
        if not os.path.exists(real):
            return False
        if self.mode() != "bwrap":
            return True
        layout = self._layout()
        for how, shown in layout.binds:
            if real == shown or real.startswith(shown.rstrip("/") + "/"):
                return how != "--tmpfs" or real == shown
        return real not in layout.hidden_files and not _under_any(real, layout.emptied)

    def which(self, name: str, path_var: str, cwd: str) -> str:
        """Where a run finds command `name` (no slash): the process's PATH, searched as the
        run's user would, in the box when there is one; NOT_FOUND or PERMISSION_DENIED.

        The agent's own view is not the run's: a directory the box hides, or a file
        the run's user may not execute, would fail only after the wrapper started.
        """
        blocked = ""
        for entry in path_var.split(os.pathsep):
            candidate = os.path.join(cwd, entry or ".", name)  # relative entries: to cwd
            if not os.path.isfile(candidate) or not self.visible(candidate):
                continue
            if not executable_by(candidate, self.identity.user):
                blocked = blocked or candidate
                continue
            return candidate
        if blocked:
            raise denied(
                f"permission denied: {name} ({blocked} is not executable by "
                f"{self.identity.user.name})"
            )
        raise AgentError(grpc.StatusCode.NOT_FOUND, f"command not found: {name}")

    def check_runnable(self, path: str, name: str) -> None:
        """A command given with a slash: there for the run, and executable by its user."""
        if not self.visible(path):
            raise AgentError(grpc.StatusCode.NOT_FOUND, f"command not found: {name}")
        if not executable_by(path, self.identity.user):
            raise denied(f"permission denied: {name} (not executable by {self.identity.user.name})")

    def launch(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        pty: bool,
        limits: Limits | None = None,
        mode: str | None = None,
        cgroup: RunCgroup | None = None,
        home: str | None = None,
    ) -> Launch:
        """The command line that runs `argv` (argv[0] absolute) as configured; `mode` (the
        policy's sandbox mode, read by the caller) when the caller's env depends on it;
        `cgroup` to run in an existing cgroup (a named box's) instead of one of its own;
        `home`: a directory the box shows as the user's home instead of the real one."""
        launch = self._launch(argv, env, cwd, pty, mode or self.mode(), home)
        if cgroup is not None:  # a named box's: shared by its runs, removed with the box
            launch.cgroup, launch.owns_cgroup = cgroup, False
            launch.argv = cgroup.prefix() + launch.argv
        elif self.cgroups is not None and self.cgroups.available:
            try:
                launch.cgroup = self.cgroups.create_run(self.effective_limits(limits))
            except OSError as exc:
                launch.close_parent_fds()
                launch.close_child_fds()
                raise AgentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot create the run's cgroup: {exc}"
                ) from None
            if launch.cgroup is not None:
                launch.argv = launch.cgroup.prefix() + launch.argv
        return launch

    def run_env(self, env: dict[str, str], mode: str) -> dict[str, str]:
        """`env` as a run sees it: its user's HOME/USER, and in a box the egress proxy."""
        user = self.identity.user
        env = dict(env)
        if self.identity.mode == "user":
            env.update(HOME=user.home, USER=user.name, LOGNAME=user.name)
        if mode == "bwrap":
            env.update(
                HTTP_PROXY=PROXY_URL,
                HTTPS_PROXY=PROXY_URL,
                http_proxy=PROXY_URL,
                https_proxy=PROXY_URL,
                NO_PROXY=NO_PROXY,
                no_proxy=NO_PROXY,
            )
        return env

    def _launch(
        self,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
        pty: bool,
        mode: str,
        home: str | None = None,
    ) -> Launch:
        user = self.identity.user
        env = self.run_env(env, mode)
        if mode != "bwrap":
            inner = drop_to(user) + argv
            if pty:
                inner = [require_tool("setsid"), "--ctty", *inner]
            return Launch(argv=inner, env=env)
        from . import seccomp

        info_r, info_w = os.pipe2(os.O_CLOEXEC)
        block_r, block_w = os.pipe2(os.O_CLOEXEC)
        try:
            seccomp_fd = seccomp.filter_fd()
        except BaseException:
            for fd in (info_r, info_w, block_r, block_w):
                os.close(fd)
            raise
        box = [
            require_tool("bwrap"),
            "--die-with-parent",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-net",
            "--unshare-cgroup-try",
            "--hostname",
            SANDBOX_HOSTNAME,
            "--ro-bind",
            "/",
            "/",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--perms",
            "1777",
            "--tmpfs",
            "/tmp",
            "--perms",
            "1777",
            "--tmpfs",
            "/var/tmp",
        ]
        layout = self._layout()
        emptied = ["/tmp", "/var/tmp"]  # directories the box sees as fresh tmpfs
        for path in layout.emptied[len(emptied) :]:
            box += ["--tmpfs", path]
            emptied.append(path)
        for path in layout.hidden_files:
            box += ["--ro-bind", "/dev/null", path]
        made: set[str] = set()
        for how, path in layout.binds:
            # Parents created inside a tmpfs must be traversable by the user.
            for parent in _ancestors(path):
                if parent not in made and _under_any(parent, emptied):
                    box += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            if how == "--tmpfs":
                box += [how, path]
            elif home is not None and path == self.identity.user.home:
                box += ["--bind", home, path]  # a named box's own home
            else:
                box += [how, path, path]
        box += ["--chdir", cwd]
        if self.identity.mode == "root":
            box += ["--cap-drop", "ALL"]
        box += ["--seccomp", str(seccomp_fd), "--info-fd", str(info_w), "--block-fd", str(block_r)]
        if not pty:
            box.append("--new-session")
        box.append("--")
        inner = drop_to(user) + argv
        if pty:
            inner = [require_tool("setsid"), "--ctty", *inner]
        for fd in (seccomp_fd, info_w, block_r):
            os.set_inheritable(fd, True)
        return Launch(
            argv=box + inner,
            env=env,
            pass_fds=(seccomp_fd, info_w, block_r),
            info_r=info_r,
            block_w=block_w,
            child_fds=[seccomp_fd, info_w, block_r],
        )

    async def activate(self, launch: Launch, bwrap_pid: int) -> Boxed | None:
        """After Popen: learn the box's pid 1, open its proxy listener, let it run."""
        if launch.info_r is None or launch.block_w is None:
            return None
        box = Boxed(bwrap_pid)
        try:
            data = await _read_until_eof_or_json(launch.info_r)
            try:
                box.init_pid = int(json.loads(data)["child-pid"])
            except (ValueError, KeyError, TypeError):
                # bwrap refused to start (its reason is on the process's stderr,
                # and its exit code follows): nothing to bridge.
                return box
            ports: tuple[int, ...] = (PROXY_PORT,) if self.proxy_handler is not None else ()
            if launch.relay is not None:
                ports += (RELAY_PORT,)
            socks = _setns_listener(f"/proc/{box.init_pid}/ns/net", ports) if ports else []
            try:
                if self.proxy_handler is not None:
                    box.server = await asyncio.start_server(
                        box.serving(self.proxy_handler), sock=socks.pop(0)
                    )
                if launch.relay is not None:
                    box.relay_server = await asyncio.start_server(
                        box.serving(launch.relay), sock=socks.pop(0)
                    )
            finally:
                for s in socks:  # not handed to a server (one failed to start)
                    s.close()
            try:
                os.write(launch.block_w, b"1")
            except BrokenPipeError:
                pass  # the box is already gone; its exit is reported as usual
        except BaseException:
            box.close()
            raise
        finally:
            launch.close_parent_fds()
        return box


def install_dir(exe: str) -> str:
    """The directory an executable needs whole: an npm prefix's node_modules, else its own."""
    real = os.path.realpath(exe)
    for candidate in (os.path.abspath(exe), real):
        head, sep, _ = candidate.partition("/node_modules/")
        if sep:
            return head + "/node_modules"
    return os.path.dirname(real)


def _under_any(path: str, dirs: list[str]) -> bool:
    """True when `path` lies strictly below one of `dirs`."""
    return any(path != d and path.startswith(d.rstrip("/") + "/") for d in dirs)


def _ancestors(path: str) -> list[str]:
    """'/a/b/c' -> ['/a', '/a/b'] (outermost first, without the path itself)."""
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


async def _read_until_eof_or_json(fd: int) -> bytes:
    """bwrap writes `{"child-pid": N}` to --info-fd and closes it only at exit: read one object."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            fut: asyncio.Future[None] = loop.create_future()

            def ready(fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, ready)
            try:
                await fut
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return buf
        buf += chunk
        if buf.rstrip().endswith(b"}"):
            return buf
