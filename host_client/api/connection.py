"""Connection: one channel to one agent, its auth, its retry rule and its capabilities."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import grpc

from cowork.agent.v1 import agent_pb2, agent_pb2_grpc
from cowork.defaults import AUTH_METADATA_KEY, AUTH_SCHEME, PROTOCOL_VERSION

from .. import targets
from ..errors import Cancelled, CoworkError, Unsupported, from_rpc_error
from ..transports import ChannelHandle

M = TypeVar("M")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")


class CancelScope:
    """Lets another thread cancel the unary call a worker thread is blocked in.

    The asyncio adapter (host_client.aio) runs each blocking call on a worker
    thread inside a scope; cancelling the awaiting task cancels the scope, which
    cancels the gRPC call, so the agent stops the work (as a grpc.aio call would).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: grpc.Future[Any] | None = None
        self.cancelled = False

    def attach(self, future: grpc.Future[Any]) -> None:
        """Called by the worker: the call now in flight."""
        with self._lock:
            self._future = future
            if self.cancelled:
                future.cancel()

    def cancel(self) -> None:
        """Cancel the call in flight (and any the worker starts afterwards)."""
        with self._lock:
            self.cancelled = True
            if self._future is not None:
                self._future.cancel()


class Connection:
    """The channel to one agent (opened on first use, reopened after `close()`).

    Thread-safe: one Connection serves every thread (and the asyncio adapter's
    worker threads) at once.
    """

    def __init__(
        self, target: str | None, token_file: str | None, *, connect_timeout: float = 10.0
    ) -> None:
        self.target = targets.parse(target)
        token = targets.load_token(self.target, token_file)
        self.metadata: tuple[tuple[str, str], ...] = (
            (AUTH_METADATA_KEY, f"{AUTH_SCHEME} {token.decode()}"),
        )
        self.connect_timeout = connect_timeout
        self._handle = ChannelHandle(self.target)
        self._lock = threading.Lock()
        self._channel: grpc.Channel | None = None
        self._capabilities: frozenset[str] | None = None
        self._scope = threading.local()

    @property
    def channel(self) -> grpc.Channel:
        """The gRPC channel (created on first use)."""
        with self._lock:
            if self._channel is None:
                self._channel = self._handle.sync_channel()
            return self._channel

    @property
    def relay(self) -> Any:
        """The relay carrying this connection (vsock:/hvsock: targets), or None."""
        return self._handle.relay

    def wait_channel(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the channel to connect; True when it did."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False

    def error(self, exc: grpc.RpcError) -> CoworkError:
        """The CoworkError for a failed call (an older agent's reply named as such)."""
        details = exc.details() or ""
        if exc.code() == grpc.StatusCode.INTERNAL and "deserializing response" in details:
            return Unsupported(
                f"agent at {self.target.spec} answered in another protocol (this client "
                f"speaks {PROTOCOL_VERSION}): update the agent ('coworkctl status' shows its)"
            )
        return from_rpc_error(exc, self.target.spec)

    def call(self, fn: Callable[[], T], retry: bool = True) -> T:
        """Run `fn`; on UNAVAILABLE (the call never reached an agent) wait and retry once."""
        try:
            return fn()
        except grpc.RpcError as exc:
            unavailable = exc.code() == grpc.StatusCode.UNAVAILABLE
            if retry and unavailable and self.wait_channel(self.connect_timeout):
                try:
                    return fn()
                except grpc.RpcError as again:
                    raise self.error(again) from None
            raise self.error(exc) from None

    def unary(
        self,
        method: grpc.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        retry: bool = True,
        timeout: float | None = None,
    ) -> Resp:
        """Call a unary RPC with the auth metadata and the retry rule of `call`.

        Inside `cancellable()` the call can be cancelled from another thread.
        """
        scope: CancelScope | None = getattr(self._scope, "scope", None)
        if scope is None:
            return self.call(
                lambda: method(request, metadata=self.metadata, timeout=timeout), retry
            )

        def attached() -> Resp:
            future = method.future(request, metadata=self.metadata, timeout=timeout)
            scope.attach(future)
            try:
                return future.result()
            except grpc.FutureCancelledError:
                raise Cancelled("cancelled") from None

        return self.call(attached, retry)

    def cancellable(self, scope: CancelScope, fn: Callable[[], T]) -> T:
        """Run `fn` on this thread with its unary calls cancellable through `scope`."""
        self._scope.scope = scope
        try:
            return fn()
        finally:
            self._scope.scope = None

    # -- capabilities --------------------------------------------------------------------
    def info(self) -> agent_pb2.InfoResponse:
        """Agent.Info (and remember the capabilities it lists)."""
        stub = agent_pb2_grpc.AgentStub(self.channel)
        resp = self.unary(stub.Info, agent_pb2.InfoRequest())
        self._capabilities = frozenset(resp.capabilities)
        return resp

    def capabilities(self) -> frozenset[str]:
        """The agent's capabilities (asked once per connection, on first need)."""
        if self._capabilities is None:
            self.info()
        assert self._capabilities is not None
        return self._capabilities

    def require(self, capability: str, feature: str) -> None:
        """Raise Unsupported, in one line naming `capability`, unless the agent has it."""
        if capability not in self.capabilities():
            raise Unsupported(
                f"agent at {self.target.spec} lacks capability {capability!r} ({feature}); "
                "update the agent"
            )

    def close(self) -> None:
        """Close the channel (and its relay); the next call opens a new one."""
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = None
            self._capabilities = None
        self._handle.close()


class ServerStream(Generic[M, T]):
    """The messages of a server-streaming call, converted by `convert`.

    An iterator; `cancel()` (from any thread) ends the call, and so does leaving
    it unfinished (`close()`, or when it is collected). Errors are CoworkErrors.
    """

    def __init__(self, conn: Connection, call: Any, convert: Callable[[M], T]) -> None:
        self._conn = conn
        self._call = call
        self._convert = convert

    def __iter__(self) -> ServerStream[M, T]:
        """The stream itself."""
        return self

    def __next__(self) -> T:
        """The next message, converted."""
        try:
            msg = next(self._call)
        except grpc.RpcError as exc:
            self._call.cancel()
            raise self._conn.error(exc) from None
        return self._convert(msg)

    def cancel(self) -> None:
        """End the call (a later `next` raises Cancelled)."""
        self._call.cancel()

    def close(self) -> None:
        """End the call if it is still running."""
        self._call.cancel()
