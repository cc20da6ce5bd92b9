"""Plain result and event types the clients return (no protobuf in user code)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ExecutionResult:
    """The seed controller's result shape: text output, error text and the exit code."""

    output: str
    error: str
    exit_code: int
    signal: int = 0
    timed_out: bool = False
    duration_ms: float = 0.0
    stdout: bytes = b""
    stderr: bytes = b""
    truncated: bool = False
    # The process tree went past its memory limit and was OOM-killed.
    oom_killed: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass(frozen=True)
class Started:
    pid: int
    run_id: str = ""  # agents with capability "runs"


@dataclass(frozen=True)
class Output:
    stream: str  # "stdout" | "stderr"
    data: bytes
    # Detached runs: the journal offset of data[0] (resume at offset + len(data)).
    offset: int = 0


@dataclass(frozen=True)
class Gap:
    """Attach: the run's journal no longer holds [from_offset, first_offset) (cut at its cap)."""

    from_offset: int
    first_offset: int

    @property
    def dropped(self) -> int:
        return self.first_offset - self.from_offset


@dataclass(frozen=True)
class Exited:
    code: int  # -1 when killed by a signal
    signal: int
    timed_out: bool
    duration_ms: float
    oom_killed: bool = False

    @property
    def shell_code(self) -> int:
        """The code a shell would report: 124 on timeout, 128+N for signal N."""
        if self.timed_out:
            return 124
        if self.signal:
            return 128 + self.signal
        return self.code


ExecEvent = Started | Output | Gap | Exited


@dataclass(frozen=True)
class FileInfo:
    path: str
    name: str
    type: str  # file | directory | symlink | other
    size: int
    mode: int
    mtime_ns: int
    symlink_target: str = ""
    # For type "other": "fifo", "socket", "character device" or "block device".
    special: str = ""
    # st_dev / st_ino in the guest: the same directory met twice (a symlink loop).
    device: int = 0
    inode: int = 0

    @property
    def is_dir(self) -> bool:
        return self.type == "directory"


@dataclass(frozen=True)
class Skipped:
    """An entry a copy left out, and why (a socket, a dangling link with -L, ...)."""

    path: str
    reason: str


@dataclass
class TransferResult:
    path: str
    bytes: int
    sha256: str  # of the file; "" for a directory tree
    files: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    # Symlinks created as links (not followed).
    symlinks: int = 0
    # What was not copied and why, in the order met.
    skipped: list[Skipped] = field(default_factory=list)


@dataclass(frozen=True)
class RunInfo:
    """A run the agent knows by id (Process.List): running, or finished and kept."""

    id: str
    kind: str  # "exec" | "claude"
    state: str  # "running" | "exited" | "lost"
    detached: bool
    argv: list[str]
    prompt: str
    box: str
    started_at: float  # unix seconds
    ended_at: float  # 0 while running
    exit: Exited | None
    pid: int
    journal_start: int
    journal_end: int
    journal_bytes: int
    reason: str
    session_id: str
    pty: bool
    cwd: str

    @property
    def command(self) -> str:
        """What the run runs, in one line (argv, or the prompt)."""
        if self.kind == "claude":
            return "claude: " + " ".join(self.prompt.split())
        import shlex

        return shlex.join(self.argv)


@dataclass(frozen=True)
class BoxInfo:
    """A named box (Box.List): a long-lived sandbox that runs join (`box=` / `--box`)."""

    name: str
    state: str  # "ready" | "gone"
    sandbox: str  # "bwrap" | "none"
    created_at: float  # unix seconds
    idle_seconds: float  # since something last ran in it (0 while something does)
    active: int  # processes started through the agent, going now
    runs: int  # processes started in it so far
    processes: int  # processes in its cgroup now
    pid: int  # the agent's pid of its bubblewrap (0 for "none")
    reason: str  # why it is gone
    limits: dict[str, float]  # memory_bytes, pids, cpus (0 = none)
