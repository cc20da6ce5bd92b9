"""What the second wall costs: exec /bin/true through the agent, with and without the sandbox.

    .venv/bin/python -m bench.sandbox_latency [--calls 300] [--json]

Three real agents on unix sockets, one persistent client each, calls
interleaved (a, b, c, a, b, c, ...) so machine noise hits all alike:
- `root`:  --allow-root, sandbox none (what the agent did before the second wall),
- `user`:  --run-as a fresh unprivileged user, sandbox none (setpriv only),
- `bwrap`: --run-as that user, policy `sandbox: bwrap` (setpriv + bubblewrap +
  seccomp + the egress bridge into the box's network namespace), a new box per exec;
- `box`: the same agent, each exec into one existing named box (`--box`): one fork
  of the box's first process and an execve, nothing built per call.
Writes bench/results/sandbox_latency.json with --save.
Needs root (it creates and removes the user) and bubblewrap.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.claude.conftest import create_run_as_user, delete_run_as_user  # noqa: E402
from tests.conftest import AgentProc, make_agent  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(calls: int, warmup: int = 20) -> dict[str, Any]:
    user = create_run_as_user()
    policy = Path("/tmp") / f"cw-bench-policy-{user}.yaml"
    policy.write_text("sandbox: bwrap\nnetwork:\n  preset: offline\n")
    agents: dict[str, AgentProc] = {}
    try:
        agents["root"] = make_agent()
        agents["user"] = make_agent(["--run-as", user])
        agents["bwrap"] = make_agent(["--run-as", user, "--policy", str(policy)])
        clients = {k: a.client() for k, a in agents.items()}
        clients["box"] = agents["bwrap"].client()
        clients["box"].boxes.create("bench")
        for name, c in clients.items():
            for _ in range(warmup):
                assert c.run(["/bin/true"], box="bench" if name == "box" else None).exit_code == 0
        samples: dict[str, list[float]] = {k: [] for k in clients}
        for _ in range(calls):
            for name, c in clients.items():
                in_box = "bench" if name == "box" else None
                t0 = time.perf_counter()
                r = c.run(["/bin/true"], box=in_box)
                samples[name].append((time.perf_counter() - t0) * 1000)
                assert r.exit_code == 0
        for c in clients.values():
            c.close()
    finally:
        for a in agents.values():
            a.stop()
            shutil.rmtree(a.dir, ignore_errors=True)
        policy.unlink(missing_ok=True)
        delete_run_as_user(user)
    out: dict[str, Any] = {"calls": calls}
    for name, xs in samples.items():
        out[name] = {
            "p50_ms": round(statistics.median(xs), 3),
            "p90_ms": round(_pct(xs, 0.9), 3),
            "p99_ms": round(_pct(xs, 0.99), 3),
        }
    out["bwrap_adds_p50_ms"] = round(out["bwrap"]["p50_ms"] - out["root"]["p50_ms"], 3)
    out["box_adds_p50_ms"] = round(out["box"]["p50_ms"] - out["root"]["p50_ms"], 3)
    out["user_switch_adds_p50_ms"] = round(out["user"]["p50_ms"] - out["root"]["p50_ms"], 3)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json", action="store_true")
    p.add_argument("--save", action="store_true", help="write bench/results/sandbox_latency.json")
    args = p.parse_args(argv)
    res = measure(args.calls)
    if args.save:
        out = REPO / "bench" / "results" / "sandbox_latency.json"
        out.write_text(json.dumps(res, indent=2) + "\n")
    if args.json:
        print(json.dumps(res))
        return 0
    print(f"exec /bin/true through the agent, {res['calls']} interleaved calls each (ms)")
    print(f"{'path':8} {'p50':>8} {'p90':>8} {'p99':>8}")
    for name in ("root", "user", "bwrap", "box"):
        r = res[name]
        print(f"{name:8} {r['p50_ms']:8.2f} {r['p90_ms']:8.2f} {r['p99_ms']:8.2f}")
    print(
        f"user switch adds {res['user_switch_adds_p50_ms']:.2f} ms, "
        f"the bwrap sandbox adds {res['bwrap_adds_p50_ms']:.2f} ms, an exec into an "
        f"existing box {res['box_adds_p50_ms']:.2f} ms (p50)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
