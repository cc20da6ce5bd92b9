"""Process execution: spawn in a new session, stream I/O with back-pressure, never leave orphans.

Design notes (why it looks like this):
- We drive raw non-blocking fds ourselves instead of asyncio's subprocess
  transports: one code path serves pipes and PTY masters, a read happens only
  when the consumer has room (bounded queue), so a slow client slows the
  process down instead of growing the agent's memory.
- Exit is observed through a pidfd (no SIGCHLD watcher thread); the process
  stays a zombie until we reap it, which keeps its pid/pgid from being reused
  while we signal the group.
- Teardown always signals the whole process group: background children of a
  finished command do not outlive the RPC. What left the group or the session
  is found by the reaper (reaper.py: run cgroup, or subreaper + CW_RUN_ID) and
  stopped with it; a pipe then held only from outside the run is no longer read.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import fcntl
import logging
import os
import shutil
import signal
import struct
import subprocess
import termios
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from cowork.agent.v1 import process_pb2 as pb
from cowork.agent.v1 import process_pb2_grpc as pb_grpc
from cowork.defaults import (
    DEFAULT_TERM,
    KILL_GRACE_SECONDS,
    OUTPUT_CHUNK,
    OUTPUT_QUEUE_CHUNKS,
    RUN_OUTPUT_LIMIT,
)

from . import exec_relay
from .api_relay import ApiRelay
from .boxes import EXIT_REPORT_SECONDS, Box, Boxes, Child, resolve_waiter
from .credentials import CredentialStore
from .egress import OFFLINE, EgressLog
from .errors import AgentError, from_oserror, invalid, not_found, precondition
from .paths import PathPolicy
from .policy import MAX_CPUS, MAX_MEMORY_BYTES, MAX_PIDS, Limits, RunLimits
from .reaper import REAPER, Run
from .rpc import Context, add_bytes, audit, first_message
from .runs import KIND_STDERR, KIND_STDOUT, Gap, Record, RunRecord, Runs
from .sandbox import Boxed, Launch, Sandbox, require_tool

log = logging.getLogger("cowork.process")
_SCRUBBED_ENV_PREFIXES = ("COWORK_",)
# Once everything of a run is gone, how long an output pipe may stay open with
# no data before the agent stops reading it (something outside the run holds
# it: the stream must end anyway).
PIPE_DRAIN_SECONDS = 1.0
# What execve takes for argv + environment in all (E2BIG beyond it; 128 KiB per string).
_ARG_MAX = os.sysconf("SC_ARG_MAX")


def base_environment() -> dict[str, str]:
    """The agent's environment minus its own settings (which may name secrets)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(_SCRUBBED_ENV_PREFIXES)}


async def _wait_fd(fd: int, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not fut.done():
            fut.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, ready)
    try:
        await fut
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)


def _set_nonblocking(fd: int) -> None:
    os.set_blocking(fd, False)


def _check_size(rows: int, cols: int) -> None:
    """A terminal size the kernel can hold (struct winsize has 16-bit fields)."""
    if rows > 0xFFFF or cols > 0xFFFF:
        raise invalid(f"terminal size {rows}x{cols} is out of range (at most 65535x65535)")


# A wall-clock limit past a year is a mistake (e.g. seconds sent as ms * 1000), not a plan.
MAX_TIMEOUT_MS = 366 * 24 * 3600 * 1000


def check_timeout(timeout_ms: int, what: str = "timeout_ms") -> None:
    if timeout_ms > MAX_TIMEOUT_MS:
        raise invalid(f"{what} must be at most {MAX_TIMEOUT_MS} (366 days), not {timeout_ms}")


def _winsize(rows: int, cols: int) -> bytes:
    return struct.pack("HHHH", rows or 24, cols or 80, 0, 0)


