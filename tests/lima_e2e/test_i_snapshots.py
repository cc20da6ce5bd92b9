"""Snapshots (issue #15) of the real Lima VM: Lima's own (`limactl snapshot`, QEMU) and
the disk copy that vz users get, both run here on the QEMU driver.

The VM's life over test_i, test_j and test_k (each boot under TCG costs minutes, so
every boot proves several things): a file outside the workspace says "before"; a save
of the running VM (stop, save, start); the file says "after" and a package is
installed; bad input is refused without changing anything; the stopped VM gets a disk
snapshot of that state ("disk-1"), then the Lima snapshot is restored into it. test_j
clones it (the clones show "before"); test_k boots it ("before", the same token),
refuses to restore disk-1 into it while it runs, then restores disk-1 ("after").
"""

from __future__ import annotations

import json
import os
import subprocess
import time

from tests.lima_e2e.conftest import coworkctl_ok, record
from tests.lima_e2e.harness import LimaHost

MARK = "/var/lib/cowork-e2e/mark"  # outside the workspace: what a snapshot covers
PACKAGE = "cowork-e2e-probe"

# A tiny package built in the guest (it has no network): dpkg's state is what changes.
_INSTALL = f"""set -e
d=$(mktemp -d)
mkdir -p "$d/DEBIAN" "$d/usr/share/{PACKAGE}"
cat >"$d/DEBIAN/control" <<'CONTROL'
Package: {PACKAGE}
Version: 1.0
Architecture: all
Maintainer: e2e <e2e@example.invalid>
Description: probe
CONTROL
echo probe >"$d/usr/share/{PACKAGE}/probe"
dpkg-deb --build "$d" /tmp/{PACKAGE}.deb >/dev/null
sudo dpkg -i /tmp/{PACKAGE}.deb >/dev/null
"""


def guest(vm: LimaHost, script: str, timeout: float = 120) -> str:
    """Run `script` in the guest as the Lima user (sudo available) over Lima's SSH."""
    r = vm.ssh(f"bash -c {_quote(script)}", timeout=timeout)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return r.stdout.decode(errors="replace")


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def set_mark(vm: LimaHost, text: str) -> None:
    guest(vm, f"sudo mkdir -p /var/lib/cowork-e2e && echo {text} | sudo tee {MARK} >/dev/null")


def mark(vm: LimaHost) -> str:
    return guest(vm, f"cat {MARK}").strip()


def package_installed(vm: LimaHost) -> bool:
    r = vm.ssh(f"dpkg-query -W -f='${{Status}}' {PACKAGE}", timeout=60)
    return r.returncode == 0 and b"install ok installed" in r.stdout


def one_line_error(r: subprocess.CompletedProcess[bytes]) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("coworkctl: "), lines
    return lines[0]


def snapshot_names(vm: LimaHost) -> dict[str, dict[str, object]]:
    out = coworkctl_ok(vm, "snapshot", "ls", "--json")
    return {s["name"]: s for s in (json.loads(line) for line in out.splitlines() if line)}


def test_save_of_the_running_vm_says_the_workspace_is_not_in_it(vm: LimaHost) -> None:
    set_mark(vm, "before")
    t0 = time.monotonic()
    r = vm.coworkctl("snapshot", "save", "before-risky", "--json", timeout=1800)
    record("snapshot_save_lima_running_s", round(time.monotonic() - t0, 1))
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    saved = json.loads(r.stdout)
    assert saved["name"] == "before-risky" and saved["method"] == "lima"
    assert saved["workspace_included"] is False
    assert "does not cover" in r.stderr.decode()
    assert coworkctl_ok(vm, "exec", "--", "echo", "back").strip() == "back"


