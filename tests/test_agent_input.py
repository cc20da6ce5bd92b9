"""Whatever a client sends, the agent answers with the status its input deserves.

Standard services behave as standard (Health.Watch streams), bytes that are not a
message get INVALID_ARGUMENT, OS refusals a request can provoke get the status a client
can act on (never INTERNAL), bad Exec control messages end the call with their status,
and a stream the client abandons leaves no traceback. (Random input: test_fuzz.py.)
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import tempfile
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowork.agent.v1 import files_pb2, files_pb2_grpc, process_pb2, process_pb2_grpc
from guest_agent.errors import from_oserror
from host_client import CoworkClient

from .conftest import AgentProc, make_agent


def _md(agent: AgentProc) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {agent.token}"),)


def _tracebacks(agent: AgentProc) -> list[str]:
    return [line for line in agent.log_lines() if "Traceback" in line]


# -- standard services --------------------------------------------------------------------


def test_health_watch_streams_serving(agent: AgentProc) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = next(stream)
        stream.cancel()
    assert first.status == health_pb2.HealthCheckResponse.SERVING


def test_health_watch_logs_no_traceback(own_agent: AgentProc) -> None:
    with grpc.insecure_channel(own_agent.target) as ch:
        stream = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=10)
        next(stream)
        stream.cancel()
    assert _tracebacks(own_agent) == []


def test_health_list_reports_the_serving_status(agent: AgentProc) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).List(health_pb2.HealthListRequest(), timeout=10)
    assert resp.statuses[""].status == health_pb2.HealthCheckResponse.SERVING


# -- malformed requests -------------------------------------------------------------------


def _raw_unary(ch: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable:  # type: ignore[type-arg]
    return ch.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


@pytest.mark.parametrize(
    "payload",
    [b"\xff\xff\xff", b"\x0a\x02\xff\xfe"],
    ids=["corrupt-wire-format", "string-field-not-utf8"],
)
def test_a_request_that_does_not_parse_is_invalid_argument(
    own_agent: AgentProc, payload: bytes
) -> None:
    with grpc.insecure_channel(own_agent.target) as ch, pytest.raises(grpc.RpcError) as ei:
        _raw_unary(ch, "/cowork.agent.v1.Files/Stat")(payload, metadata=_md(own_agent))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in (ei.value.details() or "")
    assert _tracebacks(own_agent) == []


def test_a_malformed_message_in_a_client_stream_is_invalid_argument(agent: AgentProc) -> None:
    header = files_pb2.WriteRequest(header=files_pb2.WriteHeader(path="malformed-stream.txt"))
    with grpc.insecure_channel(agent.target) as ch:
        write = ch.stream_unary(
            "/cowork.agent.v1.Files/Write", request_serializer=bytes, response_deserializer=bytes
        )
        with pytest.raises(grpc.RpcError) as ei:
            write(iter([header.SerializeToString(), b"\xff\xff\xff"]), metadata=_md(agent))
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert not (agent.root / "malformed-stream.txt").exists()


# -- OS refusals a request can provoke ----------------------------------------------------


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errno.EXDEV, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.E2BIG, grpc.StatusCode.INVALID_ARGUMENT),
        (errno.EINVAL, grpc.StatusCode.INVALID_ARGUMENT),
        (errno.EFBIG, grpc.StatusCode.OUT_OF_RANGE),
        (errno.EOVERFLOW, grpc.StatusCode.OUT_OF_RANGE),
        (errno.EBUSY, grpc.StatusCode.FAILED_PRECONDITION),
        (errno.EMLINK, grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
    ids=errno.errorcode.get,
)
def test_errnos_a_request_can_cause_are_not_internal(err: int, code: grpc.StatusCode) -> None:
    mapped = from_oserror(OSError(err, os.strerror(err)), "/workspace/x")
    assert mapped.code == code and mapped.message.endswith(": /workspace/x")


def test_rename_a_directory_into_itself_is_invalid_argument(client: CoworkClient) -> None:
    client.mkdir("into-itself/sub")
    with pytest.raises(Exception) as ei:
        client.rename("into-itself", "into-itself/sub/moved")
    assert getattr(ei.value, "code", "") == "INVALID_ARGUMENT"
    assert "into itself" in str(ei.value)


def test_rename_onto_a_non_empty_directory_is_failed_precondition(client: CoworkClient) -> None:
    client.mkdir("rename-src")
    client.write_file("rename-dst/keep.txt", "x")
    with pytest.raises(Exception) as ei:
        client.rename("rename-src", "rename-dst", overwrite=True)
    assert getattr(ei.value, "code", "") == "FAILED_PRECONDITION"


def test_rename_across_filesystems_is_failed_precondition_saying_so() -> None:
    other = Path(tempfile.mkdtemp(prefix="cw-xdev-", dir="/dev/shm"))
    a = make_agent(["--root", str(other)])
    try:
        assert os.stat(a.root).st_dev != os.stat(other).st_dev
        with a.client() as c:
            c.write_file(str(a.root / "xdev.txt"), "x")
            with pytest.raises(Exception) as ei:
                c.rename(str(a.root / "xdev.txt"), str(other / "xdev.txt"))
        assert getattr(ei.value, "code", "") == "FAILED_PRECONDITION"
        assert "different filesystems" in str(ei.value)
        assert _tracebacks(a) == []
    finally:
        a.stop()
        shutil.rmtree(other, ignore_errors=True)


def test_argv_too_big_for_the_os_is_invalid_argument(client: CoworkClient) -> None:
    with pytest.raises(Exception) as ei:
        client.run(["true", "a" * (200 * 1024)])
    assert getattr(ei.value, "code", "") == "INVALID_ARGUMENT"
    assert "too big for the OS" in str(ei.value)


def _exec_with(agent: AgentProc, *control: process_pb2.ExecRequest) -> grpc.RpcError:
    start = process_pb2.ExecRequest(
        start=process_pb2.ProcessSpec(argv=["sleep", "30"], stdin=True, pty=True)
    )
    with grpc.insecure_channel(agent.target) as ch:
        stub = process_pb2_grpc.ProcessStub(ch)
        with pytest.raises(grpc.RpcError) as ei:
            for _ in stub.Exec(iter([start, *control]), metadata=_md(agent), timeout=20):
                pass
    return ei.value


@pytest.mark.parametrize(
    "msg",
    [
        process_pb2.ExecRequest(signal=2**31 - 1),
        process_pb2.ExecRequest(signal=-9),
        process_pb2.ExecRequest(resize=process_pb2.TerminalSize(rows=70000, cols=80)),
        process_pb2.ExecRequest(start=process_pb2.ProcessSpec(argv=["true"])),
    ],
    ids=["signal-too-big", "signal-negative", "resize-too-big", "second-start"],
)
def test_a_bad_exec_control_message_ends_the_call_with_invalid_argument(
    agent: AgentProc, msg: process_pb2.ExecRequest
) -> None:
    err = _exec_with(agent, msg)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()


# -- abandoned streams --------------------------------------------------------------------


def test_log_streams_cut_off_while_sending_leave_no_traceback(own_agent: AgentProc) -> None:
    """Clients that go away while the agent is sending them entries: grpc leaves each
    stream's generator suspended, and asyncio closes it later in another context."""
    from cowork.agent.v1 import policy_pb2, policy_pb2_grpc

    stop = threading.Event()

    def busy() -> None:  # a steady flow of new audit entries to follow
        with grpc.insecure_channel(own_agent.target) as busy_ch:
            files = files_pb2_grpc.FilesStub(busy_ch)
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    files.Stat(files_pb2.StatRequest(path="nope"), metadata=_md(own_agent))

    worker = threading.Thread(target=busy)
    worker.start()
    try:
        with grpc.insecure_channel(own_agent.target) as ch:
            stub = policy_pb2_grpc.PolicyStub(ch)
            for _ in range(40):
                req = policy_pb2.LogsRequest(follow=True, tail=1000)
                stream = stub.Logs(req, metadata=_md(own_agent), timeout=5)
                for _entry in itertools.islice(stream, 50):
                    pass
                stream.cancel()
    finally:
        stop.set()
        worker.join()
    with own_agent.client() as c:  # later calls: the agent collects and finalizes
        for _ in range(20):
            c.run(["true"])
    assert _tracebacks(own_agent) == []


