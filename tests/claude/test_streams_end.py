"""Claude.Ask streams end, and end with `result` or `error`, whatever the run prints or leaves.

The real CLI against the scripted fake model. Some tests have a Bash tool call
write straight to the CLI's own stdout (/proc/PID/fd/1): that is how a run can
hand the agent lines the CLI never wrote (huge, unparsable, not UTF-8
encodable), or keep the agent's pipe open. The pipe belongs to the agent's
user, so those tests use the agent that runs Claude as root (`root_agent`);
an unprivileged run user gets EACCES there. The events are read with the raw
stub, to see the contract's own fields.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cowork.agent.v1 import claude_pb2 as pb
from cowork.agent.v1 import claude_pb2_grpc
from cowork.defaults import AUTH_METADATA_KEY, AUTH_SCHEME
from host_client.claude import ClaudeError, ClaudeInit
from tests.claude.conftest import (
    ClaudeAgent,
    coworkctl,
    make_claude_agent,
    processes_with_env,
    run_marker,
)
from tests.claude.fake_anthropic import FakeAnthropic, Hang, Text
from tests.claude.fake_anthropic import ToolUse as ToolCall
from tests.conftest import rss_bytes, wait_until

pytestmark = pytest.mark.timeout(180)

# The CLI's pid, from inside a Bash tool call: the nearest ancestor running the claude binary.
FIND_CLI = (
    'p=$$; while [ "$p" -gt 1 ]; do case "$(readlink /proc/$p/exe)" in *claude*) break;; '
    "esac; p=$(cut -d' ' -f4 /proc/$p/stat); done; "
)


def ask(agent: ClaudeAgent, req: pb.AskRequest, timeout: float = 150) -> list[pb.AskEvent]:
    """Every event of one Ask (raising grpc.RpcError if the stream ends with a status)."""
    md = ((AUTH_METADATA_KEY, f"{AUTH_SCHEME} {agent.token_file.read_text().strip()}"),)
    with grpc.insecure_channel(agent.target) as ch:
        stub = claude_pb2_grpc.ClaudeStub(ch)
        return list(stub.Ask(req, metadata=md, timeout=timeout))


def request(prompt: str, run_env: dict[str, str], **kw: object) -> pb.AskRequest:
    return pb.AskRequest(prompt=prompt, env=run_env, **kw)  # type: ignore[arg-type]


def bash(command: str) -> ToolCall:
    return ToolCall("Bash", {"command": command, "description": "test step"})


def tool_output(events: list[pb.AskEvent]) -> list[str]:
    """What the Bash tool calls printed (proves the step did what the test needs)."""
    return [e.tool_result.content for e in events if e.WhichOneof("event") == "tool_result"]


def last_kind(events: list[pb.AskEvent]) -> str:
    kind = events[-1].WhichOneof("event")
    assert kind is not None
    return kind


def test_a_5_mb_answer_arrives_whole_in_pieces_and_the_run_ends_with_its_result(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    answer = "".join(f"{i:07d} é\n" for i in range(500_000))  # 5 MB, 2-byte characters too
    api.script(Text(answer, chunks=5))
    events = ask(claude_agent, request("Say a lot.", run_env))
    assert last_kind(events) == "result"
    texts = [e.assistant_text for e in events if e.WhichOneof("event") == "assistant_text"]
    assert "".join(t.text for t in texts) == answer
    assert [t.more for t in texts] == [True] * (len(texts) - 1) + [False]
    result = events[-1].result
    assert result.subtype == "success" and not result.is_error
    assert result.truncated and answer.startswith(result.result)
    assert all(e.ByteSize() < 4 * 1024 * 1024 for e in events)


def test_the_library_and_coworkctl_ask_give_a_5_mb_answer_whole(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    """The result field comes cut; the clients rebuild the answer from its parts."""
    answer = "".join(f"{i:07d} é\n" for i in range(500_000))
    api.script(Text(answer, chunks=5))
    with claude_agent.client() as c:
        r = c.ask_claude("Say a lot.", env=run_env)
    assert r.exit_code == 0 and r.result is not None and r.result.truncated
    assert r.output == answer
    api.script(Text(answer, chunks=5))
    cli = coworkctl(claude_agent, ["ask", "Say a lot."], run_env)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == answer


def test_a_5_mb_partial_delta_is_split_too(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    answer = "y" * (5 * 1024 * 1024)
    api.script(Text(answer, chunks=1))  # one text_delta of 5 MiB
    events = ask(claude_agent, request("Stream a lot.", run_env, include_partial_messages=True))
    assert last_kind(events) == "result"
    partial = [
        e.assistant_text
        for e in events
        if e.WhichOneof("event") == "assistant_text" and e.assistant_text.partial
    ]
    assert "".join(t.text for t in partial) == answer and len(partial) > 1
    assert [t.more for t in partial] == [True] * (len(partial) - 1) + [False]


def test_a_100_mb_stdout_line_is_dropped_without_growing_the_agent(
    root_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    assert root_agent.proc is not None
    flood = FIND_CLI + "head -c 100000000 /dev/zero | tr '\\0' x > /proc/$p/fd/1 && echo flooded"
    api.script(bash(flood), Text("after the flood"))
    before = rss_bytes(root_agent.proc.pid)
    events = ask(root_agent, request("flood", run_env, allowed_tools=["Bash"]))
    grown = rss_bytes(root_agent.proc.pid) - before
    # The tool's result line went out in the same stdout line as the flood: the model saw it.
    assert "flooded" in api.conversation_requests()[1].text_of_messages()
    assert last_kind(events) == "result", events[-1]
    assert events[-1].result.result == "after the flood"
    notes = [e.log.line for e in events if e.WhichOneof("event") == "log"]
    assert any("dropped a stdout line longer than" in n for n in notes), notes
    assert grown < 64 * 1024 * 1024, f"agent RSS grew by {grown >> 20} MiB"


@pytest.mark.parametrize(
    "line",
    [
        "[" * 200_000,  # JSON nested past what Python's parser takes (RecursionError)
        '{"type":"assistant","message":{"content":[{"type":"text","text":"lone \\ud800"}]}}',
        '{"type":"result","subtype":"x","num_turns":1e999,"duration_ms":-5,"usage":{"input_tokens":1e30}}',
        '{"type":"system","subtype":"init","model":"' + "m" * (5 * 1024 * 1024) + '"}',
    ],
    ids=["nested-too-deep", "lone-surrogate", "infinite-number", "5-mb-init-field"],
)
def test_a_stdout_line_the_agent_cannot_map_as_is_does_not_stop_the_run(
    root_agent: ClaudeAgent,
    api: FakeAnthropic,
    run_env: dict[str, str],
    line: str,
    tmp_path: Path,
) -> None:
    payload = root_agent.root / f"line-{uuid.uuid4().hex}.json"
    payload.write_text(line + "\n")
    payload.chmod(0o644)
    write = FIND_CLI + f"cat {payload} > /proc/$p/fd/1 && echo written"
    api.script(bash(write), Text("still here"))
    events = ask(root_agent, request("inject", run_env, allowed_tools=["Bash"]))
    assert tool_output(events) == ["written"]
    assert last_kind(events) == "result", events[-1]
    assert events[-1].result.result == "still here"
    assert all(e.ByteSize() < 4 * 1024 * 1024 for e in events)


def test_timeout_is_honoured_while_a_setsid_process_holds_the_cli_stdout(
    root_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    name = f"cw-holds-stdout-{uuid.uuid4().hex}"
    hold = FIND_CLI + (
        f"setsid bash -c 'exec -a {name} sleep 300' </dev/null >/proc/$p/fd/1 2>/dev/null & "
        "sleep 0.3; kill -0 $! && echo holding"
    )
    api.script(bash(hold), Hang())
    t0 = time.monotonic()
    events = ask(root_agent, request("hold", run_env, allowed_tools=["Bash"], timeout_ms=8000))
    assert time.monotonic() - t0 < 30
    assert tool_output(events) == ["holding"]
    assert last_kind(events) == "error" and events[-1].error.timed_out
    assert processes_with_env(run_marker(run_env)) == []


def test_a_setsid_process_holding_the_cli_stdout_does_not_keep_a_finished_run_open(
    root_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    hold = FIND_CLI + (
        "setsid sleep 300 </dev/null >/proc/$p/fd/1 2>/dev/null & "
        "sleep 0.3; kill -0 $! && echo holding"
    )
    api.script(bash(hold), Text("done holding"))
    t0 = time.monotonic()
    events = ask(root_agent, request("hold", run_env, allowed_tools=["Bash"]), timeout=60)
    assert time.monotonic() - t0 < 30
    assert tool_output(events) == ["holding"]
    assert last_kind(events) == "result" and events[-1].result.result == "done holding"
    assert wait_until(lambda: not processes_with_env(run_marker(run_env)), 5)


@pytest.fixture
def fresh_agent(claude_bin: Path, claude_agent: ClaudeAgent) -> Iterator[ClaudeAgent]:
    """An agent of its own (this test stops it), running Claude as the shared agent's user."""
    agent = make_claude_agent(claude_bin, claude_agent.run_as)
    yield agent
    agent.stop()
    shutil.rmtree(agent.dir, ignore_errors=True)


def test_agent_shutdown_ends_a_run_with_a_cancelled_error(
    fresh_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Hang())
    assert fresh_agent.proc is not None
    proc = fresh_agent.proc
    with fresh_agent.client() as c:
        stream = c.ask_stream("take your time", env=run_env)

        def stop_when_hanging() -> None:
            if api.hanging.wait(60):
                proc.send_signal(signal.SIGTERM)

        t = threading.Thread(target=stop_when_hanging)
        t.start()
        events = list(stream)
        t.join(5)
    assert isinstance(events[0], ClaudeInit)
    last = events[-1]
    assert isinstance(last, ClaudeError) and last.cancelled, last
    assert "shutting down" in last.message
    assert wait_until(lambda: not processes_with_env(run_marker(run_env)), 10)
    assert proc.wait(20) == 0
    assert not os.path.exists(f"{fresh_agent.socket}.runs.json")
