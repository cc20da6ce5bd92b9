"""Named boxes: long-lived sandboxes that many execs run in (issue #12).

A box is one bubblewrap sandbox started once (its namespaces, private /tmp, egress
bridge) in a cgroup of its own with the box's limits; its first process is
box_init.py, which forks every command the agent asks for *inside* the box, so a
joined process inherits the box's user, empty capabilities, no_new_privs, seccomp
filter, namespaces and cgroup instead of having them re-applied from outside (see
box_init.py for why). Under `sandbox: none` a box is only a name and a cgroup: its
execs run like any other, placed in the box's cgroup.

What the agent trusts of the box's first process: nothing it could not do anyway.
The box's code runs as the same user and may take it over, so every message is
bounded and parsed defensively; the pid it names comes with a pidfd whose process
must be in the box's pid namespace; signals it is asked to send reach only the box
(it has no other processes in sight); an exit status is only as true as the
command's own, which the box controls in any case. If it dies or talks nonsense the
box is gone: its runs end with "box gone", and `box rm` / the agent's stop kill
bubblewrap, which takes the whole pid namespace with it.

The lifecycle of a command in a box differs from a run of its own on one point: what
the command leaves running after it exits (a server started with `&`, nohup,
setsid) belongs to the box and keeps running until the box is removed. A command
whose stream ends early (cancel, timeout, kill) is stopped with its process group.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cowork.agent.v1 import box_pb2 as bpb
from cowork.agent.v1 import box_pb2_grpc as bpb_grpc
from cowork.agent.v1 import process_pb2 as pb

from . import box_init
from .api_relay import ApiRelay, Endpoint
from .cgroups import RunCgroup
from .errors import AgentError, invalid, not_found, precondition
from .fdio import write_all
from .policy import BoxLimits, Limits
from .reaper import REAPER, Run
from .rpc import Context, audit
from .sandbox import Boxed, Sandbox, executable_by

log = logging.getLogger("cowork.boxes")

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
# How long a new box's first process may take to say it is ready (Python's start).
READY_SECONDS = 30.0
# Once a command's pidfd says it ended, how long its exit report may still take.
EXIT_REPORT_SECONDS = 2.0
# Largest message the box's first process may send (its replies are small).
MAX_REPLY = 4096
with open(box_init.__file__, "rb") as _f:
    _SOURCE = _f.read()


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise invalid(
            f"invalid box name {name!r}: 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit"
        )


@dataclass
class Child:
    """A command the box's first process started, as the agent knows it."""

    box_pid: int
    host_pid: int
    pidfd: int
    report: asyncio.Future[int]  # the wait status, from the box


