"""Fixtures of the sandbox tests: an agent that boxes every process with bubblewrap.

The agent runs as root (as in the VM) with `--run-as` a fresh unprivileged user
and a policy file that turns the bwrap sandbox on. Names the egress proxy may
dial are mapped to loopback with `--egress-resolve`: no test traffic leaves
this machine.
"""

from __future__ import annotations

import http.server
import os
import pwd
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.claude.conftest import create_run_as_user, delete_run_as_user
from tests.conftest import AgentProc, make_agent

ALLOWED = "allowed.test"
DENIED = "denied.test"
POLICY = f"""\
sandbox: bwrap
network:
  preset: offline
  allow: [{ALLOWED}, "*.{ALLOWED}"]
  deny: [{DENIED}]
"""


def _need_root_and_bwrap() -> None:
    assert os.geteuid() == 0, "the sandbox tests need root (they create a user), as in CI"
    assert shutil.which("bwrap"), "bubblewrap is missing: `make setup` installs it"


@pytest.fixture(scope="session")
def sandbox_user() -> Iterator[str]:
    _need_root_and_bwrap()
    name = create_run_as_user()
    try:
        yield name
    finally:
        delete_run_as_user(name)


class Origin(http.server.ThreadingHTTPServer):
    """A real HTTP server on 127.0.0.1 that names itself in every answer."""

    daemon_threads = True


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"origin says hi to {self.headers.get('Host')} at {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def origin() -> Iterator[int]:
    srv = Origin(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def make_boxed_agent(user: str, policy: str = POLICY) -> AgentProc:
    policy_file = Path("/tmp") / f"cw-policy-{os.getpid()}-{user}.yaml"
    policy_file.write_text(policy)
    agent = make_agent(
        [
            "--run-as",
            user,
            "--policy",
            str(policy_file),
            "--egress-resolve",
            f"{ALLOWED}=127.0.0.1",
            "--egress-resolve",
            f"api.{ALLOWED}=127.0.0.1",
            "--egress-resolve",
            f"{DENIED}=127.0.0.1",
        ],
        before_start=lambda a: _own_workspace(a, user),
    )
    agent.extra["policy_file"] = policy_file
    return agent


def _own_workspace(agent: AgentProc, user: str) -> None:
    pw = pwd.getpwnam(user)
    os.chown(agent.root, pw.pw_uid, pw.pw_gid)
    agent.dir.chmod(0o755)


@pytest.fixture(scope="module")
def boxed(sandbox_user: str) -> Iterator[AgentProc]:
    agent = make_boxed_agent(sandbox_user)
    try:
        yield agent
    finally:
        agent.stop()
        Path(str(agent.extra["policy_file"])).unlink(missing_ok=True)
        shutil.rmtree(agent.dir, ignore_errors=True)