def test_snapshot_ls_shows_each_with_its_time_and_size(vm: LimaHost) -> None:
    snap = snapshot_names(vm)["before-risky"]
    assert snap["method"] == "lima" and snap["how"] == "qcow2 internal"
    assert isinstance(snap["size"], int) and snap["size"] >= 0
    created = time.mktime(time.strptime(str(snap["created"]), "%Y-%m-%dT%H:%M:%SZ"))
    assert abs(created - time.mktime(time.gmtime())) < 3600
    table = coworkctl_ok(vm, "snapshot", "ls")
    assert "before-risky" in table and "CREATED" in table and "SIZE" in table


def test_a_risky_change_to_the_vm(vm: LimaHost) -> None:
    set_mark(vm, "after")
    guest(vm, _INSTALL)
    assert mark(vm) == "after" and package_installed(vm)


def test_restoring_an_unknown_snapshot_is_one_line_and_changes_nothing(vm: LimaHost) -> None:
    line = one_line_error(vm.coworkctl("snapshot", "restore", "no-such"))
    assert "no snapshot 'no-such'" in line and "snapshot ls" in line
    assert mark(vm) == "after"


def test_saving_under_a_name_that_exists_is_refused(vm: LimaHost) -> None:
    line = one_line_error(vm.coworkctl("snapshot", "save", "before-risky"))
    assert "already has a snapshot 'before-risky'" in line


def test_saving_while_the_disk_is_full_is_one_line_and_leaves_nothing(vm: LimaHost) -> None:
    store = vm.lima_home / "_cowork" / "snapshots" / vm.name
    store.mkdir(parents=True, exist_ok=True)
    for d in (store.parent.parent, store.parent, store):
        os.chown(d, vm.user.pw_uid, vm.user.pw_gid)
    opts = f"size=8m,mode=0700,uid={vm.user.pw_uid},gid={vm.user.pw_gid}"
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "cwe2e-full", str(store)], check=True)
    try:
        line = one_line_error(vm.coworkctl("snapshot", "save", "full", "--method", "disk"))
        assert "not enough disk space" in line and "free" in line
        assert [p.name for p in store.iterdir() if p.name != "owner"] == []
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert vm.limactl("list", "--format={{.Status}}", vm.name).stdout.strip() == b"Running"
    assert "full" not in snapshot_names(vm)


def test_cloning_a_running_vm_is_refused_with_the_fix(vm: LimaHost) -> None:
    line = one_line_error(vm.coworkctl("clone", vm.name, "cwe2e-x"))
    assert f"VM {vm.name!r} is running: stop it first" in line
    assert vm.limactl("list", "--quiet").stdout.split() == [vm.name.encode()]


def test_cloning_into_a_name_that_exists_is_refused(vm: LimaHost) -> None:
    line = one_line_error(vm.coworkctl("clone", vm.name, vm.name))
    assert f"a Lima VM named {vm.name!r} already exists" in line


def test_a_disk_snapshot_of_the_stopped_vm(vm: LimaHost) -> None:
    coworkctl_ok(vm, "stop", timeout=600)
    t0 = time.monotonic()
    out = coworkctl_ok(vm, "snapshot", "save", "disk-1", "--method", "disk", timeout=1800)
    record("snapshot_save_disk_stopped_s", round(time.monotonic() - t0, 1))
    assert "saved snapshot 'disk-1'" in out
    snap = snapshot_names(vm)["disk-1"]
    assert snap["method"] == "disk" and snap["how"] in ("reflink", "copy")
    record("snapshot_disk_bytes", snap["size"])
    record("vm_disk_bytes", (vm.inst_dir / "disk").stat().st_blocks * 512)


def test_restoring_a_lima_snapshot_into_the_stopped_vm_keeps_it_stopped(vm: LimaHost) -> None:
    t0 = time.monotonic()
    out = coworkctl_ok(vm, "snapshot", "restore", "before-risky", timeout=1800)
    record("snapshot_restore_lima_stopped_s", round(time.monotonic() - t0, 1))
    assert "back at snapshot 'before-risky'" in out
    assert vm.limactl("list", "--format={{.Status}}", vm.name).stdout.strip() == b"Stopped"
    # test_j's clones of this disk, and test_k's boot of it, show what it holds.
