"""coworkctl as a user runs it: a real process, real exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO, AgentProc


def ctl(
    agent: AgentProc | None,
    *args: str,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    base = [sys.executable, "-m", "host_client.cli"]
    if agent is not None:
        base += ["--target", agent.target, "--token-file", str(agent.token_file)]
    return subprocess.run(
        [*base, *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        cwd=REPO,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    return err


def test_exec_passes_stdout_stderr_and_exit_code(agent: AgentProc) -> None:
    r = ctl(agent, "exec", "--", "sh", "-c", "printf out; printf err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, b"out", b"err")


def test_exec_pipes_stdin_byte_exact(agent: AgentProc) -> None:
    data = os.urandom(300_000)
    r = ctl(agent, "exec", "--", "cat", stdin=data)
    assert r.returncode == 0 and r.stdout == data


def test_exec_missing_command_exits_127(agent: AgentProc) -> None:
    r = ctl(agent, "exec", "--", "no-such-binary-xyz")
    assert r.returncode == 127
    assert "command not found: no-such-binary-xyz" in one_line_error(r)


def test_exec_timeout_exits_124(agent: AgentProc) -> None:
    assert ctl(agent, "exec", "--timeout", "0.3", "--", "sleep", "30").returncode == 124


def test_exec_signal_exits_128_plus_n(agent: AgentProc) -> None:
    assert ctl(agent, "exec", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15


def test_exec_env_and_cwd(agent: AgentProc) -> None:
    (agent.root / "sub").mkdir(exist_ok=True)
    r = ctl(agent, "exec", "--cwd", "sub", "--env", "A=b c", "--", "sh", "-c", 'echo "$A"; pwd')
    assert r.stdout.decode().splitlines() == ["b c", str(agent.root / "sub")]


def test_usage_error_exits_2_with_one_line(agent: AgentProc) -> None:
    r = ctl(agent, "exec")
    assert r.returncode == 2
    one_line_error(r)


def test_unknown_command_exits_2(agent: AgentProc) -> None:
    r = ctl(agent, "frobnicate")
    assert r.returncode == 2
    one_line_error(r)


def test_bad_env_syntax_exits_2(agent: AgentProc) -> None:
    r = ctl(agent, "exec", "--env", "NOEQUALS", "--", "true")
    assert r.returncode == 2
    one_line_error(r)


def test_refused_path_is_one_line_and_exit_1(agent: AgentProc) -> None:
    r = ctl(agent, "cat", "/etc/hostname")
    assert r.returncode == 1
    assert "outside the workspace" in one_line_error(r)


def test_wrong_token_is_one_line(agent: AgentProc, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("0" * 64)
    r = ctl(None, "--target", agent.target, "--token-file", str(bad), "info")
    assert r.returncode == 1
    assert "token" in one_line_error(r)


def test_unreachable_target_is_one_line(tmp_path: Path) -> None:
    tok = tmp_path / "t"
    tok.write_text("0" * 64)
    r = ctl(None, "--target", f"unix:{tmp_path}/nothing.sock", "--token-file", str(tok), "ping")
    assert r.returncode == 1


def test_bad_target_is_a_usage_style_error(tmp_path: Path) -> None:
    r = ctl(None, "--target", "carrier-pigeon", "info")
    assert r.returncode == 1
    assert "bad target" in one_line_error(r)


def test_info_json_is_one_object(agent: AgentProc) -> None:
    r = ctl(agent, "--json", "info")
    info = json.loads(r.stdout)
    assert info["roots"] == [str(agent.root)] and info["protocol_version"] >= 1


def test_cp_up_and_down_with_directories(agent: AgentProc, tmp_path: Path) -> None:
    src = tmp_path / "proj"
    (src / "deep").mkdir(parents=True)
    (src / "deep" / "x.bin").write_bytes(os.urandom(2_000_000))
    assert ctl(agent, "cp", str(src), "vm:cp-test").returncode == 0
    assert ctl(agent, "cp", "vm:cp-test", str(tmp_path / "back")).returncode == 0
    assert (tmp_path / "back" / "deep" / "x.bin").read_bytes() == (
        src / "deep" / "x.bin"
    ).read_bytes()


def test_cp_into_an_existing_remote_directory_keeps_the_name(
    agent: AgentProc, tmp_path: Path
) -> None:
    f = tmp_path / "named.txt"
    f.write_text("n")
    (agent.root / "into").mkdir(exist_ok=True)
    assert ctl(agent, "cp", str(f), "vm:into").returncode == 0
    assert (agent.root / "into" / "named.txt").read_text() == "n"


def test_cp_needs_exactly_one_vm_side(agent: AgentProc) -> None:
    r = ctl(agent, "cp", "a", "b")
    assert r.returncode == 2
    one_line_error(r)


def test_help_teaches_targets_and_examples() -> None:
    r = ctl(None, "--help")
    out = r.stdout.decode()
    assert r.returncode == 0 and "lima:NAME" in out and "examples:" in out


@pytest.fixture
def local_state(tmp_path: Path) -> dict[str, str]:
    short = Path("/tmp") / f"cwl-{os.getpid()}-{tmp_path.name[-8:]}"
    return {"XDG_STATE_HOME": str(short), "COWORK_WORKSPACE": str(tmp_path / "ws")}


def test_local_up_exec_down(local_state: dict[str, str]) -> None:
    try:
        up = ctl(None, "local", "up", env=local_state)
        assert up.returncode == 0, up.stderr
        r = ctl(None, "--target", "local", "exec", "--", "pwd", env=local_state)
        assert r.stdout.decode().strip() == local_state["COWORK_WORKSPACE"]
        token = Path(local_state["XDG_STATE_HOME"]) / "cowork" / "token"
        assert token.stat().st_mode & 0o777 == 0o600
        again = ctl(None, "local", "up", env=local_state)
        assert again.returncode == 0  # idempotent
    finally:
        down = ctl(None, "local", "down", env=local_state)
    assert down.returncode == 0
    assert ctl(None, "local", "status", env=local_state).returncode == 1


def test_local_agent_of_a_checkout_runs_its_pinned_claude(local_state: dict[str, str]) -> None:
    """`make run` then `coworkctl --target local ask`: the local agent finds .tools/claude."""
    import shutil

    assert shutil.which("claude") is None, "this test expects no claude on PATH"
    try:
        assert ctl(None, "local", "up", env=local_state).returncode == 0
        r = ctl(None, "--target", "local", "--json", "info", env=local_state)
        claude = json.loads(r.stdout)["claude"]
    finally:
        ctl(None, "local", "down", env=local_state)
    assert claude["installed"] is True
    assert claude["path"] == str(REPO / ".tools/claude/node_modules/.bin/claude")


def test_exec_ends_cleanly_while_its_stdin_is_still_open(agent: AgentProc) -> None:
    """The remote command exits before our stdin ends (a pipe nobody closes): coworkctl must
    exit with the remote code, not abort at shutdown with the stdin reader still blocked."""
    base = [sys.executable, "-m", "host_client.cli", "--target", agent.target]
    base += ["--token-file", str(agent.token_file), "exec", "--", "sh", "-c", "exit 3"]
    for _ in range(25):
        p = subprocess.Popen(
            base, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            code = p.wait(60)
            err = p.stderr.read() if p.stderr else b""
        finally:
            if p.stdin:
                p.stdin.close()
            for s in (p.stdout, p.stderr):
                if s:
                    s.close()
        assert code == 3, err.decode()
        assert b"Fatal Python error" not in err


def test_exec_tty_passes_resource_limits_to_the_agent(agent: AgentProc) -> None:
    # The agent refuses cpus above its maximum: seen only if -t sent the limits at all.
    r = ctl(agent, "exec", "-t", "--cpus", "2000000", "--", "true")
    assert r.returncode == 1
    assert "limits.cpus" in one_line_error(r)


def test_exec_tty_runs_with_limits_within_range(agent: AgentProc) -> None:
    r = ctl(agent, "exec", "-t", "--memory", "512M", "--pids", "64", "--cpus", "1", "--", "true")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "flags",
    [
        ["--memory", "99999999999999999999T"],
        ["--pids", "4294967296"],
        ["--cpus", "nan"],
        ["--cpus", "inf"],
    ],
    ids=["memory-beyond-uint64", "pids-beyond-uint32", "cpus-nan", "cpus-inf"],
)
def test_exec_limit_out_of_range_is_a_usage_error(agent: AgentProc, flags: list[str]) -> None:
    r = ctl(agent, "exec", *flags, "--", "true")
    assert r.returncode == 2
    one_line_error(r)
