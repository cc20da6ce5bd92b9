"""The API relay: where a Claude run's placeholder credential becomes the real one.

The CLI of a run gets `ANTHROPIC_BASE_URL=http://127.0.0.1:PORT` and a
placeholder credential (a random value, new per run). PORT is served by the
agent: inside the box's network namespace (bridged like the egress proxy's
3128, sandbox.py), or, without a box, on a private loopback port of its own.
For each request the relay

- checks that it carries the run's placeholder (`x-api-key`, or
  `Authorization: Bearer`): anything else in the box that finds the port gets
  401 from the relay, not the credential;
- asks the egress policy whether the API host may be reached (in a box; the
  call is logged in the egress log like any other, host and byte counts only);
- swaps the placeholder for the real credential (`x-api-key` for an API key,
  `Authorization: Bearer` for an OAuth token) and forwards the request over
  TLS, verified against the system's CAs (plus --api-ca-cert), to the API
  host; http:// only to a loopback address (credentials.parse_base_url);
- streams the answer back as it arrives: each read is written on at once, so
  an SSE stream is not buffered (bench/claude_latency.py measures the cost).

One request per client connection (`Connection: close` towards the CLI, a
loopback hop). Upstream, connections are kept alive and reused from a small
pool (upstream_pool.py), as a direct CLI reuses its own: a turn does not pay a
TLS handshake. A connection goes back to the pool only when the request body
was sent exactly (Content-Length; a chunked request gets `Connection: close`)
and the response was read exactly to its end (Content-Length or the last
chunk), so no byte of one answer can reach another request. A pooled
connection the API closed meanwhile is replaced: when a reused connection
ends before any byte of the answer, the request (kept when it is at most
REPLAY_LIMIT) is sent again once on a new connection.

Request and response bodies are bounded, the request head must arrive within
`header_timeout`, and the upstream may stay silent at most `idle_timeout`
(the API's own streams ping every few seconds). A wrong credential is the
API's business: its 401 goes back unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .credentials import Credential
from .egress import (
    _BAD_VALUE_CHARS,
    _REQUEST_LINE,
    _STATUS_LINE,
    CHUNK,
    DomainPolicy,
    EgressLog,
    EgressRecord,
    Resolver,
    _close,
    _describe,
    _drop_list,
    _HttpError,
    _parse_head,
    _read_head,
)
from .upstream_pool import POOL_IDLE_TIMEOUT, POOL_MAX_IDLE, PooledConnection, UpstreamPool

log = logging.getLogger("cowork.agent.relay")

REQUEST_LIMIT = 64 * 1024 * 1024  # the API takes at most 32 MB per request
RESPONSE_LIMIT = 512 * 1024 * 1024
HEADER_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 600.0  # the CLI's own API timeout
# A request body up to this size is kept until the answer starts, so that it can be sent
# again when a pooled connection turns out to be closed (larger ones are not replayed).
REPLAY_LIMIT = 8 * 1024 * 1024
PLACEHOLDER_TAIL = "cowork-relay-api-key"  # 20 characters
_CHUNK_LINE_LIMIT = 8192
# Headers never forwarded upstream: the placeholder's carriers (the real one is
# added), and what only concerns the hop to the relay.
_STRIPPED = frozenset({"x-api-key", "authorization", "host", "proxy-authorization"})

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Route:
    """One run's way to the API: its credential, its placeholder, whether it is boxed."""

    credential: Credential
    boxed: bool
    placeholder: str = ""

    def __post_init__(self) -> None:
        if not self.placeholder:
            prefix = "sk-ant-api03" if self.credential.kind == "api_key" else "sk-ant-oat01"
            # Random per run, with a fixed tail: the interactive CLI asks once whether to use
            # a "custom API key" and remembers the answer by the key's last 20 characters.
            self.placeholder = (
                f"{prefix}-cowork-placeholder-{secrets.token_hex(16)}-{PLACEHOLDER_TAIL}"
            )

    def env(self, base_url: str) -> dict[str, str]:
        """What the CLI gets instead of the credential."""
        return {self.credential.env_name: self.placeholder, "ANTHROPIC_BASE_URL": base_url}

    def carries_placeholder(self, headers: list[tuple[str, str]]) -> bool:
        want = self.placeholder.encode()
        return any(
            hmac.compare_digest(given.encode("latin-1"), want) for given in _offered(headers)
        )


