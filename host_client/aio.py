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
from . import targets, transfer
from .errors import AgentUnavailable, CoworkError, from_rpc_error
from .models import (
    ExecEvent,
    ExecutionResult,
    Exited,
    FileInfo,
    Output,
    Skipped,
    Started,
    TransferResult,
)
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
    async def stat(self, path: str, follow_symlinks: bool = False) -> FileInfo:
        """Describe a guest path; a final symlink itself unless `follow_symlinks`."""
        stub = self._stub("_files")
        req = files_pb2.StatRequest(path=path, follow_symlinks=follow_symlinks)
        return rq.file_info(
            (await self._call(lambda: stub.Stat(req, metadata=self._metadata))).info
        )

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
        return rq.file_info(
            (await self._call(lambda: stub.MakeDir(req, metadata=self._metadata))).info
        )

    async def rename(self, source: str, destination: str, overwrite: bool = False) -> FileInfo:
        stub = self._stub("_files")
        req = files_pb2.RenameRequest(source=source, destination=destination, overwrite=overwrite)
        return rq.file_info(
            (await self._call(lambda: stub.Rename(req, metadata=self._metadata))).info
        )

    async def symlink(
        self,
        target: str,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mtime_ns: int = 0,
    ) -> FileInfo:
        """Create guest symlink `path` -> `target`, atomically (see CoworkClient.symlink)."""
        req = files_pb2.SymlinkRequest(
            path=path,
            target=target,
            overwrite=overwrite,
            create_parents=create_parents,
            mtime_ns=mtime_ns,
        )
        stub = self._stub("_files")
        return rq.file_info(
            (await self._call(lambda: stub.Symlink(req, metadata=self._metadata))).info
        )

    async def upload(
        self,
        local: str,
        remote: str,
        *,
        progress: Callable[[int], None] | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Copy a local file, symlink or directory tree to `remote`, like `cp -a`.

        The same rules as CoworkClient.upload (host_client.transfer); local
        reads run off the event loop.
        """
        loop = asyncio.get_running_loop()
        items, skipped = await loop.run_in_executor(
            None, transfer.plan_upload, local, remote, follow_symlinks
        )
        result = TransferResult(remote, 0, "", files=0, skipped=skipped)
        for item in items:
            if item.kind == "dir":
                await self.mkdir(item.remote)
            elif item.kind == "symlink":
                await self.symlink(item.target, item.remote, mtime_ns=item.mtime_ns)
                result.symlinks += 1
            else:
                r = await self._upload_file(item.local, item.remote, progress)
                result.bytes += r.bytes
                result.files += 1
                if item.local == local:
                    result.path, result.sha256 = r.path, r.sha256
        return result

    async def _upload_file(
        self, local: str, remote: str, progress: Callable[[int], None] | None
    ) -> TransferResult:
        src = rq.UploadSource(remote, local=local, progress=progress, preserve_mtime=True)
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

    async def download(
        self,
        remote: str,
        local: str,
        *,
        progress: Callable[[int], None] | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Copy a guest file, symlink or directory tree to `local`, like `cp -a`.

        The same rules as CoworkClient.download (host_client.transfer).
        """
        info = await self.stat(remote, follow_symlinks=follow_symlinks)
        result = TransferResult(local, 0, "", files=0)
        if info.is_dir:
            os.makedirs(local, exist_ok=True)
            await self._download_tree(info, local, progress, follow_symlinks, (), result)
        else:
            await self._download_entry(info, remote, local, progress, result)
            if result.files == 1 and not result.skipped:
                result.path = local
        return result

    async def _download_entry(
        self,
        info: FileInfo,
        remote: str,
        dest: str,
        progress: Callable[[int], None] | None,
        result: TransferResult,
    ) -> None:
        if info.type == "symlink":
            reason = transfer.make_local_symlink(info.symlink_target, dest, info.mtime_ns)
            if reason:
                result.skipped.append(Skipped(remote, reason))
            else:
                result.symlinks += 1
        elif info.type == "file":
            reason = transfer.local_blocker(dest)
            if reason:
                result.skipped.append(Skipped(remote, reason))
                return
            r = await self._download_file(remote, dest, progress)
            result.bytes += r.bytes
            result.files += 1
            result.sha256 = r.sha256 if result.files == 1 else ""
        else:
            result.skipped.append(Skipped(remote, transfer.special_reason(info.special)))

    async def _download_tree(
        self,
        top: FileInfo,
        local: str,
        progress: Callable[[int], None] | None,
        follow: bool,
        above: tuple[tuple[int, int], ...],
        result: TransferResult,
    ) -> None:
        entries = await self.list_dir(top.path, recursive=True)
        keys = transfer.dir_keys(top, entries)
        for entry in entries:
            rel = transfer.relative_name(top.path, entry)
            if rel is None:
                result.skipped.append(Skipped(entry.path, "unsafe name from the agent"))
                continue
            dest = os.path.join(local, rel)
            if not transfer.local_parent_is_safe(local, rel):
                result.skipped.append(Skipped(entry.path, transfer.UNSAFE_PARENT))
                continue
            try:
                if entry.type == "symlink" and follow:
                    entry = await self.stat(entry.path, follow_symlinks=True)
                    if entry.is_dir:
                        key = (entry.device, entry.inode)
                        chain = (*above, *transfer.chain(keys, top.path, rel))
                        if key in chain:
                            result.skipped.append(Skipped(entry.path, transfer.LOOP))
                            continue
                if entry.is_dir:
                    reason = transfer.make_local_dir(dest)
                    if reason:
                        result.skipped.append(Skipped(entry.path, reason))
                    elif entry.path not in keys:  # a followed link: its own listing
                        chain = (*above, *transfer.chain(keys, top.path, rel))
                        await self._download_tree(entry, dest, progress, follow, chain, result)
                    continue
                await self._download_entry(entry, entry.path, dest, progress, result)
            except CoworkError as exc:
                reason = transfer.entry_error(exc)
                if reason is None:
                    raise
                result.skipped.append(Skipped(entry.path, reason))

    async def _download_file(
        self, remote: str, local: str, progress: Callable[[int], None] | None
    ) -> TransferResult:
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
                    if progress is not None:
                        progress(len(chunk))
            if info:
                os.chmod(tmp, transfer.local_mode(info[0].mode))
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
            oom_killed=self.exit.oom_killed,
        )
