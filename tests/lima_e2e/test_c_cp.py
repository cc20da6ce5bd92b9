"""`coworkctl cp` both ways through Lima's socket forward, into the shared workspace."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost


def _host_file(vm: LimaHost, name: str, data: bytes) -> Path:
    """A file in a host directory the host user owns (the source of an upload)."""
    d = vm.base / "home" / "up"
    d.mkdir(exist_ok=True)
    os.chown(d, vm.user.pw_uid, vm.user.pw_gid)
    p = d / name
    p.write_bytes(data)
    os.chown(p, vm.user.pw_uid, vm.user.pw_gid)
    return p


def test_a_file_copied_into_the_vm_lands_in_the_host_workspace(vm: LimaHost) -> None:
    data = os.urandom(5 << 20)
    src = _host_file(vm, "blob.bin", data)
    coworkctl_ok(vm, "cp", "-q", str(src), "vm:/workspace/cp/blob.bin", timeout=300)
    landed = vm.workspace / "cp" / "blob.bin"
    assert landed.read_bytes() == data
    assert (landed.stat().st_uid, landed.stat().st_gid) == (vm.user.pw_uid, vm.user.pw_gid)


def test_a_file_copied_out_of_the_vm_is_byte_identical(vm: LimaHost) -> None:
    out = coworkctl_ok(
        vm, "exec", "--", "sh", "-c", "head -c 3000000 /dev/urandom > out.bin && sha256sum out.bin"
    )
    dest = vm.base / "home" / "down.bin"
    coworkctl_ok(vm, "cp", "-q", "vm:/workspace/out.bin", str(dest), timeout=300)
    import hashlib

    assert hashlib.sha256(dest.read_bytes()).hexdigest() == out.split()[0]
    assert dest.stat().st_uid == vm.user.pw_uid  # written by coworkctl, as the user


def test_a_directory_round_trips(vm: LimaHost) -> None:
    tree = vm.base / "home" / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / "a" / "b" / "deep.txt").write_text("deep\n")
    (tree / "top.txt").write_text("top\n")
    for p in [tree, *tree.rglob("*")]:
        os.chown(p, vm.user.pw_uid, vm.user.pw_gid)
    coworkctl_ok(vm, "cp", "-q", str(tree), "vm:/workspace/tree", timeout=300)
    back = vm.base / "home" / "tree-back"
    coworkctl_ok(vm, "cp", "-q", "vm:/workspace/tree", str(back), timeout=300)
    assert (back / "a" / "b" / "deep.txt").read_text() == "deep\n"
    assert (back / "top.txt").read_text() == "top\n"
    shutil.rmtree(back)
