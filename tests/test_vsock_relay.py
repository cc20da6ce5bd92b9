"""The vsock relays without a VM: the host client's hvsock relay against a fake
hybrid-vsock socket that speaks the real CONNECT/OK protocol, and the agent's
own relay listener (on a unix socket in place of AF_VSOCK), both carrying real
gRPC to a real agent. The real AF_VSOCK path runs in tests/vm (make e2e).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import grpc.aio
import pytest

from guest_agent import vsock
from guest_agent.listeners import Listen, ListenError
from host_client import CoworkClient
from host_client.errors import AgentUnavailable
from host_client.relay import Relay, RelayError, dial
from host_client.targets import parse
from tests.conftest import AgentProc, wait_until
from tests.vsock_fakes import FakeHybridVsock, GuestRelay

PORT = 7070


@pytest.fixture
def chain(agent: AgentProc) -> Iterator[tuple[FakeHybridVsock, GuestRelay]]:
    """hvsock fake → guest relay → agent: both relays in the path, as in the VM."""
    guest = GuestRelay(str(agent.socket))
    hv = FakeHybridVsock({PORT: guest.path})
    yield hv, guest
    hv.close()
    guest.close()


def test_client_over_hvsock_and_guest_relay(
    agent: AgentProc, chain: tuple[FakeHybridVsock, GuestRelay]
) -> None:
    hv, guest = chain
    with CoworkClient(hv.target(PORT), str(agent.token_file)) as c:
        info = c.info()
        assert info
        r = c.execute_in_vm("echo out; echo err >&2; exit 3")
        assert (r.output, r.error, r.exit_code) == ("out\n", "err\n", 3)
        assert c.health()
    assert hv.handshakes and hv.handshakes[0] == f"CONNECT {PORT}\n"
    assert guest.listener.accepted >= 1


def test_large_transfer_through_both_relays_is_byte_exact(
    agent: AgentProc, chain: tuple[FakeHybridVsock, GuestRelay], tmp_path: Path
) -> None:
    hv, _ = chain
    data = os.urandom(48 << 20)
    src = tmp_path / "up.bin"
    src.write_bytes(data)
    remote = str(agent.root / "relay-big.bin")
    back = tmp_path / "down.bin"
    with CoworkClient(hv.target(PORT), str(agent.token_file)) as c:
        c.upload(str(src), remote)
        c.download(remote, str(back))
        out = c.run(["sha256sum", remote])
    want = hashlib.sha256(data).hexdigest()
    assert hashlib.sha256(back.read_bytes()).hexdigest() == want
    assert out.output.split()[0] == want
    os.unlink(remote)


def test_concurrent_calls_share_one_relayed_connection(
    agent: AgentProc, chain: tuple[FakeHybridVsock, GuestRelay]
) -> None:
    hv, _ = chain
    with CoworkClient(hv.target(PORT), str(agent.token_file)) as c:

        def one(i: int) -> tuple[int, str]:
            r = c.execute_in_vm(f"echo {i}; exit {i % 7}")
            return r.exit_code, r.output

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(one, range(64)))
    assert results == [(i % 7, f"{i}\n") for i in range(64)]
    # HTTP/2 multiplexes: one (or very few) relayed connections for all of it.
    assert len(hv.handshakes) <= 2


def test_client_survives_agent_restart_over_hvsock(own_agent: AgentProc) -> None:
    guest = GuestRelay(str(own_agent.socket))
    hv = FakeHybridVsock({PORT: guest.path})
    try:
        with CoworkClient(hv.target(PORT), str(own_agent.token_file)) as c:
            assert c.execute_in_vm("true").exit_code == 0
            own_agent.restart()
            c.wait_ready(20)
            assert c.execute_in_vm("echo again").output == "again\n"
        assert len(hv.handshakes) >= 2  # the relay dialled the guest again
    finally:
        hv.close()
        guest.close()


# -- handshake errors ---------------------------------------------------------


def test_dial_missing_socket_names_path_and_port(tmp_path: Path) -> None:
    t = parse(f"hvsock:{tmp_path}/nope.sock:{PORT}")
    with pytest.raises(RelayError) as ei:
        dial(t, timeout=2)
    msg = str(ei.value)
    assert f"{tmp_path}/nope.sock" in msg and str(PORT) in msg and "does not exist" in msg


@pytest.mark.parametrize(
    ("mode", "needle"),
    [("close", "refused"), ("silent", "no reply"), ("garbage", "unexpected handshake reply")],
)
def test_dial_handshake_failures_are_clear(mode: str, needle: str) -> None:
    hv = FakeHybridVsock({}, mode=mode)
    try:
        t0 = time.monotonic()
        with pytest.raises(RelayError) as ei:
            dial(parse(hv.target(4242)), timeout=1.0)
        assert time.monotonic() - t0 < 5
        msg = str(ei.value)
        assert needle in msg and hv.path in msg and "4242" in msg
    finally:
        hv.close()


def test_refused_guest_port_gives_unavailable_and_relay_keeps_the_reason(
    agent: AgentProc,
) -> None:
    hv = FakeHybridVsock({})  # guest listens on nothing
    try:
        c = CoworkClient(hv.target(9999), str(agent.token_file), connect_timeout=1.0)
        with pytest.raises(AgentUnavailable):
            c.info()
        relay = c.connection.relay
        assert relay is not None and relay.last_error is not None
        assert "9999" in relay.last_error and hv.path in relay.last_error
        c.close()
    finally:
        hv.close()


def test_relay_closes_cleanly_and_removes_its_socket(
    agent: AgentProc, chain: tuple[FakeHybridVsock, GuestRelay]
) -> None:
    hv, _ = chain
    before = threading.active_count()
    relay = Relay(parse(hv.target(PORT)))
    path = relay.path
    assert relay.address == f"unix:{path}" and os.path.exists(path)
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
    with CoworkClient(f"unix:{path}", str(agent.token_file)) as c:
        assert c.execute_in_vm("true").exit_code == 0
    assert wait_until(lambda: relay.active == 0, 5)
    relay.close()
    relay.close()  # idempotent
    assert not os.path.exists(os.path.dirname(path))
    assert wait_until(lambda: threading.active_count() <= before, 5)


def test_relay_rejects_other_target_kinds() -> None:
    from host_client.targets import TargetError

    with pytest.raises(TargetError):
        Relay(parse("unix:/tmp/x.sock"))


# -- raw byte semantics (half-close, reset, back-pressure) --------------------


def _raw_server(handler: object) -> tuple[str, socket.socket]:
    d = Path(os.path.realpath(os.environ.get("TMPDIR", "/tmp")))
    path = str(d / f"cw-raw-{os.getpid()}-{time.monotonic_ns()}.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)

    def run() -> None:
        while True:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=handler, args=(conn,), daemon=True).start()  # type: ignore[arg-type]

    threading.Thread(target=run, daemon=True).start()
    return path, s


def _digest_after_eof(conn: socket.socket) -> None:
    """Read to EOF, then answer with the sha256 and the count: needs half-close to pass."""
    h = hashlib.sha256()
    n = 0
    while True:
        b = conn.recv(1 << 16)
        if not b:
            break
        h.update(b)
        n += len(b)
    conn.sendall(f"{h.hexdigest()} {n}\n".encode())
    conn.close()


def _through_both(backend: str) -> tuple[FakeHybridVsock, GuestRelay, Relay]:
    guest = GuestRelay(backend)
    hv = FakeHybridVsock({PORT: guest.path})
    return hv, guest, Relay(parse(hv.target(PORT)))


def test_half_close_passes_through_both_relays() -> None:
    backend, srv = _raw_server(_digest_after_eof)
    hv, guest, relay = _through_both(backend)
    try:
        data = os.urandom(5 << 20)
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(20)
        c.connect(relay.path)
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while not reply.endswith(b"\n"):
            b = c.recv(256)
            assert b, "connection closed before the reply: half-close was not passed on"
            reply += b
        assert reply.decode().split() == [hashlib.sha256(data).hexdigest(), str(len(data))]
        assert c.recv(16) == b""  # and the close after it
        c.close()
        assert wait_until(lambda: relay.active == 0 and not guest.listener.active, 5)
    finally:
        relay.close()
        hv.close()
        guest.close()
        srv.close()


def test_backend_reset_reaches_the_client() -> None:
    def reset(conn: socket.socket) -> None:
        conn.recv(10)
        conn.close()  # with unread data queued: the peer sees a reset/EOF

    backend, srv = _raw_server(reset)
    hv, guest, relay = _through_both(backend)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(10)
        c.connect(relay.path)
        c.sendall(b"x" * 4096)
        try:
            got = c.recv(16)
        except ConnectionResetError:
            got = b""
        assert got == b""
        c.close()
        assert wait_until(lambda: relay.active == 0 and not guest.listener.active, 5)
    finally:
        relay.close()
        hv.close()
        guest.close()
        srv.close()


def test_backpressure_bounds_what_is_in_flight() -> None:
    stop = threading.Event()

    def sleepy(conn: socket.socket) -> None:
        stop.wait(30)  # never reads
        conn.close()

    backend, srv = _raw_server(sleepy)
    hv, guest, relay = _through_both(backend)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(relay.path)
        c.setblocking(False)
        sent = 0
        chunk = b"\0" * (1 << 16)
        idle_since = time.monotonic()
        while time.monotonic() - idle_since < 1.0 and sent < (512 << 20):
            try:
                sent += c.send(chunk)
                idle_since = time.monotonic()
            except BlockingIOError:
                time.sleep(0.01)
        # Three hops of socket buffers plus the relays' pipes: tens of MiB at most,
        # never "everything we sent" (that would mean a relay buffers without bound).
        assert sent < (64 << 20), f"{sent} bytes accepted by a reader that never reads"
        c.close()
    finally:
        stop.set()
        relay.close()
        hv.close()
        guest.close()
        srv.close()


# -- the agent side -----------------------------------------------------------


def test_guest_relay_refuses_disallowed_peers(agent: AgentProc) -> None:
    guest = GuestRelay(str(agent.socket), peer_ok=lambda addr: False)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(guest.path)
        assert c.recv(1) == b""
        c.close()
        assert guest.listener.refused == 1 and guest.listener.accepted == 0
    finally:
        guest.close()


def test_peer_filter() -> None:
    host_only = vsock.peer_filter(vsock.DEFAULT_ALLOWED_CIDS)
    assert host_only((2, 1234)) and not host_only((3, 1234)) and not host_only("")
    assert vsock.peer_filter(None)((77, 1))
    assert vsock.peer_filter([5, 6])((6, 1)) and not vsock.peer_filter([5, 6])((2, 1))


def _has_af_vsock() -> bool:
    try:
        socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM).close()
        return True
    except (AttributeError, OSError):
        return False


def test_start_relays_binds_vsock_and_a_private_socket() -> None:
    """Real AF_VSOCK bind where the kernel has a transport; a clear error where it has none."""

    async def go() -> None:
        server = grpc.aio.server()
        listen = Listen("vsock", port=17070 + os.getpid() % 1000)
        if not _has_af_vsock():
            with pytest.raises(ListenError, match="AF_VSOCK"):
                await vsock.start_relays(server, [listen])
            return
        relays = await vsock.start_relays(server, [listen])
        await server.start()
        (r,) = relays
        assert isinstance(r, vsock.VsockRelays)
        sock_path = os.path.join(r.private_dir, "grpc.sock")
        assert oct(os.stat(r.private_dir).st_mode & 0o777) == "0o700"
        assert os.path.exists(sock_path)
        # The port is taken now: a second agent gets a clear error, not a traceback.
        with pytest.raises(ListenError, match=str(listen.port)):
            await vsock.start_relays(grpc.aio.server(), [listen])
        r.close()
        assert not os.path.exists(r.private_dir)
        await server.stop(0)

    asyncio.run(go())


def _agent_argv(port: int, tok: Path, root: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "guest_agent", "--allow-root", "--listen", f"vsock:{port}"),
        *("--token-file", str(tok), "--root", str(root)),
    ]


def test_agent_cli_with_vsock_listener(tmp_path: Path) -> None:
    """`cowork-agent --listen vsock:PORT`: serves (and lists it) where the kernel has a vsock
    transport; exits 2 with a one-line reason where it has none. Never a traceback."""
    from tests.conftest import AgentProc as Proc

    tok = tmp_path / "tok"
    tok.write_text("t" * 40)
    tok.chmod(0o600)
    port = 27070 + os.getpid() % 1000
    if not _has_af_vsock():
        r = subprocess.run(
            _agent_argv(port, tok, tmp_path), capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 2 and "AF_VSOCK" in r.stderr and "Traceback" not in r.stderr
        return
    d = Path(tempfile.mkdtemp(prefix="cw-vs-", dir="/tmp"))
    a = Proc(d, tmp_path, tok, d / "agent.sock", ["--listen", f"vsock:{port}"])
    try:
        a.start()
        with a.client() as c:
            listens = str(c.info())
        assert f"vsock:{port}" in listens
        # Same port again from a second agent: exit 2 with a clear message.
        r = subprocess.run(
            _agent_argv(port, tok, tmp_path), capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 2 and str(port) in r.stderr and "Traceback" not in r.stderr
    finally:
        a.stop()
        shutil.rmtree(d, ignore_errors=True)


def test_splice_and_copy_pumps_agree() -> None:
    """Both pump implementations (splice through a pipe, and the recv/send fallback)."""
    data = os.urandom(3 << 20)
    for impl in (vsock._pump_splice, vsock._pump_copy):
        a1, a2 = socket.socketpair()
        b1, b2 = socket.socketpair()
        got = bytearray()

        def reader(sock: socket.socket = b2, out: bytearray = got) -> None:
            while True:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                out += chunk

        t = threading.Thread(target=reader)
        t.start()
        w = threading.Thread(target=lambda s=a1: (s.sendall(data), s.shutdown(socket.SHUT_WR)))
        w.start()
        n = impl(a2, b1, lambda _n: None)
        b1.shutdown(socket.SHUT_WR)
        w.join(10)
        t.join(10)
        assert n == len(data) and bytes(got) == data
        for s in (a1, a2, b1, b2):
            s.close()


def test_grpc_channel_to_dead_relay_target_is_unavailable_quickly(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("t" * 40)
    with CoworkClient(f"hvsock:{tmp_path}/gone.sock:{PORT}", str(tok), connect_timeout=0.5) as c:
        t0 = time.monotonic()
        with pytest.raises(AgentUnavailable):
            c.info()
        assert time.monotonic() - t0 < 10
    assert grpc  # imported for the channel types used by the client


def _local_cid() -> int | None:
    import fcntl
    import struct

    try:
        with open("/dev/vsock", "rb") as f:
            out = fcntl.ioctl(f, 0x7B9, b"\0" * 4)  # IOCTL_VM_SOCKETS_GET_LOCAL_CID
    except OSError:
        return None
    return int(struct.unpack("I", out)[0])


def test_dial_vsock_errors_name_cid_and_port() -> None:
    """AF_VSOCK dial failures are one clear line. (A successful AF_VSOCK dial needs a VM
    with kernel vhost-vsock; this host has none, the VM tier uses hvsock.)"""
    cid = _local_cid()
    if cid is None or not _has_af_vsock():
        with pytest.raises(RelayError, match="AF_VSOCK"):
            dial(parse(f"vsock:3:{PORT}"), timeout=2)
        return
    # Our own CID without a loopback transport: refused locally, nothing leaves this host.
    with pytest.raises(RelayError) as ei:
        dial(parse(f"vsock:{cid}:{PORT}"), timeout=2)
    msg = str(ei.value)
    assert f"CID {cid}" in msg and f"port {PORT}" in msg
