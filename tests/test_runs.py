"""Runs with ids (issue #12): detach, the journal, List/Attach/Signal/Kill/Wait, against a
real agent over its real socket; clients in other processes where the test kills them."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cowork.agent.v1 import process_pb2, process_pb2_grpc
from host_client import CoworkClient
from host_client.errors import CoworkError, NotFound
from host_client.models import Exited, Gap, Output, Started

from .conftest import REPO, AgentProc, make_agent
from .test_cli import ctl, one_line_error

# A generated stream: 2000 numbered lines of 64 bytes (128000 bytes), its checksum known.
GENERATE = "i=0; while [ $i -lt 2000 ]; do printf '%063d\\n' $i; i=$((i+1)); done"
EXPECTED = b"".join(b"%063d\n" % i for i in range(2000))


def start_detached(c: CoworkClient, command: str | list[str], **kw: object) -> str:
    stream = c.process.exec(command, detach=True, **kw)  # type: ignore[arg-type]
    events = iter(stream)
    first = next(events)
    stream.cancel()
    assert isinstance(first, Started) and first.run_id
    return first.run_id


def replay(c: CoworkClient, run_id: str, from_offset: int = 0) -> tuple[bytes, bytes, Exited]:
    out: list[bytes] = []
    err: list[bytes] = []
    exit_ev = None
    for ev in c.process.attach(run_id, from_offset=from_offset):
        if isinstance(ev, Output):
            (out if ev.stream == "stdout" else err).append(ev.data)
        elif isinstance(ev, Exited):
            exit_ev = ev
    assert exit_ev is not None
    return b"".join(out), b"".join(err), exit_ev


@pytest.fixture
def policy_agent(request: pytest.FixtureRequest) -> Iterator[AgentProc]:
    """A fresh agent whose policy is the test's `runs:` section (parametrize indirectly)."""

    def write_policy(a: AgentProc) -> None:
        (a.dir / "policy.yaml").write_text(textwrap.dedent(request.param))
        a.extra_args += ["--policy", str(a.dir / "policy.yaml")]

    a = make_agent(before_start=write_policy)
    yield a
    a.stop()


def test_every_exec_has_a_run_id(client: CoworkClient) -> None:
    stream = client.process.exec(["true"])
    first = next(iter(stream))
    assert isinstance(first, Started) and len(first.run_id) == 12
    stream.cancel()


def test_detached_run_ended_while_nobody_attached_reports_exit_and_full_output(
    client: CoworkClient,
) -> None:
    run_id = start_detached(client, GENERATE + "; echo done >&2; exit 7")
    info = client.process.wait(run_id)
    assert info.state == "exited" and info.exit is not None and info.exit.code == 7
    out, err, exit_ev = replay(client, run_id)
    assert hashlib.sha256(out).digest() == hashlib.sha256(EXPECTED).digest()
    assert err == b"done\n" and exit_ev.code == 7
    assert [r.id for r in client.process.runs()].count(run_id) == 1


def test_reattach_from_the_offset_seen_loses_and_repeats_nothing(client: CoworkClient) -> None:
    # The run waits for a line on stdin between its halves, so the first client surely
    # leaves in the middle of the stream.
    run_id = start_detached(client, GENERATE + "; read x; " + GENERATE, interactive=True)
    first: list[bytes] = []
    stream = client.process.attach(run_id)
    seen = 0
    for ev in stream:
        if isinstance(ev, Output):
            first.append(ev.data)
            seen += len(ev.data)
            if seen >= len(EXPECTED):
                break
    offset = stream.offset
    stream.cancel()
    assert offset == seen == len(EXPECTED)
    poke = client.process.attach(run_id, tail=True, interactive=True)
    events = iter(poke)
    next(events)
    poke.write(b"go\n")
    rest, _, exit_ev = replay(client, run_id, from_offset=offset)
    poke.cancel()
    assert b"".join(first) + rest == EXPECTED + EXPECTED and exit_ev.code == 0


def _client_script(agent: AgentProc, run_id: str) -> str:
    return textwrap.dedent(
        f"""
        import sys
        from host_client import CoworkClient
        from host_client.models import Output
        c = CoworkClient({agent.target!r}, {str(agent.token_file)!r})
        for ev in c.process.attach({run_id!r}, from_offset=0):
            if isinstance(ev, Output):
                sys.stdout.write("got\\n"); sys.stdout.flush()
        """
    )


