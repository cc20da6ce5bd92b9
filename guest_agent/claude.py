"""Claude.Ask / Claude.Version: run the real Claude Code CLI and stream its events, typed.

How a run works:
- argv is `claude -p --output-format=stream-json --verbose` plus the options,
  each value glued to its flag (`--resume=ID`) so no value can be read as a
  flag; the prompt goes through stdin, never argv (no length limit, no
  leading-dash surprises).
- The CLI runs in its own session (setsid) as `--run-as` USER when the agent
  has one (switched by exec'ing util-linux setpriv: see _spawn for why not
  Popen(user=...)), with that user's HOME so its sessions and settings live
  in their home.
- Every stdout line is one stream-json object; `map_line` turns it into typed
  events (unknown line types become RawEvent: a newer CLI never loses data).
  stderr lines become LogEvents, and the last ones are kept for the error
  report. Whatever a line holds, each event fits one gRPC message (fit_event:
  long texts split, other fields cut and flagged) and a line that cannot be
  mapped becomes a LogEvent: the reader never stops, so the stream ends.
- The CLI's `result` line is held until the process has exited so the
  ResultEvent carries the exit code; failure is judged on both signals (the
  CLI's is_error and a non-zero exit). An exit without a result yields a
  terminal ErrorEvent with the exit code and the stderr tail.
- Cancel (client cancel/disconnect), timeout and agent shutdown interrupt the
  run: SIGINT to the process group, then SIGTERM, then SIGKILL, each after a
  grace period; then the CLI is reaped and whatever the run left, in its
  group or not (setsid, double forks), is stopped (Spawned.teardown and
  reaper.py). Nothing outlives the RPC, and a pipe only something outside the
  run still holds is no longer read.
- The API credential never reaches the CLI (issue #13): the request's
  ANTHROPIC_API_KEY / CLAUDE_CODE_OAUTH_TOKEN (else the one Auth.Set holds) stays
  in the agent; the CLI gets a placeholder and an ANTHROPIC_BASE_URL on the
  run's API relay (api_relay.py): 127.0.0.1:3129 inside the box, or a private
  loopback port without one. No credential at all: FAILED_PRECONDITION.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import json
import logging
import math
import os
import pwd
import re
import shutil
import signal
import subprocess
import weakref
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from cowork.agent.v1 import agent_pb2, process_pb2
from cowork.agent.v1 import claude_pb2 as pb
from cowork.agent.v1 import claude_pb2_grpc as pb_grpc
from cowork.defaults import KILL_GRACE_SECONDS

from . import credentials as creds
from .api_relay import ApiRelay, Endpoint, Route
from .boxes import Box, Boxes
from .cgroups import RunCgroup
from .config import AgentConfig
from .egress import OFFLINE, EgressLog
from .errors import AgentError, denied, invalid, not_found, precondition
from .exec_relay import no_proxy_for_loopback
from .info import AgentService
from .paths import PathPolicy
from .policy import Limits, RunLimits
from .process import (
    PipeWatch,
    Spawned,
    base_environment,
    check_timeout,
    detached_task,
    drain,
    limits_of,
    pump,
    spawn_in_box,
    start_offset,
    write_all,
)
from .reaper import REAPER
from .rpc import Context, audit
from .runs import KIND_EVENT, Gap, RunRecord, Runs
from .sandbox import RELAY_URL, Launch, RunUser, Sandbox, drop_to, lookup_user

# Limits on what one event may carry: each must fit one gRPC message (~4 MiB,
# MAX_MESSAGE_BYTES), whatever the CLI prints, or whatever a process of the run
# writes to the CLI's stdout (it can: /proc/PID/fd/1).
log = logging.getLogger("cowork.claude")

TOOL_RESULT_LIMIT = 64 * 1024
TOOL_RESULT_MAX_LIMIT = 1024 * 1024
TOOL_INPUT_LIMIT = 1024 * 1024
RAW_LIMIT = 1024 * 1024
RESULT_TEXT_LIMIT = 1024 * 1024  # the full text also came as assistant_text events
TEXT_PIECE = 1024 * 1024  # a longer assistant text is split into pieces (AssistantTextEvent.more)
LIST_LIMIT = 256 * 1024  # errors, permission denials, tools: in all
FIELD_LIMIT = 64 * 1024  # any string, once an event is still over EVENT_LIMIT
EVENT_LIMIT = 3 * 1024 * 1024  # serialized size of one event, with room below the cap
LINE_LIMIT = 16 * 1024 * 1024  # longer stdout lines are dropped (with a LogEvent saying so)
LOG_LINE_LIMIT = 8 * 1024
STDERR_TAIL_LINES = 20
EVENT_QUEUE = 64

# Grace periods: SIGINT → (interrupt_grace) → SIGTERM → (kill_grace) → SIGKILL.
INTERRUPT_GRACE_SECONDS = 2.0
# After its result line the CLI should exit by itself; past this it is stopped.
RESULT_EXIT_GRACE_SECONDS = 10.0
# After the CLI exited, how long its output pipes may stay open (held by leftovers).
PIPE_DRAIN_SECONDS = 2.0
VERSION_TIMEOUT_SECONDS = 20.0

# Environment defaults for every run (the request's env wins): a pinned CLI
# must not update itself in the middle of a run.
RUN_ENV_DEFAULTS = {"DISABLE_AUTOUPDATER": "1"}
BYPASS = "bypassPermissions"
_MODE_RE = re.compile(r"^[A-Za-z]+$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ARG_STRLEN = 128 * 1024  # the kernel's limit on one argv or environment string
E2BIG_MESSAGE = (
    "the prompt options and environment are too big for the OS "
    "(E2BIG: the kernel takes 128 KiB per value and about 2 MiB in all)"
)


# -- who runs it, and which binary --------------------------------------------------
def run_user(run_as: str | None) -> RunUser:
    """The account Claude runs as: `run_as` (name or uid) or the agent's own user."""
    return lookup_user(run_as)


