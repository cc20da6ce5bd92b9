"""`coworkctl stop` then `coworkctl start`: the VM comes back, and so do the agent,
its forward and the workspace mapping (Lima runs the provisioning on every boot)."""

from __future__ import annotations

import json
import time

from tests.lima_e2e.conftest import coworkctl_ok, record
from tests.lima_e2e.harness import LimaHost


def test_stop_stops_the_vm(vm: LimaHost) -> None:
    out = coworkctl_ok(vm, "stop", timeout=600)
    assert out.strip() == f"VM {vm.name!r} stopped"
    status = vm.coworkctl("status", "--json")
    assert status.returncode == 1
    assert json.loads(status.stdout)["status"] == "Stopped"


def test_a_call_to_a_stopped_vm_is_one_line_with_the_fix(vm: LimaHost) -> None:
    r = vm.coworkctl("exec", "--", "true", timeout=30)
    assert r.returncode != 0
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "coworkctl start" in lines[0], lines


def test_start_brings_the_agent_back(vm: LimaHost) -> None:
    t0 = time.monotonic()
    out = coworkctl_ok(vm, "start", timeout=1200)
    record("restart_to_ready_s", round(time.monotonic() - t0, 1))
    assert out.strip().endswith(f"target lima:{vm.name}"), out
    assert coworkctl_ok(vm, "exec", "--", "echo", "back").strip() == "back"


def test_after_a_restart_the_box_still_writes_the_workspace(vm: LimaHost) -> None:
    coworkctl_ok(vm, "exec", "--", "sh", "-c", "echo again > ws/after-restart.txt")
    landed = vm.workspace / "ws" / "after-restart.txt"
    assert landed.read_text() == "again\n" and landed.stat().st_uid == vm.user.pw_uid
