"""The credential never enters the sandbox (issue #13): the real CLI in the bwrap box gets a
placeholder and the agent's API relay; the scripted model (HTTPS, a test CA the agent trusts
through --api-ca-cert) sees the real credential. Calls go through the gRPC stubs directly.

Network: the fake model listens on 127.0.0.1; the box reaches it only through the relay,
which dials api.allowed.test, mapped to 127.0.0.1 by --egress-resolve.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from cowork.agent.v1 import (
    auth_pb2,
    auth_pb2_grpc,
    claude_pb2,
    claude_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
)
from tests.claude.conftest import (
    ClaudeAgent,
    create_run_as_user,
    delete_run_as_user,
    make_claude_agent,
)
from tests.claude.fake_anthropic import ApiError, FakeAnthropic, Text, ToolUse
from tests.claude.tls_ca import TestCA, make_test_ca

pytestmark = pytest.mark.timeout(180)
API_NAME = "api.allowed.test"
API_KEY = "sk-ant-api03-REAL-" + secrets.token_hex(12)
OAUTH_TOKEN = "sk-ant-oat01-REAL-" + secrets.token_hex(12)
SECRETS = (API_KEY, OAUTH_TOKEN)


def look_everywhere(secret: str) -> str:
    """A command that gathers what a run's process could find (its env, every readable
    environ in the box, the CLI's files in its home) and counts the secret in it. The secret
    is glued together at run time, so the command's own text (in the CLI's transcript under
    ~/.claude, in /proc/*/cmdline) never holds it whole."""
    half = len(secret) // 2
    return (
        f"a='{secret[:half]}'; b='{secret[half:]}'; "
        "{ env; for f in /proc/[0-9]*/environ; do tr '\\0' '\\n' < $f; done; "
        "cat ~/.claude.json; find ~/.claude* -type f -exec cat {} +; } > /tmp/all 2>/dev/null; "
        'echo "bytes=$(wc -c < /tmp/all) secret=$(grep -c -F "$a$b" /tmp/all)" '
        '"placeholder=$(grep -c cowork-placeholder /tmp/all)"; '
        "grep -E '^ANTHROPIC_BASE_URL=' /tmp/all | sort -u; echo ===END"
    )


@pytest.fixture(scope="module")
def test_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_test_ca(tmp_path_factory.mktemp("ca"), [API_NAME], ["127.0.0.1"])


@pytest.fixture(scope="module")
def boxed(
    claude_bin: Path, test_ca: TestCA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClaudeAgent]:
    user = create_run_as_user()
    policy = tmp_path_factory.mktemp("policy") / "policy.yaml"
    policy.write_text(f"sandbox: bwrap\nnetwork:\n  preset: offline\n  allow: [{API_NAME}]\n")
    args = ["--policy", str(policy), "--egress-resolve", f"{API_NAME}=127.0.0.1"]
    args += ["--api-ca-cert", str(test_ca.ca_cert)]
    try:
        agent = make_claude_agent(claude_bin, user, args)
        try:
            yield agent
        finally:
            agent.stop()
            shutil.rmtree(agent.dir, ignore_errors=True)
    finally:
        delete_run_as_user(user)


@pytest.fixture
def tls_api(test_ca: TestCA) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(tls=test_ca.server_context()) as fake:
        yield fake


class Stubs:
    def __init__(self, agent: ClaudeAgent) -> None:
        self.channel = grpc.insecure_channel(agent.target)
        self.md = (("authorization", f"Bearer {agent.token_file.read_text().strip()}"),)
        self.claude = claude_pb2_grpc.ClaudeStub(self.channel)
        self.auth = auth_pb2_grpc.AuthStub(self.channel)
        self.policy = policy_pb2_grpc.PolicyStub(self.channel)

    def ask(self, req: claude_pb2.AskRequest) -> list[claude_pb2.AskEvent]:
        return list(self.claude.Ask(req, metadata=self.md, timeout=120))

    def logs(self, kind: int) -> list[str]:
        req = policy_pb2.LogsRequest(kind=kind, tail=1000)  # type: ignore[arg-type]
        return [e.json for e in self.policy.Logs(req, metadata=self.md, timeout=10)]

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def stubs(boxed: ClaudeAgent) -> Iterator[Stubs]:
    s = Stubs(boxed)
    yield s
    s.auth.Clear(auth_pb2.ClearCredentialRequest(), metadata=s.md)
    s.close()


def base_url(api: FakeAnthropic) -> str:
    return f"https://{API_NAME}:{api.port}"


