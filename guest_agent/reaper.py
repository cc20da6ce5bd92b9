"""Nothing outlives its stream: the agent as child subreaper, every run marked, leftovers killed.

A run (one Exec, Run or Claude.Ask) may leave processes behind that its
process group does not hold: `setsid` daemons, double forks, `nohup ... &`.
Three mechanisms find them, strongest first:

- cgroup v2 (the VM): each run has its own cgroup (guest_agent/cgroups.py);
  its members are exactly `cgroup.procs` and `cgroup.kill` ends them all.
- bwrap (`sandbox: bwrap`): the box is a pid namespace; its init dies with
  bwrap (--die-with-parent) and takes every process of the box with it.
- everywhere (and alone on a host without cgroup v2 and without the box, such
  as the local agent): this module. The agent is a child subreaper
  (PR_SET_CHILD_SUBREAPER), so a process that leaves its run's tree is
  re-parented to the agent instead of to init, and every process of a run
  inherits `CW_RUN_ID=<agent key>.<life>.<n>` in its environment. When the
  run ends, the agent walks its own children: an orphan marked with the run
  (or marked with no live run, or not marked at all) is killed with its whole
  subtree (SIGTERM, then after the grace period SIGSTOP round by round until
  nothing new appears, then SIGKILL, so a forking process cannot outrun it).

Orphans the agent adopts must also be reaped (where pid 1 does not reap, as on
the build machines, they would stay zombies forever). A sweep every second
(and at the end of every run) reaps them; it never touches a pid that Popen
waits on (those are `track()`ed from the moment Popen returns, and Popen runs
on the event-loop thread like the sweep, so there is no window in between).

When the agent itself dies (even SIGKILL), a guardian process it started
(`python -m guest_agent.reaper guard`, blocked reading a pipe whose only
writer is the agent) sees EOF and kills what carries this life's marker. A
restarted agent also kills what a previous life left (its marker prefix is
derived from the state file's path, and the state file lists the unmarked
orphans it saw), in case the guardian died too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import itertools
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from cowork.defaults import GUEST_STATE_DIR

log = logging.getLogger("cowork.reaper")

RUN_ENV = "CW_RUN_ID"
SWEEP_SECONDS = 1.0
# SIGSTOP rounds before the SIGKILL: each round stops what the previous one missed.
FREEZE_ROUNDS = 64
PR_SET_CHILD_SUBREAPER = 36


class _Cgroup(Protocol):
    def procs(self) -> list[int]: ...

    def kill(self) -> None: ...


# -- /proc --------------------------------------------------------------------------
@dataclass(frozen=True)
class ProcStat:
    state: str
    ppid: int
    session: int
    starttime: int


def proc_stat(pid: int) -> ProcStat | None:
    """State, parent and start time (clock ticks since boot) of `pid`; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[3]), int(fields[19]))
    except (OSError, IndexError, ValueError):
        return None


def children(pid: int, all_tasks: bool = True) -> list[int]:
    """Direct children of process `pid` (of each of its threads, or of its main thread only)."""
    tids = [str(pid)]
    if all_tasks:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
    out: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
    return out


def marker(pid: int) -> str | None:
    """The CW_RUN_ID in `pid`'s environment (None when absent or unreadable)."""
    want = RUN_ENV.encode() + b"="
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
    except OSError:
        return None
    for entry in env.split(b"\0"):
        if entry.startswith(want):
            return entry[len(want) :].decode("ascii", "replace")
    return None


def _all_pids() -> list[int]:
    return [int(e) for e in os.listdir("/proc") if e.isdigit()]


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    st = proc_stat(pid)
    return st is not None and st.state not in ("Z", "X")


def descendants(roots: Iterable[int]) -> list[int]:
    """`roots` and every process below them (live ones; zombies have no children)."""
    out: list[int] = []
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        stack.extend(children(pid))
    return out


def freeze_and_kill(find: Callable[[], Iterable[int]]) -> int:
    """SIGSTOP what `find()` returns until it returns nothing new, then SIGKILL all of it.

    A stopped process cannot fork, so a fork loop cannot outrun the killer the
    way it outruns a plain kill-and-rescan loop. Returns how many were killed.
    """
    stopped: list[int] = []
    seen: set[int] = set()
    for _ in range(FREEZE_ROUNDS):
        new = [p for p in find() if p not in seen]
        if not new:
            break
        for pid in new:
            seen.add(pid)
            stopped.append(pid)
            _signal(pid, signal.SIGSTOP)
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    return len(stopped)


