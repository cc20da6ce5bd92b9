"""Claude Code through the agent: `ask_claude` (one result) and `ask_stream` (typed events).

Plain dataclasses, no protobuf in user code; pure (no I/O, no client import).
The calls are made by host_client.api.claude (`vm.claude`), which uses these.

Auth comes from the host environment: ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN
(`claude setup-token`) and ANTHROPIC_BASE_URL are forwarded per call when set
(`forward_auth=False` turns that off). They travel in the request only: the
agent never writes them to disk or logs, and nothing here prints them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cowork.agent.v1 import claude_pb2 as pb

from .errors import CoworkError
from .models import ExecutionResult

# Host variables forwarded to each run when set (never printed or stored).
AUTH_ENV = ("ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_BASE_URL")


# -- events -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Event:
    kind = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form with a "type" tag (what `coworkctl ask --json` prints)."""
        return {"type": self.kind, **asdict(self)}


@dataclass(frozen=True)
class ClaudeInit(_Event):
    kind = "init"
    session_id: str
    model: str
    tools: list[str]
    cwd: str
    claude_version: str
    permission_mode: str
    api_key_source: str = ""
    user: str = ""
    truncated: bool = False  # a field was cut to the agent's size limits


@dataclass(frozen=True)
class AssistantText(_Event):
    kind = "assistant_text"
    text: str
    partial: bool = False
    message_id: str = ""
    parent_tool_use_id: str = ""
    # The next AssistantText continues this same text (a text too large for one
    # message arrives in parts: join them with "").
    more: bool = False


@dataclass(frozen=True)
class ToolUse(_Event):
    kind = "tool_use"
    id: str
    name: str
    input_json: str
    parent_tool_use_id: str = ""
    truncated: bool = False

    @property
    def input(self) -> Any:
        """The tool input parsed (None when the agent truncated it)."""
        if self.truncated:
            return None
        try:
            return json.loads(self.input_json)
        except ValueError:
            return None


@dataclass(frozen=True)
class ToolResult(_Event):
    kind = "tool_result"
    tool_use_id: str
    is_error: bool
    content: str
    truncated: bool = False
    content_limit: int = 0
    parent_tool_use_id: str = ""


@dataclass(frozen=True)
class ClaudeResult(_Event):
    kind = "result"
    subtype: str
    is_error: bool
    result: str
    num_turns: int
    duration_ms: int
    duration_api_ms: int
    total_cost_usd: float
    session_id: str
    exit_code: int
    usage: dict[str, int] = field(default_factory=dict)
    permission_denials: list[Any] = field(default_factory=list)
    api_error_status: int = 0
    stop_reason: str = ""
    terminal_reason: str = ""
    errors: list[str] = field(default_factory=list)
    signal: int = 0
    # `result` was cut to fit one message; the whole answer came as AssistantText parts
    # (summarize() and `coworkctl ask` use those).
    truncated: bool = False


@dataclass(frozen=True)
class RawEvent(_Event):
    """A stream-json line the agent has no typed event for (e.g. "system/api_retry")."""

    kind = "raw"
    type: str
    json: str
    truncated: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "raw",
            "raw_type": self.type,
            "json": self.json,
            "truncated": self.truncated,
        }

    @property
    def data(self) -> Any:
        try:
            return json.loads(self.json)
        except ValueError:
            return None


@dataclass(frozen=True)
class ClaudeLog(_Event):
    """A line the CLI wrote to stderr (or a non-JSON stdout line)."""

    kind = "log"
    line: str
    stream: str = "stderr"
    truncated: bool = False


@dataclass(frozen=True)
class ClaudeError(_Event):
    """Terminal error: the CLI exited without a result, was stopped or timed out."""

    kind = "error"
    message: str
    exit_code: int = 0
    signal: int = 0
    timed_out: bool = False
    cancelled: bool = False
    stderr_tail: str = ""
    # The run went past its memory limit and the kernel's OOM killer ended it.
    oom_killed: bool = False


@dataclass(frozen=True)
class ClaudeRun(_Event):
    """First event of a detached run (and of an attach): the run's id, for attach/kill."""

    kind = "run"
    run_id: str
    pid: int = 0


@dataclass(frozen=True)
class ClaudeGap(_Event):
    """Attach: the run's journal no longer holds events [from_offset, first_offset)."""

    kind = "gap"
    from_offset: int
    first_offset: int


