"""Typed exceptions carrying the gRPC status code and the agent's message."""

from __future__ import annotations

from typing import Any


class CoworkError(Exception):
    """Any failure talking to the agent. `code` is the gRPC status name (e.g. "NOT_FOUND")."""

    code: str = "UNKNOWN"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message


class NotFound(CoworkError):
    code = "NOT_FOUND"


class PermissionDenied(CoworkError):
    code = "PERMISSION_DENIED"


class Unauthenticated(CoworkError):
    code = "UNAUTHENTICATED"


class InvalidArgument(CoworkError):
    code = "INVALID_ARGUMENT"


class AlreadyExists(CoworkError):
    code = "ALREADY_EXISTS"


class AgentUnavailable(CoworkError):
    code = "UNAVAILABLE"


class DeadlineExceeded(CoworkError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(CoworkError):
    code = "CANCELLED"


class Unsupported(CoworkError):
    """The agent lacks what a call needs (a capability, an RPC): update the agent."""

    code = "UNIMPLEMENTED"


_BY_CODE: dict[str, type[CoworkError]] = {
    c.code: c
    for c in (
        NotFound,
        PermissionDenied,
        Unauthenticated,
        InvalidArgument,
        AlreadyExists,
        AgentUnavailable,
        DeadlineExceeded,
        Cancelled,
        Unsupported,
    )
}


def from_rpc_error(exc: Any, target: str = "") -> CoworkError:
    """Translate a grpc.RpcError (sync or aio) into the matching CoworkError."""
    code = exc.code()
    name = getattr(code, "name", str(code))
    details = exc.details() or name
    if name == "UNAVAILABLE":
        where = f" at {target}" if target else ""
        details = f"agent unavailable{where}: {details}"
    cls = _BY_CODE.get(name, CoworkError)
    return cls(details, name)
