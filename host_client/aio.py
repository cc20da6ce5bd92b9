"""AsyncCoworkClient: CoworkClient for asyncio programs, as a thin adapter over it.

Every method here awaits the same method of the sync implementation
(host_client.api, see host_client.client for why the core is synchronous),
run on this client's worker threads, so the two surfaces cannot drift:
tests/test_surfaces.py fails on any difference in names or parameters.

- A call in flight holds one worker thread (at most `max_workers` at once; more
  wait their turn). Cancelling the awaiting task cancels the gRPC call.
- Streams (`exec`, `claude.stream`, `policy.logs`, `files.read_chunks`) are
  iterated with `async for`; each message makes one hop from a worker thread to
  the loop. Leaving the loop early cancels the call, as in the sync client.
- Progress callbacks of upload/download run on a worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .api.claude import AskStream
from .api.connection import CancelScope, Connection
from .api.files import Progress
from .api.process import ExecStream
from .claude_relay import ClaudeRelay
from .client import CoworkClient
from .models import (
    BoxInfo,
    ExecEvent,
    ExecutionResult,
    Exited,
    FileInfo,
    RunInfo,
    TransferResult,
)

if TYPE_CHECKING:
    from .claude import ClaudeEvent, ClaudeExecutionResult
    from .snapshots import Snapshot
    from .targets import Target

T = TypeVar("T")
_DONE = object()
MAX_WORKERS = 64


class _Worker:
    """Runs blocking calls of the sync implementation on a private thread pool."""

    def __init__(self, conn: Connection, max_workers: int) -> None:
        self._conn = conn
        self._max_workers = max_workers
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    self._max_workers, thread_name_prefix="cowork-aio"
                )
            return self._pool

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Await `fn(*args, **kwargs)` run on a worker; task cancellation cancels its RPC."""
        scope = CancelScope()
        future = self.pool().submit(self._conn.cancellable, scope, lambda: fn(*args, **kwargs))
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            scope.cancel()
            raise

    async def iterate(self, it: Iterator[T], cancel: Callable[[], None]) -> AsyncIterator[T]:
        """`async for` over a sync stream; leaving early calls `cancel` and closes `it`."""
        pool = self.pool()
        pending: concurrent.futures.Future[Any] | None = None
        exhausted = False
        try:
            while True:
                pending = pool.submit(next, it, _DONE)
                item = await asyncio.wrap_future(pending)
                pending = None
                if item is _DONE:
                    exhausted = True
                    return
                yield item
        finally:
            if not exhausted:
                cancel()
                pool.submit(_close_after, pending, it)

    def close(self) -> None:
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None


def _close_after(pending: concurrent.futures.Future[Any] | None, it: Iterator[Any]) -> None:
    """Close a sync generator once the `next` running on it has returned."""
    if pending is not None:
        try:
            pending.result()
        except BaseException:
            pass
    close = getattr(it, "close", None)
    if close is not None:
        close()


class AsyncExecStream:
    """A running remote process: `async for` its events; control it with the methods."""

    def __init__(self, stream: ExecStream, worker: _Worker) -> None:
        self._stream = stream
        self._worker = worker

    @property
    def pid(self) -> int:
        """The process id in the guest (0 until Started)."""
        return self._stream.pid

    @property
    def exit(self) -> Exited | None:
        """The Exited event once the process ended."""
        return self._stream.exit

    @property
    def run_id(self) -> str:
        """The run's id (once Started)."""
        return self._stream.run_id

    @property
    def offset(self) -> int:
        """Detached runs: the journal offset after the last output seen."""
        return self._stream.offset

    def write(self, data: bytes) -> None:
        """Send `data` to the process's stdin (interactive mode / PTY)."""
        self._stream.write(data)

    def close_stdin(self) -> None:
        """Close the process's stdin (EOF)."""
        self._stream.close_stdin()

    def signal(self, signum: int) -> None:
        """Send signal `signum` to the process group."""
        self._stream.signal(signum)

    def resize(self, rows: int, cols: int) -> None:
        """Resize the PTY."""
        self._stream.resize(rows, cols)

    def cancel(self) -> None:
        """Cancel the call: the agent kills the process group."""
        self._stream.cancel()

    def __aiter__(self) -> AsyncIterator[ExecEvent]:
        """Start the process (on first iteration) and yield its events."""
        return self._worker.iterate(iter(self._stream), self._stream.cancel)

    async def collect(self) -> ExecutionResult:
        """Drain the stream into an ExecutionResult (oom_killed included)."""
        return await self._worker.call(self._stream.collect)


