"""`coworkctl delete` leaves nothing of the VM behind (the workspace is the user's: it stays)."""

from __future__ import annotations

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost


def test_delete_of_a_running_vm_needs_force_and_says_so(vm: LimaHost) -> None:
    r = vm.coworkctl("delete")
    assert r.returncode == 1
    assert r.stderr.decode().strip().splitlines() == [
        f"coworkctl: VM {vm.name!r} is running: stop it first ('coworkctl stop') or pass --force"
    ]


def test_delete_force_leaves_nothing_behind(vm: LimaHost) -> None:
    out = coworkctl_ok(vm, "delete", "--force", timeout=300).strip()
    assert out == f"VM {vm.name!r} deleted (with its snapshots)"
    assert not (vm.lima_home / "_cowork" / "snapshots" / vm.name).exists()
    assert not vm.inst_dir.exists()  # disk, token, sockets, wheel, logs
    assert [p.name for p in vm.lima_home.iterdir() if not p.name.startswith("_")] == []
    assert vm.processes() == []  # no QEMU, host agent or SSH master of this run
    assert vm.limactl("list", "--quiet").stdout == b""
    assert (vm.workspace / "ws" / "new" / "file.txt").exists()  # the user's files stay
