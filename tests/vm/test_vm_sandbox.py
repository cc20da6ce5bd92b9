"""The second wall in a real guest (Debian 12, cgroup v2, systemd), as provisioning sets it up.

lima/provision/agent.sh created the sandbox user and a policy with `sandbox:
bwrap`; the unit delegates its cgroup, so each run gets memory/pids/cpu limits.
These are the escapes a workload would try, from inside, over virtio-vsock.
"""

from __future__ import annotations

import time

import pytest

from host_client import CoworkClient
from host_client.errors import InvalidArgument
from tests.vm.conftest import record
from tests.vm.harness import VM


def test_guest_agent_runs_work_sandboxed_as_the_sandbox_user(vclient: CoworkClient) -> None:
    info = vclient.info()
    assert info["agent_user"] == "root"
    assert info["identity_mode"] == "user" and info["run_as_user"].startswith("cowork-")
    assert info["sandbox"] == "bwrap" and info["seccomp"] is True
    assert info["limits"] == "cgroup2"  # a cgroup v2 guest: the limits below are real
    r = vclient.execute_in_vm("id -un; grep ^Seccomp: /proc/self/status; cat /proc/self/cgroup")
    user, _, mode, cgroup = r.output.split()
    assert user == info["run_as_user"] and mode == "2"
    assert cgroup == "0::/"  # its own cgroup namespace, rooted at the run's cgroup


def test_guest_secrets_and_agent_are_out_of_reach(vclient: CoworkClient) -> None:
    r = vclient.execute_in_vm("cat /etc/cowork/token")
    assert r.exit_code != 0 and "No such file" in r.error
    r = vclient.execute_in_vm(
        'python3 -c "import socket; s=socket.socket(socket.AF_UNIX); '
        "s.connect('/run/cowork/agent.sock')\""
    )
    assert r.exit_code != 0
    r = vclient.execute_in_vm("ps -eo args")
    assert "cowork-agent" not in r.output and "guest_agent" not in r.output
    r = vclient.execute_in_vm("echo x > /etc/escape; echo x > /opt/escape")
    assert r.exit_code != 0 and "Read-only file system" in r.error
    r = vclient.execute_in_vm("sudo -n true")
    assert r.exit_code != 0


def test_guest_fork_bomb_is_stopped_by_pids_max(vclient: CoworkClient) -> None:
    # Forking until it fails, against pids.max=40: the kernel says EAGAIN well before 200.
    script = (
        "import os, time\n"
        "kids = []\n"
        "try:\n"
        "    while len(kids) < 200:\n"
        "        pid = os.fork()\n"
        "        if pid == 0:\n"
        "            time.sleep(60)\n"
        "            os._exit(0)\n"
        "        kids.append(pid)\n"
        "    print('forked', len(kids))\n"
        "except OSError as e:\n"
        "    print('stopped', len(kids), e.errno)\n"
        "for pid in kids:\n"
        "    os.kill(pid, 9)\n"
    )
    r = vclient.run(["python3", "-c", script], limits={"pids": 40}, timeout=120)
    assert r.exit_code == 0, r.error
    word, count, *err = r.output.split()
    assert word == "stopped" and int(count) < 40 and err == ["11"], r.output  # EAGAIN
    # A real fork bomb: contained, stopped by the timeout, and the agent keeps serving.
    t0 = time.monotonic()
    bomb = vclient.run(["bash", "-c", ":(){ :|:& };:; sleep 60"], limits={"pids": 64}, timeout=5)
    assert bomb.timed_out
    record("fork_bomb_contained_s", round(time.monotonic() - t0, 1))
    assert vclient.execute_in_vm("echo alive").output == "alive\n"