def find_claude(claude_bin: str | None, user: RunUser | None = None) -> str | None:
    """The executable to run: --claude-bin/COWORK_CLAUDE_BIN, then PATH, then usual spots."""
    if claude_bin:
        found = shutil.which(claude_bin) if "/" not in claude_bin else claude_bin
        if found and os.path.isfile(found) and os.access(found, os.X_OK):
            return os.path.abspath(found)
        return None
    found = shutil.which("claude")
    if found:
        return os.path.abspath(found)
    homes = [user.home] if user is not None else []
    homes.append(os.path.expanduser("~"))
    candidates = [os.path.join(h, ".local", "bin", "claude") for h in homes]
    candidates += ["/usr/local/bin/claude", "/opt/cowork/claude/node_modules/.bin/claude"]
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


# -- argv and environment ---------------------------------------------------------
def _clean(value: str, what: str) -> str:
    if "\x00" in value:
        raise invalid(f"{what} contains a NUL byte")
    return value


def build_argv(exe: str, req: pb.AskRequest) -> list[str]:
    """The CLI's argv for `req` (the prompt goes to stdin). Values are glued to their flags."""
    argv = [exe, "-p", "--output-format=stream-json", "--verbose"]
    if req.model:
        argv.append(f"--model={_clean(req.model, 'model')}")
    if req.max_turns:
        argv.append(f"--max-turns={req.max_turns}")
    if req.max_budget_usd:
        if not (math.isfinite(req.max_budget_usd) and req.max_budget_usd > 0):
            raise invalid(f"max_budget_usd must be a positive number, not {req.max_budget_usd}")
        argv.append(f"--max-budget-usd={req.max_budget_usd:g}")
    if req.permission_mode:
        if not _MODE_RE.match(req.permission_mode):
            raise invalid(f"invalid permission_mode: {req.permission_mode!r}")
        argv.append(f"--permission-mode={req.permission_mode}")
    for tool in req.allowed_tools:
        if tool:
            argv.append(f"--allowed-tools={_clean(tool, 'allowed_tools')}")
    for tool in req.disallowed_tools:
        if tool:
            argv.append(f"--disallowed-tools={_clean(tool, 'disallowed_tools')}")
    if req.append_system_prompt:
        argv.append(f"--append-system-prompt={_clean(req.append_system_prompt, 'prompt')}")
    if req.resume and req.continue_session:
        raise invalid("give either resume or continue_session, not both")
    if req.resume:
        argv.append(f"--resume={_clean(req.resume, 'resume')}")
    if req.continue_session:
        argv.append("--continue")
    if req.session_id:
        if not _UUID_RE.match(req.session_id):
            raise invalid(f"session_id must be a UUID: {req.session_id!r}")
        argv.append(f"--session-id={req.session_id}")
    if req.fork_session:
        if not (req.resume or req.continue_session):
            raise invalid("fork_session needs resume or continue_session")
        argv.append("--fork-session")
    if req.include_partial_messages:
        argv.append("--include-partial-messages")
    return argv


def build_env(req: pb.AskRequest, user: RunUser) -> dict[str, str]:
    """The run's environment: the agent's (minus COWORK_*), the user's identity, the request's;
    never a credential or base URL, from the request or the agent's own environment (the
    run's API relay supplies a placeholder and its own base URL)."""
    env = base_environment()
    for name in (*creds.CREDENTIAL_ENV, creds.BASE_URL_ENV):
        env.pop(name, None)
    if not user.is_self:
        env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell)
    for key, value in RUN_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    for key, value in req.env.items():
        if not _ENV_NAME_RE.match(key) or "\x00" in value:
            raise invalid(f"invalid environment variable name or value: {key!r}")
        if len(key) + len(value.encode()) + 2 > MAX_ARG_STRLEN:
            raise invalid(E2BIG_MESSAGE)  # checked before the credential is looked for
        if key in creds.CREDENTIAL_ENV or key == creds.BASE_URL_ENV:
            continue  # the agent's to keep (run_credential)
        env[key] = value
    # The CLI refuses to bypass permissions as root unless told it is in a
    # sandbox, which it is: this is the sandbox VM. It wants exactly "1" (an
    # inherited IS_SANDBOX=yes is not enough); the request may still override.
    if req.permission_mode == BYPASS and user.uid == 0 and "IS_SANDBOX" not in req.env:
        env["IS_SANDBOX"] = "1"
    return env


# -- stream-json line → events --------------------------------------------------------
def _cut(text: str, limit: int) -> tuple[str, bool]:
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return data.decode("utf-8") if len(data) != len(text) else text, False
    return data[:limit].decode("utf-8", "ignore"), True


def _cut_list(items: list[str], each: int, total: int) -> tuple[list[str], bool]:
    """Each item cut to `each` bytes, and the list cut after `total` bytes in all."""
    out: list[str] = []
    cut = False
    used = 0
    for item in items:
        text, was_cut = _cut(item, each)
        size = len(text.encode())
        if used + size > total:
            return out, True
        out.append(text)
        used += size
        cut = cut or was_cut
    return out, cut


def _clean_strings(obj: Any) -> Any:
    """`obj` with lone surrogates (JSON "\\ud800", which protobuf cannot carry) replaced."""
    if isinstance(obj, str):
        return obj.encode("utf-8", "replace").decode("utf-8")
    if isinstance(obj, list):
        return [_clean_strings(v) for v in obj]
    if isinstance(obj, dict):
        return {_clean_strings(k): _clean_strings(v) for k, v in obj.items()}
    return obj


def parse_line(text: str) -> Any:
    """A stream-json line as Python objects whose strings protobuf can carry (ValueError if it
    is not JSON, RecursionError if it nests too deeply)."""
    obj = json.loads(text)
    if "\\ud" in text or "\\uD" in text:  # only an escape can make a lone surrogate
        obj = _clean_strings(obj)
    return obj


def _pieces(text: str, size: int) -> list[str]:
    """`text` split into pieces of at most `size` UTF-8 bytes, never inside a character."""
    data = text.encode("utf-8", "replace")
    out = []
    start = 0
    while start < len(data):
        end = min(start + size, len(data))
        while end < len(data) and end > start and (data[end] & 0xC0) == 0x80:
            end -= 1
        out.append(data[start:end].decode("utf-8"))
        start = end
    return out or [""]