@pytest.mark.parametrize("how", ["exits", "sigkill"])
def test_detached_run_survives_its_client_and_replays_whole(agent: AgentProc, how: str) -> None:
    with agent.client() as c:
        # Output, then a pause until the test writes to it through another attach.
        run_id = start_detached(c, GENERATE + "; read x; " + GENERATE, interactive=True)
        proc = subprocess.Popen(
            [sys.executable, "-c", _client_script(agent, run_id)],
            cwd=REPO,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"got\n"  # attached and receiving
        if how == "sigkill":
            proc.kill()
        else:
            proc.terminate()
        proc.wait()
        proc.stdout.close()
        assert c.process.runs()[-1].state == "running" or any(
            r.id == run_id and r.state == "running" for r in c.process.runs()
        )
        poke = c.process.attach(run_id, tail=True, interactive=True)
        poke_events = iter(poke)
        next(poke_events)
        poke.write(b"go\n")
        out, _, exit_ev = replay(c, run_id)
        poke.cancel()
    assert out == EXPECTED + EXPECTED and exit_ev.code == 0


def test_stream_without_detach_still_dies_with_it(client: CoworkClient) -> None:
    stream = client.process.exec(["sleep", "60"])
    first = next(iter(stream))
    assert isinstance(first, Started)
    stream.cancel()
    try:
        client.process.wait(first.run_id)  # still being stopped
    except NotFound:
        pass  # already gone (a run without detach is not kept)
    assert first.run_id not in [r.id for r in client.process.runs()]
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)


def test_running_exec_is_listed_and_can_be_killed_by_id(client: CoworkClient) -> None:
    stream = client.process.exec(["sleep", "60"])
    events = iter(stream)
    first = next(events)
    assert isinstance(first, Started)
    listed = {r.id: r for r in client.process.runs()}[first.run_id]
    assert listed.state == "running" and not listed.detached and listed.argv == ["sleep", "60"]
    client.process.kill(first.run_id)
    last = list(events)[-1]
    assert isinstance(last, Exited) and last.signal == signal.SIGTERM


def test_kill_stops_a_detached_run_and_reports_it(client: CoworkClient) -> None:
    run_id = start_detached(client, ["sleep", "60"])
    info = client.process.kill(run_id)
    assert info.state == "exited" and info.reason == "killed"
    assert info.exit is not None and info.exit.signal == signal.SIGTERM


def test_signal_reaches_a_detached_run(client: CoworkClient) -> None:
    run_id = start_detached(
        client, "trap 'echo got-usr1; exit 3' USR1; while :; do sleep 0.05; done"
    )
    # The trap is set once the shell runs its loop: a replay shows nothing until then.
    info = client.process.signal_run(run_id, signal.SIGUSR1)
    assert info.id == run_id
    # The shell may have taken the signal before its trap was set (then it died of it).
    done = client.process.wait(run_id)
    assert done.exit is not None
    assert done.exit.code == 3 or done.exit.signal == signal.SIGUSR1


def test_stdin_reaches_a_detached_run_through_attach(client: CoworkClient) -> None:
    run_id = start_detached(client, ["cat"], interactive=True)
    stream = client.process.attach(run_id, interactive=True)
    events = iter(stream)
    next(events)
    stream.write(b"hello\n")
    stream.close_stdin()
    got = b"".join(ev.data for ev in events if isinstance(ev, Output))
    assert got == b"hello\n" and stream.exit is not None and stream.exit.code == 0


def test_attach_by_unique_prefix(client: CoworkClient) -> None:
    run_id = start_detached(client, ["echo", "hi"])
    out, _, _ = replay(client, run_id[:8])
    assert out == b"hi\n"


@pytest.mark.parametrize("call", ["attach", "kill", "wait", "signal"])
def test_unknown_run_id_is_not_found(client: CoworkClient, call: str) -> None:
    with pytest.raises(NotFound, match="no such run: ffffffffffff"):
        if call == "attach":
            list(client.process.attach("ffffffffffff"))
        elif call == "kill":
            client.process.kill("ffffffffffff")
        elif call == "wait":
            client.process.wait("ffffffffffff")
        else:
            client.process.signal_run("ffffffffffff", 15)


def test_attach_to_a_run_without_detach_is_failed_precondition(client: CoworkClient) -> None:
    stream = client.process.exec(["sleep", "60"])
    events = iter(stream)
    first = next(events)
    assert isinstance(first, Started)
    try:
        with pytest.raises(CoworkError, match="not detached"):
            list(client.process.attach(first.run_id))
    finally:
        stream.cancel()


