"""The real Claude Code CLI inside the bubblewrap sandbox, its API traffic through the proxy.

The box has only loopback; the CLI reaches the (fake) Messages API through the
agent's API relay (127.0.0.1:3129 in the box), which adds the credential and
dials a name on the policy's allow list over TLS (a test CA the agent trusts
with --api-ca-cert). The name is mapped to the fake's loopback address by
`--egress-resolve`: nothing leaves this machine.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_client.claude import ClaudeResult
from tests.claude.conftest import (
    FAKE_KEY,
    ClaudeAgent,
    create_run_as_user,
    delete_run_as_user,
    make_claude_agent,
)
from tests.claude.fake_anthropic import FakeAnthropic, Text
from tests.claude.tls_ca import TestCA, make_test_ca

pytestmark = pytest.mark.timeout(180)
API_NAME = "api.allowed.test"


@pytest.fixture(scope="module")
def boxed_claude(
    claude_bin: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClaudeAgent]:
    user = create_run_as_user()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(f"sandbox: bwrap\nnetwork:\n  preset: offline\n  allow: [{API_NAME}]\n")
    ca = tmp_path_factory.mktemp("ca")
    make_test_ca(ca, [API_NAME], ["127.0.0.1"])
    try:
        agent = make_claude_agent(
            claude_bin,
            user,
            [
                *("--policy", str(policy), "--egress-resolve", f"{API_NAME}=127.0.0.1"),
                *("--api-ca-cert", str(ca / "ca.pem")),
            ],
        )
        agent.extra["ca"] = TestCA(ca / "ca.pem", ca / "server.pem", ca / "server.key")
        try:
            yield agent
        finally:
            agent.stop()
            shutil.rmtree(agent.dir, ignore_errors=True)
    finally:
        delete_run_as_user(user)


@pytest.fixture
def api(boxed_claude: ClaudeAgent) -> Iterator[FakeAnthropic]:
    """The fake model over HTTPS, with the certificate of the agent's test CA."""
    with FakeAnthropic(tls=boxed_claude.extra["ca"].server_context()) as fake:
        yield fake


def _env(api: FakeAnthropic) -> dict[str, str]:
    return {
        "ANTHROPIC_BASE_URL": f"https://{API_NAME}:{api.port}",
        "ANTHROPIC_API_KEY": FAKE_KEY,
        "CLAUDE_CODE_MAX_RETRIES": "0",
    }


def test_sandboxed_claude_completes_through_the_egress_proxy(
    boxed_claude: ClaudeAgent, api: FakeAnthropic
) -> None:
    api.script(Text("Hello from inside the box."))
    wd = boxed_claude.workdir("boxed")
    with boxed_claude.client() as c:
        assert c.info()["sandbox"] == "bwrap"
        result = c.ask_claude("Say hello.", cwd=str(wd), env=_env(api))
        log = [json.loads(x) for x in c.logs(net=True)]
    assert result.exit_code == 0, result.error
    assert result.output == "Hello from inside the box."
    hits = [r for r in log if r["host"] == API_NAME]
    assert hits and all(r["allowed"] for r in hits)
    assert api.conversation_requests(), "the fake model saw no request"


def test_offline_preset_blocks_the_sandboxed_claude_with_a_clear_error(
    boxed_claude: ClaudeAgent, api: FakeAnthropic
) -> None:
    api.script(Text("must not be seen"))
    wd = boxed_claude.workdir("offline")
    with boxed_claude.client() as c:
        before = c.get_policy()["yaml"]
        c.set_policy(preset="offline")
        try:
            events = list(c.ask_stream("Say hello.", cwd=str(wd), env=_env(api)))
            log = [json.loads(x) for x in c.logs(net=True)]
        finally:
            c.set_policy(yaml=before)
    final = events[-1]
    assert isinstance(final, ClaudeResult), events
    assert final.is_error and final.exit_code == 1
    # What the user reads names the cause: the CLI relays the proxy's 403 text.
    assert "cowork egress policy" in final.result and API_NAME in final.result
    denied = [r for r in log if r["host"] == API_NAME and not r["allowed"]]
    assert denied, log
    assert not api.conversation_requests()


def test_coworkctl_claude_and_exec_tty_work_inside_the_box(boxed_claude: ClaudeAgent) -> None:
    import os
    import sys

    from tests.claude.conftest import CLAUDE_VERSION
    from tests.claude.test_claude import run_on_pty

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    env["TERM"] = "xterm"
    base = [sys.executable, "-m", "host_client.cli", "--target", boxed_claude.target]
    base += ["--token-file", str(boxed_claude.token_file)]
    code, out = run_on_pty([*base, "claude", "--", "--version"], env)
    assert code == 0 and CLAUDE_VERSION in out, out
    probe = "id -un; test -t 0 && echo on-a-tty; grep ^Seccomp: /proc/self/status; exit 5"
    code, out = run_on_pty([*base, "exec", "-t", "--", "sh", "-c", probe], env)
    assert code == 5, out
    assert str(boxed_claude.run_as) in out and "on-a-tty" in out and "Seccomp:\t2" in out
