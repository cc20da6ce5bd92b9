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
from tests.claude.fake_anthropic import FakeAnthropic, Text, ToolUse
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


# -- in a named box (issue #12) ------------------------------------------------------------
def test_ask_in_a_named_box_runs_in_it_and_keeps_the_key_out(
    boxed_claude: ClaudeAgent, api: FakeAnthropic
) -> None:
    from host_client.claude import ToolResult
    from tests.claude.test_credential import look_everywhere

    wd = boxed_claude.workdir("named-box")
    with boxed_claude.client() as c:
        c.boxes.create("claude-box")
        try:
            assert c.run("echo left-by-an-exec > /tmp/marker", box="claude-box").exit_code == 0
            command = "cat /tmp/marker; " + look_everywhere(FAKE_KEY)
            api.script(ToolUse("Bash", {"command": command}), Text("looked in the box"))
            events = list(
                c.ask_stream(
                    "look",
                    cwd=str(wd),
                    env=_env(api),
                    box="claude-box",
                    permission_mode="bypassPermissions",
                )
            )
            [box] = c.boxes.list()
        finally:
            c.boxes.remove("claude-box")
    final = events[-1]
    assert isinstance(final, ClaudeResult) and not final.is_error, events
    assert final.result == "looked in the box"
    shown = [ev.content for ev in events if isinstance(ev, ToolResult)]
    assert shown and shown[0].startswith("left-by-an-exec\n"), shown  # the box's /tmp
    found = dict(kv.split("=", 1) for kv in shown[0].split("\n")[1].split())
    assert found["secret"] == "0" and int(found["placeholder"]) > 0, found
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3129" in shown[0]
    assert box.runs == 2  # the exec, then the CLI


def test_detached_ask_in_a_named_box_is_listed_with_the_box(
    boxed_claude: ClaudeAgent, api: FakeAnthropic
) -> None:
    api.script(Text("detached in a box"))
    wd = boxed_claude.workdir("named-box-detached")
    with boxed_claude.client() as c:
        c.boxes.create("claude-detached")
        try:
            stream = c.claude.stream(
                "hi", cwd=str(wd), env=_env(api), box="claude-detached", detach=True
            )
            next(iter(stream))
            stream.cancel()
            assert stream.run_id
            done = c.process.wait(stream.run_id)
            replay = list(c.claude.attach(stream.run_id, from_offset=0))
        finally:
            c.boxes.remove("claude-detached")
    assert done.box == "claude-detached" and done.exit is not None and done.exit.code == 0
    assert isinstance(replay[-1], ClaudeResult) and replay[-1].result == "detached in a box"


def test_exec_with_the_claude_relay_in_a_named_box_reaches_the_api_with_the_real_key(
    boxed_claude: ClaudeAgent, api: FakeAnthropic
) -> None:
    """`coworkctl claude --box`'s path: the box's own relay listener, the placeholder only."""
    from host_client.claude_relay import ClaudeRelay

    api.script(Text("relayed"))
    post = (
        "import os, urllib.request\n"
        "req = urllib.request.Request(os.environ['ANTHROPIC_BASE_URL'] + '/v1/messages',\n"
        '    data=b\'{"model": "m", "max_tokens": 5, "messages": '
        '[{"role": "user", "content": "hi"}]}\',\n'
        "    headers={'x-api-key': os.environ['ANTHROPIC_API_KEY'],\n"
        "             'content-type': 'application/json', 'anthropic-version': '2023-06-01'})\n"
        "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
        "print(opener.open(req, timeout=10).status)\n"
        "print('key-seen' if os.environ['ANTHROPIC_API_KEY'] == os.environ.get('REAL', '') "
        "else 'placeholder')\n"
    )
    relay = ClaudeRelay("api_key", FAKE_KEY, f"https://{API_NAME}:{api.port}")
    with boxed_claude.client() as c:
        c.boxes.create("relay-box")
        try:
            r = c.exec(
                ["/usr/bin/python3", "-c", post], claude_relay=relay, box="relay-box"
            ).collect()
        finally:
            c.boxes.remove("relay-box")
    assert r.exit_code == 0, r.error
    assert r.output.split() == ["200", "placeholder"]
    assert ("x-api-key", FAKE_KEY) in api.credentials