@dataclass(eq=False)
class Box:
    """One named box. Under `sandbox: none` it has no process of its own (`popen` None)."""

    name: str
    mode: str
    limits: Limits
    cgroup: RunCgroup | None
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    popen: subprocess.Popen[bytes] | None = None
    boxed: Boxed | None = None
    run: Run | None = None
    sock: socket.socket | None = None
    pid_ns: str = ""
    state: str = "ready"
    reason: str = ""
    active: int = 0  # commands going in it now
    runs: int = 0  # commands it has run
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    _children: dict[int, Child] = field(default_factory=dict)
    _reports: dict[int, asyncio.Future[int]] = field(default_factory=dict)
    _reader: asyncio.Future[None] | None = None
    _send_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Runs in it that reach the Claude API through its relay listener, by placeholder.
    routes: dict[str, Endpoint] = field(default_factory=dict)
    # Its own home for the sandbox user (empty at first), so that boxes share no files
    # outside the workspace; removed with the box.
    home: str | None = None

    @property
    def alive(self) -> bool:
        return self.state == "ready"

    def touch(self) -> None:
        self.last_used = time.monotonic()

    def info(self) -> bpb.BoxInfo:
        procs = self.cgroup.procs() if self.cgroup is not None else []
        msg = bpb.BoxInfo(
            name=self.name,
            state=self.state,
            sandbox=self.mode,
            created_at=self.created_at,
            idle_seconds=0.0 if self.active else time.monotonic() - self.last_used,
            active=self.active,
            runs=self.runs,
            processes=len(procs),
            pid=self.popen.pid if self.popen is not None else 0,
            reason=self.reason,
        )
        msg.limits.CopyFrom(
            pb.ResourceLimits(
                memory_bytes=self.limits.memory_bytes, pids=self.limits.pids, cpus=self.limits.cpus
            )
        )
        return msg

    # -- the box's first process ------------------------------------------------------
    async def _send(self, obj: dict[str, Any], fds: list[int]) -> None:
        sock = self.sock
        if sock is None or not self.alive:
            raise self.gone_error()
        data = json.dumps(obj).encode()
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        loop = asyncio.get_running_loop()
        async with self._send_lock:
            while True:
                try:
                    sock.sendmsg([data], anc)
                    return
                except BlockingIOError:
                    fut: asyncio.Future[None] = loop.create_future()
                    loop.add_writer(sock.fileno(), fut.set_result, None)
                    try:
                        await fut
                    finally:
                        loop.remove_writer(sock.fileno())
                except OSError as exc:
                    self._lost(f"its first process stopped answering ({exc.strerror})")
                    raise self.gone_error() from None

    def gone_error(self) -> AgentError:
        return AgentError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"box {self.name} is gone: {self.reason or 'removed'}",
        )

    async def _read_loop(self) -> None:
        """Messages from the box: readiness, started commands, their exits."""
        sock = self.sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        try:
            while True:
                fut: asyncio.Future[None] = loop.create_future()
                loop.add_reader(fd, resolve_waiter, fut)
                try:
                    await fut
                finally:
                    loop.remove_reader(fd)
                while True:
                    try:
                        msg, fds = _recv(sock)
                    except BlockingIOError:
                        break
                    if msg is None:
                        self._lost("its first process ended")
                        return
                    self._on_message(msg, fds)
        except OSError as exc:
            self._lost(f"reading from it failed ({exc.strerror})")

    def _on_message(self, msg: Any, fds: list[int]) -> None:
        try:
            if not isinstance(msg, dict):
                raise ValueError("not an object")
            if "exit" in msg:
                report = self._reports.get(int(msg["exit"]))
                status = int(msg["status"])
                if report is not None and not report.done():
                    report.set_result(status)
            elif "id" in msg:
                waiter = self._pending.pop(int(msg["id"]), None)
                if (waiter is None or waiter.done()) and "pid" in msg:
                    # Started for a call that has gone meanwhile (cancelled during its
                    # start): nobody will stop it, so it goes now.
                    self._send_signal(int(msg["pid"]), signal.SIGKILL)
                elif waiter is not None and not waiter.done():
                    if fds:
                        msg["_pidfd"] = fds.pop(0)
                    if "pid" in msg:
                        # Its exit may be the very next message: be ready for it now.
                        report = asyncio.get_running_loop().create_future()
                        self._reports[int(msg["pid"])] = msg["_report"] = report
                    waiter.set_result(msg)
            elif "ready" in msg:
                waiter = self._pending.pop(0, None)
                if waiter is not None and not waiter.done():
                    waiter.set_result(msg)
        except (ValueError, TypeError, KeyError, OverflowError):
            log.warning("box %s: unreadable message from its first process", self.name)
        finally:
            for fd in fds:
                os.close(fd)

    def _lost(self, reason: str) -> None:
        """The box's first process is gone or broken: nothing more can start in it."""
        if self.state != "ready":
            return
        self.state, self.reason = "gone", reason
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(self.gone_error())
        self._pending.clear()
        for report in self._reports.values():
            if not report.done():
                report.set_result(-1)

    async def start_process(
        self, exe: str, argv: list[str], env: dict[str, str], cwd: str, pty: bool, stdio: list[int]
    ) -> Child:
        """Have the box start a command on `stdio` (its ends: stdin, stdout, stderr / tty)."""
        spec = json.dumps({"exe": exe, "argv": argv, "env": env, "cwd": cwd}).encode()
        memfd = os.memfd_create("cowork-spec", os.MFD_CLOEXEC)
        try:
            write_all(memfd, spec)
            rid = next(self._ids)
            waiter: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[rid] = waiter
            try:
                await self._send({"op": "spawn", "id": rid, "pty": pty}, [memfd, *stdio])
                reply = await waiter
            finally:
                self._pending.pop(rid, None)
        finally:
            os.close(memfd)
        pidfd = reply.get("_pidfd")
        if "error" in reply:
            if pidfd is not None:
                os.close(pidfd)
            raise _start_error(reply, argv[0], cwd)
        try:
            box_pid = int(reply["pid"])
            report = reply["_report"]
            if pidfd is None:
                raise ValueError("no pidfd")
            host_pid = self._host_pid(pidfd)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            if pidfd is not None:
                os.close(pidfd)
            self._lost(f"its first process answered nonsense ({exc!r})")
            await self.kill()
            raise self.gone_error() from None
        child = Child(box_pid, host_pid, pidfd, report)
        self._children[box_pid] = child
        return child

    def _host_pid(self, pidfd: int) -> int:
        """The agent's pid of the process `pidfd` (from the box) refers to, 0 if it has
        already ended (a quick command); a live one must be in the box's pid namespace
        (a pidfd of anything else is nonsense from the box: ValueError)."""
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            fields = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        host_pid = int(fields["Pid"].strip())  # KeyError: not a pidfd
        if host_pid <= 0:
            return 0
        try:
            ns = os.readlink(f"/proc/{host_pid}/ns/pid")
        except (FileNotFoundError, ProcessLookupError):
            return 0  # ended meanwhile
        if ns != self.pid_ns:
            raise ValueError(f"pid {host_pid} is not in the box")
        return host_pid

    def forget(self, child: Child) -> None:
        self._children.pop(child.box_pid, None)
        self._reports.pop(child.box_pid, None)
        with contextlib.suppress(OSError):
            os.close(child.pidfd)

    def _send_signal(self, pgid: int, sig: int) -> None:
        if self.sock is None or not self.alive:
            return
        data = json.dumps({"op": "signal", "pgid": pgid, "sig": sig}).encode()
        with contextlib.suppress(OSError):
            self.sock.send(data, socket.MSG_DONTWAIT)

    def signal_group(self, child: Child, sig: int) -> None:
        """Signal the command's process group, from inside the box (fire and forget)."""
        self._send_signal(child.box_pid, sig)
        if sig == signal.SIGKILL and not child.report.done():
            # Whatever the box's first process does, the command itself dies.
            with contextlib.suppress(OSError):
                signal.pidfd_send_signal(child.pidfd, sig)

    async def kill(self) -> None:
        """End the box: every process in it, its bridge, its cgroup."""
        self._lost("removed")
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)  # bwrap: its pid namespace ends
            with contextlib.suppress(ProcessLookupError):
                self.popen.kill()
            await asyncio.get_running_loop().run_in_executor(None, self.popen.wait)
            REAPER.untrack(self.popen.pid)
        if self.run is not None:
            REAPER.end_run(self.run)
            self.run = None
        for endpoint in list(self.routes.values()):
            endpoint.close()
        if self.boxed is not None:
            self.boxed.close()
            self.boxed = None
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for child in list(self._children.values()):
            self.forget(child)
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None
        if self.home is not None:
            shutil.rmtree(os.path.dirname(self.home), ignore_errors=True)
            self.home = None


