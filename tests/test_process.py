"""Process.Exec / Process.Run through the sync client against a real agent."""

from __future__ import annotations

import hashlib
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowork.agent.v1 import process_pb2, process_pb2_grpc
from cowork.defaults import AUTH_METADATA_KEY, AUTH_SCHEME
from host_client import CoworkClient
from host_client.errors import InvalidArgument, NotFound
from host_client.models import Exited, Output, Started

from .conftest import REPO, AgentProc, processes_with, wait_until


def test_exit_code_zero_is_reported(client: CoworkClient) -> None:
    assert client.run(["true"]).exit_code == 0


def test_nonzero_exit_code_is_passed_through(client: CoworkClient) -> None:
    assert client.run("exit 3").exit_code == 3


def test_missing_binary_is_not_found_with_its_name(client: CoworkClient) -> None:
    with pytest.raises(NotFound, match="command not found: no-such-binary-xyz"):
        client.run(["no-such-binary-xyz"])


def test_missing_binary_in_a_stream_is_not_found(client: CoworkClient) -> None:
    with pytest.raises(NotFound, match="command not found: no-such-binary-xyz"):
        list(client.exec(["no-such-binary-xyz"]))


def test_death_by_signal_reports_the_signal(client: CoworkClient) -> None:
    result = client.run("kill -9 $$")
    assert result.signal == signal.SIGKILL
    assert result.exit_code == 128 + signal.SIGKILL


def test_timeout_kills_and_reports_timed_out(client: CoworkClient) -> None:
    result = client.run(["sleep", "30"], timeout=0.3)
    assert result.timed_out
    assert result.exit_code == 124


def test_bad_cwd_is_not_found_with_the_path(client: CoworkClient) -> None:
    with pytest.raises(NotFound, match="/no/such/dir"):
        client.run(["true"], cwd="/no/such/dir")


def test_cwd_that_is_a_file_is_invalid(client: CoworkClient, workdir) -> None:
    f = workdir / "file"
    f.write_text("x")
    with pytest.raises(InvalidArgument, match="not a directory"):
        client.run(["true"], cwd=str(f))


def test_default_cwd_is_the_workspace_root(client: CoworkClient, agent: AgentProc) -> None:
    assert client.run(["pwd"]).output.strip() == str(agent.root)


def test_stdin_is_piped_and_closed(client: CoworkClient) -> None:
    result = client.exec(["sh", "-c", "cat; echo EOF-SEEN"], stdin=b"line1\nline2\n").collect()
    assert result.stdout == b"line1\nline2\nEOF-SEEN\n"


def test_stdin_from_an_iterable_of_chunks(client: CoworkClient) -> None:
    chunks = (bytes([i]) * 1000 for i in range(256))
    result = client.exec(["sha256sum"], stdin=chunks).collect()
    expected = hashlib.sha256(b"".join(bytes([i]) * 1000 for i in range(256))).hexdigest()
    assert result.output.split()[0] == expected


def test_stderr_is_kept_separate_from_stdout(client: CoworkClient) -> None:
    result = client.exec(["sh", "-c", "echo out; echo err >&2"]).collect()
    assert (result.stdout, result.stderr) == (b"out\n", b"err\n")


def test_events_arrive_as_started_output_exited(client: CoworkClient) -> None:
    events = list(client.exec(["echo", "hi"]))
    assert isinstance(events[0], Started) and events[0].pid > 0
    assert isinstance(events[-1], Exited) and events[-1].code == 0
    assert b"".join(e.data for e in events if isinstance(e, Output)) == b"hi\n"


def test_64_mib_of_binary_stdout_arrives_intact(client: CoworkClient) -> None:
    script = (
        'f=$(mktemp); head -c 67108864 /dev/urandom > "$f"; cat "$f"; sha256sum < "$f" >&2; rm "$f"'
    )
    digest = hashlib.sha256()
    size = 0
    err = bytearray()
    for ev in client.exec(["sh", "-c", script]):
        if isinstance(ev, Output) and ev.stream == "stdout":
            digest.update(ev.data)
            size += len(ev.data)
        elif isinstance(ev, Output):
            err += ev.data
    assert size == 64 * 1024 * 1024
    assert bytes(err).split()[0].decode() == digest.hexdigest()


