"""The egress proxy against real sockets on 127.0.0.1: the domain policy, CONNECT
tunnels, plain HTTP forwarding, errors, and the log. No outside network: names
like `allowed.test` reach local servers through the proxy's resolve hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import json
import os
import socket
import stat
import tempfile
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from guest_agent.egress import (
    DEFAULT_ALLOW,
    OFFLINE,
    DomainPolicy,
    EgressLog,
    EgressProxy,
    EgressRecord,
)

pytestmark = pytest.mark.timeout(60)

LOCAL = "127.0.0.1"
T = TypeVar("T")
POLICY = DomainPolicy(allow=("allowed.test", "*.allowed.test"), deny=("denied.test",))


def run(coro: Awaitable[T], timeout: float = 20.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


async def to_localhost(host: str, port: int) -> tuple[str, int]:
    """Test names (and loopback literals) dial 127.0.0.1; anything else would need the network."""
    if host.endswith(".test") or host == LOCAL:
        return LOCAL, port
    raise socket.gaierror(socket.EAI_NONAME, f"no such test host {host}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        return int(s.getsockname()[1])


# -- local servers -------------------------------------------------------------


class Echo:
    """TCP echo: sends back what it reads, closes after the client's EOF."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> Echo:
        self.server = await asyncio.start_server(self._handle, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class Origin:
    """A tiny HTTP/1.1 origin: records each request, answers `METHOD TARGET\\nBODY`."""

    requests: list[Seen] = field(default_factory=list)
    connections: int = 0
    port: int = 0
    server: asyncio.AbstractServer | None = None

    async def start(self) -> Origin:
        self.server = await asyncio.start_server(self._handle, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            head = (await r.readuntil(b"\r\n\r\n")).decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ")
            headers = [(n, v) for n, _, v in (ln.partition(": ") for ln in lines[1:] if ln)]
            fields = {n.lower(): v for n, v in headers}
            if fields.get("expect", "").lower() == "100-continue":
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                await w.drain()
            if "content-length" in fields:
                body = await r.readexactly(int(fields["content-length"]))
            elif fields.get("transfer-encoding", "").lower() == "chunked":
                body = await read_chunked(r)
            else:
                body = b""
            self.requests.append(Seen(method, target, headers, body))
            payload = f"{method} {target}\n".encode() + body
            w.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                + f"Content-Length: {len(payload)}\r\n".encode()
                + b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Origin: yes\r\n\r\n"
                + payload
            )
            await w.drain()
        finally:
            w.close()
            with contextlib.suppress(OSError):
                await w.wait_closed()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def read_chunked(r: asyncio.StreamReader) -> bytes:
    body = b""
    while True:
        size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await r.readuntil(b"\r\n")
            return body
        body += await r.readexactly(size)
        await r.readexactly(2)


@dataclass
class Env:
    proxy: EgressProxy
    log: EgressLog
    port: int
    echo: Echo
    origin: Origin

    async def records(self, n: int, timeout: float = 5.0) -> list[EgressRecord]:
        """The log once it has `n` records (a record lands when its connection ends)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.log.recent()) < n:
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"expected {n} records, got {self.log.recent()}")
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # and no more than n
        got = self.log.recent()
        assert len(got) == n, got
        return got


@contextlib.asynccontextmanager
async def proxy_env(
    policy: DomainPolicy | Callable[[], DomainPolicy] = POLICY,
    log: EgressLog | None = None,
    **kwargs: Any,
) -> AsyncIterator[Env]:
    log = log if log is not None else EgressLog()
    get = policy if callable(policy) else (lambda: policy)
    kwargs.setdefault("resolve", to_localhost)
    proxy = EgressProxy(get, log, **kwargs)
    server = await proxy.start_tcp(LOCAL, 0)
    echo, origin = await Echo().start(), await Origin().start()
    try:
        yield Env(proxy, log, server.sockets[0].getsockname()[1], echo, origin)
    finally:
        await proxy.aclose()
        echo.close()
        origin.close()


async def exchange(port: int, data: bytes, eof: bool = False) -> bytes:
    """Send `data` to the proxy (then EOF if asked) and read everything until it closes."""
    r, w = await asyncio.open_connection(LOCAL, port)
    try:
        w.write(data)
        if eof:
            w.write_eof()
        await w.drain()
        return await r.read()
    finally:
        w.close()


async def connect(
    port: int, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a CONNECT tunnel; returns the streams and the proxy's response head."""
    r, w = await asyncio.open_connection(LOCAL, port)
    w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await w.drain()
    head = await r.readuntil(b"\r\n\r\n")
    return r, w, head


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


# -- DomainPolicy -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("allow", "deny", "host", "allowed"),
    [
        (("example.com",), (), "example.com", True),
        (("example.com",), (), "www.example.com", False),
        (("*.example.com",), (), "a.example.com", True),
        (("*.example.com",), (), "a.b.example.com", True),
        (("*.example.com",), (), "example.com", False),
        (("*.example.com",), (), "badexample.com", False),
        (("*.example.com",), (), "example.com.evil.net", False),
        (("*",), (), "anything.at.all", True),
        (("*",), ("bad.com",), "bad.com", False),
        (("*.example.com",), ("secret.example.com",), "secret.example.com", False),
        (("*.example.com",), ("secret.example.com",), "public.example.com", True),
        (("x.example.com",), ("*.example.com",), "x.example.com", False),
        (("Example.COM.",), (), "eXample.com", True),
        (("example.com",), (), "EXAMPLE.COM.", True),
        ((), (), "example.com", False),
    ],
)
def test_domain_policy_matching_table(
    allow: tuple[str, ...], deny: tuple[str, ...], host: str, allowed: bool
) -> None:
    assert DomainPolicy(allow=allow, deny=deny).decide(host)[0] is allowed