def resolve_waiter(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _recv(sock: socket.socket) -> tuple[Any, list[int]]:
    """One message and its fds; (None, []) at EOF; BlockingIOError when there is none."""
    fds = array.array("i")
    data, anc, flags, _ = sock.recvmsg(MAX_REPLY, socket.CMSG_SPACE(4 * fds.itemsize))
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data and not fds:
        return None, []
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        return {}, list(fds)  # oversized: dropped (its fds closed by the caller)
    try:
        return json.loads(data), list(fds)
    except ValueError:
        return {}, list(fds)


def _start_error(reply: dict[str, Any], name: str, cwd: str) -> AgentError:
    code = reply.get("error")
    where = reply.get("where")
    if where == "chdir":
        if code == errno.ENOENT:
            return not_found(f"working directory not found: {cwd}")
        return AgentError(
            grpc.StatusCode.PERMISSION_DENIED,
            f"cannot enter the working directory {cwd}: {os.strerror(int(code or errno.EIO))}",
        )
    if where == "exec":
        if code == errno.ENOENT:
            return not_found(f"command not found: {name}")
        if code == errno.EACCES:
            return AgentError(grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {name}")
        if code == errno.E2BIG:
            return invalid("argv and environment too big for the OS")
        reason = os.strerror(int(code)) if isinstance(code, int) else "unknown error"
        return AgentError(grpc.StatusCode.FAILED_PRECONDITION, f"cannot start {name}: {reason}")
    return AgentError(
        grpc.StatusCode.RESOURCE_EXHAUSTED if where == "fork" else grpc.StatusCode.INTERNAL,
        f"the box could not start {name} ({where}: {code})",
    )


class Boxes:
    """The agent's named boxes."""

    def __init__(
        self,
        sandbox: Sandbox | None,
        policy: Callable[[], BoxLimits],
        default_dir: Callable[[], str],
        relay: ApiRelay | None = None,
        state_dir: str | None = None,
    ) -> None:
        self.sandbox = sandbox
        self.relay = relay
        # Where the boxes' homes live: on disk (a home can hold Claude's session files).
        self.state_dir = state_dir or os.path.join(
            "/var/tmp", f"cowork-boxes-{os.getpid()}-{os.urandom(3).hex()}"
        )
        self.policy = policy
        self.default_dir = default_dir
        self._boxes: dict[str, Box] = {}
        self._creating: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._sweeps: set[asyncio.Future[Any]] = set()

    def get(self, name: str) -> Box:
        check_name(name)
        box = self._boxes.get(name)
        if box is None:
            raise not_found(f"no box named {name} (`coworkctl box ls` lists them)")
        if not box.alive:
            raise box.gone_error()
        return box

    def for_run(self, name: str, limits: Limits | None) -> Box:
        """The box a run asked to join; INVALID_ARGUMENT when it also asked for limits of
        its own (a box's processes share the box's)."""
        box = self.get(name)
        if limits is not None:
            raise invalid(
                f"a box's processes share the box's limits: give them to `box new`, "
                f"not to a run in box {box.name}"
            )
        return box

    def list(self) -> list[Box]:
        return sorted(self._boxes.values(), key=lambda b: b.created_at)

    async def create(self, name: str, asked: Limits | None) -> Box:
        check_name(name)
        old = self._boxes.get(name)
        if old is not None and not old.alive:  # its process died: the name is free again
            self._boxes.pop(name, None)
            await old.kill()
        if name in self._boxes or name in self._creating:
            raise AgentError(grpc.StatusCode.ALREADY_EXISTS, f"a box named {name} exists already")
        policy = self.policy()
        if len(self._boxes) + len(self._creating) >= policy.max:
            raise AgentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"too many boxes: {len(self._boxes)} (the policy's boxes.max is {policy.max}); "
                "remove one with `coworkctl box rm NAME`",
            )
        self._creating.add(name)
        try:
            box = await self._start(name, asked)
        finally:
            self._creating.discard(name)
        self._boxes[name] = box
        self._schedule()
        return box

    async def _start(self, name: str, asked: Limits | None) -> Box:
        sandbox = self.sandbox
        mode = sandbox.mode() if sandbox is not None else "none"
        limits = sandbox.effective_limits(asked) if sandbox is not None else Limits()
        cgroup: RunCgroup | None = None
        if sandbox is not None and sandbox.cgroups is not None and sandbox.cgroups.available:
            try:
                cgroup = sandbox.cgroups.create_run(limits)
            except OSError as exc:
                raise AgentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot create the box's cgroup: {exc}"
                ) from None
        box = Box(name=name, mode=mode, limits=limits, cgroup=cgroup)
        if mode != "bwrap" or sandbox is None:
            return box
        try:
            await self._boot(box, sandbox)
        except BaseException:
            await box.kill()
            raise
        return box

    def _make_home(self, box: Box, sandbox: Sandbox) -> str | None:
        """The box's own home directory (only where runs have a dedicated user)."""
        user = sandbox.identity.user
        if sandbox.identity.mode != "user":
            return None
        base = os.path.join(self.state_dir, f"{box.name}-{os.urandom(4).hex()}")
        os.makedirs(self.state_dir, mode=0o711, exist_ok=True)
        os.mkdir(base, 0o700)
        home = os.path.join(base, "home")
        os.mkdir(home, 0o700)
        os.chown(home, user.uid, user.gid)
        return home

    async def _boot(self, box: Box, sandbox: Sandbox) -> None:
        """Start bubblewrap with box_init.py as its command, and wait until it is ready."""
        python = _python_for(sandbox)
        try:
            box.home = self._make_home(box, sandbox)
        except OSError as exc:
            raise AgentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot make the box's home: {exc}"
            ) from None
        agent_end, box_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        box.sock = agent_end
        agent_end.setblocking(False)
        try:
            env = {"PATH": os.defpath, "LANG": "C.UTF-8"}
            # The program from a memfd: the agent's own files may be out of the box's sight.
            source = os.memfd_create("cowork-box-init", os.MFD_CLOEXEC)
            write_all(source, _SOURCE)
            launch = sandbox.launch(
                [python, "-I", "-S", f"/proc/self/fd/{source}", str(box_end.fileno())],
                env,
                self.default_dir(),
                pty=False,
                mode="bwrap",
                cgroup=box.cgroup,
                home=box.home,
            )
            if self.relay is not None:  # 127.0.0.1:3129 in the box: its runs' Claude API
                launch.relay = self.relay.shared_handler(box.routes)
            box.run = REAPER.new_run()
            try:
                box.popen = subprocess.Popen(
                    launch.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    env={**launch.env, **box.run.env},
                    cwd=self.default_dir(),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(*launch.pass_fds, box_end.fileno(), source),
                )
            except OSError as exc:
                launch.abandon()
                raise precondition(f"cannot start the box: {exc}") from None
            finally:
                launch.close_child_fds()
                os.close(source)
        finally:
            box_end.close()
        REAPER.track(box.popen.pid, box.run)
        box.boxed = await sandbox.activate(launch, box.popen.pid)
        if box.boxed is None or box.boxed.init_pid is None:
            raise precondition(f"the box did not start: {await _stderr_of(box.popen)}")
        box.pid_ns = os.readlink(f"/proc/{box.boxed.init_pid}/ns/pid")
        ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        box._pending[0] = ready
        box._reader = asyncio.ensure_future(box._read_loop())
        try:
            await asyncio.wait_for(ready, READY_SECONDS)
        except (asyncio.TimeoutError, AgentError):
            raise precondition(f"the box did not start: {await _stderr_of(box.popen)}") from None
        if box.popen.stderr is not None:
            box.popen.stderr.close()

    async def remove(self, name: str) -> Box:
        check_name(name)
        box = self._boxes.pop(name, None)
        if box is None:
            raise not_found(f"no box named {name} (`coworkctl box ls` lists them)")
        await box.kill()
        audit(box=name, removed=True)
        return box

    async def close(self) -> None:
        """The agent stops: every box ends."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        boxes, self._boxes = list(self._boxes.values()), {}
        await asyncio.gather(*(b.kill() for b in boxes), return_exceptions=True)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _schedule(self) -> None:
        """Check for idle boxes now and then (only while there are boxes)."""
        if self._timer is not None or not self._boxes:
            return
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self._timer = None
            task = asyncio.ensure_future(self.reap_idle())
            self._sweeps.add(task)
            task.add_done_callback(self._sweeps.discard)

        self._timer = loop.call_later(min(30.0, max(1.0, self.policy().idle / 4)), tick)

    async def reap_idle(self) -> None:
        """Remove boxes idle past the policy's boxes.idle, and boxes whose process died."""
        idle = self.policy().idle
        now = time.monotonic()
        for name, box in list(self._boxes.items()):
            gone = not box.alive
            if gone or (idle and not box.active and now - box.last_used > idle):
                log.info("box %s removed (%s)", name, box.reason if gone else "idle")
                self._boxes.pop(name, None)
                await box.kill()
        self._schedule()


