"""The base after test_i and test_j (issue #15): it boots at its Lima snapshot with the
same token; a disk snapshot ("disk-1", the vz path) is refused while it runs, and
restored into it once stopped."""

from __future__ import annotations

import time

from tests.lima_e2e.conftest import coworkctl_ok, record
from tests.lima_e2e.harness import LimaHost
from tests.lima_e2e.test_i_snapshots import mark, one_line_error, package_installed, set_mark


def test_the_base_boots_at_its_snapshot_and_answers_with_the_same_token(vm: LimaHost) -> None:
    token = vm.token_file.read_bytes()
    coworkctl_ok(vm, "start", timeout=1200)
    assert mark(vm) == "before"
    assert not package_installed(vm)
    assert vm.token_file.read_bytes() == token
    assert coworkctl_ok(vm, "exec", "--", "echo", "same token").strip() == "same token"


def test_restoring_a_disk_snapshot_into_the_running_vm_is_refused(vm: LimaHost) -> None:
    set_mark(vm, "changed")
    line = one_line_error(vm.coworkctl("snapshot", "restore", "disk-1"))
    assert f"VM {vm.name!r} is running" in line and "stop it first" in line
    assert mark(vm) == "changed"


def test_a_disk_snapshot_restores_into_the_stopped_vm(vm: LimaHost) -> None:
    coworkctl_ok(vm, "stop", timeout=600)
    t0 = time.monotonic()
    out = coworkctl_ok(vm, "snapshot", "restore", "disk-1", timeout=1800)
    record("snapshot_restore_disk_stopped_s", round(time.monotonic() - t0, 1))
    assert "back at snapshot 'disk-1'" in out
    coworkctl_ok(vm, "start", timeout=1200)
    assert mark(vm) == "after"
    assert package_installed(vm)
    assert coworkctl_ok(vm, "exec", "--", "echo", "ok").strip() == "ok"
