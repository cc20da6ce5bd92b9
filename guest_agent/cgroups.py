"""Resource limits: one cgroup v2 per exec / Claude run, under the agent's own (delegated) cgroup.

Layout, below the cgroup the agent was started in (systemd gives the unit one;
`Delegate=yes` in cowork-agent.service lets the agent manage what is below):

    <agent cgroup>/            subtree_control: +memory +pids +cpu
        agent/                 the agent itself (cgroup v2 allows processes only in leaves)
        runs/                  cpu.weight 50: workloads yield the CPU to the agent
            run-<pid>-<n>/     memory.max, memory.swap.max=0, memory.oom.group=1,
                               pids.max, cpu.max; removed when the run ends

Why a wrapper moves the process in: Python cannot clone() straight into a
cgroup (CLONE_INTO_CGROUP), and moving a pid after Popen would let the first
instructions run unlimited. So the launch starts `sh -c 'echo $$ >
RUN/cgroup.procs; echo 500 > /proc/self/oom_score_adj; exec "$@"'`: the
process enters its cgroup (and becomes the first choice of the global OOM
killer, while the agent is the last) before anything of the workload runs.

Hosts without the unified hierarchy (cgroup v1 or hybrid, as on the build
machines) get `Limits.unavailable(reason)`: processes run unlimited and
Agent.Info says why, instead of failing every exec.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass

from .policy import Limits

log = logging.getLogger("cowork.cgroups")

ROOT = "/sys/fs/cgroup"
CONTROLLERS = ("memory", "pids", "cpu")
CPU_PERIOD_US = 100_000
RUNS_CPU_WEIGHT = 50  # default is 100: under contention the agent gets twice the share
AGENT_MEMORY_MIN = 64 * 1024 * 1024  # reclaim protection for the agent's own memory
AGENT_OOM_SCORE_ADJ = -900
WORKLOAD_OOM_SCORE_ADJ = 500
_counter = itertools.count(1)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def own_cgroup(pid: int | str = "self") -> str | None:
    """Path of `pid`'s cgroup v2 below ROOT (None when it has none: v1 only)."""
    try:
        for line in _read(f"/proc/{pid}/cgroup").splitlines():
            if line.startswith("0::"):
                return line[3:].strip() or "/"
    except OSError:
        pass
    return None


@dataclass
class RunCgroup:
    """The cgroup of one run: how to enter it, whether it was OOM-killed, and its removal."""

    path: str

    def prefix(self) -> list[str]:
        """argv prefix that moves the process into this cgroup before it becomes the workload."""
        script = (
            'echo $$ > "$0/cgroup.procs" && '
            f"echo {WORKLOAD_OOM_SCORE_ADJ} > /proc/self/oom_score_adj && "
            'exec "$@"'
        )
        return ["/bin/sh", "-c", script, self.path]

    def oom_kills(self) -> int:
        try:
            for line in _read(os.path.join(self.path, "memory.events")).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def procs(self) -> list[int]:
        """Pids in the cgroup now (leftovers of the run once its main process is gone)."""
        try:
            return [int(p) for p in _read(os.path.join(self.path, "cgroup.procs")).split()]
        except (OSError, ValueError):
            return []

    def kill(self) -> None:
        """SIGKILL everything still in the cgroup (kernel >= 5.14), else signal each pid."""
        try:
            _write(os.path.join(self.path, "cgroup.kill"), "1")
            return
        except OSError:
            pass
        try:
            pids = _read(os.path.join(self.path, "cgroup.procs")).split()
        except OSError:
            return
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (OSError, ValueError):
                pass

    def remove(self, wait: float = 2.0) -> None:
        """Remove the (emptied) cgroup; leftovers are killed first so nothing escapes it."""
        deadline = time.monotonic() + wait
        while True:
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                if time.monotonic() >= deadline:
                    log.warning("cannot remove %s (still busy)", self.path)
                    return
                self.kill()
                time.sleep(0.01)


