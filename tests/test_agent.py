"""Agent-level behaviour: listeners, socket modes, the audit log, Info."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

from host_client import CoworkClient

from .conftest import AgentProc, make_agent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_audit_log_has_one_json_line_per_rpc_with_the_facts(agent: AgentProc) -> None:
    with agent.client() as c:
        c.run(["echo", "audit-me"])
    records = [json.loads(line) for line in agent.log_lines() if line.startswith("{")]
    runs = [r for r in records if r.get("argv") == ["echo", "audit-me"]]
    assert len(runs) == 1
    rec = runs[0]
    assert rec["method"] == "/cowork.agent.v1.Process/Run"
    assert rec["exit_code"] == 0 and rec["code"] == "OK"
    assert rec["stdout_bytes"] == len("audit-me\n")
    assert rec["duration_ms"] > 0 and "peer" in rec


def test_audit_log_records_file_paths_and_bytes(agent: AgentProc) -> None:
    with agent.client() as c:
        c.write_file("audit.txt", b"12345")
    records = [json.loads(line) for line in agent.log_lines() if line.startswith("{")]
    writes = [r for r in records if r.get("method", "").endswith("Files/Write")]
    assert writes[-1]["path"] == str(agent.root / "audit.txt") and writes[-1]["bytes"] == 5


def test_info_reports_versions_roots_and_listeners(client: CoworkClient, agent: AgentProc) -> None:
    info = client.info()
    assert info["protocol_version"] >= 1
    assert info["roots"] == [str(agent.root)]
    assert info["listeners"] == [agent.target]
    assert "process.exec" in info["capabilities"]
    assert info["cpus"] >= 1 and info["memory_total_bytes"] > 0


def test_tcp_loopback_listener_serves(tmp_path: Path) -> None:
    port = _free_port()
    a = make_agent(["--listen", f"tcp:127.0.0.1:{port}"])
    try:
        with CoworkClient(f"tcp:127.0.0.1:{port}", str(a.token_file)) as c:
            assert c.run(["echo", "tcp"]).output == "tcp\n"
    finally:
        a.stop()


def test_socket_group_makes_the_socket_0660(tmp_path: Path) -> None:
    import grp

    group = grp.getgrgid(os.getgid()).gr_name
    a = make_agent(["--socket-group", group])
    try:
        st = os.stat(a.socket)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == os.getgid()
    finally:
        a.stop()


def test_stale_socket_file_is_replaced(own_agent: AgentProc) -> None:
    own_agent.proc.kill()  # type: ignore[union-attr]
    own_agent.proc.wait()  # type: ignore[union-attr]
    assert own_agent.socket.exists()  # left behind by the crash
    own_agent.start()
    with own_agent.client() as c:
        assert c.health()


def test_second_agent_on_a_live_socket_is_refused(agent: AgentProc) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # root here: processes may run as root
            "--listen",
            agent.target,
            "--token-file",
            str(agent.token_file),
            "--root",
            str(agent.root),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "already listening" in r.stderr


def test_vsock_listener_without_support_is_a_clear_error(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("x" * 40)
    tok.chmod(0o600)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # root here: processes may run as root
            "--listen",
            "vsock:bogus",
            "--token-file",
            str(tok),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "vsock" in r.stderr and "Traceback" not in r.stderr


def test_a_token_no_client_can_send_is_refused_at_start(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_bytes(b"\xff\xfe binary token bytes \x00\x01")
    tok.chmod(0o600)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",
            "--listen",
            f"unix:{tmp_path}/a.sock",
            "--token-file",
            str(tok),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "not printable ASCII" in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
