"""vm.policy: the sandbox policy and the agent's logs (the Policy service)."""

from __future__ import annotations

from typing import Any

from cowork.agent.v1 import policy_pb2, policy_pb2_grpc

from ..protodict import to_dict
from .connection import Connection, ServerStream


class Policy:
    """The Policy service: `get`/`set` the sandbox policy, stream the audit or egress `logs`."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _stub(self) -> policy_pb2_grpc.PolicyStub:
        return policy_pb2_grpc.PolicyStub(self._conn.channel)

    def get(self) -> dict[str, Any]:
        """The sandbox policy in force: yaml, path, effective_allow/deny, sandbox."""
        self._conn.require("policy", "the sandbox policy")
        resp = self._conn.unary(self._stub().Get, policy_pb2.GetPolicyRequest())
        return to_dict(resp.policy)

    def set(
        self,
        yaml: str | None = None,
        *,
        allow: str | None = None,
        deny: str | None = None,
        preset: str | None = None,
    ) -> dict[str, Any]:
        """Replace the policy (`yaml`) or make one change; InvalidArgument names a bad key.

        Returns the policy in force afterwards (as `get`).
        """
        given = {
            k: v
            for k, v in (
                ("yaml", yaml),
                ("allow_domain", allow),
                ("deny_domain", deny),
                ("preset", preset),
            )
            if v is not None
        }
        if len(given) != 1:
            raise ValueError("set_policy takes exactly one of yaml, allow, deny, preset")
        self._conn.require("policy", "the sandbox policy")
        req = policy_pb2.SetPolicyRequest(**given)
        return to_dict(self._conn.unary(self._stub().Set, req).policy)

    def logs(
        self, net: bool = False, tail: int = 100, follow: bool = False
    ) -> ServerStream[policy_pb2.LogEntry, str]:
        """The agent's audit log (or egress log with `net`), one JSON object string per entry.

        With `follow` the stream waits for new entries until closed or cancelled.
        """
        self._conn.require("logs", "the agent's logs")
        kind = policy_pb2.LOG_KIND_EGRESS if net else policy_pb2.LOG_KIND_AUDIT
        req = policy_pb2.LogsRequest(kind=kind, tail=tail, follow=follow)
        stub = self._stub()
        call = self._conn.call(lambda: stub.Logs(req, metadata=self._conn.metadata))
        return ServerStream(self._conn, call, _json)


def _json(entry: policy_pb2.LogEntry) -> str:
    return entry.json
