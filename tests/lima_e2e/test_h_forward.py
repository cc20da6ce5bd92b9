"""Lima's SSH master dies while the VM runs (host sleep does this; Lima #5420: Lima never
re-creates a socket forward). The next coworkctl call must answer within 5 s, either
working or saying in one line what is wrong and how to fix it; `coworkctl doctor`
reports it and `coworkctl doctor --fix` brings the forward back."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost


def _master_pid(vm: LimaHost) -> int:
    r = vm.run(["ssh", "-F", str(vm.ssh_config), "-O", "check", f"lima-{vm.name}"])
    m = re.search(rb"Master running \(pid=(\d+)\)", r.stderr)
    assert m, r.stderr
    return int(m.group(1))


def _kill_master(vm: LimaHost) -> None:
    pid = _master_pid(vm)
    os.kill(pid, signal.SIGKILL)
    for _ in range(100):
        if not os.path.exists(f"/proc/{pid}"):
            return
        time.sleep(0.05)
    pytest.fail(f"the SSH master {pid} did not die")


def test_the_forward_rides_on_lima_ssh_master(vm: LimaHost) -> None:
    pid = _master_pid(vm)
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"ssh" in f.read().split(b"\0")[0]
    assert vm.socket.is_socket()


def test_after_the_master_dies_the_next_call_answers_within_5s(vm: LimaHost) -> None:
    _kill_master(vm)
    t0 = time.monotonic()
    r = vm.coworkctl("exec", "--", "echo", "alive", timeout=30)
    took = time.monotonic() - t0
    assert took < 5.0, f"took {took:.1f}s"
    if r.returncode != 0:
        lines = r.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "coworkctl doctor --fix" in lines[0], lines[0]
    else:
        assert r.stdout == b"alive\n"


def test_doctor_reports_the_dead_forward_and_fix_restores_it(vm: LimaHost) -> None:
    if vm.coworkctl("exec", "--", "true", timeout=30).returncode == 0:
        _kill_master(vm)  # a previous call healed it: break it again
    report = vm.coworkctl("doctor", "--json", timeout=60)
    assert report.returncode == 1, report.stdout
    checks = {c["check"]: c for c in json.loads(report.stdout)["checks"]}
    assert not checks["agent"]["ok"], checks
    assert "doctor --fix" in checks["agent"]["fix"], checks["agent"]
    fixed = vm.coworkctl("doctor", "--fix", "--json", timeout=120)
    assert fixed.returncode == 0, fixed.stdout
    assert coworkctl_ok(vm, "exec", "--", "echo", "alive") == "alive\n"