ClaudeEvent = (
    ClaudeInit
    | AssistantText
    | ToolUse
    | ToolResult
    | ClaudeResult
    | RawEvent
    | ClaudeLog
    | ClaudeError
    | ClaudeRun
    | ClaudeGap
)


def event_from_pb(ev: pb.AskEvent) -> ClaudeEvent:
    kind = ev.WhichOneof("event")
    if kind == "init":
        i = ev.init
        return ClaudeInit(
            i.session_id,
            i.model,
            list(i.tools),
            i.cwd,
            i.claude_version,
            i.permission_mode,
            i.api_key_source,
            i.user,
            i.truncated,
        )
    if kind == "assistant_text":
        a = ev.assistant_text
        return AssistantText(a.text, a.partial, a.message_id, a.parent_tool_use_id, a.more)
    if kind == "tool_use":
        t = ev.tool_use
        return ToolUse(t.id, t.name, t.input_json, t.parent_tool_use_id, t.truncated)
    if kind == "tool_result":
        r = ev.tool_result
        return ToolResult(
            r.tool_use_id, r.is_error, r.content, r.truncated, r.content_limit, r.parent_tool_use_id
        )
    if kind == "result":
        s = ev.result
        denials: list[Any] = []
        for d in s.permission_denials_json:
            try:
                denials.append(json.loads(d))
            except ValueError:
                denials.append(d)
        return ClaudeResult(
            subtype=s.subtype,
            is_error=s.is_error,
            result=s.result,
            num_turns=s.num_turns,
            duration_ms=s.duration_ms,
            duration_api_ms=s.duration_api_ms,
            total_cost_usd=s.total_cost_usd,
            session_id=s.session_id,
            exit_code=s.exit_code,
            usage={
                "input_tokens": s.usage.input_tokens,
                "output_tokens": s.usage.output_tokens,
                "cache_creation_input_tokens": s.usage.cache_creation_input_tokens,
                "cache_read_input_tokens": s.usage.cache_read_input_tokens,
            },
            permission_denials=denials,
            api_error_status=s.api_error_status,
            stop_reason=s.stop_reason,
            terminal_reason=s.terminal_reason,
            errors=list(s.errors),
            signal=s.signal,
            truncated=s.truncated,
        )
    if kind == "raw":
        return RawEvent(ev.raw.type, ev.raw.json, ev.raw.truncated)
    if kind == "log":
        return ClaudeLog(ev.log.line, ev.log.stream or "stderr", ev.log.truncated)
    if kind == "error":
        e = ev.error
        return ClaudeError(
            e.message, e.exit_code, e.signal, e.timed_out, e.cancelled, e.stderr_tail, e.oom_killed
        )
    if kind == "run":
        return ClaudeRun(ev.run.run_id, ev.run.pid)
    if kind == "gap":
        return ClaudeGap(ev.gap.from_offset, ev.gap.first_offset)
    return RawEvent(f"unknown-event/{kind}", "{}")