@dataclass
class Spawned:
    """A running child in its own process group, with our ends of its I/O."""

    popen: subprocess.Popen[bytes] | None
    pid: int
    stdin_fd: int | None
    out_fds: list[tuple[str, int]]
    pty_master: int | None
    started: float = field(default_factory=time.monotonic)
    pidfd: int | None = None
    returncode: int | None = None
    reaped: bool = False
    _exit_future: asyncio.Future[None] | None = None
    _poller: asyncio.Future[None] | None = None
    # Sandboxed: what must happen after Popen, and the started box.
    launch: Launch | None = None
    box: Boxed | None = None
    # The run's marker and registration with the reaper (leftovers, restart clean-up).
    run: Run | None = None
    # OOM kills its cgroup had seen before it started (a named box's cgroup is shared).
    oom_before: int = 0
    # The named box it runs in, counted in the box's `active` until its fds are closed.
    home: Box | None = None
    _counted: bool = False

    def count_in(self, box: Box) -> None:
        """Count the process as going in `box` (its idle clock stops) until close_fds; OOM
        kills of the box's shared cgroup count for it from now on."""
        self.home = box
        box.active += 1
        box.runs += 1
        box.touch()
        self._counted = True
        if box.cgroup is not None:
            self.oom_before = box.cgroup.oom_kills()

    async def activate(self, sandbox: Sandbox | None, grace: float) -> None:
        """Finish a sandboxed start (bridge the box's network, let it run); no-op otherwise.

        If that fails, the half-started process is stopped and its fds and cgroup
        released before the error propagates: callers have nothing to undo.
        """
        if sandbox is None or self.launch is None:
            return
        try:
            self.box = await sandbox.activate(self.launch, self.pid)
        except BaseException:
            await self.teardown(grace)
            self.close_fds()
            raise

    def close_stdin(self) -> None:
        if self.pty_master is not None:
            try:
                os.write(self.pty_master, b"\x04")
            except OSError:
                pass
        elif self.stdin_fd is not None:
            os.close(self.stdin_fd)
            self.stdin_fd = None

    def signal_group(self, sig: int) -> bool:
        """Signal the process group; False when it no longer exists.

        Sandboxed, the group that matters is the command's own inside the box
        (bwrap itself would die of most signals and take the box down at
        once); SIGKILL also goes to bwrap, which ends the box's pid namespace.
        """
        target = self.pid
        if self.box is not None:
            inner = self.box.command_group()
            if inner is not None:
                target = inner
            if sig == signal.SIGKILL and target != self.pid:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pid, sig)
        try:
            os.killpg(target, sig)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return False

    def resize(self, rows: int, cols: int) -> None:
        if self.pty_master is not None:
            fcntl.ioctl(self.pty_master, termios.TIOCSWINSZ, _winsize(rows, cols))

    async def wait_exited(self) -> None:
        """Return once the main process has exited (it stays a zombie until reap()).

        Several tasks wait on this at once (output, timeout, teardown), so the
        pidfd gets one reader and one shared future.
        """
        if self.returncode is not None or self.reaped:
            return
        if self._exit_future is None:
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._exit_future = fut
            if self.pidfd is not None:
                pidfd = self.pidfd

                def ready() -> None:
                    loop.remove_reader(pidfd)
                    if not fut.done():
                        fut.set_result(None)

                loop.add_reader(pidfd, ready)
            else:
                self._poller = asyncio.ensure_future(self._poll_exit(fut))
        await asyncio.shield(self._exit_future)

    async def _poll_exit(self, fut: asyncio.Future[None]) -> None:
        while not fut.done():  # no pidfd (old kernel): poll without reaping
            try:
                info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = True  # type: ignore[assignment]
            if info is not None:
                fut.set_result(None)
                return
            await asyncio.sleep(0.005)

    def reap(self) -> int:
        if not self.reaped:
            assert self.popen is not None
            self.returncode = self.popen.wait()
            self.reaped = True
            REAPER.untrack(self.pid)
            if self.pidfd is not None:
                asyncio.get_running_loop().remove_reader(self.pidfd)
                os.close(self.pidfd)
                self.pidfd = None
            if self._exit_future is not None and not self._exit_future.done():
                self._exit_future.set_result(None)
        assert self.returncode is not None
        return self.returncode

    async def exited_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.wait_exited(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    async def teardown(self, grace: float) -> None:
        """Stop the main process (TERM, then KILL after `grace`), reap it, then clear its group."""
        if not self.reaped:
            if not await self.exited_within(0):
                self.signal_group(signal.SIGTERM)
                if not await self.exited_within(grace):
                    self.signal_group(signal.SIGKILL)
                    await self.wait_exited()
            self.reap()
        await self.clear_leftovers(grace)

    async def clear_leftovers(self, grace: float) -> None:
        """Stop what the run left behind once its main process is gone.

        That is its group (backgrounded jobs; after the reap the group exists
        only if someone else is in it) and, through the reaper, whatever left
        the group or the session (setsid, double fork) or sits in the run's
        cgroup: all get SIGTERM at once, and SIGKILL after `grace`.
        """
        cgroup = self.launch.cgroup if self.launch is not None else None
        if cgroup is not None and self.launch is not None and not self.launch.owns_cgroup:
            cgroup = None  # a named box's: the box's other runs are in it too
        if self.run is not None:
            await REAPER.terminate(self.run, grace, cgroup, group=self.signal_group)
            return
        if self.signal_group(0):
            self.signal_group(signal.SIGTERM)
            deadline = time.monotonic() + grace
            while self.signal_group(0) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self.signal_group(signal.SIGKILL)

    @property
    def oom_killed(self) -> bool:
        """The run's cgroup saw the OOM killer (call before close_fds)."""
        cg = self.launch.cgroup if self.launch is not None else None
        if cg is None and self.home is not None:
            cg = self.home.cgroup  # started by the box's first process: the box's cgroup
        return cg is not None and cg.oom_kills() > self.oom_before

    def close_fds(self) -> None:
        """Release everything the run holds: our pipe/PTY ends, the box, the run's cgroup."""
        if self.home is not None and self._counted:
            self.home.active -= 1
            self.home.touch()
            self._counted = False
        if self.run is not None:
            REAPER.end_run(self.run)
        if self.box is not None:
            self.box.close()
        if self.launch is not None:
            self.launch.close_parent_fds()
            if self.launch.cgroup is not None and self.launch.owns_cgroup:
                self.launch.cgroup.remove()
            self.launch.cgroup = None
        for fd in [self.stdin_fd, self.pty_master, *[fd for _, fd in self.out_fds]]:
            if fd is None:
                continue
            try:
                os.close(fd)
            except OSError:
                pass
        self.stdin_fd = None
        self.pty_master = None
        self.out_fds = []

    def exit_message(self, timed_out: bool = False) -> pb.Exit:
        rc = self.reap()
        sig = -rc if rc < 0 else 0
        return pb.Exit(
            code=rc if rc >= 0 else -1,
            signal=sig,
            timed_out=timed_out,
            duration_ms=(time.monotonic() - self.started) * 1000,
            oom_killed=self.oom_killed,
        )


@dataclass
class _Stdio:
    """A command's stdio before it starts: the ends it gets (`child`: stdin, stdout,
    stderr, or the one tty) and ours (the PTY master, or the pipes' other ends)."""

    child: list[int]
    stdin_fd: int | None
    out_fds: list[tuple[str, int]]
    master: int | None

    def close_ours(self) -> None:
        for fd in {self.stdin_fd, self.master, *(fd for _, fd in self.out_fds)} - {None}:
            assert fd is not None
            os.close(fd)

    def close_child(self) -> None:
        for fd in self.child:
            os.close(fd)
        self.child = []


def _stdio(pty: bool, keep_stdin: bool, rows: int, cols: int) -> _Stdio:
    """Pipes (stdin only with `keep_stdin`, else /dev/null) or a PTY sized rows x cols; our
    ends non-blocking and close-on-exec. OSError leaves nothing open."""
    made: list[int] = []
    try:
        if pty:
            master, slave = os.openpty()
            made += [master, slave]
            fcntl.ioctl(slave, termios.TIOCSWINSZ, _winsize(rows, cols))
            os.set_inheritable(master, False)
            _set_nonblocking(master)
            return _Stdio([slave], master, [("stdout", master)], master)
        if keep_stdin:
            r_in, w_in = os.pipe2(os.O_CLOEXEC)
            made += [r_in, w_in]
            _set_nonblocking(w_in)
        else:
            r_in, w_in = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), -1
            made.append(r_in)
        r_out, w_out = os.pipe2(os.O_CLOEXEC)
        made += [r_out, w_out]
        r_err, w_err = os.pipe2(os.O_CLOEXEC)
        made += [r_err, w_err]
        _set_nonblocking(r_out)
        _set_nonblocking(r_err)
        return _Stdio(
            [r_in, w_out, w_err],
            w_in if keep_stdin else None,
            [("stdout", r_out), ("stderr", r_err)],
            None,
        )
    except OSError:
        for fd in made:
            os.close(fd)
        raise


