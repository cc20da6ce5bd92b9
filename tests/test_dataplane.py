"""The data plane (cowork/dataplane.py): file bytes on their own connection, beside gRPC.

Real agent subprocesses, real sockets. Each test proves which path carried the
bytes from the agent's audit log ("/cowork.dataplane/<op>" vs Files/Write).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cowork.dataplane import CAPABILITY, MAGIC, data_socket_path, encode, read_message
from guest_agent import vsock
from host_client import CoworkClient
from host_client import transfer as tr
from host_client.dataplane import DataPlane, TransferCut
from host_client.errors import CoworkError, PermissionDenied

from .conftest import AgentProc, make_agent, wait_until
from .resources import footprint
from .test_cli import ctl, one_line_error
from .vsock_fakes import FakeHybridVsock, GuestRelay

MiB = 1 << 20


def audit(agent: AgentProc, method: str) -> list[dict[str, Any]]:
    out = []
    for line in agent.log_lines():
        rec = json.loads(line)
        if rec.get("method", "").endswith(method):
            out.append(rec)
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plane(c: CoworkClient) -> DataPlane:
    dp = tr.data_plane(c.connection)
    assert isinstance(dp, DataPlane)
    return dp


def raw(agent: AgentProc, hello: dict[str, Any], magic: bytes = MAGIC) -> dict[str, Any]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(data_socket_path(str(agent.socket)))
    try:
        s.sendall(magic + encode(hello))
        return read_message(s)
    finally:
        s.close()


# -- round trips -------------------------------------------------------------------------


def test_agent_advertises_the_data_plane_and_listens_beside_its_socket(
    client: CoworkClient, agent: AgentProc
) -> None:
    assert CAPABILITY in client.connection.capabilities()
    assert os.path.exists(data_socket_path(str(agent.socket)))
    assert oct(os.stat(data_socket_path(str(agent.socket))).st_mode & 0o777) == "0o600"


def test_large_file_round_trip_is_byte_exact_over_the_data_plane(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(40 * MiB + 12345))
    up = client.upload(str(src), str(workdir / "big.bin"))
    back = tmp_path / "back.bin"
    down = client.download(str(workdir / "big.bin"), str(back))
    assert up.sha256 == down.sha256 == sha(src) == sha(workdir / "big.bin") == sha(back)
    assert (up.bytes, down.bytes) == (src.stat().st_size,) * 2
    assert audit(agent, "/cowork.dataplane/upload")[-1]["bytes"] == src.stat().st_size
    assert audit(agent, "/cowork.dataplane/download")[-1]["bytes"] == src.stat().st_size


def test_empty_file_round_trip(client: CoworkClient, workdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    up = client.upload(str(src), str(workdir / "empty"))
    back = tmp_path / "back"
    down = client.download(str(workdir / "empty"), str(back))
    assert up.sha256 == down.sha256 == hashlib.sha256(b"").hexdigest()
    assert (workdir / "empty").read_bytes() == b"" == back.read_bytes()


def test_upload_keeps_mode_and_mtime(client: CoworkClient, workdir: Path, tmp_path: Path) -> None:
    src = tmp_path / "tool.sh"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(0o750)
    os.utime(src, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    client.upload(str(src), str(workdir / "tool.sh"))
    st = (workdir / "tool.sh").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o750, 1_600_000_000_000_000_000)


def _tree(root: Path) -> None:
    (root / "a" / "b").mkdir(parents=True)
    (root / "empty-dir").mkdir()
    for i in range(300):
        (root / "a" / f"f{i}.txt").write_bytes(os.urandom(i * 13))
    (root / "a" / "b" / "big.bin").write_bytes(os.urandom(3 * MiB))
    (root / "a" / "b" / "empty").write_bytes(b"")
    (root / "link").symlink_to("a/f1.txt")
    (root / "dangling").symlink_to("/nowhere/at/all")


def _listing(root: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    for d, dirs, files in os.walk(root):
        for n in dirs + files:
            p = Path(d) / n
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = sha(p)
    return out


def test_tree_upload_is_exact_on_one_data_connection(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    _tree(tmp_path / "t")
    before = len(audit(agent, "/cowork.dataplane/tree"))
    r = client.upload(str(tmp_path / "t"), str(workdir / "t"))
    assert _listing(workdir / "t") == _listing(tmp_path / "t")
    assert (r.files, r.symlinks, r.skipped) == (302, 2, [])
    assert len(audit(agent, "/cowork.dataplane/tree")) == before + 1
    assert not [n for n in os.listdir(workdir / "t" / "a") if n.startswith(".cowork-")]


def test_a_tree_file_where_a_directory_stands_is_skipped(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "t" / "x").mkdir(parents=True)
    (workdir / "t" / "x" / "keep").write_bytes(b"k")
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_bytes(b"file")
    (tmp_path / "t" / "y").write_bytes(b"y")
    r = client.upload(str(tmp_path / "t"), str(workdir / "t"))
    assert [(s.path, s.reason) for s in r.skipped] == [
        (str(workdir / "t" / "x"), f"is a directory: {workdir / 't' / 'x'}")
    ]
    assert (workdir / "t" / "x" / "keep").read_bytes() == b"k"
    assert (workdir / "t" / "y").read_bytes() == b"y"
    assert not [n for n in os.listdir(workdir / "t") if n.startswith(".cowork-")]


def test_tree_download_is_exact(client: CoworkClient, workdir: Path, tmp_path: Path) -> None:
    _tree(workdir / "t")
    client.download(str(workdir / "t"), str(tmp_path / "t"))
    assert _listing(tmp_path / "t") == _listing(workdir / "t")


def test_over_hvsock_the_relay_sends_data_connections_to_the_data_plane(
    agent: AgentProc, tmp_path: Path
) -> None:
    """hvsock: target -> hybrid-vsock stand-in -> the agent's own RelayListener (on a unix
    socket: no vsock_loopback here), whose first-byte sniff diverts data connections."""
    data = data_socket_path(str(agent.socket))
    diverted: list[Any] = []

    def divert(conn: socket.socket, addr: Any) -> None:
        diverted.append(addr)
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(data)
        vsock.Splice(conn, up, name="data").run_b_to_a_here()

    guest = GuestRelay(str(agent.socket))
    guest.listener.divert = divert
    hv = FakeHybridVsock({7070: guest.path})
    try:
        src = tmp_path / "x.bin"
        src.write_bytes(os.urandom(5 * MiB))
        with CoworkClient(hv.target(7070), str(agent.token_file)) as c:
            assert c.info()  # gRPC through the same relay still works
            remote = str(agent.root / "hv.bin")
            up = c.upload(str(src), remote)
            c.download(remote, str(tmp_path / "back.bin"))
        assert up.sha256 == sha(src) == sha(tmp_path / "back.bin")
        assert len(diverted) == 2
    finally:
        hv.close()
        guest.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_tcp_target_falls_back_to_grpc_streaming(tmp_path: Path) -> None:
    port = _free_port()
    a = _tcp_agent(port)
    try:
        src = tmp_path / "f.bin"
        src.write_bytes(os.urandom(MiB))
        with CoworkClient(f"tcp:127.0.0.1:{port}", str(a.token_file)) as c:
            assert CAPABILITY not in c.connection.capabilities()
            assert tr.data_plane(c.connection) is None
            r = c.upload(str(src), str(a.root / "f.bin"))
        assert r.sha256 == sha(src)
        assert wait_until(lambda: audit(a, ".Files/Write"), 5)
        assert not audit(a, "/cowork.dataplane/upload")
    finally:
        a.stop()


def _tcp_agent(port: int) -> AgentProc:
    """An agent listening on tcp only (its health is polled over tcp)."""

    class TcpAgent(AgentProc):
        @property
        def target(self) -> str:
            return f"tcp:127.0.0.1:{port}"

    import secrets
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="cw-", dir="/tmp"))
    (d / "ws").mkdir()
    (d / "token").write_text(secrets.token_hex(32))
    (d / "token").chmod(0o600)
    a = TcpAgent(d, d / "ws", d / "token", d / "unused.sock")
    a.start()
    return a


# -- cut uploads and --resume --------------------------------------------------------------


def test_a_cut_upload_leaves_no_file_at_the_target(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "cut.bin"
    src.write_bytes(os.urandom(24 * MiB))
    with pytest.raises(TransferCut) as ei:
        plane(client).upload_file(str(src), str(workdir / "cut.bin"), cut_after=10 * MiB)
    assert "--resume" in ei.value.message
    assert not (workdir / "cut.bin").exists()


def test_resume_continues_from_the_verified_offset_without_resending(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "resume.bin"
    src.write_bytes(os.urandom(24 * MiB + 777))
    size = src.stat().st_size
    remote = str(workdir / "resume.bin")
    dp = plane(client)
    seen = len(audit(agent, "/cowork.dataplane/upload"))
    with pytest.raises(TransferCut):
        dp.upload_file(str(src), remote, cut_after=10 * MiB)
    assert wait_until(lambda: len(audit(agent, "/cowork.dataplane/upload")) > seen, 10)
    first = audit(agent, "/cowork.dataplane/upload")[-1]
    arrived = first["bytes"]
    assert first["code"] == "CANCELLED" and 0 < arrived <= 10 * MiB
    r = tr.resume_upload(client.connection, str(src), remote)
    assert r.extra["resumed_from"] == arrived
    assert r.extra["sent"] == size - arrived  # what arrived was not sent again
    assert wait_until(lambda: len(audit(agent, "/cowork.dataplane/upload")) > seen + 1, 10)
    assert audit(agent, "/cowork.dataplane/upload")[-1]["bytes"] == size - arrived
    assert r.sha256 == sha(src) == sha(workdir / "resume.bin")
    assert not [n for n in os.listdir(workdir) if n.startswith(".cowork-")]


def test_resume_restarts_when_the_partial_no_longer_matches(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "tamper.bin"
    src.write_bytes(os.urandom(16 * MiB))
    remote = str(workdir / "tamper.bin")
    with pytest.raises(TransferCut):
        plane(client).upload_file(str(src), remote, cut_after=6 * MiB)
    [part] = [p for p in workdir.iterdir() if p.name.startswith(".cowork-part-")]
    with open(part, "r+b") as f:  # the sandbox scribbles on the partial
        f.write(b"tampered")
    r = tr.resume_upload(client.connection, str(src), remote)
    assert r.extra["resumed_from"] == 0 and r.extra["sent"] == src.stat().st_size
    assert sha(workdir / "tamper.bin") == sha(src)


def test_resume_with_nothing_partial_sends_everything(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "fresh.bin"
    src.write_bytes(os.urandom(MiB))
    r = tr.resume_upload(client.connection, str(src), str(workdir / "fresh.bin"))
    assert (r.extra["resumed_from"], r.extra["sent"]) == (0, MiB)


# -- refused ---------------------------------------------------------------------------------


def test_a_bad_token_is_refused(agent: AgentProc) -> None:
    reply = raw(agent, {"token": "0" * 64, "op": "download", "path": "x"})
    assert reply["ok"] is False and reply["code"] == "UNAUTHENTICATED"
    assert "token" in reply["message"]
    assert wait_until(lambda: audit(agent, "/cowork.dataplane/?"), 5)
    assert audit(agent, "/cowork.dataplane/?")[-1]["code"] == "UNAUTHENTICATED"


def test_a_connection_without_the_magic_is_refused(agent: AgentProc) -> None:
    reply = raw(agent, {"token": agent.token, "op": "download"}, magic=b"PRI * HTTP/2.0")
    assert (reply["ok"], reply["code"]) == (False, "INVALID_ARGUMENT")


def test_an_unknown_op_is_invalid_argument(agent: AgentProc) -> None:
    reply = raw(agent, {"token": agent.token, "op": "format-disk"})
    assert (reply["code"], reply["message"]) == (
        "INVALID_ARGUMENT",
        "unknown data plane op 'format-disk'",
    )


def test_a_bad_field_type_is_invalid_argument(agent: AgentProc) -> None:
    reply = raw(agent, {"token": agent.token, "op": "upload", "path": "x", "size": "big"})
    assert (reply["code"], reply["message"]) == ("INVALID_ARGUMENT", "'size' must be an integer")


def test_upload_outside_the_root_is_permission_denied(
    client: CoworkClient, agent: AgentProc, tmp_path: Path
) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"x")
    target = agent.dir / "outside-upload.txt"  # a name no other test (sharing the agent) uses
    with pytest.raises(PermissionDenied):
        client.upload(str(src), str(target))
    assert not target.exists()


def test_upload_through_an_escaping_symlink_is_refused(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    outside = agent.dir / "escape-target"
    outside.mkdir(exist_ok=True)
    (workdir / "esc").symlink_to(outside)
    src = tmp_path / "f"
    src.write_bytes(b"x")
    with pytest.raises(PermissionDenied):
        client.upload(str(src), str(workdir / "esc" / "f"))
    _tree(tmp_path / "t")
    with pytest.raises(PermissionDenied):
        client.upload(str(tmp_path / "t"), str(workdir / "esc" / "t"))
    assert os.listdir(outside) == []


def test_a_tree_entry_below_an_escaping_symlink_is_skipped(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    outside = agent.dir / "escape-target-2"
    outside.mkdir(exist_ok=True)
    (workdir / "t" / "sub").mkdir(parents=True)
    (workdir / "t" / "esc").symlink_to(outside)
    (tmp_path / "t" / "esc").mkdir(parents=True)
    (tmp_path / "t" / "esc" / "f").write_bytes(b"x")
    (tmp_path / "t" / "ok").write_bytes(b"fine")
    r = client.upload(str(tmp_path / "t"), str(workdir / "t"))
    assert (workdir / "t" / "ok").read_bytes() == b"fine"
    esc = workdir / "t" / "esc"
    assert [s.path for s in r.skipped] == [str(esc), str(esc / "f")]
    assert os.listdir(outside) == []


def test_download_through_an_escaping_symlink_is_refused(
    client: CoworkClient, agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    secret = agent.dir / "secret.txt"
    secret.write_text("SECRET")
    (workdir / "s").symlink_to(secret)
    dp = plane(client)
    with pytest.raises(PermissionDenied):
        dp.download_file(str(workdir / "s"), str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


# -- the symlink race (tests/test_files_race.py's flipper, data plane operations) -----------


def test_no_data_plane_transfer_escapes_while_a_directory_flips(tmp_path: Path) -> None:
    from .test_files_race import FLIPPER, SECRET, _snapshot, prepare

    agent = make_agent()
    try:
        canary = prepare(agent)
        before = _snapshot(canary)
        outside_before = sorted(os.listdir(agent.dir))
        src = tmp_path / "f"
        src.write_bytes(b"mine " * 1000)
        tree = tmp_path / "t"
        (tree / "sub").mkdir(parents=True)
        (tree / "sub" / "f").write_text("x")
        flipper = subprocess.Popen(
            [sys.executable, "-c", FLIPPER, str(agent.root)], stdout=subprocess.PIPE, text=True
        )
        assert flipper.stdout is not None and flipper.stdout.readline().strip() == "ready"
        codes: dict[str, int] = {}
        leaked: list[str] = []
        try:
            with agent.client() as c:
                dp = plane(c)
                for i in range(400):
                    for op in ("up", "down", "tree"):
                        try:
                            if op == "up":
                                dp.upload_file(str(src), f"{agent.root}/d/f")
                            elif op == "down":
                                dp.download_file(f"{agent.root}/d/f", str(tmp_path / "got"))
                                if SECRET in (tmp_path / "got").read_text():
                                    leaked.append("read the canary")
                            else:
                                c.upload(str(tree), f"{agent.root}/d/t{i % 5}")
                            codes["OK"] = codes.get("OK", 0) + 1
                        except CoworkError as exc:
                            codes[exc.code] = codes.get(exc.code, 0) + 1
        finally:
            flipper.terminate()
            flipper.communicate(timeout=10)
        after = _snapshot(canary)
        new_outside = [
            n for n in os.listdir(agent.dir) if n not in outside_before and n != "agent.log"
        ]
        assert leaked == []
        assert before == after
        assert new_outside == []
        assert set(codes) <= {"OK", "PERMISSION_DENIED", "NOT_FOUND", "FAILED_PRECONDITION"}
        assert codes.get("OK", 0) > 0
        assert not [line for line in agent.log_lines() if "Traceback" in line]
    finally:
        agent.stop()


# -- resources --------------------------------------------------------------------------------


@pytest.fixture
def rss_agent() -> Iterator[AgentProc]:
    a = make_agent()
    yield a
    a.stop()


def test_agent_rss_stays_bounded_on_a_2_gib_file(rss_agent: AgentProc, tmp_path: Path) -> None:
    src = tmp_path / "2g.bin"
    with open(src, "wb") as f:  # sparse: reads as zeros, costs no disk to make
        f.truncate(2 << 30)
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], footprint(rss_agent.pid).rss)

    th = threading.Thread(target=sample)
    th.start()
    try:
        with rss_agent.client() as c:
            remote = str(rss_agent.root / "2g.bin")
            r = c.upload(str(src), remote)
            assert r.bytes == 2 << 30
            c.download(remote, str(tmp_path / "back.bin"))
            os.unlink(remote)
    finally:
        done.set()
        th.join()
    assert (tmp_path / "back.bin").stat().st_size == 2 << 30
    assert peak[0] < 150 * MiB, f"agent peak RSS {peak[0] / MiB:.0f} MiB"


def test_no_fd_or_thread_leak_after_many_transfers(rss_agent: AgentProc, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(256 * 1024))
    tree = tmp_path / "t"
    (tree / "d").mkdir(parents=True)
    for i in range(20):
        (tree / "d" / f"{i}").write_bytes(b"x" * i)
    with rss_agent.client() as c:
        dp = plane(c)
        dp.upload_file(str(src), str(rss_agent.root / "warm"))
        base = footprint(rss_agent.pid)
        for i in range(60):
            dp.upload_file(str(src), str(rss_agent.root / f"f{i % 3}"))
            dp.download_file(str(rss_agent.root / f"f{i % 3}"), str(tmp_path / "back"))
            c.upload(str(tree), str(rss_agent.root / "tree"))
            with pytest.raises(CoworkError):
                dp.download_file(str(rss_agent.root / "missing"), str(tmp_path / "m"))
            if i % 10 == 0:
                with pytest.raises(TransferCut):
                    dp.upload_file(str(src), str(rss_agent.root / "cut"), cut_after=1000)
    after = footprint(rss_agent.pid)
    # Connection threads end with their connection: give the last ones a moment.
    for _ in range(100):
        after = footprint(rss_agent.pid)
        if after.threads <= base.threads and after.fds <= base.fds:
            break
        threading.Event().wait(0.05)
    assert (after.fds, after.threads) <= (base.fds, base.threads), (base, after)


# -- the CLI ------------------------------------------------------------------------------------


def test_cli_cp_resume_uploads_and_prints_json(agent: AgentProc, tmp_path: Path) -> None:
    src = tmp_path / "cli.bin"
    src.write_bytes(os.urandom(MiB))
    r = ctl(agent, "--json", "cp", "--resume", str(src), "vm:cli-resume.bin")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["sha256"] == sha(src) == sha(agent.root / "cli-resume.bin")


def test_cli_cp_resume_of_a_download_is_one_line(agent: AgentProc, tmp_path: Path) -> None:
    r = ctl(agent, "cp", "--resume", "vm:whatever", str(tmp_path / "x"))
    assert r.returncode == 2
    assert "--resume continues uploads" in one_line_error(r)


def test_cli_cp_resume_of_a_directory_is_one_line(agent: AgentProc, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    r = ctl(agent, "cp", "--resume", str(tmp_path / "d"), "vm:resume-dir")
    assert r.returncode == 1
    assert "--resume copies one regular file" in one_line_error(r)


def test_cli_cp_resume_without_a_data_plane_names_the_capability(tmp_path: Path) -> None:
    a = _tcp_agent(_free_port())
    try:
        src = tmp_path / "f"
        src.write_bytes(b"x")
        r = ctl(a, "cp", "--resume", str(src), "vm:f")
        assert r.returncode == 1
        assert "'files.dataplane'" in one_line_error(r)
    finally:
        a.stop()
