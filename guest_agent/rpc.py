"""The one wrapper every RPC passes through: authentication, error mapping and the audit line.

Doing this in a server interceptor (rather than in each servicer) means a new
RPC cannot forget to check the token, and every call leaves exactly one audit
record whatever way it ends.
"""

from __future__ import annotations

import contextvars
import hmac
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

from .errors import AgentError

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
    """Attach fields (argv, path, exit, bytes, ...) to the current RPC's audit line."""
    record = _audit.get()
    if record is not None:
        record.update(fields)


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
    cut_fields: list[str] = []
    for key, value in record.items():
        short, cut = _bounded(value, max(budget, 64))
        budget -= len(str(short))
        if cut:
            cut_fields.append(key)
        out[key] = short
    if cut_fields:
        out["truncated"] = cut_fields
    return out


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


async def _fail(context: Context, record: dict[str, Any], t0: float, exc: BaseException) -> None:
    if isinstance(exc, AgentError):
        message = cut_text(exc.message, STATUS_MESSAGE_CHARS)
        _finish(record, t0, exc.code, message)
        await context.abort(exc.code, message)
    log.exception("unexpected error in %s", record["method"])
    detail = cut_text(repr(exc), STATUS_MESSAGE_CHARS)
    _finish(record, t0, grpc.StatusCode.INTERNAL, detail)
    await context.abort(grpc.StatusCode.INTERNAL, f"agent error: {detail}")


def _code_of(context: Context) -> grpc.StatusCode:
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _wrap(handler: Handler, method: str, authed: bool) -> Handler:
    """Return a handler of the same shape whose behavior runs inside auth/audit/error handling."""
    if handler.unary_unary or handler.stream_unary:
        inner_u: Any = handler.unary_unary or handler.stream_unary

        async def unary(request: Any, context: Context) -> Any:
            t0 = time.perf_counter()
            record, tok = _start(method, context)
            try:
                if not authed:
                    await _refuse(context, record, t0)
                try:
                    response = await inner_u(request, context)
                except (AgentError, Exception) as exc:
                    if isinstance(exc, grpc.aio.AbortError):
                        raise
                    await _fail(context, record, t0, exc)
                _finish(record, t0, _code_of(context))
                return response
            finally:
                _audit.reset(tok)

        factory = (
            grpc.unary_unary_rpc_method_handler
            if handler.unary_unary
            else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    inner_s: Any = handler.unary_stream or handler.stream_stream

    async def streaming(request: Any, context: Context) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        record, tok = _start(method, context)
        status = grpc.StatusCode.OK
        try:
            if not authed:
                await _refuse(context, record, t0)
            try:
                async for item in inner_s(request, context):
                    yield item
            except grpc.aio.AbortError:
                raise
            except BaseException as exc:
                if not isinstance(exc, Exception):  # CancelledError: client went away
                    status = grpc.StatusCode.CANCELLED
                    raise
                await _fail(context, record, t0, exc)
            status = _code_of(context)
        finally:
            if "code" not in record:
                _finish(record, t0, status)
            _audit.reset(tok)

    factory_s = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream
        else grpc.stream_stream_rpc_method_handler
    )
    return factory_s(
        streaming,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
