"""Added latency of the agent's API relay (issue #13): time to the first SSE event of a
streamed Messages call, through the relay vs straight to the (fake, TLS) API.

    .venv/bin/python -m bench.api_relay_latency [--runs 50]

Warm, as a CLI talks to the API turn after turn:
- direct: HTTPS to the fake on one kept-alive connection (what a direct CLI does);
- relayed: plain HTTP to the relay on loopback, a new connection per call (as the CLI
  in a box talks to 127.0.0.1:3129), the relay's upstream from its pool;
- relayed, no pool: the same with pool_max_idle=0 (a TLS handshake per call, as the
  relay did before the pool);
- direct, fresh: a new HTTPS connection per call (the handshake's own cost).
Runs interleave so machine noise hits all alike. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from guest_agent.api_relay import ApiRelay, Route  # noqa: E402
from guest_agent.credentials import Credential, parse_base_url  # noqa: E402
from guest_agent.egress import OFFLINE, EgressLog  # noqa: E402
from tests.claude.fake_anthropic import FakeAnthropic  # noqa: E402
from tests.claude.tls_ca import make_test_ca  # noqa: E402

BODY = json.dumps({"model": "m", "stream": True, "max_tokens": 5, "messages": []}).encode()


def _request(host: str, key: str) -> bytes:
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
    )
    return head.encode() + BODY


async def _exchange(r: asyncio.StreamReader, w: asyncio.StreamWriter, request: bytes) -> float:
    """Send `request`; seconds to the first SSE event; then read the answer to its end
    (the last chunk, or EOF) so that the connection can carry the next one."""
    t0 = time.perf_counter()
    w.write(request)
    await w.drain()
    buf = b""
    took = 0.0
    while True:
        data = await r.read(65536)
        if not data:
            break
        buf += data
        if not took and b"event: " in buf:
            took = time.perf_counter() - t0
        if buf.endswith(b"\r\n0\r\n\r\n"):
            break
    if not took:
        raise RuntimeError(f"no event: {buf[:200]!r}")
    return took


async def first_event(host: str, port: int, key: str, tls: ssl.SSLContext | None) -> float:
    """On a new connection (counted from before the connect)."""
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(host, port, ssl=tls)
    connected = time.perf_counter() - t0
    took = connected + await _exchange(r, w, _request(host, key))
    w.close()
    return took


async def main(runs: int) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    ca = make_test_ca(d, ["localhost"], ["127.0.0.1"])
    client_tls = ssl.create_default_context(cafile=str(ca.ca_cert))
    with FakeAnthropic(tls=ca.server_context()) as api:
        api.default_text = "hi"
        url = parse_base_url(f"https://127.0.0.1:{api.port}")
        pooled = ApiRelay(lambda: OFFLINE, EgressLog(), ca_file=str(ca.ca_cert))
        unpooled = ApiRelay(lambda: OFFLINE, EgressLog(), ca_file=str(ca.ca_cert), pool_max_idle=0)
        routes = [Route(Credential("api_key", "sk-ant-bench", url, "request"), boxed=False)]
        routes.append(Route(routes[0].credential, boxed=False))
        ends = [await pooled.serve_loopback(routes[0]), await unpooled.serve_loopback(routes[1])]
        kr, kw = await asyncio.open_connection("127.0.0.1", api.port, ssl=client_tls)
        direct_req = _request("127.0.0.1", "sk-ant-bench")
        times: dict[str, list[float]] = {
            "direct": [],
            "relayed": [],
            "relayed_no_pool": [],
            "direct_fresh": [],
        }

        async def one_round(record: bool) -> None:
            got = {
                "direct": await _exchange(kr, kw, direct_req),
                "relayed": await first_event(
                    "127.0.0.1", ends[0].port, routes[0].placeholder, None
                ),
                "relayed_no_pool": await first_event(
                    "127.0.0.1", ends[1].port, routes[1].placeholder, None
                ),
                "direct_fresh": await first_event(
                    "127.0.0.1", api.port, "sk-ant-bench", client_tls
                ),
            }
            if record:
                for k, v in got.items():
                    times[k].append(v)

        for _ in range(3):  # warm every path (and fill the pool)
            await one_round(False)
        for _ in range(runs):
            await one_round(True)
        kw.close()
        for e in ends:
            e.close()
        await pooled.aclose()
        await unpooled.aclose()
        upstream_connections = api.connections
    out: dict[str, float] = {"runs": runs}
    for k, v in times.items():
        out[f"{k}_ms"] = statistics.median(v) * 1000
    out["added_ms"] = out["relayed_ms"] - out["direct_ms"]
    out["added_no_pool_ms"] = out["relayed_no_pool_ms"] - out["direct_ms"]
    out["fake_connections"] = upstream_connections
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    out = asyncio.run(main(a.runs))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
