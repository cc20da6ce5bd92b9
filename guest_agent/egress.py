"""The sandbox's egress proxy: the only way out of the box, behind a domain policy.

Sandboxed processes run in a network namespace that has only loopback; the
agent bridges a listener inside it (localhost:3128, announced through
HTTP_PROXY/HTTPS_PROXY) to this proxy, which runs outside the box. So every
outbound connection is an explicit request that names a host, and the proxy
decides by that name:

- ``CONNECT host:port`` (HTTPS and anything else tunnelled) is checked, dialled
  and then relayed byte for byte, half-close aware; the proxy never sees inside
  TLS, so the policy is by host name only.
- Plain HTTP in absolute form (``GET http://host/path``) is checked, rewritten
  to origin form with hop-by-hop headers dropped, and relayed: one request per
  client connection, ``Connection: close`` both ways, so there is no keep-alive
  state to get wrong. The ``Host`` header is replaced by the URL's authority so
  that what reaches the origin is the host that the policy allowed.
- Anything else (origin-form requests, junk) is refused with a 4xx.

Every attempt, allowed or not, ends as exactly one :class:`EgressRecord` in an
:class:`EgressLog` (ring + optional JSON-lines file + live followers). Records
carry host, port, method, decision, byte counts and timings, never paths,
headers or bodies: those can hold credentials (Authorization, x-api-key,
tokens in query strings).

Memory stays bounded per connection: header sections are capped (64 KiB) and
bodies are relayed in 64 KiB reads with ``drain()`` back-pressure, never
buffered whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import http
import ipaddress
import json
import logging
import os
import re
import socket
import stat
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from cowork.defaults import LOG_FILE_MAX_BYTES

log = logging.getLogger("cowork.agent.egress")

CHUNK = 64 * 1024  # bytes per read when relaying
HEADER_LIMIT = 64 * 1024  # largest request/response header section accepted
LOG_CAPACITY = 1000  # records kept in memory
SUBSCRIBER_QUEUE = 1000  # records a slow follower may lag behind before the oldest drop
# After an error answer: how long / how much of the client's unread request we
# swallow before closing, so the close does not turn into a RST that destroys
# the answer before the client has read it.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1 << 20
CLOSE_TIMEOUT = 5.0

Resolver = Callable[[str, int], Awaitable[tuple[str, int]]]


# -- domain policy -------------------------------------------------------------

# What Claude Code and the usual package managers need, nothing more. Sources:
# Claude Code's network requirements (api.anthropic.com, claude.ai, the Console
# sign-in at platform.claude.com, statsig/sentry for telemetry and error
# reports, as in its reference devcontainer firewall), npm, PyPI and GitHub
# (git over HTTPS, release and raw downloads). Telemetry can be switched off in
# Claude Code; drop those entries with a deny rule if you do not want them.
DEFAULT_ALLOW: tuple[str, ...] = (
    # Claude Code
    "api.anthropic.com",
    "*.anthropic.com",
    "claude.ai",
    "*.claude.ai",
    "platform.claude.com",
    "statsig.com",
    "sentry.io",
    # npm
    "registry.npmjs.org",
    "*.npmjs.org",
    # PyPI
    "pypi.org",
    "files.pythonhosted.org",
    # GitHub
    "github.com",
    "*.github.com",
    "codeload.github.com",
    "*.githubusercontent.com",
)

_LABEL = re.compile(r"[a-z0-9_-]{1,63}")
_LEGACY_IPV4_CHARS = frozenset("0123456789abcdefx.")


def _normalize_host(host: str) -> tuple[str, bool]:
    """(canonical host, is an IP literal): lower case, no trailing dot, no brackets.

    IPv4 literals in the legacy forms that getaddrinfo also accepts (`127.1`,
    `0x7f.1`, `2130706433`) become dotted quads, so a deny rule for `127.0.0.1`
    cannot be dodged by spelling the address differently.
    """
    h = host.lower()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h.endswith("."):
        h = h[:-1]
    try:
        return str(ipaddress.ip_address(h)), True
    except ValueError:
        pass
    if h and set(h) <= _LEGACY_IPV4_CHARS and any(c.isdigit() for c in h):
        try:
            return socket.inet_ntoa(socket.inet_aton(h)), True
        except OSError:
            pass
    return h, False


def _valid_name(name: str) -> bool:
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


def _matches(pattern: str, host: str, is_ip: bool) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        # A proper subdomain only, never the apex; and never an IP literal
        # (`*.0.0.1` must not match 127.0.0.1).
        return not is_ip and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


@dataclass(frozen=True)
class DomainPolicy:
    """Which host names the sandbox may reach: deny first, then allow, else denied.

    Patterns are normalised (lower case, no trailing dot) and validated when the
    policy is built, so a typo fails loudly instead of silently never matching.
    """

    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.validate_pattern(p) for p in self.allow))
        object.__setattr__(self, "deny", tuple(self.validate_pattern(p) for p in self.deny))

    @staticmethod
    def validate_pattern(pattern: str) -> str:
        """The normalised form of `pattern`, or ValueError saying what is wrong with it.

        Accepted: `example.com` (that host only), `*.example.com` (its
        subdomains, not itself), `*` (everything), or an IP address (matched
        literally; no DNS is involved in policy decisions).
        """
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("empty domain pattern")
        shown = repr(pattern)
        if any(c.isspace() for c in pattern):
            raise ValueError(f"domain pattern {shown} contains whitespace")
        if "://" in pattern:
            raise ValueError(
                f"domain pattern {shown} is a URL: give the host name only, e.g. 'example.com'"
            )
        if any(c in pattern for c in "/@?#"):
            raise ValueError(f"domain pattern {shown} is not a host name (it has a path or user)")
        p = pattern.lower()
        if p == "*":
            return p
        if p.endswith("."):
            p = p[:-1]
        wildcard = p.startswith("*.")
        body = p[2:] if wildcard else p
        if "*" in body:
            raise ValueError(
                f"domain pattern {shown}: '*' may only be the whole pattern or a leading "
                "'*.' label, as in '*.example.com'"
            )
        if not body:
            raise ValueError(f"domain pattern {shown} names no host")
        if body.startswith("[") and body.endswith("]"):
            body = body[1:-1]
        name, is_ip = _normalize_host(body)
        if is_ip:
            if wildcard:
                raise ValueError(f"domain pattern {shown}: a wildcard cannot apply to an address")
            return name
        if ":" in body:
            raise ValueError(
                f"domain pattern {shown} has a port: patterns name hosts, and apply to every port"
            )
        if body.startswith("."):
            raise ValueError(
                f"domain pattern {shown} starts with '.': write '*{body}' for its subdomains"
            )
        if not _valid_name(body):
            raise ValueError(
                f"domain pattern {shown} is not a valid host name "
                "(letters, digits, '-', '_' in dot-separated labels)"
            )
        return ("*." if wildcard else "") + body

    def decide(self, host: str) -> tuple[bool, str]:
        """(allowed, reason) for a connection to `host`; the reason names the rule."""
        name, is_ip = _normalize_host(host)
        if not name:
            return False, "empty host name"
        for p in self.deny:
            if _matches(p, name, is_ip):
                return False, f"denied by rule {p!r}"
        for p in self.allow:
            if _matches(p, name, is_ip):
                return True, f"allowed by rule {p!r}"
        if not self.allow:
            return False, "no egress is allowed (offline)"
        return False, "not in the allow list"


OFFLINE = DomainPolicy(allow=(), deny=())


# -- the log -------------------------------------------------------------------


@dataclass
class EgressRecord:
    """One connection attempt through the proxy (allowed or not, succeeded or not).

    `bytes_up` counts what was sent toward the origin, `bytes_down` what was
    sent back to the client from it (for plain HTTP that includes the
    forwarded header sections; for CONNECT only the tunnelled bytes). `status`
    is the HTTP status the proxy answered (CONNECT: 200 or an error) or, for
    plain HTTP, the one the origin sent.
    """

    ts: float
    host: str
    port: int
    method: str
    allowed: bool
    reason: str
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: float = 0.0
    status: int | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EgressRecord:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


class EgressSubscription:
    """New records as they are logged, for `logs --follow`.

    Registered as soon as :meth:`EgressLog.subscribe` returns, so nothing logged
    between subscribing and the first ``async for`` is missed. Each follower
    has its own bounded queue: one that cannot keep up loses its oldest
    records (counted in `dropped`) instead of growing the agent's memory. The
    log holds followers weakly, so an abandoned one goes away by itself;
    :meth:`close` ends the iteration explicitly.
    """

    def __init__(self, owner: EgressLog, maxlen: int) -> None:
        self._owner = owner
        self._queue: collections.deque[EgressRecord] = collections.deque(maxlen=maxlen)
        self._event = asyncio.Event()
        self._closed = False
        self.dropped = 0

    def _push(self, record: EgressRecord) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(record)
        self._event.set()

    def close(self) -> None:
        self._closed = True
        self._event.set()
        self._owner._unsubscribe(self)

    async def aclose(self) -> None:
        self.close()

    def __aiter__(self) -> EgressSubscription:
        return self

    async def __anext__(self) -> EgressRecord:
        while not self._queue:
            if self._closed:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()
        return self._queue.popleft()

    def __enter__(self) -> EgressSubscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EgressLog:
    """The proxy's record of attempts: a ring in memory, a JSON-lines file, followers.

    Call :meth:`add` from the event loop's thread (followers are woken through
    asyncio events). The file is opened per record in append mode so that log
    rotation needs no signal, and created 0600: host names a sandboxed process
    tried to reach are the operator's business only. It rolls over to `PATH.1` at
    `max_bytes`: the box decides how many attempts it makes, not how much disk.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        capacity: int = LOG_CAPACITY,
        subscriber_queue: int = SUBSCRIBER_QUEUE,
        max_bytes: int = LOG_FILE_MAX_BYTES,
    ) -> None:
        self.path = os.fspath(path) if path is not None else None
        self.max_bytes = max_bytes
        self._ring: collections.deque[EgressRecord] = collections.deque(maxlen=capacity)
        self._subscriber_queue = subscriber_queue
        self._subs: weakref.WeakSet[EgressSubscription] = weakref.WeakSet()
        self._file_failed = False

    def add(self, record: EgressRecord) -> None:
        self._ring.append(record)
        if self.path is not None:
            self._append_line(record)
        for sub in list(self._subs):
            sub._push(record)

    def recent(self, n: int | None = None) -> list[EgressRecord]:
        """The last `n` records (all kept when None), oldest first."""
        items = list(self._ring)
        if n is None:
            return items
        return items[-n:] if n > 0 else []

    @property
    def followers(self) -> int:
        """Live subscriptions (abandoned ones disappear with their last reference)."""
        return len(self._subs)

    def subscribe(self) -> EgressSubscription:
        sub = EgressSubscription(self, self._subscriber_queue)
        self._subs.add(sub)
        return sub

    def close(self) -> None:
        """End every follower's iteration (agent shutdown)."""
        for sub in list(self._subs):
            sub.close()

    def _unsubscribe(self, sub: EgressSubscription) -> None:
        self._subs.discard(sub)

    def _append_line(self, record: EgressRecord) -> None:
        assert self.path is not None
        line = (json.dumps(record.to_json(), separators=(",", ":")) + "\n").encode()
        try:
            parent = os.path.dirname(self.path)
            if parent and not os.path.isdir(parent):
                os.makedirs(parent, mode=0o750, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                # One write per line on an O_APPEND file: lines never interleave.
                os.write(fd, line)
                full = os.fstat(fd).st_size >= self.max_bytes
            finally:
                os.close(fd)
            if full:  # keep one older file: the log is bounded at twice max_bytes
                os.replace(self.path, self.path + ".1")
            self._file_failed = False
        except OSError as exc:
            if not self._file_failed:  # say it once per outage, not per record
                log.warning("cannot append to the egress log %s: %s", self.path, exc)
            self._file_failed = True


# -- HTTP plumbing ---------------------------------------------------------------


class _HttpError(Exception):
    """A request the proxy answers itself with `status` (and `message` as the body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


_HEAD_END = re.compile(rb"\r?\n\r?\n")
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN_RE = re.compile(_TOKEN)
_REQUEST_LINE = re.compile(rf"({_TOKEN}) ([\x21-\x7e]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(r"HTTP/(1\.[01]) ([0-9]{3})(?: ([^\x00-\x08\x0a-\x1f\x7f]*))?")
_BAD_VALUE_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
# Never removed because a Connection header lists them: the body is relayed
# as is, so its framing must reach the origin unchanged.
_KEEP_ALWAYS = frozenset({"content-length", "transfer-encoding", "host"})


async def _read_head(
    reader: asyncio.StreamReader, prefix: bytes = b"", on_data: Callable[[], None] | None = None
) -> tuple[bytes, bytes] | None:
    """(header section, bytes read past it), or None if the peer closed before sending any.

    Reads in chunks rather than readuntil() so the cap does not depend on the
    StreamReader's limit, and so bytes the client sent early (a TLS hello right
    after CONNECT, a request body) are kept and forwarded, not lost.
    """
    buf = bytearray(prefix)
    scanned = 0
    while True:
        while buf and buf[0] in (0x0D, 0x0A):  # stray empty lines before a message are ignored
            del buf[:1]
            scanned = 0
        m = _HEAD_END.search(buf, max(0, scanned - 3))
        if m is not None:
            if m.start() > HEADER_LIMIT:
                raise _HttpError(431, "the header section is larger than 64 KiB")
            return bytes(buf[: m.start()]), bytes(buf[m.end() :])
        if len(buf) > HEADER_LIMIT:
            raise _HttpError(431, "the header section is larger than 64 KiB")
        scanned = len(buf)
        data = await reader.read(CHUNK)
        if not data:
            if not buf:
                return None
            raise _HttpError(400, "the connection closed in the middle of the header section")
        if on_data is not None:
            on_data()
        buf += data


def _parse_head(raw: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(name, value)]): strict, since a lenient parse is where smuggling starts."""
    lines = raw.decode("latin-1").split("\n")
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    first, rest = lines[0], lines[1:]
    headers: list[tuple[str, str]] = []
    for line in rest:
        if line[:1] in (" ", "\t"):
            raise _HttpError(400, "obsolete header line folding is not accepted")
        name, sep, value = line.partition(":")
        if not sep or not _TOKEN_RE.fullmatch(name):
            raise _HttpError(400, "malformed header line")
        value = value.strip(" \t")
        if _BAD_VALUE_CHARS.search(value):
            raise _HttpError(400, f"control character in the value of header {name}")
        headers.append((name, value))
    return first, headers