def test_deny_is_checked_before_allow_and_named_in_the_reason() -> None:
    p = DomainPolicy(allow=("*",), deny=("evil.com",))
    assert p.decide("evil.com") == (False, "denied by rule 'evil.com'")
    assert p.decide("good.com") == (True, "allowed by rule '*'")


def test_unlisted_host_is_denied_with_a_reason() -> None:
    assert DomainPolicy(allow=("a.com",)).decide("b.com") == (False, "not in the allow list")


def test_ip_literals_match_only_when_listed_literally() -> None:
    p = DomainPolicy(allow=("*.example.com", "10.0.0.1", "::1"))
    assert not p.decide("127.0.0.1")[0]
    assert p.decide("10.0.0.1")[0]
    assert p.decide("[::1]")[0]
    assert p.decide("0:0::1")[0]
    assert not p.decide("10.0.0.2")[0]


def test_legacy_ipv4_spellings_cannot_dodge_a_deny_rule() -> None:
    p = DomainPolicy(allow=("*",), deny=("127.0.0.1",))
    for spelling in ("127.1", "0x7f.0.0.1", "2130706433", "127.0.0.1."):
        assert not p.decide(spelling)[0], spelling


def test_star_alone_matches_addresses_too() -> None:
    assert DomainPolicy(allow=("*",)).decide("192.0.2.1")[0]


