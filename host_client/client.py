"""CoworkClient: the client. One channel, kept open, reused by every call.

One implementation, two surfaces. The implementation is synchronous
(host_client.api: a Connection and one typed part per service, on grpc's sync
channel); AsyncCoworkClient (host_client.aio) is a thin adapter that runs the
same calls on worker threads. Why this way round and not an asyncio core with
a sync facade:

- The sync client is what the CLI, the mux and most scripts use, and the CLI
  is a fresh process per command: a sync core adds no import (asyncio,
  grpc.aio) and no event-loop thread to its start, and each call goes straight
  to grpc's C core with no hop between threads.
- Streams stay fast: a download's chunks are received by grpc's own threads and
  hashed and written on a second thread (api.files), which a loop in a thread
  would serialise behind every other call of the process.
- The cost is on the async side: each call in flight holds a worker thread
  (blocked in grpc's C core, without the GIL), and each streamed message makes
  one hop from that thread to the loop. Cancelling an awaiting task cancels
  its gRPC call (api.connection.CancelScope, stream.cancel()), as with grpc.aio.

Parts: `vm.process`, `vm.files`, `vm.claude`, `vm.policy`; the seed controller's
names (execute_in_vm, read_file, write_file, is_vm_running, start_vm, stop_vm,
ask_claude) and the most used calls stay here as shorthands.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .api.boxes import Boxes, BoxHandle
from .api.claude import AskStream, Claude
from .api.connection import Connection
from .api.files import Files, Progress
from .api.policy import Policy
from .api.process import ExecStream, Process
from .claude_relay import ClaudeRelay
from .errors import AgentUnavailable, CoworkError
from .models import ExecutionResult, FileInfo, TransferResult
from .protodict import to_dict

if TYPE_CHECKING:
    from .claude import ClaudeExecutionResult
    from .snapshots import Snapshot
    from .targets import Target

__all__ = ["AskStream", "CoworkClient", "ExecStream"]


class CoworkClient:
    """Talk to one agent. Create once, call many times; `close()` (or `with`) when done.

    `target` is a target string (see host_client.targets; None = $COWORK_TARGET,
    then lima:$COWORK_VM_NAME). A restarted agent is reached again by the next
    call: channels reconnect by themselves and calls that never reached the
    agent are retried once after waiting up to `connect_timeout` seconds.
    Safe to share between threads.
    """

    def __init__(
        self,
        target: str | None = None,
        token_file: str | None = None,
        *,
        connect_timeout: float = 10.0,
    ) -> None:
        self.connection = Connection(target, token_file, connect_timeout=connect_timeout)
        self.process = Process(self.connection)
        self.files = Files(self.connection)
        self.claude = Claude(self.connection)
        self.policy = Policy(self.connection)
        self.boxes = Boxes(self.connection)

    @property
    def target(self) -> Target:
        """The parsed target this client talks to."""
        return self.connection.target

    @property
    def connect_timeout(self) -> float:
        """Seconds a call waits for an unreachable agent before its one retry."""
        return self.connection.connect_timeout

    def box(
        self, name: str, *, create: bool = False, limits: Mapping[str, float] | None = None
    ) -> BoxHandle:
        """The named box `name`: its run/exec go inside it (see api.boxes). With `create`,
        the box is made first (AlreadyExists if there is one); else nothing is asked yet."""
        if create:
            self.boxes.create(name, limits=limits)
        return BoxHandle(self.boxes, self.process, name)

    def close(self) -> None:
        """Close the channel (and relay); a later call opens a new one."""
        self.connection.close()

    def __enter__(self) -> CoworkClient:
        """`with CoworkClient(...) as vm:` closes the client at the end."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the client."""
        self.close()

    # -- the agent and its VM ----------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """Versions, capabilities and machine facts of the agent."""
        return to_dict(self.connection.info())

    def capabilities(self) -> frozenset[str]:
        """The agent's capability names (asked once per connection)."""
        return self.connection.capabilities()

    def health(self, timeout: float = 2.0) -> bool:
        """True when the agent answers the standard health check as SERVING."""
        stub = health_pb2_grpc.HealthStub(self.connection.channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the agent is healthy; raise AgentUnavailable after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        stub = health_pb2_grpc.HealthStub(self.connection.channel)
        last = ""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AgentUnavailable(
                    f"agent at {self.target.spec} not ready after {timeout:g}s"
                    + (f": {last}" if last else "")
                )
            try:
                resp = stub.Check(
                    health_pb2.HealthCheckRequest(), timeout=min(left, 2.0), wait_for_ready=True
                )
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = "not serving"
            except grpc.RpcError as exc:
                last = exc.details() or exc.code().name
            time.sleep(0.05)

    def is_vm_running(self) -> bool:
        """Lima targets: the VM's state from limactl; other targets: the agent answers health."""
        if self.target.kind == "lima":
            from . import lima

            return lima.is_vm_running(self.target.name)
        return self.health()

    def start_vm(self) -> None:
        """Start the Lima VM behind a lima: target and wait for its agent."""
        from . import lima

        if self.target.kind != "lima":
            raise CoworkError(f"start_vm needs a lima: target, not {self.target.spec}")
        lima.start_vm(self.target.name)
        self.wait_ready(self.connect_timeout * 6)

    def stop_vm(self) -> None:
        """Stop the Lima VM behind a lima: target."""
        from . import lima

        if self.target.kind != "lima":
            raise CoworkError(f"stop_vm needs a lima: target, not {self.target.spec}")
        lima.stop_vm(self.target.name)

    def _lima_name(self, what: str) -> str:
        if self.target.kind != "lima":
            raise CoworkError(f"{what} needs a lima: target, not {self.target.spec}")
        return self.target.name

    def save_snapshot(self, name: str, method: str | None = None) -> Snapshot:
        """Save the Lima VM's disk as snapshot `name` (not the workspace, a host mount).

        A running VM is stopped for it and started again; this waits for its agent."""
        from . import snapshots

        vm = self._lima_name("save_snapshot")
        was_running = self.is_vm_running()
        snap = snapshots.save(vm, name, method)
        if was_running:
            self.wait_ready(self.connect_timeout * 6)
        return snap

    def list_snapshots(self) -> list[Snapshot]:
        """The Lima VM's snapshots, oldest first."""
        from . import snapshots

        return snapshots.list_snapshots(self._lima_name("list_snapshots"))

    def restore_snapshot(self, name: str) -> Snapshot:
        """Put the Lima VM's disk back to snapshot `name` (a disk snapshot needs it stopped)."""
        from . import snapshots

        vm = self._lima_name("restore_snapshot")
        was_running = self.is_vm_running()
        snap = snapshots.restore(vm, name)
        if was_running:
            self.wait_ready(self.connect_timeout * 6)
        return snap

    def remove_snapshot(self, name: str) -> Snapshot:
        """Delete snapshot `name` of the Lima VM."""
        from . import snapshots

        return snapshots.remove(self._lima_name("remove_snapshot"), name)

    def clone_vm(self, new: str, workspace: str | None = None, start: bool = True) -> str:
        """Make Lima VM `new` from this (stopped) one, with its own token and workspace;
        with `start`, boot it and wait for its agent. Returns its target, `lima:NEW`."""
        from pathlib import Path

        from . import lima, snapshots

        base = self._lima_name("clone_vm")
        snapshots.clone(base, new, Path(workspace) if workspace else None)
        if start:
            lima.start(new)
            with CoworkClient(f"lima:{new}", connect_timeout=self.connect_timeout) as clone:
                clone.wait_ready(self.connect_timeout * 6)
        return f"lima:{new}"

    # -- the seed controller's names -------------------------------------------------------
    def execute_in_vm(self, command: str | Sequence[str], **kwargs: Any) -> ExecutionResult:
        """The seed API: run a command in the VM, return output, error text and exit code.

        Keyword options as `process.run`.
        """
        return self.process.run(command, **kwargs)

    def read_file(self, path: str) -> str:
        """The seed API: a guest text file's content (UTF-8); as `files.read_file`."""
        return self.files.read_file(path)

    def write_file(
        self,
        path: str,
        content: str | bytes,
        *,
        mode: int = 0,
        create_parents: bool = True,
        overwrite: bool = True,
    ) -> FileInfo:
        """The seed API: write a guest file atomically (all or nothing); as `files.write_file`."""
        return self.files.write_file(
            path, content, mode=mode, create_parents=create_parents, overwrite=overwrite
        )

    def ask_claude(self, prompt: str, **options: Any) -> ClaudeExecutionResult:
        """The seed API: run Claude Code on `prompt` in the VM; as `claude.ask`."""
        return self.claude.ask(prompt, **options)

    # -- shorthands for the parts (same parameters; see the part's method) -----------------
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
        """Shorthand for `process.run`: run to completion, buffered output."""
        return self.process.run(
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
    ) -> ExecStream:
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

    def stat(self, path: str, follow_symlinks: bool = False) -> FileInfo:
        """Shorthand for `files.stat`."""
        return self.files.stat(path, follow_symlinks)

    def list_dir(self, path: str, recursive: bool = False) -> list[FileInfo]:
        """Shorthand for `files.list_dir`."""
        return self.files.list_dir(path, recursive)

    def read_bytes(self, path: str, offset: int = 0, length: int = 0) -> bytes:
        """Shorthand for `files.read_bytes`."""
        return self.files.read_bytes(path, offset, length)

    def read_chunks(
        self, path: str, offset: int = 0, length: int = 0
    ) -> tuple[FileInfo, Iterator[bytes]]:
        """Shorthand for `files.read_chunks`."""
        return self.files.read_chunks(path, offset, length)

    def remove(self, path: str, recursive: bool = False, missing_ok: bool = False) -> bool:
        """Shorthand for `files.remove`."""
        return self.files.remove(path, recursive, missing_ok)

    def mkdir(self, path: str, parents: bool = True, exist_ok: bool = True) -> FileInfo:
        """Shorthand for `files.mkdir`."""
        return self.files.mkdir(path, parents, exist_ok)

    def rename(self, source: str, destination: str, overwrite: bool = False) -> FileInfo:
        """Shorthand for `files.rename`."""
        return self.files.rename(source, destination, overwrite)

    def symlink(
        self,
        target: str,
        path: str,
        *,
        overwrite: bool = True,
        create_parents: bool = True,
        mtime_ns: int = 0,
    ) -> FileInfo:
        """Shorthand for `files.symlink`."""
        return self.files.symlink(
            target, path, overwrite=overwrite, create_parents=create_parents, mtime_ns=mtime_ns
        )

    def upload(
        self,
        local: str,
        remote: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Shorthand for `files.upload`: copy a local file or tree to the guest, like `cp -a`."""
        return self.files.upload(local, remote, progress=progress, follow_symlinks=follow_symlinks)

    def download(
        self,
        remote: str,
        local: str,
        *,
        progress: Progress | None = None,
        follow_symlinks: bool = False,
    ) -> TransferResult:
        """Shorthand for `files.download`: copy a guest file or tree here, like `cp -a`."""
        return self.files.download(
            remote, local, progress=progress, follow_symlinks=follow_symlinks
        )

    def get_policy(self) -> dict[str, Any]:
        """Shorthand for `policy.get`."""
        return self.policy.get()

    def set_policy(
        self,
        yaml: str | None = None,
        *,
        allow: str | None = None,
        deny: str | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """Shorthand for `policy.set`."""
        return self.policy.set(yaml, allow=allow, deny=deny, preset=preset)

    def logs(self, net: bool = False, tail: int = 100, follow: bool = False) -> Iterator[str]:
        """Shorthand for `policy.logs`."""
        return self.policy.logs(net, tail, follow)

    def ask_stream(self, prompt: str, **options: Any) -> AskStream:
        """Shorthand for `claude.stream`: Claude Code's events as they happen."""
        return self.claude.stream(prompt, **options)

    def claude_version(self) -> dict[str, Any]:
        """Shorthand for `claude.version`."""
        return self.claude.version()