def test_run_output_cap_reports_truncation(client: CoworkClient) -> None:
    result = client.run("head -c 100000 /dev/zero", output_limit=1000)
    assert len(result.stdout) == 1000
    assert result.truncated
    assert result.exit_code == 0


def test_pty_reports_size_and_resize(client: CoworkClient) -> None:
    stream = client.exec(
        ["sh", "-c", "stty size; read x; stty size"], interactive=True, pty=True, rows=30, cols=100
    )
    seen = bytearray()
    resized = False
    for ev in stream:
        if isinstance(ev, Output):
            seen += ev.data
            if b"30 100" in seen and not resized:
                resized = True
                stream.resize(40, 120)
                stream.write(b"go\n")
        if isinstance(ev, Exited):
            assert ev.code == 0
    assert b"30 100" in seen
    assert b"40 120" in seen


def test_pty_passes_term_and_is_a_tty(client: CoworkClient) -> None:
    stream = client.exec(
        ["sh", "-c", 'test -t 0 && test -t 1 && echo "tty $TERM"'], pty=True, term="vt100"
    )
    out = b"".join(ev.data for ev in stream if isinstance(ev, Output))
    assert b"tty vt100" in out
    assert stream.exit is not None and stream.exit.code == 0


def test_signal_reaches_the_process_group(client: CoworkClient) -> None:
    stream = client.exec(["sh", "-c", "echo ready; sleep 30"], interactive=True)
    for ev in stream:
        if isinstance(ev, Output) and b"ready" in ev.data:
            stream.signal(signal.SIGTERM)
    assert stream.exit is not None and stream.exit.signal == signal.SIGTERM


def test_200_concurrent_execs_all_return_their_own_output(client: CoworkClient) -> None:
    def one(i: int) -> tuple[int, str, int]:
        r = client.run(["sh", "-c", f"echo {i}; exit {i % 7}"])
        return i, r.output, r.exit_code

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(200)))
    assert all(out == f"{i}\n" and code == i % 7 for i, out, code in results)


def test_background_children_do_not_outlive_the_stream(client: CoworkClient) -> None:
    marker = f"cw-bg-{uuid.uuid4().hex}"
    ready = f"/tmp/{marker}.ready"  # the child runs before the command ends
    script = (
        f"(touch {ready}; exec -a {marker} sleep 300) >/dev/null 2>&1 & "
        f"until [ -e {ready} ]; do sleep 0.01; done; rm {ready}; echo started"
    )
    result = client.run(["bash", "-c", script])  # bash: dash has no `exec -a`
    assert result.output == "started\n"
    assert wait_until(lambda: not processes_with(marker), 3.0)


def test_cancelled_stream_kills_the_process(client: CoworkClient) -> None:
    marker = f"cw-cancel-{uuid.uuid4().hex}"
    stream = client.exec(["bash", "-c", f"echo go; exec -a {marker} sleep 300"])
    for ev in stream:
        if isinstance(ev, Output):
            assert wait_until(lambda: bool(processes_with(marker)), 5.0)
            break  # leaving the iteration cancels the call
    assert wait_until(lambda: not processes_with(marker), 3.0)


def test_sigkilled_client_leaves_no_process_behind(agent: AgentProc) -> None:
    marker = f"cw-orphan-{uuid.uuid4().hex}"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "host_client.cli",
            "--target",
            agent.target,
            "--token-file",
            str(agent.token_file),
            "exec",
            "--",
            "bash",
            "-c",
            f"echo up; exec -a {marker} sleep 300",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert cli.stdout is not None
    assert cli.stdout.readline() == b"up\n"
    assert wait_until(lambda: bool(processes_with(marker)), 5.0)
    cli.kill()
    cli.wait()
    cli.stdout.close()
    assert wait_until(lambda: not processes_with(marker), 2.0)


def test_term_resistant_process_is_killed_after_grace(client: CoworkClient) -> None:
    marker = f"cw-stubborn-{uuid.uuid4().hex}"
    script = f"trap '' TERM; echo armed; exec -a {marker} sh -c \"trap '' TERM; sleep 300\""
    stream = client.exec(["bash", "-c", script])
    for ev in stream:
        if isinstance(ev, Output):
            assert wait_until(lambda: bool(processes_with(marker)), 5.0)
            break
    assert wait_until(lambda: not processes_with(marker), 5.0)


