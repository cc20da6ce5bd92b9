"""Benchmarks: the guest agent against SSH, side by side, in one run on one machine.

    .venv/bin/python -m bench.run --out bench/results            # full run (make bench)
    .venv/bin/python -m bench.run --quick --out /tmp/bench-quick # < 2 min (make bench-quick)
    .venv/bin/python -m bench.run --tiny --out /tmp/bench-tiny   # seconds; what make test runs

Paths, each doing the same work:
  agent_persistent   one CoworkClient, many unary Process.Run calls
  agent_stream       the same client, streaming Process.Exec (what coworkctl exec uses)
  agent_new_client   a new CoworkClient (new channel, new connection) per call
  coworkctl          a fresh `coworkctl exec` process per call (what shell scripts do)
  ssh                `ssh host CMD` per call, no multiplexing
  ssh_mux            `ssh` through a persistent ControlMaster
  limactl            `limactl shell NAME CMD` (only when limactl and a running instance exist)

The agent is started by the bench (as a real subprocess, JSON audit log on, as
in production); the SSH baselines use a throw-away sshd on 127.0.0.1
(bench/sshd.py). Calls are interleaved in rounds so that load from elsewhere
on the machine hits every path alike. Nothing here is a pass/fail test: the
report states the issue's targets next to the measured figures.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import report
from .sshd import Sshd, SshdUnavailable, ssh_version

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024

PATHS: dict[str, str] = {
    "agent_persistent": "agent, persistent client (Run)",
    "agent_stream": "agent, persistent client (Exec stream)",
    "agent_new_client": "agent, new client per call",
    "coworkctl": "coworkctl exec, fresh process",
    "coworkctl_mux": "coworkctl exec, fresh process, with coworkctl mux",
    "ssh": "ssh per call (no mux)",
    "ssh_mux": "ssh + ControlMaster",
    "limactl": "limactl shell",
}
SSH_BASELINES = ("ssh", "ssh_mux")


@dataclass(frozen=True)
class Plan:
    """How many calls each path makes per workload in one mode."""

    name: str
    exec_calls: dict[str, int]
    echo_calls: dict[str, int]
    warmup: int
    rounds: int
    transfer_bytes: int
    transfer_reps: int
    concurrency: int
    concurrent_batches: dict[str, int]
    start_reps: int
    claude_runs: int


PLANS = {
    "full": Plan(
        name="full",
        exec_calls={
            "agent_persistent": 2000,
            "agent_stream": 1000,
            "agent_new_client": 500,
            "coworkctl": 300,
            "coworkctl_mux": 300,
            "ssh": 300,
            "ssh_mux": 300,
            "limactl": 100,
        },
        echo_calls={
            "agent_persistent": 300,
            "agent_stream": 200,
            "agent_new_client": 100,
            "coworkctl": 50,
            "coworkctl_mux": 50,
            "ssh": 50,
            "ssh_mux": 50,
            "limactl": 20,
        },
        warmup=20,
        rounds=5,
        transfer_bytes=256 * MiB,
        transfer_reps=3,
        concurrency=64,
        concurrent_batches={"agent_async": 20, "ssh_mux": 3, "ssh": 3},
        start_reps=5,
        claude_runs=10,
    ),
    "quick": Plan(
        name="quick",
        exec_calls={
            "agent_persistent": 500,
            "agent_stream": 300,
            "agent_new_client": 300,
            "coworkctl": 30,
            "coworkctl_mux": 30,
            "ssh": 15,
            "ssh_mux": 30,
            "limactl": 10,
        },
        echo_calls={
            "agent_persistent": 50,
            "agent_stream": 50,
            "agent_new_client": 30,
            "coworkctl": 8,
            "coworkctl_mux": 8,
            "ssh": 5,
            "ssh_mux": 8,
            "limactl": 3,
        },
        warmup=5,
        rounds=3,
        transfer_bytes=256 * MiB,
        transfer_reps=1,
        concurrency=64,
        concurrent_batches={"agent_async": 5, "ssh_mux": 1, "ssh": 1},
        start_reps=3,
        claude_runs=3,
    ),
    "tiny": Plan(
        name="tiny",
        exec_calls={p: 3 for p in PATHS},
        echo_calls={p: 2 for p in PATHS},
        warmup=1,
        rounds=1,
        transfer_bytes=1 * MiB,
        transfer_reps=1,
        concurrency=8,
        concurrent_batches={"agent_async": 1, "ssh_mux": 1, "ssh": 1},
        start_reps=1,
        claude_runs=0,
    ),
}


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- statistics -------------------------------------------------------------------
def pct(sorted_xs: list[float], q: float) -> float:
    """Percentile by linear interpolation between closest ranks (q in [0, 100])."""
    if not sorted_xs:
        return float("nan")
    if len(sorted_xs) == 1:
        return sorted_xs[0]
    k = (len(sorted_xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (k - lo)


def latency_stats(samples_s: list[float], errors: int = 0) -> dict[str, Any]:
    xs = sorted(x * 1000 for x in samples_s)
    if not xs:
        return {"n": 0, "errors": errors}
    return {
        "n": len(xs),
        "errors": errors,
        "p50_ms": round(pct(xs, 50), 3),
        "p90_ms": round(pct(xs, 90), 3),
        "p99_ms": round(pct(xs, 99), 3),
        "mean_ms": round(statistics.fmean(xs), 3),
        "min_ms": round(xs[0], 3),
        "max_ms": round(xs[-1], 3),
    }


# -- the agent under test --------------------------------------------------------------
class Agent:
    """A real cowork-agent subprocess on a private unix socket."""

    def __init__(self, base: Path, name: str = "agent") -> None:
        self.dir = base / name
        self.dir.mkdir()
        self.ws = self.dir / "ws"
        self.ws.mkdir()
        self.token_file = self.dir / "token"
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.sock = self.dir / "agent.sock"
        self.target = f"unix:{self.sock}"
        self.log_file = self.dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "guest_agent",
            "--allow-root",  # bench runs as root on CI machines
            "--listen",
            self.target,
            "--token-file",
            str(self.token_file),
            "--root",
            str(self.ws),
            "--log-format",
            "json",
            "--log-file",
            str(self.log_file),
        ]

    def start(self) -> float:
        """Start the agent; return seconds from spawn to a SERVING health answer."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        env = {k: v for k, v in os.environ.items() if not k.startswith("COWORK_")}
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.argv(), cwd=REPO, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = t0 + 30
        req = health_pb2.HealthCheckRequest()
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"agent exited with {self.proc.returncode}: {err.strip()}")
            if not self.sock.exists():
                time.sleep(0.002)
                continue
            # A fresh channel per probe: no reconnect back-off hides the moment it is ready.
            with grpc.insecure_channel(self.target) as ch:
                try:
                    resp = health_pb2_grpc.HealthStub(ch).Check(req, timeout=1)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        return time.perf_counter() - t0
                except grpc.RpcError:
                    pass
            time.sleep(0.002)
        raise RuntimeError("agent not healthy within 30 s")

    def rss_mb(self) -> float:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()


