"""vm.process: run commands in the guest (Process.Run, Process.Exec)."""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from cowork.agent.v1 import process_pb2, process_pb2_grpc

from .. import requests as rq
from ..claude_relay import ClaudeRelay
from ..models import ExecEvent, ExecutionResult, Exited, Output, RunInfo, Started
from .connection import Connection

_END = object()
LIMITS_FEATURE = "resource limits: memory, pids, cpus"
RUNS_FEATURE = "runs with ids: detach, attach, list, kill"
CLAUDE_RELAY_FEATURE = "the Claude credential through the agent's API relay, not in the env"
BOXES_FEATURE = "named boxes: box new|ls|rm, --box"


class Process:
    """The Process service: `run` (buffered) and `exec` (streamed, interactive, PTY)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _stub(self) -> process_pb2_grpc.ProcessStub:
        return process_pb2_grpc.ProcessStub(self._conn.channel)

    def run(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        output_limit: int = 0,
        limits: Mapping[str, float] | None = None,
        box: str | None = None,
    ) -> ExecutionResult:
        """Run to completion and return buffered output (capped at `output_limit` per stream).

        A str is a shell command line (`sh -c`), a sequence an argv. `limits`
        ({'memory_bytes', 'pids', 'cpus'}) needs the agent's "process.limits".
        """
        if limits:
            self._conn.require("process.limits", LIMITS_FEATURE)
        if box:
            self._conn.require("boxes", BOXES_FEATURE)
        spec = rq.process_spec(
            command, env=env, cwd=cwd, timeout=timeout, limits=limits, box=box or ""
        )
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        req = process_pb2.RunRequest(spec=spec, stdin=data, output_limit=output_limit)
        resp = self._conn.unary(self._stub().Run, req)
        ex = rq.exited(resp.exit)
        return ExecutionResult(
            output=resp.stdout.decode("utf-8", "replace"),
            error=resp.stderr.decode("utf-8", "replace"),
            exit_code=ex.shell_code,
            signal=ex.signal,
            timed_out=ex.timed_out,
            duration_ms=ex.duration_ms,
            stdout=resp.stdout,
            stderr=resp.stderr,
            truncated=resp.stdout_truncated or resp.stderr_truncated,
            oom_killed=ex.oom_killed,
        )

    def exec(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | Iterable[bytes] | Any = None,
        interactive: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
        rows: int = 0,
        cols: int = 0,
        term: str = "",
        limits: Mapping[str, float] | None = None,
        detach: bool = False,
        claude_relay: ClaudeRelay | None = None,
        box: str | None = None,
    ) -> ExecStream:
        """Start a process and stream its events (Started, Output..., Exited).

        `stdin` may be bytes/str, a binary file or an iterable of bytes (sent,
        then EOF). With `interactive=True` feed it yourself through
        `write()/close_stdin()/signal()/resize()` on the returned stream.
        Nothing is sent until the stream is iterated.

        `detach=True` (capability "runs"): the run goes on when the stream ends
        (leave it after `Started`, whose `run_id` names the run); its output is
        journaled and `attach(run_id)` follows it again.

        `box` (capability "boxes"): run inside that named box (see api.boxes).

        `claude_relay` (capability "process.claude_relay"; e.g. the interactive Claude
        CLI): the process reaches the Claude API through the agent's relay with a
        placeholder credential; the real one (`ClaudeRelay.from_env()`, or the one held
        with `auth set`) never enters its environment.
        """
        if limits:
            self._conn.require("process.limits", LIMITS_FEATURE)
        if detach:
            self._conn.require("runs", RUNS_FEATURE)
        if claude_relay is not None:
            self._conn.require("process.claude_relay", CLAUDE_RELAY_FEATURE)
        if box:
            self._conn.require("boxes", BOXES_FEATURE)
        spec = rq.process_spec(
            command,
            env=env,
            cwd=cwd,
            timeout=timeout,
            pty=pty,
            rows=rows,
            cols=cols,
            term=term,
            stdin=interactive or stdin is not None or pty,
            limits=limits,
            detach=detach,
            claude_relay=claude_relay.to_proto() if claude_relay is not None else None,
            box=box or "",
        )
        return ExecStream(self._conn, self._stub(), spec, stdin, interactive)

    # -- runs ---------------------------------------------------------------------------
    def attach(
        self,
        run_id: str,
        *,
        from_offset: int = 0,
        tail: bool = False,
        stdin: bytes | str | Iterable[bytes] | Any = None,
        interactive: bool = False,
    ) -> ExecStream:
        """Follow a detached exec run again: its journal from `from_offset` (a Gap first
        when the journal's head was cut), live output, then Exited. With `tail`, only
        what comes from now on. Leaving the stream leaves the run going; stdin and the
        control methods reach the run as with `exec` (the end of `stdin` is not EOF:
        call `close_stdin()`)."""
        self._conn.require("runs", RUNS_FEATURE)
        start = process_pb2.AttachStart(run_id=run_id, from_offset=from_offset, tail=tail)
        return ExecStream(self._conn, self._stub(), None, stdin, interactive, attach=start)

    def runs(self) -> list[RunInfo]:
        """Every run the agent knows: running ones, and finished detached ones it keeps."""
        self._conn.require("runs", RUNS_FEATURE)
        resp = self._conn.unary(self._stub().List, process_pb2.ListRunsRequest())
        return [rq.run_info(r) for r in resp.runs]

    def signal_run(self, run_id: str, signum: int) -> RunInfo:
        """Send signal `signum` to a run's process group."""
        self._conn.require("runs", RUNS_FEATURE)
        req = process_pb2.SignalRunRequest(run_id=run_id, signal=signum)
        return rq.run_info(self._conn.unary(self._stub().Signal, req))

    def kill(self, run_id: str) -> RunInfo:
        """Stop a run (SIGTERM, then SIGKILL after the agent's grace) and return it ended."""
        self._conn.require("runs", RUNS_FEATURE)
        req = process_pb2.KillRunRequest(run_id=run_id)
        return rq.run_info(self._conn.unary(self._stub().Kill, req, retry=False))

    def wait(self, run_id: str, timeout: float | None = None) -> RunInfo:
        """Block until a run has ended (DeadlineExceeded after `timeout` seconds)."""
        self._conn.require("runs", RUNS_FEATURE)
        req = process_pb2.WaitRunRequest(run_id=run_id)
        return rq.run_info(self._conn.unary(self._stub().Wait, req, timeout=timeout))


class ExecStream:
    """A running remote process: iterate it for events; control it with the methods.

    Iterating yields Started, then Output chunks, then one Exited. Leaving the
    iteration early (break, exception) cancels the call, which makes the agent
    kill the process group. The control methods may be called from any thread.
    """

    def __init__(
        self,
        conn: Connection,
        stub: process_pb2_grpc.ProcessStub,
        spec: process_pb2.ProcessSpec | None,
        stdin: Any,
        interactive: bool,
        attach: process_pb2.AttachStart | None = None,
    ) -> None:
        self._conn = conn
        self._stub = stub
        self._spec = spec
        self._attach = attach
        self._stdin = stdin
        self._interactive = interactive
        self._queue: queue.Queue[Any] = queue.Queue()
        self._call: Any = None
        self.pid = 0
        self.run_id = attach.run_id if attach is not None else ""
        # The journal offset after the last output received (where a reattach resumes).
        self.offset = attach.from_offset if attach is not None else 0
        self.exit: Exited | None = None

    def _requests(self) -> Iterator[Any]:
        if self._attach is not None:
            yield process_pb2.AttachRequest(attach=self._attach)
            if not self._interactive:
                for msg in rq.stdin_messages(self._stdin):
                    yield process_pb2.AttachRequest(stdin=msg.stdin)
        else:
            assert self._spec is not None
            yield process_pb2.ExecRequest(start=self._spec)
            if not self._interactive:
                yield from rq.stdin_messages(self._stdin)
                if self._spec.detach and self._stdin is not None:
                    # The end of a detached run's stream is not EOF: say it.
                    yield process_pb2.ExecRequest(close_stdin=True)
                if not self._spec.pty:
                    return
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item

    def _message(self, **fields: Any) -> Any:
        if self._attach is not None:
            return process_pb2.AttachRequest(**fields)
        return process_pb2.ExecRequest(**fields)

    def write(self, data: bytes) -> None:
        """Send `data` to the process's stdin (interactive mode / PTY)."""
        self._queue.put(self._message(stdin=data))

    def close_stdin(self) -> None:
        """Close the process's stdin (EOF)."""
        self._queue.put(self._message(close_stdin=True))

    def signal(self, signum: int) -> None:
        """Send signal `signum` to the process group."""
        self._queue.put(self._message(signal=signum))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the PTY."""
        self._queue.put(self._message(resize=process_pb2.TerminalSize(rows=rows, cols=cols)))

    def cancel(self) -> None:
        """Cancel the call: the agent kills the process group."""
        if self._call is not None:
            self._call.cancel()
        self._queue.put(_END)

    def __iter__(self) -> Iterator[ExecEvent]:
        """Start the process (on first iteration) and yield its events."""
        replayable = self._stdin is None or isinstance(self._stdin, (bytes, str))

        method = self._stub.Attach if self._attach is not None else self._stub.Exec
        # A detached start is not repeated: the first one may have started the run.
        detach = self._spec is not None and self._spec.detach

        def start() -> tuple[Any, process_pb2.ExecResponse]:
            call = method(self._requests(), metadata=self._conn.metadata)
            self._call = call
            return call, next(iter(call))

        retry = replayable and not self._interactive and not detach
        call, first = self._conn.call(start, retry=retry)
        try:
            ev = rq.exec_event(first)
            if isinstance(ev, Started):
                self.pid = ev.pid
                self.run_id = ev.run_id
            yield ev
            for resp in call:
                ev = rq.exec_event(resp)
                if isinstance(ev, Exited):
                    self.exit = ev
                elif isinstance(ev, Output) and ev.offset + len(ev.data) > self.offset:
                    self.offset = ev.offset + len(ev.data)
                yield ev
        except grpc.RpcError as exc:
            raise self._conn.error(exc) from None
        finally:
            self._queue.put(_END)
            if self.exit is None:
                call.cancel()

    def collect(self) -> ExecutionResult:
        """Drain the stream into an ExecutionResult (oom_killed included)."""
        out: list[bytes] = []
        err: list[bytes] = []
        for ev in self:
            if isinstance(ev, Output):
                (out if ev.stream == "stdout" else err).append(ev.data)
        assert self.exit is not None
        return result_of(self.exit, b"".join(out), b"".join(err))


def result_of(exit: Exited, out: bytes, err: bytes) -> ExecutionResult:
    """An ExecutionResult from a stream's Exited event and its collected output."""
    return ExecutionResult(
        output=out.decode("utf-8", "replace"),
        error=err.decode("utf-8", "replace"),
        exit_code=exit.shell_code,
        signal=exit.signal,
        timed_out=exit.timed_out,
        duration_ms=exit.duration_ms,
        stdout=out,
        stderr=err,
        oom_killed=exit.oom_killed,
    )
