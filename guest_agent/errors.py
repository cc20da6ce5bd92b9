"""One exception type that carries a gRPC status, so handlers never format statuses themselves."""

from __future__ import annotations

import errno

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


# errno -> the status a client can act on, and (where strerror alone would not
# say it) what the agent tells the client. Everything here can follow from what
# a client asked for (a path, a size, an argv), so none of it may be INTERNAL.
_ERRNO_STATUS: dict[int, tuple[grpc.StatusCode, str]] = {
    errno.ENOENT: (grpc.StatusCode.NOT_FOUND, ""),
    errno.ENOTDIR: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.EISDIR: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ENOTEMPTY: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.EEXIST: (grpc.StatusCode.ALREADY_EXISTS, ""),
    errno.EACCES: (grpc.StatusCode.PERMISSION_DENIED, ""),
    errno.EPERM: (grpc.StatusCode.PERMISSION_DENIED, ""),
    errno.EROFS: (grpc.StatusCode.PERMISSION_DENIED, ""),
    errno.ENOSPC: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.EDQUOT: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.ENAMETOOLONG: (grpc.StatusCode.INVALID_ARGUMENT, ""),
    errno.ELOOP: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.EINVAL: (grpc.StatusCode.INVALID_ARGUMENT, ""),
    errno.EXDEV: (
        grpc.StatusCode.FAILED_PRECONDITION,
        "source and destination are on different filesystems (copy, then remove)",
    ),
    errno.E2BIG: (
        grpc.StatusCode.INVALID_ARGUMENT,
        "argument list and environment too big for the OS",
    ),
    errno.EFBIG: (grpc.StatusCode.OUT_OF_RANGE, ""),
    errno.EOVERFLOW: (grpc.StatusCode.OUT_OF_RANGE, ""),
    errno.ERANGE: (grpc.StatusCode.OUT_OF_RANGE, ""),
    errno.EBUSY: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ETXTBSY: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.EMLINK: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.EMFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.ENFILE: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.ENOMEM: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.EAGAIN: (grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
    errno.ENOEXEC: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ENXIO: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ENODEV: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.EOPNOTSUPP: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ENOTSUP: (grpc.StatusCode.FAILED_PRECONDITION, ""),
    errno.ESPIPE: (grpc.StatusCode.FAILED_PRECONDITION, ""),
}


def from_oserror(exc: OSError, path: str) -> AgentError:
    """Map an OSError on `path` to the status a client can act on.

    Only an errno no request can provoke (EIO, EBADF, ...) stays INTERNAL.
    """
    code, reason = _ERRNO_STATUS.get(exc.errno or 0, (grpc.StatusCode.INTERNAL, ""))
    reason = reason or exc.strerror or str(exc)
    return AgentError(code, f"{reason}: {path}" if path else reason)
