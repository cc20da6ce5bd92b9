"""Snapshots and clones of cowork Lima VMs: undo a bad run, fan one prepared VM out.

Two ways to snapshot, because Lima's own snapshots are QEMU-only (Lima #3682) and
most Mac users run vz:

- ``lima``: `limactl snapshot` (qcow2 internal snapshots in the instance's disk).
  Taken on a stopped VM: a running Lima VM has its workspace (and the agent wheel)
  on 9p, and QEMU refuses `savevm` while a 9p export is mounted. So a save or a
  restore of a running VM stops it, works, and starts it again, and says so.
- ``disk``: a copy of the stopped VM's disk file, made copy-on-write where the file
  system can (FICLONE on Linux: btrfs, XFS; `cp -c` (clonefile) on APFS), a
  sparse-aware plain copy otherwise, and the result says which. Restoring swaps it
  back atomically (copy to a temporary file beside the disk, then rename). It works
  with any driver; on a running VM, restore refuses (stop it first), because the
  driver holds the disk open.

Disk snapshots live outside the instance directory, in
``$LIMA_HOME/_cowork/snapshots/NAME/TAG/`` (Lima ignores ``_``-names there), so
that `limactl clone` does not copy gigabytes of another VM's snapshots. Each VM's
set is tagged with a digest of the VM's token: a VM deleted behind our back and
re-created under the same name does not inherit a stranger's snapshots (they are
pruned when seen). `coworkctl delete` removes a VM's snapshots with it; Lima's
internal ones die with the disk anyway.

The workspace is a host mount: no snapshot covers it.

A clone (`limactl clone`, which copies the stopped base's instance directory,
copy-on-write where it can) gets its own token (so the base's token is refused by
it: lima/provision/agent.sh restarts the agent when the token changed), its own
socket forward (Lima's ``{{.Dir}}/sock``) and its own workspace mount; the
base's internal snapshots are deleted from the clone's disk, and the clone
records where it came from.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowork import defaults

from . import lima
from .lima import LimaError, Progress
from .targets import lima_token
from .units import human_bytes

METHODS = ("lima", "disk")
ORIGIN_FILE = "cowork-origin"
WORKSPACE_NOTE = "the workspace is a host mount: the snapshot does not cover it"
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_SPACE_MARGIN = 64 << 20  # leave this much free after a copy
_CHUNK = 64 << 20


@dataclass(frozen=True)
class Snapshot:
    """One saved state of a VM's disk."""

    vm: str
    name: str
    method: str  # lima | disk
    created: float  # epoch seconds
    size: int  # bytes it occupies (see `how`)
    how: str  # "qcow2 internal", "reflink", "clonefile" or "copy"

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "name": self.name,
            "method": self.method,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created)),
            "size": self.size,
            "how": self.how,
        }


# -- where things are ---------------------------------------------------------------
def store_root() -> Path:
    return defaults.lima_home() / "_cowork" / "snapshots"


def _vm_store(name: str) -> Path:
    return store_root() / name


def _disk(inst: lima.Instance) -> Path:
    return Path(inst.dir) / "disk"


def _owner(name: str) -> str:
    """Digest of the VM's token: which VM (not just which name) a snapshot set is of."""
    try:
        token = lima_token(name).read_bytes().strip()
    except OSError:
        return ""
    return hashlib.sha256(b"cowork-snapshot-owner\0" + token).hexdigest()


def check_tag(tag: str) -> str:
    if not _TAG_RE.match(tag):
        raise LimaError(
            f"bad snapshot name {tag!r}: use letters, digits, '.', '_' and '-' (at most 63)"
        )
    return tag


def _cowork_vm(name: str) -> lima.Instance:
    inst = lima.require_instance(name)
    if not lima.is_cowork_instance(name):
        raise LimaError(f"Lima VM {name!r} was not made by coworkctl init: not ours to snapshot")
    return inst


def default_method(inst: lima.Instance) -> str:
    return "lima" if inst.vm_type == "qemu" else "disk"


def _say(progress: Progress | None, msg: str) -> None:
    if progress is not None:
        progress(msg)


