"""The bench scripts run once in tiny mode and produce well-formed output for every path.

No timing is asserted here: benchmarks are measured by `make bench`, not by
tests. This only proves that the scripts work (agent, real sshd, ControlMaster,
coworkctl, report and plot) so that `make bench` does not rot.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import PATHS

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_files_written(tiny_run: Path) -> None:
    assert (tiny_run / "results.json").stat().st_size > 0
    assert (tiny_run / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tiny_run / "results.md").read_text()
    assert "## Targets" in md
    for path in PATHS:
        if path != "limactl":
            assert json.loads((tiny_run / "results.json").read_text())["paths"][path]["label"] in md


def test_every_path_measured_or_skipped_with_reason(tiny_run: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    assert set(res["paths"]) == set(PATHS)
    for workload in ("exec_true", "echo_1k", "echo_1m"):
        stats = res["workloads"][workload]
        for path, info in res["paths"].items():
            if info["skipped"]:
                assert isinstance(info["skipped"], str) and info["skipped"]
                assert path not in stats
                continue
            s = stats[path]
            assert s["errors"] == 0, (workload, path, s.get("last_error"))
            assert s["n"] >= 1
            assert 0 < s["p50_ms"] <= s["p90_ms"] <= s["p99_ms"]
            assert len(res["samples"][workload][path]) == s["n"]
    # The baselines this bench exists for are never skipped.
    for path in ("agent_persistent", "agent_new_client", "coworkctl", "ssh", "ssh_mux"):
        assert not res["paths"][path]["skipped"]


def test_transfers_concurrency_and_footprint(tiny_run: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    wl = res["workloads"]
    for direction in ("upload", "download"):
        for method in ("agent", "scp", "ssh_cat"):
            entry = wl["transfer"][direction][method]
            assert "error" not in entry, entry
            assert entry["mb_per_s"] > 0
    assert wl["transfer"]["download_checksum_ok"] is True
    for path in ("agent_persistent", "ssh_mux", "ssh"):
        c = wl["concurrent"][path]
        assert c["errors"] == 0, c.get("last_error")
        assert c["calls"] == wl["concurrent"]["concurrency"]
    agent = wl["agent"]
    assert agent["start_to_healthy_ms"]["median"] > 0
    assert agent["idle_rss_fresh_mb"] > 0
    assert agent["idle_rss_after_workloads_mb"] > 0
    assert "skipped" in wl["claude_ask"] or wl["claude_ask"]


def test_ratios_and_targets_well_formed(tiny_run: Path) -> None:
    res = json.loads((tiny_run / "results.json").read_text())
    ratios = res["ratios"]["exec_true"]["agent_persistent"]
    assert ratios["speedup_vs_ssh"] > 0 and ratios["speedup_vs_ssh_mux"] > 0
    names = [t["name"] for t in res["targets"]]
    assert len(names) >= 12
    for t in res["targets"]:
        assert set(t) == {"name", "target", "measured", "ok"}
        assert t["ok"] in (True, False, None)
    meta = res["meta"]
    assert len(meta["loadavg_start"]) == 3 and len(meta["loadavg_end"]) == 3
    assert meta["versions"]["grpcio"] and meta["machine"]["cpus"]


def test_sandbox_latency_script_measures_all_four_paths() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.sandbox_latency", "--calls", "5", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)
    for path in ("root", "user", "bwrap", "box"):
        assert res[path]["p50_ms"] > 0
    assert "bwrap_adds_p50_ms" in res and "box_adds_p50_ms" in res