def _offered(headers: list[tuple[str, str]]) -> list[str]:
    """The credentials a request offers: its x-api-key and Authorization: Bearer values."""
    out = []
    for name, value in headers:
        low = name.lower()
        if low == "authorization":
            scheme, _, given = value.partition(" ")
            if scheme.lower() == "bearer":
                out.append(given.strip())
        elif low == "x-api-key":
            out.append(value.strip())
    return out


@dataclass
class Endpoint:
    """A run's registration on a shared relay listener: the agent's loopback one (runs
    without a box; `port`), or a named box's (`port` 0: 127.0.0.1:3129 in the box). The
    placeholder picks the run, looked up only in the listener's own `registry`.
    close() ends the run's connections."""

    relay: ApiRelay
    route: Route
    port: int
    registry: dict[str, Endpoint]
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.registry.pop(self.route.placeholder, None)
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()


class _Refused(Exception):
    """An answer the relay gives itself, as the API would: status + JSON error body."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


class _Stale(Exception):
    """The upstream connection ended before any byte of the answer."""


class _ChunkedEnd:
    """Finds where a chunked body ends, without changing a byte of it (the relay forwards
    the encoding as is; it only needs to know when the message is over)."""

    def __init__(self) -> None:
        self.state = "size"  # size | data | crlf | trailer
        self.line = bytearray()
        self.left = 0
        self.done = False

    def feed(self, data: bytes) -> int:
        """How many bytes of `data` belong to the body (all of them until its end)."""
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - i)
                i += take
                self.left -= take
                if self.left == 0:
                    self.state = "crlf"
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self.line += data[i:]
                if len(self.line) > _CHUNK_LINE_LIMIT:
                    raise _HttpError(502, "a chunk line is too long")
                return n
            self.line += data[i:j]
            i = j + 1
            line = bytes(self.line).rstrip(b"\r")
            self.line.clear()
            if self.state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 16 or size.strip(b"0123456789abcdefABCDEF"):
                    raise _HttpError(502, "bad chunk size")
                self.left = int(size, 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "crlf":
                if line:
                    raise _HttpError(502, "a chunk does not end with CRLF")
                self.state = "size"
            elif not line:  # the empty line after the (optional) trailer section
                self.done = True
        return i


@dataclass
class _Body:
    """A request body on its way up: `length` bytes (None: chunked, up to the client's EOF);
    the bytes read so far are kept while they fit in REPLAY_LIMIT."""

    reader: asyncio.StreamReader
    length: int | None
    pending: bytes
    got: int = 0
    kept: bytearray | None = None

    def __post_init__(self) -> None:
        if self.length is not None:
            self.pending = self.pending[: self.length]
        self.got = len(self.pending)
        if self.length is not None and self.length <= REPLAY_LIMIT:
            self.kept = bytearray(self.pending)

    @property
    def replayable(self) -> bool:
        return self.kept is not None

    @property
    def complete(self) -> bool:
        return self.length is not None and self.got >= self.length

    def start(self) -> bytes:
        """What an attempt sends first: every byte so far (kept), else the leftover once."""
        if self.kept is not None:
            return bytes(self.kept)
        out, self.pending = self.pending, b""
        return out


def _error(status: int, kind: str, message: str) -> bytes:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {_PHRASES.get(status, 'Error')}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_PHRASES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    504: "Gateway Timeout",
}


class ApiRelay:
    """Serves runs' relay connections; one instance per agent.

    `policy` is the egress policy (asked per request, for boxed runs);
    `resolve` maps an allowed host to the address dialled (the egress proxy's:
    public addresses only, plus --egress-resolve overrides) for boxed runs;
    unboxed runs dial `overrides` or the name itself.
    """

    def __init__(
        self,
        policy: Callable[[], DomainPolicy],
        egress_log: EgressLog,
        resolve: Resolver | None = None,
        overrides: dict[str, str] | None = None,
        ca_file: str | None = None,
        *,
        header_timeout: float = HEADER_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
        request_limit: int = REQUEST_LIMIT,
        response_limit: int = RESPONSE_LIMIT,
        pool_max_idle: int = POOL_MAX_IDLE,
        pool_idle_timeout: float = POOL_IDLE_TIMEOUT,
    ) -> None:
        self._policy = policy
        self._log = egress_log
        self._resolve = resolve
        self._overrides = {k.lower().rstrip("."): v for k, v in (overrides or {}).items()}
        self._tls = ssl.create_default_context()
        if ca_file:
            self._tls.load_verify_locations(cafile=ca_file)
        self.header_timeout = header_timeout
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.request_limit = request_limit
        self.response_limit = response_limit
        self.active = 0
        # Idle upstream connections, per (scheme, host, port, boxed): keep-alive for turns.
        self.pool = UpstreamPool(pool_max_idle, pool_idle_timeout)
        # The loopback listener for runs without a box (one per agent, started on first
        # use) and the runs registered on it, by placeholder.
        self._loopback: asyncio.Server | None = None
        self._loopback_lock = asyncio.Lock()
        self._endpoints: dict[str, Endpoint] = {}

    def handler(self, route: Route) -> Handler:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.handle(route, reader, writer)

        return serve

    async def serve_loopback(self, route: Route) -> Endpoint:
        """Register `route` (a run without a box) on the agent's loopback relay, a free port on
        127.0.0.1 shared by such runs: a request's placeholder says whose it is."""
        async with self._loopback_lock:
            if self._loopback is None:
                self._loopback = await asyncio.start_server(
                    self._serve_loopback, "127.0.0.1", 0, limit=CHUNK, backlog=64
                )
        port = int(self._loopback.sockets[0].getsockname()[1])
        endpoint = Endpoint(self, route, port, self._endpoints)
        self._endpoints[route.placeholder] = endpoint
        return endpoint

    def register(self, route: Route, registry: dict[str, Endpoint]) -> Endpoint:
        """Register `route` (a run in a named box) on the box's relay listener (`registry`
        is the box's: a placeholder of another box or of a run without one finds nothing)."""
        endpoint = Endpoint(self, route, 0, registry)
        registry[route.placeholder] = endpoint
        return endpoint

    def shared_handler(self, registry: dict[str, Endpoint]) -> Handler:
        """What serves a named box's relay listener: each request's placeholder picks its run."""

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self.handle(None, reader, writer, registry)

        return serve

    async def _serve_loopback(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await self.handle(None, reader, writer)

    def _lookup(
        self, headers: list[tuple[str, str]], registry: dict[str, Endpoint]
    ) -> Route | None:
        """The registered run whose placeholder the request carries; its task joins the run's."""
        for given in _offered(headers):
            endpoint = registry.get(given)
            if endpoint is not None:
                task = asyncio.current_task()
                if task is not None:
                    endpoint.tasks.add(task)
                    task.add_done_callback(endpoint.tasks.discard)
                return endpoint.route
        return None

    async def aclose(self) -> None:
        """Agent shutdown: stop the loopback listener and every run's connections."""
        for endpoint in list(self._endpoints.values()):
            endpoint.close()
        if self._loopback is not None:
            self._loopback.close()
            self._loopback = None
        await self.pool.aclose()

    # -- one connection -----------------------------------------------------------
    async def handle(
        self,
        route: Route | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        registry: dict[str, Endpoint] | None = None,
    ) -> None:
        """Serve one connection: `route` is the box's run, or None on a shared listener (the
        request's placeholder finds the run in `registry`, by default the loopback one's)."""
        rec = EgressRecord(ts=time.time(), host="", port=0, method="", allowed=False, reason="")
        started = False
        t0 = time.monotonic()
        self.active += 1
        try:
            try:
                got = await asyncio.wait_for(_read_head(reader), self.header_timeout)
            except asyncio.TimeoutError:
                return
            except _HttpError as e:
                raise _Refused(e.status, "invalid_request_error", e.message) from None
            if got is None:
                return
            started = True
            head, leftover = got
            try:
                first, headers = _parse_head(head)
            except _HttpError as e:
                raise _Refused(e.status, "invalid_request_error", e.message) from None
            m = _REQUEST_LINE.fullmatch(first)
            if m is None or not m[2].startswith("/"):
                raise _Refused(400, "invalid_request_error", "cowork api relay: bad request line")
            method, target = m[1], m[2]
            rec.method = method
            if route is None:
                route = self._lookup(headers, self._endpoints if registry is None else registry)
            if route is None or not route.carries_placeholder(headers):
                rec.reason = "api relay: no placeholder credential"
                raise _Refused(
                    401,
                    "authentication_error",
                    "cowork api relay: this request does not carry the run's placeholder "
                    "credential",
                )
            up = route.credential.upstream
            rec.host, rec.port = up.host, up.port
            length = self._body_length(headers)
            chunked = any(n.lower() == "transfer-encoding" for n, _ in headers)
            if route.boxed:
                rec.allowed, rec.reason = self._decide(up.host)
                if not rec.allowed:
                    raise _Refused(
                        403,
                        "permission_error",
                        f"cowork egress policy: {up.host} is not allowed ({rec.reason})",
                    )
                rec.reason += " (api relay)"
            else:
                rec.allowed, rec.reason = True, "no sandbox: not policed (api relay)"
            # Kept alive upstream unless the body's end is only known from the client's EOF.
            keep_alive = not chunked and self.pool.max_idle > 0
            drop = _drop_list(headers) | _STRIPPED
            cred = route.credential
            lines = [f"{method} {up.prefix}{target} HTTP/1.1", f"Host: {up.authority}"]
            lines += [f"{n}: {v}" for n, v in headers if n.lower() not in drop]
            lines += [
                f"{cred.header}: {cred.header_value()}",
                "Connection: keep-alive" if keep_alive else "Connection: close",
            ]
            request_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            body = _Body(reader, None if chunked else (length or 0), leftover)
            await self._forward(route, method, request_head, body, writer, rec, keep_alive)
        except _Refused as r:
            rec.status = r.status
            rec.error = rec.error or r.message
            with contextlib.suppress(OSError):
                writer.write(_error(r.status, r.kind, r.message))
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError) as exc:
            rec.error = rec.error or _describe(exc)
        except asyncio.CancelledError:
            # The run ended (its listener closed) or the agent stops; this is the top
            # of a connection task nothing awaits (see EgressProxy.handle).
            rec.error = rec.error or "cancelled"
        except Exception as exc:
            log.warning("api relay connection failed: %s", _describe(exc))
            rec.error = rec.error or _describe(exc)
        finally:
            self.active -= 1
            try:
                await _close(writer)
            finally:
                if started:
                    rec.duration_ms = round((time.monotonic() - t0) * 1000, 3)
                    self._log.add(rec)

    def _body_length(self, headers: list[tuple[str, str]]) -> int | None:
        """The request body's Content-Length (None when chunked); 413 over the limit (a
        chunked body is counted as it is relayed)."""
        lengths = [v for n, v in headers if n.lower() == "content-length"]
        chunked = any(n.lower() == "transfer-encoding" for n, _ in headers)
        if lengths and chunked:
            raise _Refused(400, "invalid_request_error", "both Content-Length and chunked")
        if not lengths:
            return None
        if len(set(lengths)) != 1 or not lengths[0].isdigit():
            raise _Refused(400, "invalid_request_error", "bad Content-Length")
        n = int(lengths[0])
        if n > self.request_limit:
            raise _Refused(
                413,
                "request_too_large",
                f"cowork api relay: the request is larger than {self.request_limit} bytes",
            )
        return n

    def _decide(self, host: str) -> tuple[bool, str]:
        try:
            return self._policy().decide(host)
        except Exception as exc:  # fail closed, as the egress proxy does
            log.exception("egress policy failed; denying %s", host)
            return False, f"policy error ({type(exc).__name__}); denied"

    async def _dial(self, route: Route) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        up = route.credential.upstream

        async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            if route.boxed and self._resolve is not None:
                addr, port = await self._resolve(up.host, up.port)
            else:
                addr, port = self._overrides.get(up.host, up.host), up.port
            if not up.tls:
                return await asyncio.open_connection(addr, port, limit=CHUNK)
            return await asyncio.open_connection(
                addr, port, limit=CHUNK, ssl=self._tls, server_hostname=up.host
            )

        try:
            reader, writer = await asyncio.wait_for(dial(), self.connect_timeout)
        except PermissionError as exc:  # the resolver refused the address
            raise _Refused(403, "permission_error", f"cowork egress policy: {exc}") from None
        except asyncio.TimeoutError:
            raise _Refused(
                504,
                "api_error",
                f"cowork api relay: connecting to {up.authority} timed out after "
                f"{self.connect_timeout:g}s",
            ) from None
        except ssl.SSLError as exc:
            raise _Refused(
                502, "api_error", f"cowork api relay: TLS with {up.authority} failed: {exc}"
            ) from None
        except OSError as exc:
            raise _Refused(
                502, "api_error", f"cowork api relay: cannot connect to {up.authority}: {exc}"
            ) from None
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def _forward(
        self,
        route: Route,
        method: str,
        request_head: bytes,
        body: _Body,
        writer: asyncio.StreamWriter,
        rec: EgressRecord,
        keep_alive: bool,
    ) -> None:
        """Send the request on a pooled or new upstream connection and relay the answer; the
        connection goes back to the pool only when both messages ended exactly."""
        up = route.credential.upstream
        key = (up.scheme, up.host, up.port, route.boxed)
        for attempt in (1, 2):
            conn = await self.pool.take(key) if keep_alive and attempt == 1 else None
            if conn is None:
                origin_r, origin_w = await self._dial(route)
                self.pool.dialled += 1
                conn = PooledConnection(key, origin_r, origin_w)
            reusable = False
            try:
                reusable = await self._exchange(writer, conn, request_head, body, rec, method)
                return
            except _Stale:
                if conn.reused and body.replayable:
                    continue  # the API closed the idle connection: once more, on a new one
                raise _Refused(
                    502,
                    "api_error",
                    "cowork api relay: the API closed the connection before answering",
                ) from None
            finally:
                if reusable and keep_alive:
                    self.pool.put(conn)
                else:
                    self.pool.release(conn)

    async def _exchange(
        self,
        writer: asyncio.StreamWriter,
        conn: PooledConnection,
        request_head: bytes,
        body: _Body,
        rec: EgressRecord,
        method: str,
    ) -> bool:
        """One attempt: the request up, the answer down. True when the upstream connection
        may be reused (the whole body sent, the answer read exactly to its end)."""
        origin_w = conn.writer

        async def up() -> None:
            first = request_head + body.start()
            origin_w.write(first)
            rec.bytes_up += len(first)
            await origin_w.drain()
            while not body.complete:
                want = CHUNK if body.length is None else min(CHUNK, body.length - body.got)
                data = await body.reader.read(want)
                if not data:
                    break
                body.got += len(data)
                rec.bytes_up += len(data)
                if body.got > self.request_limit:
                    raise _Refused(
                        413,
                        "request_too_large",
                        f"cowork api relay: the request is larger than {self.request_limit} bytes",
                    )
                if body.kept is not None:
                    body.kept += data
                origin_w.write(data)
                await origin_w.drain()

        up_t = asyncio.ensure_future(up())
        down_t = asyncio.ensure_future(self._response(conn.reader, writer, rec, method))
        try:
            done, _ = await asyncio.wait({up_t, down_t}, return_when=asyncio.FIRST_COMPLETED)
            if down_t not in done:
                exc = up_t.exception()
                if isinstance(exc, _Refused):
                    raise exc
                # The upstream stopped reading (it may answer before taking the whole
                # body), or the client half-closed: the answer still comes back.
            clean = await down_t
            sent = up_t.done() and not up_t.cancelled() and up_t.exception() is None
            return clean and sent and body.complete
        finally:
            for t in (up_t, down_t):
                t.cancel()
            await asyncio.gather(up_t, down_t, return_exceptions=True)

    async def _read(self, origin: asyncio.StreamReader, n: int = CHUNK) -> bytes:
        return await asyncio.wait_for(origin.read(n), self.idle_timeout)

    async def _head(self, origin: asyncio.StreamReader, prefix: bytes) -> tuple[bytes, bytes]:
        """The next response head from the upstream; _Stale when it ended before any byte."""
        try:
            got = await asyncio.wait_for(_read_head(origin, prefix), self.idle_timeout)
        except asyncio.TimeoutError:
            raise _Refused(
                504, "api_error", f"cowork api relay: no answer within {self.idle_timeout:g}s"
            ) from None
        except _HttpError as e:
            raise _Refused(
                502, "api_error", f"cowork api relay: bad response from the API: {e.message}"
            ) from None
        except (ConnectionResetError, BrokenPipeError):
            if prefix:
                raise
            raise _Stale() from None
        if got is None:
            raise _Stale()
        return got

    def _client_head(self, status: str, reason: str, headers: list[tuple[str, str]]) -> bytes:
        drop = _drop_list(headers)
        lines = [f"HTTP/1.1 {status} {reason}".rstrip()]
        lines += [
            f"{n}: {v}"
            for n, v in headers
            if n.lower() not in drop and not _BAD_VALUE_CHARS.search(v)
        ]
        lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def _response(
        self,
        origin: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: EgressRecord,
        method: str,
    ) -> bool:
        """The upstream's answer: its head filtered, then the body as it arrives, up to the
        end its framing gives. True when it ended exactly there and the upstream keeps the
        connection open (it may be reused)."""
        rest = b""
        while True:
            head, rest = await self._head(origin, rest)
            try:
                first, headers = _parse_head(head)
            except _HttpError as e:
                raise _Refused(
                    502, "api_error", f"cowork api relay: bad response from the API: {e.message}"
                ) from None
            m = _STATUS_LINE.fullmatch(first)
            if m is None:
                raise _Refused(502, "api_error", "cowork api relay: bad status line from the API")
            status = int(m[2])
            if not (100 <= status < 200 and status != 101):
                break
            interim = self._client_head(m[2], m[3] or "", headers)  # e.g. 100 Continue
            writer.write(interim)
            rec.bytes_down += len(interim)
        rec.status = status
        tokens = {
            t.strip().lower() for n, v in headers if n.lower() == "connection" for t in v.split(",")
        }
        keep = m[1] == "1.1" and "close" not in tokens and status != 101
        encodings = [
            t.strip().lower()
            for n, v in headers
            if n.lower() == "transfer-encoding"
            for t in v.split(",")
        ]
        lengths = {v.strip() for n, v in headers if n.lower() == "content-length"}
        remaining: int | None = None  # bytes of a Content-Length body still to come
        chunks: _ChunkedEnd | None = None
        if method == "HEAD" or status in (204, 304):
            remaining = 0
        elif encodings:
            if encodings[-1] == "chunked":
                chunks = _ChunkedEnd()
            else:
                keep = False  # ends with the connection
        elif lengths:
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise _Refused(
                    502, "api_error", "cowork api relay: bad Content-Length from the API"
                )
            remaining = int(next(iter(lengths)))
        else:
            keep = False  # ends with the connection
        out = self._client_head(m[2], m[3] or "", headers)
        extra = False

        def body_part(data: bytes) -> bytes:
            """The part of `data` that is this answer's body (flags bytes beyond its end)."""
            nonlocal remaining, extra
            if chunks is not None:
                try:
                    n = chunks.feed(data)
                except _HttpError as e:  # forwarded as it came; the connection is not reused
                    rec.error = f"bad response from the API: {e.message}"
                    extra = True
                    return data
            elif remaining is not None:
                n = min(remaining, len(data))
                remaining -= n
            else:
                n = len(data)
            if n < len(data):
                extra = True
            return data[:n]

        def ended() -> bool:
            return chunks.done if chunks is not None else remaining == 0

        first_part = body_part(rest)
        writer.write(out + first_part)
        rec.bytes_down += len(out) + len(first_part)
        await writer.drain()
        while not ended() and not extra:
            want = CHUNK if remaining is None else min(CHUNK, remaining)
            data = await self._read(origin, want)
            if not data:
                keep = False  # cut short (or close-delimited): the connection is over
                break
            part = body_part(data)
            rec.bytes_down += len(part)
            if rec.bytes_down > self.response_limit:
                rec.error = f"the response passed {self.response_limit} bytes: cut"
                return False
            writer.write(part)
            await writer.drain()
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()
        return keep and ended() and not extra
