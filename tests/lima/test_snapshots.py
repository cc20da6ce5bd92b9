"""Snapshots and clones on the real limactl, as far as they go without a boot: a VM made
by `coworkctl init` (stopped), its disk written and read with qemu-io. The booted
path (save/restore of a running VM, clones that answer) is tests/lima_e2e."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cowork import defaults
from host_client import lima, snapshots
from host_client.targets import lima_token

from .conftest import LimaEnv

NAME = "cowork-test"


@pytest.fixture()
def vm(lima_env: LimaEnv, wheel: Path) -> Iterator[lima.Instance]:
    opts = lima.InitOptions(name=NAME, workspace=Path(lima_env.env["COWORK_WORKSPACE"]))
    yield lima.init_vm(opts, wheel=wheel, start_it=False)


def disk(inst: lima.Instance) -> Path:
    return Path(inst.dir) / "disk"


def write_pattern(inst: lima.Instance, byte: int) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {byte} 0 64k", str(disk(inst))],
        check=True,
        capture_output=True,
    )


def holds_pattern(inst: lima.Instance, byte: int) -> bool:
    r = subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"read -P {byte} 0 64k", str(disk(inst))],
        capture_output=True,
        text=True,
    )
    return r.returncode == 0 and "Pattern verification failed" not in r.stdout


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


# -- Lima's own snapshots (QEMU) --------------------------------------------------------
def test_a_lima_snapshot_round_trip_restores_the_disk(vm: lima.Instance) -> None:
    write_pattern(vm, 0xAA)
    snapshots.save(NAME, "s1")
    write_pattern(vm, 0x55)
    snapshots.restore(NAME, "s1")
    assert holds_pattern(vm, 0xAA)


def test_the_default_method_on_qemu_is_lima(vm: lima.Instance) -> None:
    snap = snapshots.save(NAME, "s1")
    assert (snap.method, snap.how) == ("lima", "qcow2 internal")


def test_snapshot_ls_json_lists_name_method_time_and_size(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    assert lima_env.coworkctl("snapshot", "save", "first", "--json").returncode == 0
    assert lima_env.coworkctl("snapshot", "save", "second", "--method", "disk").returncode == 0
    r = lima_env.coworkctl("snapshot", "ls", "--json")
    assert r.returncode == 0, r.stderr
    listed = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(s["name"], s["method"]) for s in listed] == [("first", "lima"), ("second", "disk")]
    for s in listed:
        assert set(s) == {"vm", "name", "method", "created", "size", "how"}
        assert s["vm"] == NAME and s["created"].endswith("Z")
    assert listed[1]["size"] > 0


def test_snapshot_rm_deletes_it(lima_env: LimaEnv, vm: lima.Instance) -> None:
    snapshots.save(NAME, "gone")
    r = lima_env.coworkctl("snapshot", "rm", "gone")
    assert r.returncode == 0, r.stderr
    assert snapshots.list_snapshots(NAME) == []


# -- the disk method (the path vz users get) ---------------------------------------------
def test_a_disk_snapshot_round_trip_restores_the_disk(vm: lima.Instance) -> None:
    write_pattern(vm, 0x11)
    snap = snapshots.save(NAME, "d1", method="disk")
    assert snap.method == "disk" and snap.how in ("reflink", "copy")
    write_pattern(vm, 0x22)
    snapshots.restore(NAME, "d1")
    assert holds_pattern(vm, 0x11)


def test_a_restored_disk_keeps_its_owner_and_mode(vm: lima.Instance) -> None:
    before = os.stat(disk(vm))
    snapshots.save(NAME, "d1", method="disk")
    snapshots.restore(NAME, "d1")
    after = os.stat(disk(vm))
    assert (after.st_uid, after.st_gid, after.st_mode) == (
        before.st_uid,
        before.st_gid,
        before.st_mode,
    )


def test_disk_snapshots_live_outside_the_instance_dir(vm: lima.Instance) -> None:
    snapshots.save(NAME, "d1", method="disk")
    store = defaults.lima_home() / "_cowork" / "snapshots" / NAME / "d1"
    assert (store / "disk").is_file() and (store / "meta.json").is_file()
    assert not any(p.name == "d1" for p in Path(vm.dir).rglob("*"))


def test_delete_removes_the_vm_s_snapshots(lima_env: LimaEnv, vm: lima.Instance) -> None:
    snapshots.save(NAME, "d1", method="disk")
    r = lima_env.coworkctl("delete")
    assert r.returncode == 0, r.stderr
    assert "with its snapshots" in r.stdout
    assert not (defaults.lima_home() / "_cowork" / "snapshots" / NAME).exists()


def test_a_new_vm_under_an_old_name_does_not_inherit_its_snapshots(
    lima_env: LimaEnv, vm: lima.Instance, wheel: Path
) -> None:
    snapshots.save(NAME, "d1", method="disk")
    lima_env.run_limactl("delete", "--force", NAME)  # behind coworkctl's back
    opts = lima.InitOptions(name=NAME, workspace=Path(lima_env.env["COWORK_WORKSPACE"]))
    lima.init_vm(opts, wheel=wheel, start_it=False)
    assert snapshots.list_snapshots(NAME) == []


# -- bad input: one line, nothing changed -------------------------------------------------
def test_restoring_an_unknown_snapshot_is_one_line(lima_env: LimaEnv, vm: lima.Instance) -> None:
    line = one_line_error(lima_env.coworkctl("snapshot", "restore", "nope"))
    assert line == (
        f"coworkctl: VM {NAME!r} has no snapshot 'nope' (coworkctl snapshot ls --name {NAME})"
    )


def test_a_bad_snapshot_name_is_one_line(lima_env: LimaEnv, vm: lima.Instance) -> None:
    line = one_line_error(lima_env.coworkctl("snapshot", "save", "../x"))
    assert "bad snapshot name '../x'" in line


def test_saving_under_an_existing_name_is_refused(lima_env: LimaEnv, vm: lima.Instance) -> None:
    snapshots.save(NAME, "s1")
    line = one_line_error(lima_env.coworkctl("snapshot", "save", "s1", "--method", "disk"))
    assert "already has a snapshot 's1'" in line


def test_snapshots_of_a_vm_cowork_did_not_make_are_refused(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    lima_token(NAME).unlink()
    line = one_line_error(lima_env.coworkctl("snapshot", "ls"))
    assert "was not made by coworkctl init" in line


def test_saving_a_disk_snapshot_on_a_full_disk_is_one_line_and_leaves_nothing(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    write_pattern(vm, 0x33)  # the disk holds more than the 1 MiB below
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write 1M 8M", str(disk(vm))],
        check=True,
        capture_output=True,
    )
    store = defaults.lima_home() / "_cowork" / "snapshots" / NAME
    store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cw-full", str(store)], check=True)
    try:
        line = one_line_error(lima_env.coworkctl("snapshot", "save", "big", "--method", "disk"))
        assert "not enough disk space" in line
        assert sorted(p.name for p in store.iterdir()) == ["owner"]
    finally:
        subprocess.run(["umount", str(store)], check=True)
    assert snapshots.list_snapshots(NAME) == []


def test_a_copy_that_runs_out_of_space_leaves_no_half_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 << 20))
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "cw-small", str(small)], check=True)
    try:
        with pytest.raises(lima.LimaError, match="no space left"):
            snapshots.copy_file(src, small / "copy")
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_plain_copy_keeps_holes(tmp_path: Path) -> None:
    src = tmp_path / "sparse"
    with open(src, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(b"data")
    how = snapshots.copy_file(src, tmp_path / "copy")
    copy = tmp_path / "copy"
    assert copy.stat().st_size == 1 << 30
    assert copy.read_bytes()[512 << 20 : (512 << 20) + 4] == b"data"
    if how == "copy":
        assert copy.stat().st_blocks * 512 < 16 << 20


# -- clones -------------------------------------------------------------------------------
def test_a_clone_gets_its_own_token_on_both_sides(lima_env: LimaEnv, vm: lima.Instance) -> None:
    r = lima_env.coworkctl("clone", NAME, "task1", "--no-start")
    assert r.returncode == 0, r.stderr
    base_token = lima_token(NAME).read_text()
    clone_token = lima_token("task1").read_text()
    assert clone_token != base_token and len(clone_token.strip()) == 2 * defaults.TOKEN_BYTES
    assert oct(lima_token("task1").stat().st_mode & 0o777) == "0o600"
    doc = yaml.safe_load((defaults.lima_home() / "task1" / "lima.yaml").read_text())
    data = [p for p in doc["provision"] if p.get("path") == defaults.GUEST_TOKEN_FILE]
    assert [p["content"] for p in data] == [clone_token]


def test_a_clone_mounts_its_own_workspace_beside_the_base_s(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    assert lima_env.coworkctl("clone", NAME, "task1", "--no-start").returncode == 0
    base_ws = Path(lima_env.env["COWORK_WORKSPACE"]).resolve()
    clone = lima.require_instance("task1")
    assert clone.mounts[0][0] == str(base_ws.parent / f"{base_ws.name}-task1")
    assert Path(clone.mounts[0][0]).is_dir()


def test_a_clone_in_the_base_s_workspace_is_refused(lima_env: LimaEnv, vm: lima.Instance) -> None:
    inside = Path(lima_env.env["COWORK_WORKSPACE"]) / "sub"
    line = one_line_error(
        lima_env.coworkctl("clone", NAME, "task1", "--no-start", "--workspace", str(inside))
    )
    assert "a clone needs its own" in line
    assert lima.get_instance("task1") is None


def test_a_clone_does_not_carry_the_base_s_snapshots(vm: lima.Instance) -> None:
    snapshots.save(NAME, "s1")
    snapshots.save(NAME, "d1", method="disk")
    snapshots.clone(NAME, "task1")
    assert snapshots.list_snapshots("task1") == []
    assert [s.name for s in snapshots.list_snapshots(NAME)] == ["s1", "d1"]


def test_list_shows_where_a_clone_came_from(lima_env: LimaEnv, vm: lima.Instance) -> None:
    snapshots.clone(NAME, "task1")
    r = lima_env.coworkctl("list", "--json")
    origins = {o["name"]: o["origin"] for o in map(json.loads, r.stdout.splitlines())}
    assert origins == {NAME: None, "task1": NAME}


def test_cloning_into_a_name_that_exists_is_one_line_and_changes_nothing(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    snapshots.clone(NAME, "task1")
    token = lima_token("task1").read_text()
    line = one_line_error(lima_env.coworkctl("clone", NAME, "task1", "--no-start"))
    assert line == "coworkctl: a Lima VM named 'task1' already exists: pick another name"
    assert lima_token("task1").read_text() == token


def test_cloning_an_unknown_vm_is_one_line(lima_env: LimaEnv) -> None:
    line = one_line_error(lima_env.coworkctl("clone", "nope", "task1"))
    assert "no Lima VM named 'nope'" in line


# -- the library ------------------------------------------------------------------------------
def test_the_client_saves_lists_restores_and_removes_snapshots(vm: lima.Instance) -> None:
    from host_client import CoworkClient

    with CoworkClient(f"lima:{NAME}") as client:
        write_pattern(vm, 0x44)
        assert client.save_snapshot("lib", method="disk").method == "disk"
        write_pattern(vm, 0x45)
        assert [s.name for s in client.list_snapshots()] == ["lib"]
        client.restore_snapshot("lib")
        assert holds_pattern(vm, 0x44)
        client.remove_snapshot("lib")
        assert client.list_snapshots() == []


def test_the_client_clones_a_stopped_vm(vm: lima.Instance) -> None:
    from host_client import CoworkClient

    with CoworkClient(f"lima:{NAME}") as client:
        assert client.clone_vm("task1", start=False) == "lima:task1"
    assert snapshots.origin("task1") == NAME


def test_snapshots_need_a_lima_target(tmp_path: Path) -> None:
    from host_client import CoworkClient
    from host_client.errors import CoworkError

    (tmp_path / "token").write_text("t" * 64)
    client = CoworkClient("unix:/nonexistent/agent.sock", str(tmp_path / "token"))
    try:
        with pytest.raises(CoworkError, match="save_snapshot needs a lima: target"):
            client.save_snapshot("x")
    finally:
        client.close()


def test_two_clones_of_one_base_at_the_same_time_both_succeed(
    lima_env: LimaEnv, vm: lima.Instance
) -> None:
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "host_client.cli", "clone", NAME, name, "--no-start"],
            env=lima_env.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("task1", "task2")
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    for name in ("task1", "task2"):
        assert [w.name for w in lima.dist_dir(name).glob("*.whl")], name
        assert snapshots.origin(name) == NAME
    assert [w.name for w in lima.dist_dir(NAME).glob("*.whl")]  # the base keeps its wheel


def test_a_clone_s_subdirectories_keep_usable_permissions(vm: lima.Instance) -> None:
    """Lima 2.2's clone makes subdirectories with mode 0; a booted VM has `sock/`, where
    the clone's socket forwards must land (else its agent is unreachable)."""
    sock = Path(vm.dir) / "sock"
    sock.mkdir(mode=0o755)
    st = Path(vm.dir).stat()
    os.chown(sock, st.st_uid, st.st_gid)
    snapshots.clone(NAME, "task1")
    clone_sock = defaults.lima_home() / "task1" / "sock"
    assert clone_sock.is_dir()
    assert clone_sock.stat().st_mode & 0o700 == 0o700
