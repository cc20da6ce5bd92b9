"""vm.auth: the Claude API credential the agent holds for runs (the Auth service).

The agent keeps it in memory only and adds it to runs' API calls on the way
out (its API relay): no run, box or file ever holds it. A restarted agent has
forgotten it (`status()["held"]` is False and `agent_started_at` says when).
"""

from __future__ import annotations

from typing import Any

from cowork.agent.v1 import auth_pb2, auth_pb2_grpc

from ..protodict import to_dict
from .connection import Connection

KINDS = {
    "api_key": auth_pb2.CREDENTIAL_KIND_API_KEY,
    "oauth_token": auth_pb2.CREDENTIAL_KIND_OAUTH_TOKEN,
}


class Auth:
    """`set`, `status` and `clear` the credential held for the VM (scope "vm")."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def _stub(self) -> auth_pb2_grpc.AuthStub:
        return auth_pb2_grpc.AuthStub(self._conn.channel)

    def set(self, kind: str, secret: str, base_url: str = "") -> dict[str, Any]:
        """Hold `secret` (`kind` api_key or oauth_token) in the agent; returns the status."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
        self._conn.require("auth", "a credential held by the agent")
        req = auth_pb2.SetCredentialRequest(kind=KINDS[kind], secret=secret, base_url=base_url)
        return to_dict(self._conn.unary(self._stub().Set, req, retry=False))

    def status(self) -> dict[str, Any]:
        """held, kind, header, base_url, set_at, agent_started_at, where, fingerprint."""
        self._conn.require("auth", "a credential held by the agent")
        req = auth_pb2.CredentialStatusRequest()
        return to_dict(self._conn.unary(self._stub().Status, req))

    def clear(self) -> dict[str, Any]:
        """Forget the held credential (not an error when none is held)."""
        self._conn.require("auth", "a credential held by the agent")
        req = auth_pb2.ClearCredentialRequest()
        return to_dict(self._conn.unary(self._stub().Clear, req))
