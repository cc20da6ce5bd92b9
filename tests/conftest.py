"""Shared fixtures: a real agent subprocess on a private unix socket, and clients for it."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from host_client import CoworkClient

REPO = Path(__file__).resolve().parent.parent


@dataclass
class AgentProc:
    """A real `cowork-agent` process and what a client needs to reach it."""

    dir: Path
    root: Path
    token_file: Path
    socket: Path
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    @property
    def token(self) -> str:
        return self.token_file.read_text().strip()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 20.0) -> None:
        cmd = [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # root here: processes may run as root
            "--listen",
            self.target,
            "--token-file",
            str(self.token_file),
            "--root",
            str(self.root),
            "--log-format",
            "json",
            "--log-file",
            str(self.dir / "agent.log"),
            *self.extra_args,
        ]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        with CoworkClient(self.target, str(self.token_file)) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    _, err = self.proc.communicate()
                    raise RuntimeError(f"agent exited {self.proc.returncode}: {err.decode()}")
                if c.health(timeout=0.5):
                    return
                time.sleep(0.02)
        raise RuntimeError("agent did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            for s in (self.proc.stdout, self.proc.stderr):
                if s is not None:
                    s.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def client(self) -> CoworkClient:
        return CoworkClient(self.target, str(self.token_file))

    def log_lines(self) -> list[str]:
        return (self.dir / "agent.log").read_text().splitlines()


def make_agent(
    extra_args: list[str] | None = None,
    before_start: Callable[[AgentProc], None] | None = None,
) -> AgentProc:
    # Short base dir: unix socket paths are limited to 107 bytes.
    d = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
    root = d / "ws"
    root.mkdir()
    token_file = d / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    agent = AgentProc(d, root, token_file, d / "run" / "agent.sock", extra_args or [])
    if before_start is not None:
        before_start(agent)
    agent.start()
    return agent


@pytest.fixture(scope="session")
def agent() -> Iterator[AgentProc]:
    """One agent shared by the tests that do not disturb it."""
    a = make_agent()
    yield a
    a.stop()


@pytest.fixture
def own_agent() -> Iterator[AgentProc]:
    """A fresh agent for tests that restart, kill or measure it."""
    a = make_agent()
    yield a
    a.stop()


@pytest.fixture
def client(agent: AgentProc) -> Iterator[CoworkClient]:
    with agent.client() as c:
        yield c


@pytest.fixture
def workdir(agent: AgentProc, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the shared agent's workspace, named for the test."""
    name: str = request.node.name
    d = agent.root / name[:60].replace("[", "_").replace("]", "_")
    d.mkdir(exist_ok=True)
    return d


def processes_with(marker: str) -> list[int]:
    """Pids whose command line contains `marker` (to prove nothing was left behind)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z":
            pids.append(int(entry))
    return pids


def wait_until(pred: object, timeout: float, interval: float = 0.02) -> bool:
    """Poll `pred()` until true or `timeout` seconds pass (for effects with no event to await)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(pred())  # type: ignore[operator]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0