def test_patterns_are_normalized_when_the_policy_is_built() -> None:
    p = DomainPolicy(allow=("*.Example.COM.", "[::1]"), deny=("BAD.org",))
    assert p.allow == ("*.example.com", "::1")
    assert p.deny == ("bad.org",)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("", "empty"),
        ("exa mple.com", "whitespace"),
        (" example.com", "whitespace"),
        ("https://example.com", "URL"),
        ("example.com/path", "not a host name"),
        ("user@example.com", "not a host name"),
        ("example.com:443", "port"),
        ("a*.b.com", "'*' may only be"),
        ("*example.com", "'*' may only be"),
        ("a.*.com", "'*' may only be"),
        ("**", "'*' may only be"),
        ("*.", "'*' may only be"),
        (".", "names no host"),
        (".example.com", "starts with '.'"),
        ("exa$mple.com", "not a valid host name"),
        ("a..b.com", "not a valid host name"),
        ("*.10.0.0.1", "wildcard cannot apply to an address"),
    ],
)
def test_validate_pattern_rejects_junk_with_a_clear_message(pattern: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        DomainPolicy.validate_pattern(pattern)


def test_building_a_policy_with_a_bad_pattern_fails() -> None:
    with pytest.raises(ValueError, match="port"):
        DomainPolicy(allow=("example.com:80",))


def test_offline_denies_everything() -> None:
    for host in ("api.anthropic.com", "example.com", "127.0.0.1", "localhost"):
        assert OFFLINE.decide(host) == (False, "no egress is allowed (offline)")


@pytest.mark.parametrize(
    "host",
    [
        "api.anthropic.com",
        "statsig.anthropic.com",
        "claude.ai",
        "registry.npmjs.org",
        "pypi.org",
        "files.pythonhosted.org",
        "github.com",
        "api.github.com",
        "codeload.github.com",
        "raw.githubusercontent.com",
        "objects.githubusercontent.com",
    ],
)
def test_default_allow_covers_claude_code_and_package_managers(host: str) -> None:
    assert DomainPolicy(allow=DEFAULT_ALLOW).decide(host)[0]


@pytest.mark.parametrize(
    "host", ["example.com", "anthropic.com.evil.net", "evilgithub.com", "pypi.org.evil.net"]
)
def test_default_allow_denies_other_hosts(host: str) -> None:
    assert not DomainPolicy(allow=DEFAULT_ALLOW).decide(host)[0]


# -- EgressLog ------------------------------------------------------------------------


def record(host: str = "h.test", **kw: Any) -> EgressRecord:
    fields: dict[str, Any] = dict(
        ts=1.0, host=host, port=443, method="CONNECT", allowed=True, reason="r"
    )
    fields.update(kw)
    return EgressRecord(**fields)


def test_record_round_trips_through_json() -> None:
    rec = record(bytes_up=3, bytes_down=4, duration_ms=1.5, status=200, error=None)
    assert EgressRecord.from_json(json.loads(json.dumps(rec.to_json()))) == rec


def test_recent_is_a_bounded_ring_oldest_first() -> None:
    log = EgressLog(capacity=3)
    for i in range(5):
        log.add(record(f"h{i}.test"))
    assert [r.host for r in log.recent()] == ["h2.test", "h3.test", "h4.test"]
    assert [r.host for r in log.recent(2)] == ["h3.test", "h4.test"]
    assert log.recent(0) == []


def test_log_file_rolls_over_so_the_box_cannot_fill_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "egress.jsonl"
    log = EgressLog(path, max_bytes=2000)
    for i in range(500):  # ~100 KB of refused attempts
        log.add(record(f"h{i}.test"))
    older = path.with_name("egress.jsonl.1")
    assert older.exists() and path.stat().st_size <= 2000 + 400
    assert older.stat().st_size <= 2000 + 400
    last = json.loads(path.read_text().splitlines()[-1])
    assert last["host"] == "h499.test"  # the newest records are always in the live file


def test_slow_subscriber_loses_the_oldest_records_not_memory() -> None:
    async def main() -> None:
        log = EgressLog(subscriber_queue=3)
        sub = log.subscribe()
        for i in range(5):
            log.add(record(f"h{i}.test"))
        got = [(await anext(sub)).host for _ in range(3)]
        assert got == ["h2.test", "h3.test", "h4.test"]
        assert sub.dropped == 2

    run(main())


def test_closing_the_log_ends_its_subscriptions() -> None:
    async def main() -> None:
        log = EgressLog()
        sub = log.subscribe()
        log.add(record())
        log.close()
        assert [r.host async for r in sub] == ["h.test"]

    run(main())


def test_closed_or_abandoned_subscriptions_stop_receiving() -> None:
    log = EgressLog()
    kept, closed, abandoned = log.subscribe(), log.subscribe(), log.subscribe()
    assert log.followers == 3
    closed.close()
    del abandoned
    gc.collect()
    assert log.followers == 1

    async def main() -> None:
        log.add(record())
        log.close()
        assert [r.host async for r in kept] == ["h.test"]
        assert [r async for r in closed] == []

    run(main())


def test_log_file_is_created_0600_with_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "egress.jsonl"
    log = EgressLog(path)
    log.add(record())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["host"] == "h.test"


# -- CONNECT --------------------------------------------------------------------------


def test_connect_allowed_round_trips_bytes_and_logs_counts() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            r, w, head = await connect(env.port, f"allowed.test:{env.echo.port}")
            assert head.startswith(b"HTTP/1.1 200 ")
            w.write(b"ping-12345")
            await w.drain()
            assert await r.readexactly(10) == b"ping-12345"
            w.close()
            (rec,) = await env.records(1)
            assert (rec.host, rec.port, rec.method) == ("allowed.test", env.echo.port, "CONNECT")
            assert rec.allowed and rec.status == 200 and rec.error is None
            assert rec.reason == "allowed by rule 'allowed.test'"
            assert (rec.bytes_up, rec.bytes_down) == (10, 10)
            assert rec.duration_ms > 0

    run(main())


def test_connect_relays_large_streams_both_ways() -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)

    async def main() -> None:
        async with proxy_env() as env:
            r, w, _ = await connect(env.port, f"a.allowed.test:{env.echo.port}")

            async def send() -> None:
                for i in range(0, len(data), 100_000):
                    w.write(data[i : i + 100_000])
                    await w.drain()
                w.write_eof()

            sender = asyncio.ensure_future(send())
            got = await r.read(-1)
            await sender
            assert got == data
            w.close()
            (rec,) = await env.records(1)
            assert rec.bytes_up == rec.bytes_down == len(data)

    run(main())