@dataclass
class InBox(Spawned):
    """A command the box's first process starts inside a named box (boxes.py).

    The agent is not its parent: its exit comes as a report from the box (with the
    pidfd as a backstop), and its group is signalled from inside the box. What it
    leaves running once it has exited by itself belongs to the box; only when its
    stream ends first (cancel, timeout, kill) is its group stopped.
    """

    child: Child | None = None
    request: tuple[str, list[str], dict[str, str], str] = ("", [], {}, "")
    child_fds: list[int] = field(default_factory=list)
    stopped: bool = False

    async def activate(self, sandbox: Sandbox | None, grace: float) -> None:
        assert self.home is not None
        exe, argv, env, cwd = self.request
        try:
            self.child = await self.home.start_process(
                exe, argv, env, cwd, self.pty_master is not None, self.child_fds
            )
        except BaseException:
            self.reaped = True
            self.close_fds()
            raise
        finally:
            for fd in self.child_fds:
                os.close(fd)
            self.child_fds = []
        self.pid = self.child.host_pid
        self.count_in(self.home)
        audit(argv=argv, pid=self.pid, cwd=cwd, pty=self.pty_master is not None, box=self.home.name)

    async def wait_exited(self) -> None:
        if self.reaped or self.child is None:
            return
        if self._exit_future is None:
            self._exit_future = asyncio.ensure_future(self._watch_exit(self.child))
        await asyncio.shield(self._exit_future)

    async def _watch_exit(self, child: Child) -> None:
        """The box's report of the exit; if only the pidfd says so, a short wait for it."""
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()
        loop.add_reader(child.pidfd, resolve_waiter, gone)
        waiters: list[asyncio.Future[Any]] = [child.report, gone]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if not child.report.done():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(asyncio.shield(child.report), EXIT_REPORT_SECONDS)
        finally:
            loop.remove_reader(child.pidfd)
            gone.cancel()

    def reap(self) -> int:
        if not self.reaped:
            report = self.child.report if self.child is not None else None
            status = report.result() if report is not None and report.done() else -1
            # -1: the box ended (or never said): the command went with it.
            self.returncode = os.waitstatus_to_exitcode(status) if status >= 0 else -9
            self.reaped = True
        assert self.returncode is not None
        return self.returncode

    def signal_group(self, sig: int) -> bool:
        if self.home is None or self.child is None:
            return False
        self.home.signal_group(self.child, sig)
        return not self.child.report.done()

    def _has_exited(self) -> bool:
        done = self._exit_future
        return self.child is None or self.child.report.done() or (done is not None and done.done())

    async def teardown(self, grace: float) -> None:
        if not self.reaped:
            if not self._has_exited():
                self.stopped = True
                self.signal_group(signal.SIGTERM)
                if not await self.exited_within(grace):
                    self.signal_group(signal.SIGKILL)
                    await self.wait_exited()
            self.reap()
        if self.stopped and self.home is not None and self.child is not None:
            self.home.signal_group(self.child, signal.SIGKILL)  # what stayed in its group

    async def clear_leftovers(self, grace: float) -> None:
        """Nothing: what it left running belongs to the box (see teardown)."""

    def close_fds(self) -> None:
        if self.home is not None and self.child is not None:
            self.home.forget(self.child)
        super().close_fds()


def spawn_in_box(
    box: Box,
    exe: str,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    keep_stdin: bool,
    pty: bool = False,
    rows: int = 0,
    cols: int = 0,
) -> InBox:
    """The stdio of a command for `box` (its start is InBox.activate)."""
    try:
        io = _stdio(pty, keep_stdin, rows, cols)
    except OSError as exc:
        raise from_oserror(exc, argv[0]) from None
    sp = InBox(popen=None, pid=0, stdin_fd=io.stdin_fd, out_fds=io.out_fds, pty_master=io.master)
    sp.home = box
    sp.request = (exe, argv, env, cwd)
    sp.child_fds = io.child
    return sp


