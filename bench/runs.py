"""What runs with ids cost (issue #12): reattach latency, and the journal on a large output.

    .venv/bin/python -m bench.runs [--calls 100] [--gib 1] [--json]

One real agent on a unix socket (sandbox none), one persistent client:
- reattach: a finished detached run with a small journal; the time from the
  Attach call to its first output chunk (p50/p90 over `--calls`), and to its exit;
- journal: `head -c N /dev/zero` through a plain Exec stream (the client reads it
  all) against a detached run of the same command waited for with Wait (the agent
  writes it to the journal, the policy's default 64 MiB cap cutting its head),
  interleaved, and the replay of what the journal keeps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from host_client.models import Exited, Output, Started  # noqa: E402
from tests.conftest import make_agent  # noqa: E402


def _pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def measure(calls: int, gib: float, rounds: int = 3) -> dict[str, Any]:
    agent = make_agent()
    size = int(gib * 1024**3)
    try:
        with agent.client() as c:
            stream = c.process.exec(["sh", "-c", "echo hello"], detach=True)
            events = iter(stream)
            first = next(events)
            assert isinstance(first, Started)
            stream.cancel()
            run_id = first.run_id
            c.process.wait(run_id)
            to_first: list[float] = []
            to_exit: list[float] = []
            for _ in range(calls):
                t0 = time.perf_counter()
                for ev in c.process.attach(run_id, from_offset=0):
                    if isinstance(ev, Output):
                        to_first.append((time.perf_counter() - t0) * 1000)
                    elif isinstance(ev, Exited):
                        to_exit.append((time.perf_counter() - t0) * 1000)
            plain: list[float] = []
            detached: list[float] = []
            replay: list[float] = []
            kept = 0
            cmd = ["head", "-c", str(size), "/dev/zero"]
            for _ in range(rounds):
                t0 = time.perf_counter()
                got = sum(len(e.data) for e in c.process.exec(cmd) if isinstance(e, Output))
                plain.append(time.perf_counter() - t0)
                assert got == size
                t0 = time.perf_counter()
                s = c.process.exec(cmd, detach=True)
                it = iter(s)
                rid = next(it).run_id  # type: ignore[union-attr]
                s.cancel()
                info = c.process.wait(rid)
                detached.append(time.perf_counter() - t0)
                assert info.journal_end == size
                t0 = time.perf_counter()
                replayed = c.process.attach(rid, from_offset=0)
                kept = sum(len(e.data) for e in replayed if isinstance(e, Output))
                replay.append(time.perf_counter() - t0)
    finally:
        agent.stop()
    return {
        "reattach_first_output_ms": {
            "p50": statistics.median(to_first),
            "p90": _pct(to_first, 0.9),
        },
        "reattach_exit_ms": {"p50": statistics.median(to_exit), "p90": _pct(to_exit, 0.9)},
        "output_bytes": size,
        "plain_exec_s": statistics.median(plain),
        "detached_to_journal_s": statistics.median(detached),
        "journal_kept_bytes": kept,
        "replay_kept_s": statistics.median(replay),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = measure(args.calls, args.gib)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    r = result
    print(
        f"reattach: first output p50 {r['reattach_first_output_ms']['p50']:.2f} ms "
        f"(p90 {r['reattach_first_output_ms']['p90']:.2f}), exit p50 "
        f"{r['reattach_exit_ms']['p50']:.2f} ms"
    )
    gib = r["output_bytes"] / 1024**3
    print(
        f"{gib:g} GiB of output: plain Exec stream {r['plain_exec_s']:.2f} s, detached into "
        f"the journal {r['detached_to_journal_s']:.2f} s "
        f"({r['detached_to_journal_s'] / r['plain_exec_s']:.2f}x); the journal keeps "
        f"{r['journal_kept_bytes'] / 1024**2:.0f} MiB, replayed in {r['replay_kept_s']:.2f} s"
    )


if __name__ == "__main__":
    main()
