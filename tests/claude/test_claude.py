"""Claude.Ask end to end: the real Claude Code CLI run by the real agent, only the model faked."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from cowork.agent.v1 import claude_pb2 as pb
from cowork.agent.v1.process_pb2 import ResourceLimits
from guest_agent.api_relay import PLACEHOLDER_TAIL
from host_client import AsyncCoworkClient, CoworkError
from host_client.claude import (
    AssistantText,
    ClaudeError,
    ClaudeEvent,
    ClaudeInit,
    ClaudeResult,
    RawEvent,
    ToolResult,
    ToolUse,
)
from tests.claude.conftest import (
    CLAUDE_VERSION,
    FAKE_KEY,
    REPO,
    ClaudeAgent,
    coworkctl,
    processes_with_env,
    run_marker,
)
from tests.claude.fake_anthropic import ApiError, FakeAnthropic, Hang, Text
from tests.claude.fake_anthropic import ToolUse as ToolCall
from tests.claude.test_streams_end import ask
from tests.conftest import wait_until

pytestmark = pytest.mark.timeout(120)
E = TypeVar("E")


def kinds(events: list[ClaudeEvent]) -> list[str]:
    return [e.kind for e in events]


def only(events: list[ClaudeEvent], cls: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, cls)]


def test_version_and_info(claude_agent: ClaudeAgent) -> None:
    with claude_agent.client() as c:
        v = c.claude_version()
        info = c.info()
    assert v["installed"] is True, v["error"]
    assert v["version"].startswith(CLAUDE_VERSION)
    assert v["path"].endswith("/claude")
    assert info["claude"]["installed"] is True
    assert info["claude"]["version"].startswith(CLAUDE_VERSION)
    assert "claude" in info["capabilities"]
    if os.geteuid() == 0:
        assert v["run_as_user"] == claude_agent.run_as
        assert v["agent_user"] == "root"


def test_plain_text_answer(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("Hello from the fake model.", chunks=4))
    wd = claude_agent.workdir("plain")
    with claude_agent.client() as c:
        stream = c.ask_stream("Say hello, please.", cwd=str(wd), env=run_env)
        events = list(stream)
    assert kinds(events)[0] == "init", events
    assert kinds(events)[-1] == "result"
    init = events[0]
    assert isinstance(init, ClaudeInit)
    assert init.session_id and init.cwd == str(wd)
    assert init.claude_version == CLAUDE_VERSION
    assert init.api_key_source == "ANTHROPIC_API_KEY"
    assert init.user == (claude_agent.run_as or pwd.getpwuid(os.geteuid()).pw_name)
    texts = [e.text for e in only(events, AssistantText)]
    assert texts == ["Hello from the fake model."]
    result = events[-1]
    assert isinstance(result, ClaudeResult)
    assert (result.subtype, result.is_error, result.exit_code) == ("success", False, 0)
    assert result.result == "Hello from the fake model."
    assert result.num_turns == 1 and result.session_id == init.session_id
    assert result.usage["output_tokens"] > 0 and result.total_cost_usd > 0
    # The model saw our prompt, which went through stdin.
    conv = api.conversation_requests()
    assert len(conv) == 1 and "Say hello, please." in conv[0].text_of_messages()
    # No process of the run outlives it.
    assert processes_with_env(run_marker(run_env)) == []


def test_ask_claude_seed_api(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("42"))
    with claude_agent.client() as c:
        r = c.ask_claude("What is six times seven?", env=run_env)
    assert (r.output, r.error, r.exit_code) == ("42", "", 0)
    assert r.ok and r.session_id and r.num_turns == 1
    assert r.result is not None and r.result.subtype == "success"


def test_tool_use_writes_file_in_workspace(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    wd = claude_agent.workdir("tool")
    target = wd / "hello.py"
    call = ToolCall("Write", {"file_path": str(target), "content": "print('hi')\n"})
    api.script(call, Text("I wrote hello.py."))
    with claude_agent.client() as c:
        events = list(
            c.ask_stream("Create hello.py", cwd=str(wd), permission_mode="acceptEdits", env=run_env)
        )
    assert target.read_text() == "print('hi')\n"
    if claude_agent.run_as:  # written by the unprivileged user, not by root
        assert target.stat().st_uid == pwd.getpwnam(claude_agent.run_as).pw_uid
    order = [k for k in kinds(events) if k in ("init", "tool_use", "tool_result", "result")]
    assert order == ["init", "tool_use", "tool_result", "result"]
    use = only(events, ToolUse)[0]
    res = only(events, ToolResult)[0]
    assert isinstance(use, ToolUse) and isinstance(res, ToolResult)
    assert use.name == "Write" and use.id == call.id
    assert use.input == {"file_path": str(target), "content": "print('hi')\n"}
    assert res.tool_use_id == call.id and not res.is_error
    assert str(target) in res.content
    assert kinds(events).index("tool_result") < kinds(events).index("assistant_text")
    result = events[-1]
    assert isinstance(result, ClaudeResult)
    assert result.num_turns == 2 and not result.is_error
    # The second request carried the tool result back to the model.
    conv = api.conversation_requests()
    assert len(conv) == 2 and call.id in json.dumps(conv[1].messages[-1])


def test_max_turns_hit(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    wd = claude_agent.workdir("turns")
    api.script(
        *[ToolCall("Bash", {"command": f"echo turn{i}", "description": "echo"}) for i in range(5)]
    )
    with claude_agent.client() as c:
        stream = c.ask_stream(
            "Keep going", cwd=str(wd), max_turns=2, allowed_tools=["Bash"], env=run_env
        )
        events = list(stream)
        r = c.ask_claude("Again", cwd=str(wd), max_turns=1, allowed_tools="Bash", env=run_env)
    results = only(events, ToolResult)
    assert [x.content for x in results if isinstance(x, ToolResult)] == ["turn0", "turn1"]
    result = events[-1]
    assert isinstance(result, ClaudeResult)
    assert result.subtype == "error_max_turns"
    assert result.is_error and result.exit_code == 1
    assert result.terminal_reason == "max_turns"
    assert result.errors == ["Reached maximum number of turns (2)"]
    assert r.exit_code == 1 and r.result is not None and r.result.subtype == "error_max_turns"
    assert r.error == "Reached maximum number of turns (1)"  # says why


def test_resume_by_session_id(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    wd = claude_agent.workdir("resume")
    api.script(Text("Noted: the code word is PERSIMMON."), Text("It was PERSIMMON."))
    with claude_agent.client() as c:
        first = c.ask_claude("Remember the code word persimmon.", cwd=str(wd), env=run_env)
        assert first.exit_code == 0 and first.session_id
        second = c.ask_claude(
            "What was the code word?", cwd=str(wd), resume=first.session_id, env=run_env
        )
    assert second.exit_code == 0 and second.output == "It was PERSIMMON."
    assert second.session_id == first.session_id
    conv = api.conversation_requests()
    assert len(conv) == 2
    history = conv[1].text_of_messages()
    # The resumed request carries the earlier turn (prompt and answer) and the new prompt.
    assert "Remember the code word persimmon." in history
    assert "Noted: the code word is PERSIMMON." in history
    assert "What was the code word?" in history
    assert "PERSIMMON" not in conv[0].text_of_messages()


def test_resume_fork_and_continue(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    wd = claude_agent.workdir("fork")
    api.script(Text("first"), Text("forked"), Text("continued"))
    with claude_agent.client() as c:
        first = c.ask_claude("one", cwd=str(wd), env=run_env)
        forked = c.ask_claude(
            "two", cwd=str(wd), resume=first.session_id, fork_session=True, env=run_env
        )
        cont = c.ask_claude("three", cwd=str(wd), continue_session=True, env=run_env)
    assert forked.exit_code == 0 and forked.session_id != first.session_id
    assert cont.exit_code == 0
    conv = api.conversation_requests()
    assert '"first"' in conv[1].text_of_messages() or "first" in conv[1].text_of_messages()
    assert "forked" in conv[2].text_of_messages()  # --continue took the latest session


@pytest.mark.parametrize(
    ("status", "etype"),
    [(500, "api_error"), (529, "overloaded_error"), (401, "authentication_error")],
)
def test_api_error_is_an_error_result(
    claude_agent: ClaudeAgent,
    api: FakeAnthropic,
    run_env: dict[str, str],
    status: int,
    etype: str,
) -> None:
    api.script(ApiError(status, etype, f"fake {etype}"))
    with claude_agent.client() as c:
        stream = c.ask_stream("hi", env=run_env)
        events = list(stream)
        api.script(ApiError(status, etype, f"fake {etype}"))
        r = c.ask_claude("hi again", env=run_env)
    result = events[-1]
    assert isinstance(result, ClaudeResult), kinds(events)
    assert result.is_error and result.exit_code == 1
    assert result.api_error_status == status
    assert str(status) in result.result
    assert r.exit_code == 1 and str(status) in r.error and r.output == result.result


def test_unknown_line_type_passes_as_raw(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    """With one retry allowed, an overloaded answer makes the real CLI emit a
    `system/api_retry` line, which the agent has no typed event for: it must
    arrive as a RawEvent carrying the whole line, in order."""
    api.script(ApiError(529, "overloaded_error", "busy"), Text("after the retry"))
    env = {**run_env, "CLAUDE_CODE_MAX_RETRIES": "1"}
    with claude_agent.client() as c:
        events = list(c.ask_stream("hi", env=env))
    raws = [e for e in events if isinstance(e, RawEvent) and e.type == "system/api_retry"]
    assert len(raws) == 1
    data = raws[0].data
    assert data["type"] == "system" and data["subtype"] == "api_retry"
    assert data["error_status"] == 529
    assert kinds(events).index("raw") < kinds(events).index("assistant_text")
    result = events[-1]
    assert isinstance(result, ClaudeResult) and not result.is_error
    assert result.result == "after the retry"


def test_partial_messages(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("one two three four", chunks=4))
    with claude_agent.client() as c:
        events = list(c.ask_stream("count", include_partial_messages=True, env=run_env))
    texts = only(events, AssistantText)
    partial = "".join(t.text for t in texts if isinstance(t, AssistantText) and t.partial)
    full = [t.text for t in texts if isinstance(t, AssistantText) and not t.partial]
    assert partial == "one two three four" and full == ["one two three four"]
    # The other stream events (message_start, content_block_stop, ...) are not dropped.
    assert any(isinstance(e, RawEvent) and e.type.startswith("stream_event/") for e in events)


def test_cancel_mid_run_leaves_no_claude(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Hang())
    marker = run_marker(run_env)
    with claude_agent.client() as c:
        stream = c.ask_stream("take your time", env=run_env)
        seen = []
        for ev in stream:
            seen.append(ev)
            if isinstance(ev, ClaudeInit):
                assert api.hanging.wait(30), "the CLI never reached the model"
                break  # leaving the iteration cancels the call
        assert kinds(seen) == ["init"]
    assert wait_until(lambda: not processes_with_env(marker), 15), processes_with_env(marker)
    assert wait_until(lambda: '"cancelled": true' in claude_agent.log_text(), 10)


def test_cancel_while_model_streams(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    """Cancel from another thread while the CLI is waiting on a half-sent answer."""
    api.script(Hang())
    marker = run_marker(run_env)
    with claude_agent.client() as c:
        stream = c.ask_stream("take your time", env=run_env)

        def cancel_when_hanging() -> None:
            if api.hanging.wait(30):
                stream.cancel()

        t = threading.Thread(target=cancel_when_hanging)
        t.start()
        with pytest.raises(CoworkError) as info:
            list(stream)
        t.join(5)
    assert info.value.code == "CANCELLED"
    assert processes_with_env(marker) == [] or wait_until(
        lambda: not processes_with_env(marker), 15
    )


def test_timeout_stops_the_run(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Hang())
    with claude_agent.client() as c:
        events = list(c.ask_stream("slow", timeout=3, env=run_env))
    last = events[-1]
    assert isinstance(last, ClaudeError) and last.timed_out
    assert processes_with_env(run_marker(run_env)) == []


def test_secrets_never_logged(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("ok"))
    with claude_agent.client() as c:
        assert c.ask_claude("hi", env=run_env).exit_code == 0
    log = claude_agent.log_text()
    assert "ANTHROPIC_API_KEY" in log  # the name is audited...
    assert FAKE_KEY not in log  # ...never the value
    assert "hi" not in json.loads(log.splitlines()[-1]).get("argv", [])


def test_bad_requests(claude_agent: ClaudeAgent) -> None:
    with claude_agent.client() as c:
        with pytest.raises(CoworkError) as e1:
            c.ask_claude("x", cwd="/etc")
        with pytest.raises(CoworkError) as e2:
            c.ask_claude("x", session_id="not-a-uuid")
        with pytest.raises(CoworkError) as e3:
            c.ask_claude("")
        with pytest.raises(CoworkError) as e4:
            c.ask_claude("x", cwd="does-not-exist")
    assert e1.value.code == "PERMISSION_DENIED"
    assert e2.value.code == "INVALID_ARGUMENT"
    assert e3.value.code == "INVALID_ARGUMENT"
    assert e4.value.code == "NOT_FOUND"


@pytest.mark.parametrize(
    ("req", "named"),
    [
        (pb.AskRequest(prompt="x", timeout_ms=400 * 24 * 3600 * 1000), "timeout_ms"),
        (pb.AskRequest(prompt="x", max_budget_usd=float("inf")), "max_budget_usd"),
        (pb.AskRequest(prompt="x", limits=ResourceLimits(pids=2**31)), "limits.pids"),
        (pb.AskRequest(prompt="x", limits=ResourceLimits(cpus=float("nan"))), "limits.cpus"),
    ],
    ids=["timeout", "budget", "pids", "cpus"],
)
def test_numbers_out_of_range_are_invalid_argument(
    claude_agent: ClaudeAgent, req: pb.AskRequest, named: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        ask(claude_agent, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert named in (info.value.details() or "")


def test_an_environment_too_big_for_the_os_is_invalid_argument(
    claude_agent: ClaudeAgent,
) -> None:
    with claude_agent.client() as c, pytest.raises(CoworkError) as info:
        c.ask_claude("x", env={"HUGE": "x" * (200 * 1024)})  # over 128 KiB in one string
    assert info.value.code == "INVALID_ARGUMENT" and "too big for the OS" in str(info.value)


def test_async_client(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("async one"), Text("async two"))

    async def main() -> tuple[list[ClaudeEvent], str, int, dict[str, object]]:
        async with AsyncCoworkClient(claude_agent.target, str(claude_agent.token_file)) as c:
            events = [ev async for ev in c.ask_stream("first", env=run_env)]
            r = await c.ask_claude("second", env=run_env)
            v = await c.claude_version()
            return events, r.output, r.exit_code, v

    events, output, code, version = asyncio.run(main())
    assert kinds(events)[0] == "init" and kinds(events)[-1] == "result"
    assert (output, code) == ("async two", 0)
    assert version["installed"] is True


def test_root_without_run_as_bypass_sets_is_sandbox(
    root_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    """As root the CLI refuses to bypass permissions unless IS_SANDBOX=1: the agent sets it."""
    if os.geteuid() != 0:
        pytest.fail("this test checks the root case and must run as root (as CI does)")
    wd = root_agent.workdir("bypass")
    api.script(ToolCall("Bash", {"command": "id -u > uid.txt", "description": "id"}), Text("done"))
    with root_agent.client() as c:
        r = c.ask_claude("run id", cwd=str(wd), permission_mode="bypassPermissions", env=run_env)
    assert r.exit_code == 0, r.error
    assert (wd / "uid.txt").read_text().strip() == "0"


# -- coworkctl ask ------------------------------------------------------------------------
def test_coworkctl_ask_on_a_pipe(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    wd = claude_agent.workdir("cli")
    call = ToolCall("Write", {"file_path": str(wd / "notes.md"), "content": "# Notes\n"})
    api.script(call, Text("Created notes.md with a heading."))
    p = coworkctl(
        claude_agent,
        ["ask", "--cwd", str(wd), "--permission-mode", "acceptEdits", "Create notes.md"],
        run_env,
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Created notes.md with a heading.\n"  # the answer only, like claude -p
    assert "\x1b[" not in p.stdout + p.stderr  # plain text on pipes
    lines = p.stderr.splitlines()
    assert lines[0] == f"⏺ Write({wd / 'notes.md'})"
    assert lines[1].startswith("  ⎿ File created successfully")
    assert lines[2].startswith("done (success) · 2 turns · $")
    assert FAKE_KEY not in p.stdout + p.stderr
    assert (wd / "notes.md").read_text() == "# Notes\n"


def test_coworkctl_ask_json_and_stdin(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Text("from stdin"))
    p = coworkctl(claude_agent, ["ask", "--json"], run_env, stdin="prompt on stdin\n")
    assert p.returncode == 0, p.stderr
    events = [json.loads(line) for line in p.stdout.splitlines()]
    assert events[0]["type"] == "init" and events[-1]["type"] == "result"
    assert events[-1]["result"] == "from stdin" and events[-1]["is_error"] is False
    assert "prompt on stdin" in api.conversation_requests()[0].text_of_messages()


def test_coworkctl_ask_failure_exit_1(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(ApiError(529, "overloaded_error", "Overloaded"))
    p = coworkctl(claude_agent, ["ask", "hello"], run_env)
    assert p.returncode == 1
    assert p.stdout == ""
    assert "error: API Error: 529" in p.stderr
    assert "failed (api_error) · 1 turn" in p.stderr
    api.script(ApiError(401, "authentication_error", "invalid x-api-key"))
    j = coworkctl(claude_agent, ["ask", "--json", "hello"], run_env)
    assert j.returncode == 1
    last = json.loads(j.stdout.splitlines()[-1])
    assert last["type"] == "result" and last["is_error"] and last["api_error_status"] == 401


def test_coworkctl_ask_ctrl_c_stops_remote_run(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    api.script(Hang())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    env.update(ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=api.base_url)
    cmd = [
        sys.executable,
        "-m",
        "host_client.cli",
        "--target",
        claude_agent.target,
        "--token-file",
        str(claude_agent.token_file),
        "ask",
        f"--env=COWORK_TEST_RUN={run_env['COWORK_TEST_RUN']}",
        "wait",
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert api.hanging.wait(30), "the CLI never reached the model"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    marker = run_marker(run_env)
    assert wait_until(lambda: not processes_with_env(marker), 15), processes_with_env(marker)


def test_coworkctl_usage_errors(claude_agent: ClaudeAgent) -> None:
    base = [sys.executable, "-m", "host_client.cli", "--target", claude_agent.target]
    base += ["--token-file", str(claude_agent.token_file)]
    p = subprocess.run([*base, "ask", "--max-turns", "0", "x"], capture_output=True, text=True)
    assert p.returncode == 2 and "max-turns" in p.stderr
    p = subprocess.run(
        [*base, "ask", "--resume", "a", "--continue", "x"], capture_output=True, text=True
    )
    assert p.returncode == 2
    p = subprocess.run([*base, "claude"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert p.returncode == 2 and "terminal" in p.stderr


# -- coworkctl claude (interactive, over a PTY) --------------------------------------------
def run_on_pty(cmd: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run `cmd` with a real terminal as stdin/stdout/stderr; return (exit code, output)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, start_new_session=True
    )
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:
                    break  # EIO: every writer closed the terminal
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break
        code = proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, out.decode("utf-8", "replace")


def test_coworkctl_claude_runs_the_cli_on_a_pty(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    env.update(ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=api.base_url, TERM="xterm")
    base = [sys.executable, "-m", "host_client.cli", "--target", claude_agent.target]
    base += ["--token-file", str(claude_agent.token_file), "claude"]
    code, out = run_on_pty([*base, "--", "--version"], env)
    assert code == 0, out
    assert f"{CLAUDE_VERSION} (Claude Code)" in out
    # A real model round trip through the PTY path, as the run-as user, with the
    # host's auth forwarded (the CLI in print mode, so the test need not drive the TUI).
    api.script(Text("pty says hello"))
    wd = claude_agent.workdir("pty")
    code, out = run_on_pty([*base, "--cwd", str(wd), "--", "-p", "say hello"], env)
    assert code == 0, out
    assert "pty says hello" in out
    assert FAKE_KEY not in out
    conv = api.conversation_requests()
    assert len(conv) == 1 and "say hello" in conv[0].text_of_messages()


_ANSI = re.compile(r"\x1b\[[0-9;?<>=]*[a-zA-Z~]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\x1b[=>]")


def squeezed(raw: bytes) -> str:
    """Screen text without escape sequences or whitespace (TUIs move the cursor instead)."""
    return "".join(_ANSI.sub("", raw.decode("utf-8", "replace")).split())


def seed_claude_home(agent: ClaudeAgent, workdir: str) -> None:
    """What a provisioned VM's user already has: onboarding done, this API key approved,
    the workspace trusted (otherwise the TUI opens with first-run dialogs)."""
    home = Path(pwd.getpwnam(agent.run_as).pw_dir) if agent.run_as else agent.dir / "home"
    cfg_path = home / ".claude.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    cfg["hasCompletedOnboarding"] = True
    cfg.setdefault("customApiKeyResponses", {"approved": [], "rejected": []})
    cfg["customApiKeyResponses"]["approved"].append(FAKE_KEY[-20:])
    # `coworkctl claude` gives the CLI the relay's placeholder, whose last 20 characters
    # are always these (api_relay.PLACEHOLDER_TAIL): approved once, like a key.
    cfg["customApiKeyResponses"]["approved"].append(PLACEHOLDER_TAIL)
    cfg.setdefault("projects", {})[workdir] = {"hasTrustDialogAccepted": True}
    cfg_path.write_text(json.dumps(cfg))
    if agent.run_as:
        pw = pwd.getpwnam(agent.run_as)
        os.chown(cfg_path, pw.pw_uid, pw.pw_gid)


def test_coworkctl_claude_interactive_tui(
    claude_agent: ClaudeAgent, api: FakeAnthropic, run_env: dict[str, str]
) -> None:
    """The real TUI over `coworkctl claude`: type a prompt, see the model's answer, quit."""
    import pty
    import select

    wd = claude_agent.workdir("tui")
    seed_claude_home(claude_agent, str(wd))
    api.script(Text("Hello from the TUI"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    env.update(ANTHROPIC_API_KEY=FAKE_KEY, ANTHROPIC_BASE_URL=api.base_url, TERM="xterm-256color")
    cmd = [sys.executable, "-m", "host_client.cli", "--target", claude_agent.target]
    cmd += ["--token-file", str(claude_agent.token_file), "claude", "--cwd", str(wd)]
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        cmd, stdin=slave, stdout=slave, stderr=slave, cwd=REPO, env=env, start_new_session=True
    )
    os.close(slave)
    screen = bytearray()

    def read_until(needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in squeezed(bytes(screen)):
                return True
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    screen.extend(os.read(master, 65536))
                except OSError:
                    return needle in squeezed(bytes(screen))
        return needle in squeezed(bytes(screen))

    try:
        assert read_until("ClaudeCodev" + CLAUDE_VERSION, 30), squeezed(bytes(screen))[-800:]
        assert read_until("\u276f", 10)  # the input prompt
        os.write(master, b"say hello")
        assert read_until("sayhello", 10)
        os.write(master, b"\r")
        assert read_until("HellofromtheTUI", 30), squeezed(bytes(screen))[-800:]
        os.write(master, b"\x03")
        assert read_until("PressCtrl-Cagaintoexit", 10), squeezed(bytes(screen))[-400:]
        os.write(master, b"\x03")
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            read_until("\x00", 0.2)  # keep draining the terminal until coworkctl exits
        assert proc.poll() == 0, squeezed(bytes(screen))[-800:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    conv = api.conversation_requests()
    assert len(conv) == 1 and "say hello" in conv[0].text_of_messages()
