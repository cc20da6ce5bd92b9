"""Nothing outlives its stream, without cgroups and without the box (this host: cgroup v1).

Every test starts something that leaves its run's process group or session
(setsid, a double fork, a cleared environment) and checks that the agent
finds it anyway: when the stream ends, when the process holds the output
pipe open, when the agent is SIGKILLed, and when a new agent starts after one
that died with its guardian.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.models import Output, Started

from .conftest import AgentProc, make_agent, processes_with, wait_until

pytestmark = pytest.mark.timeout(60)


def escaped(marker: str, how: str = "setsid", fds: str = "</dev/null >/dev/null 2>&1") -> str:
    """Shell lines that start `sleep 300` named `marker` (bash: dash has no `exec -a`) outside
    the run's process group and session, and go on once it is out (not before: a process
    still in the group would die with the group and prove nothing)."""
    ready = f"/tmp/{marker}.ready"
    return (
        f"{how} bash -c 'touch {ready}; exec -a {marker} sleep 300' {fds} & "
        f"until [ -e {ready} ]; do sleep 0.01; done; rm -f {ready}; "
    )


def holding_stdout(marker: str) -> str:
    """Like `escaped`, but the escaped process keeps the run's stdout and stderr open."""
    return escaped(marker, fds="</dev/null")


def run_in_thread(fn: object, timeout: float) -> object:
    """fn() on a thread; fail the test (instead of hanging it) if it takes over `timeout`."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()  # type: ignore[operator]
        except BaseException as exc:  # pragma: no cover - re-raised below
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"the call did not end within {timeout} s"
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def pid_exists(pid: int) -> bool:
    """True while /proc has the pid at all (a zombie counts: nobody reaped it)."""
    return os.path.exists(f"/proc/{pid}")


def guardian_of(agent: AgentProc) -> int:
    """The agent's guardian process (it kills the agent's leftovers once the agent is gone)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if b"guest_agent.reaper" in cmd and str(agent.socket).encode() + b".runs.json" in cmd:
            return int(entry)
    raise AssertionError("the agent has no guardian")


@pytest.fixture
def fresh_agent() -> Iterator[AgentProc]:
    a = make_agent()
    yield a
    a.stop()


def test_setsid_descendant_does_not_outlive_its_run(client: CoworkClient) -> None:
    marker = f"cw-setsid-{uuid.uuid4().hex}"
    result = client.run(["sh", "-c", f"{escaped(marker)} echo started"])
    assert result.output == "started\n"
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_setsid_descendant_does_not_outlive_its_exec_stream(client: CoworkClient) -> None:
    marker = f"cw-setsid-exec-{uuid.uuid4().hex}"
    result = client.exec(["sh", "-c", f"{escaped(marker)} echo started"]).collect()
    assert result.stdout == b"started\n"
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_double_fork_with_a_cleared_environment_does_not_outlive_its_run(
    client: CoworkClient,
) -> None:
    """No marker to go by: an orphan of no live run is killed when a run ends."""
    marker = f"cw-envi-{uuid.uuid4().hex}"
    line = escaped(marker, how="env -i /usr/bin/setsid -f")
    client.run(["sh", "-c", f"{line} echo done"])
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_a_run_ends_when_a_setsid_descendant_holds_its_stdout(client: CoworkClient) -> None:
    marker = f"cw-holder-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    result = run_in_thread(
        lambda: client.run(["sh", "-c", f"{holding_stdout(marker)} echo started"]), 15
    )
    assert result.output == "started\n"  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 10
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_an_exec_stream_ends_when_a_setsid_descendant_holds_its_stdout(
    client: CoworkClient,
) -> None:
    marker = f"cw-holder-exec-{uuid.uuid4().hex}"
    result = run_in_thread(
        lambda: client.exec(["sh", "-c", f"{holding_stdout(marker)} echo started"]).collect(),
        15,
    )
    assert result.stdout == b"started\n"  # type: ignore[attr-defined]
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_exec_timeout_is_honoured_while_a_setsid_descendant_holds_stdout(
    client: CoworkClient,
) -> None:
    marker = f"cw-timeout-holder-{uuid.uuid4().hex}"
    t0 = time.monotonic()
    result = run_in_thread(
        lambda: client.exec(
            ["sh", "-c", f"{holding_stdout(marker)} exec sleep 300"], timeout=0.5
        ).collect(),
        15,
    )
    assert result.timed_out  # type: ignore[attr-defined]
    assert time.monotonic() - t0 < 6
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_run_timeout_is_honoured_while_a_setsid_descendant_holds_stdout(
    client: CoworkClient,
) -> None:
    marker = f"cw-run-timeout-holder-{uuid.uuid4().hex}"
    result = run_in_thread(
        lambda: client.run(["sh", "-c", f"{holding_stdout(marker)} exec sleep 300"], timeout=0.5),
        15,
    )
    assert result.timed_out  # type: ignore[attr-defined]
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_output_a_slow_reader_has_not_taken_yet_is_not_cut(client: CoworkClient) -> None:
    """Stopping to read a pipe held from outside the run never cuts output still in flight:
    here the process has exited while over a second of reading is still queued."""
    size = 2 * 1024 * 1024
    got = 0
    for ev in client.exec(["head", "-c", str(size), "/dev/zero"]):
        if isinstance(ev, Output):
            got += len(ev.data)
            time.sleep(0.1)
    assert got == size


