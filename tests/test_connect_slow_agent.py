"""A connection whose agent is slow to answer the HTTP/2 handshake (a busy agent, a
loaded machine, a slow forward) still connects: a call that cannot be retried, such as
an exec with piped stdin, must not fail on the first attempt's deadline."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, AgentProc

DELAY = 0.5  # before the first byte goes to the agent: its SETTINGS frame comes later


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


@pytest.fixture
def slow_socket(agent: AgentProc, tmp_path: Path) -> Iterator[Path]:
    """A unix socket that relays to the agent, each connection only after DELAY."""
    path = Path("/tmp") / f"cw-slow-{tmp_path.name[-20:]}.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(16)
    conns: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            time.sleep(DELAY)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(str(agent.socket))
            except OSError:
                client.close()
                upstream.close()
                continue
            conns.extend((client, upstream))
            threading.Thread(target=_pump, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield path
    finally:
        srv.close()
        for c in conns:
            c.close()
        path.unlink(missing_ok=True)


def test_an_exec_with_piped_stdin_waits_out_a_slow_handshake(
    agent: AgentProc, slow_socket: Path
) -> None:
    argv = [sys.executable, "-m", "host_client.cli", "--target", f"unix:{slow_socket}"]
    argv += ["--token-file", str(agent.token_file), "exec", "--", "sh", "-c", "exit 3"]
    r = subprocess.run(argv, cwd=REPO, input=b"", capture_output=True, timeout=60)
    assert r.returncode == 3, r.stderr.decode()