# -- limits the kernel cannot take ----------------------------------------------------


@pytest.mark.parametrize(
    ("yaml", "needle"),
    [
        ("limits: {memory: '" + "9" * 400 + "M'}", "larger than"),
        ("limits: {memory: 99999999999999999999999999T}", "larger than"),
        (f"limits: {{memory: {2**70}}}", "larger than"),
        ("limits: {pids: 5000000}", "from 0 to 4194304"),
        ("limits: {max: {pids: 4194305}}", "from 0 to 4194304"),
        ("limits: {cpus: .nan}", "cpus must be a number"),
        ("limits: {cpus: .inf}", "cpus must be a number"),
        ("[" * 5000, "nested too deeply"),
    ],
    ids=[
        "memory-digits",
        "memory-T",
        "memory-int",
        "pids",
        "max-pids",
        "cpus-nan",
        "cpus-inf",
        "deep",
    ],
)
def test_a_policy_the_kernel_cannot_apply_is_invalid_argument(
    own_agent: AgentProc, yaml: str, needle: str
) -> None:
    with own_agent.client() as c:
        with pytest.raises(Exception) as ei:
            c.set_policy(yaml=yaml)
        assert getattr(ei.value, "code", "") == "INVALID_ARGUMENT"
        assert needle in str(ei.value)
    assert _tracebacks(own_agent) == []


@pytest.mark.parametrize(
    ("limits", "needle"),
    [
        ({"pids": 4194305}, "limits.pids"),
        ({"memory_bytes": 2**63}, "limits.memory_bytes"),
        ({"cpus": float("nan")}, "limits.cpus"),
        ({"cpus": 1e7}, "limits.cpus"),
    ],
    ids=["pids", "memory", "cpus-nan", "cpus-huge"],
)
def test_run_limits_the_kernel_cannot_take_are_invalid_argument(
    client: CoworkClient, limits: dict[str, float], needle: str
) -> None:
    with pytest.raises(Exception) as ei:
        client.run(["true"], limits=limits)
    assert getattr(ei.value, "code", "") == "INVALID_ARGUMENT"
    assert needle in str(ei.value)


def test_running_a_file_that_is_not_a_program_is_failed_precondition(
    client: CoworkClient, agent: AgentProc
) -> None:
    client.write_file("not-a-program", b"\x7fELF garbage", mode=0o755)
    with pytest.raises(Exception) as ei:
        client.run(["./not-a-program"])
    assert getattr(ei.value, "code", "") == "FAILED_PRECONDITION"
    assert "Exec format error" in str(ei.value)
