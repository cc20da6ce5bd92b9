"""Unit tests of the pure parts: stream-json line → events, argv/env building, result folding.

The lines are shaped like what the real CLI (2.1.330) prints; the end-to-end
tests in test_claude.py run the CLI itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from typing import Any

import pytest

from cowork.agent.v1 import claude_pb2 as pb
from guest_agent import claude as gc
from guest_agent.errors import AgentError
from guest_agent.sandbox import RunUser
from host_client.claude import (
    ClaudeError,
    ClaudeResult,
    RawEvent,
    ask_request,
    auth_env,
    event_from_pb,
    summarize,
)
from host_client.cli.claude_cmd import Renderer, interactive_argv, tool_summary

SESSION = "726b456e-7495-474e-8e80-65a69c15b48b"


def mapped(obj: Any, limit: int = gc.TOOL_RESULT_LIMIT) -> list[pb.AskEvent]:
    return gc.map_line(obj, json.dumps(obj), limit)


def test_unknown_top_level_type_is_raw() -> None:
    # The shape of the CLI's `tool_use_summary` line (a type this agent does not map).
    line = {
        "type": "tool_use_summary",
        "summary": "Read 3 files",
        "preceding_tool_use_ids": ["toolu_1", "toolu_2"],
        "session_id": SESSION,
        "uuid": "5af51974-dbd7-44b4-8397-87a07bc668e3",
    }
    (ev,) = mapped(line)
    assert ev.WhichOneof("event") == "raw"
    assert ev.raw.type == "tool_use_summary"
    assert json.loads(ev.raw.json) == line
    host = event_from_pb(ev)
    assert isinstance(host, RawEvent) and host.data == line
    assert host.to_dict()["raw_type"] == "tool_use_summary"


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (
            {"type": "rate_limit_event", "rate_limit_info": {"status": "allowed"}},
            "rate_limit_event",
        ),
        ({"type": "system", "subtype": "compact_boundary"}, "system/compact_boundary"),
        ({"type": "system", "subtype": "api_retry", "attempt": 1}, "system/api_retry"),
        (
            {"type": "stream_event", "event": {"type": "message_start"}},
            "stream_event/message_start",
        ),
        ({"type": "user", "message": {"role": "user", "content": "replayed"}}, "user"),
        ({"no_type": True}, ""),
    ],
)
def test_unmapped_lines_are_raw(line: dict[str, Any], kind: str) -> None:
    (ev,) = mapped(line)
    assert ev.WhichOneof("event") == "raw" and ev.raw.type == kind
    assert json.loads(ev.raw.json) == line


def test_non_object_line_is_raw() -> None:
    (ev,) = gc.map_line([1, 2], "[1, 2]")
    assert ev.raw.type == "" and ev.raw.json == "[1, 2]"


def test_init_line() -> None:
    line = {
        "type": "system",
        "subtype": "init",
        "cwd": "/workspace",
        "session_id": SESSION,
        "tools": ["Bash", "Write"],
        "model": "claude-opus-5-5",
        "permissionMode": "default",
        "apiKeySource": "ANTHROPIC_API_KEY",
        "claude_code_version": "2.1.330",
        "new_field": {"x": 1},
    }
    (ev,) = mapped(line)
    i = ev.init
    assert (i.session_id, i.model, list(i.tools), i.cwd) == (
        SESSION,
        "claude-opus-5-5",
        ["Bash", "Write"],
        "/workspace",
    )
    assert (i.claude_version, i.permission_mode, i.api_key_source) == (
        "2.1.330",
        "default",
        "ANTHROPIC_API_KEY",
    )
    assert json.loads(i.json)["new_field"] == {"x": 1}  # nothing is lost


def test_assistant_blocks_in_order() -> None:
    line = {
        "type": "assistant",
        "message": {
            "id": "msg_1",
            "content": [
                {"type": "thinking", "thinking": "hmm", "signature": "s"},
                {"type": "text", "text": "Let me write it."},
                {"type": "tool_use", "id": "toolu_9", "name": "Write", "input": {"a": 1}},
            ],
        },
        "parent_tool_use_id": None,
        "session_id": SESSION,
    }
    evs = mapped(line)
    assert [e.WhichOneof("event") for e in evs] == ["raw", "assistant_text", "tool_use"]
    assert evs[0].raw.type == "assistant/thinking"
    assert evs[1].assistant_text.text == "Let me write it."
    assert evs[1].assistant_text.message_id == "msg_1" and not evs[1].assistant_text.partial
    assert evs[2].tool_use.name == "Write" and json.loads(evs[2].tool_use.input_json) == {"a": 1}


def test_subagent_parent_id_is_kept() -> None:
    line = {
        "type": "assistant",
        "message": {"id": "m", "content": [{"type": "text", "text": "inner"}]},
        "parent_tool_use_id": "toolu_task",
    }
    (ev,) = mapped(line)
    assert ev.assistant_text.parent_tool_use_id == "toolu_task"


def test_tool_results_and_truncation() -> None:
    line = {
        "type": "user",
        "message": {
            "role": "user",
            "content": [
                {"tool_use_id": "t1", "type": "tool_result", "content": "x" * 100},
                {
                    "tool_use_id": "t2",
                    "type": "tool_result",
                    "is_error": True,
                    "content": [{"type": "text", "text": "boom"}, {"type": "image"}],
                },
            ],
        },
    }
    a, b = mapped(line, limit=16)
    assert a.tool_result.content == "x" * 16 and a.tool_result.truncated
    assert a.tool_result.content_limit == 16
    assert b.tool_result.is_error and b.tool_result.content == "boom\n[image]"
    assert not b.tool_result.truncated


def test_truncation_keeps_utf8_valid() -> None:
    line = {
        "type": "user",
        "message": {"content": [{"type": "tool_result", "tool_use_id": "t", "content": "é" * 10}]},
    }
    (ev,) = mapped(line, limit=5)
    assert ev.tool_result.content == "éé" and ev.tool_result.truncated


def test_partial_deltas() -> None:
    text = {
        "type": "stream_event",
        "event": {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": "Hel"},
        },
    }
    (ev,) = mapped(text)
    assert ev.assistant_text.partial and ev.assistant_text.text == "Hel"
    other = {
        "type": "stream_event",
        "event": {
            "type": "content_block_delta",
            "delta": {"type": "input_json_delta", "partial_json": "{"},
        },
    }
    (raw,) = mapped(other)
    assert raw.raw.type == "stream_event/content_block_delta"


def test_result_line() -> None:
    line = {
        "type": "result",
        "subtype": "error_max_turns",
        "is_error": True,
        "num_turns": 3,
        "duration_ms": 513,
        "duration_api_ms": 167,
        "total_cost_usd": 0.00028,
        "usage": {"input_tokens": 20, "output_tokens": 10, "cache_read_input_tokens": 2},
        "session_id": SESSION,
        "permission_denials": [{"tool_name": "Bash", "tool_use_id": "t"}],
        "api_error_status": None,
        "stop_reason": "tool_use",
        "terminal_reason": "max_turns",
        "errors": ["Reached maximum number of turns (2)"],
    }
    (ev,) = mapped(line)
    r = ev.result
    assert (r.subtype, r.is_error, r.num_turns, r.duration_ms) == ("error_max_turns", True, 3, 513)
    assert r.usage.cache_read_input_tokens == 2 and r.api_error_status == 0
    assert list(r.errors) == ["Reached maximum number of turns (2)"]
    host = event_from_pb(ev)
    assert isinstance(host, ClaudeResult)
    assert host.permission_denials == [{"tool_name": "Bash", "tool_use_id": "t"}]
    folded = summarize([host])
    assert folded.exit_code == 1 and folded.error == "Reached maximum number of turns (2)"


def test_result_numbers_out_of_their_field_range_are_clamped() -> None:
    line: dict[str, Any] = {"type": "result", "num_turns": 1e999, "duration_ms": -5}
    line["api_error_status"] = 2**40
    line["usage"] = {"input_tokens": 10**30, "output_tokens": "lots"}
    (ev,) = mapped(line)
    r = ev.result
    assert (r.num_turns, r.duration_ms, r.api_error_status) == (0, 0, 2**31 - 1)
    assert (r.usage.input_tokens, r.usage.output_tokens) == (2**64 - 1, 0)


def test_a_result_over_the_limits_is_cut_and_says_so() -> None:
    line: dict[str, Any] = {"type": "result", "result": "r" * (2 * gc.RESULT_TEXT_LIMIT)}
    line["errors"] = ["e" * 1000] * 1000
    (ev,) = mapped(line)
    r = ev.result
    assert r.truncated and len(r.result) == gc.RESULT_TEXT_LIMIT
    assert sum(len(e) for e in r.errors) <= gc.LIST_LIMIT
    assert ev.ByteSize() <= gc.EVENT_LIMIT
    assert not mapped({"type": "result", "result": "short"})[0].result.truncated


def test_lone_surrogates_in_a_line_are_replaced() -> None:
    text = '{"type":"assistant","message":{"content":[{"type":"text","text":"a\\ud800b"}]}}'
    (ev,) = gc.map_line(gc.parse_line(text), text)
    assert ev.assistant_text.text == "a?b"  # protobuf strings must be valid UTF-8


def test_fit_event_keeps_an_event_under_the_limit_as_it_is() -> None:
    ev = pb.AskEvent(assistant_text=pb.AssistantTextEvent(text="hello", message_id="m"))
    assert gc.fit_event(ev) == [ev]


def test_fit_event_splits_a_long_text_on_character_boundaries() -> None:
    text = "é" * (2 * gc.EVENT_LIMIT)  # 2 bytes each: splits must not cut one in half
    ev = pb.AskEvent(assistant_text=pb.AssistantTextEvent(text=text, message_id="m"))
    pieces = [p.assistant_text for p in gc.fit_event(ev)]
    assert "".join(p.text for p in pieces) == text
    assert [p.more for p in pieces] == [True] * (len(pieces) - 1) + [False]
    assert all(p.message_id == "m" and p.ByteSize() <= gc.EVENT_LIMIT for p in pieces)


def test_fit_event_cuts_the_longest_fields_of_other_events_and_says_so() -> None:
    big = "m" * (5 * 1024 * 1024)
    ev = pb.AskEvent(init=pb.InitEvent(model=big, session_id="s", tools=["t"] * 200_000))
    (fitted,) = gc.fit_event(ev)
    assert fitted.ByteSize() <= gc.EVENT_LIMIT
    assert fitted.init.truncated and fitted.init.session_id == "s"
    assert big.startswith(fitted.init.model)


# -- argv / env --------------------------------------------------------------------------
def test_argv_glues_values_and_keeps_prompt_out() -> None:
    req = pb.AskRequest(
        prompt="--dangerously-skip-permissions",
        model="-x",
        max_turns=3,
        max_budget_usd=0.5,
        permission_mode="acceptEdits",
        allowed_tools=["Bash(git *)", "Edit"],
        disallowed_tools=["WebFetch"],
        append_system_prompt="--be nice",
        resume=SESSION,
        fork_session=True,
        include_partial_messages=True,
    )
    argv = gc.build_argv("/bin/claude", req)
    assert argv == [
        "/bin/claude",
        "-p",
        "--output-format=stream-json",
        "--verbose",
        "--model=-x",
        "--max-turns=3",
        "--max-budget-usd=0.5",
        "--permission-mode=acceptEdits",
        "--allowed-tools=Bash(git *)",
        "--allowed-tools=Edit",
        "--disallowed-tools=WebFetch",
        "--append-system-prompt=--be nice",
        f"--resume={SESSION}",
        "--fork-session",
        "--include-partial-messages",
    ]
    assert "--dangerously-skip-permissions" not in argv  # the prompt goes to stdin


@pytest.mark.parametrize(
    "req",
    [
        pb.AskRequest(prompt="x", resume="a", continue_session=True),
        pb.AskRequest(prompt="x", fork_session=True),
        pb.AskRequest(prompt="x", session_id="nope"),
        pb.AskRequest(prompt="x", permission_mode="plan --x"),
        pb.AskRequest(prompt="x", model="a\x00b"),
        pb.AskRequest(prompt="x", max_budget_usd=float("inf")),
        pb.AskRequest(prompt="x", max_budget_usd=float("nan")),
        pb.AskRequest(prompt="x", max_budget_usd=-1),
    ],
)
def test_argv_refuses_bad_options(req: pb.AskRequest) -> None:
    with pytest.raises(AgentError) as info:
        gc.build_argv("/bin/claude", req)
    assert info.value.code.name == "INVALID_ARGUMENT"


def _user(uid: int) -> RunUser:
    return RunUser("u", uid, uid, "/home/u", "/bin/sh")


def test_env_is_sandbox_only_for_root_bypass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IS_SANDBOX", "yes")  # inherited, and not what the CLI accepts
    monkeypatch.setenv("COWORK_SECRET_THING", "x")
    root = _user(0)
    bypass = pb.AskRequest(prompt="x", permission_mode="bypassPermissions", env={"A": "1"})
    env = gc.build_env(bypass, root)
    assert env["IS_SANDBOX"] == "1" and env["A"] == "1"
    assert "COWORK_SECRET_THING" not in env
    assert env["DISABLE_AUTOUPDATER"] == "1"
    plain = gc.build_env(pb.AskRequest(prompt="x"), root)
    assert plain["IS_SANDBOX"] == "yes"  # untouched without bypass
    unpriv = gc.build_env(bypass, _user(12345))
    assert unpriv["IS_SANDBOX"] == "yes" and unpriv["HOME"] == "/home/u"
    assert unpriv["USER"] == "u"
    told = pb.AskRequest(prompt="x", permission_mode="bypassPermissions", env={"IS_SANDBOX": "0"})
    assert gc.build_env(told, root)["IS_SANDBOX"] == "0"
    with pytest.raises(AgentError):
        gc.build_env(pb.AskRequest(prompt="x", env={"A=B": "1"}), root)


def test_run_user_lookup() -> None:
    me = gc.run_user(None)
    assert me.uid == os.geteuid() and me.is_self
    assert gc.run_user(str(os.geteuid())).name == pwd.getpwuid(os.geteuid()).pw_name
    with pytest.raises(AgentError):
        gc.run_user("no-such-user-cowork")


def test_line_splitter() -> None:
    got: list[tuple[str, bytes | None]] = []

    async def sink(name: str, line: bytes | None, size: int) -> None:
        got.append((name, line))

    async def main() -> None:
        feed, flush = gc._lines(sink)
        await feed("stdout", b'{"a":')
        await feed("stdout", b'1}\n{"b":2}\n{"c"')
        await feed("stdout", b":3}")
        await flush("stdout")

    asyncio.run(main())
    assert got == [("stdout", b'{"a":1}'), ("stdout", b'{"b":2}'), ("stdout", b'{"c":3}')]


def test_line_splitter_drops_overlong_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gc, "LINE_LIMIT", 8)
    got: list[tuple[bytes | None, int]] = []

    async def sink(name: str, line: bytes | None, size: int) -> None:
        got.append((line, size))

    async def main() -> None:
        feed, flush = gc._lines(sink)
        await feed("stdout", b"0123456789")
        await feed("stdout", b"abc\nok\n")
        await flush("stdout")

    asyncio.run(main())
    assert got[0][0] is None and got[1:] == [(b"ok", 2)]


# -- host side -----------------------------------------------------------------------------
def test_ask_request_forwards_auth_only_when_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-test")
    monkeypatch.delenv("CLAUDE_CODE_OAUTH_TOKEN", raising=False)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "")
    assert auth_env() == {"ANTHROPIC_API_KEY": "sk-test"}
    req = ask_request("p", allowed_tools="Bash, Edit", timeout=1.5, env={"X": "1"})
    assert dict(req.env) == {"ANTHROPIC_API_KEY": "sk-test", "X": "1"}
    assert list(req.allowed_tools) == ["Bash", "Edit"] and req.timeout_ms == 1500
    assert dict(ask_request("p", forward_auth=False).env) == {}


def test_summarize_error_without_result() -> None:
    err = ClaudeError("claude exited with code 1 without a result", 1, 0, False, False, "bad")
    r = summarize([err])
    assert r.exit_code == 1 and r.output == "" and "bad" in r.error
    assert summarize([]).exit_code == 1


def test_tool_summary() -> None:
    assert tool_summary("Write", '{"file_path": "/w/a.py", "content": "x"}') == "Write(/w/a.py)"
    assert tool_summary("Bash", '{"command": "ls\\n -la"}') == "Bash(ls -la)"
    assert tool_summary("X", '{"a": 1, "b": 2}') == "X(a=…, b=…)"
    assert len(tool_summary("Bash", json.dumps({"command": "y" * 500}), 40)) == 40


def test_renderer_pipe_vs_json(capsys: pytest.CaptureFixture[str]) -> None:
    import sys

    evs = [
        pb.AskEvent(tool_use=pb.ToolUseEvent(id="t", name="Bash", input_json='{"command":"ls"}')),
        pb.AskEvent(tool_result=pb.ToolResultEvent(tool_use_id="t", content="a\nb")),
        pb.AskEvent(assistant_text=pb.AssistantTextEvent(text="two files")),
        pb.AskEvent(
            result=pb.ResultEvent(
                subtype="success", result="two files", num_turns=2, session_id="s"
            )
        ),
    ]
    r = Renderer(sys.stdout, sys.stderr)
    for e in evs:
        r.event(event_from_pb(e))
    out, err = capsys.readouterr()
    assert out == "two files\n"
    assert err.splitlines()[:2] == ["⏺ Bash(ls)", "  ⎿ a (+1 lines)"]
    assert err.splitlines()[2].startswith("done (success) · 2 turns")
    j = Renderer(sys.stdout, sys.stderr, json_lines=True)
    for e in evs:
        j.event(event_from_pb(e))
    out, err = capsys.readouterr()
    assert [json.loads(x)["type"] for x in out.splitlines()] == [
        "tool_use",
        "tool_result",
        "assistant_text",
        "result",
    ]
    assert err == ""


def test_interactive_argv_is_the_agents_claude_with_the_args() -> None:
    # The agent itself runs processes as the run-as user: nothing to switch here.
    other = {"path": "/c/claude", "run_as_user": "lima", "agent_user": "root", "run_as_home": "/h"}
    assert interactive_argv(other, ["--resume", "x"]) == ["/c/claude", "--resume", "x"]
    assert interactive_argv({}, []) == ["claude"]