class Cgroups:
    """The agent's delegated cgroup subtree; not `available` (see `reason`) where there is none."""

    def __init__(self, base: str | None, reason: str = "") -> None:
        self.base = base
        self.reason = reason

    @property
    def available(self) -> bool:
        return self.base is not None

    def describe(self) -> str:
        return "cgroup2" if self.available else f"unavailable: {self.reason}"

    @classmethod
    def setup(cls, root: str = ROOT) -> Cgroups:
        """Take over the agent's cgroup (see the module docstring); never raises."""
        if os.geteuid() != 0:
            return cls(None, "the agent is not root")
        if not os.path.exists(os.path.join(root, "cgroup.controllers")):
            return cls(None, f"no cgroup v2 unified hierarchy at {root} (cgroup v1 host)")
        rel = own_cgroup()
        if rel is None:
            return cls(None, "the agent has no cgroup v2")
        base = os.path.normpath(os.path.join(root, rel.lstrip("/")))
        try:
            available = _read(os.path.join(base, "cgroup.controllers")).split()
            missing = [c for c in CONTROLLERS if c not in available]
            if missing:
                return cls(
                    None,
                    f"controllers {', '.join(missing)} not delegated to {rel} "
                    "(systemd: Delegate=yes in the unit)",
                )
            leaf = os.path.join(base, "agent")
            os.makedirs(leaf, exist_ok=True)
            # Every process of the base (the agent, maybe helpers) into the leaf:
            # a cgroup with controllers enabled for children may hold no processes.
            for pid in _read(os.path.join(base, "cgroup.procs")).split():
                try:
                    _write(os.path.join(leaf, "cgroup.procs"), pid)
                except OSError:
                    pass  # exited meanwhile
            _write(
                os.path.join(base, "cgroup.subtree_control"), " ".join(f"+{c}" for c in CONTROLLERS)
            )
            runs = os.path.join(base, "runs")
            os.makedirs(runs, exist_ok=True)
            # Run cgroups of a previous life of this agent (it died without removing
            # them): whatever is still in them is a leftover; then the directory goes.
            for name in os.listdir(runs):
                if name.startswith("run-"):
                    RunCgroup(os.path.join(runs, name)).remove()
            _write(
                os.path.join(runs, "cgroup.subtree_control"), " ".join(f"+{c}" for c in CONTROLLERS)
            )
            _write(os.path.join(runs, "cpu.weight"), str(RUNS_CPU_WEIGHT))
            try:
                _write(os.path.join(leaf, "memory.min"), str(AGENT_MEMORY_MIN))
            except OSError:
                pass
        except OSError as exc:
            return cls(None, f"cannot manage {base}: {exc.strerror or exc}")
        try:
            _write("/proc/self/oom_score_adj", str(AGENT_OOM_SCORE_ADJ))
        except OSError:
            pass
        log.info("cgroup v2 limits under %s", base)
        return cls(base)

    def create_run(self, limits: Limits) -> RunCgroup | None:
        """A fresh cgroup for one run with `limits` applied (None when unavailable)."""
        if self.base is None:
            return None
        path = os.path.join(self.base, "runs", f"run-{os.getpid()}-{next(_counter)}")
        os.mkdir(path)
        run = RunCgroup(path)
        try:
            if limits.memory_bytes:
                _write(os.path.join(path, "memory.max"), str(limits.memory_bytes))
                for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                    try:
                        _write(os.path.join(path, name), value)
                    except OSError:
                        pass  # no swap accounting: the limit still holds
            if limits.pids:
                _write(os.path.join(path, "pids.max"), str(limits.pids))
            if limits.cpus:
                quota = max(1000, int(limits.cpus * CPU_PERIOD_US))
                _write(os.path.join(path, "cpu.max"), f"{quota} {CPU_PERIOD_US}")
        except OSError:
            run.remove()
            raise
        return run
