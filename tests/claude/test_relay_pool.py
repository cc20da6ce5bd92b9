"""The API relay keeps its upstream connections alive (guest_agent/upstream_pool.py): the
relay in-process with the TLS fake model, requests sent as the CLI would (plain HTTP to
the relay's loopback port, the run's placeholder as x-api-key). No box, no CLI: what is
tested is how many TCP + TLS connections reach the model, and what each request gets."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.api_relay import ApiRelay, Endpoint, Route
from guest_agent.credentials import Credential, parse_base_url
from guest_agent.egress import OFFLINE, EgressLog
from tests.claude.fake_anthropic import FakeAnthropic, Text
from tests.claude.tls_ca import TestCA, make_test_ca

pytestmark = pytest.mark.timeout(60)
KEY = "sk-ant-api03-pool-test"


def body(stream: bool = True) -> bytes:
    msg = {"role": "user", "content": "hi"}
    tools = [{"name": "Bash", "input_schema": {"type": "object"}}]  # a conversation turn
    return json.dumps(
        {"model": "m", "stream": stream, "max_tokens": 5, "messages": [msg], "tools": tools}
    ).encode()


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"), ["localhost"], ["127.0.0.1"])


@pytest.fixture
def api(test_ca: TestCA) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(tls=test_ca.server_context()) as fake:
        yield fake


class Relayed:
    """An ApiRelay with one run registered on its loopback port."""

    def __init__(self, api: FakeAnthropic, ca: Path) -> None:
        self.relay = ApiRelay(lambda: OFFLINE, EgressLog(), ca_file=str(ca))
        cred = Credential("api_key", KEY, parse_base_url(api.base_url), "request")
        self.route = Route(cred, boxed=False)
        self.endpoint: Endpoint | None = None

    async def __aenter__(self) -> Relayed:
        self.endpoint = await self.relay.serve_loopback(self.route)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.endpoint is not None
        self.endpoint.close()
        await self.relay.aclose()

    async def post(self, data: bytes, extra: bytes = b"") -> bytes:
        """POST /v1/messages; the whole answer (the relay closes after it)."""
        assert self.endpoint is not None
        r, w = await asyncio.open_connection("127.0.0.1", self.endpoint.port)
        head = (
            f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"x-api-key: {self.route.placeholder}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(data)}\r\n\r\n"
        )
        w.write(head.encode() + data + extra)
        await w.drain()
        answer = await r.read()
        w.close()
        await w.wait_closed()
        return answer


def test_two_sequential_requests_reach_the_model_over_one_upstream_connection(
    api: FakeAnthropic, test_ca: TestCA
) -> None:
    api.script(Text("first answer", chunks=1), Text("second answer", chunks=1))

    async def go() -> tuple[bytes, bytes]:
        async with Relayed(api, test_ca.ca_cert) as relayed:
            one = await relayed.post(body())
            two = await relayed.post(body())
            return one, two

    one, two = asyncio.run(go())
    assert b"first answer" in one and b"message_stop" in one
    assert b"second answer" in two and b"message_stop" in two
    assert api.connections == 1
    assert api.credentials == [("x-api-key", KEY), ("x-api-key", KEY)]


def test_a_connection_the_upstream_closed_is_replaced_transparently(
    api: FakeAnthropic, test_ca: TestCA
) -> None:
    api.close_after_response = True  # closes without a Connection: close header
    api.script(Text("first answer", chunks=1), Text("second answer", chunks=1))

    async def go() -> tuple[bytes, bytes]:
        async with Relayed(api, test_ca.ca_cert) as relayed:
            one = await relayed.post(body())
            two = await relayed.post(body())
            return one, two

    one, two = asyncio.run(go())
    assert one.startswith(b"HTTP/1.1 200") and b"first answer" in one
    assert two.startswith(b"HTTP/1.1 200") and b"second answer" in two
    assert api.connections == 2
    assert len(api.conversation_requests()) == 2


def test_a_request_a_reused_connection_drops_unanswered_is_sent_again_on_a_new_one(
    api: FakeAnthropic, test_ca: TestCA
) -> None:
    """The keep-alive race: the API closes an idle connection just as the next request
    goes out on it. The relay sends that request again, once, on a new connection."""
    api.drop_next_reused_request = True
    api.script(Text("first answer", chunks=1), Text("second answer", chunks=1))

    async def go() -> tuple[bytes, bytes, int]:
        async with Relayed(api, test_ca.ca_cert) as relayed:
            one = await relayed.post(body())
            two = await relayed.post(body())
            return one, two, relayed.relay.pool.reuses

    one, two, reuses = asyncio.run(go())
    assert b"first answer" in one
    assert two.startswith(b"HTTP/1.1 200") and b"second answer" in two
    assert reuses == 1
    assert api.connections == 2
    assert len(api.conversation_requests()) == 2


def test_a_close_delimited_answer_is_not_pooled(api: FakeAnthropic, test_ca: TestCA) -> None:
    api.keep_alive = False  # streams end with the connection: no end to read up to
    api.script(Text("first answer", chunks=1), Text("second answer", chunks=1))

    async def go() -> tuple[bytes, bytes, int]:
        async with Relayed(api, test_ca.ca_cert) as relayed:
            one = await relayed.post(body())
            two = await relayed.post(body())
            return one, two, relayed.relay.pool.reuses

    one, two, reuses = asyncio.run(go())
    assert b"first answer" in one and b"second answer" in two
    assert api.connections == 2
    assert reuses == 0


def test_bytes_a_client_sends_past_its_body_never_reach_the_upstream(
    api: FakeAnthropic, test_ca: TestCA
) -> None:
    """A pipelined second request would put its answer in a pooled connection, where the
    next run would read it: only the first request's Content-Length goes up."""
    smuggled = (
        b"POST /v1/messages HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body(stream=False)), body(stream=False))
    )
    api.script(Text("first answer", chunks=1), Text("second answer", chunks=1))

    async def go() -> tuple[bytes, bytes]:
        async with Relayed(api, test_ca.ca_cert) as relayed:
            one = await relayed.post(body(), extra=smuggled)
            two = await relayed.post(body())
            return one, two

    one, two = asyncio.run(go())
    assert b"first answer" in one and b"second answer" not in one
    assert b"second answer" in two
    assert len(api.requests) == 2
    assert api.connections == 1
