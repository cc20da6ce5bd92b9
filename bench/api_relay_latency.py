"""Added latency of the agent's API relay (issue #13): time to the first SSE event of a
streamed Messages call, through the relay vs straight to the (fake, TLS) API.

    .venv/bin/python -m bench.api_relay_latency [--runs 50]

Both sides open a fresh connection per call, as the relay does upstream: direct is
HTTPS to the fake; relayed is plain HTTP to the relay on loopback (as the CLI in a
box talks to 127.0.0.1:3129), which swaps the placeholder and opens HTTPS to the
fake. Runs alternate so machine noise hits both alike. Loopback only.
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


async def first_event(host: str, port: int, key: str, tls: ssl.SSLContext | None) -> float:
    t0 = time.perf_counter()
    r, w = await asyncio.open_connection(host, port, ssl=tls)
    head = (
        f"POST /v1/messages HTTP/1.1\r\nHost: {host}\r\nx-api-key: {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n\r\n"
    )
    w.write(head.encode() + BODY)
    await w.drain()
    buf = b""
    while b"event: " not in buf:
        data = await r.read(65536)
        if not data:
            raise RuntimeError(f"no event: {buf[:200]!r}")
        buf += data
    took = time.perf_counter() - t0
    w.close()
    return took


async def main(runs: int) -> dict[str, float]:
    d = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    ca = make_test_ca(d, ["localhost"], ["127.0.0.1"])
    client_tls = ssl.create_default_context(cafile=str(ca.ca_cert))
    with FakeAnthropic(tls=ca.server_context()) as api:
        api.default_text = "hi"
        relay = ApiRelay(lambda: OFFLINE, EgressLog(), ca_file=str(ca.ca_cert))
        cred = Credential(
            "api_key", "sk-ant-bench", parse_base_url(f"https://127.0.0.1:{api.port}"), "request"
        )
        route = Route(cred, boxed=False)
        endpoint = await relay.serve_loopback(route)
        direct: list[float] = []
        relayed: list[float] = []
        for _ in range(3):  # warm both paths
            await first_event("127.0.0.1", api.port, "sk-ant-bench", client_tls)
            await first_event("127.0.0.1", endpoint.port, route.placeholder, None)
        for _ in range(runs):
            direct.append(await first_event("127.0.0.1", api.port, "sk-ant-bench", client_tls))
            relayed.append(await first_event("127.0.0.1", endpoint.port, route.placeholder, None))
        endpoint.close()
        await relay.aclose()
    d_ms = statistics.median(direct) * 1000
    r_ms = statistics.median(relayed) * 1000
    return {"runs": runs, "direct_ms": d_ms, "relayed_ms": r_ms, "added_ms": r_ms - d_ms}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=50)
    a = p.parse_args()
    out = asyncio.run(main(a.runs))
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))