# -- requests ---------------------------------------------------------------------------
def auth_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The forwarded auth variables from the host environment (names in AUTH_ENV)."""
    src = os.environ if base is None else base
    return {k: src[k] for k in AUTH_ENV if src.get(k)}


def ask_request(
    prompt: str,
    *,
    cwd: str | None = None,
    model: str | None = None,
    max_turns: int | None = None,
    max_budget_usd: float | None = None,
    permission_mode: str | None = None,
    allowed_tools: Sequence[str] | str | None = None,
    disallowed_tools: Sequence[str] | str | None = None,
    append_system_prompt: str | None = None,
    resume: str | None = None,
    continue_session: bool = False,
    session_id: str | None = None,
    fork_session: bool = False,
    include_partial_messages: bool = False,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    forward_auth: bool = True,
    tool_result_limit: int = 0,
    detach: bool = False,
    box: str | None = None,
) -> pb.AskRequest:
    """Build the Claude.Ask request (the keyword options of ask_claude/ask_stream)."""

    def tools(v: Sequence[str] | str | None) -> list[str]:
        if v is None:
            return []
        items = v.split(",") if isinstance(v, str) else list(v)
        return [t.strip() for t in items if t.strip()]

    run_env = auth_env() if forward_auth else {}
    run_env.update(env or {})
    if timeout is not None and timeout <= 0:
        raise ValueError("timeout must be > 0")
    return pb.AskRequest(
        prompt=prompt,
        cwd=cwd or "",
        model=model or "",
        max_turns=max_turns or 0,
        max_budget_usd=max_budget_usd or 0.0,
        permission_mode=permission_mode or "",
        allowed_tools=tools(allowed_tools),
        disallowed_tools=tools(disallowed_tools),
        append_system_prompt=append_system_prompt or "",
        resume=resume or "",
        continue_session=continue_session,
        session_id=session_id or "",
        fork_session=fork_session,
        include_partial_messages=include_partial_messages,
        timeout_ms=int(timeout * 1000) if timeout else 0,
        env=run_env,
        tool_result_limit=tool_result_limit,
        detach=detach,
        box=box or "",
    )


# -- results ----------------------------------------------------------------------------
@dataclass
class ClaudeExecutionResult(ExecutionResult):
    """ExecutionResult (output = the final result text, error = the error text, exit 0/1)
    plus the run's details."""

    session_id: str = ""
    result: ClaudeResult | None = None
    failure: ClaudeError | None = None
    events: list[ClaudeEvent] = field(default_factory=list)

    @property
    def total_cost_usd(self) -> float:
        return self.result.total_cost_usd if self.result is not None else 0.0

    @property
    def num_turns(self) -> int:
        return self.result.num_turns if self.result is not None else 0


def summarize(events: Sequence[ClaudeEvent]) -> ClaudeExecutionResult:
    """Fold a run's events into the seed-shaped result."""
    result = next((e for e in reversed(events) if isinstance(e, ClaudeResult)), None)
    failure = next((e for e in reversed(events) if isinstance(e, ClaudeError)), None)
    init = next((e for e in events if isinstance(e, ClaudeInit)), None)
    session = (
        result.session_id if result and result.session_id else (init.session_id if init else "")
    )
    if result is not None:
        ok = not result.is_error
        error = "" if ok else (result.result or "; ".join(result.errors) or result.subtype)
        return ClaudeExecutionResult(
            output=last_answer(events) if result.truncated else result.result,
            error=error,
            exit_code=0 if ok else 1,
            signal=result.signal,
            duration_ms=float(result.duration_ms),
            session_id=session,
            result=result,
            events=list(events),
        )
    if failure is not None:
        error = failure.message
        if failure.stderr_tail and failure.stderr_tail not in error:
            error += "\n" + failure.stderr_tail
        return ClaudeExecutionResult(
            output="",
            error=error,
            exit_code=1,
            signal=failure.signal,
            timed_out=failure.timed_out,
            oom_killed=failure.oom_killed,
            session_id=session,
            failure=failure,
            events=list(events),
        )
    return ClaudeExecutionResult(
        output="",
        error="the claude run ended without a result",
        exit_code=1,
        session_id=session,
        events=list(events),
    )


def last_answer(events: Sequence[ClaudeEvent]) -> str:
    """The whole text of the run's last top-level assistant message (its parts joined)."""
    parts: list[str] = []
    current = None
    for e in events:
        if isinstance(e, AssistantText) and not e.partial and not e.parent_tool_use_id:
            if e.message_id != current:
                current, parts = e.message_id, []
            parts.append(e.text)
    return "".join(parts)


def text_of(events: Sequence[ClaudeEvent]) -> str:
    """All complete assistant text of a run, in order."""
    return "".join(e.text for e in events if isinstance(e, AssistantText) and not e.partial)


def version_dict(resp: pb.ClaudeVersionResponse) -> dict[str, Any]:
    """Claude.Version as a plain dict."""
    return {
        "installed": resp.installed,
        "version": resp.version,
        "path": resp.path,
        "run_as_user": resp.run_as_user,
        "run_as_home": resp.run_as_home,
        "agent_user": resp.agent_user,
        "error": resp.error,
    }


__all__ = [
    "AUTH_ENV",
    "AssistantText",
    "ClaudeError",
    "ClaudeEvent",
    "ClaudeExecutionResult",
    "ClaudeInit",
    "ClaudeLog",
    "ClaudeResult",
    "CoworkError",
    "RawEvent",
    "ToolResult",
    "ToolUse",
    "ask_request",
    "event_from_pb",
    "summarize",
]