def _python_for(sandbox: Sandbox) -> str:
    """A Python 3 the box's user can run in the box (the agent's may be hidden in it)."""
    user = sandbox.identity.user
    for candidate in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        real = os.path.realpath(candidate)
        if sandbox.visible(real) and executable_by(real, user):
            return real
    raise precondition(
        "a box needs a Python 3 that the sandbox user can run inside the box "
        "(/usr/bin/python3; Debian/Ubuntu package: python3)"
    )


async def _stderr_of(popen: subprocess.Popen[bytes]) -> str:
    """What bubblewrap / the box's first process said before it failed (one line)."""
    if popen.stderr is None:
        return "no reason given"
    with contextlib.suppress(ProcessLookupError):
        popen.kill()
    loop = asyncio.get_running_loop()
    data = await loop.run_in_executor(None, popen.stderr.read, 4096)
    lines = [ln for ln in data.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit status {popen.poll()}"


class BoxService(bpb_grpc.BoxServicer):
    def __init__(self, boxes: Boxes) -> None:
        self.boxes = boxes

    async def Create(self, request: bpb.CreateBoxRequest, context: Context) -> bpb.BoxInfo:
        from .process import limits_of

        box = await self.boxes.create(request.name, limits_of(request.limits))
        audit(box=box.name, sandbox=box.mode)
        return box.info()

    async def List(self, request: bpb.ListBoxesRequest, context: Context) -> bpb.ListBoxesResponse:
        return bpb.ListBoxesResponse(boxes=[b.info() for b in self.boxes.list()])

    async def Remove(self, request: bpb.RemoveBoxRequest, context: Context) -> bpb.BoxInfo:
        box = await self.boxes.remove(request.name)
        return box.info()