def test_connect_denied_answers_403_and_the_origin_never_sees_a_connection() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            resp = await exchange(
                env.port, f"CONNECT denied.test:{env.echo.port} HTTP/1.1\r\n\r\n".encode()
            )
            assert status_of(resp) == 403
            assert b"cowork egress policy: denied.test is not allowed" in body_of(resp)
            (rec,) = await env.records(1)
            assert not rec.allowed and rec.status == 403 and rec.host == "denied.test"
            assert rec.reason == "denied by rule 'denied.test'"
            assert env.echo.connections == 0

    run(main())


def test_connect_to_an_unlisted_ip_literal_is_denied() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            resp = await exchange(
                env.port, f"CONNECT 127.0.0.1:{env.echo.port} HTTP/1.1\r\n\r\n".encode()
            )
            assert status_of(resp) == 403
            assert env.echo.connections == 0

    run(main())


def test_half_close_client_still_receives_the_echo() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            r, w, _ = await connect(env.port, f"allowed.test:{env.echo.port}")
            w.write(b"all I have to say")
            w.write_eof()  # shutdown(SHUT_WR): the tunnel must keep the other way open
            assert await r.read() == b"all I have to say"
            w.close()
            (rec,) = await env.records(1)
            assert rec.error is None and rec.bytes_down == len(b"all I have to say")

    run(main())


