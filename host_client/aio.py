"""AsyncCoworkClient: the same surface as CoworkClient, on grpc.aio, for asyncio programs."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cowork.agent.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    claude_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)
from cowork.defaults import AUTH_METADATA_KEY, AUTH_SCHEME

from . import requests as rq
from . import targets
from .errors import AgentUnavailable, from_rpc_error
from .models import ExecEvent, ExecutionResult, Exited, FileInfo, Output, Started, TransferResult
from .protodict import to_dict
from .transports import ChannelHandle

if TYPE_CHECKING:
    from .claude import AsyncAskStream, ClaudeExecutionResult

T = TypeVar("T")
_END = object()


class AsyncCoworkClient:
    """Async twin of CoworkClient; use `async with AsyncCoworkClient(...) as c:`."""

    def __init__(
        self,
        target: str | None = None,
        token_file: str | None = None,
        *,
        connect_timeout: float = 10.0,
    ) -> None:
        self.target = targets.parse(target)
        token = targets.load_token(self.target, token_file)
        self._metadata = ((AUTH_METADATA_KEY, f"{AUTH_SCHEME} {token.decode()}"),)
        self.connect_timeout = connect_timeout
        self._handle = ChannelHandle(self.target)
        self._channel: grpc.aio.Channel | None = None

    @property
    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = self._handle.aio_channel()
            self._agent = agent_pb2_grpc.AgentStub(self._channel)
            self._process = process_pb2_grpc.ProcessStub(self._channel)
            self._files = files_pb2_grpc.FilesStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)
            self._claude = claude_pb2_grpc.ClaudeStub(self._channel)
        return self._channel

    def _stub(self, name: str) -> Any:
        self.channel  # noqa: B018 - creates the stubs on first use
        return getattr(self, name)

    async def _call(self, fn: Callable[[], Awaitable[T]], retry: bool = True) -> T:
        try:
            return await fn()
        except grpc.aio.AioRpcError as exc:
            if retry and exc.code() == grpc.StatusCode.UNAVAILABLE:
                try:
                    await asyncio.wait_for(self.channel.channel_ready(), self.connect_timeout)
                except asyncio.TimeoutError:
                    raise from_rpc_error(exc, self.target.spec) from None
                try:
                    return await fn()
                except grpc.aio.AioRpcError as again:
                    raise from_rpc_error(again, self.target.spec) from None
            raise from_rpc_error(exc, self.target.spec) from None

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close(None)
            self._channel = None
        self._handle.close()

    async def __aenter__(self) -> AsyncCoworkClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- agent ---------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        stub = self._stub("_agent")
        resp = await self._call(lambda: stub.Info(agent_pb2.InfoRequest(), metadata=self._metadata))
        return to_dict(resp)

    async def health(self, timeout: float = 2.0) -> bool:
        stub = self._stub("_health")
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        stub = self._stub("_health")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnavailable(f"agent at {self.target.spec} not ready after {timeout:g}s")
            try:
                resp = await stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=min(left, 2.0), wait_for_ready=True
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)

    # -- processes -------------------------------------------------------------
    async def run(
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
        spec = rq.process_spec(command, env=env, cwd=cwd, timeout=timeout, limits=limits)
        data = stdin.encode() if isinstance(stdin, str) else (stdin or b"")
        req = process_pb2.RunRequest(spec=spec, stdin=data, output_limit=output_limit)
        stub = self._stub("_process")
        resp = await self._call(lambda: stub.Run(req, metadata=self._metadata))
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

    async def execute_in_vm(self, command: str | Sequence[str], **kwargs: Any) -> ExecutionResult:
        return await self.run(command, **kwargs)

    def exec(
        self,
        command: str | Sequence[str],
        *,
        stdin: bytes | str | None = None,
        interactive: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        timeout: float | None = None,
        pty: bool = False,
        rows: int = 0,
        cols: int = 0,
        term: str = "",
        limits: Mapping[str, float] | None = None,
    ) -> AsyncExecStream:
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
        return AsyncExecStream(self, spec, stdin, interactive)

    # -- files -------------------------------------------------------------------
    async def stat(self, path: str) -> FileInfo:
        stub = self._stub("_files")
        req = files_pb2.StatRequest(path=path)
        return rq.file_info(await self._call(lambda: stub.Stat(req, metadata=self._metadata)))

    async def list_dir(self, path: str, recursive: bool = False) -> list[FileInfo]:
        stub = self._stub("_files")
        req = files_pb2.ListRequest(path=path, recursive=recursive)
        resp = await self._call(lambda: stub.List(req, metadata=self._metadata))
        return [rq.file_info(e) for e in resp.entries]

    async def read_bytes(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        parts = [chunk async for chunk in self._read_chunks(path, offset, length)]
        return b"".join(parts)

    async def read_file(self, path: str) -> str:
        return (await self.read_bytes(path)).decode("utf-8", "replace")

    async def _read_chunks(
        self, path: str, offset: int = 0, length: int = 0, info: list[FileInfo] | None = None
    ) -> AsyncIterator[bytes]:
        stub = self._stub("_files")
        req = files_pb2.ReadRequest(
            path=path, offset=offset, length=length, chunk_size=rq.UPLOAD_CHUNK
        )
        call = stub.Read(req, metadata=self._metadata)
        try:
            async for msg in call:
                if msg.WhichOneof("msg") == "info":
                    if info is not None:
                        info.append(rq.file_info(msg.info))
                    continue
                yield msg.data
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self.target.spec) from None
        finally:
            call.cancel()

    async def write_file(
        self, path: str, content: str | bytes, *, mode: int = 0, create_parents: bool = True
    ) -> FileInfo:
        data = content.encode() if isinstance(content, str) else bytes(content)
        src = rq.UploadSource(path, data=data, mode=mode, create_parents=create_parents)
        stub = self._stub("_files")
        resp = await self._call(lambda: stub.Write(iter(src), metadata=self._metadata))
        return rq.file_info(resp.info)

    async def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> bool:
        stub = self._stub("_files")
        req = files_pb2.RemoveRequest(path=path, recursive=recursive, missing_ok=missing_ok)
        return bool((await self._call(lambda: stub.Remove(req, metadata=self._metadata))).removed)

    async def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        stub = self._stub("_files")
        req = files_pb2.MakeDirRequest(path=path, parents=parents, exist_ok=exist_ok)
        return rq.file_info(await self._call(lambda: stub.MakeDir(req, metadata=self._metadata)))

    async def rename(self, source: str, destination: str, overwrite: bool = False) -> FileInfo:
        stub = self._stub("_files")
        req = files_pb2.RenameRequest(source=source, destination=destination, overwrite=overwrite)
        return rq.file_info(await self._call(lambda: stub.Rename(req, metadata=self._metadata)))

    async def upload(self, local: str, remote: str) -> TransferResult:
        """Copy one local file to `remote` atomically (file reads run off the loop)."""
        src = rq.UploadSource(remote, local=local, preserve_mtime=True)
        loop = asyncio.get_running_loop()
        it = iter(src)

        async def requests() -> AsyncIterator[files_pb2.WriteRequest]:
            while True:
                msg = await loop.run_in_executor(None, next, it, None)
                if msg is None:
                    return
                yield msg

        stub = self._stub("_files")
        resp = await self._call(lambda: stub.Write(requests(), metadata=self._metadata), False)
        return TransferResult(resp.info.path, resp.bytes_written, resp.sha256)

    async def download(self, remote: str, local: str) -> TransferResult:
        """Copy one guest file to `local` atomically."""
        tmp = rq.temp_beside(local)
        digest = hashlib.sha256()
        n = 0
        info: list[FileInfo] = []
        try:
            with open(tmp, "wb") as f:
                async for chunk in self._read_chunks(remote, info=info):
                    f.write(chunk)
                    digest.update(chunk)
                    n += len(chunk)
            if info:
                os.chmod(tmp, info[0].mode or 0o644)
                os.utime(tmp, ns=(info[0].mtime_ns, info[0].mtime_ns))
            os.replace(tmp, local)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return TransferResult(local, n, digest.hexdigest())

    # -- Claude Code (host_client/claude.py) ------------------------------------------
    async def ask_claude(self, prompt: str, **options: Any) -> ClaudeExecutionResult:
        """Async twin of CoworkClient.ask_claude."""
        from .claude import async_ask_claude

        return await async_ask_claude(self, prompt, **options)

    def ask_stream(self, prompt: str, **options: Any) -> AsyncAskStream:
        """Async twin of CoworkClient.ask_stream: `async for ev in client.ask_stream(...)`."""
        from .claude import async_ask_stream

        return async_ask_stream(self, prompt, **options)

    async def claude_version(self) -> dict[str, Any]:
        from .claude import async_claude_version

        return await async_claude_version(self)


class AsyncExecStream:
    """Async iterator of exec events, with write/close_stdin/signal/resize/cancel."""

    def __init__(
        self,
        client: AsyncCoworkClient,
        spec: process_pb2.ProcessSpec,
        stdin: bytes | str | None,
        interactive: bool,
    ) -> None:
        self._client = client
        self._spec = spec
        self._stdin = stdin
        self._interactive = interactive
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._call: Any = None
        self.pid = 0
        self.exit: Exited | None = None

    async def _requests(self) -> AsyncIterator[process_pb2.ExecRequest]:
        yield process_pb2.ExecRequest(start=self._spec)
        if not self._interactive:
            for msg in rq.stdin_messages(self._stdin):
                yield msg
            if not self._spec.pty:
                return
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            yield item

    def write(self, data: bytes) -> None:
        self._queue.put_nowait(process_pb2.ExecRequest(stdin=data))

    def close_stdin(self) -> None:
        self._queue.put_nowait(process_pb2.ExecRequest(close_stdin=True))

    def signal(self, signum: int) -> None:
        self._queue.put_nowait(process_pb2.ExecRequest(signal=signum))

    def resize(self, rows: int, cols: int) -> None:
        size = process_pb2.TerminalSize(rows=rows, cols=cols)
        self._queue.put_nowait(process_pb2.ExecRequest(resize=size))

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()
        self._queue.put_nowait(_END)

    async def __aiter__(self) -> AsyncIterator[ExecEvent]:
        stub = self._client._stub("_process")
        self._call = stub.Exec(self._requests(), metadata=self._client._metadata)
        try:
            async for resp in self._call:
                ev = rq.exec_event(resp)
                if isinstance(ev, Started):
                    self.pid = ev.pid
                elif isinstance(ev, Exited):
                    self.exit = ev
                yield ev
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, self._client.target.spec) from None
        finally:
            self._queue.put_nowait(_END)
            if self.exit is None:
                self._call.cancel()

    async def collect(self) -> ExecutionResult:
        out: list[bytes] = []
        err: list[bytes] = []
        async for ev in self:
            if isinstance(ev, Output):
                (out if ev.stream == "stdout" else err).append(ev.data)
        assert self.exit is not None
        o, e = b"".join(out), b"".join(err)
        return ExecutionResult(
            output=o.decode("utf-8", "replace"),
            error=e.decode("utf-8", "replace"),
            exit_code=self.exit.shell_code,
            signal=self.exit.signal,
            timed_out=self.exit.timed_out,
            duration_ms=self.exit.duration_ms,
            stdout=o,
            stderr=e,
        )
