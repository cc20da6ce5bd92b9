"""Turn one bench run into results.json, results.md and latency.png.

.venv/bin/python -m bench.report bench/results     # re-render md/png from results.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

LATENCY_WORKLOADS = {
    "exec_true": "exec /bin/true",
    "echo_1k": "1 KiB stdout (head -c 1024)",
    "echo_1m": "1 MiB stdout (head -c 1048576)",
}
BASELINES = ("ssh", "ssh_mux")


def _p50(results: dict[str, Any], workload: str, path: str) -> float | None:
    v = results["workloads"].get(workload, {}).get(path, {}).get("p50_ms")
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def ratios(results: dict[str, Any]) -> dict[str, Any]:
    """For each latency workload and path: how many times faster than each SSH baseline (p50)."""
    out: dict[str, Any] = {}
    for wl in LATENCY_WORKLOADS:
        stats = results["workloads"].get(wl, {})
        out[wl] = {}
        for path in stats:
            mine = _p50(results, wl, path)
            if mine is None:
                continue
            row: dict[str, float] = {}
            for base in BASELINES:
                theirs = _p50(results, wl, base)
                if theirs is not None:
                    row[f"speedup_vs_{base}"] = round(theirs / mine, 1)
                    row[f"fraction_of_{base}"] = round(mine / theirs, 3)
            out[wl][path] = row
    return out


def _target(name: str, goal: str, measured: str, ok: bool | None) -> dict[str, Any]:
    return {"name": name, "target": goal, "measured": measured, "ok": ok}


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets next to what this run measured (ok=None: not measurable here)."""
    wl = results["workloads"]
    rt = results.get("ratios") or ratios(results)
    t: list[dict[str, Any]] = []
    p50 = _p50(results, "exec_true", "agent_persistent")
    t.append(
        _target(
            "persistent client exec p50",
            "<= 1.5 ms",
            f"{p50:.3f} ms" if p50 else "n/a",
            None if p50 is None else p50 <= 1.5,
        )
    )
    speed = rt.get("exec_true", {}).get("agent_persistent", {})
    for base, goal in (("ssh_mux", 50), ("ssh", 150)):
        x = speed.get(f"speedup_vs_{base}")
        t.append(
            _target(
                f"persistent client vs {base}",
                f">= {goal}x faster",
                f"{x}x" if x else "n/a",
                None if x is None else x >= goal,
            )
        )
    for path, label in (
        ("coworkctl", "coworkctl exec (fresh process) vs ssh_mux"),
        ("coworkctl_mux", "coworkctl exec (fresh process, coworkctl mux running) vs ssh_mux"),
    ):
        frac = rt.get("exec_true", {}).get(path, {}).get("fraction_of_ssh_mux")
        t.append(
            _target(
                label,
                "<= 0.5x the time",
                f"{frac}x" if frac is not None else "n/a",
                None if frac is None else frac <= 0.5,
            )
        )
    tr = wl.get("transfer", {})
    for direction in ("upload", "download"):
        d = tr.get(direction, {})
        mine = d.get("agent", {}).get("mb_per_s")
        others = [d.get(m, {}).get("mb_per_s") for m in ("scp", "ssh_cat")]
        others_ok = [o for o in others if isinstance(o, (int, float))]
        t.append(
            _target(
                f"{direction} {tr.get('bytes', 0) / 2**20:g} MiB",
                ">= 400 MB/s",
                f"{mine} MB/s" if mine else "n/a",
                None if mine is None else mine >= 400,
            )
        )
        t.append(
            _target(
                f"{direction} faster than scp and ssh cat",
                "agent > both",
                f"{mine} vs scp {others[0]}, ssh cat {others[1]} MB/s",
                None if mine is None or not others_ok else all(mine > o for o in others_ok),
            )
        )
    c = wl.get("concurrent", {}).get("agent_persistent", {})
    n = wl.get("concurrent", {}).get("concurrency", 64)
    if c:
        t.append(
            _target(
                f"{n} concurrent execs: errors",
                "0",
                str(c.get("errors")),
                c.get("errors") == 0 and c.get("n", 0) > 0,
            )
        )
        ratio = c.get("p99_over_p50")
        t.append(
            _target(
                f"{n} concurrent execs: p99/p50",
                "<= 10",
                f"{ratio} (p50 {c.get('p50_ms')} ms, p99 {c.get('p99_ms')} ms)",
                None if ratio is None else ratio <= 10,
            )
        )
    ag = wl.get("agent", {})
    for key, label in (
        ("idle_rss_fresh_mb", "agent idle RSS (fresh)"),
        ("idle_rss_after_workloads_mb", "agent idle RSS (after all workloads)"),
    ):
        v = ag.get(key)
        t.append(
            _target(label, "<= 60 MB", f"{v} MB" if v else "n/a", None if v is None else v <= 60)
        )
    sh = ag.get("start_to_healthy_ms", {}).get("median")
    t.append(
        _target(
            "agent start to healthy (median)",
            "<= 1000 ms",
            f"{sh} ms" if sh else "n/a",
            None if sh is None else sh <= 1000,
        )
    )
    return t


