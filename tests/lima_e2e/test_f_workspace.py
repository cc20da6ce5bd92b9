"""The workspace is writable from the box, on Lima's real 9p share, and nothing else is.

Lima shares the host directory owned by the Lima user's uid; the box runs as a
separate sandbox user. agent.sh presents the share at /workspace through bindfs
(see lima/README.md, "The workspace"): the sandbox user sees itself as the owner,
files it creates land on the host as the host user, and the rest of its identity
stays powerless.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost

RAW_SHARE = "/mnt/cowork/host-workspace"


def _box(vm: LimaHost, script: str) -> tuple[int, str]:
    r = vm.coworkctl("exec", "--", "sh", "-c", script)
    return r.returncode, (r.stdout + r.stderr).decode(errors="replace")


def test_the_box_creates_files_that_the_host_user_owns(vm: LimaHost) -> None:
    code, out = _box(vm, "mkdir -p ws/new && echo made > ws/new/file.txt && ls -ln ws/new")
    assert code == 0, out
    made = vm.workspace / "ws" / "new" / "file.txt"
    assert made.read_text() == "made\n"
    for p in (made, made.parent):
        assert (p.stat().st_uid, p.stat().st_gid) == (vm.user.pw_uid, vm.user.pw_gid)


def test_the_box_edits_renames_and_removes_what_the_host_user_made(vm: LimaHost) -> None:
    d = vm.workspace / "ws" / "host-made"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("from the host\n")
    (d / "old.txt").write_text("old\n")
    for p in (d, d / "notes.txt", d / "old.txt"):
        os.chown(p, vm.user.pw_uid, vm.user.pw_gid)
        p.chmod(0o755 if p.is_dir() else 0o644)  # as a host user's umask leaves them
    code, out = _box(
        vm,
        "cd ws/host-made && echo 'from the box' >> notes.txt && mv old.txt renamed.txt "
        "&& rm renamed.txt && chmod 600 notes.txt",
    )
    assert code == 0, out
    assert (d / "notes.txt").read_text() == "from the host\nfrom the box\n"
    assert sorted(p.name for p in d.iterdir()) == ["notes.txt"]
    assert (d / "notes.txt").stat().st_mode & 0o777 == 0o600


def test_the_box_sees_itself_as_the_owner_of_the_workspace(vm: LimaHost) -> None:
    out = coworkctl_ok(vm, "exec", "--", "stat", "-c", "%U %a", "/workspace")
    user, mode = out.split()
    assert user.startswith("cowork-") and mode == "755"


def test_the_lima_user_still_writes_the_workspace(vm: LimaHost) -> None:
    r = vm.ssh("echo lima > /workspace/ws/by-lima.txt && stat -c %U /workspace/ws/by-lima.txt")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == vm.user.pw_name
    assert (vm.workspace / "ws" / "by-lima.txt").stat().st_uid == vm.user.pw_uid


def test_without_the_mapping_the_sandbox_user_could_not_write_the_share(vm: LimaHost) -> None:
    """The gap the mapping closes, seen on the raw 9p mount Lima made."""
    r = vm.ssh(
        f"findmnt -n -o FSTYPE --mountpoint {RAW_SHARE}; "
        f"sudo -u $(cat /etc/cowork/sandbox-user) sh -c 'echo x > {RAW_SHARE}/denied.txt' 2>&1; "
        "findmnt -n -o FSTYPE --mountpoint /workspace"
    )
    fstype, denied, mapped = r.stdout.decode().strip().splitlines()
    assert fstype == "9p"
    assert "Permission denied" in denied
    assert mapped == "fuse"
    assert not (vm.workspace / "denied.txt").exists()


def test_both_views_of_the_share_ignore_set_id_bits_in_the_guest(vm: LimaHost) -> None:
    """A set-uid file the box writes (it lands on the host as the host user's) cannot
    raise anyone's privileges in the guest: both mounts are nosuid."""
    show = "findmnt -n -o OPTIONS --mountpoint"
    r = vm.ssh(f"{show} {RAW_SHARE}; {show} /workspace")
    raw, mapped = r.stdout.decode().strip().splitlines()
    assert "nosuid" in raw.split(",") and "nosuid" in mapped.split(","), (raw, mapped)


def test_the_box_identity_has_no_sudo_no_capabilities_and_no_agent_secrets(vm: LimaHost) -> None:
    script = (
        "sudo -n true 2>/dev/null && echo SUDO; "
        "grep -E '^Cap(Eff|Prm|Bnd):' /proc/self/status; "
        "cat /etc/cowork/token 2>/dev/null && echo TOKEN; "
        "test -e /run/cowork/agent.sock && echo SOCKET; "
        "echo done"
    )
    code, out = _box(vm, script)
    assert code == 0, out
    assert "SUDO" not in out and "TOKEN" not in out and "SOCKET" not in out
    caps = [line.split()[1] for line in out.splitlines() if line.startswith("Cap")]
    assert caps == ["0000000000000000"] * 3, out


def test_a_9p_share_cannot_be_idmapped_on_this_kernel(vm: LimaHost) -> None:
    """Why not an idmapped mount: 9p refuses MOUNT_ATTR_IDMAP (ext4 takes it)."""
    probe = (Path(__file__).parent / "idmap_probe.py").read_bytes()
    r = vm.run(
        [
            "ssh",
            "-F",
            str(vm.ssh_config),
            f"lima-{vm.name}",
            "sudo python3 - /mnt/cowork/host-workspace /",
        ],
        input=probe,
    )
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(": ", 1) for line in r.stdout.decode().strip().splitlines())
    assert lines["/mnt/cowork/host-workspace"] == "EINVAL"
    assert lines["/"] == "OK"
