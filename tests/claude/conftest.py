"""Fixtures for the Claude tests: the real pinned CLI, a scripted fake model, agents to run it.

The CLI is the real `@anthropic-ai/claude-code` from .tools/claude (installed
by scripts/tools.d/20-claude.sh when missing); only the model is faked
(tests/claude/fake_anthropic.py, reached through ANTHROPIC_BASE_URL).

When the tests run as root (as here), the agent runs Claude as an
unprivileged user through `--run-as`, like the VM does: the fixture creates a
system user `cwc-XXXXXX` (unique per test session, so concurrent sessions do
not share a HOME) with its home under /var/tmp, and deletes both afterwards.
A second agent without --run-as covers the root case (bypassPermissions
needs IS_SANDBOX=1 there).
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from host_client import CoworkClient
from tests.claude.fake_anthropic import FakeAnthropic

REPO = Path(__file__).resolve().parents[2]
CLAUDE_BIN = REPO / ".tools" / "claude" / "node_modules" / ".bin" / "claude"
CLAUDE_VERSION = "2.1.330"
RUN_AS_PREFIX = "cwc-"

# What the CLI needs to work offline (no telemetry, no update checks, no
# other side traffic): set in the agent's environment, like a VM's unit would.
OFFLINE_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}
# A fake key, but a recognizable one: tests assert it never reaches a log.
FAKE_KEY = "sk-ant-fake-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """The pinned real CLI; installed on first use, failing loudly if that is impossible."""
    if not CLAUDE_BIN.exists():
        subprocess.run(["bash", str(REPO / "scripts/tools.d/20-claude.sh")], check=True)
    out = subprocess.run(
        [str(CLAUDE_BIN), "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert out.stdout.startswith(CLAUDE_VERSION), (out.stdout, out.stderr)
    return CLAUDE_BIN


@dataclass
class ClaudeAgent:
    """A real cowork-agent subprocess configured to run the real claude."""

    dir: Path
    root: Path
    token_file: Path
    socket: Path
    args: list[str]
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    run_as: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    def client(self) -> CoworkClient:
        return CoworkClient(self.target, str(self.token_file))

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
            *self.args,
        ]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"agent exited {self.proc.returncode}: {err}")
                if c.health(timeout=0.5):
                    return
                time.sleep(0.02)
        raise RuntimeError("agent did not become healthy")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def log_text(self) -> str:
        return (self.dir / "agent.log").read_text()

    def workdir(self, name: str) -> Path:
        """A fresh directory in the workspace, owned by the user Claude runs as."""
        d = self.root / f"{name[:50]}-{uuid.uuid4().hex[:6]}"
        d.mkdir()
        if self.run_as:
            pw = pwd.getpwnam(self.run_as)
            os.chown(d, pw.pw_uid, pw.pw_gid)
        return d


def create_run_as_user() -> str:
    """Create a fresh unprivileged user (with an empty home) for Claude to run as."""
    name = RUN_AS_PREFIX + secrets.token_hex(3)
    home = Path("/var/tmp") / f"{name}-home"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--shell",
            "/bin/sh",
            "--home-dir",
            str(home),
            "--create-home",
            name,
        ],
        check=True,
    )
    home.chmod(0o700)
    return name


def delete_run_as_user(name: str) -> None:
    home = pwd.getpwnam(name).pw_dir
    subprocess.run(["userdel", name], check=False)
    shutil.rmtree(home, ignore_errors=True)


def make_claude_agent(
    claude_bin: Path, run_as: str | None, extra_args: list[str] | None = None
) -> ClaudeAgent:
    d = Path(tempfile.mkdtemp(prefix="cwc-", dir="/tmp"))
    d.chmod(0o755)  # the run-as user must reach the workspace below it
    root = d / "ws"
    root.mkdir()
    home = d / "home"  # the agent's own HOME (claude's when there is no --run-as)
    home.mkdir()
    token_file = d / "token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)
    args = ["--claude-bin", str(claude_bin), *(extra_args or [])]
    if run_as:
        args += ["--run-as", run_as]
        pw = pwd.getpwnam(run_as)
        os.chown(root, pw.pw_uid, pw.pw_gid)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update(OFFLINE_ENV, HOME=str(home))
    agent = ClaudeAgent(d, root, token_file, d / "run" / "agent.sock", args, env, run_as=run_as)
    agent.start()
    return agent


@pytest.fixture(scope="session")
def claude_agent(claude_bin: Path) -> Iterator[ClaudeAgent]:
    """The agent the Claude tests share: Claude runs as a fresh unprivileged user when we
    are root (as in CI), else as ourselves."""
    run_as = create_run_as_user() if os.geteuid() == 0 else None
    try:
        agent = make_claude_agent(claude_bin, run_as)
        try:
            yield agent
        finally:
            agent.stop()
            shutil.rmtree(agent.dir, ignore_errors=True)
    finally:
        if run_as:
            delete_run_as_user(run_as)


@pytest.fixture(scope="module")
def root_agent(claude_bin: Path) -> Iterator[ClaudeAgent]:
    """An agent that runs Claude as its own user (root here): no --run-as."""
    agent = make_claude_agent(claude_bin, None)
    yield agent
    agent.stop()
    shutil.rmtree(agent.dir, ignore_errors=True)


@pytest.fixture
def api() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture
def run_env(api: FakeAnthropic) -> dict[str, str]:
    """Per-run env: the fake model, a fake key, no retries (errors surface at once), and a
    unique marker that every process of the run inherits (to find leftovers)."""
    return {
        "ANTHROPIC_BASE_URL": api.base_url,
        "ANTHROPIC_API_KEY": FAKE_KEY,
        "CLAUDE_CODE_MAX_RETRIES": "0",
        "COWORK_TEST_RUN": uuid.uuid4().hex,
    }


def processes_with_env(entry: str) -> list[int]:
    """Live pids whose environment contains `entry` ("NAME=value")."""
    want = entry.encode()
    pids = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read().split(b"\x00")
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and want in env:
            pids.append(int(name))
    return pids


def run_marker(run_env: dict[str, str]) -> str:
    return f"COWORK_TEST_RUN={run_env['COWORK_TEST_RUN']}"


def coworkctl(
    agent: ClaudeAgent, args: list[str], env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`coworkctl ARGS[0] --env=... ARGS[1:]` against `agent`, the fake model's key and URL in
    its environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    full_env.update(
        ANTHROPIC_API_KEY=env["ANTHROPIC_API_KEY"], ANTHROPIC_BASE_URL=env["ANTHROPIC_BASE_URL"]
    )
    extra = [f"--env=CLAUDE_CODE_MAX_RETRIES={env['CLAUDE_CODE_MAX_RETRIES']}"]
    extra.append(f"--env=COWORK_TEST_RUN={env['COWORK_TEST_RUN']}")
    cmd = [
        sys.executable,
        "-m",
        "host_client.cli",
        "--target",
        agent.target,
        "--token-file",
        str(agent.token_file),
        *args[:1],
        *extra,
        *args[1:],
    ]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO, env=full_env
    )
