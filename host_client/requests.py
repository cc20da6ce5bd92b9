"""Request building and response decoding shared by the sync and async clients.

Everything here is pure (no I/O), so the two clients differ only in how they
wait, never in what they send.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from cowork.agent.v1 import files_pb2, process_pb2

from .models import Exited, FileInfo, Gap, Output, RunInfo, Started

UPLOAD_CHUNK = 1024 * 1024  # the agent's maximum chunk; fewer messages, faster transfers
_TYPES = {
    files_pb2.FILE_TYPE_FILE: "file",
    files_pb2.FILE_TYPE_DIRECTORY: "directory",
    files_pb2.FILE_TYPE_SYMLINK: "symlink",
    files_pb2.FILE_TYPE_OTHER: "other",
}


def process_spec(
    command: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    pty: bool = False,
    rows: int = 0,
    cols: int = 0,
    term: str = "",
    stdin: bool = False,
    clear_env: bool = False,
    limits: Mapping[str, float] | None = None,
    detach: bool = False,
    claude_relay: process_pb2.ClaudeRelay | None = None,
    box: str = "",
) -> process_pb2.ProcessSpec:
    """A str is a shell command line (`sh -c`); a sequence is an argv (no shell)."""
    spec = process_pb2.ProcessSpec(
        cwd=cwd or "",
        pty=pty,
        rows=rows,
        cols=cols,
        term=term,
        stdin=stdin,
        clear_env=clear_env,
        timeout_ms=int(timeout * 1000) if timeout else 0,
        detach=detach,
        box=box,
    )
    if isinstance(command, str):
        spec.shell = command
    else:
        spec.argv.extend(command)
    if env:
        spec.env.update(env)
    if limits:
        spec.limits.CopyFrom(resource_limits(limits))
    if claude_relay is not None:
        spec.claude_relay.CopyFrom(claude_relay)
    return spec


def resource_limits(limits: Mapping[str, float]) -> process_pb2.ResourceLimits:
    """{'memory_bytes': .., 'pids': .., 'cpus': ..} -> the proto (unknown keys are an error)."""
    unknown = set(limits) - {"memory_bytes", "pids", "cpus"}
    if unknown:
        raise ValueError(f"unknown limit(s): {', '.join(sorted(unknown))}")
    return process_pb2.ResourceLimits(
        memory_bytes=int(limits.get("memory_bytes", 0)),
        pids=int(limits.get("pids", 0)),
        cpus=float(limits.get("cpus", 0.0)),
    )


def exec_event(resp: process_pb2.ExecResponse) -> Started | Output | Gap | Exited:
    kind = resp.WhichOneof("msg")
    if kind == "stdout":
        return Output("stdout", resp.stdout, resp.offset)
    if kind == "stderr":
        return Output("stderr", resp.stderr, resp.offset)
    if kind == "started":
        return Started(resp.started.pid, resp.started.run_id)
    if kind == "gap":
        return Gap(resp.gap.from_offset, resp.gap.first_offset)
    return exited(resp.exit)


def run_info(msg: process_pb2.RunInfo) -> RunInfo:
    return RunInfo(
        id=msg.id,
        kind=msg.kind,
        state=msg.state,
        detached=msg.detached,
        argv=list(msg.argv),
        prompt=msg.prompt,
        box=msg.box,
        started_at=msg.started_at,
        ended_at=msg.ended_at,
        exit=exited(msg.exit) if msg.HasField("exit") else None,
        pid=msg.pid,
        journal_start=msg.journal_start,
        journal_end=msg.journal_end,
        journal_bytes=msg.journal_bytes,
        reason=msg.reason,
        session_id=msg.session_id,
        pty=msg.pty,
        cwd=msg.cwd,
    )


def exited(msg: process_pb2.Exit) -> Exited:
    return Exited(msg.code, msg.signal, msg.timed_out, msg.duration_ms, msg.oom_killed)


def stdin_messages(stdin: Any) -> Iterator[process_pb2.ExecRequest]:
    """Turn bytes, str, a binary file or an iterable of bytes into stdin messages + EOF."""
    if stdin is None:
        return
    if isinstance(stdin, str):
        stdin = stdin.encode()
    if isinstance(stdin, (bytes, bytearray, memoryview)):
        view = memoryview(stdin)
        for i in range(0, len(view), UPLOAD_CHUNK):
            yield process_pb2.ExecRequest(stdin=bytes(view[i : i + UPLOAD_CHUNK]))
    elif hasattr(stdin, "read"):
        while True:
            chunk = stdin.read1(65536) if hasattr(stdin, "read1") else stdin.read(65536)
            if not chunk:
                break
            yield process_pb2.ExecRequest(stdin=chunk)
    else:
        for chunk in stdin:
            if chunk:
                yield process_pb2.ExecRequest(stdin=bytes(chunk))
    yield process_pb2.ExecRequest(close_stdin=True)


def file_info(msg: files_pb2.FileInfo) -> FileInfo:
    return FileInfo(
        path=msg.path,
        name=msg.name,
        type=_TYPES.get(msg.type, "other"),
        size=msg.size,
        mode=msg.mode,
        mtime_ns=msg.mtime_ns,
        symlink_target=msg.symlink_target,
        special=msg.special,
        device=msg.device,
        inode=msg.inode,
    )


class UploadSource:
    """Iterates WriteRequests for a local file (or bytes), hashing as it goes.

    The commit carries the size and SHA-256, so the agent refuses to rename a
    file whose content did not arrive exactly as sent.
    """

    def __init__(
        self,
        remote: str,
        data: bytes | None = None,
        local: str | None = None,
        mode: int = 0,
        create_parents: bool = True,
        overwrite: bool = True,
        preserve_mtime: bool = False,
        progress: Any = None,
    ) -> None:
        self.remote = remote
        self.data = data
        self.local = local
        self.progress = progress
        mtime_ns = 0
        if local is not None:
            st = os.stat(local)
            mode = mode or (st.st_mode & 0o7777)
            if preserve_mtime:
                mtime_ns = st.st_mtime_ns
        self.header = files_pb2.WriteHeader(
            path=remote,
            mode=mode,
            create_parents=create_parents,
            overwrite=overwrite,
            mtime_ns=mtime_ns,
        )
        self.sent = 0
        self.sha256 = ""

    def __iter__(self) -> Iterator[files_pb2.WriteRequest]:
        yield files_pb2.WriteRequest(header=self.header)
        digest = hashlib.sha256()
        for chunk in self._chunks():
            digest.update(chunk)
            self.sent += len(chunk)
            if self.progress is not None:
                self.progress(len(chunk))
            yield files_pb2.WriteRequest(data=chunk)
        self.sha256 = digest.hexdigest()
        yield files_pb2.WriteRequest(
            commit=files_pb2.WriteCommit(expected_size=self.sent, sha256=self.sha256)
        )

    def _chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            view = memoryview(self.data)
            for i in range(0, len(view), UPLOAD_CHUNK):
                yield bytes(view[i : i + UPLOAD_CHUNK])
            return
        assert self.local is not None
        with open(self.local, "rb") as f:
            while True:
                chunk = f.read(UPLOAD_CHUNK)
                if not chunk:
                    return
                yield chunk


def temp_beside(path: str) -> str:
    """A hidden temporary name next to `path`, for atomic local downloads."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.cowork-part-{os.urandom(4).hex()}")
