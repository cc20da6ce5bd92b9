"""The embedded local agent: an agent process on this host for machines without a VM.

It gives `coworkctl` something real to talk to anywhere (demos, CI, trying
the tool) — with no isolation at all: commands run as you, on this host. Its
state (socket, token, pid, log) lives in a 0700 per-user directory.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cowork import defaults


@dataclass
class LocalAgent:
    state: Path
    socket: Path
    token_file: Path
    pid_file: Path
    log_file: Path
    workspace: Path

    @classmethod
    def default(cls, workspace: str | None = None) -> LocalAgent:
        state = defaults.state_dir()
        return cls(
            state=state,
            socket=defaults.local_socket(),
            token_file=defaults.local_token_file(),
            pid_file=state / "agent.pid",
            log_file=state / "agent.log",
            workspace=Path(workspace) if workspace else defaults.local_workspace(),
        )

    def pid(self) -> int | None:
        """The running agent's pid, or None (a stale pid file is ignored)."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return pid

    def ensure_token(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o700)
        if not self.token_file.exists():
            fd = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(defaults.TOKEN_BYTES))

    def start(self, timeout: float = 15.0) -> int:
        """Start the agent in the background (if not running) and wait until it is healthy."""
        existing = self.pid()
        if existing is not None:
            return existing
        self.ensure_token()
        self.workspace.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # the local agent runs commands as you (no isolation), root too
            "--listen",
            f"unix:{self.socket}",
            "--token-file",
            str(self.token_file),
            "--root",
            str(self.workspace),
            "--log-format",
            "json",
            "--log-file",
            str(self.log_file),
        ]
        claude = _checkout_claude()
        if claude is not None and not os.environ.get("COWORK_CLAUDE_BIN"):
            cmd += ["--claude-bin", claude]
        with open(os.devnull, "rb") as devnull, open(self.log_file, "ab") as log:
            proc = subprocess.Popen(
                cmd, stdin=devnull, stdout=log, stderr=log, start_new_session=True
            )
        self.pid_file.write_text(str(proc.pid))
        from .client import CoworkClient

        deadline = time.monotonic() + timeout
        with CoworkClient("local") as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"local agent exited with code {proc.returncode}; see {self.log_file}"
                    )
                if client.health(timeout=0.5):
                    return proc.pid
                time.sleep(0.05)
        proc.terminate()
        raise RuntimeError(f"local agent not healthy after {timeout:g}s; see {self.log_file}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the agent; True if one was running."""
        pid = self.pid()
        if pid is None:
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True


def _checkout_claude() -> str | None:
    """The pinned Claude Code CLI `make setup` put in this checkout (.tools/claude), if any.

    A source checkout's local agent uses it when no `claude` is on PATH, so that
    `make run` followed by `coworkctl --target local ask ...` works; installed
    from a wheel there is no such directory and PATH decides, as in the VM.
    """
    import shutil

    if shutil.which("claude"):
        return None
    exe = (
        Path(__file__).resolve().parents[1]
        / ".tools"
        / "claude"
        / "node_modules"
        / ".bin"
        / "claude"
    )
    return str(exe) if os.access(exe, os.X_OK) else None
