"""`coworkctl auth set|status|clear` and the `info` row, against a real agent: one line, a
non-zero exit and no traceback on every error path, and never the credential in the output."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import REPO, AgentProc

KEY = "sk-ant-api03-CLI-" + secrets.token_hex(12)
TOKEN = "sk-ant-oat01-CLI-" + secrets.token_hex(12)


def coworkctl(
    agent: AgentProc, *args: str, env: dict[str, str] | None = None, stdin: str = ""
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    base.pop("COWORK_TARGET", None)
    cmd = [sys.executable, "-m", "host_client.cli", "--target", agent.target]
    cmd += ["--token-file", str(agent.token_file), *args]
    return subprocess.run(
        cmd, input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO,
        env={**base, **(env or {})},
    )  # fmt: skip


@pytest.fixture
def fresh(agent: AgentProc) -> Iterator[AgentProc]:
    yield agent
    coworkctl(agent, "auth", "clear")


def one_line_error(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode != 0 and p.stdout == "", p
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    return p.stderr


def test_auth_set_from_the_environment_holds_an_api_key(fresh: AgentProc) -> None:
    p = coworkctl(fresh, "--json", "auth", "set", env={"ANTHROPIC_API_KEY": KEY})
    assert p.returncode == 0, p.stderr
    status = json.loads(p.stdout)
    assert status["held"] and status["kind"] == "api key" and status["header"] == "x-api-key"
    assert status["base_url"] == "https://api.anthropic.com" and KEY not in p.stdout


def test_auth_set_from_stdin_recognizes_an_oauth_token(fresh: AgentProc) -> None:
    p = coworkctl(fresh, "auth", "set", "--stdin", stdin=TOKEN + "\n")
    assert p.returncode == 0, p.stderr
    assert "oauth token (sent as authorization)" in p.stdout and TOKEN not in p.stdout


def test_auth_status_and_info_say_where_the_credential_lives(fresh: AgentProc) -> None:
    assert "none held" in coworkctl(fresh, "info").stdout
    coworkctl(fresh, "auth", "set", env={"ANTHROPIC_API_KEY": KEY})
    status = coworkctl(fresh, "auth", "status").stdout
    assert "memory only" in status and KEY not in status
    assert "held in the agent's memory only" in coworkctl(fresh, "info").stdout


def test_auth_clear_forgets_the_credential(fresh: AgentProc) -> None:
    coworkctl(fresh, "auth", "set", env={"ANTHROPIC_API_KEY": KEY})
    p = coworkctl(fresh, "auth", "clear")
    assert p.returncode == 0 and p.stdout.startswith("held         no"), p


def test_auth_set_without_any_credential_is_one_line(fresh: AgentProc) -> None:
    err = one_line_error(coworkctl(fresh, "auth", "set"))
    assert "ANTHROPIC_API_KEY" in err and "--stdin" in err


def test_auth_set_with_empty_stdin_is_one_line(fresh: AgentProc) -> None:
    assert "stdin held no credential" in one_line_error(coworkctl(fresh, "auth", "set", "--stdin"))


def test_auth_set_kind_without_stdin_is_a_usage_error(fresh: AgentProc) -> None:
    p = coworkctl(fresh, "auth", "set", "--kind", "api_key", env={"ANTHROPIC_API_KEY": KEY})
    one_line_error(p)
    assert p.returncode == 2


def test_auth_set_refused_by_the_agent_is_one_line_without_the_secret(fresh: AgentProc) -> None:
    p = coworkctl(
        fresh,
        "auth",
        "set",
        "--base-url",
        "http://api.example.test",
        env={"ANTHROPIC_API_KEY": KEY},
    )
    err = one_line_error(p)
    assert p.returncode == 1 and "TLS only" in err and KEY not in err
