"""vm.boxes: named boxes, long-lived sandboxes that many runs join (the Box service).

A box keeps what one exec leaves behind for the next (a server on 127.0.0.1, files
in /tmp) and makes an exec into it cheap: no new sandbox per call. `box(name)` gives
a handle whose run/exec go into that box; every run/exec/ask also takes `box=`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cowork.agent.v1 import box_pb2, box_pb2_grpc, process_pb2

from .. import requests as rq
from ..errors import NotFound
from ..models import BoxInfo, ExecutionResult
from .connection import Connection
from .process import BOXES_FEATURE

if TYPE_CHECKING:
    from .process import ExecStream, Process


class Boxes:
    """The Box service: `create`, `list`, `remove` named boxes."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _stub(self) -> box_pb2_grpc.BoxStub:
        self._conn.require("boxes", BOXES_FEATURE)
        return box_pb2_grpc.BoxStub(self._conn.channel)

    def create(self, name: str, *, limits: Mapping[str, float] | None = None) -> BoxInfo:
        """Make a box named `name` (AlreadyExists if there is one). `limits`
        ({'memory_bytes', 'pids', 'cpus'}) apply to everything in it together."""
        req = box_pb2.CreateBoxRequest(name=name)
        if limits:
            req.limits.CopyFrom(rq.resource_limits(limits))
        return box_info(self._conn.unary(self._stub().Create, req, retry=False))

    def list(self) -> list[BoxInfo]:
        """Every box the agent has (oldest first)."""
        resp = self._conn.unary(self._stub().List, box_pb2.ListBoxesRequest())
        return [box_info(b) for b in resp.boxes]

    def get(self, name: str) -> BoxInfo:
        """The box named `name` as `list` reports it (NotFound when there is none)."""
        for b in self.list():
            if b.name == name:
                return b
        raise NotFound(f"no box named {name}")

    def remove(self, name: str) -> BoxInfo:
        """Kill everything in the box and forget it (NotFound for an unknown name)."""
        req = box_pb2.RemoveBoxRequest(name=name)
        return box_info(self._conn.unary(self._stub().Remove, req, retry=False))


class BoxHandle:
    """One named box: `run`/`exec` inside it, `info`, `remove` (see CoworkClient.box)."""

    def __init__(self, boxes: Boxes, process: Process, name: str) -> None:
        self.name = name
        self._boxes = boxes
        self._process = process

    def run(self, command: str | Sequence[str], **options: Any) -> ExecutionResult:
        """`process.run` inside this box (same options)."""
        return self._process.run(command, box=self.name, **options)

    def exec(self, command: str | Sequence[str], **options: Any) -> ExecStream:
        """`process.exec` inside this box (same options)."""
        return self._process.exec(command, box=self.name, **options)

    def info(self) -> BoxInfo:
        """The box as Box.List reports it (NotFound once it is removed)."""
        return self._boxes.get(self.name)

    def remove(self) -> BoxInfo:
        """Kill everything in it and forget it."""
        return self._boxes.remove(self.name)


def box_info(msg: box_pb2.BoxInfo) -> BoxInfo:
    lim: process_pb2.ResourceLimits = msg.limits
    return BoxInfo(
        name=msg.name,
        state=msg.state,
        sandbox=msg.sandbox,
        created_at=msg.created_at,
        idle_seconds=msg.idle_seconds,
        active=msg.active,
        runs=msg.runs,
        processes=msg.processes,
        pid=msg.pid,
        reason=msg.reason,
        limits={"memory_bytes": lim.memory_bytes, "pids": lim.pids, "cpus": lim.cpus},
    )
