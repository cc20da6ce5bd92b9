"""vm.claude: Claude Code in the guest (the Claude service).

Events, request building and the folding of a run into a result are pure
and live in host_client.claude; this module only makes the calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from cowork.agent.v1 import claude_pb2 as pb
from cowork.agent.v1 import claude_pb2_grpc

from ..claude import (
    ClaudeError,
    ClaudeEvent,
    ClaudeExecutionResult,
    ClaudeGap,
    ClaudeResult,
    ClaudeRun,
    ask_request,
    event_from_pb,
    summarize,
    version_dict,
)
from .connection import Connection
from .process import BOXES_FEATURE

FEATURE = "Claude Code runs"
RUNS_FEATURE = "runs with ids: detach, attach, list, kill"


class Claude:
    """The Claude service: `ask` (one result), `stream` (typed events), `version`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _stub(self) -> claude_pb2_grpc.ClaudeStub:
        return claude_pb2_grpc.ClaudeStub(self._conn.channel)

    def ask(self, prompt: str, **options: Any) -> ClaudeExecutionResult:
        """Run Claude Code on `prompt` in the VM; output = the result text, exit_code 0/1.

        Options: cwd, model, max_turns, max_budget_usd, permission_mode,
        allowed_tools, disallowed_tools, append_system_prompt, resume,
        continue_session, session_id, fork_session, include_partial_messages,
        timeout, env, forward_auth, tool_result_limit, detach, box
        (host_client.claude.ask_request).
        """
        return self.stream(prompt, **options).collect()

    def stream(self, prompt: str, **options: Any) -> AskStream:
        """Like `ask`, but yields the run's typed events as they happen."""
        request = ask_request(prompt, **options)
        self._conn.require("claude", FEATURE)
        if request.detach:
            self._conn.require("runs", RUNS_FEATURE)
        if request.box:
            self._conn.require("boxes", BOXES_FEATURE)
        return AskStream(self._conn, self._stub(), request)

    def attach(self, run_id: str, *, from_offset: int = 0, tail: bool = False) -> AskStream:
        """Follow a detached Claude run again: its events from `from_offset` (a ClaudeGap
        first when the journal's head was cut; `tail`: only new ones) to its result or
        error. Leaving the stream leaves the run going (`vm.process.kill` stops it)."""
        self._conn.require("runs", RUNS_FEATURE)
        req = pb.ClaudeAttachRequest(run_id=run_id, from_offset=from_offset, tail=tail)
        return AskStream(self._conn, self._stub(), None, attach=req)

    def version(self) -> dict[str, Any]:
        """Whether the CLI is installed in the VM, its version, path and run-as user."""
        self._conn.require("claude", FEATURE)
        resp = self._conn.unary(self._stub().Version, pb.ClaudeVersionRequest())
        return version_dict(resp)


class AskStream:
    """A running Claude.Ask: iterate it for events; `cancel()` stops the remote run.

    Leaving the iteration early (break, exception, KeyboardInterrupt) cancels
    the call, which makes the agent interrupt and reap the CLI.
    """

    def __init__(
        self,
        conn: Connection,
        stub: claude_pb2_grpc.ClaudeStub,
        request: pb.AskRequest | None,
        attach: pb.ClaudeAttachRequest | None = None,
    ) -> None:
        self._conn = conn
        self._stub = stub
        self._request = request
        self._attach = attach
        self._call: Any = None
        self.events: list[ClaudeEvent] = []
        self.finished = False
        # Detached runs: the run's id, and the journal offset after the last event seen
        # (where a reattach resumes).
        self.run_id = attach.run_id if attach is not None else ""
        self.offset = attach.from_offset if attach is not None else 0

    def cancel(self) -> None:
        """Stop the remote run (its stream ends with a cancelled ClaudeError)."""
        if self._call is not None:
            self._call.cancel()

    def __iter__(self) -> Iterator[ClaudeEvent]:
        """Start the run (on first iteration) and yield its events."""

        def start() -> tuple[Any, pb.AskEvent | None]:
            if self._attach is not None:
                call = self._stub.Attach(self._attach, metadata=self._conn.metadata)
            else:
                assert self._request is not None
                call = self._stub.Ask(self._request, metadata=self._conn.metadata)
            self._call = call
            try:
                return call, next(iter(call))
            except StopIteration:
                return call, None

        detach = self._request is not None and self._request.detach
        call, first = self._conn.call(start, retry=not detach)
        try:
            if first is None:
                return
            for resp in _chain(first, call):
                ev = event_from_pb(resp)
                if isinstance(ev, ClaudeRun):
                    self.run_id = ev.run_id
                elif not isinstance(ev, ClaudeGap) and (detach or self._attach is not None):
                    self.offset = resp.offset + 1
                self.events.append(ev)
                if isinstance(ev, (ClaudeResult, ClaudeError)):
                    self.finished = True
                yield ev
        except grpc.RpcError as exc:
            raise self._conn.error(exc) from None
        finally:
            if not self.finished:
                call.cancel()

    def collect(self) -> ClaudeExecutionResult:
        """Drain the stream into a ClaudeExecutionResult."""
        for _ in self:
            pass
        return summarize(self.events)


def _chain(first: pb.AskEvent, rest: Iterator[pb.AskEvent]) -> Iterator[pb.AskEvent]:
    yield first
    yield from rest
