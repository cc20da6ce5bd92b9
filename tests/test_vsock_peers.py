"""Which vsock peers the agent accepts is what its command line says.

--vsock-peer-cid (repeatable, default 2 = the host) and --vsock-any-peer reach the
relay listener's accept/refuse decision. This host has no vsock_loopback, so nothing
can connect over AF_VSOCK here; the tests follow the flags from argv through
AgentConfig into a started relay and ask the listener's own decision function, and
check that the agent process passes them to its relay (its log line).
(That a refused peer is closed and never reaches gRPC: test_vsock_relay.py.)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import grpc.aio
import pytest

from guest_agent import listeners, vsock
from guest_agent.__main__ import build_parser, config_from_args

from .conftest import REPO, wait_until

PORT = 37070 + os.getpid() % 1000
PEERS = (2, 3, 5, 77)


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    tok = tmp_path / "token"
    tok.write_text(secrets.token_hex(32))
    tok.chmod(0o600)
    return [
        "--allow-root",
        "--token-file",
        str(tok),
        "--root",
        str(tmp_path),
        "--listen",
        f"vsock:{PORT}",
        *extra,
    ]


def _accepted(tmp_path: Path, *flags: str) -> list[int]:
    """The CIDs among PEERS that a relay started with the command line's config accepts.

    (Started as AgentServer.start starts it, but without an AgentServer in this process:
    that would make pytest a subreaper. test_the_agent_log_names_the_peers_... covers
    the agent process itself.)
    """
    cfg = config_from_args(build_parser().parse_args(_argv(tmp_path, *flags)))
    listens = [listeners.parse(a) for a in cfg.listen]

    async def go() -> list[int]:
        server = grpc.aio.server()
        (relays,) = await vsock.start_relays(server, listens, cfg.vsock_peer_cids)
        try:
            (listener,) = relays.listeners
            return [cid for cid in PEERS if listener.peer_ok((cid, 1024))]
        finally:
            relays.close()
            await server.stop(0)

    return asyncio.run(go())


def test_by_default_only_the_host_may_connect(tmp_path: Path) -> None:
    assert _accepted(tmp_path) == [2]


def test_vsock_peer_cid_replaces_the_default(tmp_path: Path) -> None:
    assert _accepted(tmp_path, "--vsock-peer-cid", "5", "--vsock-peer-cid", "77") == [5, 77]


def test_vsock_any_peer_accepts_every_cid(tmp_path: Path) -> None:
    assert _accepted(tmp_path, "--vsock-any-peer") == list(PEERS)


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--vsock-peer-cid", "-1"], "is not a CID"),
        (["--vsock-peer-cid", "4294967295"], "is not a CID"),
        (["--vsock-any-peer", "--vsock-peer-cid", "3"], "contradict"),
    ],
)
def test_impossible_peer_flags_are_refused_in_one_line(
    tmp_path: Path, flags: list[str], needle: str
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "guest_agent", *_argv(tmp_path, *flags)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert r.returncode != 0 and needle in r.stderr
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_the_agent_log_names_the_peers_the_command_line_allows(tmp_path: Path) -> None:
    log = tmp_path / "agent.log"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "guest_agent",
            *_argv(tmp_path, "--vsock-peer-cid", "9", "--vsock-peer-cid", "4"),
            "--log-file",
            str(log),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        started = wait_until(
            lambda: proc.poll() is not None or (log.exists() and "peers:" in log.read_text()), 20
        )
        assert started and proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert "(peers: CID 4,9)" in log.read_text()
    finally:
        proc.terminate()
        proc.wait(10)
