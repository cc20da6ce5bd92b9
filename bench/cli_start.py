"""The CLI's own start: a fresh `coworkctl exec` through a running mux vs `ssh` + ControlMaster.

    .venv/bin/python -m bench.cli_start --out bench/results                # ~2 min
    .venv/bin/python -m bench.cli_start --baseline HEAD~3 --baseline-python /tmp/v/bin/python

One interleaved run (issue #14, "The CLI's own start"; goal: <= 0.5x ssh + ControlMaster):
  coworkctl_mux   the installed console script (`coworkctl exec -- /bin/true`), mux running
  baseline_mux    (with --baseline REF) the same through REF's code, from a git worktree,
                  run by --baseline-python (default: this interpreter) and REF's entry point
  ssh_mux         `ssh HOST /bin/true` through a ControlMaster to a private sshd on loopback
  python          `python -c pass`: the interpreter with site (the floor of any Python CLI)
  python_nosite   `python -S -c pass`: the interpreter alone

Every path is a fresh process per call, timed by wall clock, in rounds so that load from
elsewhere on this (shared) machine hits every path alike. Then `-X importtime` of the fast
path: what a fresh process imports, cumulative microseconds, median over runs.
Writes cli_start.md and cli_start.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .run import REPO, Agent, _checked, loadavg, machine_info
from .sshd import Sshd, ssh_version

LABELS = {
    "coworkctl_mux": "coworkctl exec, fresh process, mux running",
    "baseline_mux": "the same, baseline code",
    "ssh_mux": "ssh + ControlMaster",
    "python": "python -c pass (interpreter + site)",
    "python_nosite": "python -S -c pass (interpreter alone)",
}
GOAL_RATIO = 0.5


def entry_point(tree: Path) -> tuple[str, str]:
    """(module, function) of the coworkctl console script in `tree`'s pyproject.toml."""
    text = (tree / "pyproject.toml").read_text()
    m = re.search(r'^coworkctl\s*=\s*"([\w.]+):(\w+)"', text, re.M)
    if not m:
        raise SystemExit(f"no coworkctl console script in {tree}/pyproject.toml")
    return m.group(1), m.group(2)


def script_for(tree: Path, work: Path, name: str) -> Path:
    """A console script like pip's for `tree`'s entry point (pip's shebang, no flags)."""
    module, func = entry_point(tree)
    path = work / name
    path.write_text(
        f"import sys\nfrom {module} import {func}\n"
        "if __name__ == '__main__':\n    sys.exit(" + func + "())\n"
    )
    return path


def worktree(ref: str, work: Path) -> Path:
    dest = work / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(dest), ref], check=True
    )
    return dest


