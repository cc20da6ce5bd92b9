"""Relay overhead on this host, and exec latency over hvsock vs ssh in the harness VM.

    .venv/bin/python -m bench.vm_latency            # relay overhead only (no VM, ~30 s)
    .venv/bin/python -m bench.vm_latency --vm       # also boot the tests/vm guest (TCG: minutes)

Relay overhead: one real agent on a unix socket, reached (a) directly, (b) through
the agent's own vsock relay (guest_agent/vsock.py, on a unix listener), and (c)
through the full chain the VM path uses minus the VM: host relay
(host_client/relay.py) → hybrid-vsock CONNECT/OK socket → agent relay. Reports
p50/p99 of a unary Info and of exec /bin/true, and raw relay throughput.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import socket
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

from host_client import CoworkClient


def _pcts(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "p50_ms": round(statistics.median(xs), 3),
        "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))], 3),
    }


def _time(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(max(3, n // 20)):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _interleaved(targets: dict[str, str], token_file: str, n: int) -> dict[str, Any]:
    """p50/p99 per target, calls interleaved round-robin so machine noise hits all alike."""
    clients = {k: CoworkClient(t, token_file) for k, t in targets.items()}
    try:
        res: dict[str, Any] = {k: {} for k in clients}
        ops: dict[str, Callable[[CoworkClient], object]] = {
            "info": lambda c: c.info(),
            "exec_true": lambda c: c.run(["/bin/true"]),
        }
        for op, fn in ops.items():
            samples: dict[str, list[float]] = {k: [] for k in clients}
            for c in clients.values():
                for _ in range(max(3, n // 20)):
                    fn(c)
            for _ in range(n):
                for k, c in clients.items():
                    t0 = time.perf_counter()
                    fn(c)
                    samples[k].append((time.perf_counter() - t0) * 1000)
            for k in clients:
                res[k][op] = _pcts(samples[k])
        return res
    finally:
        for c in clients.values():
            c.close()


def _throughput(path: str, mib: int) -> float:
    """MiB/s of a raw stream pushed through the relay at `path` into a counting sink."""
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    block = b"\0" * (1 << 20)
    t0 = time.perf_counter()

    def send() -> None:
        for _ in range(mib):
            c.sendall(block)
        c.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    t.start()
    got = b""
    while not got.endswith(b"\n"):
        b = c.recv(256)
        if not b:
            break
        got += b
    t.join()
    dt = time.perf_counter() - t0
    c.close()
    assert int(got.split()[1]) == mib << 20, got
    return mib / dt


def _sink_server() -> tuple[str, socket.socket]:
    import os
    import tempfile

    d = tempfile.mkdtemp(prefix="cw-sink-", dir="/tmp")
    path = os.path.join(d, "sink.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)

    def serve(conn: socket.socket) -> None:
        h = hashlib.sha256()
        n = 0
        buf = bytearray(1 << 20)
        while True:
            k = conn.recv_into(buf)
            if not k:
                break
            n += k
        conn.sendall(f"{h.hexdigest()} {n}\n".encode())
        conn.close()

    def run() -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=run, daemon=True).start()
    return path, s


def relay_overhead(n: int = 300, mib: int = 1024) -> dict[str, Any]:
    from host_client.relay import Relay
    from host_client.targets import parse
    from tests.conftest import make_agent
    from tests.vsock_fakes import FakeHybridVsock, GuestRelay

    agent = make_agent()
    guest = GuestRelay(str(agent.socket))
    hv = FakeHybridVsock({7070: guest.path})
    tok = str(agent.token_file)
    try:
        res = _interleaved(
            {
                "direct_unix": agent.target,
                "agent_relay": f"unix:{guest.path}",
                "full_chain_hvsock": hv.target(7070),
            },
            tok,
            n,
        )
        for key in ("info", "exec_true"):
            base = res["direct_unix"][key]["p50_ms"]
            res[f"added_p50_ms_{key}"] = {
                "agent_relay": round(res["agent_relay"][key]["p50_ms"] - base, 3),
                "full_chain": round(res["full_chain_hvsock"][key]["p50_ms"] - base, 3),
            }
        sink, srv = _sink_server()
        g2 = GuestRelay(sink)
        hv2 = FakeHybridVsock({1: g2.path})
        relay = Relay(parse(hv2.target(1)))
        try:
            res["throughput_MiBps"] = {
                "direct": round(_throughput(sink, mib), 0),
                "agent_relay": round(_throughput(g2.path, mib), 0),
                "full_chain_3_splices": round(_throughput(relay.path, mib), 0),
            }
        finally:
            relay.close()
            hv2.close()
            g2.close()
            srv.close()
        return res
    finally:
        hv.close()
        guest.close()
        agent.stop()


def vm_latency(n: int = 100) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    from tests.vm.harness import VM, guest_image, install_agent

    vm = VM(guest_image(), Path(tempfile.mkdtemp(prefix="cw-vmb-", dir="/tmp")))
    try:
        vm.start()
        boot = vm.wait_ssh()
        install_agent(vm)
        with CoworkClient(vm.hvsock_target, str(vm.token_file), connect_timeout=30) as c:
            c.wait_ready(60)
            grpc_ms = _time(lambda: c.run(["/bin/true"]), n)
        ssh_ms = _time(lambda: vm.ssh("/bin/true"), max(10, n // 5))
        g, s = _pcts(grpc_ms), _pcts(ssh_ms)
        return {
            "accel": vm.accel,
            "boot_to_ssh_s": round(boot, 1),
            "exec_true_hvsock": g,
            "exec_true_ssh": s,
            "ratio_p50": round(s["p50_ms"] / g["p50_ms"], 1),
        }
    finally:
        vm.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--vm", action="store_true", help="also boot the harness VM (slow under TCG)")
    ap.add_argument("-n", type=int, default=300, help="calls per measurement")
    ap.add_argument("--mib", type=int, default=1024, help="MiB per throughput run")
    args = ap.parse_args()
    out: dict[str, Any] = {"relay_overhead": relay_overhead(args.n, args.mib)}
    if args.vm:
        out["vm"] = vm_latency(min(args.n, 100))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