def _resolve_cwd(spec: pb.ProcessSpec, paths: PathPolicy) -> str:
    cwd = spec.cwd or paths.default_dir
    if "\x00" in cwd:
        raise invalid("cwd contains a NUL byte")
    if not os.path.isabs(cwd):
        cwd = os.path.join(paths.default_dir, cwd)
    if not os.path.exists(cwd):
        raise not_found(f"working directory not found: {cwd}")
    if not os.path.isdir(cwd):
        raise invalid(f"working directory is not a directory: {cwd}")
    return cwd


def _argv(spec: pb.ProcessSpec) -> list[str]:
    if spec.argv and spec.shell:
        raise invalid("give either argv or shell, not both")
    if spec.shell:
        if "\x00" in spec.shell:
            raise invalid("shell contains a NUL byte")
        return ["/bin/sh", "-c", spec.shell]
    if not spec.argv:
        raise invalid("nothing to run: argv and shell are both empty")
    if not spec.argv[0]:
        raise invalid("argv[0] is empty")
    for a in spec.argv:
        if "\x00" in a:
            raise invalid("argv contains a NUL byte")
    return list(spec.argv)


def _environment(spec: pb.ProcessSpec) -> dict[str, str]:
    env = {} if spec.clear_env else base_environment()
    for k, v in spec.env.items():
        if not k or "=" in k or "\x00" in k or "\x00" in v:
            raise invalid(f"invalid environment variable name or value: {k!r}")
        env[k] = v
    if spec.pty:
        if "\x00" in spec.term:
            raise invalid("term contains a NUL byte")
        env["TERM"] = spec.term or env.get("TERM") or DEFAULT_TERM
    return env


def limits_of(msg: pb.ResourceLimits) -> Limits | None:
    """The limits a request asked for (None when it asked for none)."""
    if not (msg.memory_bytes or msg.pids or msg.cpus):
        return None
    if not 0 <= msg.cpus <= MAX_CPUS:  # also refuses NaN
        raise invalid(f"limits.cpus must be a number from 0 to {MAX_CPUS}, not {msg.cpus}")
    if msg.pids > MAX_PIDS:
        raise invalid(f"limits.pids must be at most {MAX_PIDS}, not {msg.pids}")
    if msg.memory_bytes > MAX_MEMORY_BYTES:
        raise invalid(f"limits.memory_bytes must be at most {MAX_MEMORY_BYTES}")
    return Limits(memory_bytes=msg.memory_bytes, pids=msg.pids, cpus=msg.cpus)


