"""One exception type that carries a gRPC status, so handlers never format statuses themselves."""

from __future__ import annotations

import grpc


class AgentError(Exception):
    """A refusal the client should see as `code` + a human message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def not_found(msg: str) -> AgentError:
    return AgentError(grpc.StatusCode.NOT_FOUND, msg)


def invalid(msg: str) -> AgentError:
    return AgentError(grpc.StatusCode.INVALID_ARGUMENT, msg)


def denied(msg: str) -> AgentError:
    return AgentError(grpc.StatusCode.PERMISSION_DENIED, msg)


def precondition(msg: str) -> AgentError:
    return AgentError(grpc.StatusCode.FAILED_PRECONDITION, msg)


def from_oserror(exc: OSError, path: str) -> AgentError:
    """Map an OSError on `path` to the status a client can act on."""
    import errno

    reason = exc.strerror or str(exc)
    table = {
        errno.ENOENT: grpc.StatusCode.NOT_FOUND,
        errno.ENOTDIR: grpc.StatusCode.FAILED_PRECONDITION,
        errno.EISDIR: grpc.StatusCode.FAILED_PRECONDITION,
        errno.ENOTEMPTY: grpc.StatusCode.FAILED_PRECONDITION,
        errno.EEXIST: grpc.StatusCode.ALREADY_EXISTS,
        errno.EACCES: grpc.StatusCode.PERMISSION_DENIED,
        errno.EPERM: grpc.StatusCode.PERMISSION_DENIED,
        errno.EROFS: grpc.StatusCode.PERMISSION_DENIED,
        errno.ENOSPC: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errno.EDQUOT: grpc.StatusCode.RESOURCE_EXHAUSTED,
        errno.ENAMETOOLONG: grpc.StatusCode.INVALID_ARGUMENT,
        errno.ELOOP: grpc.StatusCode.FAILED_PRECONDITION,
    }
    return AgentError(table.get(exc.errno or 0, grpc.StatusCode.INTERNAL), f"{reason}: {path}")
