"""bench/transfer.py runs once in tiny mode: every method copies and is checked (no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_transfer_bench_measures_every_method_in_tiny_mode(tmp_path: Path) -> None:
    args = ["--mib", "2", "--reps", "1", "--files", "50", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.transfer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "transfer.json").read_text())
    for kind, methods in (
        ("upload", {"agent", "agent_grpc", "agent_hvsock", "scp", "ssh_cat"}),
        ("download", {"agent", "agent_grpc", "agent_hvsock", "scp", "ssh_cat"}),
        ("tree_upload", {"agent", "tar_ssh"}),
    ):
        assert set(res[kind]) == methods
        for m, entry in res[kind].items():
            assert entry["runs"] == 1 and "error" not in entry, (kind, m, entry)
    assert res["checks"] == {
        "tree_agent_files": 50,
        "tree_tar_files": 50,
        "download_sha256_ok": True,
    }
    assert "| tree_upload | agent |" in (tmp_path / "transfer.md").read_text()