def test_guest_memory_hog_is_oom_killed_and_reported(vclient: CoworkClient) -> None:
    hog = "b = bytearray(1 << 20)\nkeep = []\nwhile True:\n    keep.append(bytearray(8 << 20))\n"
    r = vclient.run(["python3", "-c", hog], limits={"memory_bytes": 96 << 20}, timeout=120)
    assert r.oom_killed, (r.exit_code, r.error)
    assert r.exit_code == 128 + 9
    # The agent survived and serves the next call at once.
    assert vclient.info()["agent_version"]
    assert vclient.execute_in_vm("echo alive").output == "alive\n"


RUNS = "/sys/fs/cgroup/system.slice/cowork-agent.service/runs"


def _limit_of_a_running_exec(vm: VM, vclient: CoworkClient, **limits: float) -> str:
    """pids.max of the cgroup the agent made for a running exec, read from the guest's root."""
    stream = vclient.exec(["sleep", "30"], limits=limits or None, interactive=True)
    events = iter(stream)
    next(events)  # Started: the process is in its cgroup before it runs
    try:
        newest = f"$(ls -d {RUNS}/run-* | sort -t- -k3 -n | tail -n1)"
        return vm.ssh(f'cat "{newest}/pids.max"').stdout.decode().strip()
    finally:
        stream.cancel()
        del events


def test_guest_limits_default_and_are_capped_by_the_policy_maximum(
    vm: VM, vclient: CoworkClient
) -> None:
    assert _limit_of_a_running_exec(vm, vclient) == "4096"  # the provisioned default
    # Asking for more than the policy's max gets the max.
    assert _limit_of_a_running_exec(vm, vclient, pids=1_000_000) == "16384"
    # More than the kernel can ever take is a mistake, and is said so.
    with pytest.raises(InvalidArgument, match="at most 4194304"):
        vclient.run(["true"], limits={"pids": 10_000_000})
    assert _limit_of_a_running_exec(vm, vclient, pids=100) == "100"


def test_guest_egress_is_refused_without_an_allowlisted_name(vm: VM, vclient: CoworkClient) -> None:
    probe = (
        "import urllib.request, urllib.error\n"
        "try:\n"
        "    urllib.request.urlopen('http://example.invalid/', timeout=10)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    r = vclient.run(["python3", "-c", probe], timeout=60)
    assert r.output.startswith("403") and "cowork egress policy" in r.output
    r = vclient.execute_in_vm("cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert r.output.split() == ["lo"]
    log = vm.ssh("cat /var/log/cowork/egress.jsonl").stdout.decode()
    assert "example.invalid" in log


def test_guest_box_is_one_cgroup_with_its_limits_and_goes_with_the_box(
    vm: VM, vclient: CoworkClient
) -> None:
    """A named box (issue #12) in a cgroup v2 guest: its pids.max holds for everything in it
    together (two execs share it), a joined process sees the box's cgroup namespace, and
    `remove` takes the cgroup away."""
    box = vclient.box("vmbox", create=True, limits={"pids": 30})
    try:
        pid = box.info().pid
        path = vm.ssh(f"cat /proc/{pid}/cgroup").stdout.decode().strip().split("::", 1)[1]
        cg = f"/sys/fs/cgroup{path}"
        assert vm.ssh(f"cat {cg}/pids.max").stdout.decode().strip() == "30"
        assert box.run("cat /proc/self/cgroup").output == "0::/\n"
        # 20 sleepers from one exec, then a second exec cannot start 20 more: one budget.
        box.run("for i in $(seq 20); do sleep 60 & done")
        script = (
            "import os\n"
            "n = 0\n"
            "try:\n"
            "    while n < 20:\n"
            "        if os.fork() == 0:\n"
            "            import time; time.sleep(60); os._exit(0)\n"
            "        n += 1\n"
            "except OSError as e:\n"
            "    print('stopped', n, e.errno)\n"
        )
        r = box.run(["python3", "-c", script], timeout=60)
        word, count, err = r.output.split()
        assert word == "stopped" and int(count) < 10 and err == "11", r.output
    finally:
        box.remove()
    assert vm.ssh(f"test -e {cg} && echo there || echo gone").stdout.decode().strip() == "gone"
