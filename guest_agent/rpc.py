"""The one wrapper every RPC passes through: authentication, error mapping and the audit line.

Doing this in a server interceptor (rather than in each servicer) means a new
RPC cannot forget to check the token, and every call leaves exactly one audit
record whatever way it ends.
"""

from __future__ import annotations

import contextvars
import hmac
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
import grpc.aio

from cowork.defaults import (
    AUDIT_RECORD_CHARS,
    AUDIT_VALUE_CHARS,
    AUTH_METADATA_KEY,
    AUTH_SCHEME,
    STATUS_MESSAGE_CHARS,
)

from .errors import AgentError, from_oserror, invalid

log = logging.getLogger("cowork.audit")

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

# Methods reachable without a token: only the standard health check, so that
# a readiness probe needs no secret.
OPEN_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.health.v1.Health/List",
    }
)

_audit: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "cowork_audit", default=None
)


def audit(**fields: Any) -> None:
    """Attach fields (argv, path, exit, bytes, ...) to the current RPC's audit line.

    Values are cut to their audit size here, not when the line is written: the
    record lives in the call's context, and asyncio keeps a context alive as
    long as any timer the call scheduled (cancelled ones included) sits in the
    loop's queue, so a raw 1 MB argv would stay pinned after the call.
    """
    record = _audit.get()
    if record is None:
        return
    for key, value in fields.items():
        short, cut = _bounded(value, AUDIT_RECORD_CHARS)
        record[key] = short
        if cut:
            record.setdefault("truncated", []).append(key)


def add_bytes(key: str, n: int) -> None:
    """Accumulate a byte counter on the current RPC's audit line."""
    record = _audit.get()
    if record is not None:
        record[key] = record.get(key, 0) + n


async def first_message(it: AsyncIterator[Any]) -> Any:
    """The first message of a client stream, or None if the client sent nothing."""
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


def _token_ok(metadata: Any, token: bytes) -> bool:
    for key, value in metadata or ():
        if key == AUTH_METADATA_KEY:
            given = value.encode() if isinstance(value, str) else bytes(value)
            expected = f"{AUTH_SCHEME} ".encode() + token
            return hmac.compare_digest(given, expected)
    return False


class AgentInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Checks the bearer token, maps AgentError to a status, logs one line per RPC."""

    def __init__(self, token: bytes) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        # grpc returns None for an unknown method (the stubs do not say so).
        handler: Handler | None = await continuation(details)
        if handler is None:
            return handler  # type: ignore[return-value]
        method: str = details.method
        authed = method in OPEN_METHODS or _token_ok(details.invocation_metadata, self._token)
        return _wrap(handler, method, authed)


def _start(method: str, context: Context) -> tuple[dict[str, Any], Any]:
    record: dict[str, Any] = {"method": method, "peer": context.peer()}
    return record, _audit.set(record)


def cut_text(text: str, limit: int) -> str:
    """`text`, or its head with a marker that says how much was cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…[cut {len(text) - limit} chars]"


def _bounded(value: Any, budget: int) -> tuple[Any, bool]:
    """A copy of an audit value that fits in `budget` chars, and whether anything was cut.

    Strings keep their head; lists keep their first items (each cut) and end with
    a marker naming how many were left out. Other values are small by nature.
    """
    if isinstance(value, (bytes, bytearray)):
        value = value.decode("utf-8", "replace")
    if isinstance(value, str):
        limit = min(AUDIT_VALUE_CHARS, budget)
        return cut_text(value, limit), len(value) > limit
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        cut = False
        for i, item in enumerate(value):
            if budget <= 0:
                out.append(f"…[cut {len(value) - i} more items]")
                return out, True
            short, item_cut = _bounded(item, budget)
            cut = cut or item_cut
            budget -= len(short) if isinstance(short, str) else 16
            out.append(short)
        return out, cut
    return value, False


def bound_record(record: dict[str, Any]) -> dict[str, Any]:
    """The audit record with every value bounded; `truncated` names the fields that were cut."""
    budget = AUDIT_RECORD_CHARS
    out: dict[str, Any] = {}
    cut_fields: list[str] = list(record.get("truncated", ()))
    for key, value in record.items():
        if key == "truncated":
            continue
        short, cut = _bounded(value, max(budget, 64))
        budget -= len(str(short))
        if cut and key not in cut_fields:
            cut_fields.append(key)
        out[key] = short
    if cut_fields:
        out["truncated"] = cut_fields
    return out


def _restore(tok: contextvars.Token[dict[str, Any] | None]) -> None:
    """Undo _start's set. A stream the client abandoned is closed by asyncio's async
    generator finalizer in another Context, where the token cannot be used: there is
    nothing to restore there."""
    try:
        _audit.reset(tok)
    except ValueError:
        pass


def _finish(record: dict[str, Any], t0: float, code: grpc.StatusCode, msg: str = "") -> None:
    if record["method"] in OPEN_METHODS:
        return
    record["code"] = code.name
    if msg:
        record["message"] = msg
    record["duration_ms"] = round((time.perf_counter() - t0) * 1000, 3)
    log.info("rpc", extra={"audit": bound_record(record)})


async def _refuse(context: Context, record: dict[str, Any], t0: float) -> None:
    msg = "missing or invalid token (expected metadata 'authorization: Bearer <token>')"
    _finish(record, t0, grpc.StatusCode.UNAUTHENTICATED, msg)
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, msg)