def _parse_authority(authority: str, default_port: int | None) -> tuple[str, int]:
    """(normalised host, port) of `host:port` / `[v6]:port`; 400 if it is not one."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise _HttpError(400, f"malformed address {authority!r}")
        host, after = authority[1:end], authority[end + 1 :]
        if after and not after.startswith(":"):
            raise _HttpError(400, f"malformed address {authority!r}")
        port_text = after[1:] if after else None
        if not host or ":" not in host:
            raise _HttpError(400, f"malformed address {authority!r}")
    elif ":" in authority:
        host, _, port_text = authority.rpartition(":")
        if ":" in host:
            raise _HttpError(400, f"IPv6 addresses need brackets: {authority!r}")
    else:
        host, port_text = authority, None
    if port_text is None:
        if default_port is None:
            raise _HttpError(400, f"CONNECT needs host:port, got {authority!r}")
        port = default_port
    elif port_text.isdigit() and len(port_text) <= 5 and 0 < int(port_text) < 65536:
        port = int(port_text)
    else:
        raise _HttpError(400, f"bad port in {authority!r}")
    name, is_ip = _normalize_host(host)
    if not is_ip and not _valid_name(name):
        raise _HttpError(400, f"not a valid host name: {host!r}")
    return name, port


def _authority(host: str, port: int, default_port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if port == default_port else f"{shown}:{port}"


def _drop_list(headers: list[tuple[str, str]]) -> set[str]:
    """Names not to forward: the hop-by-hop set plus whatever Connection lists."""
    drop = set(_HOP_BY_HOP)
    for name, value in headers:
        if name.lower() in ("connection", "proxy-connection"):
            drop.update(t.strip().lower() for t in value.split(",") if t.strip())
    return drop - _KEEP_ALWAYS


def _message(status: int, text: str) -> bytes:
    body = (text + "\n").encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _pump(
    src: asyncio.StreamReader,
    dst: asyncio.StreamWriter,
    rec: EgressRecord,
    direction: Literal["up", "down"],
) -> None:
    """Copy `src` to `dst` until EOF, then half-close `dst` (the other way keeps flowing)."""
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        dst.write(data)
        if direction == "up":
            rec.bytes_up += len(data)
        else:
            rec.bytes_down += len(data)
        await dst.drain()
    with contextlib.suppress(OSError):
        if dst.can_write_eof() and not dst.is_closing():
            dst.write_eof()


async def _both(up: Awaitable[None], down: Awaitable[None], *, down_ends_all: bool) -> None:
    """Run both directions; an error in either ends both (and is raised).

    Normally this returns when both are done; with `down_ends_all` it returns
    as soon as the origin→client direction is (plain HTTP: the response is
    complete when the origin closes, whatever the client still holds open).
    """
    up_t = asyncio.ensure_future(up)
    down_t = asyncio.ensure_future(down)
    try:
        pending: set[asyncio.Future[None]] = {up_t, down_t}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            if down_ends_all and down_t.done():
                return
    finally:
        for t in (up_t, down_t):
            if not t.done():
                t.cancel()
        await asyncio.gather(up_t, down_t, return_exceptions=True)


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, flushing what is buffered, but never wait on a peer that stopped reading."""
    try:
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    """One client connection in progress: its record and the transports to abort on shutdown."""

    rec: EgressRecord
    started: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def mark_started(self) -> None:
        self.started = True


