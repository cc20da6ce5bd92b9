"""`coworkctl mux`: fresh `coworkctl exec` processes go through a running mux, without grpc."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REPO, AgentProc, wait_until


@pytest.fixture
def mux_env() -> Iterator[dict[str, str]]:
    d = tempfile.mkdtemp(prefix="cwx-", dir="/tmp")  # short: unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    yield {**env, "XDG_STATE_HOME": d}
    shutil.rmtree(d, ignore_errors=True)


def ctl(
    agent: AgentProc,
    env: dict[str, str],
    *args: str,
    stdin: bytes = b"",
    py: list[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    argv = [*(py or [sys.executable]), "-m", "host_client.cli", "--target", agent.target]
    argv += ["--token-file", str(agent.token_file), *args]
    return subprocess.run(argv, cwd=REPO, env=env, input=stdin, capture_output=True, timeout=60)


@pytest.fixture
def mux(agent: AgentProc, mux_env: dict[str, str]) -> Iterator[dict[str, str]]:
    r = ctl(agent, mux_env, "mux", "start", "--idle", "60")
    assert r.returncode == 0, r.stderr
    yield mux_env
    ctl(agent, mux_env, "mux", "stop")


def imported_grpc(r: subprocess.CompletedProcess[bytes]) -> bool:
    return any(
        line.split("|")[-1].strip() == "grpc"
        for line in r.stderr.decode().splitlines()
        if line.startswith("import time:")
    )


def test_exec_through_the_mux_passes_streams_stdin_and_exit_code(
    agent: AgentProc, mux: dict[str, str]
) -> None:
    script = "tr a-z A-Z; echo to-stderr >&2; exit 7"
    r = ctl(agent, mux, "exec", "--env", "X=1", "--", "sh", "-c", script, stdin=b"hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"HELLO\n", b"to-stderr\n")


def test_exec_through_the_mux_does_not_load_grpc(agent: AgentProc, mux: dict[str, str]) -> None:
    r = ctl(agent, mux, "exec", "--", "true", py=[sys.executable, "-X", "importtime"])
    assert r.returncode == 0
    assert not imported_grpc(r)
    off = ctl(
        agent,
        {**mux, "COWORK_MUX": "0"},
        "exec",
        "--",
        "true",
        py=[sys.executable, "-X", "importtime"],
    )
    assert off.returncode == 0 and imported_grpc(off)  # the check can tell


def test_missing_command_through_the_mux_is_127_and_one_line(
    agent: AgentProc, mux: dict[str, str]
) -> None:
    r = ctl(agent, mux, "exec", "--", "no-such-command-cw")
    assert r.returncode == 127
    assert r.stderr.decode() == "coworkctl: command not found: no-such-command-cw\n"


def test_mux_socket_is_private(agent: AgentProc, mux: dict[str, str]) -> None:
    (sock,) = (Path(mux["XDG_STATE_HOME"]) / "cowork" / "mux").glob("*.sock")
    assert sock.stat().st_mode & 0o777 == 0o600
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    assert agent.token not in str(sock)


def test_stopped_mux_falls_back_to_the_direct_path(
    agent: AgentProc, mux_env: dict[str, str]
) -> None:
    assert ctl(agent, mux_env, "mux", "start", "--idle", "60").returncode == 0
    assert ctl(agent, mux_env, "mux", "status").returncode == 0
    assert ctl(agent, mux_env, "mux", "stop").returncode == 0
    sock_dir = Path(mux_env["XDG_STATE_HOME"]) / "cowork" / "mux"
    assert wait_until(lambda: not list(sock_dir.glob("*.sock")), 5)
    assert ctl(agent, mux_env, "mux", "status").returncode == 1
    r = ctl(agent, mux_env, "exec", "--", "sh", "-c", "echo direct")
    assert (r.returncode, r.stdout) == (0, b"direct\n")


def test_mux_for_an_unreachable_agent_fails_in_one_line(
    tmp_path: Path, mux_env: dict[str, str]
) -> None:
    tok = tmp_path / "tok"
    tok.write_text("x" * 64)
    tok.chmod(0o600)
    argv = [sys.executable, "-m", "host_client.cli", "--target", f"unix:{tmp_path}/none.sock"]
    argv += ["--token-file", str(tok), "mux", "start"]
    r = subprocess.run(argv, cwd=REPO, env=mux_env, capture_output=True, timeout=90)
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and "Traceback" not in r.stderr.decode()


def _named(argv0: str) -> list[int]:
    """Pids whose argv[0] is `argv0` (the remote process, not our client naming it)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read().split(b"\0", 1)[0] == argv0.encode():
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def test_killed_client_of_the_mux_leaves_no_remote_process(
    agent: AgentProc, mux: dict[str, str]
) -> None:
    import signal
    import uuid

    marker = f"cw-mux-{uuid.uuid4().hex}"
    argv = [sys.executable, "-m", "host_client.cli", "--target", agent.target]
    argv += ["--token-file", str(agent.token_file), "exec", "--", "bash", "-c"]
    argv += [f"exec -a {marker} sleep 300"]
    p = subprocess.Popen(argv, cwd=REPO, env=mux, stdin=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _named(marker), 10)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert wait_until(lambda: not _named(marker), 5)


def test_exec_into_a_box_through_the_mux_does_not_load_grpc(
    agent: AgentProc, mux: dict[str, str]
) -> None:
    name = f"mux-{os.getpid()}"
    assert ctl(agent, mux, "box", "new", name).returncode == 0
    try:
        r = ctl(
            agent,
            mux,
            "exec",
            "--box",
            name,
            "--",
            "sh",
            "-c",
            "echo in-box; exit 4",
            py=[sys.executable, "-X", "importtime"],
        )
        assert (r.returncode, r.stdout) == (4, b"in-box\n")
        assert not imported_grpc(r)
        r = ctl(agent, mux, "exec", "--box", "not-a-box", "--", "true")
        assert r.returncode == 1 and b"no box named not-a-box" in r.stderr
    finally:
        ctl(agent, mux, "box", "rm", name)