# -- Markdown ------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return str(v)


def _ok(v: bool | None) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[v]


def markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    m = meta["machine"]
    v = meta["versions"]
    wl = results["workloads"]
    rt = results["ratios"]
    paths = results["paths"]
    lines = [
        "# cowork agent vs SSH — benchmark results",
        "",
        f"- Run: {meta['started_at']}, mode **{meta['mode']}**, {meta.get('duration_s', '?')} s"
        f" — `{meta['command']}`",
        f"- Machine: {m['cpu']} x {m['cpus']} CPUs, {m['memory_gb']} GB, Linux {m['kernel']}",
        f"- Versions: Python {v['python']}, grpcio {v['grpcio']}, agent {v['agent']}, "
        f"{v['openssh']}, commit {v['git_commit'] or '?'}",
        f"- Load average (1/5/15 min): start {meta['loadavg_start']}, end "
        f"{meta.get('loadavg_end')}; busiest processes at start: "
        + "; ".join(f"`{p}`" for p in meta.get("busy_processes_start", [])[:3]),
        "- Everything over loopback on this one machine: the agent on a unix socket, a private "
        "`sshd` on 127.0.0.1 (ed25519 key, no PAM). Latencies are wall time seen by the caller; "
        "calls interleaved across paths in rounds after warm-up. MB = 10^6 bytes.",
        "",
        "## Targets (issue 6)",
        "",
        "| target | goal | measured | met |",
        "|---|---|---|---|",
    ]
    for t in results["targets"]:
        lines.append(f"| {t['name']} | {t['target']} | {t['measured']} | {_ok(t['ok'])} |")
    for wl_key, title in LATENCY_WORKLOADS.items():
        stats = wl.get(wl_key, {})
        lines += [
            "",
            f"## {title}: latency per call (ms)",
            "",
            "| path | n | p50 | p90 | p99 | x faster than ssh | x faster than ssh+mux | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p, info in paths.items():
            if info.get("skipped"):
                lines.append(f"| {info['label']} | skipped: {info['skipped']} | | | | | | |")
                continue
            s = stats.get(p)
            if not s:
                continue
            r = rt.get(wl_key, {}).get(p, {})
            lines.append(
                f"| {info['label']} | {s['n']} | {_fmt(s.get('p50_ms'))} | "
                f"{_fmt(s.get('p90_ms'))} | {_fmt(s.get('p99_ms'))} | "
                f"{_fmt(r.get('speedup_vs_ssh'), 1)} | {_fmt(r.get('speedup_vs_ssh_mux'), 1)} | "
                f"{s.get('errors', 0)} |"
            )
    tr = wl.get("transfer", {})
    if tr:
        size = tr["bytes"] / 2**20
        lines += [
            "",
            f"## Transfer of {size:g} MiB (median of {tr['reps']}; MB/s)",
            "",
            "| method | upload MB/s | download MB/s |",
            "|---|---:|---:|",
        ]
        names = {
            "agent": "agent (CoworkClient.upload/download, unix socket)",
            "scp": "scp (through the ControlMaster)",
            "ssh_cat": "ssh cat (through the ControlMaster)",
        }
        for k, label in names.items():
            up = tr.get("upload", {}).get(k, {})
            down = tr.get("download", {}).get(k, {})
            lines.append(
                f"| {label} | {_fmt(up.get('mb_per_s', up.get('error')), 1)} | "
                f"{_fmt(down.get('mb_per_s', down.get('error')), 1)} |"
            )
        lines.append(f"\nDownload content check (sha256): {tr.get('download_checksum_ok')}.")
    cc = wl.get("concurrent", {})
    if cc:
        lines += [
            "",
            f"## {cc['concurrency']} concurrent execs of /bin/true",
            "",
            "| path | calls | errors | throughput (calls/s) | p50 ms | p99 ms | p99/p50 |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        labels = {
            "agent_persistent": "agent, one AsyncCoworkClient (asyncio.gather)",
            "ssh_mux": f"ssh + ControlMaster ({cc['concurrency']} processes)",
            "ssh": f"ssh per call ({cc['concurrency']} processes)",
        }
        for k, label in labels.items():
            s = cc.get(k)
            if not s:
                continue
            lines.append(
                f"| {label} | {s.get('calls')} | {s.get('errors')} | "
                f"{_fmt(s.get('throughput_per_s'), 1)} | {_fmt(s.get('p50_ms'))} | "
                f"{_fmt(s.get('p99_ms'))} | {_fmt(s.get('p99_over_p50'))} |"
            )
    ag = wl.get("agent", {})
    if ag:
        sth = ag.get("start_to_healthy_ms", {})
        lines += [
            "",
            "## Agent footprint",
            "",
            "| figure | value |",
            "|---|---:|",
            f"| start to healthy, median of {len(sth.get('all', []))} (ms) | "
            f"{_fmt(sth.get('median'), 1)} (max {_fmt(sth.get('max'), 1)}) |",
            f"| idle RSS, fresh agent (MB) | {_fmt(ag.get('idle_rss_fresh_mb'), 1)} |",
            f"| RSS of the bench agent right after start (MB) | "
            f"{_fmt(ag.get('rss_after_start_mb'), 1)} |",
            f"| idle RSS of the bench agent after all workloads (MB) | "
            f"{_fmt(ag.get('idle_rss_after_workloads_mb'), 1)} |",
        ]
    cl = wl.get("claude_ask", {})
    lines += ["", "## Claude `ask`: time to the first event", ""]
    if "skipped" in cl:
        lines.append(f"Not measured in this run: {cl['skipped']}.")
    else:
        lines += [
            "Measured by `bench/claude_latency.py` (real Claude Code CLI against the scripted "
            "fake Messages API; `stub` replaces the CLI with a shell script to isolate the "
            "agent's fixed cost).",
            "",
            "| CLI | runs | direct first event ms | via agent ms | agent adds ms |",
            "|---|---:|---:|---:|---:|",
        ]
        for label, r in cl.items():
            if "error" in r:
                lines.append(f"| {label} | error: {str(r['error'])[:120]} | | | |")
                continue
            lines.append(
                f"| {label} | {r.get('runs')} | {r.get('direct_first_event_ms')} | "
                f"{r.get('agent_first_event_ms')} | {r.get('agent_added_first_event_ms')} |"
            )
    skipped = {p: i["skipped"] for p, i in paths.items() if i.get("skipped")}
    if skipped:
        lines += ["", "Skipped paths: " + "; ".join(f"{p}: {r}" for p, r in skipped.items()) + "."]
    lines += ["", "![latency distributions](latency.png)", ""]
    return "\n".join(lines)


# -- plot ----------------------------------------------------------------------------------
def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = results.get("samples", {})
    labels = {p: i["label"] for p, i in results["paths"].items()}
    workloads = [w for w in LATENCY_WORKLOADS if samples.get(w)]
    fig, axes = plt.subplots(
        1, len(workloads) + 1, figsize=(6 * (len(workloads) + 1), 6), squeeze=False
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    order = [p for p in results["paths"] if any(samples.get(w, {}).get(p) for w in workloads)]
    color_of = {p: colors[i % len(colors)] for i, p in enumerate(order)}
    for ax, w in zip(axes[0], workloads, strict=False):
        data = [(p, samples[w][p]) for p in order if samples[w].get(p)]
        parts = ax.boxplot(
            [d for _, d in data],
            vert=True,
            whis=(1, 99),
            showfliers=True,
            flierprops={"markersize": 2, "alpha": 0.4},
            patch_artist=True,
        )
        for patch, (p, _) in zip(parts["boxes"], data, strict=True):
            patch.set_facecolor(color_of[p])
            patch.set_alpha(0.6)
        ax.set_yscale("log")
        ax.set_xticks(range(1, len(data) + 1))
        ax.set_xticklabels([labels[p] for p, _ in data], rotation=35, ha="right", fontsize=8)
        ax.set_ylabel("latency per call (ms, log scale)")
        ax.set_title(f"{LATENCY_WORKLOADS[w]}\n(box: p25-p75, whiskers: p1-p99)", fontsize=10)
        ax.grid(True, which="both", axis="y", alpha=0.3)
    ax = axes[0][-1]
    for p in order:
        xs = sorted(samples.get("exec_true", {}).get(p, []))
        if not xs:
            continue
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=labels[p], color=color_of[p])
    ax.set_xscale("log")
    ax.set_xlabel("exec /bin/true latency (ms, log scale)")
    ax.set_ylabel("fraction of calls ≤ x")
    ax.set_title("exec /bin/true: cumulative distribution", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    meta = results["meta"]
    fig.suptitle(
        f"cowork agent vs SSH — {meta['started_at']}, {meta['mode']} run, "
        f"{meta['machine']['cpus']} CPUs, load {meta['loadavg_start']}",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "results.md").write_text(markdown(results))
    plot(results, out_dir / "latency.png")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out_dir = Path(args[0] if args else "bench/results")
    results = json.loads((out_dir / "results.json").read_text())
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    write_all(results, out_dir)
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
