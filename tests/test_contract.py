"""The contract tells the truth: what the agent and the clients say matches what happens.

Capabilities are advertised only where they are configured and work, fields the agent
sends (oom_killed) reach the caller of every client, and a proto change cannot land
without a PROTOCOL_VERSION bump (proto/cowork/agent/v1/PROTOCOL.lock).
"""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cowork.agent.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    claude_pb2,
    claude_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)
from guest_agent.server import bwrap_works
from host_client import AsyncCoworkClient, CoworkClient

from .conftest import REPO, make_agent

# -- capabilities -------------------------------------------------------------------------


def test_sandbox_capabilities_are_absent_without_a_sandbox(client: CoworkClient) -> None:
    caps = client.info()["capabilities"]
    assert "sandbox.bwrap" not in caps and "sandbox.egress" not in caps


def test_sandbox_capabilities_follow_a_configured_and_working_bwrap() -> None:
    a = make_agent(["--sandbox", "bwrap"])
    try:
        with a.client() as c:
            caps = c.info()["capabilities"]
            c.set_policy(yaml="sandbox: none\n")
            after = c.info()["capabilities"]
    finally:
        a.stop()
    works = bwrap_works()
    assert ("sandbox.bwrap" in caps, "sandbox.egress" in caps) == (works, works)
    assert "sandbox.bwrap" not in after and "sandbox.egress" not in after


def test_listen_vsock_is_advertised_only_with_a_vsock_listener(client: CoworkClient) -> None:
    assert "listen.vsock" not in client.info()["capabilities"]


# -- oom_killed reaches the caller ------------------------------------------------------
# This host has no cgroup v2, so no run can be OOM-killed here (tests/vm does that for
# real). These drive the real clients over a real channel against a scripted servicer
# that reports what an agent reports after an OOM kill.


class _OomProcess(process_pb2_grpc.ProcessServicer):
    def Exec(self, request_iterator: object, context: object) -> Iterator[process_pb2.ExecResponse]:
        yield process_pb2.ExecResponse(started=process_pb2.Started(pid=4242))
        yield process_pb2.ExecResponse(stdout=b"partial")
        yield process_pb2.ExecResponse(
            exit=process_pb2.Exit(code=-1, signal=9, duration_ms=5.0, oom_killed=True)
        )

    def Run(self, request: object, context: grpc.ServicerContext) -> process_pb2.RunResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "scripted servicer: Exec only")


class _OomClaude(claude_pb2_grpc.ClaudeServicer):
    def Ask(self, request: object, context: object) -> Iterator[claude_pb2.AskEvent]:
        yield claude_pb2.AskEvent(
            error=claude_pb2.ErrorEvent(message="claude was killed", signal=9, oom_killed=True)
        )

    def Version(
        self, request: object, context: grpc.ServicerContext
    ) -> claude_pb2.ClaudeVersionResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "scripted servicer: Ask only")


class _Agent(agent_pb2_grpc.AgentServicer):
    """Agent.Info listing `capabilities` (what an older or smaller agent would list)."""

    def __init__(self, capabilities: list[str]) -> None:
        self.capabilities = capabilities

    def Info(self, request: object, context: object) -> agent_pb2.InfoResponse:
        return agent_pb2.InfoResponse(capabilities=self.capabilities)


@pytest.fixture
def oom_server() -> Iterator[tuple[str, str]]:
    d = Path(tempfile.mkdtemp(prefix="cw-oom-", dir="/tmp"))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    agent_pb2_grpc.add_AgentServicer_to_server(_Agent(["process.exec", "claude"]), server)
    process_pb2_grpc.add_ProcessServicer_to_server(_OomProcess(), server)  # type: ignore[abstract]  # an older agent: no runs
    claude_pb2_grpc.add_ClaudeServicer_to_server(_OomClaude(), server)  # type: ignore[abstract]  # an older agent: no runs
    server.add_insecure_port(f"unix:{d}/s.sock")
    server.start()
    token = d / "token"
    token.write_text("t" * 32)
    yield f"unix:{d}/s.sock", str(token)
    server.stop(0)
    shutil.rmtree(d, ignore_errors=True)


def test_sync_collect_reports_oom_killed(oom_server: tuple[str, str]) -> None:
    with CoworkClient(*oom_server) as c:
        r = c.exec(["memory-hog"]).collect()
    assert r.oom_killed and r.exit_code == 137 and r.output == "partial"


def test_async_collect_reports_oom_killed(oom_server: tuple[str, str]) -> None:
    async def go() -> bool:
        async with AsyncCoworkClient(*oom_server) as c:
            return (await c.exec(["memory-hog"]).collect()).oom_killed

    assert asyncio.run(go())


def test_claude_error_and_result_report_oom_killed(oom_server: tuple[str, str]) -> None:
    with CoworkClient(*oom_server) as c:
        r = c.ask_claude("hog memory")
    assert r.failure is not None and r.failure.oom_killed
    assert r.oom_killed and r.exit_code == 1


