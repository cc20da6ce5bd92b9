"""Runs with ids: the registry behind Process.List/Attach/Signal/Kill/Wait, and run journals.

Every Exec and Claude run gets an id and a RunRecord while it runs. A run
started with `detach` is driven by a task of the agent, not by its stream: its
output goes to a Journal (below) that any number of Attach streams follow, from
any offset, while the run goes on whether or not anyone is attached.

The journal is a directory of segment files under the agent's state directory
(beside its socket; /run/cowork in the VM, which no box can see), each a
sequence of records (kind: 1 byte, length: 4 bytes, data). Offsets count
output bytes for an exec run and events for a Claude run, so a client that
saw offset N resumes at N and gets no byte twice and none missing. When the
journal passes its cap the oldest segment is deleted: a reader that asks for
an offset before the first one left gets a gap first (JournalGap), then what
is left. Segments are an eighth of the cap, so a full journal holds between
7/8 of the cap and the cap.

Disk: each running detached run reserves its whole cap from the policy's total
when it starts (RESOURCE_EXHAUSTED when the total cannot hold it, after
evicting finished runs oldest first), so a run already going can never be
refused space by a newer one. A finished run holds what its journal holds
until `runs.keep` has passed, then the directory goes.

Agent restarts: detached runs do not survive the agent (the guardian kills what
they left, like any run's). Each run's meta.json records its state; a new life
lists a run that was still running as "lost: agent restarted" (or "lost: agent
stopped" when the agent stopped cleanly), with its journal still replayable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from cowork.agent.v1 import process_pb2 as pb
from cowork.defaults import AUDIT_VALUE_CHARS

from .errors import AgentError, invalid, not_found, precondition
from .fdio import write_all
from .policy import RunLimits

log = logging.getLogger("cowork.runs")

KIND_STDOUT = 1
KIND_STDERR = 2
KIND_EVENT = 3
KIND_NAMES = {KIND_STDOUT: "stdout", KIND_STDERR: "stderr", KIND_EVENT: "event"}
_HEADER = struct.Struct(">BI")
MIN_SEGMENT = 16 * 1024
META = "meta.json"
ID_BYTES = 6  # 12 hex digits, as docker's short ids


# -- journal ----------------------------------------------------------------------------
@dataclass(eq=False)
class Segment:
    start: int  # offset of its first unit
    path: str
    units: int = 0
    nbytes: int = 0

    @property
    def end(self) -> int:
        return self.start + self.units


@dataclass(frozen=True)
class Gap:
    """The journal no longer holds [from_offset, first_offset)."""

    from_offset: int
    first_offset: int


@dataclass(frozen=True)
class Record:
    kind: int
    offset: int
    data: bytes


class Journal:
    """One run's bounded output, addressed by offset; see the module docstring."""

    def __init__(self, directory: str, cap: int) -> None:
        self.dir = directory
        self.cap = cap
        self.segment_size = max(MIN_SEGMENT, cap // 8)
        self.segments: list[Segment] = []
        self.end = 0
        self.nbytes = 0
        self.closed = False
        self.write_error = ""
        self._fd: int | None = None
        self._changed = asyncio.Event()

    @property
    def start(self) -> int:
        return self.segments[0].start if self.segments else self.end

    @classmethod
    def load(cls, directory: str, cap: int) -> Journal:
        """A journal a previous agent life wrote (closed: it only replays)."""
        j = cls(directory, cap)
        names = sorted(n for n in os.listdir(directory) if n.startswith("seg-"))
        for name in names:
            path = os.path.join(directory, name)
            try:
                start = int(name[4:])
                seg = Segment(start, path)
                with open(path, "rb") as f:
                    while True:
                        head = f.read(_HEADER.size)
                        if len(head) < _HEADER.size:
                            break
                        kind, n = _HEADER.unpack(head)
                        if len(f.read(n)) < n:
                            break
                        seg.units += n if kind != KIND_EVENT else 1
                        seg.nbytes += _HEADER.size + n
            except (OSError, ValueError):
                continue
            if j.segments and seg.start != j.segments[-1].end:
                j.segments.clear()  # a hole: keep only what follows it
                j.nbytes = 0
            j.segments.append(seg)
            j.nbytes += seg.nbytes
            j.end = seg.end
        j.closed = True
        return j

    def append(self, kind: int, data: bytes) -> int:
        """Add output (`kind` KIND_STDOUT/STDERR: bytes; KIND_EVENT: one event); its offset."""
        offset = self.end
        if self.closed:
            return offset
        if kind == KIND_EVENT:
            self._write(kind, data, 1)
        else:
            step = self.segment_size - _HEADER.size
            for i in range(0, len(data), step):
                piece = data[i : i + step]
                self._write(kind, piece, len(piece))
        self._changed.set()
        self._changed = asyncio.Event()
        return offset

    def _write(self, kind: int, data: bytes, units: int) -> None:
        size = _HEADER.size + len(data)
        while self.segments and self.nbytes + size > self.cap:
            if len(self.segments) == 1:
                self._seal()  # the head is the tail: the next write starts a new one
                if not self.segments:
                    break
            head = self.segments.pop(0)
            self.nbytes -= head.nbytes
            with contextlib.suppress(OSError):
                os.unlink(head.path)
        tail = self.segments[-1] if self.segments and self._fd is not None else None
        if tail is None or (tail.nbytes and tail.nbytes + size > self.segment_size):
            tail = self._new_segment()
            if tail is None:
                self.end += units  # lost (the disk refused it): offsets still count it
                return
        try:
            write_all(self._fd, _HEADER.pack(kind, len(data)) + data)  # type: ignore[arg-type]
        except OSError as exc:
            if not self.write_error:
                log.warning("journal %s: cannot write: %s", self.dir, exc)
            self.write_error = str(exc)
            self._seal()
            self.end += units
            # What follows starts a new segment: a reader sees a gap, never garbage.
            return
        tail.units += units
        tail.nbytes += size
        self.nbytes += size
        self.end += units

    def _new_segment(self) -> Segment | None:
        self._seal()
        path = os.path.join(self.dir, f"seg-{self.end:020d}")
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if not self.write_error:
                log.warning("journal %s: cannot write: %s", self.dir, exc)
            self.write_error = str(exc)
            return None
        seg = Segment(self.end, path)
        self.segments.append(seg)
        return seg

    def _seal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        # An empty segment (a write failed) holds nothing: drop it.
        if self.segments and self.segments[-1].units == 0:
            seg = self.segments.pop()
            with contextlib.suppress(OSError):
                os.unlink(seg.path)

    def close(self) -> None:
        """No more output: readers that reach the end stop there."""
        self._seal()
        self.closed = True
        self._changed.set()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.segments.clear()
        self.nbytes = 0

    async def follow(self, offset: int, limit: int = 256 * 1024) -> AsyncIterator[Gap | Record]:
        """What the journal holds from `offset` on, then what is appended, until it is closed."""
        cursor = _Cursor(self, offset)
        try:
            while True:
                changed = self._changed
                items = cursor.read(limit)
                if items:
                    for item in items:
                        yield item
                    continue
                if self.closed and cursor.offset >= self.end:
                    return
                await changed.wait()
        finally:
            cursor.close()


class _Cursor:
    """A reader's place: the segment it reads (an fd that survives the segment's deletion)."""

    def __init__(self, journal: Journal, offset: int) -> None:
        self.j = journal
        self.offset = offset
        self.seg: Segment | None = None
        self.fd: int | None = None
        self.pos = 0  # byte position of the next record in seg
        self.at = 0  # offset of the record at pos

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self.seg = None

    def _find(self) -> Segment | None:
        for seg in self.j.segments:
            if seg.start <= self.offset < seg.end:
                return seg
        return None

    def read(self, limit: int) -> list[Gap | Record]:
        out: list[Gap | Record] = []
        got = 0
        while got < limit:
            if self.seg is not None and self.at >= self.seg.end:
                tail = self.j.segments[-1] if self.j.segments else None
                if self.seg is tail and self.j._fd is not None:
                    break  # the tail, still being written: wait for more
                self.close()  # done with it (sealed, or already deleted)
            if self.seg is None:
                if self.offset < self.j.start:
                    out.append(Gap(self.offset, self.j.start))
                    self.offset = self.j.start
                seg = self._find()
                if seg is None:
                    break  # at the end
                try:
                    self.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # cut under us: the start has moved on
                self.seg, self.pos, self.at = seg, 0, seg.start
            assert self.fd is not None and self.seg is not None
            if self.pos >= self.seg.nbytes:
                if self.at < self.seg.end:  # not expected: a short segment
                    self.close()
                    self.offset = max(self.offset, self.at)
                    continue
                continue
            head = os.pread(self.fd, _HEADER.size, self.pos)
            if len(head) < _HEADER.size:
                self.close()
                continue
            kind, n = _HEADER.unpack(head)
            units = 1 if kind == KIND_EVENT else n
            rec_at = self.at
            self.pos += _HEADER.size + n
            self.at += units
            if self.at <= self.offset:
                continue  # before where the reader wants to be
            data = os.pread(self.fd, n, self.pos - n)
            if kind != KIND_EVENT and rec_at < self.offset:
                data = data[self.offset - rec_at :]
                rec_at = self.offset
            out.append(Record(kind, rec_at, data))
            self.offset = self.at
            got += len(data)
        return out


# -- runs -----------------------------------------------------------------------------
def _short(text: str) -> str:
    return text if len(text) <= AUDIT_VALUE_CHARS else text[:AUDIT_VALUE_CHARS] + "…"


@dataclass(eq=False)
class RunRecord:
    """One run the agent knows by id: running (any), or finished and kept (detached)."""

    id: str
    kind: str  # "exec" | "claude"
    detached: bool
    argv: list[str] = field(default_factory=list)
    prompt: str = ""
    cwd: str = ""
    pty: bool = False
    box: str = ""
    started_at: float = field(default_factory=time.time)
    pid: int = 0
    state: str = "running"
    ended_at: float = 0.0
    exit: pb.Exit | None = None
    reason: str = ""
    session_id: str = ""
    journal: Journal | None = None
    reserved: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # Set by the runner once the process exists.
    signal: Callable[[int], bool] | None = None
    stop: Callable[[], Awaitable[None]] | None = None
    # Detached: control messages for the process (ExecRequest), and the driver task.
    control: asyncio.Queue[Any] | None = None
    task: asyncio.Future[Any] | None = None
    killed: bool = False
    # Why it ended when something else ended it (e.g. "box web removed").
    ended_by: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    def info(self) -> pb.RunInfo:
        j = self.journal
        msg = pb.RunInfo(
            id=self.id,
            kind=self.kind,
            state=self.state,
            detached=self.detached,
            argv=[_short(a) for a in self.argv[:64]],
            prompt=_short(self.prompt),
            box=self.box,
            started_at=self.started_at,
            ended_at=self.ended_at,
            pid=self.pid,
            journal_start=j.start if j else 0,
            journal_end=j.end if j else 0,
            journal_bytes=j.nbytes if j else 0,
            reason=self.reason,
            session_id=self.session_id,
            pty=self.pty,
            cwd=self.cwd,
        )
        if self.exit is not None:
            msg.exit.CopyFrom(self.exit)
        return msg

    def meta(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "kind": self.kind,
            "state": self.state,
            "argv": [_short(a) for a in self.argv[:64]],
            "prompt": _short(self.prompt),
            "cwd": self.cwd,
            "pty": self.pty,
            "box": self.box,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "pid": self.pid,
            "reason": self.reason,
            "session_id": self.session_id,
            "cap": self.journal.cap if self.journal else 0,
        }
        if self.exit is not None:
            e = self.exit
            out["exit"] = [e.code, e.signal, e.timed_out, e.duration_ms, e.oom_killed]
        return out


class Runs:
    """The agent's runs by id. `directory` holds the journals (None: detach is refused)."""

    def __init__(self, directory: str | None, limits: Callable[[], RunLimits]) -> None:
        self.dir = directory
        self.limits = limits
        self._runs: dict[str, RunRecord] = {}
        self._timer: asyncio.TimerHandle | None = None
        self.closing = False

    # -- life cycle -------------------------------------------------------------------
    def load(self) -> None:
        """Make the journal directory; list what a previous life left (as lost)."""
        if self.dir is None:
            return
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(self.dir, 0o700)
        for name in sorted(os.listdir(self.dir)):
            path = os.path.join(self.dir, name)
            try:
                with open(os.path.join(path, META)) as f:
                    meta = json.load(f)
                rec = self._from_meta(meta, path)
            except (OSError, ValueError, TypeError, KeyError):
                shutil.rmtree(path, ignore_errors=True)  # half-made, or not ours
                continue
            self._runs[rec.id] = rec
            self._write_meta(rec)
        self._schedule_purge()

    def _from_meta(self, meta: dict[str, Any], path: str) -> RunRecord:
        rec = RunRecord(
            id=str(meta["id"]),
            kind=str(meta["kind"]),
            detached=True,
            argv=[str(a) for a in meta.get("argv", [])],
            prompt=str(meta.get("prompt", "")),
            cwd=str(meta.get("cwd", "")),
            pty=bool(meta.get("pty", False)),
            box=str(meta.get("box", "")),
            started_at=float(meta.get("started_at", 0)),
            pid=int(meta.get("pid", 0)),
            state=str(meta.get("state", "lost")),
            ended_at=float(meta.get("ended_at", 0)),
            reason=str(meta.get("reason", "")),
            session_id=str(meta.get("session_id", "")),
        )
        if "exit" in meta:
            code, sig, timed_out, duration, oom = meta["exit"]
            rec.exit = pb.Exit(
                code=code, signal=sig, timed_out=timed_out, duration_ms=duration, oom_killed=oom
            )
        if rec.state == "running":
            rec.state = "lost"
            rec.reason = "lost: agent restarted"
        if not rec.ended_at:
            rec.ended_at = time.time()
        rec.journal = Journal.load(path, int(meta.get("cap", 0)) or self.limits().journal)
        rec.done.set()
        return rec

    async def close(self) -> None:
        """The agent stops: stop every detached run (they end as "lost: agent stopped")."""
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        tasks = [r.task for r in self._runs.values() if r.task is not None and not r.task.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- registry ---------------------------------------------------------------------
    def _new_id(self) -> str:
        while True:
            rid = secrets.token_hex(ID_BYTES)
            if rid not in self._runs:
                return rid

    def create(
        self,
        kind: str,
        detached: bool,
        *,
        argv: list[str] | None = None,
        prompt: str = "",
        cwd: str = "",
        pty: bool = False,
        box: str = "",
    ) -> RunRecord:
        """A new running run, listed at once; detached: its journal and reservation too
        (RESOURCE_EXHAUSTED past the policy's limits, FAILED_PRECONDITION without a
        journal directory)."""
        rec = RunRecord(
            id=self._new_id(),
            kind=kind,
            detached=detached,
            argv=list(argv or []),
            prompt=prompt,
            cwd=cwd,
            pty=pty,
            box=box,
        )
        if detached:
            if self.dir is None:
                raise precondition("this agent keeps no run journals: detach is not available")
            limits = self.limits()
            going = sum(1 for r in self._runs.values() if r.detached and r.running)
            if going >= limits.detached:
                raise AgentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many detached runs: {going} going (the policy's runs.detached is "
                    f"{limits.detached}); wait for one or kill one",
                )
            self._make_room(limits.journal, limits.journal_total)
            path = os.path.join(self.dir, rec.id)
            try:
                os.mkdir(path, 0o700)
            except OSError as exc:
                raise AgentError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, f"cannot make the run's journal: {exc}"
                ) from None
            rec.journal = Journal(path, limits.journal)
            rec.reserved = limits.journal
            rec.control = asyncio.Queue(16)
            self._write_meta(rec)
        self._runs[rec.id] = rec
        return rec

    def used(self) -> int:
        """Journal bytes held or reserved: whole caps of running runs, what finished ones hold."""
        return sum(
            r.reserved if r.running else (r.journal.nbytes if r.journal else 0)
            for r in self._runs.values()
        )

    def _make_room(self, need: int, total: int) -> None:
        finished = sorted(
            (r for r in self._runs.values() if not r.running and r.journal is not None),
            key=lambda r: r.ended_at,
        )
        while self.used() + need > total and finished:
            self.forget(finished.pop(0))
        if self.used() + need > total:
            raise AgentError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"journal space exhausted: running detached runs hold {self.used()} bytes of "
                f"the policy's runs.journal_total {total}, a new run needs {need} "
                "(runs.journal)",
            )

    def discard(self, rec: RunRecord) -> None:
        """A run that never started: gone without a trace."""
        self._runs.pop(rec.id, None)
        if rec.journal is not None:
            rec.journal.remove()
        rec.done.set()

    def forget(self, rec: RunRecord) -> None:
        """Drop a run and its journal."""
        self._runs.pop(rec.id, None)
        if rec.journal is not None:
            rec.journal.remove()

    def finish(self, rec: RunRecord, exit: pb.Exit | None, reason: str = "") -> None:
        """The run has ended: keep its exit (detached: and journal) for `runs.keep`."""
        if not rec.running:
            return
        rec.exit = exit
        rec.state = "exited" if exit is not None else "lost"
        rec.reason = reason or rec.ended_by or ("killed" if rec.killed else "")
        if exit is None and not rec.reason:
            rec.reason = "lost"
        rec.ended_at = time.time()
        rec.signal = rec.stop = None
        rec.control = None
        if rec.journal is not None:
            rec.journal.close()
            rec.reserved = 0
            self._write_meta(rec)
        rec.done.set()
        if not rec.detached:
            self._runs.pop(rec.id, None)
        else:
            self._schedule_purge()

    def get(self, ref: str) -> RunRecord:
        """The run `ref` names (its id or a prefix of exactly one id)."""
        if not ref:
            raise invalid("no run id given")
        rec = self._runs.get(ref)
        if rec is not None:
            return rec
        matches = [r for rid, r in self._runs.items() if rid.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise invalid(f"run id {ref!r} is ambiguous: {len(matches)} runs start with it")
        raise not_found(f"no such run: {ref}")

    def list(self) -> list[RunRecord]:
        self.purge()
        return sorted(self._runs.values(), key=lambda r: r.started_at)

    # -- keeping ----------------------------------------------------------------------
    def purge(self) -> None:
        keep = self.limits().keep_seconds
        now = time.time()
        for rec in list(self._runs.values()):
            if not rec.running and now - rec.ended_at >= keep:
                self.forget(rec)

    def _schedule_purge(self) -> None:
        if self.closing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        ended = [r.ended_at for r in self._runs.values() if not r.running]
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not ended:
            return
        keep = self.limits().keep_seconds
        delay = max(0.0, min(ended) + keep - time.time())

        def tick() -> None:
            self._timer = None
            self.purge()
            self._schedule_purge()

        # Checked at least every minute too (the policy's keep may have changed).
        self._timer = loop.call_later(min(delay, 60.0) + 0.01, tick)

    def _write_meta(self, rec: RunRecord) -> None:
        if rec.journal is None:
            return
        path = os.path.join(rec.journal.dir, META)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w") as f:
                json.dump(rec.meta(), f)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("run %s: cannot write its state: %s", rec.id, exc)

    def note_started(self, rec: RunRecord) -> None:
        """Record what is known once the process exists (pid, session id)."""
        self._write_meta(rec)

    def mark_stopping(self, rec: RunRecord) -> None:
        """The agent is stopping: the run will end as lost, not as killed by someone."""
        rec.reason = "lost: agent stopped"