def test_empty_command_is_invalid(client: CoworkClient) -> None:
    with pytest.raises(InvalidArgument):
        client.run([])


def test_stdin_flow_control_does_not_lose_bytes(client: CoworkClient) -> None:
    data = bytes(range(256)) * 40000  # ~10 MiB, more than any pipe buffer
    result = client.exec(["sh", "-c", "sleep 0.2; sha256sum"], stdin=data).collect()
    assert result.output.split()[0] == hashlib.sha256(data).hexdigest()


_arg = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(args=st.lists(_arg, max_size=6))
def test_argv_reaches_the_process_unchanged(client: CoworkClient, args: list[str]) -> None:
    script = 'for a in "$@"; do printf "%s\\0" "$a"; done'
    result = client.run(["sh", "-c", script, "sh", *args])
    got = result.stdout.split(b"\0")[:-1] if result.stdout else []
    assert [g.decode() for g in got] == args


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    key=st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True),
    value=_arg,
)
def test_env_values_reach_the_process_unchanged(client: CoworkClient, key: str, value: str) -> None:
    result = client.run(["printenv", key], env={key: value})
    assert result.stdout == value.encode() + b"\n"


def test_agent_secrets_are_not_in_the_process_environment(client: CoworkClient) -> None:
    assert "COWORK_" not in client.run(["env"]).output


def test_exec_from_many_threads_on_one_stream_api(client: CoworkClient) -> None:
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                assert client.exec(["echo", "x"]).collect().stdout == b"x\n"
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors


def test_sigkilled_client_of_a_unary_run_leaves_no_process(agent: AgentProc) -> None:
    marker = f"cw-run-orphan-{uuid.uuid4().hex}"
    code = (
        "import sys; from host_client import CoworkClient; "
        f"c = CoworkClient({agent.target!r}, {str(agent.token_file)!r}); "
        f"c.run(['bash', '-c', 'exec -a {marker} sleep 300'])"
    )
    cli = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    assert wait_until(lambda: bool(processes_with(marker)), 10.0)
    cli.kill()
    cli.wait()
    assert wait_until(lambda: not processes_with(marker), 2.0)


# -- control messages after `start` (process.proto, ExecRequest) ------------------------------
class RawExec:
    """One Exec call driven message by message through the generated stub."""

    def __init__(self, agent: AgentProc, spec: process_pb2.ProcessSpec) -> None:
        self._queue: queue.Queue[process_pb2.ExecRequest | None] = queue.Queue()
        self._queue.put(process_pb2.ExecRequest(start=spec))
        md = ((AUTH_METADATA_KEY, f"{AUTH_SCHEME} {agent.token}"),)
        self._channel = grpc.insecure_channel(agent.target)
        stub = process_pb2_grpc.ProcessStub(self._channel)
        self.call = stub.Exec(iter(self._queue.get, None), metadata=md, timeout=30)
        self._responses: Iterator[process_pb2.ExecResponse] = iter(self.call)

    def send(self, **msg: Any) -> None:
        self._queue.put(process_pb2.ExecRequest(**msg))

    def half_close(self) -> None:
        self._queue.put(None)

    def next(self) -> process_pb2.ExecResponse:
        return next(self._responses)

    def rest(self) -> tuple[bytes, process_pb2.Exit | None]:
        """Output and exit of the remaining responses (grpc.RpcError if the call fails)."""
        out = b""
        for r in self._responses:
            out += r.stdout + r.stderr
            if r.WhichOneof("msg") == "exit":
                return out, r.exit
        return out, None

    def close(self) -> None:
        self.half_close()
        self._channel.close()


@pytest.fixture
def raw_exec(agent: AgentProc) -> Iterator[Callable[..., RawExec]]:
    calls: list[RawExec] = []

    def start(**spec: Any) -> RawExec:
        call = RawExec(agent, process_pb2.ProcessSpec(**spec))
        calls.append(call)
        assert call.next().WhichOneof("msg") == "started"
        return call

    yield start
    for call in calls:
        call.close()


