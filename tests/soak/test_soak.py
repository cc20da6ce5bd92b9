"""Endurance: the agent, under its unit's fd limit, serves thousands of mixed calls and gives
every resource back.

The agent runs as the systemd unit runs it in the VM: as root, with `--run-as` an
unprivileged user, RLIMIT_NOFILE lowered to the unit default (1024, set with
prlimit(2) on the live agent, so its children inherit it as under systemd), and
in two modes: no sandbox (the local target) and the bwrap box with its egress
bridge (the VM default). The workload mixes every kind of call a user makes,
the unhappy ones included: Run, streamed Exec with stdin, PTY, timeouts,
cancels, background children holding the pipe, a client SIGKILLed mid-stream,
Files up/down/list/rename/remove, failed starts, the real Claude CLI (some runs
cancelled), Policy and Logs.

After the run the agent must be back at its baseline (taken after one warm-up
round, when lazy pools exist): the same fds and sockets, no more threads or
children than the guardian, no zombies, no temp files, RSS within a small margin. The figures
per 1,000 calls go to `$COWORK_SOAK_REPORT` (JSON) when set: `make soak`
writes bench/results/soak.json.

`COWORK_SOAK_CALLS` sets the number of calls per mode: `make test` runs a
bounded 1,500; `make soak` runs 10,000.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.claude import ClaudeInit
from host_client.errors import CoworkError
from host_client.models import Output
from tests.claude.conftest import (
    FAKE_KEY,
    ClaudeAgent,
    create_run_as_user,
    delete_run_as_user,
    make_claude_agent,
    processes_with_env,
)
from tests.claude.fake_anthropic import FakeAnthropic, Hang, Text
from tests.claude.tls_ca import TestCA, make_test_ca
from tests.resources import Footprint, footprint, sockets_of, zombies

pytestmark = [pytest.mark.soak, pytest.mark.timeout(3600)]

CALLS = int(os.environ.get("COWORK_SOAK_CALLS", "1500"))
UNIT_NOFILE = 1024  # systemd's default soft limit (DefaultLimitNOFILE=1024:524288)
API_NAME = "api.allowed.test"
MARKER = "COWORK_SOAK=1"
# RSS may settle a little higher (allocator arenas, grpc's caches); a leak of
# even 1 KiB per call over 1,500 calls would exceed this.
RSS_MARGIN = 12 * 1024 * 1024
REPO = Path(__file__).resolve().parents[2]

# A client process that starts a long exec and is then SIGKILLed by the test.
KILLED_CLIENT = textwrap.dedent(
    """
    import sys
    from host_client import CoworkClient
    with CoworkClient(sys.argv[1], sys.argv[2]) as c:
        for ev in c.exec(["sleep", "60"], env={"COWORK_SOAK": "1"}):
            print("started", flush=True)
            sys.stdin.read()
    """
)


@pytest.fixture(scope="module")
def run_as() -> Iterator[str]:
    assert os.geteuid() == 0, "the soak runs the agent as root with --run-as, as the unit does"
    name = create_run_as_user()
    try:
        yield name
    finally:
        delete_run_as_user(name)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    """The scripted model's CA: the agent's API relay sends the key over verified TLS only."""
    return make_test_ca(tmp_path_factory.mktemp("ca"), [API_NAME], ["127.0.0.1"])


@pytest.fixture(scope="module")
def api(ca: TestCA) -> Iterator[FakeAnthropic]:
    with FakeAnthropic(tls=ca.server_context()) as fake:
        yield fake


def _start_agent(claude_bin: Path, user: str, mode: str, tmp: Path, ca: TestCA) -> ClaudeAgent:
    args: list[str] = ["--api-ca-cert", str(ca.ca_cert)]
    if mode == "bwrap":
        assert shutil.which("bwrap"), "bubblewrap is missing: `make setup` installs it"
        policy = tmp / "policy.yaml"
        policy.write_text(f"sandbox: bwrap\nnetwork:\n  preset: offline\n  allow: [{API_NAME}]\n")
        args += ["--policy", str(policy), "--egress-resolve", f"{API_NAME}=127.0.0.1"]
    agent = make_claude_agent(claude_bin, user, args)
    assert agent.proc is not None
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.prlimit(agent.proc.pid, resource.RLIMIT_NOFILE, (UNIT_NOFILE, hard))
    return agent


class Workload:
    """One round of every kind of call; `step(i)` runs call number i of the schedule."""

    def __init__(
        self, agent: ClaudeAgent, client: CoworkClient, api: FakeAnthropic, mode: str
    ) -> None:
        self.agent = agent
        self.c = client
        self.api = api
        self.mode = mode
        self.wd = agent.workdir(f"soak-{mode}")
        self.rel = str(self.wd)
        port = api.base_url.rsplit(":", 1)[1]
        host = API_NAME if mode == "bwrap" else "127.0.0.1"
        self.claude_env = {
            "ANTHROPIC_BASE_URL": f"https://{host}:{port}",
            "ANTHROPIC_API_KEY": FAKE_KEY,
            "CLAUDE_CODE_MAX_RETRIES": "0",
            "COWORK_SOAK": "1",
        }
        self.counts: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        # Cheap calls fill the schedule; the costly ones (a client process, the
        # real CLI) come once per round of `len(self.schedule)` steps.
        cheap: list[Callable[[int], int]] = [
            self.run,
            self.exec_stdin,
            self.write_file,
            self.read_file,
            self.run,
            self.pty,
            self.list_dir,
            self.rename_remove,
            self.exec_cancel,
            self.failed_starts,
            self.timeout,
            self.background_child,
            self.policy,
            self.exec_stdin,
            self.run,
            self.detached,
        ]
        self.schedule = cheap * 6 + [self.killed_client, self.claude]

    def step(self, i: int) -> None:
        """Run step `i` of the schedule and count the RPCs it made, by kind."""
        fn = self.schedule[i % len(self.schedule)]
        t0 = time.perf_counter()
        self.counts[fn.__name__] = self.counts.get(fn.__name__, 0) + fn(i)
        self.seconds[fn.__name__] = self.seconds.get(fn.__name__, 0) + time.perf_counter() - t0

    def burst(self, width: int = 12) -> None:
        """Calls in parallel: grows the agent's lazy thread pools to their bound."""
        with concurrent.futures.ThreadPoolExecutor(width) as pool:
            for f in [pool.submit(self.write_file, i) for i in range(width)]:
                f.result()
            for f in [pool.submit(self.list_dir, i) for i in range(width)]:
                f.result()

    # -- process ------------------------------------------------------------
    def run(self, i: int) -> int:
        r = self.c.run(["echo", f"soak-{i}"], cwd=self.rel)
        assert (r.exit_code, r.output) == (0, f"soak-{i}\n"), r
        return 1

    def exec_stdin(self, i: int) -> int:
        data = os.urandom(3000)
        r = self.c.exec(["cat"], stdin=data, cwd=self.rel).collect()
        assert (r.exit_code, r.stdout) == (0, data)
        return 1

    def pty(self, i: int) -> int:
        r = self.c.exec(["sh", "-c", "test -t 0 && echo tty"], pty=True, cwd=self.rel).collect()
        assert r.exit_code == 0 and b"tty" in r.stdout, r
        return 1

    def exec_cancel(self, i: int) -> int:
        stream = self.c.exec(["sleep", "30"], env={"COWORK_SOAK": "1"}, cwd=self.rel)
        for _ev in stream:
            break  # leaving the iteration cancels the call
        return 1

    def timeout(self, i: int) -> int:
        r = self.c.run(["sleep", "30"], timeout=0.05, cwd=self.rel)
        assert r.timed_out
        return 1

    def background_child(self, i: int) -> int:
        # A child that outlives the command and holds stdout: the run still ends.
        r = self.c.run(["sh", "-c", "sleep 30 & echo bg"], env={"COWORK_SOAK": "1"})
        assert r.output == "bg\n"
        return 1

    def failed_starts(self, i: int) -> int:
        for argv, pty in ((["/no/such/binary"], False), (["/no/such/binary"], True)):
            with pytest.raises(CoworkError):
                self.c.exec(argv, pty=pty, cwd=self.rel).collect()
        with pytest.raises(CoworkError):
            self.c.run(["true"], cwd="/no/such/dir")
        return 3

    def detached(self, i: int) -> int:
        # A detached run followed a while, left, waited for and replayed whole; a second
        # one killed by id: neither holds anything of the agent once ended.
        stream = self.c.exec(["sh", "-c", f"echo a{i}; echo b{i} >&2"], detach=True, cwd=self.rel)
        for _ev in stream:
            break  # leaving a detached run's stream leaves it going
        self.c.process.wait(stream.run_id)
        out = [e for e in self.c.process.attach(stream.run_id) if isinstance(e, Output)]
        assert b"".join(e.data for e in out) in (f"a{i}\nb{i}\n".encode(), f"b{i}\na{i}\n".encode())
        sleeper = self.c.exec(["sleep", "30"], detach=True, env={"COWORK_SOAK": "1"})
        for _ev in sleeper:
            break
        self.c.process.kill(sleeper.run_id)
        return 6

    def killed_client(self, i: int) -> int:
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLED_CLIENT, self.agent.target, str(self.agent.token_file)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.close()
        proc.stdout.close()
        return 1

    # -- files --------------------------------------------------------------
    def write_file(self, i: int) -> int:
        self.c.write_file(f"{self.rel}/f-{i % 7}.bin", os.urandom(20_000))
        return 1

    def read_file(self, i: int) -> int:
        name = f"{self.rel}/r.txt"
        self.c.write_file(name, f"read-{i}")
        assert self.c.read_file(name) == f"read-{i}"
        return 2

    def list_dir(self, i: int) -> int:
        assert self.c.list_dir(self.rel, recursive=True)
        self.c.stat(self.rel)
        return 2

    def rename_remove(self, i: int) -> int:
        a, b = f"{self.rel}/mv-a", f"{self.rel}/mv-b/x"
        self.c.write_file(a, b"x")
        self.c.mkdir(f"{self.rel}/mv-b")
        self.c.rename(a, b)
        self.c.remove(f"{self.rel}/mv-b", recursive=True)
        return 4

    # -- policy, logs -------------------------------------------------------
    def policy(self, i: int) -> int:
        # Set persists the policy (temp file + rename) each time; the same rule again
        # must not grow it.
        policy = self.c.set_policy(allow=API_NAME)
        assert policy["effective_allow"].count(API_NAME) == 1, policy
        assert self.c.get_policy()
        assert list(self.c.logs(tail=3))
        return 3

    # -- Claude (the real CLI) ----------------------------------------------
    def claude(self, i: int) -> int:
        if (i // len(self.schedule)) % 2 == 0:
            self.api.script(Text(f"answer {i}"))
            r = self.c.ask_claude("Say something.", cwd=self.rel, env=self.claude_env)
            assert r.exit_code == 0 and r.output == f"answer {i}", r
            return 1
        self.api.hanging.clear()
        self.api.script(Hang())
        for ev in self.c.ask_stream("Take your time.", cwd=self.rel, env=self.claude_env):
            if isinstance(ev, ClaudeInit):
                assert self.api.hanging.wait(60), "the CLI never reached the model"
                break  # cancels the run
        return 1


def _settled(pid: int, baseline: Footprint, timeout: float = 20.0) -> Footprint:
    """The agent's footprint once it is back at the baseline, or the last one seen."""
    deadline = time.monotonic() + timeout
    now = footprint(pid)
    while time.monotonic() < deadline:
        if (
            now.fds <= baseline.fds
            and now.threads <= baseline.threads
            and now.children <= baseline.children
            and now.zombies == 0
            and not processes_with_env(MARKER)
        ):
            break
        time.sleep(0.2)
        now = footprint(pid)
    return now


def _temp_files(agent: ClaudeAgent) -> list[str]:
    found = [str(p) for p in agent.root.rglob(".cowork-tmp-*")]
    found += [str(p) for p in Path("/tmp").glob("cowork-*") if p.stat().st_uid == 0]
    return sorted(found)


def _report(mode: str, figures: dict[str, object]) -> None:
    path = os.environ.get("COWORK_SOAK_REPORT")
    if not path:
        return
    out = Path(path)
    data = json.loads(out.read_text()) if out.exists() else {}
    data[mode] = figures
    out.write_text(json.dumps(data, indent=2) + "\n")


@pytest.mark.parametrize("mode", ["none", "bwrap"])
def test_agent_returns_to_its_baseline_after_thousands_of_mixed_calls(
    mode: str, claude_bin: Path, run_as: str, api: FakeAnthropic, ca: TestCA, tmp_path: Path
) -> None:
    agent = _start_agent(claude_bin, run_as, mode, tmp_path, ca)
    assert agent.proc is not None
    pid = agent.proc.pid
    try:
        with agent.client() as c:
            work = Workload(agent, c, api, mode)
            for i in range(len(work.schedule)):  # warm-up: lazy pools and caches
                work.step(i)
            work.burst()
            baseline = _settled(pid, footprint(pid))
            tmp_before = _temp_files(agent)
            peak = baseline
            t0 = time.monotonic()
            work.counts.clear()
            work.seconds.clear()
            for i in range(CALLS):
                work.step(i)
                if i % 250 == 0:
                    peak = peak.max(footprint(pid))
            elapsed = time.monotonic() - t0
        rpcs = sum(work.counts.values())
        after = _settled(pid, baseline)
        tmp_after = _temp_files(agent)
        per_k = 1000 / rpcs
        figures: dict[str, object] = {
            "rpcs": rpcs,
            "seconds": round(elapsed, 1),
            "rpcs_per_second": round(rpcs / elapsed, 1),
            "by_kind": work.counts,
            "seconds_by_kind": {k: round(v, 2) for k, v in work.seconds.items()},
            "baseline": baseline.as_dict(),
            "after": after.as_dict(),
            "peak": peak.as_dict(),
            "per_1000_rpcs": {
                "fds": round((after.fds - baseline.fds) * per_k, 3),
                "sockets": round((after.sockets - baseline.sockets) * per_k, 3),
                "threads": round((after.threads - baseline.threads) * per_k, 3),
                "rss_kib": round((after.rss - baseline.rss) / 1024 * per_k, 1),
                "children": round((after.children - baseline.children) * per_k, 3),
                "zombies": round(after.zombies * per_k, 3),
                "temp_files": round((len(tmp_after) - len(tmp_before)) * per_k, 3),
            },
        }
        _report(mode, figures)
        print(json.dumps(figures))
        assert agent.proc.poll() is None, "the agent died"
        assert after.fds <= baseline.fds, (figures, sockets_of(pid))
        assert after.sockets <= baseline.sockets, (figures, sockets_of(pid))
        assert after.threads <= baseline.threads, figures
        # The agent's own guardian (guest_agent/reaper.py) is its one standing child.
        assert after.children <= baseline.children and after.zombies == 0, (figures, zombies(pid))
        assert processes_with_env(MARKER) == [], "processes of finished calls are still running"
        assert tmp_after == tmp_before, figures
        assert after.rss - baseline.rss < RSS_MARGIN, figures
        assert "Traceback" not in agent.log_text()
    finally:
        agent.stop()
        shutil.rmtree(agent.dir, ignore_errors=True)
