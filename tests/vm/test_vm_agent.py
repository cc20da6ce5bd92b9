"""The host client against a real guest over real virtio-vsock.

Path of every byte: CoworkClient → host relay (host_client/relay.py) → hybrid
vsock socket of vhost-device-vsock → virtio-vsock → guest kernel AF_VSOCK →
the agent's relay (guest_agent/vsock.py) → the agent's gRPC server. The agent
was installed by lima/provision/agent.sh (see conftest.py). Tests run in file
order; the restart test is last.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.errors import NotFound
from host_client.models import Exited, Output, Started
from tests.vm.conftest import record
from tests.vm.harness import VM

# The first test also pays for the image build, boot and agent install (bounded inside).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


def test_info_and_health_over_vsock(vm: VM, vclient: CoworkClient) -> None:
    info = vclient.info()
    assert "Debian GNU/Linux 12" in info["distro"]
    assert "vsock:7070" in info["listeners"]
    assert info["hostname"] == "cowork-vm"
    assert vclient.health()
    # The guest kernel sees the connection as AF_VSOCK from the host (CID 2).
    r = vm.ssh("ss -H --vsock state established", check=False)
    text = r.stdout.decode()
    assert r.returncode == 0 and ":7070" in text and "2:" in text, text + r.stderr.decode()


def test_exec_exit_codes(vclient: CoworkClient) -> None:
    r = vclient.execute_in_vm("echo out; echo err >&2")
    assert (r.output, r.error, r.exit_code) == ("out\n", "err\n", 0)
    assert vclient.execute_in_vm("exit 3").exit_code == 3
    assert vclient.execute_in_vm("no-such-command-xyz").exit_code == 127
    assert vclient.execute_in_vm("kill -9 $$").exit_code == 128 + 9
    with pytest.raises(NotFound):
        vclient.run(["/no/such/binary"])
    r = vclient.run(["sleep", "5"], timeout=0.5)
    assert r.timed_out and r.exit_code == 124


def test_exec_streams_output_as_it_happens(vclient: CoworkClient) -> None:
    stream = vclient.exec(["sh", "-c", "for i in 1 2 3; do echo line$i; sleep 0.5; done; exit 7"])
    seen: list[tuple[float, object]] = []
    t0 = time.monotonic()
    for ev in stream:
        seen.append((time.monotonic() - t0, ev))
    kinds = [type(e) for _, e in seen]
    assert kinds[0] is Started and kinds[-1] is Exited
    outs = [(t, e) for t, e in seen if isinstance(e, Output)]
    assert b"".join(e.data for _, e in outs) == b"line1\nline2\nline3\n"
    exit_ev = seen[-1][1]
    assert isinstance(exit_ev, Exited) and exit_ev.code == 7
    # The first line arrived while the process was still running (streamed, not buffered).
    assert seen[-1][0] - outs[0][0] > 0.7


def test_pty(vclient: CoworkClient) -> None:
    stream = vclient.exec(
        ["sh", "-c", "test -t 0 && test -t 1 && echo tty-ok; stty size; echo TERM=$TERM"],
        pty=True,
        rows=33,
        cols=111,
    )
    out = b""
    code = None
    for ev in stream:
        if isinstance(ev, Output):
            out += ev.data
        elif isinstance(ev, Exited):
            code = ev.code
    text = out.decode().replace("\r", "")
    assert code == 0
    # (Sandboxed, bwrap shows the terminal as /dev/console: `tty` names no /dev/pts.)
    assert "tty-ok" in text and "33 111" in text and "TERM=" in text


def test_50_concurrent_execs(vclient: CoworkClient) -> None:
    def one(i: int) -> tuple[int, str]:
        r = vclient.execute_in_vm(f"echo job{i}; exit {i % 5}")
        return r.exit_code, r.output

    t0 = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(one, range(50)))
    record("concurrent_50_execs_s", round(time.monotonic() - t0, 2))
    assert results == [(i % 5, f"job{i}\n") for i in range(50)]


def test_256mib_up_and_down_with_checksums(vclient: CoworkClient, tmp_path: Path) -> None:
    size = 256 << 20
    src = tmp_path / "up.bin"
    h = hashlib.sha256()
    with open(src, "wb") as f:
        for _ in range(size >> 20):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    want = h.hexdigest()
    remote = "/workspace/big.bin"
    t0 = time.monotonic()
    up = vclient.upload(str(src), remote)
    t_up = time.monotonic() - t0
    assert up.bytes == size
    guest_sum = vclient.run(["sha256sum", remote], timeout=300)
    assert guest_sum.output.split()[0] == want
    back = tmp_path / "down.bin"
    t0 = time.monotonic()
    down = vclient.download(remote, str(back))
    t_down = time.monotonic() - t0
    assert down.bytes == size and down.sha256 == want
    d = hashlib.sha256()
    with open(back, "rb") as f:
        while block := f.read(1 << 20):
            d.update(block)
    assert d.hexdigest() == want
    vclient.remove(remote)
    record("upload_256MiB_MiBps", round(256 / t_up, 1))
    record("download_256MiB_MiBps", round(256 / t_down, 1))


def test_exec_latency_hvsock_vs_ssh(vm: VM, vclient: CoworkClient) -> None:
    """exec /bin/true p50 through the agent over hvsock vs a fresh `ssh` to the same guest."""
    for _ in range(5):
        vclient.run(["/bin/true"])  # warm up
    grpc_ms = []
    for _ in range(60):
        t0 = time.perf_counter()
        assert vclient.run(["/bin/true"]).exit_code == 0
        grpc_ms.append((time.perf_counter() - t0) * 1000)
    ssh_ms = []
    for _ in range(15):
        t0 = time.perf_counter()
        vm.ssh("/bin/true", timeout=60)
        ssh_ms.append((time.perf_counter() - t0) * 1000)
    g50, s50 = statistics.median(grpc_ms), statistics.median(ssh_ms)
    record("exec_true_p50_hvsock_ms", round(g50, 2))
    record("exec_true_p50_ssh_ms", round(s50, 1))
    record("ssh_over_hvsock_ratio", round(s50 / g50, 1))
    assert g50 < s50


def test_vsock_peer_filter_refuses_non_host_cids(vm: VM) -> None:
    """Inside the guest, a vsock loopback connection (CID 1) is refused by the agent."""
    script = (
        "import socket\n"
        "s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)\n"
        "s.settimeout(10)\n"
        "s.connect((1, 7070))\n"
        "s.sendall(b'PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n')\n"
        "try:\n"
        "    print('read', len(s.recv(100)))\n"
        "except ConnectionResetError:\n"
        "    print('read 0')\n"
    )
    r = vm.ssh("modprobe vsock_loopback && python3 -", stdin=script.encode(), timeout=60)
    assert r.stdout.decode().strip() == "read 0", r.stdout.decode() + r.stderr.decode()
    log = vm.ssh("journalctl --no-pager -u cowork-agent.service -n 50").stdout.decode()
    assert "CID not allowed" in log


def test_agent_restart_client_recovers(vm: VM, vclient: CoworkClient) -> None:
    def main_pid() -> str:
        return vm.ssh("systemctl show -p MainPID --value cowork-agent").stdout.decode().strip()

    before = main_pid()
    assert vclient.execute_in_vm("echo before").output == "before\n"
    t0 = time.monotonic()
    vm.ssh("systemctl restart cowork-agent", timeout=120)
    # The same client object, no reconnect call: the next call reaches the new agent.
    r = vclient.execute_in_vm("echo after")
    record("restart_recovery_s", round(time.monotonic() - t0, 2))
    assert r.output == "after\n" and r.exit_code == 0
    assert main_pid() != before
    relay = vclient.connection.relay
    assert relay is not None and relay.connections >= 2  # the relay dialled the guest again