# -- the proxy -----------------------------------------------------------------


class EgressProxy:
    """An HTTP proxy (CONNECT + absolute-form plain HTTP) that enforces a DomainPolicy.

    `policy` is called for every request, so a policy change applies to the
    next request without a restart (connections already open are not cut).
    `resolve` maps (host, port) to the address actually dialled, after the
    policy has approved the name; by default the name is dialled as given.
    The dial (resolve + connect) is bounded by `connect_timeout`; a client has
    `header_timeout` seconds to send its request head.
    """

    def __init__(
        self,
        policy: Callable[[], DomainPolicy],
        log: EgressLog,
        resolve: Resolver | None = None,
        connect_timeout: float = 10.0,
        *,
        header_timeout: float = 30.0,
    ) -> None:
        self._policy = policy
        self._log = log
        self._resolve = resolve
        self._connect_timeout = connect_timeout
        self._header_timeout = header_timeout
        self._live: set[_Conn] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._servers: list[asyncio.Server] = []
        self._closing = False

    @property
    def active(self) -> int:
        """Client connections being served now."""
        return len(self._live)

    # -- entry points

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one client connection (an asyncio.start_server callback) to its end."""
        rec = EgressRecord(ts=time.time(), host="", port=0, method="", allowed=False, reason="")
        conn = _Conn(rec, writers=[writer])
        if self._closing:
            writer.transport.abort()
            return
        self._live.add(conn)
        self._idle.clear()
        t0 = time.monotonic()
        try:
            await self._serve(reader, writer, conn)
        except Exception as exc:
            log.debug("egress connection failed", exc_info=True)
            rec.error = rec.error or _describe(exc)
        except asyncio.CancelledError:
            # The box went away (its listener closed) or the agent stops. This is
            # the top of a start_server connection task that nothing awaits; on
            # Python < 3.12 re-raising makes asyncio log "Exception in callback"
            # with a traceback for every cut connection.
            rec.error = rec.error or "cancelled"
        finally:
            try:
                await _close(writer)
            finally:
                self._live.discard(conn)
                if not self._live:
                    self._idle.set()
                if conn.started:
                    rec.duration_ms = round((time.monotonic() - t0) * 1000, 3)
                    self._log.add(rec)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve an already-accepted stream socket (TCP or unix); takes ownership of it."""
        try:
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise
        await self.handle(reader, writer)

    async def start_tcp(self, host: str, port: int) -> asyncio.Server:
        server = await asyncio.start_server(self.handle, host, port, limit=CHUNK)
        self._servers.append(server)
        return server

    async def start_unix(self, path: str | os.PathLike[str]) -> asyncio.Server:
        """Listen on a unix socket that only the owner may connect to (0600).

        The mode is set between bind() and listen(), so there is no moment at
        which someone else could connect under the umask's permissions.
        """
        path = os.fspath(path)
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            os.chmod(path, 0o600)
            server = await asyncio.start_unix_server(self.handle, sock=sock, limit=CHUNK)
        except BaseException:
            sock.close()
            raise
        self._servers.append(server)
        return server

    async def aclose(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop listening, cut every open connection (each still logs its record)."""
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._live):
            conn.rec.error = conn.rec.error or "proxy shut down"
            for w in conn.writers:
                w.transport.abort()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        for server in self._servers:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(server.wait_closed(), timeout)
        self._servers.clear()

    # -- one connection

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: _Conn
    ) -> None:
        rec = conn.rec
        try:
            try:
                got = await asyncio.wait_for(
                    _read_head(reader, on_data=conn.mark_started), self._header_timeout
                )
            except asyncio.TimeoutError:
                if not conn.started:
                    return  # an idle connection that never asked for anything
                raise _HttpError(408, "timed out waiting for the request head") from None
            if got is None:
                if conn.started:
                    rec.error = "the client closed before sending a request"
                return
            head, leftover = got
            first, headers = _parse_head(head)
            m = _REQUEST_LINE.fullmatch(first)
            if m is None:
                raise _HttpError(400, "malformed request line")
            method, target, version = m[1], m[2], m[3]
            rec.method = method
            if method == "CONNECT":
                await self._tunnel(reader, writer, conn, target, leftover)
            elif target.startswith("/") or target == "*":
                raise _HttpError(
                    400,
                    "this is the cowork egress proxy: send CONNECT host:port or an absolute "
                    "URL (GET http://host/path), not an origin-form request",
                )
            else:
                await self._forward(
                    reader, writer, conn, method, target, version, headers, leftover
                )
        except _HttpError as e:
            rec.reason = rec.reason or "bad request"
            rec.error = e.message
            await self._answer(reader, writer, rec, e.status, e.message)

    def _decide(self, host: str) -> tuple[bool, str]:
        try:
            return self._policy().decide(host)
        except Exception as exc:  # fail closed: a broken policy allows nothing
            log.exception("egress policy failed; denying %s", host)
            return False, f"policy error ({type(exc).__name__}); denied"

    async def _deny(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: EgressRecord
    ) -> None:
        await self._answer(
            reader,
            writer,
            rec,
            403,
            f"cowork egress policy: {rec.host} is not allowed ({rec.reason})",
        )

    async def _answer(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        rec: EgressRecord,
        status: int,
        text: str,
    ) -> None:
        """Send the proxy's own answer, then linger briefly over the unread request."""
        rec.status = status
        try:
            writer.write(_message(status, text))
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            await asyncio.wait_for(self._discard(reader), LINGER_SECONDS)
        except (OSError, asyncio.TimeoutError):
            pass

    @staticmethod
    async def _discard(reader: asyncio.StreamReader) -> None:
        left = LINGER_BYTES
        while left > 0:
            data = await reader.read(CHUNK)
            if not data:
                return
            left -= len(data)

    async def _dial(
        self, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async def dial() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            addr, aport = await self._resolve(host, port) if self._resolve else (host, port)
            return await asyncio.open_connection(addr, aport, limit=CHUNK)

        try:
            return await asyncio.wait_for(dial(), self._connect_timeout)
        except PermissionError as exc:  # the resolver refused the address (see public_resolver)
            raise _HttpError(403, f"cowork egress policy: {exc}") from None
        except asyncio.TimeoutError:
            raise _HttpError(
                504, f"connecting to {host}:{port} timed out after {self._connect_timeout:g}s"
            ) from None
        except Exception as exc:  # refused, unreachable, unresolvable, a failing resolve hook
            raise _HttpError(502, f"cannot connect to {host}:{port}: {_describe(exc)}") from None

    async def _tunnel(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Conn,
        target: str,
        leftover: bytes,
    ) -> None:
        rec = conn.rec
        rec.host, rec.port = _parse_authority(target, None)
        rec.allowed, rec.reason = self._decide(rec.host)
        if not rec.allowed:
            await self._deny(reader, writer, rec)
            return
        origin_r, origin_w = await self._dial(rec.host, rec.port)
        conn.writers.append(origin_w)
        try:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            rec.status = 200
            await writer.drain()
            if leftover:
                origin_w.write(leftover)
                rec.bytes_up += len(leftover)
                await origin_w.drain()
            await _both(
                _pump(reader, origin_w, rec, "up"),
                _pump(origin_r, writer, rec, "down"),
                down_ends_all=False,
            )
        finally:
            await _close(origin_w)

    async def _forward(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: _Conn,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        leftover: bytes,
    ) -> None:
        rec = conn.rec
        scheme, sep, rest = target.partition("://")
        if not sep or scheme.lower() != "http":
            if sep and scheme.lower() == "https":
                raise _HttpError(400, "https URLs go through CONNECT host:443, not GET https://")
            raise _HttpError(400, f"unsupported request target {target[:100]!r}")
        split = len(rest)
        for ch in "/?#":
            i = rest.find(ch)
            if 0 <= i < split:
                split = i
        authority, path = rest[:split], rest[split:]
        if "@" in authority:
            raise _HttpError(400, "user information in the URL is not accepted")
        path = path.partition("#")[0]
        if not path.startswith("/"):
            path = "/" + path
        rec.host, rec.port = _parse_authority(authority, 80)
        rec.allowed, rec.reason = self._decide(rec.host)
        if not rec.allowed:
            await self._deny(reader, writer, rec)
            return

        drop = _drop_list(headers)
        lines = [f"{method} {path} HTTP/{version}", f"Host: {_authority(rec.host, rec.port, 80)}"]
        lines += [f"{n}: {v}" for n, v in headers if n.lower() not in drop and n.lower() != "host"]
        lines.append("Connection: close")
        request_head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        origin_r, origin_w = await self._dial(rec.host, rec.port)
        conn.writers.append(origin_w)

        async def up() -> None:
            try:
                origin_w.write(request_head + leftover)
                rec.bytes_up += len(request_head) + len(leftover)
                await origin_w.drain()
                await _pump(reader, origin_w, rec, "up")
            except OSError:
                # The origin stopped reading (it may answer before taking the
                # whole body, e.g. 413): its response still has to come back.
                pass

        try:
            await _both(up(), self._response(origin_r, writer, rec), down_ends_all=True)
        finally:
            await _close(origin_w)

    async def _response(
        self, origin: asyncio.StreamReader, writer: asyncio.StreamWriter, rec: EgressRecord
    ) -> None:
        """Relay the origin's answer: header sections filtered, then the rest as is."""
        where = f"{rec.host}:{rec.port}"
        prefix = b""
        sent = False

        def bad(why: str) -> Exception:
            # Before anything reached the client the proxy can still answer 502;
            # after an interim (1xx) response it can only cut the connection.
            msg = f"bad response from {where}: {why}"
            return ConnectionError(msg) if sent else _HttpError(502, msg)

        while True:
            try:
                got = await _read_head(origin, prefix)
            except _HttpError as e:
                raise bad(e.message) from None
            if got is None:
                raise bad("the connection closed before a response")
            head, prefix = got
            try:
                first, headers = _parse_head(head)
            except _HttpError as e:
                raise bad(e.message) from None
            m = _STATUS_LINE.fullmatch(first)
            if m is None:
                raise bad("malformed status line")
            status = int(m[2])
            rec.status = status
            interim = 100 <= status < 200 and status != 101
            drop = set() if status == 101 else _drop_list(headers)
            lines = [first] + [f"{n}: {v}" for n, v in headers if n.lower() not in drop]
            if status >= 200:
                lines.append("Connection: close")
            out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
            writer.write(out)
            sent = True
            rec.bytes_down += len(out)
            await writer.drain()
            if not interim:
                break
        if prefix:
            writer.write(prefix)
            rec.bytes_down += len(prefix)
            await writer.drain()
        await _pump(origin, writer, rec, "down")


def public_resolver(overrides: dict[str, str] | None = None) -> Resolver:
    """A resolver that dials only public addresses (plus explicit `overrides`).

    The policy approves *names*; without this, an allowed name that resolves
    (or is made to resolve: DNS rebinding) to 127.0.0.1, a private network or
    a link-local address would let the sandbox reach services in the agent's
    own network namespace. An IP literal the policy allowed is dialled as is:
    naming the address was the operator's explicit choice.
    """
    fixed = {k.lower().rstrip("."): v for k, v in (overrides or {}).items()}

    async def resolve(host: str, port: int) -> tuple[str, int]:
        name = host.lower().rstrip(".")
        if name in fixed:
            return fixed[name], port
        try:
            ipaddress.ip_address(name.strip("[]"))
            return name.strip("[]"), port
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(name, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0])
            if not ip.is_global or ip.is_multicast:
                raise PermissionError(f"{host} resolves to a non-public address ({ip})")
        return str(infos[0][4][0]), port

    return resolve
