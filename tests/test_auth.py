"""Every RPC but the health check refuses a missing or wrong token."""

from __future__ import annotations

import os
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowork.agent.v1 import agent_pb2, claude_pb2, files_pb2, process_pb2

from .conftest import AgentProc

SERVICES = [
    agent_pb2.DESCRIPTOR.services_by_name["Agent"],
    process_pb2.DESCRIPTOR.services_by_name["Process"],
    files_pb2.DESCRIPTOR.services_by_name["Files"],
    claude_pb2.DESCRIPTOR.services_by_name["Claude"],
]
METHODS = [(s, m) for s in SERVICES for m in s.methods]
BAD_METADATA = {
    "missing": (),
    "wrong": (("authorization", "Bearer " + "0" * 64),),
    "no-scheme": (("authorization", "0" * 64),),
}


def _call(channel: grpc.Channel, service, method, metadata) -> grpc.StatusCode:
    path = f"/{service.full_name}/{method.name}"
    req = b""  # an empty message is valid for every request type
    ident = lambda b: b  # noqa: E731
    try:
        if method.client_streaming and method.server_streaming:
            list(
                channel.stream_stream(path, ident, ident)(iter([req]), metadata=metadata, timeout=5)
            )
        elif method.client_streaming:
            channel.stream_unary(path, ident, ident)(iter([req]), metadata=metadata, timeout=5)
        elif method.server_streaming:
            list(channel.unary_stream(path, ident, ident)(req, metadata=metadata, timeout=5))
        else:
            channel.unary_unary(path, ident, ident)(req, metadata=metadata, timeout=5)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("how", sorted(BAD_METADATA))
@pytest.mark.parametrize("service,method", METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_rpc_without_valid_token_is_unauthenticated(agent: AgentProc, service, method, how) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        assert _call(ch, service, method, BAD_METADATA[how]) == grpc.StatusCode.UNAUTHENTICATED


def test_reflection_needs_the_token(agent: AgentProc) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(agent.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        req = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.RpcError) as err:
            list(stub.ServerReflectionInfo(iter([req]), timeout=5))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        md = (("authorization", f"Bearer {agent.token}"),)
        names = [
            s.name
            for r in stub.ServerReflectionInfo(iter([req]), metadata=md, timeout=5)
            for s in r.list_services_response.service
        ]
        assert "cowork.agent.v1.Process" in names


def test_health_is_open_without_a_token(agent: AgentProc) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_refusals_are_in_the_audit_log(agent: AgentProc) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        _call(ch, SERVICES[0], SERVICES[0].methods[0], ())
    assert any('"UNAUTHENTICATED"' in line for line in agent.log_lines())


def test_unix_socket_is_owner_only(agent: AgentProc) -> None:
    mode = stat.S_IMODE(os.stat(agent.socket).st_mode)
    assert mode == 0o600
    assert stat.S_IMODE(os.stat(agent.socket.parent).st_mode) == 0o700


def test_agent_refuses_a_world_readable_token_file(tmp_path) -> None:
    import subprocess
    import sys

    tok = tmp_path / "tok"
    tok.write_text("x" * 40)
    tok.chmod(0o644)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # root here: processes may run as root
            "--listen",
            f"unix:{tmp_path}/s",
            "--token-file",
            str(tok),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "world-readable" in r.stderr and "Traceback" not in r.stderr


def test_agent_refuses_a_non_loopback_tcp_listener(tmp_path) -> None:
    import subprocess
    import sys

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
            "tcp:0.0.0.0:7999",
            "--token-file",
            str(tok),
            "--root",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2 and "non-loopback" in r.stderr and "Traceback" not in r.stderr
