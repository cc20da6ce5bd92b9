"""An init whose agent can never get healthy: one line with the cause and the fix,
well before Lima's own 10-minute probe budget, and no VM left half-made.

(The other bad inputs, no QEMU, no Lima, a taken name, a broken image, need no
boot: tests/lima/test_init_errors.py.)"""

from __future__ import annotations

import time

from tests.lima_e2e.conftest import record
from tests.lima_e2e.harness import Image, LimaHost


def test_an_agent_that_cannot_start_fails_init_in_one_line_and_leaves_nothing(
    host: LimaHost, image: Image
) -> None:
    assert not host.inst_dir.exists(), "the main VM must be gone first (test_y_delete)"
    args = host.init_args(image)
    # Claude is not needed to see the agent fail; the agent gets an argument it refuses.
    args += ["--param", "CoworkClaude=false", "--param", "CoworkAgentArgs=--no-such-option"]
    t0 = time.monotonic()
    r = host.coworkctl(*args, timeout=1800)
    record("failed_init_s", round(time.monotonic() - t0, 1))
    lines = r.stderr.decode(errors="replace").strip().splitlines()
    assert r.returncode == 1, lines[-5:]
    last = lines[-1]
    assert last.startswith("coworkctl: provisioning failed in the VM: agent.sh: "), last
    assert "cowork-agent.service does not start" in last and "--no-such-option" in last, last
    assert "CoworkAgentArgs" in last  # the fix
    assert "the new VM was deleted again" in last
    assert not host.inst_dir.exists()
    assert host.processes() == []