# -- runs -----------------------------------------------------------------------------
@dataclass(eq=False)
class Run:
    """One exec / Claude run: its marker and the pids of it that Popen waits on."""

    id: str
    pids: set[int] = field(default_factory=set)
    ended: bool = False

    @property
    def env(self) -> dict[str, str]:
        """What to add to the run's environment (inherited by everything it starts)."""
        return {RUN_ENV: self.id}


class Reaper:
    """The agent's registry of runs and the children it must (or must not) reap."""

    def __init__(self) -> None:
        self.key = "local"
        self.life = secrets.token_hex(4)
        self._counter = itertools.count(1)
        self._tracked: dict[int, Run] = {}
        self._runs: dict[str, Run] = {}
        self._unmarked: dict[int, int] = {}  # orphans without a marker: pid -> starttime
        self.state_file: str | None = None
        self.subreaper = False
        self._timer: asyncio.TimerHandle | None = None
        self._guard: subprocess.Popen[bytes] | None = None
        self._guard_w: int | None = None

    @property
    def prefix(self) -> str:
        """The marker prefix of this agent's current life."""
        return f"{self.key}.{self.life}."

    # -- registry ---------------------------------------------------------------------
    def new_run(self) -> Run:
        run = Run(f"{self.prefix}{next(self._counter)}")
        self._runs[run.id] = run
        return run

    def track(self, pid: int, run: Run) -> None:
        """`pid` is a child that Popen will wait on: the sweep must never reap it."""
        self._tracked[pid] = run
        run.pids.add(pid)

    def untrack(self, pid: int) -> None:
        run = self._tracked.pop(pid, None)
        if run is not None:
            run.pids.discard(pid)

    def end_run(self, run: Run) -> None:
        """The run's stream is over: whatever still carries its marker is a leftover."""
        run.ended = True
        self._runs.pop(run.id, None)

    # -- finding leftovers --------------------------------------------------------------
    def _owner(self, pid: int) -> str | None:
        """The run (of this life) `pid` is marked with; "" for a marker of no live run."""
        mark = marker(pid)
        if mark is None or not mark.startswith(f"{self.key}."):
            return None
        return mark if mark in self._runs else ""

    def _adopted(self, pid: int, st: ProcStat | None) -> bool:
        """Whether child `pid` came from a run (as opposed to a helper the agent runs itself).

        Every run starts in a session of its own, and no process can join a
        session it was not forked in, so anything of a run is outside the
        agent's session; a helper another part of the agent runs (and waits
        for) with subprocess is inside it and is left alone.
        """
        return (
            st is not None
            and pid not in self._tracked
            and pid != self._guard_pid()
            and st.session != os.getsid(0)
        )

    def orphans(self, all_tasks: bool = False) -> list[int]:
        """Live children of the agent that came from runs and that no Popen waits on."""
        out = []
        for pid in children(os.getpid(), all_tasks):
            st = proc_stat(pid)
            if st is not None and self._adopted(pid, st) and st.state not in ("Z", "X"):
                out.append(pid)
        return out

    def leftovers(self, run: Run) -> list[int]:
        """Live processes of `run` other than the ones Popen waits on.

        They are below its tracked processes, or below an orphan the agent
        adopted that carries the run's marker. An orphan with no marker (its
        environment was cleared) or with the marker of a finished run belongs
        to no live run: it is counted in too, so it dies with the next run
        that ends rather than never.
        """
        roots = [p for p in run.pids if _alive(p)]
        for pid in self.orphans():
            owner = self._owner(pid)
            if owner is None or owner == "" or owner == run.id:
                roots.append(pid)
        return [
            p
            for p in descendants(roots)
            if p not in self._tracked and p != self._guard_pid() and _alive(p)
        ]

    async def terminate(
        self,
        run: Run,
        grace: float,
        cgroup: _Cgroup | None = None,
        group: Callable[[int], bool] | None = None,
    ) -> int:
        """Stop `run`'s leftovers: SIGTERM, `grace` seconds, then freeze-and-kill; reap them.

        `group(sig)` signals the run's process group (False once it is empty):
        it gets the same SIGTERM, grace and SIGKILL, at the same time.
        """

        def find() -> list[int]:
            pids = self.leftovers(run)
            if cgroup is not None:
                pids += [p for p in cgroup.procs() if p not in self._tracked and p not in pids]
            return pids

        def grouped() -> bool:
            return group is not None and group(0)

        pids = find()
        in_group = grouped()
        if not pids and not in_group:
            return 0
        found = len(pids)
        if in_group and group is not None:
            group(signal.SIGTERM)
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        # Each look scans /proc: back off, since many runs may be ending at once
        # (50 concurrent boxed runs in a TCG guest spent minutes here at a fixed 10 ms).
        delay = 0.005
        while (pids or in_group) and time.monotonic() < deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.1)
            # What died is now a zombie the agent adopted (the run's own parent
            # is gone), and a group with only zombies in it still answers
            # kill(0): reap them, or every run that left a background child
            # would wait out the whole grace period.
            self.sweep(kill=False)
            pids = find()
            in_group = grouped()
        if in_group and group is not None:
            group(signal.SIGKILL)
        if pids:
            freeze_and_kill(find)
        if cgroup is not None and found:
            cgroup.kill()
        self.sweep(kill=False)
        if found:
            log.info("run %s: stopped %d process(es) outside its group", run.id, found)
        return found

    # -- the sweep ----------------------------------------------------------------------
    def sweep(self, kill: bool = True) -> None:
        """Reap adopted zombies; with `kill`, also kill adopted orphans of no live run."""
        me = os.getpid()
        if self._guard is not None and self._guard.poll() is not None:
            log.warning("the guardian exited (%s): starting another", self._guard.returncode)
            self._stop_guard()
            self._start_guard()
        stale: list[int] = []
        unmarked: dict[int, int] = {}
        for pid in children(me, all_tasks=True):
            st = proc_stat(pid)
            if st is None or not self._adopted(pid, st):
                continue
            if st.state in ("Z", "X"):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
                continue
            if not kill:
                continue
            owner = self._owner(pid)
            if owner:
                continue  # a live run's: it ends with that run
            if owner is None and self._runs:
                # No marker: it may belong to any live run, so it lives until one
                # of them ends (see leftovers). Recorded for a restarted agent.
                unmarked[pid] = st.starttime
                continue
            stale.append(pid)
        if stale:
            n = freeze_and_kill(lambda: [p for p in descendants(stale) if _alive(p)])
            log.info("killed %d process(es) left by finished runs", n)
        if kill and unmarked != self._unmarked:
            self._unmarked = unmarked
            self._save()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            try:
                self.sweep()
            except Exception:  # a sweep must never stop the next one
                log.exception("sweep failed")
            self._timer = loop.call_later(SWEEP_SECONDS, tick)

        self._timer = loop.call_later(SWEEP_SECONDS, tick)

    # -- life cycle ---------------------------------------------------------------------
    def install(self, state_file: str | None) -> None:
        """Become subreaper, clean up after a previous life, start the guardian and the sweep.

        `state_file` names this agent (the marker key is derived from its path);
        call from the event loop, before the first run.
        """
        self.state_file = state_file
        if state_file is not None:
            with contextlib.suppress(OSError):
                os.makedirs(os.path.dirname(state_file), mode=0o700, exist_ok=True)
            self.key = hashlib.sha256(os.path.abspath(state_file).encode()).hexdigest()[:12]
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            self.subreaper = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        except (OSError, AttributeError):
            self.subreaper = False
        if not self.subreaper:
            log.warning("cannot become a child subreaper: orphans of runs go to init")
        previous = self.kill_previous_life()
        if previous:
            log.warning("killed %d process(es) left by a previous agent", previous)
        self._save()
        self._start_guard()
        self._schedule()

    def kill_previous_life(self) -> int:
        """Kill what an earlier agent with this state file left: marked or recorded."""
        recorded: dict[int, int] = {}
        if self.state_file is not None:
            try:
                with open(self.state_file) as f:
                    state = json.load(f)
                recorded = {int(p): int(t) for p, t in state.get("unmarked", [])}
            except (OSError, ValueError, TypeError, AttributeError):
                recorded = {}
        return kill_marked(f"{self.key}.", recorded, spare=self.prefix)

    def _save(self) -> None:
        if self.state_file is None:
            return
        state = {
            "pid": os.getpid(),
            "key": self.key,
            "life": self.life,
            "unmarked": sorted(self._unmarked.items()),
        }
        tmp = f"{self.state_file}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(state, f)
            os.replace(tmp, self.state_file)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.state_file, exc)

    def _guard_pid(self) -> int:
        return self._guard.pid if self._guard is not None else -1

    def _start_guard(self) -> None:
        """A process that kills this life's leftovers once the agent is gone, however it went."""
        r, w = os.pipe2(os.O_CLOEXEC)
        args = [sys.executable, "-m", "guest_agent.reaper", "guard", self.prefix]
        if self.state_file is not None:
            args.append(self.state_file)
        try:
            self._guard = subprocess.Popen(
                args,
                stdin=r,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,  # a Ctrl-C to the agent's group must not reach it
                env={k: v for k, v in os.environ.items() if k != RUN_ENV},
            )
        except OSError as exc:
            log.warning("cannot start the guardian: %s", exc)
            os.close(w)
            return
        finally:
            os.close(r)
        self._guard_w = w

    def _stop_guard(self) -> None:
        if self._guard_w is not None:
            os.close(self._guard_w)  # EOF: the guardian cleans up (nothing, normally) and exits
            self._guard_w = None
        if self._guard is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._guard.wait(2)
            self._guard = None

    def close(self) -> None:
        """Agent shutdown: kill every leftover of this life now, reap, stop the guardian."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        me = os.getpid()
        guard = self._guard_pid()

        def everything() -> list[int]:
            return [p for p in descendants(children(me)) if p not in (me, guard) and _alive(p)]

        freeze_and_kill(everything)
        # Reap what was killed, Popen's children included: nobody will wait for them now.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                if not [p for p in children(me) if p != guard]:
                    break
                time.sleep(0.01)
        self._tracked.clear()
        self._stop_guard()
        if self.state_file is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.state_file)


def kill_marked(prefix: str, recorded: dict[int, int], spare: str = "") -> int:
    """Kill every process whose marker starts with `prefix` (but not `spare`), and `recorded`
    pids (pid -> start time) that are still the process that was recorded."""
    me = os.getpid()

    def find() -> list[int]:
        out = []
        for pid in _all_pids():
            if pid == me:
                continue
            st = proc_stat(pid)
            if st is None or st.state in ("Z", "X"):
                continue
            mark = marker(pid) or ""
            ours = mark.startswith(prefix) and not (spare and mark.startswith(spare))
            if ours or recorded.get(pid) == st.starttime:
                out.append(pid)
        return out

    return freeze_and_kill(find)


REAPER = Reaper()


def default_run_dir() -> str:
    """Where an agent without a unix socket keeps its state file."""
    return GUEST_STATE_DIR if os.geteuid() == 0 else tempfile.gettempdir()


def state_file_for(listen: list[str], run_dir: str) -> str:
    """Where an agent keeps its state: beside its first unix socket, else in `run_dir`."""
    for addr in listen:
        if addr.startswith("unix:"):
            return f"{addr[5:]}.runs.json"
    digest = hashlib.sha256("\n".join(sorted(listen)).encode()).hexdigest()[:12]
    return os.path.join(run_dir, f"cowork-agent-{digest}.runs.json")


def _guard_main(prefix: str, state_file: str | None) -> int:
    """Wait for the agent to go (EOF on stdin), then kill what its runs left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    while True:
        try:
            if not os.read(0, 1):
                break
        except InterruptedError:
            continue
        except OSError:
            break
    recorded: dict[int, int] = {}
    if state_file is not None:
        try:
            with open(state_file) as f:
                state = json.load(f)
            if prefix == f"{state.get('key')}.{state.get('life')}.":
                recorded = {int(p): int(t) for p, t in state.get("unmarked", [])}
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    kill_marked(prefix, recorded)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "guard":
        sys.exit(_guard_main(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    sys.exit("usage: python -m guest_agent.reaper guard PREFIX [STATE_FILE]")
