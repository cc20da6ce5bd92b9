"""Detached Claude runs (issue #12): the real CLI against the scripted model, a client that is
SIGKILLed, and a reattach that replays the same typed events to the result."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from host_client import CoworkError
from host_client.claude import AssistantText, ClaudeInit, ClaudeResult, ClaudeRun
from tests.claude.conftest import ClaudeAgent
from tests.claude.fake_anthropic import FakeAnthropic, Text
from tests.conftest import REPO


def _starter(agent: ClaudeAgent, cwd: str, env: dict[str, str]) -> str:
    """A client that starts a detached ask, prints the run id, then waits to be killed."""
    return textwrap.dedent(
        f"""
        import json, sys, time
        from host_client import CoworkClient
        c = CoworkClient({agent.target!r}, {str(agent.token_file)!r})
        stream = c.ask_stream("Say hello.", cwd={cwd!r}, env=json.loads({json.dumps(env)!r}),
                              detach=True)
        events = iter(stream)
        next(events)
        print(stream.run_id, flush=True)
        for ev in events:
            pass
        time.sleep(3600)
        """
    )


def test_detached_claude_run_is_reattached_after_its_client_was_killed(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("Hello from the fake model.", chunks=4))
    wd = claude_agent.workdir("detached")
    proc = subprocess.Popen(
        [sys.executable, "-c", _starter(claude_agent, str(wd), run_env)],
        cwd=REPO,
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().decode().strip()
    proc.kill()
    proc.wait()
    proc.stdout.close()
    assert len(run_id) == 12
    with claude_agent.client() as c:
        events = list(c.claude.attach(run_id, from_offset=0))
        info = c.process.wait(run_id)
    assert isinstance(events[0], ClaudeRun) and events[0].run_id == run_id
    init = events[1]
    assert isinstance(init, ClaudeInit) and init.session_id
    assert [e.text for e in events if isinstance(e, AssistantText)] == [
        "Hello from the fake model."
    ]
    result = events[-1]
    assert isinstance(result, ClaudeResult) and not result.is_error
    assert result.session_id == init.session_id
    assert info.kind == "claude" and info.state == "exited" and info.session_id == init.session_id
    assert info.exit is not None and info.exit.code == 0


def test_claude_attach_resumes_after_the_last_event_seen(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("One answer.", chunks=2))
    wd = claude_agent.workdir("detached-resume")
    with claude_agent.client() as c:
        stream = c.ask_stream("Answer once.", cwd=str(wd), env=run_env, detach=True)
        whole = list(stream)  # the detached stream follows the run to its end
        first = c.claude.attach(stream.run_id, from_offset=0)
        events = iter(first)
        seen = [next(events), next(events)]  # the run event, then the first journaled one
        first.cancel()
        rest = list(c.claude.attach(stream.run_id, from_offset=first.offset))
    assert [type(e) for e in seen[1:] + rest[1:]] == [type(e) for e in whole[1:]]
    assert isinstance(rest[-1], ClaudeResult)


def test_claude_attach_to_an_exec_run_is_failed_precondition(claude_agent: ClaudeAgent) -> None:
    with claude_agent.client() as c:
        stream = c.process.exec(["echo", "hi"], detach=True)
        events = iter(stream)
        run_id = next(events).run_id  # type: ignore[union-attr]
        stream.cancel()
        with pytest.raises(CoworkError, match=r"attach with Process\.Attach"):
            list(c.claude.attach(run_id))