def test_orphans_of_a_live_run_are_adopted_by_the_agent_and_reaped(
    client: CoworkClient, agent: AgentProc
) -> None:
    """An orphan goes to the agent (subreaper), not to init: the agent can find it, and
    must reap it once it exits."""
    orphaning = "(setsid sleep 0.5 </dev/null >/dev/null 2>&1 & echo $!); exec sleep 300"
    events = iter(client.exec(["sh", "-c", orphaning]))
    assert isinstance(next(events), Started)
    out = next(events)
    assert isinstance(out, Output)
    orphan = int(out.data)

    def parent() -> int:
        with open(f"/proc/{orphan}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])

    assert wait_until(lambda: parent() == agent.pid, 2.0)  # once the subshell is gone
    assert wait_until(lambda: not pid_exists(orphan), 3.0)
    del events  # ends the stream


def test_a_sigkilled_agent_leaves_no_process_behind(fresh_agent: AgentProc) -> None:
    marker = f"cw-agent-killed-{uuid.uuid4().hex}"
    with fresh_agent.client() as c:
        events = iter(
            c.exec(["bash", "-c", f"{escaped(marker)} echo up; exec -a {marker} sleep 300"])
        )
        assert isinstance(next(events), Started) and isinstance(next(events), Output)
        assert wait_until(lambda: len(processes_with(marker)) == 2, 5.0)
        assert fresh_agent.proc is not None
        fresh_agent.proc.send_signal(signal.SIGKILL)
        fresh_agent.proc.wait()
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_a_restarted_agent_kills_what_its_previous_life_left(fresh_agent: AgentProc) -> None:
    """Agent and guardian both SIGKILLed (e.g. the OOM killer): the next agent cleans up."""
    marker = f"cw-previous-life-{uuid.uuid4().hex}"
    with fresh_agent.client() as c:
        events = iter(
            c.exec(["bash", "-c", f"{escaped(marker)} echo up; exec -a {marker} sleep 300"])
        )
        assert isinstance(next(events), Started) and isinstance(next(events), Output)
        assert wait_until(lambda: len(processes_with(marker)) == 2, 5.0)
        guardian = guardian_of(fresh_agent)
        os.kill(guardian, signal.SIGKILL)
        assert fresh_agent.proc is not None
        fresh_agent.proc.send_signal(signal.SIGKILL)
        fresh_agent.proc.wait()
    time.sleep(0.5)
    assert len(processes_with(marker)) == 2  # nobody cleaned up: the guardian is gone too
    fresh_agent.start()
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_a_restarted_agent_kills_unmarked_orphans_it_had_recorded(
    fresh_agent: AgentProc,
) -> None:
    """An orphan with a cleared environment, adopted while its run was live, is in the state
    file: the next agent finds it there."""
    marker = f"cw-unmarked-{uuid.uuid4().hex}"
    line = escaped(marker, how="env -i /usr/bin/setsid -f")
    state = Path(f"{fresh_agent.socket}.runs.json")
    with fresh_agent.client() as c:
        events = iter(c.exec(["sh", "-c", f"{line} echo up; exec sleep 300"]))
        assert isinstance(next(events), Started) and isinstance(next(events), Output)
        # One process once bash has exec'd sleep (until then its command line names it too).
        assert wait_until(lambda: len(processes_with(marker)) == 1, 5.0)
        (orphan,) = processes_with(marker)
        assert wait_until(
            lambda: orphan in [p for p, _ in json.loads(state.read_text())["unmarked"]], 5.0
        )
        os.kill(guardian_of(fresh_agent), signal.SIGKILL)
        assert fresh_agent.proc is not None
        fresh_agent.proc.send_signal(signal.SIGKILL)
        fresh_agent.proc.wait()
    time.sleep(0.5)
    assert processes_with(marker) == [orphan]
    fresh_agent.start()
    assert wait_until(lambda: not processes_with(marker), 5.0), processes_with(marker)


def test_a_stopped_agent_leaves_no_process_and_no_guardian(fresh_agent: AgentProc) -> None:
    marker = f"cw-agent-stopped-{uuid.uuid4().hex}"
    guardian = guardian_of(fresh_agent)
    with fresh_agent.client() as c:
        events = iter(
            c.exec(["bash", "-c", f"{escaped(marker)} echo up; exec -a {marker} sleep 300"])
        )
        assert isinstance(next(events), Started) and isinstance(next(events), Output)
        fresh_agent.stop()
    assert not processes_with(marker)
    assert wait_until(lambda: not pid_exists(guardian) or _zombie(guardian), 5.0)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False
