"""vm.process: run commands in the guest (Process.Run, Process.Exec)."""

from __future__ import annotations

import queue
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from cowork.agent.v1 import process_pb2, process_pb2_grpc

from .. import requests as rq
from ..models import ExecEvent, ExecutionResult, Exited, Output, Started
from .connection import Connection

_END = object()
LIMITS_FEATURE = "resource limits: memory, pids, cpus"


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
    ) -> ExecutionResult:
        """Run to completion and return buffered output (capped at `output_limit` per stream).

        A str is a shell command line (`sh -c`), a sequence an argv. `limits`
        ({'memory_bytes', 'pids', 'cpus'}) needs the agent's "process.limits".
        """
        if limits:
            self._conn.require("process.limits", LIMITS_FEATURE)
        spec = rq.process_spec(command, env=env, cwd=cwd, timeout=timeout, limits=limits)
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
    ) -> ExecStream:
        """Start a process and stream its events (Started, Output..., Exited).

        `stdin` may be bytes/str, a binary file or an iterable of bytes (sent,
        then EOF). With `interactive=True` feed it yourself through
        `write()/close_stdin()/signal()/resize()` on the returned stream.
        Nothing is sent until the stream is iterated.
        """
        if limits:
            self._conn.require("process.limits", LIMITS_FEATURE)
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
        )
        return ExecStream(self._conn, self._stub(), spec, stdin, interactive)


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
        spec: process_pb2.ProcessSpec,
        stdin: Any,
        interactive: bool,
    ) -> None:
        self._conn = conn
        self._stub = stub
        self._spec = spec
        self._stdin = stdin
        self._interactive = interactive
        self._queue: queue.Queue[Any] = queue.Queue()
        self._call: Any = None
        self.pid = 0
        self.exit: Exited | None = None

    def _requests(self) -> Iterator[process_pb2.ExecRequest]:
        yield process_pb2.ExecRequest(start=self._spec)
        if not self._interactive:
            yield from rq.stdin_messages(self._stdin)
            if not self._spec.pty:
                return
        while True:
            item = self._queue.get()
            if item is _END:
                return
            yield item

    def write(self, data: bytes) -> None:
        """Send `data` to the process's stdin (interactive mode / PTY)."""
        self._queue.put(process_pb2.ExecRequest(stdin=data))

    def close_stdin(self) -> None:
        """Close the process's stdin (EOF)."""
        self._queue.put(process_pb2.ExecRequest(close_stdin=True))

    def signal(self, signum: int) -> None:
        """Send signal `signum` to the process group."""
        self._queue.put(process_pb2.ExecRequest(signal=signum))

    def resize(self, rows: int, cols: int) -> None:
        """Resize the PTY."""
        self._queue.put(
            process_pb2.ExecRequest(resize=process_pb2.TerminalSize(rows=rows, cols=cols))
        )

    def cancel(self) -> None:
        """Cancel the call: the agent kills the process group."""
        if self._call is not None:
            self._call.cancel()
        self._queue.put(_END)

    def __iter__(self) -> Iterator[ExecEvent]:
        """Start the process (on first iteration) and yield its events."""
        replayable = self._stdin is None or isinstance(self._stdin, (bytes, str))

        def start() -> tuple[Any, process_pb2.ExecResponse]:
            call = self._stub.Exec(self._requests(), metadata=self._conn.metadata)
            self._call = call
            return call, next(iter(call))

        call, first = self._conn.call(start, retry=replayable and not self._interactive)
        try:
            ev = rq.exec_event(first)
            if isinstance(ev, Started):
                self.pid = ev.pid
            yield ev
            for resp in call:
                ev = rq.exec_event(resp)
                if isinstance(ev, Exited):
                    self.exit = ev
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