def request(
    agent: ClaudeAgent, prompt: str, env: dict[str, str], **kw: object
) -> claude_pb2.AskRequest:
    wd = agent.workdir("cred")
    return claude_pb2.AskRequest(
        prompt=prompt,
        cwd=str(wd),
        env={"CLAUDE_CODE_MAX_RETRIES": "0", **env},
        **kw,  # type: ignore[arg-type]
    )


def result_of(events: list[claude_pb2.AskEvent]) -> claude_pb2.ResultEvent:
    last = events[-1]
    assert last.WhichOneof("event") == "result", last
    return last.result


def everything(events: list[claude_pb2.AskEvent]) -> str:
    return "\n".join(str(ev) for ev in events)


# -- the model gets the real credential ------------------------------------------------------
def test_the_model_receives_the_real_api_key_as_x_api_key(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(Text("hello through the relay"))
    env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": base_url(tls_api)}
    res = result_of(stubs.ask(request(boxed, "hi", env)))
    assert not res.is_error, res
    assert res.result == "hello through the relay"
    assert tls_api.credentials and all(c == ("x-api-key", API_KEY) for c in tls_api.credentials)


def test_the_model_receives_the_real_oauth_token_as_bearer(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(Text("hello, token"))
    env = {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH_TOKEN, "ANTHROPIC_BASE_URL": base_url(tls_api)}
    res = result_of(stubs.ask(request(boxed, "hi", env)))
    assert not res.is_error, res
    assert res.result == "hello, token"
    conv = tls_api.conversation_requests()
    assert conv and ("authorization", f"Bearer {OAUTH_TOKEN}") in tls_api.credentials
    assert all(name != "x-api-key" for name, _ in tls_api.credentials)


def test_a_held_credential_serves_a_run_whose_request_has_none(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    status = stubs.auth.Set(
        auth_pb2.SetCredentialRequest(
            kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY, base_url=base_url(tls_api)
        ),
        metadata=stubs.md,
    )
    assert status.held and status.header == "x-api-key" and API_KEY not in str(status)
    tls_api.script(Text("held key works"))
    res = result_of(stubs.ask(request(boxed, "hi", {})))
    assert res.result == "held key works", res
    assert ("x-api-key", API_KEY) in tls_api.credentials


# -- it is nowhere the run can look ------------------------------------------------------------
def test_no_credential_in_env_proc_environ_claude_home_or_the_runs_events(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(ToolUse("Bash", {"command": look_everywhere(API_KEY)}), Text("looked"))
    env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": base_url(tls_api)}
    events = stubs.ask(request(boxed, "look", env, permission_mode="bypassPermissions"))
    res = result_of(events)
    assert res.result == "looked", res
    shown = [ev.tool_result.content for ev in events if ev.WhichOneof("event") == "tool_result"]
    assert shown and "===END" in shown[0], shown  # the command ran, and its output came back
    found = dict(kv.split("=", 1) for kv in shown[0].split("\n")[0].split())
    assert int(found["bytes"]) > 10_000 and int(found["placeholder"]) > 0, found
    assert found["secret"] == "0", found  # nothing the run could read holds the key
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3129" in shown[0]
    for secret in SECRETS:  # nor what the run reported
        assert secret not in everything(events)
        assert all(secret not in r.text_of_messages() for r in tls_api.requests)


def test_agent_logs_and_audit_lines_never_hold_the_credential(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(Text("one"), Text("two"))
    stubs.ask(request(boxed, "hi", {"ANTHROPIC_API_KEY": API_KEY, **_url(tls_api)}))
    stubs.ask(request(boxed, "hi", {"CLAUDE_CODE_OAUTH_TOKEN": OAUTH_TOKEN, **_url(tls_api)}))
    stubs.auth.Set(
        auth_pb2.SetCredentialRequest(kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY),
        metadata=stubs.md,
    )
    audit = stubs.logs(policy_pb2.LOG_KIND_AUDIT)
    egress = stubs.logs(policy_pb2.LOG_KIND_EGRESS)
    text = boxed.log_text() + "\n".join(audit + egress)
    for secret in SECRETS:
        assert secret not in text
    asks = [json.loads(x) for x in audit if "Claude/Ask" in x]
    assert {a.get("credential") for a in asks} >= {"x-api-key", "authorization"}
    relayed = [json.loads(x) for x in egress if "api relay" in x]
    assert relayed and all(r["host"] == API_NAME and r["allowed"] for r in relayed)


def _url(api: FakeAnthropic) -> dict[str, str]:
    return {"ANTHROPIC_BASE_URL": base_url(api)}


# -- streaming, errors ----------------------------------------------------------------------
def test_a_thousand_sse_events_arrive_complete_and_in_order(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    parts = [f"<{i:04d}>" for i in range(1000)]
    tls_api.script(Text("".join(parts), chunks=1000))
    env = {"ANTHROPIC_API_KEY": API_KEY, **_url(tls_api)}
    events = stubs.ask(request(boxed, "count", env, include_partial_messages=True))
    assert result_of(events).result == "".join(parts)
    deltas = [
        ev.assistant_text.text
        for ev in events
        if ev.WhichOneof("event") == "assistant_text" and ev.assistant_text.partial
    ]
    assert deltas == parts  # each SSE delta, one partial event, in order


def test_a_wrong_credential_surfaces_as_the_apis_own_401(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(ApiError(401, "authentication_error", "invalid x-api-key"))
    env = {"ANTHROPIC_API_KEY": API_KEY, **_url(tls_api)}
    res = result_of(stubs.ask(request(boxed, "hi", env)))
    assert res.is_error and res.api_error_status == 401, res
    assert "Invalid API key" in res.result


def test_api_host_denied_by_policy_ends_with_the_proxys_reason(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    before = stubs.policy.Get(policy_pb2.GetPolicyRequest(), metadata=stubs.md)
    stubs.policy.Set(policy_pb2.SetPolicyRequest(preset="offline"), metadata=stubs.md)
    try:
        env = {"ANTHROPIC_API_KEY": API_KEY, **_url(tls_api)}
        res = result_of(stubs.ask(request(boxed, "hi", env, timeout_ms=60_000)))
    finally:
        stubs.policy.Set(policy_pb2.SetPolicyRequest(yaml=before.policy.yaml), metadata=stubs.md)
    assert res.is_error and res.api_error_status == 403, res
    assert "cowork egress policy" in res.result and API_NAME in res.result
    assert not tls_api.requests


def test_no_credential_at_all_fails_with_one_clear_line(boxed: ClaudeAgent, stubs: Stubs) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stubs.ask(request(boxed, "hi", {}))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = info.value.details() or ""
    assert "no Claude credential" in details and "coworkctl auth set" in details
    assert "\n" not in details


# -- Auth: statuses for bad input ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("req", "says"),
    [
        (auth_pb2.SetCredentialRequest(kind=auth_pb2.CREDENTIAL_KIND_API_KEY), "empty"),
        (auth_pb2.SetCredentialRequest(secret=API_KEY), "kind"),
        (
            auth_pb2.SetCredentialRequest(
                kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY + " x"
            ),
            "characters a header cannot carry",
        ),
        (
            auth_pb2.SetCredentialRequest(
                kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY, base_url="http://x.test"
            ),
            "TLS only",
        ),
        (
            auth_pb2.SetCredentialRequest(
                kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY, scope="box:1"
            ),
            "scope",
        ),
    ],
    ids=["empty-secret", "no-kind", "bad-chars", "http-remote", "unknown-scope"],
)
def test_auth_set_with_bad_input_is_invalid_argument_and_never_echoes_the_secret(
    boxed: ClaudeAgent, stubs: Stubs, req: auth_pb2.SetCredentialRequest, says: str
) -> None:
    with pytest.raises(grpc.RpcError) as info:
        stubs.auth.Set(req, metadata=stubs.md)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert says in (info.value.details() or "")
    assert API_KEY not in (info.value.details() or "")
    assert not stubs.auth.Status(auth_pb2.CredentialStatusRequest(), metadata=stubs.md).held


def test_auth_without_the_agent_token_is_unauthenticated(boxed: ClaudeAgent) -> None:
    with grpc.insecure_channel(boxed.target) as ch, pytest.raises(grpc.RpcError) as info:
        auth_pb2_grpc.AuthStub(ch).Status(auth_pb2.CredentialStatusRequest(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_a_restarted_agent_has_forgotten_the_credential_and_says_so(
    claude_bin: Path,
) -> None:
    agent = make_claude_agent(claude_bin, None)
    try:
        s = Stubs(agent)
        s.auth.Set(
            auth_pb2.SetCredentialRequest(
                kind=auth_pb2.CREDENTIAL_KIND_OAUTH_TOKEN, secret=API_KEY
            ),
            metadata=s.md,
        )
        first = s.auth.Status(auth_pb2.CredentialStatusRequest(), metadata=s.md)
        s.close()
        agent.stop()
        agent.start()
        s = Stubs(agent)
        after = s.auth.Status(auth_pb2.CredentialStatusRequest(), metadata=s.md)
        s.close()
    finally:
        agent.stop()
        shutil.rmtree(agent.dir, ignore_errors=True)
    assert first.held and first.header == "authorization"
    assert not after.held and after.agent_started_at > first.set_at
    assert "gone after the agent restarts" in after.where


# -- sandbox none: the same relay on a private loopback port ----------------------------------
def test_without_a_box_the_cli_env_has_a_placeholder_and_a_loopback_relay(
    claude_agent: ClaudeAgent, api: FakeAnthropic
) -> None:
    api.script(ToolUse("Bash", {"command": "env; echo ===END"}), Text("done"))
    s = Stubs(claude_agent)
    try:
        env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": api.base_url}
        req = request(claude_agent, "look", env, permission_mode="bypassPermissions")
        events = s.ask(req)
    finally:
        s.close()
    assert result_of(events).result == "done"
    shown = [ev.tool_result.content for ev in events if ev.WhichOneof("event") == "tool_result"]
    assert shown and "===END" in shown[0]
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:" in shown[0]
    assert "cowork-placeholder" in shown[0] and API_KEY not in everything(events)
    assert ("x-api-key", API_KEY) in api.credentials


# -- the interactive CLI (`coworkctl claude`: Process.Exec on a PTY, claude_relay) ---------
def _coworkctl_claude(agent: ClaudeAgent, env: dict[str, str], *cli_args: str) -> tuple[int, str]:
    import os
    import sys

    from tests.claude.test_claude import run_on_pty

    host_env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "COWORK_"))}
    host_env.update(env, TERM="xterm")
    cmd = [sys.executable, "-m", "host_client.cli", "--target", agent.target]
    cmd += ["--token-file", str(agent.token_file), "claude", "--cwd", str(agent.workdir("tui"))]
    return run_on_pty([*cmd, "--", *cli_args], host_env, timeout=120)


def test_coworkctl_claude_on_a_pty_gives_the_cli_the_relay_and_the_model_the_key(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(ToolUse("Bash", {"command": look_everywhere(API_KEY)}), Text("looked"))
    env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": base_url(tls_api)}
    code, out = _coworkctl_claude(boxed, env, "-p", "look", "--permission-mode=bypassPermissions")
    assert code == 0 and "looked" in out, out
    assert tls_api.credentials and set(tls_api.credentials) == {("x-api-key", API_KEY)}
    conv = tls_api.conversation_requests()
    assert len(conv) == 2, conv
    shown = conv[1].text_of_messages()  # the Bash tool's output, sent back to the model
    assert "===END" in shown and "secret=0" in shown, shown
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:3129" in shown
    assert API_KEY not in out


def test_coworkctl_claude_uses_the_held_credential_when_the_host_has_none(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    stubs.auth.Set(
        auth_pb2.SetCredentialRequest(
            kind=auth_pb2.CREDENTIAL_KIND_OAUTH_TOKEN,
            secret=OAUTH_TOKEN,
            base_url=base_url(tls_api),
        ),
        metadata=stubs.md,
    )
    tls_api.script(Text("held one"))
    code, out = _coworkctl_claude(boxed, {}, "-p", "hi")
    assert code == 0 and "held one" in out, out
    assert set(tls_api.credentials) == {("authorization", f"Bearer {OAUTH_TOKEN}")}


def test_exec_with_claude_relay_refuses_a_credential_in_env_in_one_line(
    boxed: ClaudeAgent, stubs: Stubs
) -> None:
    from cowork.agent.v1 import process_pb2, process_pb2_grpc

    spec = process_pb2.ProcessSpec(argv=["true"], env={"ANTHROPIC_API_KEY": API_KEY})
    spec.claude_relay.CopyFrom(
        process_pb2.ClaudeRelay(kind=auth_pb2.CREDENTIAL_KIND_API_KEY, secret=API_KEY)
    )
    stub = process_pb2_grpc.ProcessStub(stubs.channel)
    with pytest.raises(grpc.RpcError) as err:
        list(stub.Exec(iter([process_pb2.ExecRequest(start=spec)]), metadata=stubs.md, timeout=30))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    detail = err.value.details() or ""
    assert "ANTHROPIC_API_KEY" in detail and "\n" not in detail
    assert API_KEY not in detail and API_KEY not in boxed.log_text()


def test_the_tui_sessions_audit_line_names_the_header_never_the_key(
    boxed: ClaudeAgent, stubs: Stubs, tls_api: FakeAnthropic
) -> None:
    tls_api.script(Text("audited"))
    env = {"ANTHROPIC_API_KEY": API_KEY, "ANTHROPIC_BASE_URL": base_url(tls_api)}
    code, out = _coworkctl_claude(boxed, env, "-p", "hi")
    assert code == 0 and "audited" in out, out
    audit = stubs.logs(policy_pb2.LOG_KIND_AUDIT)
    execs = [json.loads(x) for x in audit if "Process/Exec" in x and "claude_relay" in x]
    assert execs and execs[-1]["claude_relay"] == "x-api-key", execs
    text = boxed.log_text() + "\n".join(audit + stubs.logs(policy_pb2.LOG_KIND_EGRESS))
    assert API_KEY not in text