class AsyncAskStream:
    """A running Claude.Ask: `async for` its events; `cancel()` stops the remote run."""

    def __init__(self, stream: AskStream, worker: _Worker) -> None:
        self._stream = stream
        self._worker = worker

    @property
    def events(self) -> list[ClaudeEvent]:
        """The events seen so far."""
        return self._stream.events

    @property
    def finished(self) -> bool:
        """True once the result (or the terminal error) arrived."""
        return self._stream.finished

    @property
    def run_id(self) -> str:
        """Detached or attached runs: the run's id."""
        return self._stream.run_id

    @property
    def offset(self) -> int:
        """Detached runs: the journal offset after the last event seen."""
        return self._stream.offset

    def cancel(self) -> None:
        """Stop the remote run (its stream ends with a cancelled ClaudeError)."""
        self._stream.cancel()

    def __aiter__(self) -> AsyncIterator[ClaudeEvent]:
        """Start the run (on first iteration) and yield its events."""
        return self._worker.iterate(iter(self._stream), self._stream.cancel)

    async def collect(self) -> ClaudeExecutionResult:
        """Drain the stream into a ClaudeExecutionResult."""
        return await self._worker.call(self._stream.collect)


class AsyncProcess:
    """`vm.process` for asyncio: the Process service (see api.process.Process)."""

    def __init__(self, client: CoworkClient, worker: _Worker) -> None:
        self._sync = client.process
        self._worker = worker

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
        box: str | None = None,
    ) -> ExecutionResult:
        """Run to completion and return buffered output (capped at `output_limit` per stream)."""
        return await self._worker.call(
            self._sync.run,
            command,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout=timeout,
            output_limit=output_limit,
            limits=limits,
            box=box,
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
    ) -> AsyncExecStream:
        """Start a process and stream its events (`async for`); nothing is sent until then.

        Checking a capability (`limits`) may ask the agent once, blocking briefly.
        """
        stream = self._sync.exec(
            command,
            stdin=stdin,
            interactive=interactive,
            env=env,
            cwd=cwd,
            timeout=timeout,
            pty=pty,
            rows=rows,
            cols=cols,
            term=term,
            limits=limits,
            detach=detach,
            claude_relay=claude_relay,
            box=box,
        )
        return AsyncExecStream(stream, self._worker)

    def attach(
        self,
        run_id: str,
        *,
        from_offset: int = 0,
        tail: bool = False,
        stdin: bytes | str | Iterable[bytes] | Any = None,
        interactive: bool = False,
    ) -> AsyncExecStream:
        """Follow a detached exec run again (see api.process.Process.attach)."""
        stream = self._sync.attach(
            run_id, from_offset=from_offset, tail=tail, stdin=stdin, interactive=interactive
        )
        return AsyncExecStream(stream, self._worker)

    async def runs(self) -> list[RunInfo]:
        """Every run the agent knows: running ones, and finished detached ones it keeps."""
        return await self._worker.call(self._sync.runs)

    async def signal_run(self, run_id: str, signum: int) -> RunInfo:
        """Send signal `signum` to a run's process group."""
        return await self._worker.call(self._sync.signal_run, run_id, signum)

    async def kill(self, run_id: str) -> RunInfo:
        """Stop a run (SIGTERM, then SIGKILL after the agent's grace) and return it ended."""
        return await self._worker.call(self._sync.kill, run_id)

    async def wait(self, run_id: str, timeout: float | None = None) -> RunInfo:
        """Wait until a run has ended (DeadlineExceeded after `timeout` seconds)."""
        return await self._worker.call(self._sync.wait, run_id, timeout)


