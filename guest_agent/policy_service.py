"""Policy.Get/Set/Logs: the live sandbox policy and the agent's audit and egress logs.

The policy lives in one store that every launch reads (`PolicyStore.current`),
so a Set applies to the next process without a restart; it is persisted
atomically first, so a crash never leaves a half-written policy file.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from cowork.agent.v1 import policy_pb2 as pb
from cowork.agent.v1 import policy_pb2_grpc as pb_grpc

from . import policy as pol
from .egress import EgressLog
from .errors import invalid, precondition
from .rpc import Context, audit

RING = 1000
SUBSCRIBER_QUEUE = 256


class PolicyStore:
    """The policy in force, and where it is persisted (None: built-in, in memory only)."""

    def __init__(self, path: str | None, default: pol.Policy) -> None:
        self.path = path
        self.current = pol.load(path, default)

    def replace(self, new: pol.Policy) -> None:
        if self.path:
            pol.save(self.path, new)
        self.current = new


class AuditRing(logging.Handler):
    """Keeps the last RPC audit records and feeds `logs --follow` subscribers."""

    def __init__(self, size: int = RING) -> None:
        super().__init__(level=logging.INFO)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=size)
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()
        self.loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        logger = logging.getLogger("cowork.audit")
        logger.setLevel(logging.INFO)  # the ring wants every RPC even when stderr is quieter
        logger.addHandler(self)

    def uninstall(self) -> None:
        logging.getLogger("cowork.audit").removeHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        entry = getattr(record, "audit", None)
        if not isinstance(entry, dict):
            return
        item = {"ts": round(record.created, 3), **entry}
        self.records.append(item)
        if self.subscribers and self.loop is not None:
            self.loop.call_soon_threadsafe(self._publish, item)

    def _publish(self, item: dict[str, Any]) -> None:
        for q in list(self.subscribers):
            if q.full():
                q.get_nowait()  # a slow follower loses its oldest, the agent never grows
            q.put_nowait(item)

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(SUBSCRIBER_QUEUE)
        self.subscribers.add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self.subscribers.discard(q)


class PolicyService(pb_grpc.PolicyServicer):
    def __init__(self, store: PolicyStore, audit_ring: AuditRing, egress_log: EgressLog) -> None:
        self.store = store
        self.audit_ring = audit_ring
        self.egress_log = egress_log

    def _document(self) -> pb.PolicyDocument:
        p = self.store.current
        eg = p.egress()
        return pb.PolicyDocument(
            yaml=p.to_yaml(),
            path=self.store.path or "",
            effective_allow=list(eg.allow),
            effective_deny=list(eg.deny),
            sandbox=p.sandbox,
        )

    async def Get(self, request: pb.GetPolicyRequest, context: Context) -> pb.GetPolicyResponse:
        return pb.GetPolicyResponse(policy=self._document())

    async def Set(self, request: pb.SetPolicyRequest, context: Context) -> pb.SetPolicyResponse:
        kind = request.WhichOneof("change")
        cur = self.store.current
        try:
            if kind == "yaml":
                new = pol.parse(request.yaml)
            elif kind == "allow_domain":
                new = cur.with_allowed(request.allow_domain)
            elif kind == "deny_domain":
                new = cur.with_denied(request.deny_domain)
            elif kind == "preset":
                new = cur.with_preset(request.preset)
            else:
                raise invalid("Policy.Set needs one of: yaml, allow_domain, deny_domain, preset")
        except ValueError as exc:  # PolicyError, and DomainPolicy's pattern errors
            raise invalid(str(exc)) from None
        if new.sandbox == "bwrap" and cur.sandbox != "bwrap":
            from .sandbox import require_tool

            require_tool("bwrap")  # FAILED_PRECONDITION now rather than on the next exec
        try:
            self.store.replace(new)
        except OSError as exc:
            raise precondition(f"cannot save the policy to {self.store.path}: {exc}") from None
        audit(change=kind, sandbox=new.sandbox, preset=new.preset)
        return pb.SetPolicyResponse(policy=self._document())

    async def Logs(self, request: pb.LogsRequest, context: Context) -> AsyncIterator[pb.LogEntry]:
        tail = request.tail or 100
        if request.kind == pb.LOG_KIND_EGRESS:
            # Subscribe before reading the ring: nothing falls between the two.
            with self.egress_log.subscribe() as follower:
                for rec in self.egress_log.recent(tail):
                    yield pb.LogEntry(json=json.dumps(rec.to_json(), default=str))
                if request.follow:
                    async for rec in follower:
                        yield pb.LogEntry(json=json.dumps(rec.to_json(), default=str))
            return
        follow = self.audit_ring.follow() if request.follow else None
        for item in list(self.audit_ring.records)[-tail:]:
            yield pb.LogEntry(json=json.dumps(item, default=str))
        if follow is not None:
            async for item in follow:
                yield pb.LogEntry(json=json.dumps(item, default=str))