@pytest.mark.parametrize(
    "ignored",
    [
        {"resize": process_pb2.TerminalSize(rows=50, cols=100)},  # no PTY
        {"close_stdin": True},  # a second time: after the one below
        {"stdin": b"after close"},
        process_pb2.ExecRequest(),  # no field set: a newer client's kind of message
    ],
    ids=["resize-without-pty", "close-stdin-again", "stdin-after-close", "empty-message"],
)
def test_an_ignored_control_message_leaves_the_stream_working(
    raw_exec: Callable[..., RawExec], ignored: Any
) -> None:
    call = raw_exec(argv=["sh", "-c", "cat; sleep 0.2; echo end"], stdin=True)
    call.send(stdin=b"before\n")
    call.send(close_stdin=True)
    if isinstance(ignored, process_pb2.ExecRequest):
        call._queue.put(ignored)
    else:
        call.send(**ignored)
    call.half_close()
    out, exit_ = call.rest()
    assert out == b"before\nend\n" and exit_ is not None and exit_.code == 0


def test_stdin_without_stdin_mode_is_ignored(raw_exec: Callable[..., RawExec]) -> None:
    call = raw_exec(argv=["sh", "-c", "cat; echo end"])  # stdin is /dev/null
    call.send(stdin=b"dropped\n")
    call.send(signal=signal.SIGCONT)  # a later message is still acted on
    out, exit_ = call.rest()
    assert out == b"end\n" and exit_ is not None and exit_.code == 0


def test_signals_still_arrive_after_stdin_nobody_reads(
    raw_exec: Callable[..., RawExec],
) -> None:
    """PTY: the process closed its terminal, so stdin goes nowhere (a write error there, on
    kernels that give one, is dropped too); the signal after it must still arrive."""
    script = 'trap "exit 7" INT; exec </dev/null >/dev/null 2>&1; while :; do sleep 0.05; done'
    call = raw_exec(argv=["sh", "-c", script], pty=True)
    time.sleep(0.3)  # the terminal is closed by now
    call.send(stdin=b"nobody reads this\n")
    time.sleep(0.1)
    call.send(signal=signal.SIGINT)
    _, exit_ = call.rest()
    assert exit_ is not None and exit_.code == 7


def test_a_refused_control_message_stops_the_process(raw_exec: Callable[..., RawExec]) -> None:
    marker = f"cw-refused-{uuid.uuid4().hex}"
    call = raw_exec(argv=["bash", "-c", f"exec -a {marker} sleep 300"], stdin=True)
    assert wait_until(lambda: bool(processes_with(marker)), 5.0)
    call.send(signal=0)
    with pytest.raises(grpc.RpcError) as info:
        call.rest()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "signal 0" in (info.value.details() or "")
    assert wait_until(lambda: not processes_with(marker), 5.0)


def test_a_timeout_over_366_days_is_invalid_argument(client: CoworkClient) -> None:
    with pytest.raises(InvalidArgument, match="timeout_ms must be at most"):
        client.run(["true"], timeout=400 * 24 * 3600)
    with pytest.raises(InvalidArgument, match="timeout_ms must be at most"):
        list(client.exec(["true"], timeout=400 * 24 * 3600))


def test_run_output_limit_over_what_one_message_holds_is_invalid_argument(
    client: CoworkClient,
) -> None:
    with pytest.raises(InvalidArgument, match="output_limit must be at most 4194304"):
        client.run(["true"], output_limit=16 * 1024 * 1024)


def test_run_output_over_one_message_comes_back_truncated(client: CoworkClient) -> None:
    """The streams together keep what one message holds (the old 16 MiB default per stream
    did not fit the 4 MiB message cap: RESOURCE_EXHAUSTED)."""
    result = client.run("head -c 5000000 /dev/zero; head -c 5000000 /dev/zero >&2")
    assert len(result.stdout) + len(result.stderr) == 4 * 1024 * 1024
    assert result.truncated and result.exit_code == 0


def test_run_output_under_one_message_comes_back_whole(client: CoworkClient) -> None:
    result = client.run("head -c 3000000 /dev/zero")
    assert len(result.stdout) == 3000000 and not result.truncated