def test_attach_past_the_end_is_out_of_range(client: CoworkClient) -> None:
    run_id = start_detached(client, ["echo", "hi"])
    client.process.wait(run_id)
    with pytest.raises(CoworkError, match="past the end"):
        list(client.process.attach(run_id, from_offset=4))


def test_kill_of_an_ended_run_is_failed_precondition(client: CoworkClient) -> None:
    run_id = start_detached(client, ["true"])
    client.process.wait(run_id)
    with pytest.raises(CoworkError, match="is not running"):
        client.process.kill(run_id)


def test_run_cannot_detach(agent: AgentProc) -> None:
    with grpc.insecure_channel(agent.target) as ch:
        stub = process_pb2_grpc.ProcessStub(ch)
        md = (("authorization", f"Bearer {agent.token}"),)
        spec = process_pb2.ProcessSpec(argv=["true"], detach=True)
        with pytest.raises(grpc.RpcError) as err:
            stub.Run(process_pb2.RunRequest(spec=spec), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_refused_attach_message_leaves_the_run_going(client: CoworkClient) -> None:
    run_id = start_detached(client, ["sleep", "60"])
    stream = client.process.attach(run_id, interactive=True)
    events = iter(stream)
    next(events)
    stream.signal(999)
    with pytest.raises(CoworkError, match="not a signal number"):
        list(events)
    assert {r.id: r for r in client.process.runs()}[run_id].state == "running"
    client.process.kill(run_id)


@pytest.mark.parametrize("policy_agent", ["runs: {journal: 64KiB}\n"], indirect=True)
def test_journal_past_its_cap_replays_with_a_gap_marker(policy_agent: AgentProc) -> None:
    with policy_agent.client() as c:
        run_id = start_detached(c, GENERATE + "; " + GENERATE + "; " + GENERATE)
        info = c.process.wait(run_id)
        events = list(c.process.attach(run_id, from_offset=0))
    assert isinstance(events[1], Gap) and events[1].from_offset == 0
    first = events[1].first_offset
    out = b"".join(e.data for e in events if isinstance(e, Output))
    whole = EXPECTED * 3
    assert out == whole[first:] and first > 0
    assert info.journal_bytes <= 64 * 1024 and info.journal_end == len(whole)
    journal = Path(f"{policy_agent.socket}.journal") / run_id
    on_disk = sum(p.stat().st_size for p in journal.glob("seg-*"))
    assert on_disk <= 64 * 1024


@pytest.mark.parametrize("policy_agent", ["runs: {detached: 1}\n"], indirect=True)
def test_too_many_detached_runs_is_resource_exhausted_and_keeps_the_first(
    policy_agent: AgentProc,
) -> None:
    with policy_agent.client() as c:
        run_id = start_detached(c, "echo one; read x; echo two", interactive=True)
        with pytest.raises(CoworkError, match="too many detached runs") as err:
            start_detached(c, ["true"])
        assert err.value.code == "RESOURCE_EXHAUSTED"
        poke = c.process.attach(run_id, tail=True, interactive=True)
        poke_events = iter(poke)
        next(poke_events)
        poke.write(b"\n")
        out, _, _ = replay(c, run_id)
        poke.cancel()
    assert out == b"one\ntwo\n"


@pytest.mark.parametrize(
    "policy_agent", ["runs: {journal: 64KiB, journal_total: 64KiB}\n"], indirect=True
)
def test_journal_space_exhausted_is_resource_exhausted(policy_agent: AgentProc) -> None:
    with policy_agent.client() as c:
        run_id = start_detached(c, ["sleep", "60"])
        with pytest.raises(CoworkError, match="journal space exhausted") as err:
            start_detached(c, ["true"])
        assert err.value.code == "RESOURCE_EXHAUSTED"
        c.process.kill(run_id)
        # Ended, the first run's journal holds what it wrote (nothing): room again.
        second = start_detached(c, ["true"])
        assert c.process.wait(second).state == "exited"


@pytest.mark.parametrize("policy_agent", ["runs: {keep: 0s}\n"], indirect=True)
def test_finished_run_is_forgotten_after_keep(policy_agent: AgentProc) -> None:
    with policy_agent.client() as c:
        run_id = start_detached(c, ["echo", "hi"])
        c.process.wait(run_id)
        assert run_id not in [r.id for r in c.process.runs()]
    assert not (Path(f"{policy_agent.socket}.journal") / run_id).exists()


def test_agent_restart_reports_detached_runs_as_lost_with_their_output(
    own_agent: AgentProc,
) -> None:
    with own_agent.client() as c:
        run_id = start_detached(c, "echo before; sleep 60")
        stream = c.process.attach(run_id)
        for ev in stream:
            if isinstance(ev, Output):
                break
        stream.cancel()
    own_agent.proc.kill()  # type: ignore[union-attr]
    own_agent.proc.wait()  # type: ignore[union-attr]
    own_agent.start()
    with own_agent.client() as c:
        info = {r.id: r for r in c.process.runs()}[run_id]
        assert info.state == "lost" and info.reason == "lost: agent restarted"
        events = []
        with pytest.raises(CoworkError, match="agent restarted"):
            for ev in c.process.attach(run_id, from_offset=0):
                events.append(ev)
    assert b"".join(e.data for e in events if isinstance(e, Output)) == b"before\n"


def test_agent_stop_ends_detached_runs_and_restart_lists_them(own_agent: AgentProc) -> None:
    with own_agent.client() as c:
        run_id = start_detached(c, ["sleep", "60"])
        pid = {r.id: r for r in c.process.runs()}[run_id].pid
    own_agent.restart()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with own_agent.client() as c:
        info = {r.id: r for r in c.process.runs()}[run_id]
    assert info.state == "lost" and info.reason == "lost: agent stopped"


def test_cli_exec_detach_prints_the_id_and_attach_replays(agent: AgentProc) -> None:
    r = ctl(agent, "exec", "--detach", "--", "sh", "-c", "echo out; echo err >&2; exit 4")
    assert r.returncode == 0, r.stderr
    run_id = r.stdout.decode().strip()
    assert len(run_id) == 12
    w = ctl(agent, "wait", run_id)
    assert w.returncode == 4 and b"exit 4" in w.stdout
    a = ctl(agent, "attach", run_id, "--from", "0")
    assert (a.returncode, a.stdout, a.stderr) == (4, b"out\n", b"err\n")
    listing = ctl(agent, "runs").stdout.decode()
    assert run_id in listing and "exit 4" in listing


def test_cli_kill_stops_a_detached_run(agent: AgentProc) -> None:
    run_id = ctl(agent, "exec", "-d", "--", "sleep", "60").stdout.decode().strip()
    k = ctl(agent, "kill", run_id)
    assert k.returncode == 0 and k.stdout.decode() == f"{run_id}: signal 15 (killed)\n"


def test_cli_attach_to_an_unknown_run_is_one_line(agent: AgentProc) -> None:
    r = ctl(agent, "attach", "ffffffffffff")
    assert r.returncode == 1
    assert one_line_error(r) == "coworkctl: no such run: ffffffffffff\n"


def test_cli_kill_with_an_unknown_signal_is_a_usage_error(agent: AgentProc) -> None:
    r = ctl(agent, "kill", "-s", "NOPE", "abc")
    assert r.returncode == 2
    assert one_line_error(r) == "coworkctl: unknown signal: NOPE\n"


def _read_until(fd: int, want: bytes) -> bytes:
    """Read the terminal's output until `want` shows up (or it closes)."""
    got = b""
    while want not in got:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        got += chunk
    return got


def test_ctrl_backslash_detaches_an_attached_pty_and_the_run_goes_on(agent: AgentProc) -> None:
    import pty

    run_id = ctl(agent, "exec", "-t", "-d", "--", "sh").stdout.decode().strip()
    pid, fd = pty.fork()
    if pid == 0:  # the child: coworkctl attach on the terminal
        os.chdir(REPO)
        base = [sys.executable, "-m", "host_client.cli", "--target", agent.target]
        os.execv(
            sys.executable,
            [*base, "--token-file", str(agent.token_file), "attach", run_id],
        )
    try:
        # Typed before coworkctl set the terminal raw, a line is flushed: type until the
        # shell answers.
        seen = b""
        for _ in range(200):
            os.write(fd, b"echo marker-$((6*7))\r")
            ready, _, _ = select.select([fd], [], [], 0.25)
            while ready:
                seen += os.read(fd, 4096)
                ready, _, _ = select.select([fd], [], [], 0.25)
            if b"marker-42" in seen:
                break
        assert b"marker-42" in seen
        os.write(fd, b"\x1c")
        tail = _read_until(fd, b"goes on")
        assert f"detached from run {run_id}".encode() in tail
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    with agent.client() as c:
        assert {r.id: r for r in c.process.runs()}[run_id].state == "running"
        c.process.kill(run_id)
