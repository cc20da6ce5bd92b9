"""Clients gate features on Agent.Info capabilities and fail per feature, in one line.

An agent that does not list a capability would ignore (or not know) the request
field behind it: limits sent to it would be dropped without a word. Real clients
and the real CLI, over a real channel, against a scripted agent that lists only
what an older agent would.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from cowork.agent.v1 import agent_pb2, agent_pb2_grpc, process_pb2, process_pb2_grpc
from host_client import AsyncCoworkClient, CoworkClient
from host_client.errors import Unsupported

from .conftest import AgentProc

OLD_CAPABILITIES = ["process.exec", "process.run", "process.pty", "files", "health"]


class _OldAgent(agent_pb2_grpc.AgentServicer):
    def Info(self, request: object, context: object) -> agent_pb2.InfoResponse:
        return agent_pb2.InfoResponse(protocol_version=2, capabilities=OLD_CAPABILITIES)


class _Process(process_pb2_grpc.ProcessServicer):
    def __init__(self) -> None:
        self.runs = 0

    def Exec(self, request_iterator: object, context: object) -> Iterator[process_pb2.ExecResponse]:
        self.runs += 1
        yield process_pb2.ExecResponse(exit=process_pb2.Exit(code=0))

    def Run(self, request: object, context: object) -> process_pb2.RunResponse:
        self.runs += 1
        return process_pb2.RunResponse(exit=process_pb2.Exit(code=0))


@pytest.fixture
def old_agent() -> Iterator[tuple[str, str, _Process]]:
    d = Path(tempfile.mkdtemp(prefix="cw-old-", dir="/tmp"))
    server = grpc.server(futures.ThreadPoolExecutor(4))
    process = _Process()  # type: ignore[abstract]  # an older agent: no runs
    agent_pb2_grpc.add_AgentServicer_to_server(_OldAgent(), server)
    process_pb2_grpc.add_ProcessServicer_to_server(process, server)
    server.add_insecure_port(f"unix:{d}/s.sock")
    server.start()
    token = d / "token"
    token.write_text("t" * 32)
    yield f"unix:{d}/s.sock", str(token), process
    server.stop(0)
    shutil.rmtree(d, ignore_errors=True)


def test_limits_on_an_agent_without_process_limits_fail_naming_the_capability(
    old_agent: tuple[str, str, _Process],
) -> None:
    target, token, process = old_agent
    with CoworkClient(target, token) as c, pytest.raises(Unsupported) as err:
        c.run(["true"], limits={"memory_bytes": 512 << 20})
    assert "'process.limits'" in str(err.value) and "\n" not in str(err.value)
    assert process.runs == 0  # nothing was run unlimited


def test_a_run_without_limits_needs_no_capability(old_agent: tuple[str, str, _Process]) -> None:
    target, token, process = old_agent
    with CoworkClient(target, token) as c:
        assert c.run(["true"]).exit_code == 0
    assert process.runs == 1


def test_exec_with_limits_fails_before_anything_is_started(
    old_agent: tuple[str, str, _Process],
) -> None:
    target, token, _ = old_agent
    with CoworkClient(target, token) as c, pytest.raises(Unsupported, match=r"process\.limits"):
        c.exec(["true"], limits={"pids": 8})


def test_following_symlinks_on_an_agent_without_files_symlink_fails_naming_it(
    old_agent: tuple[str, str, _Process],
) -> None:
    target, token, _ = old_agent
    with CoworkClient(target, token) as c, pytest.raises(Unsupported, match=r"'files\.symlink'"):
        c.stat("x", follow_symlinks=True)


def test_the_policy_on_an_agent_without_policy_fails_naming_it(
    old_agent: tuple[str, str, _Process],
) -> None:
    target, token, _ = old_agent
    with CoworkClient(target, token) as c, pytest.raises(Unsupported, match=r"'policy'"):
        c.policy.get()


def test_the_async_client_fails_the_same_way(old_agent: tuple[str, str, _Process]) -> None:
    target, token, _ = old_agent

    async def main() -> str:
        async with AsyncCoworkClient(target, token) as c:
            with pytest.raises(Unsupported) as err:
                await c.run(["true"], limits={"cpus": 1.0})
            return str(err.value)

    assert "'process.limits'" in asyncio.run(main())


def test_cli_memory_on_an_old_agent_is_one_line_and_a_non_zero_exit(
    old_agent: tuple[str, str, _Process],
) -> None:
    target, token, process = old_agent
    r = subprocess.run(
        [
            *(sys.executable, "-m", "host_client.cli", "--target", target, "--token-file", token),
            *("exec", "--memory", "512M", "--", "true"),
        ],
        capture_output=True,
        timeout=60,
    )
    err = r.stderr.decode()
    assert r.returncode != 0
    assert "Traceback" not in err and err.count("\n") == 1, err
    assert "process.limits" in err
    assert process.runs == 0


def test_this_agent_lists_the_capabilities_the_clients_gate_on(agent: AgentProc) -> None:
    with CoworkClient(agent.target, str(agent.token_file)) as c:
        caps = c.capabilities()
    assert {"process.limits", "files.symlink", "policy", "logs"} <= caps