def test_bytes_sent_right_after_connect_are_not_lost() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            r, w = await asyncio.open_connection(LOCAL, env.port)
            w.write(f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\nearly".encode())
            w.write_eof()
            resp = await r.read()
            assert resp.startswith(b"HTTP/1.1 200 ") and resp.endswith(b"\r\n\r\nearly")
            w.close()

    run(main())


def test_http_client_tunnel_reaches_the_origin_through_connect() -> None:
    """What a real client does for https: CONNECT, then speak to the origin in the tunnel."""

    async def main() -> None:
        async with proxy_env() as env:

            def fetch() -> tuple[int, bytes]:
                c = http.client.HTTPConnection(LOCAL, env.port, timeout=10)
                c.set_tunnel("allowed.test", env.origin.port)
                try:
                    c.request("GET", "/tunnelled")
                    resp = c.getresponse()
                    return resp.status, resp.read()
                finally:
                    c.close()

            assert await asyncio.to_thread(fetch) == (200, b"GET /tunnelled\n")

    run(main())


# -- plain HTTP --------------------------------------------------------------------------


def test_http_get_is_forwarded_in_origin_form_without_proxy_headers() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            req = (
                f"GET http://allowed.test:{env.origin.port}/some/path?q=1 HTTP/1.1\r\n"
                f"Host: allowed.test:{env.origin.port}\r\n"
                "Proxy-Connection: keep-alive\r\n"
                "Proxy-Authorization: Basic c2VjcmV0\r\n"
                "Connection: keep-alive, X-Hop\r\n"
                "X-Hop: 1\r\n"
                "Keep-Alive: 300\r\n"
                "TE: trailers\r\n"
                "X-End-To-End: kept\r\n\r\n"
            )
            resp = await exchange(env.port, req.encode())
            assert status_of(resp) == 200
            assert body_of(resp) == b"GET /some/path?q=1\n"
            (seen,) = env.origin.requests
            assert seen.target == "/some/path?q=1"
            names = {n.lower() for n, _ in seen.headers}
            assert not names & {"proxy-connection", "proxy-authorization", "keep-alive", "te"}
            assert "x-hop" not in names
            assert seen.header("Connection") == ["close"]
            assert seen.header("X-End-To-End") == ["kept"]
            (rec,) = await env.records(1)
            assert (rec.method, rec.host, rec.port, rec.status) == (
                "GET",
                "allowed.test",
                env.origin.port,
                200,
            )
            assert rec.allowed and rec.bytes_up > 0 and rec.bytes_down == len(resp)

    run(main())


def test_http_response_is_rewritten_to_connection_close() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            resp = await exchange(
                env.port,
                f"GET http://allowed.test:{env.origin.port}/ HTTP/1.1\r\n\r\n".encode(),
            )
            head = resp.partition(b"\r\n\r\n")[0].decode().lower()
            assert "connection: close" in head
            assert "keep-alive" not in head
            assert "x-origin: yes" in head

    run(main())


def test_http_host_header_is_replaced_by_the_url_authority() -> None:
    """The origin must see the host the policy approved, not one the client made up."""

    async def main() -> None:
        async with proxy_env() as env:
            await exchange(
                env.port,
                f"GET http://allowed.test:{env.origin.port}/ HTTP/1.1\r\n"
                "Host: denied.test\r\n\r\n".encode(),
            )
            (seen,) = env.origin.requests
            assert seen.header("Host") == [f"allowed.test:{env.origin.port}"]

    run(main())


def test_http_post_body_is_forwarded() -> None:
    body = os.urandom(300_000)

    async def main() -> None:
        async with proxy_env() as env:
            head = (
                f"POST http://allowed.test:{env.origin.port}/upload HTTP/1.1\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            resp = await exchange(env.port, head.encode() + body)
            assert status_of(resp) == 200
            assert body_of(resp) == b"POST /upload\n" + body
            assert env.origin.requests[0].body == body
            (rec,) = await env.records(1)
            assert rec.bytes_up > len(body) and rec.method == "POST"

    run(main())


def test_http_chunked_post_body_is_forwarded() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            head = (
                f"POST http://allowed.test:{env.origin.port}/c HTTP/1.1\r\n"
                "Transfer-Encoding: chunked\r\n\r\n"
            )
            chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
            resp = await exchange(env.port, head.encode() + chunks)
            assert body_of(resp) == b"POST /c\nhello world"
            assert env.origin.requests[0].header("Transfer-Encoding") == ["chunked"]

    run(main())


def test_http_expect_100_continue_is_relayed() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            r, w = await asyncio.open_connection(LOCAL, env.port)
            w.write(
                f"PUT http://allowed.test:{env.origin.port}/e HTTP/1.1\r\n"
                "Content-Length: 4\r\nExpect: 100-continue\r\n\r\n".encode()
            )
            assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            w.write(b"data")
            resp = await r.read()
            w.close()
            assert status_of(resp) == 200 and body_of(resp) == b"PUT /e\ndata"
            (rec,) = await env.records(1)
            assert rec.status == 200

    run(main())


def test_http_denied_answers_403_and_the_origin_never_sees_a_connection() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            resp = await exchange(
                env.port,
                f"POST http://denied.test:{env.origin.port}/ HTTP/1.1\r\n"
                "Content-Length: 5\r\n\r\nhello".encode(),
            )
            assert status_of(resp) == 403
            assert b"cowork egress policy: denied.test is not allowed" in resp
            assert env.origin.connections == 0
            (rec,) = await env.records(1)
            assert (rec.method, rec.allowed, rec.status) == ("POST", False, 403)

    run(main())


def test_urllib_with_a_proxy_handler_fetches_from_the_origin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)

    async def main() -> None:
        async with proxy_env() as env:
            proxy_url = f"http://{LOCAL}:{env.port}"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": proxy_url}))

            def fetch(url: str) -> tuple[int, bytes]:
                try:
                    with opener.open(url, timeout=10) as resp:
                        return resp.status, resp.read()
                except urllib.error.HTTPError as e:
                    with e:
                        return e.code, e.read()

            ok = await asyncio.to_thread(fetch, f"http://allowed.test:{env.origin.port}/hi?x=1")
            assert ok == (200, b"GET /hi?x=1\n")
            status, body = await asyncio.to_thread(fetch, "http://denied.test/")
            assert status == 403 and b"cowork egress policy" in body
            await env.records(2)

    run(main())


# -- errors ---------------------------------------------------------------------------


def test_offline_proxy_denies_connect_and_http() -> None:
    async def main() -> None:
        async with proxy_env(OFFLINE) as env:
            a = await exchange(
                env.port, f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\n".encode()
            )
            b = await exchange(
                env.port, f"GET http://allowed.test:{env.origin.port}/ HTTP/1.1\r\n\r\n".encode()
            )
            assert status_of(a) == status_of(b) == 403
            assert env.echo.connections == env.origin.connections == 0
            assert all(not r.allowed for r in await env.records(2))

    run(main())


def test_unreachable_port_answers_502_and_is_logged() -> None:
    async def main() -> None:
        port = free_port()
        async with proxy_env() as env:
            resp = await exchange(
                env.port, f"CONNECT allowed.test:{port} HTTP/1.1\r\n\r\n".encode()
            )
            assert status_of(resp) == 502
            assert f"cannot connect to allowed.test:{port}".encode() in resp
            (rec,) = await env.records(1)
            assert rec.allowed and rec.status == 502 and rec.error
            assert "cannot connect" in rec.error

    run(main())


def test_unresolvable_host_answers_502() -> None:
    async def main() -> None:
        async with proxy_env(DomainPolicy(allow=("*",))) as env:
            resp = await exchange(env.port, b"GET http://nowhere.example/ HTTP/1.1\r\n\r\n")
            assert status_of(resp) == 502
            (rec,) = await env.records(1)
            assert rec.error and "gaierror" in rec.error

    run(main())


def test_connect_timeout_answers_504() -> None:
    async def slow(host: str, port: int) -> tuple[str, int]:
        await asyncio.sleep(30)
        return LOCAL, port

    async def main() -> None:
        async with proxy_env(resolve=slow, connect_timeout=0.2) as env:
            resp = await exchange(env.port, b"CONNECT allowed.test:443 HTTP/1.1\r\n\r\n")
            assert status_of(resp) == 504
            (rec,) = await env.records(1)
            assert rec.status == 504 and rec.error and "timed out" in rec.error

    run(main())


def test_origin_form_request_answers_400() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            resp = await exchange(env.port, b"GET / HTTP/1.1\r\nHost: allowed.test\r\n\r\n")
            assert status_of(resp) == 400
            assert b"absolute" in body_of(resp)
            (rec,) = await env.records(1)
            assert (rec.method, rec.allowed, rec.status) == ("GET", False, 400)

    run(main())


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"garbage\r\n\r\n",
        b"GET http://allowed.test/ HTTP/2.0\r\n\r\n",
        b"GET  http://allowed.test/ HTTP/1.1\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nNo colon here\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        b"GET http://allowed.test/ HTTP/1.1\r\nBad Name: v\r\n\r\n",
        b"CONNECT allowed.test HTTP/1.1\r\n\r\n",
        b"CONNECT allowed.test:99999 HTTP/1.1\r\n\r\n",
        b"CONNECT [::1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT ::1:443 HTTP/1.1\r\n\r\n",
        b"CONNECT bad$host.test:443 HTTP/1.1\r\n\r\n",
        b"GET https://allowed.test/ HTTP/1.1\r\n\r\n",
        b"GET ftp://allowed.test/ HTTP/1.1\r\n\r\n",
        b"GET http://user:pw@allowed.test/ HTTP/1.1\r\n\r\n",
        b"GET http:///nohost HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_request_answers_400_and_is_logged(request_bytes: bytes) -> None:
    async def main() -> None:
        async with proxy_env(DomainPolicy(allow=("*",))) as env:
            resp = await exchange(env.port, request_bytes)
            assert status_of(resp) == 400, resp
            (rec,) = await env.records(1)
            assert not rec.allowed and rec.status == 400 and rec.error
            assert env.origin.connections == env.echo.connections == 0

    run(main())


def test_oversized_header_section_answers_431() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            big = b"X-Big: " + b"a" * (70 * 1024) + b"\r\n"
            resp = await exchange(
                env.port, b"GET http://allowed.test/ HTTP/1.1\r\n" + big + b"\r\n"
            )
            assert status_of(resp) == 431
            (rec,) = await env.records(1)
            assert rec.status == 431 and env.origin.connections == 0

    run(main())


def test_client_that_stalls_mid_request_gets_408() -> None:
    async def main() -> None:
        async with proxy_env(header_timeout=0.2) as env:
            resp = await exchange(env.port, b"GET http://allowed.test/ HTTP/1.1\r\n")
            assert status_of(resp) == 408
            await env.records(1)

    run(main())


def test_idle_connection_is_closed_without_a_record() -> None:
    async def main() -> None:
        async with proxy_env(header_timeout=0.2) as env:
            r, w = await asyncio.open_connection(LOCAL, env.port)
            assert await r.read() == b""
            w.close()
            await asyncio.sleep(0.05)
            assert env.log.recent() == []

    run(main())


def test_failing_policy_callable_denies() -> None:
    def broken() -> DomainPolicy:
        raise RuntimeError("policy store unreadable")

    async def main() -> None:
        async with proxy_env(broken) as env:
            resp = await exchange(
                env.port, f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\n".encode()
            )
            assert status_of(resp) == 403
            (rec,) = await env.records(1)
            assert "policy error" in rec.reason
            assert env.echo.connections == 0

    run(main())


# -- policy changes, the log, entry points ------------------------------------------------


def test_policy_change_applies_to_the_next_request() -> None:
    async def main() -> None:
        current = [POLICY]
        async with proxy_env(lambda: current[0]) as env:
            target = f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\n".encode()
            r, w, head = await connect(env.port, f"allowed.test:{env.echo.port}")
            assert head.startswith(b"HTTP/1.1 200 ")
            current[0] = DomainPolicy(allow=POLICY.allow, deny=("allowed.test",))
            assert status_of(await exchange(env.port, target)) == 403
            # The tunnel opened before the change keeps working.
            w.write(b"still here")
            assert await r.readexactly(10) == b"still here"
            w.close()
            current[0] = POLICY
            _, w2, head2 = await connect(env.port, f"allowed.test:{env.echo.port}")
            assert head2.startswith(b"HTTP/1.1 200 ")
            w2.close()
            await env.records(3)

    run(main())


def test_jsonl_file_has_one_line_per_attempt(tmp_path: Path) -> None:
    path = tmp_path / "egress.jsonl"

    async def main() -> None:
        async with proxy_env(log=EgressLog(path)) as env:
            r, w, _ = await connect(env.port, f"allowed.test:{env.echo.port}")
            w.write_eof()
            await r.read()
            w.close()
            await exchange(env.port, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
            await exchange(env.port, b"nonsense\r\n\r\n")
            await exchange(
                env.port, f"GET http://allowed.test:{env.origin.port}/ HTTP/1.1\r\n\r\n".encode()
            )
            await env.records(4)

    run(main())
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 4
    assert sorted((d["host"], d["status"]) for d in lines) == sorted(
        [("allowed.test", 200), ("denied.test", 403), ("", 400), ("allowed.test", 200)]
    )
    assert all(set(d) == set(EgressRecord.__dataclass_fields__) for d in lines)


def test_secrets_in_headers_bodies_and_urls_are_never_logged(tmp_path: Path) -> None:
    path = tmp_path / "egress.jsonl"

    async def main() -> None:
        async with proxy_env(log=EgressLog(path)) as env:
            await exchange(
                env.port,
                f"POST http://allowed.test:{env.origin.port}/p?token=SECRET-URL HTTP/1.1\r\n"
                "Authorization: Bearer SECRET-AUTH\r\nx-api-key: SECRET-KEY\r\n"
                "Content-Length: 11\r\n\r\nSECRET-BODY".encode(),
            )
            (rec,) = await env.records(1)
            # End-to-end headers still reach the origin; only the log is kept clean.
            assert env.origin.requests[0].header("Authorization") == ["Bearer SECRET-AUTH"]
            assert "SECRET" not in json.dumps(rec.to_json())

    run(main())
    assert "SECRET" not in path.read_text()


def test_subscribe_yields_records_as_they_happen() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            with env.log.subscribe() as sub:
                await exchange(env.port, b"CONNECT denied.test:443 HTTP/1.1\r\n\r\n")
                first = await asyncio.wait_for(anext(sub), 5)
                assert (first.host, first.allowed) == ("denied.test", False)
                await exchange(
                    env.port,
                    f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\n".encode(),
                    eof=True,
                )
                second = await asyncio.wait_for(anext(sub), 5)
                assert (second.host, second.allowed) == ("allowed.test", True)

    run(main())


def test_serve_socket_serves_an_already_accepted_socket() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            ours, theirs = socket.socketpair()
            task = asyncio.ensure_future(env.proxy.serve_socket(theirs))
            r, w = await asyncio.open_connection(sock=ours)
            w.write(f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\nvia-pair".encode())
            w.write_eof()
            resp = await r.read()
            assert resp.startswith(b"HTTP/1.1 200 ") and resp.endswith(b"via-pair")
            w.close()
            await asyncio.wait_for(task, 5)
            (rec,) = await env.records(1)
            assert rec.bytes_up == rec.bytes_down == len(b"via-pair")

    run(main())


def test_start_unix_listens_on_a_0600_socket() -> None:
    d = tempfile.mkdtemp(prefix="cw-egress-", dir="/tmp")
    path = os.path.join(d, "proxy.sock")

    async def main() -> None:
        async with proxy_env() as env:
            await env.proxy.start_unix(path)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            r, w = await asyncio.open_unix_connection(path)
            w.write(f"CONNECT allowed.test:{env.echo.port} HTTP/1.1\r\n\r\nunix".encode())
            w.write_eof()
            resp = await r.read()
            assert resp.endswith(b"\r\n\r\nunix")
            w.close()

    try:
        run(main())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.rmdir(d)


def test_aclose_cuts_open_tunnels_and_still_logs_them() -> None:
    async def main() -> None:
        async with proxy_env() as env:
            r, w, _ = await connect(env.port, f"allowed.test:{env.echo.port}")
            assert env.proxy.active == 1
            await env.proxy.aclose()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            (rec,) = env.log.recent()
            assert rec.error == "proxy shut down" and rec.status == 200
            assert env.proxy.active == 0

    run(main())


def test_public_resolver_refuses_names_that_resolve_to_private_addresses() -> None:
    from guest_agent.egress import public_resolver

    resolve = public_resolver({"pinned.test": "127.0.0.1"})

    async def go() -> None:
        with pytest.raises(PermissionError, match="non-public"):
            await resolve("localhost", 80)
        assert await resolve("pinned.test", 81) == ("127.0.0.1", 81)  # explicit override
        assert await resolve("PINNED.test.", 82) == ("127.0.0.1", 82)
        assert await resolve("127.0.0.1", 83) == ("127.0.0.1", 83)  # an allowed IP literal

    asyncio.run(go())
