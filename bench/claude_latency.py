"""Agent-added latency of Claude.Ask: time to the first event through the agent minus
running the CLI directly (the same binary, prompt, environment and fake model).

    .venv/bin/python -m bench.claude_latency [--runs 20] [--run-as USER] [--json]

Both sides start a fresh `claude -p --output-format stream-json --verbose` run
and stop the clock at its first stream-json line (system/init): directly, as
a subprocess of this script; through the agent, as the first AskEvent the
host client receives over the agent's unix socket (one client, one channel,
reused, like a real host). Runs alternate (direct, agent, direct, ...) so
machine noise hits both alike. The model is the scripted fake, so the
numbers are CLI start-up + agent overhead, not model latency.

The real CLI's own start-up varies by ±100 ms run to run, far more than the
agent adds; `--stub` replaces it (on both sides) with a shell script that
prints an init and a result line at once, which isolates the agent's fixed
cost (spawn, setsid, line parsing, gRPC) from that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_client import CoworkClient  # noqa: E402
from tests.claude.fake_anthropic import FakeAnthropic, Text  # noqa: E402

CLAUDE = REPO / ".tools" / "claude" / "node_modules" / ".bin" / "claude"
OFFLINE = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
}


STUB = """#!/bin/sh
cat >/dev/null
echo '{"type":"system","subtype":"init","session_id":"bench","model":"stub"}'
echo '{"type":"result","subtype":"success","is_error":false,"result":"hi","num_turns":1}'
"""


def direct_run(exe: str, env: dict[str, str], cwd: str) -> tuple[float, float]:
    """(seconds to the first line, seconds to exit) for the CLI run directly."""
    argv = [exe, "-p", "--output-format=stream-json", "--verbose"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"Say hi.")
    proc.stdin.close()
    proc.stdout.readline()
    first = time.perf_counter() - t0
    proc.stdout.read()
    proc.wait(60)
    return first, time.perf_counter() - t0


def agent_run(client: CoworkClient, env: dict[str, str], cwd: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    first = 0.0
    for _ev in client.ask_stream("Say hi.", cwd=cwd, env=env, forward_auth=False):
        if not first:
            first = time.perf_counter() - t0
    return first, time.perf_counter() - t0


def start_agent(
    d: Path, exe: str, run_as: str | None, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    args = [
        sys.executable,
        "-m",
        "guest_agent",
        "--allow-root",  # bench runs as root on CI machines
        "--listen",
        f"unix:{d}/agent.sock",
        "--token-file",
        str(d / "token"),
        "--root",
        str(d / "ws"),
        "--claude-bin",
        exe,
        "--log-file",
        str(d / "agent.log"),
    ]
    if run_as:
        args += ["--run-as", run_as]
    return subprocess.Popen(args, cwd=REPO, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--run-as", help="have the agent run Claude as this user (needs root)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--stub", action="store_true", help="a stub CLI: the agent's fixed cost")
    args = ap.parse_args()
    if not CLAUDE.exists():
        subprocess.run(["bash", str(REPO / "scripts/tools.d/20-claude.sh")], check=True)
    d = Path(tempfile.mkdtemp(prefix="cwb-", dir="/tmp"))
    d.chmod(0o755)
    (d / "ws").mkdir()
    home = d / "home"
    home.mkdir()
    (d / "token").write_text(secrets.token_hex(32))
    (d / "token").chmod(0o600)
    if args.run_as:
        shutil.chown(d / "ws", args.run_as, args.run_as)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    base.update(OFFLINE, HOME=str(home))
    exe = str(CLAUDE)
    if args.stub:
        stub = d / "stub-claude"
        stub.write_text(STUB)
        stub.chmod(0o755)
        exe = str(stub)
    agent = start_agent(d, exe, args.run_as, base)
    direct: list[tuple[float, float]] = []
    via: list[tuple[float, float]] = []
    try:
        with FakeAnthropic() as api, CoworkClient(f"unix:{d}/agent.sock", str(d / "token")) as c:
            c.wait_ready(20)
            run_env = {
                "ANTHROPIC_BASE_URL": api.base_url,
                "ANTHROPIC_API_KEY": "sk-bench",
                "CLAUDE_CODE_MAX_RETRIES": "0",
            }
            api.default_text = "hi"
            cwd = str(d / "ws")
            # Warm-up (page cache, first-run files in HOME), not counted.
            api.script(Text("hi"), Text("hi"))
            direct_run(exe, {**base, **run_env}, cwd)
            agent_run(c, run_env, cwd)
            for _ in range(args.runs):
                api.script(Text("hi"))
                direct.append(direct_run(exe, {**base, **run_env}, cwd))
                api.script(Text("hi"))
                via.append(agent_run(c, run_env, cwd))
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)
        shutil.rmtree(d, ignore_errors=True)

    def med(xs: list[tuple[float, float]], i: int) -> float:
        return statistics.median(x[i] for x in xs) * 1000

    report: dict[str, Any] = {
        "runs": args.runs,
        "run_as": args.run_as or "",
        "cli": "stub" if args.stub else "claude",
        "direct_first_event_ms": round(med(direct, 0), 1),
        "agent_first_event_ms": round(med(via, 0), 1),
        "agent_added_first_event_ms": round(med(via, 0) - med(direct, 0), 1),
        "direct_total_ms": round(med(direct, 1), 1),
        "agent_total_ms": round(med(via, 1), 1),
        "agent_added_total_ms": round(med(via, 1) - med(direct, 1), 1),
        "direct_first_event_ms_all": [round(x[0] * 1000, 1) for x in direct],
        "agent_first_event_ms_all": [round(x[0] * 1000, 1) for x in via],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        who = f", run-as {args.run_as}" if args.run_as else ""
        print(f"runs: {args.runs} each, alternating; cli: {report['cli']}{who}")
        print(
            f"time to first event, median: direct {report['direct_first_event_ms']} ms, "
            f"through the agent {report['agent_first_event_ms']} ms "
            f"-> agent adds {report['agent_added_first_event_ms']} ms"
        )
        print(
            f"whole run, median: direct {report['direct_total_ms']} ms, "
            f"through the agent {report['agent_total_ms']} ms "
            f"-> agent adds {report['agent_added_total_ms']} ms"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
