"""Endurance in the real guest: the unit's agent gives back every run's cgroup, fd and child.

The local soak tier (tests/soak) runs thousands of calls on this host, which has
no cgroup v2. Here the agent runs under systemd exactly as provisioned (its own
delegated cgroup, LimitNOFILE from the unit, bwrap boxes), reached over
virtio-vsock, for a bounded mix of calls; then the guest's own view must be back
at the baseline: the agent's fds, threads and children, the run cgroups under
the unit's cgroup, zombies anywhere, and temp files.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from host_client import CoworkClient
from host_client.errors import CoworkError
from tests.vm.conftest import record
from tests.vm.harness import VM

CALLS = int(os.environ.get("COWORK_VM_SOAK_CALLS", "120"))
UNIT_CGROUP = "/sys/fs/cgroup/system.slice/cowork-agent.service"

# What the agent holds, seen from inside the guest (its own python3), as one JSON object.
PROBE = f"""
import glob, json, os, subprocess
pid = int(subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", "cowork-agent"],
                         capture_output=True, text=True).stdout)
parent, state = {{}}, {{}}
for d in glob.glob("/proc/[0-9]*"):
    try:
        rest = open(d + "/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        continue
    parent[int(d[6:])], state[int(d[6:])] = int(rest[1]), rest[0]
def under(p):
    while p in parent and p > 1:
        p = parent[p]
        if p == pid:
            return True
    return False
nofile = [l.split()[3] for l in open(f"/proc/{{pid}}/limits") if l.startswith("Max open files")]
print(json.dumps({{
    "fds": len(os.listdir(f"/proc/{{pid}}/fd")),
    "threads": len(os.listdir(f"/proc/{{pid}}/task")),
    "descendants": sum(1 for p in parent if under(p)),
    "cgroups": sum(len(dirs) for _, dirs, _ in os.walk("{UNIT_CGROUP}")),
    "zombies": sum(1 for p, s in state.items() if s == "Z" and under(p)),
    "tmp": len(glob.glob("/tmp/*cowork*") + glob.glob("/var/tmp/*cowork*")),
    "nofile": nofile[0],
    "zombie_info": [
        f"{{p}} ({{open(f'/proc/{{p}}/comm').read().strip()}}) of {{parent[p]}}"
        for p, s in state.items() if s == "Z" and under(p)
    ],
}}))
"""


def _probe(vm: VM) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(vm.ssh("python3 -", stdin=PROBE.encode()).stdout.decode())
    return out


def _settled(vm: VM, baseline: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    now = _probe(vm)
    while time.monotonic() < deadline:
        keys = ("fds", "cgroups", "descendants")
        if all(int(now[k]) <= int(baseline[k]) for k in keys) and now["zombies"] == 0:
            break
        time.sleep(1)
        now = _probe(vm)
    return now


def _mixed_call(c: CoworkClient, i: int) -> None:
    kind = i % 8
    if kind == 0:
        assert c.run(["echo", f"x{i}"]).output == f"x{i}\n"
    elif kind == 1:
        data = os.urandom(2000)
        assert c.exec(["cat"], stdin=data).collect().stdout == data
    elif kind == 2:
        assert c.exec(["sh", "-c", "test -t 0"], pty=True).collect().exit_code == 0
    elif kind == 3:
        for _ev in c.exec(["sleep", "30"]):
            break  # cancel
    elif kind == 4:
        assert c.run(["sleep", "30"], timeout=0.3).timed_out
    elif kind == 5:
        assert c.run(["sh", "-c", "sleep 30 & echo bg"]).output == "bg\n"
    elif kind == 6:
        with pytest.raises(CoworkError):
            c.run(["/no/such/binary"])
    else:
        c.write_file(f"/workspace/soak-{i % 5}.txt", f"v{i}")
        assert c.read_file(f"/workspace/soak-{i % 5}.txt") == f"v{i}"
        assert c.list_dir("/workspace")
        c.remove(f"/workspace/soak-{i % 5}.txt")


def test_guest_agent_returns_every_cgroup_fd_and_child_after_mixed_calls(
    vm: VM, vclient: CoworkClient
) -> None:
    for i in range(16):  # warm-up
        _mixed_call(vclient, i)
    # Calls in parallel grow the agent's lazy thread pools to their bound first.
    with ThreadPoolExecutor(12) as pool:
        list(pool.map(lambda i: vclient.write_file(f"/workspace/warm-{i}.txt", "w"), range(12)))
        list(pool.map(lambda i: vclient.list_dir("/workspace"), range(12)))
    baseline = _settled(vm, _probe(vm))
    t0 = time.monotonic()
    for i in range(CALLS):
        _mixed_call(vclient, i)
    elapsed = time.monotonic() - t0
    after = _settled(vm, baseline)
    record(
        "vm_soak",
        {"calls": CALLS, "seconds": round(elapsed, 1), "baseline": baseline, "after": after},
    )
    assert baseline["nofile"] == "16384"  # the unit's deliberate LimitNOFILE
    assert int(after["fds"]) <= int(baseline["fds"]), (baseline, after)
    assert int(after["threads"]) <= int(baseline["threads"]), (baseline, after)
    assert int(after["descendants"]) <= int(baseline["descendants"]), (baseline, after)
    assert int(after["cgroups"]) <= int(baseline["cgroups"]), (baseline, after)
    assert int(after["zombies"]) == 0, after["zombie_info"]
    assert int(after["tmp"]) <= int(baseline["tmp"]), (baseline, after)