# -- the protocol lock --------------------------------------------------------------------


def _tree(tmp_path: Path) -> Path:
    """A copy of what scripts/gen-proto.sh needs: proto/, cowork/, scripts/."""
    root = tmp_path / "repo"
    for part in ("proto", "cowork", "scripts"):
        shutil.copytree(REPO / part, root / part)
    return root


def _lock(root: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(root / "scripts" / "proto_lock.py"), command, "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _bump(root: Path, to: int) -> None:
    defaults = root / "cowork" / "defaults.py"
    text = defaults.read_text()
    lines = [
        f"PROTOCOL_VERSION = {to}" if line.startswith("PROTOCOL_VERSION = ") else line
        for line in text.splitlines()
    ]
    defaults.write_text("\n".join(lines) + "\n")


def _version(root: Path) -> int:
    for line in (root / "cowork" / "defaults.py").read_text().splitlines():
        if line.startswith("PROTOCOL_VERSION = "):
            return int(line.split("=")[1])
    raise AssertionError("no PROTOCOL_VERSION")


def _touch_proto(root: Path) -> None:
    """A change to the contract: a new message."""
    with open(root / "proto/cowork/agent/v1/agent.proto", "a") as f:
        f.write("\nmessage LockProbe { string added = 1; }\n")


@pytest.fixture
def locked_tree(tmp_path: Path) -> Path:
    """A tree whose protos are locked under its PROTOCOL_VERSION (whatever proto/ holds now)."""
    root = _tree(tmp_path)
    if _lock(root, "check").returncode != 0:
        _bump(root, _version(root) + 1)
        assert _lock(root, "lock").returncode == 0
    assert _lock(root, "check").returncode == 0
    return root


def test_proto_change_without_a_version_bump_fails_the_check_in_one_line(
    locked_tree: Path,
) -> None:
    _touch_proto(locked_tree)
    r = _lock(locked_tree, "check")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "bump PROTOCOL_VERSION" in r.stderr
    assert "make proto-lock" in r.stderr


def test_comments_and_layout_need_no_bump(locked_tree: Path) -> None:
    proto = locked_tree / "proto/cowork/agent/v1/agent.proto"
    text = proto.read_text()
    proto.write_text("// a new comment\n" + text.replace(" = ", "  =  ") + "\n/* more */\n")
    assert _lock(locked_tree, "check").returncode == 0


def test_relocking_a_changed_proto_under_the_same_version_is_refused(locked_tree: Path) -> None:
    _touch_proto(locked_tree)
    r = _lock(locked_tree, "lock")
    assert r.returncode == 1 and "already locked" in r.stderr
    assert _lock(locked_tree, "check").returncode == 1


def test_bump_then_lock_makes_the_check_pass_and_keeps_the_history(locked_tree: Path) -> None:
    lock_file = locked_tree / "proto/cowork/agent/v1/PROTOCOL.lock"
    before = [x for x in lock_file.read_text().splitlines() if x and not x.startswith("#")]
    _touch_proto(locked_tree)
    _bump(locked_tree, _version(locked_tree) + 1)
    assert "not locked" in _lock(locked_tree, "check").stderr
    assert _lock(locked_tree, "lock").returncode == 0
    assert _lock(locked_tree, "check").returncode == 0
    after = [x for x in lock_file.read_text().splitlines() if x and not x.startswith("#")]
    assert after[: len(before)] == before and len(after) == len(before) + 1


def test_a_version_going_backwards_fails_the_check(locked_tree: Path) -> None:
    _bump(locked_tree, _version(locked_tree) - 1)
    r = _lock(locked_tree, "check")
    assert r.returncode == 1 and "below the last locked version" in r.stderr


def test_make_proto_check_runs_the_lock_check(locked_tree: Path) -> None:
    py = str(REPO / ".venv" / "bin" / "python")
    gen = str(locked_tree / "scripts" / "gen-proto.sh")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", gen, py, *args], capture_output=True, text=True, timeout=120)

    assert run(str(locked_tree)).returncode == 0  # fresh generated code in the copy
    ok = run("--check")
    assert ok.returncode == 0 and "is locked" in ok.stdout, ok.stderr
    _touch_proto(locked_tree)
    assert run(str(locked_tree)).returncode == 0  # generated code follows the change
    bad = run("--check")
    assert bad.returncode == 1 and "bump PROTOCOL_VERSION" in bad.stderr


def test_the_committed_lock_has_every_version_in_order() -> None:
    spec = importlib.util.spec_from_file_location("proto_lock", REPO / "scripts/proto_lock.py")
    assert spec is not None and spec.loader is not None
    proto_lock = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proto_lock)
    entries: list[tuple[int, str]] = proto_lock.read_lock(REPO)
    assert entries and [v for v, _ in entries] == sorted({v for v, _ in entries})
    assert entries[-1][0] <= _version(REPO)