def spawn(
    spec: pb.ProcessSpec,
    paths: PathPolicy,
    keep_stdin: bool,
    sandbox: Sandbox | None = None,
    relay: exec_relay.RelayGrant | None = None,
    boxes: Boxes | None = None,
) -> Spawned:
    """Start the process described by `spec` in a new session; raise AgentError if it cannot.

    With a `sandbox` or a box, the caller must `await sp.activate(sandbox, grace)` before
    anything else. With `relay` (spec.claude_relay), the process gets the Claude API
    through the relay.
    """
    box: Box | None = None
    if spec.box:
        if boxes is None:
            raise precondition("this agent has no named boxes")
        box = boxes.for_run(spec.box, limits_of(spec.limits))
    argv = _argv(spec)
    check_timeout(spec.timeout_ms)
    if spec.pty:
        _check_size(spec.rows, spec.cols)
    cwd = _resolve_cwd(spec, paths)
    env = _environment(spec)
    if relay is not None:
        relay.apply(env)
    elif spec.HasField("claude_relay"):
        exec_relay.strip(env)  # neither given nor held: no credential at all
    exe = argv[0]
    if sandbox is not None:
        # Looked up as the run sees it: its PATH, its user, inside the box when there is
        # one. Wrapped, the wrapper would be what fails to exec: say it as a direct run would.
        if "/" not in exe:
            exe = sandbox.which(exe, env.get("PATH", os.defpath), cwd)
        else:
            sandbox.check_runnable(os.path.join(cwd, exe), exe)
    elif "/" not in exe:
        found = shutil.which(exe, path=env.get("PATH", os.defpath))
        if found is None:
            raise not_found(f"command not found: {exe}")
        exe = found
    if box is not None and box.mode == "bwrap":
        if sandbox is not None:
            env = sandbox.run_env(env, "bwrap")
        return spawn_in_box(
            box, exe, [exe, *argv[1:]], env, cwd, keep_stdin, spec.pty, spec.rows, spec.cols
        )
    launch: Launch | None = None
    if sandbox is not None:
        launch = sandbox.launch(
            [exe, *argv[1:]],
            env,
            cwd,
            spec.pty,
            limits_of(spec.limits),
            mode=box.mode if box is not None else relay.mode if relay is not None else None,
            cgroup=box.cgroup if box is not None else None,
        )
        if launch.argv[1:] == argv[1:] and launch.argv[0] == exe:
            launch = None  # nothing wraps it: the direct path below keeps argv[0]
        else:
            env = launch.env
            if relay is not None:
                launch.relay = relay.handler
    # Inherited by everything the process starts: how the reaper finds what
    # left the process group (see reaper.py).
    run = REAPER.new_run()
    env = {**env, **run.env}
    io: _Stdio | None = None
    try:
        io = _stdio(spec.pty, keep_stdin, spec.rows, spec.cols)
        if spec.pty:
            # Not a group leader, so setsid(1) calls setsid() itself without
            # forking: the pid we get is the session's (and the job's) pid.
            # Wrapped (user switch, cgroup, box), setsid --ctty is part of the launch.
            [tty] = io.child
            popen = subprocess.Popen(
                launch.argv
                if launch is not None
                else [require_tool("setsid"), "--ctty", exe, *argv[1:]],
                stdin=tty,
                stdout=tty,
                stderr=tty,
                cwd=cwd,
                env=env,
                close_fds=True,
                pass_fds=launch.pass_fds if launch is not None else (),
                # A box's bwrap leads a session of its own; setsid --ctty runs inside it.
                start_new_session=launch is not None and launch.info_r is not None,
            )
        else:
            stdin, stdout, stderr = io.child
            popen = subprocess.Popen(
                launch.argv if launch is not None else argv,
                executable=None if launch is not None else exe,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                pass_fds=launch.pass_fds if launch is not None else (),
            )
    except OSError as exc:
        REAPER.end_run(run)
        if io is not None:
            io.close_ours()
        if launch is not None:
            launch.abandon()
        if isinstance(exc, FileNotFoundError):
            raise not_found(f"command not found: {argv[0]}") from None
        if isinstance(exc, PermissionError):
            raise AgentError(
                grpc.StatusCode.PERMISSION_DENIED, f"permission denied: {argv[0]}"
            ) from None
        if exc.errno == errno.E2BIG:
            size = sum(len(a) + 1 for a in argv) + sum(len(k) + len(v) + 2 for k, v in env.items())
            raise invalid(
                f"argv and environment too big for the OS ({size} bytes; "
                f"the kernel takes at most {_ARG_MAX} in all and 128 KiB per string)"
            ) from None
        # ENOEXEC (not a program), ETXTBSY (being written), EMFILE, ...: the request's
        # doing or the machine's state, never the agent's failure.
        code = from_oserror(exc, argv[0]).code
        raise AgentError(code, f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    except BaseException:
        REAPER.end_run(run)
        if io is not None:
            io.close_ours()
        raise
    finally:
        if io is not None:
            io.close_child()
        if launch is not None:
            launch.close_child_fds()
    REAPER.track(popen.pid, run)
    sp = Spawned(
        popen=popen,
        pid=popen.pid,
        stdin_fd=io.stdin_fd,
        out_fds=io.out_fds,
        pty_master=io.master,
        launch=launch,
        run=run,
    )
    try:
        sp.pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        sp.pidfd = None
    audit(argv=argv, pid=popen.pid, cwd=cwd, pty=spec.pty, sandbox=launch is not None)
    if box is not None:  # under `sandbox: none`: a name and a cgroup
        sp.count_in(box)
        audit(box=box.name)
    return sp


def start_offset(rec: RunRecord, from_offset: int, tail: bool) -> int:
    """Where an Attach starts: `from_offset`, or the journal's end with `tail`."""
    journal = rec.journal
    assert journal is not None
    if tail:
        return journal.end
    if from_offset > journal.end:
        raise AgentError(
            grpc.StatusCode.OUT_OF_RANGE,
            f"offset {from_offset} is past the end of run {rec.id}'s output ({journal.end})",
        )
    return from_offset


class PipeWatch:
    """Which output fds are waiting for data, and since when (for `drain`).

    A pump waiting on its consumer (back-pressure) is not idle: output a slow
    client has not taken yet is never cut.
    """

    def __init__(self) -> None:
        self.idle_since: dict[int, float | None] = {}

    def stuck(self, seconds: float) -> bool:
        """Every unfinished pump has waited `seconds` for data that does not come."""
        now = time.monotonic()
        waits = self.idle_since.values()
        return bool(waits) and all(t is not None and now - t >= seconds for t in waits)


async def pump(
    fd: int, name: str, sink: Callable[[str, bytes], Any], watch: PipeWatch | None = None
) -> None:
    """Read `fd` to EOF, handing each chunk to `sink` (awaited: that is the back-pressure)."""
    if watch is not None:
        watch.idle_since[fd] = None
    try:
        while True:
            try:
                data = os.read(fd, OUTPUT_CHUNK)
            except BlockingIOError:
                if watch is None:
                    await _wait_fd(fd)
                else:
                    watch.idle_since[fd] = time.monotonic()
                    await _wait_fd(fd)
                    watch.idle_since[fd] = None
                continue
            except OSError as exc:
                if exc.errno == errno.EIO:  # PTY: the slave side is closed
                    return
                raise
            if not data:
                return
            result = sink(name, data)
            if asyncio.iscoroutine(result):
                await result
    finally:
        if watch is not None:
            watch.idle_since.pop(fd, None)


async def drain(readers: asyncio.Future[Any], watch: PipeWatch, seconds: float) -> None:
    """Wait for `readers` (the pumps) to reach EOF; cancel them once every pipe has been
    idle for `seconds` (called when nothing of the run is left to write to them)."""
    while not readers.done():
        if watch.stuck(seconds):
            # Cancelled, the readers settle on a later loop turn: callers must not
            # read their outcome before (see Run).
            readers.cancel()
            return
        await asyncio.wait([readers], timeout=0.05)


async def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            await _wait_fd(fd, write=True)
            continue
        view = view[n:]


def check_control(kind: str | None, req: Any) -> None:
    """Refuse a control message (Exec or Attach) the agent cannot act on (INVALID_ARGUMENT)."""
    if kind == "signal" and not 0 < req.signal < signal.NSIG:
        raise invalid(f"signal {req.signal} is not a signal number (1..{signal.NSIG - 1})")
    if kind == "resize":
        _check_size(req.resize.rows, req.resize.cols)


def _control_request(kind: str | None, req: Any) -> pb.ExecRequest | None:
    """An Attach control message as the ExecRequest the run's input loop takes."""
    if kind == "stdin":
        return pb.ExecRequest(stdin=req.stdin)
    if kind == "close_stdin":
        return pb.ExecRequest(close_stdin=True)
    if kind == "signal":
        return pb.ExecRequest(signal=req.signal)
    if kind == "resize":
        return pb.ExecRequest(resize=req.resize)
    return None


async def _queued(q: asyncio.Queue[Any]) -> AsyncIterator[Any]:
    """The messages put on `q` (a detached run's control input), until None."""
    while True:
        item = await q.get()
        if item is None:
            return
        yield item


def detached_task(coro: Any) -> asyncio.Future[Any]:
    """A task outside the current RPC's context (its audit line must not hold the run)."""
    ctx = contextvars.Context()
    return ctx.run(asyncio.ensure_future, coro)


class ProcessService(pb_grpc.ProcessServicer):
    def __init__(
        self,
        paths: PathPolicy,
        kill_grace: float = KILL_GRACE_SECONDS,
        sandbox: Sandbox | None = None,
        runs: Runs | None = None,
        relay: ApiRelay | None = None,
        credentials: CredentialStore | None = None,
        boxes: Boxes | None = None,
    ) -> None:
        self.paths = paths
        self.boxes = boxes
        self.kill_grace = kill_grace
        self.sandbox = sandbox
        # spec.claude_relay: the Claude credential through the API relay (exec_relay.py).
        self.relay = relay or ApiRelay(lambda: OFFLINE, EgressLog())
        self.credentials = credentials or CredentialStore()
        self.runs = runs if runs is not None else Runs(None, RunLimits)

    async def Exec(
        self,
        request_iterator: AsyncIterator[pb.ExecRequest],
        context: Context,
    ) -> AsyncIterator[pb.ExecResponse]:
        first = await first_message(request_iterator)
        if first is None or first.WhichOneof("msg") != "start":
            raise invalid("the first Exec message must be `start`")
        spec = first.start
        argv = _argv(spec)
        cwd = spec.cwd or self.paths.default_dir
        rec = self.runs.create("exec", spec.detach, argv=argv, cwd=cwd, pty=spec.pty, box=spec.box)
        if not spec.detach:
            async for resp in self._exec(spec, request_iterator, rec):
                yield resp
            return
        # Detached: a task of the agent drives the run into its journal; this stream
        # (like any Attach) follows the journal and passes its input on.
        assert rec.control is not None and rec.journal is not None
        gen = self._exec(spec, _queued(rec.control), rec)
        try:
            started = await gen.__anext__()
        except BaseException:
            await gen.aclose()
            if rec.running:
                self.runs.discard(rec)
            raise
        audit(run_id=rec.id, detached=True)
        rec.task = detached_task(self._drive(rec, gen))
        yield started
        async for resp in self._follow(rec, 0, request_iterator):
            yield resp

    async def _drive(self, rec: RunRecord, gen: AsyncGenerator[pb.ExecResponse, None]) -> None:
        """Run a detached exec to its end, its output into the journal."""
        journal = rec.journal
        assert journal is not None
        exit_msg: pb.Exit | None = None
        reason = ""
        try:
            async for resp in gen:
                kind = resp.WhichOneof("msg")
                if kind == "stdout":
                    journal.append(KIND_STDOUT, resp.stdout)
                elif kind == "stderr":
                    journal.append(KIND_STDERR, resp.stderr)
                elif kind == "exit":
                    exit_msg = resp.exit
        except asyncio.CancelledError:
            reason = "lost: agent stopped"
        except AgentError as exc:
            reason = exc.message
        except Exception as exc:
            log.exception("detached run %s failed", rec.id)
            reason = f"agent error: {exc!r}"
        finally:
            with contextlib.suppress(BaseException):
                await gen.aclose()
            self.runs.finish(rec, exit_msg, reason)
            log.info(
                "detached run %s ended: %s",
                rec.id,
                f"exit {exit_msg.code} signal {exit_msg.signal}" if exit_msg else reason,
            )

    async def _follow(
        self,
        rec: RunRecord,
        offset: int,
        requests: AsyncIterator[Any],
    ) -> AsyncIterator[pb.ExecResponse]:
        """A detached run's journal from `offset`, live output, then its exit; the stream's
        control messages go to the run. Leaving it leaves the run going, and so does the
        end of its messages: a client that goes away must not close the run's stdin (EOF
        is an explicit close_stdin)."""
        journal = rec.journal
        assert journal is not None
        refused: list[AgentError] = []

        async def forward() -> None:
            try:
                async for req in requests:
                    kind = req.WhichOneof("msg")
                    if kind in ("start", "attach"):
                        raise invalid(f"`{kind}` must be the first message, and only the first")
                    check_control(kind, req)
                    msg = _control_request(kind, req)
                    control = rec.control
                    if msg is None or control is None:
                        continue  # a newer client's message, or the run is over
                    if kind == "stdin":
                        add_bytes("stdin_bytes", len(req.stdin))
                    await control.put(msg)
            except AgentError as exc:
                refused.append(exc)

        items: asyncio.Queue[Gap | Record | None] = asyncio.Queue(4)

        async def read() -> None:
            async for item in journal.follow(offset):
                await items.put(item)
            await items.put(None)

        inputs = asyncio.ensure_future(forward())
        reader = asyncio.ensure_future(read())
        try:
            while True:
                get = asyncio.ensure_future(items.get())
                await asyncio.wait([get, inputs], return_when=asyncio.FIRST_COMPLETED)
                if refused:
                    get.cancel()
                    raise refused[0]
                item = await get
                if item is None:
                    break
                if isinstance(item, Gap):
                    yield pb.ExecResponse(
                        gap=pb.JournalGap(
                            from_offset=item.from_offset, first_offset=item.first_offset
                        )
                    )
                elif item.kind == KIND_STDOUT:
                    add_bytes("stdout_bytes", len(item.data))
                    yield pb.ExecResponse(stdout=item.data, offset=item.offset)
                elif item.kind == KIND_STDERR:
                    add_bytes("stderr_bytes", len(item.data))
                    yield pb.ExecResponse(stderr=item.data, offset=item.offset)
            await rec.done.wait()
            if refused:
                raise refused[0]
            if rec.exit is None:
                raise AgentError(
                    grpc.StatusCode.ABORTED,
                    f"run {rec.id} has no exit status: {rec.reason or 'lost'}",
                )
            yield pb.ExecResponse(exit=rec.exit)
        finally:
            inputs.cancel()
            reader.cancel()
            await asyncio.gather(inputs, reader, return_exceptions=True)

    async def _exec(
        self,
        spec: pb.ProcessSpec,
        request_iterator: AsyncIterator[pb.ExecRequest],
        rec: RunRecord,
    ) -> AsyncGenerator[pb.ExecResponse, None]:
        """One exec run: `started`, output, `exit`; the process dies with the generator."""
        grant: exec_relay.RelayGrant | None = None
        try:
            if spec.HasField("claude_relay"):
                box = self.boxes.get(spec.box) if spec.box and self.boxes is not None else None
                grant = await exec_relay.grant(
                    spec.claude_relay, spec.env, self.credentials, self.relay, self.sandbox, box
                )
                if grant is None:
                    audit(claude_relay="none")
                else:
                    cred = grant.route.credential
                    # The header and where it comes from, never the credential.
                    audit(
                        claude_relay=cred.header,
                        credential_source=cred.source,
                        api=cred.upstream.url,
                    )
            sp = spawn(
                spec,
                self.paths,
                keep_stdin=spec.stdin,
                sandbox=self.sandbox,
                relay=grant,
                boxes=self.boxes,
            )
        except BaseException:
            if grant is not None:
                grant.close()
            self.runs.discard(rec)
            raise
        try:
            await sp.activate(self.sandbox, self.kill_grace)
        except BaseException:
            if grant is not None:
                grant.close()
            self.runs.discard(rec)
            raise
        rec.pid = sp.pid
        rec.signal = sp.signal_group

        async def stop() -> None:
            rec.killed = True
            await sp.teardown(self.kill_grace)

        rec.stop = stop
        self.runs.note_started(rec)
        queue: asyncio.Queue[pb.ExecResponse | None] = asyncio.Queue(OUTPUT_QUEUE_CHUNKS)
        timed_out = False
        exit_msg: pb.Exit | None = None

        async def to_queue(name: str, data: bytes) -> None:
            if not spec.detach:
                add_bytes(f"{name}_bytes", len(data))
            if name == "stdout":
                await queue.put(pb.ExecResponse(stdout=data))
            else:
                await queue.put(pb.ExecResponse(stderr=data))

        watch = PipeWatch()

        async def outputs() -> None:
            try:
                await asyncio.gather(*(pump(fd, name, to_queue, watch) for name, fd in sp.out_fds))
            finally:
                await queue.put(None)

        refused: list[AgentError] = []

        async def inputs() -> None:
            try:
                await control()
            except AgentError as exc:
                # A control message the agent cannot act on ends the call with its
                # status (after the process is stopped) instead of being dropped.
                refused.append(exc)
                await sp.teardown(self.kill_grace)
            except Exception as exc:
                # Never a silent death: later stdin, EOF and signals would be lost.
                log.exception("reading the Exec call's messages failed")
                refused.append(AgentError(grpc.StatusCode.INTERNAL, f"agent error: {exc!r}"))
                await sp.teardown(self.kill_grace)

        async def control() -> None:
            async for req in request_iterator:
                kind = req.WhichOneof("msg")
                check_control(kind, req)
                if kind == "stdin":
                    if sp.stdin_fd is None:
                        continue  # stdin closed or never opened: drop, like a closed pipe
                    if not spec.detach:
                        add_bytes("stdin_bytes", len(req.stdin))
                    try:
                        await write_all(sp.stdin_fd, req.stdin)
                    except OSError:
                        # Nobody reads it any more (EPIPE; EIO: the PTY's other side is
                        # closed): dropped, like later writes to a closed pipe.
                        if sp.pty_master is None:
                            sp.close_stdin()
                elif kind == "close_stdin":
                    sp.close_stdin()
                elif kind == "signal":
                    sp.signal_group(req.signal)
                elif kind == "resize":
                    sp.resize(req.resize.rows, req.resize.cols)
                elif kind == "start":
                    raise invalid("`start` must be the first Exec message, and only the first")
            # The client half-closed: for pipes that means EOF on stdin, like ssh.
            if sp.pty_master is None and sp.stdin_fd is not None:
                sp.close_stdin()

        async def watchdog() -> None:
            nonlocal timed_out
            if not await sp.exited_within(spec.timeout_ms / 1000):
                timed_out = True
                await sp.teardown(self.kill_grace)

        async def exit_then_clear_group() -> None:
            await sp.wait_exited()
            # Output may still be in flight; reap and clear stragglers so that
            # pipes held by background children reach EOF.
            await sp.teardown(self.kill_grace)
            # A pipe still open now is held from outside the run: stop reading it.
            await drain(tasks[0], watch, PIPE_DRAIN_SECONDS)

        tasks = [
            asyncio.ensure_future(outputs()),
            asyncio.ensure_future(inputs()),
            asyncio.ensure_future(exit_then_clear_group()),
        ]
        if spec.timeout_ms:
            tasks.append(asyncio.ensure_future(watchdog()))
        try:
            yield pb.ExecResponse(started=pb.Started(pid=sp.pid, run_id=rec.id))
            while True:
                item = await queue.get()
                if item is None:
                    break
                yield item
            await tasks[2]
            if refused:
                raise refused[0]
            exit_msg = sp.exit_message(timed_out=timed_out)
            if sp.home is not None and not sp.home.alive:
                rec.ended_by = f"box {sp.home.name} {sp.home.reason or 'gone'}"
            audit(
                exit_code=exit_msg.code,
                signal=exit_msg.signal,
                timed_out=timed_out,
                oom_killed=exit_msg.oom_killed,
            )
            yield pb.ExecResponse(exit=exit_msg)
        finally:
            for t in tasks:
                t.cancel()
            await sp.teardown(self.kill_grace)
            # Let cancelled tasks unregister their fds before the fds are closed
            # (a closed fd number can be reused at once by another RPC).
            await asyncio.gather(*tasks, return_exceptions=True)
            sp.close_fds()
            if grant is not None:
                grant.close()
            if not spec.detach:
                self.runs.finish(rec, exit_msg, "" if exit_msg else "stream ended")

    # -- runs ---------------------------------------------------------------------------
    async def List(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsResponse:
        return pb.ListRunsResponse(runs=[r.info() for r in self.runs.list()])

    def _journaled(self, ref: str, kind: str) -> RunRecord:
        rec = self.runs.get(ref)
        if rec.kind != kind:
            other = "Claude.Attach" if rec.kind == "claude" else "Process.Attach"
            raise precondition(f"run {rec.id} is a {rec.kind} run: attach with {other}")
        if rec.journal is None:
            raise precondition(
                f"run {rec.id} is not detached: its output goes only to the stream that started it"
            )
        return rec

    async def Attach(
        self, request_iterator: AsyncIterator[pb.AttachRequest], context: Context
    ) -> AsyncIterator[pb.ExecResponse]:
        first = await first_message(request_iterator)
        if first is None or first.WhichOneof("msg") != "attach":
            raise invalid("the first Attach message must be `attach`")
        rec = self._journaled(first.attach.run_id, "exec")
        offset = start_offset(rec, first.attach.from_offset, first.attach.tail)
        audit(run_id=rec.id, from_offset=offset)
        yield pb.ExecResponse(started=pb.Started(pid=rec.pid, run_id=rec.id))
        async for resp in self._follow(rec, offset, request_iterator):
            yield resp

    async def Signal(self, request: pb.SignalRunRequest, context: Context) -> pb.RunInfo:
        rec = self.runs.get(request.run_id)
        if not 0 < request.signal < signal.NSIG:
            raise invalid(f"signal {request.signal} is not a signal number (1..{signal.NSIG - 1})")
        audit(run_id=rec.id, signal=request.signal)
        if not rec.running or rec.signal is None:
            raise precondition(f"run {rec.id} is not running ({rec.state})")
        rec.signal(request.signal)
        return rec.info()

    async def Kill(self, request: pb.KillRunRequest, context: Context) -> pb.RunInfo:
        rec = self.runs.get(request.run_id)
        audit(run_id=rec.id)
        if not rec.running:
            raise precondition(f"run {rec.id} is not running ({rec.state})")
        if rec.stop is not None:
            await rec.stop()
        await rec.done.wait()
        return rec.info()

    async def Wait(self, request: pb.WaitRunRequest, context: Context) -> pb.RunInfo:
        rec = self.runs.get(request.run_id)
        audit(run_id=rec.id)
        await rec.done.wait()
        return rec.info()

    async def Run(self, request: pb.RunRequest, context: Context) -> pb.RunResponse:
        """Exec's runner (`_exec`: spawn, watchdog, teardown, reaping), its output kept in
        memory up to the cap instead of streamed."""
        spec = pb.ProcessSpec()
        spec.CopyFrom(request.spec)
        spec.pty = False
        if spec.detach:
            raise invalid("Run cannot detach (it returns the output): use Exec with detach")
        if spec.HasField("claude_relay"):
            raise invalid("claude_relay is for Exec only (the interactive CLI): not for Run")
        if request.output_limit > RUN_OUTPUT_LIMIT:
            raise invalid(
                f"output_limit must be at most {RUN_OUTPUT_LIMIT} bytes (both streams come back "
                "in one gRPC message; Exec streams any amount)"
            )
        spec.stdin = bool(request.stdin)
        limit = request.output_limit or RUN_OUTPUT_LIMIT
        buffers: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = {"stdout": False, "stderr": False}

        def collect(name: str, data: bytes) -> None:
            buf = buffers[name]
            kept = len(buffers["stdout"]) + len(buffers["stderr"])
            room = min(limit - len(buf), RUN_OUTPUT_LIMIT - kept)
            if room < len(data):
                truncated[name] = True
            if room > 0:
                buf += data[:room]

        async def stdin() -> AsyncIterator[pb.ExecRequest]:
            data = memoryview(request.stdin)
            for i in range(0, len(data), OUTPUT_CHUNK):
                yield pb.ExecRequest(stdin=bytes(data[i : i + OUTPUT_CHUNK]))
            # The end of the messages is EOF on stdin (see _exec).

        cwd = spec.cwd or self.paths.default_dir
        rec = self.runs.create("exec", False, argv=_argv(spec), cwd=cwd, box=spec.box)
        pid = 0
        exit_msg: pb.Exit | None = None
        async for resp in self._exec(spec, stdin(), rec):
            kind = resp.WhichOneof("msg")
            if kind == "stdout":
                collect("stdout", resp.stdout)
            elif kind == "stderr":
                collect("stderr", resp.stderr)
            elif kind == "started":
                pid = resp.started.pid
            elif kind == "exit":
                exit_msg = resp.exit
        assert exit_msg is not None
        return pb.RunResponse(
            stdout=bytes(buffers["stdout"]),
            stderr=bytes(buffers["stderr"]),
            stdout_truncated=truncated["stdout"],
            stderr_truncated=truncated["stderr"],
            exit=exit_msg,
            pid=pid,
        )
