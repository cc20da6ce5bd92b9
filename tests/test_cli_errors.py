"""Every coworkctl failure is one line on stderr and a non-zero exit, never a traceback.

Targets are checked before anything is dialled (a wrapped port would reach another
service), token files that cannot be tokens are named, local file errors of `cp`
are one line, and whatever else goes wrong is one line too (the traceback only with
COWORK_DEBUG=1). A command module that cannot be imported fails loudly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from host_client.targets import TargetError, parse

from .conftest import REPO, AgentProc
from .test_cli import ctl, one_line_error

# -- targets ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("tcp:127.0.0.1:99999", "port 99999 is out of range (1..65535)"),
        ("tcp:127.0.0.1:0", "port 0 is out of range"),
        ("tcp::7070", "the host is empty"),
        ("tcp:[]:7070", "the host is empty"),
        ("tcp:127.0.0.1:http", "port must be a number"),
        ("tcp:127.0.0.1:\u00b2", "port must be a number"),
        ("tcp:127.0.0.1", "use tcp:HOST:PORT"),
        ("vsock:3:4294967295", "port 4294967295 is out of range"),
        ("vsock:4294967295:7070", "CID 4294967295 is out of range"),
        ("vsock:-1:7070", "CID must be a number"),
        ("vsock:3", "use vsock:CID:PORT"),
        ("hvsock::7070", "the socket path is empty"),
        ("hvsock:/tmp/v.sock:0", "port 0 is out of range"),
        ("unix:/tmp/" + "x" * 120, "longer than 107 bytes"),
        ("lima:../etc", "Lima instance name"),
        ("lima:a b", "Lima instance name"),
    ],
)
def test_a_target_that_cannot_be_dialled_as_written_is_refused_naming_it(
    spec: str, needle: str
) -> None:
    with pytest.raises(TargetError) as ei:
        parse(spec)
    assert needle in str(ei.value) and repr(spec) in str(ei.value)


@pytest.mark.parametrize(
    ("spec", "kind", "where"),
    [
        ("tcp:127.0.0.1:65535", "tcp", 65535),
        ("tcp:[::1]:1", "tcp", 1),
        ("vsock:3:7070", "vsock", 7070),
        ("hvsock:/tmp/v.sock:1024", "hvsock", 1024),
    ],
)
def test_targets_at_the_edges_of_their_ranges_are_accepted(
    spec: str, kind: str, where: int
) -> None:
    t = parse(spec)
    assert t.kind == kind and t.port == where


def test_ipv6_tcp_target_keeps_its_brackets_for_grpc() -> None:
    assert parse("tcp:[::1]:7070").grpc_address == "[::1]:7070"


def test_out_of_range_port_on_the_command_line_is_one_line_naming_the_target(
    tmp_path: Path,
) -> None:
    tok = tmp_path / "t"
    tok.write_text("0" * 64)
    r = ctl(None, "--target", "tcp:127.0.0.1:99999", "--token-file", str(tok), "ping")
    assert r.returncode == 1
    assert "'tcp:127.0.0.1:99999'" in one_line_error(r)


# -- tokens -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"\xff\xfe\x00binary-token-bytes", "tökén-ü-1234567890".encode(), b"abc\x01def0123456789"],
    ids=["binary", "non-ascii-utf8", "control-char"],
)
def test_a_token_file_that_holds_no_token_is_one_line(
    agent: AgentProc, tmp_path: Path, content: bytes
) -> None:
    bad = tmp_path / "token"
    bad.write_bytes(content)
    r = ctl(None, "--target", agent.target, "--token-file", str(bad), "info")
    assert r.returncode == 1
    err = one_line_error(r)
    assert str(bad) in err and "does not hold a token" in err


def test_a_non_ascii_cowork_token_is_one_line(agent: AgentProc) -> None:
    base = [sys.executable, "-m", "host_client.cli", "--target", agent.target, "info"]
    env = {k: v for k, v in os.environ.items() if k != "COWORK_TOKEN_FILE"}
    env["COWORK_TOKEN"] = "tökén-1234567890"
    r = subprocess.run(base, capture_output=True, cwd=REPO, timeout=60, env=env)
    assert r.returncode == 1
    assert "COWORK_TOKEN does not hold a token" in one_line_error(r)


# -- cp: local file errors ------------------------------------------------------------


def test_cp_download_into_a_missing_local_directory_is_one_line(
    agent: AgentProc, tmp_path: Path
) -> None:
    (agent.root / "cp-err.txt").write_text("x")
    r = ctl(agent, "cp", "vm:cp-err.txt", str(tmp_path / "no" / "such" / "dir" / "x.txt"))
    assert r.returncode == 1
    one_line_error(r)


def test_cp_download_of_a_directory_onto_a_local_file_is_one_line(
    agent: AgentProc, tmp_path: Path
) -> None:
    (agent.root / "cp-err-dir").mkdir(exist_ok=True)
    (agent.root / "cp-err-dir" / "f.txt").write_text("x")
    local = tmp_path / "a-file"
    local.write_text("in the way")
    r = ctl(agent, "cp", "vm:cp-err-dir", str(local))
    assert r.returncode == 1
    one_line_error(r)


def test_cp_download_into_a_read_only_directory_is_one_line(
    agent: AgentProc, tmp_path: Path
) -> None:
    (agent.root / "cp-ro.txt").write_text("x")
    r = ctl(agent, "cp", "vm:cp-ro.txt", "/proc/cp-ro.txt")
    assert r.returncode == 1
    one_line_error(r)


# -- anything else ------------------------------------------------------------------------


def _exec_with_stdout_closed(agent: AgentProc, debug: bool) -> subprocess.CompletedProcess[str]:
    """`coworkctl exec ... >&-`: Python starts with sys.stdout = None, which no command
    expects: a genuine unexpected failure, reached without touching the code."""
    cmd = [
        sys.executable,
        "-m",
        "host_client.cli",
        "--target",
        agent.target,
        "--token-file",
        str(agent.token_file),
        "exec",
        "--",
        "echo",
        "hi",
    ]
    env = {**os.environ, "COWORK_MUX": "0", "COWORK_DEBUG": "1" if debug else "0"}
    return subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *cmd],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env=env,
    )


def test_an_unexpected_error_is_one_line_with_how_to_see_more(agent: AgentProc) -> None:
    r = _exec_with_stdout_closed(agent, debug=False)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "unexpected error" in r.stderr and "COWORK_DEBUG=1" in r.stderr


def test_cowork_debug_shows_the_traceback_of_an_unexpected_error(agent: AgentProc) -> None:
    r = _exec_with_stdout_closed(agent, debug=True)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and r.stderr.rstrip().splitlines()[-1].startswith("coworkctl:")


# -- command modules ----------------------------------------------------------------------


def test_a_command_module_that_cannot_be_imported_fails_build_parser() -> None:
    from host_client import cli

    cli.COMMAND_MODULES.append("host_client.cli.no_such_cmd")
    try:
        with pytest.raises(cli.CommandModuleError, match=r"host_client\.cli\.no_such_cmd"):
            cli.build_parser()
    finally:
        cli.COMMAND_MODULES.remove("host_client.cli.no_such_cmd")


def test_a_broken_command_module_makes_coworkctl_fail_in_one_line() -> None:
    code = (
        "import host_client.cli as c; c.COMMAND_MODULES.append('host_client.cli.no_such_cmd'); "
        "c.main(['--help'])"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "host_client.cli.no_such_cmd failed to import" in r.stderr