# -- callers: one function per path that runs argv and returns its stdout -------------------
Caller = Callable[[list[str]], bytes]


class CallFailed(RuntimeError):
    pass


def _checked(argv: list[str], timeout: float = 120, env: dict[str, str] | None = None) -> bytes:
    out = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, env=env
    )
    if out.returncode != 0:
        raise CallFailed(
            f"{shlex.join(argv[:4])}… exit {out.returncode}: "
            f"{out.stderr.decode(errors='replace').strip()[:300]}"
        )
    return out.stdout


def lima_instance() -> tuple[str | None, str]:
    """(instance name, "") when limactl and a running instance exist, else (None, reason)."""
    exe = shutil.which("limactl")
    if exe is None:
        return None, "limactl not installed"
    want = os.environ.get("COWORK_BENCH_LIMA")
    try:
        out = subprocess.run(
            [exe, "list", "--json"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"`limactl list --json` failed: {exc}"
    for line in out.stdout.splitlines():
        try:
            inst = json.loads(line)
        except ValueError:
            continue
        if want and inst.get("name") != want:
            continue
        if inst.get("status") == "Running":
            return str(inst["name"]), ""
    return None, "no running Lima instance" + (f" named {want}" if want else "")


@dataclass
class Env:
    """Everything the workloads need: the agent, sshd, clients, and who is skipped and why."""

    plan: Plan
    work: Path
    agent: Agent
    sshd: Sshd
    client: Any
    callers: dict[str, Caller] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def build_callers(self) -> None:
        from host_client import CoworkClient

        agent, client = self.agent, self.client
        token = str(agent.token_file)

        def persistent(argv: list[str]) -> bytes:
            r = client.run(argv)
            if r.exit_code != 0:
                raise CallFailed(f"exit {r.exit_code}: {r.error[:200]}")
            return bytes(r.stdout)

        def stream(argv: list[str]) -> bytes:
            r = client.exec(argv).collect()
            if r.exit_code != 0:
                raise CallFailed(f"exit {r.exit_code}: {r.error[:200]}")
            return bytes(r.stdout)

        def new_client(argv: list[str]) -> bytes:
            with CoworkClient(agent.target, token) as c:
                r = c.run(argv)
            if r.exit_code != 0:
                raise CallFailed(f"exit {r.exit_code}: {r.error[:200]}")
            return bytes(r.stdout)

        ctl = str(Path(sys.executable).with_name("coworkctl"))
        if not os.access(ctl, os.X_OK):
            ctl = shutil.which("coworkctl") or ctl
        ctl_argv = [ctl, "--target", agent.target, "--token-file", token, "exec", "--"]

        # The plain path never uses a mux; the mux path has one of its own (private state dir).
        plain_env = {**os.environ, "COWORK_MUX": "0"}
        mux_env = {**os.environ, "XDG_STATE_HOME": str(self.work / "mux-state")}
        mux_ctl = [ctl, "--target", agent.target, "--token-file", token, "mux"]
        _checked([*mux_ctl, "start", "--idle", "600"], env=mux_env)
        atexit.register(subprocess.run, [*mux_ctl, "stop"], env=mux_env, capture_output=True)

        def coworkctl(argv: list[str]) -> bytes:
            return _checked([*ctl_argv, *argv], env=plain_env)

        def coworkctl_mux(argv: list[str]) -> bytes:
            return _checked([*ctl_argv, *argv], env=mux_env)

        ssh_plain = self.sshd.ssh(mux=False)
        ssh_mux = self.sshd.ssh(mux=True)

        def ssh(argv: list[str]) -> bytes:
            return _checked([*ssh_plain, shlex.join(argv)])

        def ssh_m(argv: list[str]) -> bytes:
            return _checked([*ssh_mux, shlex.join(argv)])

        self.callers = {
            "agent_persistent": persistent,
            "agent_stream": stream,
            "agent_new_client": new_client,
            "coworkctl": coworkctl,
            "coworkctl_mux": coworkctl_mux,
            "ssh": ssh,
            "ssh_mux": ssh_m,
        }
        name, reason = lima_instance()
        if name is None:
            self.skipped["limactl"] = reason
            log(f"skipping limactl shell: {reason}")
        else:
            limactl = shutil.which("limactl") or "limactl"

            def lima(argv: list[str]) -> bytes:
                return _checked([limactl, "shell", name, *argv])

            self.callers["limactl"] = lima


# -- workloads ------------------------------------------------------------------------
def interleaved(
    env: Env, counts: dict[str, int], argv: list[str], check: Callable[[bytes], bool]
) -> dict[str, tuple[list[float], int, str]]:
    """Run `argv` through every available path, `counts[path]` timed calls each, interleaved
    in `plan.rounds` rounds after `plan.warmup` untimed calls. Returns samples, errors, last error.
    """
    paths = [p for p in PATHS if p in env.callers]
    result: dict[str, tuple[list[float], int, str]] = {p: ([], 0, "") for p in paths}
    for p in paths:
        for _ in range(min(env.plan.warmup, counts[p])):
            try:
                env.callers[p](argv)
            except Exception:
                pass
    rounds = env.plan.rounds
    for r in range(rounds):
        for p in paths:
            n = counts[p] // rounds + (1 if r < counts[p] % rounds else 0)
            samples, errors, last = result[p]
            call = env.callers[p]
            for _ in range(n):
                t0 = time.perf_counter()
                try:
                    out = call(argv)
                except Exception as exc:
                    errors += 1
                    last = str(exc)[:300]
                    continue
                dt = time.perf_counter() - t0
                if check(out):
                    samples.append(dt)
                else:
                    errors += 1
                    last = f"wrong output ({len(out)} bytes)"
            result[p] = (samples, errors, last)
    return result


def run_latency(env: Env, key: str, counts: dict[str, int], argv: list[str], size: int) -> Any:
    log(f"{key}: {shlex.join(argv)} on {', '.join(p for p in PATHS if p in env.callers)}")
    t0 = time.monotonic()
    raw = interleaved(env, counts, argv, lambda out: len(out) == size)
    stats: dict[str, Any] = {}
    samples: dict[str, list[float]] = {}
    for p, (xs, errors, last) in raw.items():
        stats[p] = latency_stats(xs, errors)
        if last:
            stats[p]["last_error"] = last
        samples[p] = [round(x * 1000, 4) for x in xs]
        log(
            f"  {p:18} n={stats[p]['n']:5} p50={stats[p].get('p50_ms', float('nan')):9.3f} ms"
            f" p99={stats[p].get('p99_ms', float('nan')):9.3f} ms errors={errors}"
        )
    log(f"{key}: {time.monotonic() - t0:.1f} s")
    return stats, samples


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def run_transfers(env: Env) -> dict[str, Any]:
    size = env.plan.transfer_bytes
    src = env.work / "payload.bin"
    log(f"transfers: {size / MiB:g} MiB x {env.plan.transfer_reps}")
    with open(src, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * MiB)
            f.write(os.urandom(n))
            left -= n
    digest = sha256_file(src)
    remote_dir = env.agent.ws  # the agent's root doubles as the sshd's target dir (same host)
    back = env.work / "back.bin"
    scp_m = env.sshd.scp(mux=True)
    ssh_m = env.sshd.ssh(mux=True)
    client = env.client

    def ok_remote(path: Path) -> bool:
        return path.stat().st_size == size

    def ok_local() -> bool:
        return back.stat().st_size == size

    def agent_up() -> bool:
        r = client.upload(str(src), str(remote_dir / "up-agent.bin"))
        return bool(r.bytes == size and (not r.sha256 or r.sha256 == digest))

    def agent_down() -> bool:
        r = client.download(str(remote_dir / "up-agent.bin"), str(back))
        return bool(r.bytes == size and (not r.sha256 or r.sha256 == digest))

    def scp_up() -> bool:
        _checked([*scp_m, str(src), env.sshd.remote(str(remote_dir / "up-scp.bin"))], 600)
        return ok_remote(remote_dir / "up-scp.bin")

    def scp_down() -> bool:
        _checked([*scp_m, env.sshd.remote(str(remote_dir / "up-scp.bin")), str(back)], 600)
        return ok_local()

    def cat_up() -> bool:
        dest = shlex.quote(str(remote_dir / "up-cat.bin"))
        with open(src, "rb") as f:
            subprocess.run([*ssh_m, f"cat > {dest}"], stdin=f, check=True, timeout=600)
        return ok_remote(remote_dir / "up-cat.bin")

    def cat_down() -> bool:
        path = shlex.quote(str(remote_dir / "up-cat.bin"))
        with open(back, "wb") as f:
            subprocess.run(
                [*ssh_m, f"cat {path}"],
                stdout=f,
                stdin=subprocess.DEVNULL,
                check=True,
                timeout=600,
            )
        return ok_local()

    methods: dict[str, dict[str, Callable[[], bool]]] = {
        "upload": {"agent": agent_up, "scp": scp_up, "ssh_cat": cat_up},
        "download": {"agent": agent_down, "scp": scp_down, "ssh_cat": cat_down},
    }
    out: dict[str, Any] = {"bytes": size, "reps": env.plan.transfer_reps, "note": ""}
    times: dict[str, dict[str, list[float]]] = {d: {m: [] for m in ms} for d, ms in methods.items()}
    errors: dict[str, dict[str, str]] = {d: {} for d in methods}
    for _ in range(env.plan.transfer_reps):
        for direction, ms in methods.items():
            for m, fn in ms.items():
                t0 = time.perf_counter()
                try:
                    good = fn()
                except Exception as exc:
                    errors[direction][m] = str(exc)[:300]
                    continue
                dt = time.perf_counter() - t0
                if good:
                    times[direction][m].append(dt)
                else:
                    errors[direction][m] = "size or checksum mismatch"
    # Content check of the last downloads (outside the timed part).
    for direction, ms in methods.items():
        out[direction] = {}
        for m in ms:
            xs = times[direction][m]
            entry: dict[str, Any] = {"runs": len(xs)}
            if xs:
                med = statistics.median(xs)
                entry.update(
                    seconds=round(med, 4),
                    mb_per_s=round(size / 1e6 / med, 1),
                    mib_per_s=round(size / MiB / med, 1),
                    all_seconds=[round(x, 4) for x in xs],
                )
            if m in errors[direction]:
                entry["error"] = errors[direction][m]
            out[direction][m] = entry
            log(f"  {direction:8} {m:8} {entry.get('mb_per_s', 'n/a')} MB/s")
    out["download_checksum_ok"] = sha256_file(back) == digest if back.exists() else False
    for p in [src, back, *remote_dir.glob("up-*.bin")]:
        p.unlink(missing_ok=True)
    return out


def run_concurrent(env: Env) -> dict[str, Any]:
    from host_client import AsyncCoworkClient

    n = env.plan.concurrency
    batches = env.plan.concurrent_batches
    log(f"concurrency: {n} at once")
    out: dict[str, Any] = {"concurrency": n}

    async def agent_batches() -> tuple[list[float], list[float], int, str]:
        lat: list[float] = []
        walls: list[float] = []
        errors = 0
        last = ""
        async with AsyncCoworkClient(env.agent.target, str(env.agent.token_file)) as c:
            await c.run(["/bin/true"])  # connect

            async def one() -> float:
                t0 = time.perf_counter()
                r = await c.run(["/bin/true"])
                if r.exit_code != 0:
                    raise CallFailed(f"exit {r.exit_code}")
                return time.perf_counter() - t0

            for _ in range(batches["agent_async"]):
                t0 = time.perf_counter()
                res = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
                walls.append(time.perf_counter() - t0)
                for x in res:
                    if isinstance(x, BaseException):
                        errors += 1
                        last = str(x)[:300]
                    else:
                        lat.append(x)
        return lat, walls, errors, last

    def proc_batches(prefix: list[str], count: int) -> tuple[list[float], list[float], int, str]:
        from concurrent.futures import ThreadPoolExecutor

        lat: list[float] = []
        walls: list[float] = []
        errors = 0
        last = ""

        def one(_: int) -> tuple[float, str]:
            t0 = time.perf_counter()
            res = subprocess.run(
                [*prefix, "/bin/true"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=300,
            )
            dt = time.perf_counter() - t0
            if res.returncode != 0:
                return dt, f"exit {res.returncode}: {res.stderr.decode(errors='replace')[:200]}"
            return dt, ""

        with ThreadPoolExecutor(n) as pool:
            for _ in range(count):
                t0 = time.perf_counter()
                for dt, err in pool.map(one, range(n)):
                    if err:
                        errors += 1
                        last = err
                    else:
                        lat.append(dt)
                walls.append(time.perf_counter() - t0)
        return lat, walls, errors, last

    runs = {
        "agent_persistent": lambda: asyncio.run(agent_batches()),
        "ssh_mux": lambda: proc_batches(env.sshd.ssh(mux=True), batches["ssh_mux"]),
        "ssh": lambda: proc_batches(env.sshd.ssh(mux=False), batches["ssh"]),
    }
    for path, fn in runs.items():
        lat, walls, errors, last = fn()
        stats = latency_stats(lat, errors)
        calls = len(walls) * n
        stats.update(
            batches=len(walls),
            calls=calls,
            wall_s=round(sum(walls), 4),
            throughput_per_s=round(calls / sum(walls), 1) if walls else 0.0,
        )
        if lat:
            stats["p99_over_p50"] = round(stats["p99_ms"] / stats["p50_ms"], 2)
        if last:
            stats["last_error"] = last
        out[path] = stats
        log(
            f"  {path:18} calls={calls} errors={errors} {stats['throughput_per_s']}/s "
            f"p50={stats.get('p50_ms')} p99={stats.get('p99_ms')} ms"
        )
    return out


def run_agent_start(env: Env) -> dict[str, Any]:
    log(f"agent start-to-healthy x {env.plan.start_reps}")
    times: list[float] = []
    rss: list[float] = []
    for i in range(env.plan.start_reps):
        a = Agent(env.work, f"start{i}")
        try:
            times.append(a.start())
            time.sleep(0.5 if env.plan.name == "tiny" else 2.0)  # idle: let start-up work settle
            rss.append(a.rss_mb())
        finally:
            a.stop()
    return {
        "start_to_healthy_ms": {
            "median": round(statistics.median(times) * 1000, 1),
            "max": round(max(times) * 1000, 1),
            "all": [round(t * 1000, 1) for t in times],
        },
        "idle_rss_fresh_mb": round(statistics.median(rss), 1),
    }


def run_claude(env: Env) -> dict[str, Any]:
    """`coworkctl ask` first-event latency, via bench/claude_latency.py (the Claude helper's)."""
    script = Path(__file__).with_name("claude_latency.py")
    cli = REPO / ".tools" / "claude" / "node_modules" / ".bin" / "claude"
    if env.plan.claude_runs <= 0:
        return {"skipped": "tiny mode"}
    if not script.exists():
        return {"skipped": "pending: bench/claude_latency.py not there yet"}
    if not cli.exists():
        return {"skipped": f"pending: Claude Code CLI not installed at {cli} (make setup)"}
    out: dict[str, Any] = {}
    for label, extra in (("real_cli", []), ("stub_cli", ["--stub"])):
        log(f"claude ask first event ({label}) x {env.plan.claude_runs}")
        argv = [
            sys.executable,
            "-m",
            "bench.claude_latency",
            "--runs",
            str(env.plan.claude_runs),
            "--json",
            *extra,
        ]
        try:
            res = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            out[label] = {"error": "timed out after 900 s"}
            continue
        if res.returncode != 0:
            out[label] = {"error": (res.stderr or res.stdout).strip()[-500:]}
            continue
        try:
            out[label] = json.loads(res.stdout)
        except ValueError:
            out[label] = {"error": f"not JSON: {res.stdout[-300:]}"}
        else:
            r = out[label]
            log(
                f"  direct {r.get('direct_first_event_ms')} ms, via agent "
                f"{r.get('agent_first_event_ms')} ms"
            )
    return out


# -- metadata -----------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "hostname": platform.node(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gb": round(mem_gb, 1),
    }


def versions() -> dict[str, str]:
    import grpc

    from cowork.defaults import AGENT_VERSION

    try:
        git = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        git = ""
    return {
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "agent": AGENT_VERSION,
        "openssh": ssh_version(),
        "git_commit": git,
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def busy_processes(limit: int = 5) -> list[str]:
    """The top CPU users when the run started, so a noisy machine is visible in the report."""
    try:
        out = subprocess.run(
            ["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [" ".join(line.split()) for line in out.splitlines()[:limit]]


# -- main -----------------------------------------------------------------------------
def run(plan: Plan, out_dir: Path) -> dict[str, Any]:
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "mode": plan.name,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "command": shlex.join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]]),
            "machine": machine_info(),
            "versions": versions(),
            "loadavg_start": loadavg(),
            "busy_processes_start": busy_processes(),
        },
        "paths": {},
        "workloads": {},
        "samples": {},
    }
    work = Path(tempfile.mkdtemp(prefix="cwb-"))
    work.chmod(0o755)
    agent = Agent(work)
    sshd: Sshd | None = None
    client: Any = None
    try:
        from host_client import CoworkClient

        start_s = agent.start()
        rss_start = agent.rss_mb()
        log(f"agent healthy after {start_s * 1000:.0f} ms, RSS {rss_start:.1f} MB")
        try:
            sshd = Sshd()
        except SshdUnavailable as exc:
            raise SystemExit(f"bench: cannot start the SSH baseline: {exc}") from None
        sshd.start_master()
        log(f"sshd on 127.0.0.1:{sshd.port}, ControlMaster up")
        client = CoworkClient(agent.target, str(agent.token_file))
        client.wait_ready(10)
        env = Env(plan, work, agent, sshd, client)
        env.build_callers()
        for p, label in PATHS.items():
            results["paths"][p] = {"label": label, "skipped": env.skipped.get(p)}

        wl = results["workloads"]
        sm = results["samples"]
        wl["exec_true"], sm["exec_true"] = run_latency(
            env, "exec_true", plan.exec_calls, ["/bin/true"], 0
        )
        for key, size in (("echo_1k", 1024), ("echo_1m", MiB)):
            wl[key], sm[key] = run_latency(
                env, key, plan.echo_calls, ["head", "-c", str(size), "/dev/zero"], size
            )
        wl["transfer"] = run_transfers(env)
        wl["concurrent"] = run_concurrent(env)
        time.sleep(0.5 if plan.name == "tiny" else 2.0)
        wl["agent"] = {
            "start_to_healthy_ms_first": round(start_s * 1000, 1),
            "rss_after_start_mb": round(rss_start, 1),
            "idle_rss_after_workloads_mb": round(agent.rss_mb(), 1),
            **run_agent_start(env),
        }
        wl["claude_ask"] = run_claude(env)
    finally:
        if client is not None:
            client.close()
        if sshd is not None:
            sshd.close()
        agent.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["meta"]["loadavg_end"] = loadavg()
    results["meta"]["duration_s"] = round(time.time() - started, 1)
    results["ratios"] = report.ratios(results)
    results["targets"] = report.targets(results)
    report.write_all(results, out_dir)
    log(f"wrote {out_dir}/results.md, results.json, latency.png in {time.time() - started:.0f} s")
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.run", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="results directory")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer calls: under 2 minutes")
    mode.add_argument("--tiny", action="store_true", help="a few calls per path (smoke test)")
    args = ap.parse_args(argv)
    plan = PLANS["tiny" if args.tiny else "quick" if args.quick else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = run(plan, out)
    print((out / "results.md").read_text())
    missed = [t["name"] for t in results["targets"] if t["ok"] is False]
    if missed:
        log(f"targets missed: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