class AsyncFiles:
    """`vm.files` for asyncio: the Files service (see api.files.Files)."""

    def __init__(self, client: CoworkClient, worker: _Worker) -> None:
        self._sync = client.files
        self._worker = worker

    async def stat(self, path: str, follow_symlinks: bool = False) -> FileInfo:
        """Describe a guest path; a final symlink itself unless `follow_symlinks`."""
        return await self._worker.call(self._sync.stat, path, follow_symlinks)

    async def list_dir(self, path: str, recursive: bool = False) -> list[FileInfo]:
        """The entries of a guest directory (all below it with `recursive`), sorted by path."""
        return await self._worker.call(self._sync.list_dir, path, recursive)

    async def read_bytes(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        """A guest file's bytes (`length` bytes from `offset`; 0 = to the end)."""
        return await self._worker.call(self._sync.read_bytes, path, offset, length)

    async def read_file(self, path: str) -> str:
        """A guest text file's content (UTF-8; undecodable bytes replaced)."""
        return await self._worker.call(self._sync.read_file, path)

    async def read_chunks(
        self, path: str, offset: int = 0, length: int = 0
    ) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """Open a guest file for reading: its FileInfo now, then its content in chunks."""
        info, chunks = await self._worker.call(self._sync.read_chunks, path, offset, length)
        return info, self._worker.iterate(chunks, chunks.cancel)

    async def write_file(
        self,
        path: str,
        content: str | bytes,
        *,
        mode: int = 0,
        create_parents: bool = True,
        overwrite: bool = True,
    ) -> FileInfo:
        """Write a guest file atomically (all or nothing), checked by size and SHA-256."""
        return await self._worker.call(
            self._sync.write_file,
            path,
            content,
            mode=mode,
            create_parents=create_parents,
            overwrite=overwrite,
        )

    async def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> bool:
        """Remove a guest file, link or (with `recursive`) tree; False if missing and allowed."""
        return await self._worker.call(self._sync.remove, path, recursive, missing_ok)

    async def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        """Make a guest directory (and its parents); its FileInfo."""
        return await self._worker.call(self._sync.mkdir, path, parents, exist_ok)

    async def rename(self, source: str, destination: str, overwrite: bool = False) -> FileInfo:
        """Move a guest entry (replacing a file at `destination` only with `overwrite`)."""
        return await self._worker.call(self._sync.rename, source, destination, overwrite)

    async def symlink(
        self,
        target: str,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mtime_ns: int = 0,
    ) -> FileInfo:
        """Create guest symlink `path` -> `target` (as os.symlink(target, path)), atomically."""
        return await self._worker.call(
            self._sync.symlink,
            target,
            path,
            overwrite=overwrite,
            create_parents=create_parents,
            mtime_ns=mtime_ns,
        )

    async def upload(
        self,
        local: str,
        remote: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Copy a local file, symlink or directory tree to `remote`, like `cp -a`."""
        return await self._worker.call(
            self._sync.upload, local, remote, progress=progress, follow_symlinks=follow_symlinks
        )

    async def download(
        self,
        remote: str,
        local: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Copy a guest file, symlink or directory tree to `local`, like `cp -a`."""
        return await self._worker.call(
            self._sync.download, remote, local, progress=progress, follow_symlinks=follow_symlinks
        )


class AsyncClaude:
    """`vm.claude` for asyncio: the Claude service (see api.claude.Claude)."""

    def __init__(self, client: CoworkClient, worker: _Worker) -> None:
        self._sync = client.claude
        self._worker = worker

    async def ask(self, prompt: str, **options: Any) -> ClaudeExecutionResult:
        """Run Claude Code on `prompt` in the VM; output = the result text, exit_code 0/1."""
        return await self._worker.call(self._sync.ask, prompt, **options)

    def stream(self, prompt: str, **options: Any) -> AsyncAskStream:
        """Like `ask`, but yields the run's typed events as they happen (`async for`)."""
        return AsyncAskStream(self._sync.stream(prompt, **options), self._worker)

    def attach(self, run_id: str, *, from_offset: int = 0, tail: bool = False) -> AsyncAskStream:
        """Follow a detached Claude run again (see api.claude.Claude.attach)."""
        stream = self._sync.attach(run_id, from_offset=from_offset, tail=tail)
        return AsyncAskStream(stream, self._worker)

    async def version(self) -> dict[str, Any]:
        """Whether the CLI is installed in the VM, its version, path and run-as user."""
        return await self._worker.call(self._sync.version)


class AsyncPolicy:
    """`vm.policy` for asyncio: the Policy service (see api.policy.Policy)."""

    def __init__(self, client: CoworkClient, worker: _Worker) -> None:
        self._sync = client.policy
        self._worker = worker

    async def get(self) -> dict[str, Any]:
        """The sandbox policy in force: yaml, path, effective_allow/deny, sandbox."""
        return await self._worker.call(self._sync.get)

    async def set(
        self,
        yaml: str | None = None,
        *,
        allow: str | None = None,
        deny: str | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """Replace the policy (`yaml`) or make one change; InvalidArgument names a bad key."""
        return await self._worker.call(self._sync.set, yaml, allow=allow, deny=deny, preset=preset)

    async def logs(
        self, net: bool = False, tail: int = 100, follow: bool = False
    ) -> AsyncIterator[str]:
        """The agent's audit log (or egress log with `net`), one JSON object string per entry."""
        entries = await self._worker.call(self._sync.logs, net, tail, follow)
        async for entry in self._worker.iterate(entries, entries.cancel):
            yield entry


class AsyncBoxes:
    """`vm.boxes` for asyncio: the Box service (see api.boxes.Boxes)."""

    def __init__(self, client: CoworkClient, worker: _Worker) -> None:
        self._sync = client.boxes
        self._worker = worker

    async def create(self, name: str, *, limits: Mapping[str, float] | None = None) -> BoxInfo:
        """Make a box named `name`; `limits` apply to everything in it together."""
        return await self._worker.call(self._sync.create, name, limits=limits)

    async def list(self) -> list[BoxInfo]:
        """Every box the agent has (oldest first)."""
        return await self._worker.call(self._sync.list)

    async def get(self, name: str) -> BoxInfo:
        """The box named `name` as `list` reports it (NotFound when there is none)."""
        return await self._worker.call(self._sync.get, name)

    async def remove(self, name: str) -> BoxInfo:
        """Kill everything in the box and forget it."""
        return await self._worker.call(self._sync.remove, name)


class AsyncBoxHandle:
    """One named box for asyncio (see api.boxes.BoxHandle)."""

    def __init__(self, client: AsyncCoworkClient, name: str) -> None:
        self.name = name
        self._client = client

    async def run(self, command: str | Sequence[str], **options: Any) -> ExecutionResult:
        """`process.run` inside this box (same options)."""
        return await self._client.process.run(command, box=self.name, **options)

    def exec(self, command: str | Sequence[str], **options: Any) -> AsyncExecStream:
        """`process.exec` inside this box (same options)."""
        return self._client.process.exec(command, box=self.name, **options)

    async def info(self) -> BoxInfo:
        """The box as Box.List reports it (NotFound once it is removed)."""
        return await self._client.boxes.get(self.name)

    async def remove(self) -> BoxInfo:
        """Kill everything in it and forget it."""
        return await self._client.boxes.remove(self.name)


class AsyncCoworkClient:
    """CoworkClient for asyncio: `async with AsyncCoworkClient(...) as vm:`.

    The same parts (`vm.process`, `vm.files`, `vm.claude`, `vm.policy`), names
    and parameters as CoworkClient, awaited. At most `max_workers` calls are in
    flight at once; more wait for a free worker thread.
    """

    def __init__(
        self,
        target: str | None = None,
        token_file: str | None = None,
        *,
        connect_timeout: float = 10.0,
        max_workers: int = MAX_WORKERS,
    ) -> None:
        self.sync = CoworkClient(target, token_file, connect_timeout=connect_timeout)
        self._worker = _Worker(self.sync.connection, max_workers)
        self.process = AsyncProcess(self.sync, self._worker)
        self.files = AsyncFiles(self.sync, self._worker)
        self.claude = AsyncClaude(self.sync, self._worker)
        self.policy = AsyncPolicy(self.sync, self._worker)
        self.boxes = AsyncBoxes(self.sync, self._worker)

    @property
    def target(self) -> Target:
        """The parsed target this client talks to."""
        return self.sync.target

    @property
    def connect_timeout(self) -> float:
        """Seconds a call waits for an unreachable agent before its one retry."""
        return self.sync.connect_timeout

    async def box(
        self, name: str, *, create: bool = False, limits: Mapping[str, float] | None = None
    ) -> AsyncBoxHandle:
        """The named box `name`: its run/exec go inside it. With `create`, made first."""
        if create:
            await self.boxes.create(name, limits=limits)
        return AsyncBoxHandle(self, name)

    async def close(self) -> None:
        """Close the channel (and relay) and the worker threads."""
        self._worker.close()
        self.sync.close()

    async def __aenter__(self) -> AsyncCoworkClient:
        """`async with AsyncCoworkClient(...) as vm:` closes the client at the end."""
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Close the client."""
        await self.close()

    # -- the agent and its VM ----------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """Versions, capabilities and machine facts of the agent."""
        return await self._worker.call(self.sync.info)

    async def capabilities(self) -> frozenset[str]:
        """The agent's capability names (asked once per connection)."""
        return await self._worker.call(self.sync.capabilities)

    async def health(self, timeout: float = 2.0) -> bool:
        """True when the agent answers the standard health check as SERVING."""
        return await self._worker.call(self.sync.health, timeout)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the agent is healthy; raise AgentUnavailable after `timeout` seconds."""
        await self._worker.call(self.sync.wait_ready, timeout)

    async def is_vm_running(self) -> bool:
        """Lima targets: the VM's state from limactl; other targets: the agent answers health."""
        return await self._worker.call(self.sync.is_vm_running)

    async def start_vm(self) -> None:
        """Start the Lima VM behind a lima: target and wait for its agent."""
        await self._worker.call(self.sync.start_vm)

    async def stop_vm(self) -> None:
        """Stop the Lima VM behind a lima: target."""
        await self._worker.call(self.sync.stop_vm)

    async def save_snapshot(self, name: str, method: str | None = None) -> Snapshot:
        """Save the Lima VM's disk as snapshot `name` (not the workspace, a host mount).

        A running VM is stopped for it and started again; this waits for its agent."""
        return await self._worker.call(self.sync.save_snapshot, name, method)

    async def list_snapshots(self) -> list[Snapshot]:
        """The Lima VM's snapshots, oldest first."""
        return await self._worker.call(self.sync.list_snapshots)

    async def restore_snapshot(self, name: str) -> Snapshot:
        """Put the Lima VM's disk back to snapshot `name` (a disk snapshot needs it stopped)."""
        return await self._worker.call(self.sync.restore_snapshot, name)

    async def remove_snapshot(self, name: str) -> Snapshot:
        """Delete snapshot `name` of the Lima VM."""
        return await self._worker.call(self.sync.remove_snapshot, name)

    async def clone_vm(self, new: str, workspace: str | None = None, start: bool = True) -> str:
        """Make Lima VM `new` from this (stopped) one, with its own token and workspace;
        with `start`, boot it and wait for its agent. Returns its target, `lima:NEW`."""
        return await self._worker.call(self.sync.clone_vm, new, workspace, start)

    # -- the seed controller's names -------------------------------------------------------
    async def execute_in_vm(self, command: str | Sequence[str], **kwargs: Any) -> ExecutionResult:
        """The seed API: run a command in the VM, return output, error text and exit code."""
        return await self._worker.call(self.sync.execute_in_vm, command, **kwargs)

    async def read_file(self, path: str) -> str:
        """The seed API: a guest text file's content (UTF-8); as `files.read_file`."""
        return await self.files.read_file(path)

    async def write_file(
        self,
        path: str,
        content: str | bytes,
        *,
        mode: int = 0,
        create_parents: bool = True,
        overwrite: bool = True,
    ) -> FileInfo:
        """The seed API: write a guest file atomically (all or nothing); as `files.write_file`."""
        return await self.files.write_file(
            path, content, mode=mode, create_parents=create_parents, overwrite=overwrite
        )

    async def ask_claude(self, prompt: str, **options: Any) -> ClaudeExecutionResult:
        """The seed API: run Claude Code on `prompt` in the VM; as `claude.ask`."""
        return await self.claude.ask(prompt, **options)

    # -- shorthands for the parts (same parameters; see the part's method) -----------------
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
        box: str | None = None,
    ) -> ExecutionResult:
        """Shorthand for `process.run`: run to completion, buffered output."""
        return await self.process.run(
            command,
            stdin=stdin,
            env=env,
            cwd=cwd,
            timeout=timeout,
            output_limit=output_limit,
            limits=limits,
            box=box,
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
    ) -> AsyncExecStream:
        """Shorthand for `process.exec`: start a process and stream its events."""
        return self.process.exec(
            command,
            stdin=stdin,
            interactive=interactive,
            env=env,
            cwd=cwd,
            timeout=timeout,
            pty=pty,
            rows=rows,
            cols=cols,
            term=term,
            limits=limits,
            detach=detach,
            claude_relay=claude_relay,
            box=box,
        )

    async def stat(self, path: str, follow_symlinks: bool = False) -> FileInfo:
        """Shorthand for `files.stat`."""
        return await self.files.stat(path, follow_symlinks)

    async def list_dir(self, path: str, recursive: bool = False) -> list[FileInfo]:
        """Shorthand for `files.list_dir`."""
        return await self.files.list_dir(path, recursive)

    async def read_bytes(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        """Shorthand for `files.read_bytes`."""
        return await self.files.read_bytes(path, offset, length)

    async def read_chunks(
        self, path: str, offset: int = 0, length: int = 0
    ) -> tuple[FileInfo, AsyncIterator[bytes]]:
        """Shorthand for `files.read_chunks`."""
        return await self.files.read_chunks(path, offset, length)

    async def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> bool:
        """Shorthand for `files.remove`."""
        return await self.files.remove(path, recursive, missing_ok)

    async def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        """Shorthand for `files.mkdir`."""
        return await self.files.mkdir(path, parents, exist_ok)

    async def rename(self, source: str, destination: str, overwrite: bool = False) -> FileInfo:
        """Shorthand for `files.rename`."""
        return await self.files.rename(source, destination, overwrite)

    async def symlink(
        self,
        target: str,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mtime_ns: int = 0,
    ) -> FileInfo:
        """Shorthand for `files.symlink`."""
        return await self.files.symlink(
            target, path, overwrite=overwrite, create_parents=create_parents, mtime_ns=mtime_ns
        )

    async def upload(
        self,
        local: str,
        remote: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Shorthand for `files.upload`: copy a local file or tree to the guest, like `cp -a`."""
        return await self.files.upload(
            local, remote, progress=progress, follow_symlinks=follow_symlinks
        )

    async def download(
        self,
        remote: str,
        local: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Shorthand for `files.download`: copy a guest file or tree here, like `cp -a`."""
        return await self.files.download(
            remote, local, progress=progress, follow_symlinks=follow_symlinks
        )

    async def get_policy(self) -> dict[str, Any]:
        """Shorthand for `policy.get`."""
        return await self.policy.get()

    async def set_policy(
        self,
        yaml: str | None = None,
        *,
        allow: str | None = None,
        deny: str | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """Shorthand for `policy.set`."""
        return await self.policy.set(yaml, allow=allow, deny=deny, preset=preset)

    def logs(self, net: bool = False, tail: int = 100, follow: bool = False) -> AsyncIterator[str]:
        """Shorthand for `policy.logs`."""
        return self.policy.logs(net, tail, follow)

    def ask_stream(self, prompt: str, **options: Any) -> AsyncAskStream:
        """Shorthand for `claude.stream`: Claude Code's events as they happen."""
        return self.claude.stream(prompt, **options)

    async def claude_version(self) -> dict[str, Any]:
        """Shorthand for `claude.version`."""
        return await self.claude.version()
