"""Audit records are bounded: a huge request costs the agent a short line, not its size per call."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from guest_agent import logs
from host_client import CoworkClient
from host_client.errors import NotFound

from .conftest import AgentProc
from .resources import rss_bytes

# Linux refuses a single argument over 128 KiB (MAX_ARG_STRLEN): ten of 100 KB make 1 MB.
HUGE_ARGV = ["true", *(["a" * 100_000] * 10)]


def _records(agent: AgentProc) -> list[dict[str, object]]:
    return [json.loads(line) for line in agent.log_lines() if line.startswith("{")]


def test_audit_line_of_a_1mb_argv_is_cut_and_says_so(agent: AgentProc) -> None:
    with agent.client() as c:
        assert c.run(HUGE_ARGV).exit_code == 0
    line = next(line for line in reversed(agent.log_lines()) if '"argv": ["true", "aaaa' in line)
    assert len(line) < 16_000
    rec = json.loads(line)
    assert rec["truncated"] == ["argv"]
    argv = rec["argv"]
    assert isinstance(argv, list) and argv[0] == "true"
    assert "cut" in str(argv[-1])


def test_failed_spawn_with_a_huge_command_name_answers_and_logs_a_short_message(
    agent: AgentProc,
) -> None:
    with agent.client() as c, pytest.raises(NotFound) as err:
        c.run(["x" * 120_000])
    assert len(str(err.value)) < 4_000
    assert "cut" in str(err.value)
    failed = [r for r in _records(agent) if r.get("code") == "NOT_FOUND"]
    assert failed and len(json.dumps(failed[-1])) < 16_000


def test_logs_ring_returns_bounded_records(agent: AgentProc) -> None:
    with agent.client() as c:
        c.run(HUGE_ARGV)
        entries = [json.loads(e) for e in c.logs(tail=5)]
    huge = [e for e in entries if e.get("truncated") == ["argv"]]
    assert huge and all(len(json.dumps(e)) < 16_000 for e in huge)


def test_agent_memory_stays_flat_over_hundreds_of_1mb_argv_calls(own_agent: AgentProc) -> None:
    with own_agent.client() as c:
        for _ in range(20):
            c.run(HUGE_ARGV)
        before = rss_bytes(own_agent.pid)
        for _ in range(300):
            c.run(HUGE_ARGV)
            with pytest.raises(NotFound):
                c.run(["y" * 120_000])
        after = rss_bytes(own_agent.pid)
    # Unbounded, the ring alone kept 1 MB per call: 300+ MB here.
    assert after - before < 40 * 1024 * 1024, (before, after)


def test_client_still_sees_full_output_when_the_audit_is_cut(client: CoworkClient) -> None:
    r = client.run(["printf", "%s", "b" * 50_000])
    assert r.stdout == b"b" * 50_000


def test_the_agent_log_file_rolls_over_at_its_cap(tmp_path: Path) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    path = tmp_path / "agent.log"
    try:
        logs.setup("json", "info", str(path), max_bytes=4000)
        for i in range(400):
            logging.getLogger("cowork.audit").info("rpc", extra={"audit": {"n": i}})
    finally:
        for h in root.handlers:
            h.close()
        root.handlers[:], root.level = saved[0], saved[1]
    assert path.stat().st_size <= 4000
    assert (tmp_path / "agent.log.1").stat().st_size <= 4000
    assert json.loads(path.read_text().splitlines()[-1])["n"] == 399
