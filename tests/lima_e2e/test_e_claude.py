"""`coworkctl ask`: the real Claude CLI in the box, its model a scripted fake on the host.

The CLI (installed by lima/provision/claude.sh) talks to the agent's API relay in the
box (127.0.0.1:3129, with a placeholder credential); the relay swaps in the real key and
calls https://api.allowed.test:PORT, verified against the run's test CA (installed in the
guest by `init --ca-cert`). The egress policy allows the name (`coworkctl policy allow`)
and dials the address it is pinned to (--egress-resolve, set through the template
param CoworkAgentArgs): QEMU's user-network gateway, i.e. this host's loopback, where
the fake listens. Nothing leaves this machine. The tool calls it scripts (Write, Bash)
run in the box as the sandbox user and must land in the host's workspace as the host user.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from tests.claude.fake_anthropic import FakeAnthropic, Text
from tests.claude.fake_anthropic import ToolUse as ToolCall
from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import API_NAME, LimaHost

KEY = "sk-ant-fake-lima-e2e"


def fake_model(vm: LimaHost) -> FakeAnthropic:
    """The scripted model, over TLS with the run's test CA (the guest trusts it)."""
    return FakeAnthropic(tls=vm.test_ca.server_context())


@pytest.fixture(scope="module")
def api(vm: LimaHost) -> Iterator[FakeAnthropic]:
    coworkctl_ok(vm, "policy", "allow", API_NAME)
    with fake_model(vm) as fake:
        yield fake


def ask(
    vm: LimaHost, api: FakeAnthropic, prompt: str, *extra: str, target: str = ""
) -> tuple[int, str, str]:
    """`coworkctl ask` against the scripted model (on `target`, default the tier's VM)."""
    r = vm.coworkctl(
        *(["--target", target] if target else []),
        "ask",
        "--env", f"ANTHROPIC_BASE_URL=https://{API_NAME}:{api.port}",
        "--env", f"ANTHROPIC_API_KEY={KEY}",
        "--env", "CLAUDE_CODE_MAX_RETRIES=0",
        "--env", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1",
        *extra,
        prompt,
        timeout=300,
    )  # fmt: skip
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


def test_claude_answers_through_the_egress_proxy(vm: LimaHost, api: FakeAnthropic) -> None:
    api.script(Text("Hello from the Lima box."))
    code, out, err = ask(vm, api, "Say hello.", "-q")
    assert code == 0, err
    assert out.strip() == "Hello from the Lima box."
    assert api.conversation_requests(), "the fake model saw no request"


def test_claude_writes_and_runs_code_that_lands_in_the_host_workspace(
    vm: LimaHost, api: FakeAnthropic
) -> None:
    write = {"file_path": "/workspace/claude/hello.py", "content": "print('hi from claude')\n"}
    run = "cd /workspace/claude && python3 hello.py > out.txt && id -un >> out.txt"
    api.script(
        ToolCall("Write", write),
        ToolCall("Bash", {"command": run, "description": "run it"}),
        Text("I wrote hello.py and ran it."),
    )
    code, out, err = ask(
        vm, api, "Write hello.py and run it", "-q", "--permission-mode", "bypassPermissions"
    )
    assert code == 0, err
    assert "I wrote hello.py and ran it." in out
    hello = vm.workspace / "claude" / "hello.py"
    printed = vm.workspace / "claude" / "out.txt"
    assert hello.read_text() == "print('hi from claude')\n"
    lines = printed.read_text().splitlines()
    assert lines[0] == "hi from claude" and lines[1].startswith("cowork-")  # the sandbox user
    for p in (hello, printed, hello.parent):
        st = os.stat(p)
        assert (st.st_uid, st.st_gid) == (vm.user.pw_uid, vm.user.pw_gid), p


def test_logs_net_shows_the_model_calls(vm: LimaHost, api: FakeAnthropic) -> None:
    out = coworkctl_ok(vm, "--json", "logs", "--net")
    records = [json.loads(line) for line in out.splitlines() if line.strip()]
    calls = [r for r in records if r.get("host") == API_NAME]
    assert calls, records[-5:]
    assert all(r["allowed"] for r in calls)


def test_the_key_reaches_the_model_but_never_the_box(vm: LimaHost, api: FakeAnthropic) -> None:
    look = "env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; cat ~/.claude* 2>/dev/null"
    api.script(ToolCall("Bash", {"command": look, "description": "look"}), Text("looked"))
    seen = len(api.credentials)
    code, out, err = ask(vm, api, "Look around", "-q", "--permission-mode", "bypassPermissions")
    assert code == 0, err
    assert ("x-api-key", KEY) in api.credentials[seen:]
    tool_output = api.requests[-1].text_of_messages()
    assert "ANTHROPIC_BASE_URL" in tool_output  # the Bash tool did run and report
    assert KEY not in tool_output and KEY not in out