def importtime(argv: list[str], env: dict[str, str]) -> tuple[dict[str, int], int]:
    """Cumulative import time (us) of each top-level import of one run of argv, and how
    many modules it imported."""
    r = subprocess.run(
        [argv[0], "-X", "importtime", *argv[1:]],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    out: dict[str, int] = {}
    count = 0
    for line in r.stderr.decode(errors="replace").splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        if not cumulative.strip().isdigit():
            continue  # the header line
        count += 1
        if not name.startswith("  "):  # indented: imported by another module: in its sum
            out[name.strip()] = int(cumulative)
    return out, count


def profile(argv: list[str], env: dict[str, str], runs: int) -> dict[str, Any]:
    per: dict[str, list[int]] = {}
    totals: list[int] = []
    modules: list[int] = []
    for _ in range(runs):
        one, count = importtime(argv, env)
        totals.append(sum(one.values()))
        modules.append(count)
        for k, v in one.items():
            per.setdefault(k, []).append(v)
    top = sorted(((statistics.median(v), k) for k, v in per.items()), reverse=True)
    return {
        "total_us": statistics.median(totals),
        "modules": statistics.median(modules),
        "top": [{"module": k, "cumulative_us": round(us)} for us, k in top[:12]],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="cws-", dir="/tmp"))  # short: socket paths
    work.chmod(0o755)
    agent = Agent(work)
    sshd: Sshd | None = None
    base_tree: Path | None = None
    py = sys.executable
    ctl = str(Path(py).with_name("coworkctl"))
    mux_env = {**os.environ, "XDG_STATE_HOME": str(work / "state")}
    mux_env.pop("XDG_RUNTIME_DIR", None)
    mux_env.pop("COWORK_MUX", None)
    target = ["--target", agent.target, "--token-file", str(agent.token_file)]
    try:
        agent.start()
        sshd = Sshd()
        sshd.start_master()
        _checked([ctl, *target, "mux", "start", "--idle", "900"], env=mux_env)
        paths: dict[str, tuple[list[str], dict[str, str]]] = {
            "coworkctl_mux": ([ctl, *target, "exec", "--", "/bin/true"], mux_env),
        }
        if args.baseline:
            base_tree = worktree(args.baseline, work)
            script = script_for(base_tree, work, "coworkctl-baseline")
            base_env = {**mux_env, "PYTHONPATH": str(base_tree)}
            base_py = args.baseline_python or py
            argv = [base_py, str(script), *target, "exec", "--", "/bin/true"]
            paths["baseline_mux"] = (argv, base_env)
        paths["ssh_mux"] = ([*sshd.ssh(mux=True), "/bin/true"], dict(os.environ))
        paths["python"] = ([py, "-c", "pass"], dict(os.environ))
        paths["python_nosite"] = ([py, "-S", "-c", "pass"], dict(os.environ))

        for argv, env in paths.values():  # warm-up, and every path must work
            for _ in range(args.warmup):
                _checked(argv, env=env)
        samples: dict[str, list[float]] = {p: [] for p in paths}
        for _ in range(args.calls):
            for p, (argv, env) in paths.items():
                t0 = time.perf_counter()
                _checked(argv, env=env)
                samples[p].append((time.perf_counter() - t0) * 1000)

        # The console script's shebang is this interpreter: run it as `python -X importtime`.
        ours = [py, *paths["coworkctl_mux"][0]]
        profiles = {"coworkctl_mux": profile(ours, mux_env, args.profiles)}
        if "baseline_mux" in paths:
            argv, env = paths["baseline_mux"]
            profiles["baseline_mux"] = profile(argv, env, args.profiles)
        subprocess.run([ctl, *target, "mux", "stop"], env=mux_env, capture_output=True)
    finally:
        if sshd is not None:
            sshd.close()
        agent.stop()
        if base_tree is not None:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
                capture_output=True,
            )
        shutil.rmtree(work, ignore_errors=True)

    stats: dict[str, dict[str, Any]] = {}
    for p, xs in samples.items():
        xs.sort()
        stats[p] = {
            "label": LABELS[p],
            "n": len(xs),
            "p50_ms": round(statistics.median(xs), 2),
            "p90_ms": round(xs[int(0.9 * (len(xs) - 1))], 2),
            "min_ms": round(xs[0], 2),
        }
    ssh = stats["ssh_mux"]["p50_ms"]
    for p in stats:
        stats[p]["vs_ssh_mux"] = round(stats[p]["p50_ms"] / ssh, 3)
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "meta": {
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "duration_s": round(time.time() - started, 1),
            "command": " ".join(["python", "-m", "bench.cli_start", *sys.argv[1:]]),
            "commit": head,
            "baseline": args.baseline,
            "baseline_python": args.baseline_python,
            "python": sys.version.split()[0],
            "ssh": ssh_version(),
            "machine": machine_info(),
            "loadavg_end": loadavg(),
        },
        "goal": {
            "ratio_vs_ssh_mux": GOAL_RATIO,
            "met": stats["coworkctl_mux"]["vs_ssh_mux"] <= GOAL_RATIO,
        },
        "paths": stats,
        "importtime": profiles,
    }


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    lines = [
        "# coworkctl's own start vs ssh + ControlMaster",
        "",
        f"- Run: {m['started_at']}, {m['duration_s']} s — `{m['command']}` (commit {m['commit']})",
        f"- Python {m['python']}, {m['ssh']}; load average at the end {m['loadavg_end']}",
        "- `/bin/true` through each path, a fresh process per call, interleaved in rounds; "
        "the agent on a unix socket, a private sshd on 127.0.0.1.",
    ]
    if m["baseline"]:
        lines.append(
            f"- Baseline: the code of `{m['baseline']}` (git worktree, its console-script entry)"
            + (f", run by `{m['baseline_python']}`" if m["baseline_python"] else "")
        )
    g = res["goal"]
    ratio = res["paths"]["coworkctl_mux"]["vs_ssh_mux"]
    lines += [
        "",
        f"Goal: <= {g['ratio_vs_ssh_mux']}x the time of ssh + ControlMaster. "
        f"Measured: **{ratio}x** ({'met' if g['met'] else 'not met'}).",
        "",
        "| path | n | p50 ms | p90 ms | min ms | x the time of ssh + ControlMaster |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for s in res["paths"].values():
        lines.append(
            f"| {s['label']} | {s['n']} | {s['p50_ms']} | {s['p90_ms']} | {s['min_ms']} "
            f"| {s['vs_ssh_mux']} |"
        )
    for name, prof in res["importtime"].items():
        lines += [
            "",
            f"## `-X importtime`, {LABELS[name]}",
            "",
            f"{prof['modules']:.0f} modules imported, top-level imports sum to "
            f"{prof['total_us'] / 1000:.1f} ms (median; importtime itself inflates it).",
            "",
            "| top-level import | cumulative ms |",
            "|---|---:|",
        ]
        lines += [f"| `{t['module']}` | {t['cumulative_us'] / 1000:.1f} |" for t in prof["top"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench.cli_start", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results", help="results directory")
    ap.add_argument("--calls", type=int, default=200, help="timed calls per path")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--profiles", type=int, default=15, help="-X importtime runs per path")
    ap.add_argument("--baseline", metavar="REF", help="also time this git ref's coworkctl")
    ap.add_argument("--baseline-python", metavar="PY", help="the interpreter for --baseline")
    args = ap.parse_args(argv)
    res = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cli_start.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (out / "cli_start.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