# Exceptions that, escaping a handler, can only have come from what the client sent
# (a number the OS cannot take, a value Python refuses, a document nested too deeply).
# A handler should have refused such input itself with a precise message: the
# traceback is still logged so the missing check gets found, but the client gets
# the status its input deserves instead of INTERNAL.
_INPUT_ERRORS: tuple[tuple[type[BaseException], grpc.StatusCode, str], ...] = (
    (OverflowError, grpc.StatusCode.OUT_OF_RANGE, "a number in the request is out of range"),
    (RecursionError, grpc.StatusCode.INVALID_ARGUMENT, "the request is nested too deeply"),
    (UnicodeError, grpc.StatusCode.INVALID_ARGUMENT, "the request has text that is not valid"),
    (
        MemoryError,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "the request needs more memory than the agent has",
    ),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT, "the request has a value the agent cannot use"),
)


def status_of(exc: BaseException) -> AgentError | None:
    """The status an unexpected exception maps to when input alone can cause it, else None."""
    if isinstance(exc, OSError) and exc.errno is not None:
        err = from_oserror(exc, exc.filename if isinstance(exc.filename, str) else "")
        return None if err.code == grpc.StatusCode.INTERNAL else err
    for kind, code, text in _INPUT_ERRORS:
        if isinstance(exc, kind):
            return AgentError(code, f"{text} ({type(exc).__name__})")
    return None


async def _fail(context: Context, record: dict[str, Any], t0: float, exc: BaseException) -> None:
    if isinstance(exc, AgentError):
        message = cut_text(exc.message, STATUS_MESSAGE_CHARS)
        _finish(record, t0, exc.code, message)
        await context.abort(exc.code, message)
    if type(exc) is NotImplementedError:  # a generated servicer base: a method not written
        message = f"{record['method']} is not implemented by this agent"
        _finish(record, t0, grpc.StatusCode.UNIMPLEMENTED, message)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)
    log.exception("unexpected error in %s", record["method"])
    mapped = status_of(exc)
    if mapped is not None:
        _finish(record, t0, mapped.code, mapped.message)
        await context.abort(mapped.code, mapped.message)
    detail = cut_text(repr(exc), STATUS_MESSAGE_CHARS)
    _finish(record, t0, grpc.StatusCode.INTERNAL, detail)
    await context.abort(grpc.StatusCode.INTERNAL, f"agent error: {detail}")


def _code_of(context: Context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


class _Malformed:
    """Stands in for a request message whose bytes did not parse (bad wire format, bad UTF-8).

    grpc's own handling of a failing deserializer is an UNKNOWN status and a logged
    traceback; this placeholder lets the handler wrapper answer INVALID_ARGUMENT instead.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> AgentError:
        return invalid(f"malformed request message: {self.reason}")


def _lenient(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    parse = deserializer

    def lenient(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as exc:
            return _Malformed(str(exc))

    return lenient


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    """A client stream whose malformed messages end the call with INVALID_ARGUMENT."""
    async for request in requests:
        if isinstance(request, _Malformed):
            raise request.error()
        yield request


class _Call:
    """One RPC's frame around its handler: the token check, the audit record, the status.

    Every handler shape (unary, a generator that yields, a coroutine that writes)
    runs its body inside `async with _Call(...)`, so each call gets exactly one
    audit line and one mapping of errors to a status, whichever way it ends.
    """

    def __init__(self, method: str, context: Context, authed: bool) -> None:
        self.method = method
        self.context = context
        self.authed = authed

    async def __aenter__(self) -> _Call:
        self.t0 = time.perf_counter()
        self.record, self.tok = _start(self.method, self.context)
        if not self.authed:
            try:
                await _refuse(self.context, self.record, self.t0)
            finally:
                _restore(self.tok)
        return self

    async def __aexit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        try:
            if exc is None or isinstance(exc, grpc.aio.AbortError):
                status = _code_of(self.context)
            elif not isinstance(exc, Exception):  # CancelledError: the client went away
                status = grpc.StatusCode.CANCELLED
            else:
                await _fail(self.context, self.record, self.t0, exc)  # aborts: raises
                return False
            if "code" not in self.record:
                _finish(self.record, self.t0, status)
            return False
        finally:
            _restore(self.tok)


def _wrap(handler: Handler, method: str, authed: bool) -> Handler:
    """Return a handler of the same shape whose behavior runs inside auth/audit/error handling."""
    streams_in = handler.stream_unary is not None or handler.stream_stream is not None

    def checked(request: Any) -> Any:
        if streams_in:
            return _checked(request)
        if isinstance(request, _Malformed):
            raise request.error()
        return request

    deserializer = _lenient(handler.request_deserializer)
    if handler.unary_unary or handler.stream_unary:
        inner_u: Any = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Context) -> Any:
            async with _Call(method, context, authed):
                return await inner_u(checked(request), context)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_s: Any = handler.unary_stream or handler.stream_stream
    factory_s = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )

    if not inspect.isasyncgenfunction(inner_s):
        # A handler that sends with `await context.write(...)` and returns (the
        # standard Health.Watch does): it must stay a coroutine, since grpc
        # refuses to mix write() with yield in one call.
        async def writing(request: Any, context: Context) -> None:
            async with _Call(method, context, authed):
                await inner_s(checked(request), context)

        return factory_s(
            writing,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        async with _Call(method, context, authed):
            async for item in inner_s(checked(request), context):
                yield item

    return factory_s(
        streaming,
        request_deserializer=deserializer,
        response_serializer=handler.response_serializer,
    )