def _shrink(msg: Any) -> bool:
    """Cut the longest strings of `msg` (halving, down to FIELD_LIMIT; lists to LIST_LIMIT)
    until it fits EVENT_LIMIT. Returns whether anything was cut."""
    cut = False
    while msg.ByteSize() > EVENT_LIMIT:
        best: tuple[int, Any] | None = None
        for fd in msg.DESCRIPTOR.fields:
            if fd.type != fd.TYPE_STRING:
                continue
            value = getattr(msg, fd.name)
            if fd.is_repeated:
                size = sum(len(v.encode("utf-8", "replace")) for v in value)
                if size > LIST_LIMIT or any(len(v) > FIELD_LIMIT for v in value):
                    best = max(best or (0, fd), (size, fd), key=lambda b: b[0])
            elif len(value.encode("utf-8", "replace")) > FIELD_LIMIT:
                best = max(best or (0, fd), (len(value.encode()), fd), key=lambda b: b[0])
        if best is None:
            return cut  # nothing left to cut: the caller falls back
        size, fd = best
        if fd.is_repeated:
            items, _ = _cut_list(list(getattr(msg, fd.name)), FIELD_LIMIT, LIST_LIMIT)
            del getattr(msg, fd.name)[:]
            getattr(msg, fd.name).extend(items)
        else:
            text, _ = _cut(getattr(msg, fd.name), max(FIELD_LIMIT, size // 2))
            setattr(msg, fd.name, text)
        cut = True
    return cut


def fit_event(ev: pb.AskEvent) -> list[pb.AskEvent]:
    """`ev` as events that each fit one gRPC message: a long assistant text is split into
    pieces (`more`), anything else cut (`truncated`). An event over the cap would end the
    stream with RESOURCE_EXHAUSTED and no terminal event."""
    if ev.ByteSize() <= EVENT_LIMIT:
        return [ev]
    kind = ev.WhichOneof("event")
    if kind == "assistant_text":
        whole = ev.assistant_text
        texts = _pieces(whole.text, TEXT_PIECE)
        out = []
        for i, text in enumerate(texts):
            piece = pb.AssistantTextEvent()
            piece.CopyFrom(whole)
            piece.text = text
            piece.more = i < len(texts) - 1
            _shrink(piece)  # the other fields (ids) are the CLI's: bounded like the rest
            out.append(pb.AskEvent(assistant_text=piece))
        return out
    if kind is None:
        return []
    inner = getattr(ev, kind)
    cut = _shrink(inner)
    if cut and "truncated" in inner.DESCRIPTOR.fields_by_name:
        inner.truncated = True
    if ev.ByteSize() <= EVENT_LIMIT:
        return [ev]
    note = f"[agent] dropped a {kind} event of {ev.ByteSize()} bytes (over the message cap)"
    return [pb.AskEvent(log=pb.LogEvent(line=note, stream="stdout"))]


def _tool_result_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for block in content:
            if isinstance(block, dict):
                kind = block.get("type")
                if kind == "text":
                    parts.append(str(block.get("text", "")))
                else:
                    parts.append(f"[{kind}]")
            else:
                parts.append(str(block))
        return "\n".join(parts)
    return json.dumps(content)


def _int(v: Any, lo: int = 0, hi: int = 2**32 - 1) -> int:
    """`v` as an int clamped to the proto field's range (lo..hi; default uint32)."""
    try:
        return min(max(int(v or 0), lo), hi)
    except (TypeError, ValueError, OverflowError):  # OverflowError: JSON 1e999 is inf
        return 0


def _u64(v: Any) -> int:
    return _int(v, 0, 2**64 - 1)


def _float(v: Any) -> float:
    try:
        return float(v or 0.0)
    except (TypeError, ValueError, OverflowError):
        return 0.0


def _list(obj: dict[str, Any], key: str) -> list[Any]:
    value = obj.get(key)
    return value if isinstance(value, list) else []


def _raw(kind: str, obj: Any) -> pb.AskEvent:
    text, cut = _cut(json.dumps(obj, ensure_ascii=False), RAW_LIMIT)
    return pb.AskEvent(raw=pb.RawEvent(type=kind, json=text, truncated=cut))


def line_type(obj: dict[str, Any]) -> str:
    kind = str(obj.get("type", ""))
    sub = obj.get("subtype")
    if kind == "stream_event" and isinstance(obj.get("event"), dict):
        sub = obj["event"].get("type")
    return f"{kind}/{sub}" if sub else kind


def result_event(obj: dict[str, Any], line: str) -> pb.ResultEvent:
    usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else {}
    assert isinstance(usage, dict)
    errors = obj.get("errors") if isinstance(obj.get("errors"), list) else []
    assert isinstance(errors, list)
    denials = (
        obj.get("permission_denials") if isinstance(obj.get("permission_denials"), list) else []
    )
    assert isinstance(denials, list)
    text, json_cut = _cut(line, RAW_LIMIT)
    result, result_cut = _cut(
        obj["result"] if isinstance(obj.get("result"), str) else "", RESULT_TEXT_LIMIT
    )
    error_list, errors_cut = _cut_list(
        [e if isinstance(e, str) else json.dumps(e) for e in errors], FIELD_LIMIT, LIST_LIMIT
    )
    denial_list, denials_cut = _cut_list([json.dumps(d) for d in denials], FIELD_LIMIT, LIST_LIMIT)
    return pb.ResultEvent(
        subtype=str(obj.get("subtype", "")),
        is_error=bool(obj.get("is_error")),
        result=result,
        num_turns=_int(obj.get("num_turns")),
        duration_ms=_u64(obj.get("duration_ms")),
        duration_api_ms=_u64(obj.get("duration_api_ms")),
        total_cost_usd=_float(obj.get("total_cost_usd")),
        usage=pb.Usage(
            input_tokens=_u64(usage.get("input_tokens")),
            output_tokens=_u64(usage.get("output_tokens")),
            cache_creation_input_tokens=_u64(usage.get("cache_creation_input_tokens")),
            cache_read_input_tokens=_u64(usage.get("cache_read_input_tokens")),
        ),
        session_id=str(obj.get("session_id", "")),
        permission_denials_json=denial_list,
        api_error_status=_int(obj.get("api_error_status"), 0, 2**31 - 1),
        stop_reason=str(obj.get("stop_reason") or ""),
        terminal_reason=str(obj.get("terminal_reason") or ""),
        errors=error_list,
        json=text,
        truncated=json_cut or result_cut or errors_cut or denials_cut,
    )


def map_line(obj: Any, line: str, tool_result_limit: int = TOOL_RESULT_LIMIT) -> list[pb.AskEvent]:
    """Typed events for one parsed stream-json line (`line` is its text).

    A `result` line maps to a ResultEvent like any other here; the runner holds
    it back until the CLI has exited. Anything this function does not know
    becomes a RawEvent, never nothing.
    """
    if not isinstance(obj, dict):
        return [_raw("", obj)]
    kind = obj.get("type")
    parent = str(obj.get("parent_tool_use_id") or "")
    if kind == "system" and obj.get("subtype") == "init":
        tools, tools_cut = _cut_list([str(t) for t in _list(obj, "tools")], FIELD_LIMIT, LIST_LIMIT)
        text, json_cut = _cut(line, RAW_LIMIT)
        return [
            pb.AskEvent(
                init=pb.InitEvent(
                    session_id=str(obj.get("session_id", "")),
                    model=str(obj.get("model", "")),
                    tools=tools,
                    cwd=str(obj.get("cwd", "")),
                    claude_version=str(obj.get("claude_code_version", "")),
                    permission_mode=str(obj.get("permissionMode", "")),
                    api_key_source=str(obj.get("apiKeySource", "")),
                    json=text,
                    truncated=json_cut or tools_cut,
                )
            )
        ]
    if kind == "assistant" and isinstance(obj.get("message"), dict):
        msg = obj["message"]
        content = msg.get("content")
        if not isinstance(content, list):
            return [_raw("assistant", obj)]
        events: list[pb.AskEvent] = []
        for block in content:
            btype = block.get("type") if isinstance(block, dict) else None
            if btype == "text":
                events.append(
                    pb.AskEvent(
                        assistant_text=pb.AssistantTextEvent(
                            text=str(block.get("text", "")),
                            partial=False,
                            message_id=str(msg.get("id", "")),
                            parent_tool_use_id=parent,
                        )
                    )
                )
            elif btype == "tool_use":
                input_json, cut = _cut(json.dumps(block.get("input", {})), TOOL_INPUT_LIMIT)
                events.append(
                    pb.AskEvent(
                        tool_use=pb.ToolUseEvent(
                            id=str(block.get("id", "")),
                            name=str(block.get("name", "")),
                            input_json=input_json,
                            parent_tool_use_id=parent,
                            truncated=cut,
                        )
                    )
                )
            else:
                events.append(_raw(f"assistant/{btype or 'unknown'}", block))
        return events
    if kind == "user" and isinstance(obj.get("message"), dict):
        content = obj["message"].get("content")
        results = (
            [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
            if isinstance(content, list)
            else []
        )
        if not results or len(results) != len(content or []):
            return [_raw("user", obj)]
        events = []
        for block in results:
            text, cut = _cut(_tool_result_text(block.get("content")), tool_result_limit)
            events.append(
                pb.AskEvent(
                    tool_result=pb.ToolResultEvent(
                        tool_use_id=str(block.get("tool_use_id", "")),
                        is_error=bool(block.get("is_error")),
                        content=text,
                        truncated=cut,
                        content_limit=tool_result_limit,
                        parent_tool_use_id=parent,
                    )
                )
            )
        return events
    if kind == "stream_event" and isinstance(obj.get("event"), dict):
        ev = obj["event"]
        delta = ev.get("delta") if isinstance(ev.get("delta"), dict) else None
        if ev.get("type") == "content_block_delta" and delta and delta.get("type") == "text_delta":
            return [
                pb.AskEvent(
                    assistant_text=pb.AssistantTextEvent(
                        text=str(delta.get("text", "")), partial=True, parent_tool_use_id=parent
                    )
                )
            ]
        return [_raw(line_type(obj), obj)]
    if kind == "result":
        return [pb.AskEvent(result=result_event(obj, line))]
    return [_raw(line_type(obj), obj)]


def _lines(sink: Any) -> Any:
    """A pump sink that splits chunks into lines and hands each (bytes, no newline) to `sink`."""
    buf = bytearray()
    state = {"dropping": False}

    async def feed(name: str, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                if not state["dropping"]:
                    buf.extend(data[start:])
                    if len(buf) > LINE_LIMIT:
                        await sink(name, None, len(buf))
                        buf.clear()
                        state["dropping"] = True
                return
            if state["dropping"]:
                state["dropping"] = False
            else:
                buf.extend(data[start:nl])
                await sink(name, bytes(buf), len(buf))
            buf.clear()
            start = nl + 1

    async def flush(name: str) -> None:
        if buf and not state["dropping"]:
            await sink(name, bytes(buf), len(buf))
        buf.clear()

    return feed, flush


# -- processes ----------------------------------------------------------------------------
def _spawn(
    argv: list[str],
    cwd: str,
    env: dict[str, str],
    user: RunUser,
    sandbox: Sandbox | None = None,
    limits: Limits | None = None,
    mode: str | None = None,
    relay: Any = None,
    cgroup: RunCgroup | None = None,
) -> tuple[Spawned, int]:
    """Start the CLI in a new session; return it and the write end of its stdin.

    Another user is switched to by exec'ing util-linux `setpriv`, not with
    Popen(user=, group=): those make CPython fork() (no vfork) the
    multi-threaded agent, and the child of that fork crashed with SIGSEGV
    before exec in about one run in five. setpriv execs the CLI in place, so
    the pid we hold is the CLI's.
    """
    launch: Launch | None = None
    if sandbox is not None:  # the sandbox switches user itself (and boxes it, per policy)
        launch = sandbox.launch(argv, env, cwd, pty=False, limits=limits, mode=mode, cgroup=cgroup)
        launch.relay = relay
        argv, env = launch.argv, launch.env
    else:
        argv = drop_to(user) + argv  # empty when the CLI runs as the agent's own user
    # Inherited by every process of the run: how the reaper finds its leftovers.
    run = REAPER.new_run()
    env = {**env, **run.env}
    r_out, w_out = os.pipe2(os.O_CLOEXEC)
    r_err, w_err = os.pipe2(os.O_CLOEXEC)
    r_in, w_in = os.pipe2(os.O_CLOEXEC)
    try:
        popen = subprocess.Popen(
            argv,
            stdin=r_in,
            stdout=w_out,
            stderr=w_err,
            cwd=cwd,
            env=env,
            start_new_session=True,
            close_fds=True,
            pass_fds=launch.pass_fds if launch is not None else (),
        )
    except BaseException as exc:
        REAPER.end_run(run)
        for fd in (r_out, r_err, w_in):
            os.close(fd)
        if launch is not None:
            launch.abandon()
        if isinstance(exc, FileNotFoundError):
            raise not_found(f"claude not found: {argv[0]}") from None
        if isinstance(exc, PermissionError):
            raise denied(f"cannot run {argv[0]}: {exc.strerror}") from None
        if isinstance(exc, OSError) and exc.errno == errno.E2BIG:
            raise invalid(E2BIG_MESSAGE) from None
        if isinstance(exc, OSError):
            raise AgentError(grpc.StatusCode.INTERNAL, f"cannot start claude: {exc}") from None
        raise
    finally:
        for fd in (w_out, w_err, r_in):
            os.close(fd)
        if launch is not None:
            launch.close_child_fds()
    REAPER.track(popen.pid, run)
    for fd in (r_out, r_err, w_in):
        os.set_blocking(fd, False)
    sp = Spawned(
        popen=popen,
        pid=popen.pid,
        stdin_fd=None,
        out_fds=[("stdout", r_out), ("stderr", r_err)],
        pty_master=None,
        launch=launch,
        run=run,
    )
    try:
        sp.pidfd = os.pidfd_open(popen.pid)
    except (AttributeError, OSError):
        sp.pidfd = None
    return sp, w_in


def _spawn_in_box(
    box: Box, argv: list[str], cwd: str, env: dict[str, str], sandbox: Sandbox | None
) -> tuple[Spawned, int]:
    """The CLI in a named box (started by InBox.activate); it and the write end of its stdin."""
    if sandbox is not None:
        env = sandbox.run_env(env, box.mode)
    sp = spawn_in_box(box, argv[0], argv, env, cwd, keep_stdin=True)
    assert sp.stdin_fd is not None
    stdin_fd, sp.stdin_fd = sp.stdin_fd, None
    return sp, stdin_fd


# -- the service ------------------------------------------------------------------------------
@dataclass
class _RunState:
    result: pb.ResultEvent | None = None
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    timed_out: bool = False
    stopping: bool = False
    # Why the agent cancelled the run itself (shutdown); "" when it did not.
    cancelled: str = ""
    events: int = 0


class ClaudeService(pb_grpc.ClaudeServicer):
    def __init__(
        self,
        cfg: AgentConfig,
        paths: PathPolicy,
        interrupt_grace: float = INTERRUPT_GRACE_SECONDS,
        sandbox: Sandbox | None = None,
        relay: ApiRelay | None = None,
        credentials: creds.CredentialStore | None = None,
        runs: Runs | None = None,
        boxes: Boxes | None = None,
    ) -> None:
        self.cfg = cfg
        self.boxes = boxes
        self.runs = runs if runs is not None else Runs(None, RunLimits)
        self.paths = paths
        self.sandbox = sandbox
        self.relay = relay or ApiRelay(lambda: OFFLINE, EgressLog())
        self.credentials = credentials or creds.CredentialStore()
        self.kill_grace = cfg.kill_grace or KILL_GRACE_SECONDS
        self.interrupt_grace = interrupt_grace
        self._version_cache: dict[tuple[str, float], str] = {}
        # Runs in progress: what cancel_all() stops, and what it waits for.
        self._active: dict[asyncio.Event, asyncio.Event] = {}
        self._cancel_reason = ""
        _SERVICES.add(self)

    async def cancel_all(self, reason: str) -> None:
        """Stop every run now; each stream ends with an ErrorEvent saying `reason` (cancelled)."""
        self._cancel_reason = reason
        ends = []
        for cancel, ended in list(self._active.items()):
            cancel.set()
            ends.append(ended.wait())
        if ends:
            limit = self.interrupt_grace + 2 * self.kill_grace + PIPE_DRAIN_SECONDS + 1
            await asyncio.wait([asyncio.ensure_future(e) for e in ends], timeout=limit)

    def _user(self) -> RunUser:
        """The sandbox's identity when there is one (the agent's), else --run-as."""
        if self.sandbox is not None:
            return self.sandbox.identity.user
        return run_user(self.cfg.run_as)

    # -- Version ---------------------------------------------------------------------
    async def version(self) -> pb.ClaudeVersionResponse:
        try:
            user = self._user()
        except AgentError as exc:
            return pb.ClaudeVersionResponse(installed=False, error=exc.message)
        exe = find_claude(self.cfg.claude_bin, user)
        if exe is None:
            where = self.cfg.claude_bin or "PATH"
            return pb.ClaudeVersionResponse(
                installed=False, run_as_user=user.name, error=f"claude not found ({where})"
            )
        try:
            key = (exe, os.stat(exe).st_mtime)
        except OSError as exc:
            return pb.ClaudeVersionResponse(installed=False, path=exe, error=str(exc))
        version = self._version_cache.get(key)
        if version is None:
            try:
                version = await self._run_version(exe, user)
            except AgentError as exc:
                return pb.ClaudeVersionResponse(
                    installed=False, path=exe, run_as_user=user.name, error=exc.message
                )
            self._version_cache[key] = version
        return pb.ClaudeVersionResponse(
            installed=True,
            version=version,
            path=exe,
            run_as_user=user.name,
            run_as_home=user.home,
            agent_user=pwd.getpwuid(os.geteuid()).pw_name,
        )

    async def _run_version(self, exe: str, user: RunUser) -> str:
        env = build_env(pb.AskRequest(), user)
        sp, w_in = _spawn([exe, "--version"], user.home if not user.is_self else "/", env, user)
        os.close(w_in)
        out = bytearray()

        def collect(name: str, data: bytes) -> None:
            if name == "stdout" and len(out) < 4096:
                out.extend(data)

        work = asyncio.gather(*(pump(fd, name, collect) for name, fd in sp.out_fds))
        try:
            await asyncio.wait_for(sp.wait_exited(), VERSION_TIMEOUT_SECONDS)
            await asyncio.wait_for(work, PIPE_DRAIN_SECONDS)
        except asyncio.TimeoutError:
            raise AgentError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"{exe} --version did not answer"
            ) from None
        finally:
            work.cancel()
            await sp.teardown(self.kill_grace)
            await asyncio.gather(work, return_exceptions=True)
            sp.close_fds()
        if sp.returncode != 0:
            raise AgentError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"{exe} --version exited {sp.returncode}",
            )
        return out.decode("utf-8", "replace").strip()

    async def Version(
        self, request: pb.ClaudeVersionRequest, context: Context
    ) -> pb.ClaudeVersionResponse:
        return await self.version()

    async def info(self) -> agent_pb2.ClaudeInfo:
        v = await self.version()
        return agent_pb2.ClaudeInfo(installed=v.installed, version=v.version, path=v.path)

    # -- Ask ---------------------------------------------------------------------------
    def _cwd(self, req: pb.AskRequest) -> str:
        cwd = self.paths.resolve(req.cwd) if req.cwd else self.paths.default_dir
        if not os.path.exists(cwd):
            raise not_found(f"working directory not found: {cwd}")
        if not os.path.isdir(cwd):
            raise invalid(f"working directory is not a directory: {cwd}")
        return cwd

    async def _stop(self, sp: Spawned, state: _RunState) -> None:
        """Interrupt the run: SIGINT, SIGTERM, SIGKILL to its group; then reap the CLI and
        stop whatever the run left, in its group or not (Spawned.teardown)."""
        state.stopping = True
        if not await sp.exited_within(0):
            sp.signal_group(signal.SIGINT)
            if not await sp.exited_within(self.interrupt_grace):
                sp.signal_group(signal.SIGTERM)
                if not await sp.exited_within(self.kill_grace):
                    sp.signal_group(signal.SIGKILL)
                    await sp.wait_exited()
        await sp.teardown(self.kill_grace)

    def run_credential(self, request: pb.AskRequest) -> creds.Credential:
        """The run's credential: the request's, else the one held (with the request's base URL
        when it gives one); FAILED_PRECONDITION when there is none."""
        given = creds.from_request_env(dict(request.env))
        if given is not None:
            return given
        held = self.credentials.get()
        if held is None:
            raise creds.missing(self.credentials)
        if request.env.get(creds.BASE_URL_ENV):
            return held.with_upstream(creds.parse_base_url(request.env[creds.BASE_URL_ENV]))
        return held

    async def Ask(self, request: pb.AskRequest, context: Context) -> AsyncIterator[pb.AskEvent]:
        if not request.prompt and not (request.resume or request.continue_session):
            raise invalid("prompt is empty")
        rec = self.runs.create(
            "claude",
            request.detach,
            prompt=request.prompt,
            cwd=request.cwd or self.paths.default_dir,
            box=request.box,
        )
        if not request.detach:
            final: pb.AskEvent | None = None
            try:
                async for ev in self._ask(request, rec):
                    if ev.WhichOneof("event") in ("result", "error"):
                        final = ev
                    yield ev
            finally:
                self.runs.finish(rec, _exit_of(final), "" if final else "stream ended")
            return
        # Detached: a task of the agent drives the run into its journal; this stream
        # (like any Attach) follows the journal.
        loop = asyncio.get_running_loop()
        started: asyncio.Future[int] = loop.create_future()
        rec.task = detached_task(self._drive(request, rec, started))
        await asyncio.wait([started, rec.task], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
        pid = started.result()  # the run's start failed: its error, as a direct Ask's
        audit(run_id=rec.id, detached=True, pid=pid)
        async for ev in self._follow(rec, 0):
            yield ev

    async def _drive(
        self, request: pb.AskRequest, rec: RunRecord, started: asyncio.Future[int]
    ) -> None:
        """Run a detached Ask to its end, its events into the journal."""
        journal = rec.journal
        assert journal is not None
        final: pb.AskEvent | None = None
        reason = ""
        gen = self._ask(request, rec, started)
        try:
            async for ev in gen:
                kind = ev.WhichOneof("event")
                if kind == "init" and ev.init.session_id:
                    rec.session_id = ev.init.session_id
                    self.runs.note_started(rec)
                elif kind in ("result", "error"):
                    final = ev
                    if kind == "result" and ev.result.session_id:
                        rec.session_id = ev.result.session_id
                journal.append(KIND_EVENT, ev.SerializeToString())
        except asyncio.CancelledError:
            reason = "lost: agent stopped"
        except AgentError as exc:
            reason = exc.message
            if not started.done():
                started.set_exception(exc)
        except Exception as exc:
            log.exception("detached Claude run %s failed", rec.id)
            reason = f"agent error: {exc!r}"
            if not started.done():
                started.set_exception(AgentError(grpc.StatusCode.INTERNAL, reason))
        finally:
            with contextlib.suppress(BaseException):
                await gen.aclose()
            if not started.done():
                started.cancel()
            if started.cancelled() or started.exception() is not None:
                self.runs.discard(rec)  # it never started
            else:
                self.runs.finish(rec, _exit_of(final), reason)

    async def _follow(self, rec: RunRecord, offset: int) -> AsyncIterator[pb.AskEvent]:
        """A detached run's events from `offset`, then live ones, to its result or error."""
        journal = rec.journal
        assert journal is not None
        yield pb.AskEvent(run=pb.RunEvent(run_id=rec.id, pid=rec.pid))
        async for item in journal.follow(offset):
            if isinstance(item, Gap):
                gap = process_pb2.JournalGap(
                    from_offset=item.from_offset, first_offset=item.first_offset
                )
                yield pb.AskEvent(gap=gap)
                continue
            ev = pb.AskEvent()
            ev.ParseFromString(item.data)
            ev.offset = item.offset
            yield ev
        await rec.done.wait()
        if rec.exit is None and rec.state == "lost":
            raise AgentError(
                grpc.StatusCode.ABORTED, f"run {rec.id} has no result: {rec.reason or 'lost'}"
            )

    async def Attach(
        self, request: pb.ClaudeAttachRequest, context: Context
    ) -> AsyncIterator[pb.AskEvent]:
        rec = self.runs.get(request.run_id)
        if rec.kind != "claude":
            raise precondition(f"run {rec.id} is an {rec.kind} run: attach with Process.Attach")
        if rec.journal is None:
            raise precondition(
                f"run {rec.id} is not detached: its events go only to the stream that started it"
            )
        offset = start_offset(rec, request.from_offset, request.tail)
        audit(run_id=rec.id, from_offset=offset)
        async for ev in self._follow(rec, offset):
            yield ev

    async def _ask(
        self,
        request: pb.AskRequest,
        rec: RunRecord,
        started: asyncio.Future[int] | None = None,
    ) -> AsyncGenerator[pb.AskEvent, None]:
        """One Claude run's events; the CLI is stopped when the generator ends."""
        if not request.prompt and not (request.resume or request.continue_session):
            raise invalid("prompt is empty")
        check_timeout(request.timeout_ms)
        user = self._user()
        exe = find_claude(self.cfg.claude_bin, user)
        if exe is None:
            raise not_found(f"claude not found ({self.cfg.claude_bin or 'PATH'})")
        cwd = self._cwd(request)
        argv = build_argv(exe, request)
        env = build_env(request, user)
        limits = limits_of(request.limits)
        credential = self.run_credential(request)  # after every check of the request itself
        limit = min(request.tool_result_limit or TOOL_RESULT_LIMIT, TOOL_RESULT_MAX_LIMIT)
        # Never the prompt, env values or the credential: sizes, names, the header.
        audit(
            argv=argv,
            cwd=cwd,
            user=user.name,
            prompt_bytes=len(request.prompt.encode()),
            env_keys=sorted(request.env.keys()),
            timeout_ms=request.timeout_ms,
            credential=credential.header,
            credential_source=credential.source,
            api=credential.upstream.url,
        )
        box: Box | None = None
        if request.box:
            if self.boxes is None:
                raise precondition("this agent has no named boxes")
            box = self.boxes.for_run(request.box, limits)
            audit(box=box.name)
        mode = (
            box.mode
            if box is not None
            else self.sandbox.mode()
            if self.sandbox is not None
            else "none"
        )
        route = Route(credential, boxed=mode == "bwrap")
        endpoint: Endpoint | None = None
        if route.boxed:
            env.update(route.env(RELAY_URL))
            if box is not None:  # on the box's relay listener, which its runs share
                endpoint = self.relay.register(route, box.routes)
        else:
            endpoint = await self.relay.serve_loopback(route)
            env.update(route.env(endpoint.base_url))
            no_proxy_for_loopback(env)
        try:
            if box is not None and box.mode == "bwrap":
                sp, stdin_fd = _spawn_in_box(box, argv, cwd, env, self.sandbox)
            else:
                sp, stdin_fd = _spawn(
                    argv,
                    cwd,
                    env,
                    user,
                    self.sandbox,
                    limits,
                    mode=mode,
                    relay=self.relay.handler(route) if route.boxed and box is None else None,
                    cgroup=box.cgroup if box is not None else None,
                )
                if box is not None:  # under `sandbox: none`: a name and a cgroup
                    sp.count_in(box)
        except BaseException:
            if endpoint is not None:
                endpoint.close()
            raise
        try:
            await sp.activate(self.sandbox, self.kill_grace)
        except BaseException:
            os.close(stdin_fd)
            if endpoint is not None:
                endpoint.close()
            raise
        audit(pid=sp.pid, sandbox=sp.launch is not None and sp.launch.info_r is not None)
        state = _RunState()
        rec.pid = sp.pid
        rec.signal = sp.signal_group

        async def stop_run() -> None:
            rec.killed = True
            await self._stop(sp, state)

        rec.stop = stop_run
        self.runs.note_started(rec)
        if started is not None and not started.done():
            started.set_result(sp.pid)
        queue: asyncio.Queue[pb.AskEvent | None] = asyncio.Queue(EVENT_QUEUE)
        watch = PipeWatch()
        cancel, ended = asyncio.Event(), asyncio.Event()
        self._active[cancel] = ended

        def log_event(name: str, text: str) -> pb.AskEvent:
            short, cut = _cut(text, LOG_LINE_LIMIT)
            return pb.AskEvent(log=pb.LogEvent(line=short, stream=name, truncated=cut))

        async def on_line(name: str, line: bytes | None, size: int) -> None:
            if line is None:
                note = f"[agent] dropped a {name} line longer than {LINE_LIMIT} bytes"
                await queue.put(log_event(name, note))
                return
            text = line.decode("utf-8", "replace")
            if name == "stderr":
                ev = log_event("stderr", text)
                state.stderr_tail.append(ev.log.line)
                await queue.put(ev)
                return
            if not text.strip():
                return
            try:
                obj = parse_line(text)
            except (ValueError, RecursionError):  # not JSON, or nested past what Python parses
                await queue.put(log_event("stdout", text))
                return
            try:
                events = map_line(obj, text, limit)
            except Exception as exc:  # a line must never stop the reading (the CLI would block)
                note = f"[agent] could not map a stdout line of {size} bytes: {exc!r}"
                await queue.put(log_event("stdout", note))
                return
            for ev in events:
                if ev.WhichOneof("event") == "result":
                    state.result = ev.result  # held until the CLI has exited
                    tasks.append(asyncio.ensure_future(linger()))
                    continue
                if ev.WhichOneof("event") == "init":
                    ev.init.user = user.name
                    audit(session_id=ev.init.session_id)
                await queue.put(ev)

        async def read(name: str, fd: int) -> None:
            feed, flush = _lines(on_line)
            await pump(fd, name, feed, watch)
            await flush(name)

        readers = asyncio.gather(*(read(name, fd) for name, fd in sp.out_fds))

        async def outputs() -> None:
            try:
                await readers
            finally:
                await queue.put(None)

        async def feed_prompt() -> None:
            try:
                await write_all(stdin_fd, request.prompt.encode())
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                os.close(stdin_fd)

        async def watchdog() -> None:
            """The timeout; then what holds the output pipes open once the CLI is gone.

            Leftovers of the run get PIPE_DRAIN_SECONDS after the CLI exited, then
            they are stopped (Spawned.teardown, wherever they went); a pipe still
            held after that is held from outside the run and is no longer read.
            """
            timeout = request.timeout_ms / 1000 if request.timeout_ms else None
            try:
                await asyncio.wait_for(sp.wait_exited(), timeout)
            except asyncio.TimeoutError:
                state.timed_out = True
                await self._stop(sp, state)
            else:
                await asyncio.wait([readers], timeout=PIPE_DRAIN_SECONDS)
                await sp.teardown(self.kill_grace)
            await drain(readers, watch, PIPE_DRAIN_SECONDS)

        async def linger() -> None:
            """The CLI should exit right after its result line; stop it if it does not."""
            if not await sp.exited_within(RESULT_EXIT_GRACE_SECONDS):
                await self._stop(sp, state)

        async def canceller() -> None:
            """The agent cancels the run itself (cancel_all: shutdown)."""
            await cancel.wait()
            state.cancelled = self._cancel_reason
            await self._stop(sp, state)

        tasks: list[asyncio.Future[None]] = []
        tasks += [
            asyncio.ensure_future(outputs()),
            asyncio.ensure_future(feed_prompt()),
            asyncio.ensure_future(watchdog()),
            asyncio.ensure_future(canceller()),
        ]
        finished = False
        try:
            while True:
                ev = await queue.get()
                if ev is None:
                    break
                for piece in fit_event(ev):
                    state.events += 1
                    yield piece
            await sp.wait_exited()
            await sp.teardown(self.kill_grace)  # reap, and stop what the run left behind
            for piece in fit_event(self._final(sp, state)):
                yield piece
            finished = True
        finally:
            if not finished:
                audit(cancelled=True)
            for t in tasks:
                t.cancel()
            readers.cancel()
            await self._stop(sp, state)
            # Cancelled tasks unregister their fds before the fds are closed.
            await asyncio.gather(readers, *tasks, return_exceptions=True)
            sp.close_fds()
            if endpoint is not None:
                endpoint.close()
            self._active.pop(cancel, None)
            ended.set()

    def _final(self, sp: Spawned, state: _RunState) -> pb.AskEvent:
        """The terminal event: the held result (with the exit status) or an error."""
        rc = sp.reap()
        code = rc if rc >= 0 else -1
        sig = -rc if rc < 0 else 0
        audit(exit_code=code, signal=sig, timed_out=state.timed_out, events=state.events)
        tail = "\n".join(state.stderr_tail)
        if state.cancelled:
            audit(cancelled=True)
            return pb.AskEvent(
                error=pb.ErrorEvent(
                    message=f"claude run was cancelled: {state.cancelled}",
                    exit_code=code,
                    signal=sig,
                    cancelled=True,
                    stderr_tail=tail,
                )
            )
        if state.timed_out:
            return pb.AskEvent(
                error=pb.ErrorEvent(
                    message="claude run timed out and was stopped",
                    exit_code=code,
                    signal=sig,
                    timed_out=True,
                    stderr_tail=tail,
                )
            )
        if state.result is not None:
            res = state.result
            res.exit_code = code
            res.signal = sig
            cli_error = res.is_error
            # A result counts as an error on either signal, except that a CLI
            # we had to stop after it had already reported is not a failure.
            res.is_error = cli_error or (rc != 0 and not state.stopping)
            audit(
                is_error=res.is_error,
                subtype=res.subtype,
                num_turns=res.num_turns,
                api_error_status=res.api_error_status,
            )
            return pb.AskEvent(result=res)
        oom = sp.oom_killed
        if oom:
            message = "claude was killed by the OOM killer: the run went past its memory limit"
        elif sig:
            message = f"claude was killed by signal {sig} before reporting a result"
        else:
            message = f"claude exited with code {code} without a result"
        if tail:
            message += f": {state.stderr_tail[-1]}"
        audit(is_error=True)
        return pb.AskEvent(
            error=pb.ErrorEvent(
                message=message, exit_code=code, signal=sig, stderr_tail=tail, oom_killed=oom
            )
        )


def _exit_of(final: pb.AskEvent | None) -> process_pb2.Exit | None:
    """The CLI's exit status as the final event (result or error) reports it."""
    if final is None:
        return None
    if final.WhichOneof("event") == "result":
        res = final.result
        return process_pb2.Exit(code=res.exit_code, signal=res.signal)
    err = final.error
    return process_pb2.Exit(
        code=err.exit_code, signal=err.signal, timed_out=err.timed_out, oom_killed=err.oom_killed
    )


_SERVICES: weakref.WeakSet[ClaudeService] = weakref.WeakSet()


async def cancel_all(reason: str) -> None:
    """Stop every Claude run of this agent (its stream ends with a cancelled ErrorEvent)."""
    await asyncio.gather(*(service.cancel_all(reason) for service in list(_SERVICES)))


def register(
    server: grpc.aio.Server,
    cfg: AgentConfig,
    paths: PathPolicy,
    agent: AgentService,
    sandbox: Sandbox | None = None,
    relay: ApiRelay | None = None,
    credentials: creds.CredentialStore | None = None,
    runs: Runs | None = None,
    boxes: Boxes | None = None,
) -> None:
    """Add the Claude service to `server` and tell Agent.Info how to report the CLI."""
    service = ClaudeService(
        cfg, paths, sandbox=sandbox, relay=relay, credentials=credentials, runs=runs, boxes=boxes
    )
    pb_grpc.add_ClaudeServicer_to_server(service, server)
    agent.claude_info = service.info
    if "claude" not in agent.capabilities:
        agent.capabilities.append("claude")