# -- the disk method's store --------------------------------------------------------
def _prune_foreign(name: str) -> None:
    """Drop a snapshot set that belongs to an earlier VM of the same name."""
    store = _vm_store(name)
    owner_file = store / "owner"
    if not store.exists():
        return
    try:
        owner = owner_file.read_text().strip()
    except OSError:
        owner = ""
    if owner != _owner(name):
        shutil.rmtree(store, ignore_errors=True)


def _disk_snapshots(name: str) -> list[Snapshot]:
    _prune_foreign(name)
    out: list[Snapshot] = []
    store = _vm_store(name)
    if not store.is_dir():
        return out
    for entry in sorted(store.iterdir()):
        meta_file = entry / "meta.json"
        if not entry.is_dir() or not meta_file.is_file():
            continue
        try:
            meta = json.loads(meta_file.read_text())
            disk = entry / "disk"
            size = disk.stat().st_blocks * 512
        except (OSError, ValueError):
            continue
        out.append(
            Snapshot(name, entry.name, "disk", float(meta["created"]), size, str(meta["how"]))
        )
    return out


# -- Lima's internal snapshots --------------------------------------------------------
def _qemu_img_snapshots(disk: Path) -> list[dict[str, Any]]:
    """The internal snapshots of a qcow2 file (readable while QEMU holds it: -U)."""
    if not disk.exists():
        return []
    try:
        proc = subprocess.run(
            ["qemu-img", "info", "-U", "--output=json", str(disk)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except OSError as exc:
        raise LimaError(f"cannot run qemu-img: {exc.strerror}") from None
    if proc.returncode != 0:
        raise LimaError(f"qemu-img info {disk}: {proc.stderr.strip().splitlines()[-1:]}")
    info = json.loads(proc.stdout)
    if info.get("format") != "qcow2":
        return []
    snaps: list[dict[str, Any]] = info.get("snapshots") or []
    return snaps


def _lima_snapshots(inst: lima.Instance) -> list[Snapshot]:
    if inst.vm_type != "qemu":
        return []
    out = []
    for s in _qemu_img_snapshots(_disk(inst)):
        created = float(s.get("date-sec", 0)) + float(s.get("date-nsec", 0)) / 1e9
        out.append(
            Snapshot(
                inst.name,
                str(s.get("name", "")),
                "lima",
                created,
                int(s.get("vm-state-size", 0)),
                "qcow2 internal",
            )
        )
    return out


# -- public API -----------------------------------------------------------------------
def list_snapshots(name: str) -> list[Snapshot]:
    """Every snapshot of VM `name`, oldest first."""
    inst = _cowork_vm(name)
    snaps = _lima_snapshots(inst) + _disk_snapshots(name)
    return sorted(snaps, key=lambda s: (s.created, s.name))


def find(name: str, tag: str) -> Snapshot:
    for snap in list_snapshots(name):
        if snap.name == tag:
            return snap
    raise LimaError(f"VM {name!r} has no snapshot {tag!r} (coworkctl snapshot ls --name {name})")


@contextlib.contextmanager
def _stopped(name: str, what: str, progress: Progress | None) -> Iterator[bool]:
    """Stop a running VM for `what` and start it again afterwards (even on failure).
    Yields whether it was running."""
    inst = lima.require_instance(name)
    was_running = inst.running
    if was_running:
        _say(progress, f"stopping VM {name!r} for {what}")
        lima.stop(name, progress=progress)
    try:
        yield was_running
    finally:
        if was_running:
            _say(progress, f"starting VM {name!r} again")
            lima.start(name, progress=progress)


def save(
    name: str, tag: str, method: str | None = None, progress: Progress | None = None
) -> Snapshot:
    """Save VM `name`'s disk as snapshot `tag`. A running VM is stopped for it and
    started again (the caller waits for its agent)."""
    check_tag(tag)
    inst = _cowork_vm(name)
    method = method or default_method(inst)
    if method not in METHODS:
        raise LimaError(f"unknown snapshot method {method!r}: use {' or '.join(METHODS)}")
    if any(s.name == tag for s in list_snapshots(name)):
        raise LimaError(
            f"VM {name!r} already has a snapshot {tag!r}: pick another name, "
            f"or coworkctl snapshot rm {tag} --name {name}"
        )
    if method == "lima" and inst.vm_type != "qemu":
        raise LimaError(
            f"Lima snapshots need the QEMU driver and VM {name!r} runs {inst.vm_type or '?'} "
            "(Lima #3682): use --method disk"
        )
    note = f"saving snapshot {tag!r} of {name!r} ({method}); {WORKSPACE_NOTE}"
    if method == "lima":
        _say(progress, note)
        with _stopped(name, "the snapshot (QEMU cannot snapshot with 9p mounted)", progress):
            _say(progress, f"saving snapshot {tag!r} (limactl snapshot create)")
            lima.run_limactl(["snapshot", "create", name, f"--tag={tag}"], timeout=1800)
        return find(name, tag)
    # disk: check the space before anything stops
    disk = _disk(lima.require_instance(name))
    store = _vm_store(name)
    _prune_foreign(name)
    store.mkdir(parents=True, exist_ok=True)
    os.chmod(store, 0o700)
    (store / "owner").write_text(_owner(name) + "\n")
    final = store / tag
    work = store / f".{tag}.partial"
    shutil.rmtree(work, ignore_errors=True)
    if not can_clone_file(disk, store):
        require_space(disk, store)
    _say(progress, note)
    try:
        with _stopped(name, "a consistent copy of its disk", progress):
            work.mkdir(mode=0o700)
            _say(progress, f"copying the disk of {name!r} into snapshot {tag!r}")
            how = copy_file(disk, work / "disk")
            (work / "meta.json").write_text(
                json.dumps({"created": time.time(), "how": how, "source": str(disk)}) + "\n"
            )
            os.rename(work, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return find(name, tag)


def restore(name: str, tag: str, progress: Progress | None = None) -> Snapshot:
    """Put VM `name`'s disk back to snapshot `tag`.

    A Lima snapshot restores into a running VM by stopping and starting it; a disk
    snapshot refuses a running VM (the driver holds the disk: vz cannot swap it)."""
    check_tag(tag)
    inst = _cowork_vm(name)
    snap = find(name, tag)
    if snap.method == "lima":
        with _stopped(name, "the restore", progress):
            _say(progress, f"restoring snapshot {tag!r} (limactl snapshot apply)")
            lima.run_limactl(["snapshot", "apply", name, f"--tag={tag}"], timeout=1800)
        return snap
    if inst.running:
        raise LimaError(
            f"VM {name!r} is running: a disk snapshot restores into a stopped VM; "
            f"stop it first (coworkctl stop --name {name})"
        )
    disk = _disk(inst)
    src = _vm_store(name) / tag / "disk"
    tmp = disk.with_name(".disk.cowork-restore")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    if not can_clone_file(src, disk.parent):
        require_space(src, disk.parent)
    try:
        _say(progress, f"restoring the disk of {name!r} from snapshot {tag!r}")
        copy_file(src, tmp)
        st = os.stat(disk)
        os.chmod(tmp, st.st_mode & 0o7777)
        if os.geteuid() == 0:  # root restoring a user's VM: the disk stays the user's
            os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, disk)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return snap


def remove(name: str, tag: str) -> Snapshot:
    """Delete snapshot `tag` of VM `name`."""
    check_tag(tag)
    snap = find(name, tag)
    if snap.method == "lima":
        lima.run_limactl(["snapshot", "delete", name, f"--tag={tag}"], timeout=600)
    else:
        shutil.rmtree(_vm_store(name) / tag)
    return snap


def forget_vm(name: str) -> None:
    """Remove the disk snapshots of a VM that is being deleted."""
    shutil.rmtree(_vm_store(name), ignore_errors=True)


# -- clones ---------------------------------------------------------------------------
def origin(name: str) -> str | None:
    """The VM that `name` was cloned from, if it was."""
    try:
        text = (defaults.lima_home() / name / ORIGIN_FILE).read_text().strip()
    except OSError:
        return None
    return text or None


def default_clone_workspace(base: lima.Instance, new: str) -> Path:
    """A sibling of the base's workspace (never inside it: the base would see it)."""
    ws = Path(base.mounts[0][0]) if base.mounts else defaults.local_workspace()
    return ws.parent / f"{ws.name}-{new}"


def clone(
    base: str,
    new: str,
    workspace: Path | None = None,
    progress: Progress | None = None,
) -> lima.Instance:
    """Make VM `new` from the stopped VM `base`, with its own token and workspace.
    It is left stopped: the caller starts it (`lima.start`) and waits for its agent."""
    lima.check_name(new)
    inst = _cowork_vm(base)
    if lima.get_instance(new) is not None:
        raise LimaError(f"a Lima VM named {new!r} already exists: pick another name")
    if inst.running:
        raise LimaError(
            f"VM {base!r} is running: stop it first (coworkctl stop --name {base}); "
            "a clone copies its disk"
        )
    ws = (workspace or default_clone_workspace(inst, new)).expanduser().resolve()
    base_ws = Path(inst.mounts[0][0]).resolve() if inst.mounts else None
    if base_ws is not None and (ws == base_ws or base_ws in ws.parents):
        raise LimaError(
            f"workspace {ws} is (inside) the workspace of {base!r}: "
            "a clone needs its own (--workspace DIR)"
        )
    made_ws = not ws.exists()
    token = lima.generate_token()
    token_entry = (
        f'.provision[] | select(.mode == "data" and '
        f".path == {json.dumps(defaults.GUEST_TOKEN_FILE)})"
    )
    exprs = [
        f"({token_entry}).content = {json.dumps(token + chr(10))}",
        f".mounts[0].location = {json.dumps(str(ws))}",
    ]
    created = False
    try:
        ws.mkdir(parents=True, exist_ok=True)
        # One copy at a time per LIMA_HOME: clones of one base share its wheel dir's
        # place aside, and a name taken meanwhile must not be mistaken for ours.
        with _clone_lock():
            _put_back_dist(base)  # from a clone that was interrupted
            if lima.get_instance(new) is not None:
                raise LimaError(f"a Lima VM named {new!r} already exists: pick another name")
            _say(progress, f"cloning {base!r} into {new!r} (limactl clone)")
            created = True
            with _dist_aside(base) as wheels:
                args = ["clone", base, new, *(f"--set={e}" for e in exprs)]
                lima.run_limactl(args, timeout=3600)
                new_inst = lima.require_instance(new)
                _fix_dir_modes(Path(new_inst.dir))
                for wheel in wheels:
                    lima.install_wheel(new, wheel)
        lima.write_token(lima_token(new), token)
        for snap in _lima_snapshots(new_inst):  # the base's, copied along with its disk
            lima.run_limactl(["snapshot", "delete", new, f"--tag={snap.name}"], timeout=600)
        (Path(new_inst.dir) / ORIGIN_FILE).write_text(base + "\n")
    except BaseException:
        if created:
            lima.discard_new_vm(new)
        if made_ws:
            with contextlib.suppress(OSError):
                ws.rmdir()
        raise
    return lima.require_instance(new)


@contextlib.contextmanager
def _clone_lock() -> Iterator[None]:
    path = defaults.lima_home() / "_cowork" / "clone.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _fix_dir_modes(inst_dir: Path) -> None:
    """Give the clone's subdirectories back the permissions Lima 2.2's clone dropped
    (it makes them mode 0, see _dist_aside): its `sock/` must take the socket forwards,
    or the clone boots and no client can reach its agent."""
    for root, dirs, _files in os.walk(inst_dir):
        for d in dirs:
            path = os.path.join(root, d)
            if os.stat(path, follow_symlinks=False).st_mode & 0o777 == 0:
                os.chmod(path, 0o700)


def _aside(base: str) -> Path:
    return defaults.lima_home() / "_cowork" / "dist-aside" / base


def _put_back_dist(base: str) -> None:
    aside, dist = _aside(base), lima.dist_dir(base)
    if aside.exists() and not dist.exists():
        os.rename(aside, dist)


@contextlib.contextmanager
def _dist_aside(base: str) -> Iterator[list[Path]]:
    """Keep the base's wheel dir out of `limactl clone`'s way; yield its wheels.

    Lima 2.2's clone makes each subdirectory with mode 0 (it passes
    `DirEntry.Type().Perm()`, which has no permission bits), so copying a file
    into one fails for anyone but root; the instance's own subdirectories hold
    only sockets, which it skips. Our cowork-dist holds the agent wheel: it is
    moved aside (a rename in LIMA_HOME) for the copy and the clone gets the
    wheel put in afresh.
    """
    dist, aside = lima.dist_dir(base), _aside(base)
    if not dist.is_dir():
        yield []
        return
    aside.parent.mkdir(parents=True, exist_ok=True)
    os.rename(dist, aside)
    try:
        yield sorted(aside.glob("*.whl"))
    finally:
        os.rename(aside, dist)


# -- copying disks --------------------------------------------------------------------
def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def free_space(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def require_space(src: Path, dest_dir: Path) -> None:
    """LimaError (before anything changes) unless `dest_dir` can take a copy of `src`."""
    need = allocated(src)
    have = free_space(dest_dir)
    # A restore writes the new disk beside the old one before the rename frees it.
    if have < need + _SPACE_MARGIN:
        raise LimaError(
            f"not enough disk space for a copy of {src.name} in {dest_dir}: it needs "
            f"{human_bytes(need + _SPACE_MARGIN)}, {human_bytes(have)} is free; free some space "
            "(coworkctl snapshot rm ...) and try again"
        )


def can_clone_file(src: Path, dest_dir: Path) -> bool:
    """Whether a copy-on-write clone of `src` into `dest_dir` works (tried on a probe
    file, so nothing of size is written)."""
    if sys.platform == "darwin":
        return False  # clonefile needs no space up front, but we cannot probe cheaply
    probe = dest_dir / f".cowork-reflink-probe.{os.getpid()}"
    try:
        with open(src, "rb") as s, open(probe, "wb") as d:
            fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def copy_file(src: Path, dst: Path) -> str:
    """Copy `src` to the new file `dst`, copy-on-write if the file system can.

    Returns how: "reflink" (Linux FICLONE), "clonefile" (macOS `cp -c`) or "copy"
    (sparse-aware: holes stay holes, so a 100 GiB raw disk with 3 GiB in it costs
    3 GiB). `dst` is fsynced; on failure it is removed (no half copy is left)."""
    try:
        if sys.platform == "darwin":
            r = subprocess.run(["cp", "-c", str(src), str(dst)], capture_output=True)
            if r.returncode == 0:
                return "clonefile"
            with contextlib.suppress(FileNotFoundError):
                dst.unlink()
        with open(src, "rb") as s, open(dst, "xb") as d:
            try:
                fcntl.ioctl(d.fileno(), _FICLONE, s.fileno())
                os.fsync(d.fileno())
                return "reflink"
            except OSError:
                pass
            _sparse_copy(s.fileno(), d.fileno())
            os.fsync(d.fileno())
            return "copy"
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            dst.unlink()
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            raise LimaError(f"no space left on the device while copying to {dst.parent}") from None
        if isinstance(exc, OSError):
            raise LimaError(f"cannot copy {src} to {dst}: {exc.strerror}") from None
        raise


def _sparse_copy(src: int, dst: int) -> None:
    size = os.fstat(src).st_size
    pos = 0
    in_kernel = hasattr(os, "copy_file_range")  # Linux; not across file systems on some
    while pos < size:
        try:
            data = os.lseek(src, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole is left
                break
            raise
        hole = os.lseek(src, data, os.SEEK_HOLE)
        off = data
        while off < hole:
            want = min(hole - off, _CHUNK)
            n = -1
            if in_kernel:
                try:
                    n = os.copy_file_range(src, dst, want, off, off)
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    in_kernel = False
            if n < 0:
                n = os.pwrite(dst, os.pread(src, want, off), off)
            if n == 0:
                raise OSError(errno.EIO, "short copy")
            off += n
        pos = hole
    os.ftruncate(dst, size)
