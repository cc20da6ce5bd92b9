"""`coworkctl snapshot save|ls|restore|rm` and `coworkctl clone`: undo a bad run, and
fan one prepared VM out to parallel tasks (host_client.snapshots has the why)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from .. import lima, snapshots
from .common import human_bytes, print_json
from .lima_cmd import READY_TIMEOUT, _add_name, _json, _name, _print_ready, _progress, _wait_agent


def register(sub: Any) -> None:
    p = sub.add_parser(
        "snapshot",
        help="save, list, restore and remove snapshots of a Lima VM's disk",
        description=(
            "Snapshots of the VM's disk (everything outside the workspace, which is a host "
            "mount). Method 'lima' (QEMU, the default there) uses limactl snapshot; method "
            "'disk' (the default on vz) copies the stopped VM's disk, copy-on-write where the "
            "file system can. Saving or restoring a Lima snapshot of a running VM stops and "
            "restarts it; a disk snapshot restores only into a stopped VM."
        ),
    )
    ops = p.add_subparsers(dest="snapshot_op", metavar="OP", required=True)
    s = ops.add_parser("save", help="save the VM's disk as snapshot NAME")
    s.add_argument("snapshot", metavar="NAME")
    s.add_argument("--method", choices=snapshots.METHODS, help="default: lima on QEMU, else disk")
    s.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="agent wait (s)")
    s.set_defaults(func=cmd_save)
    s = ops.add_parser("ls", aliases=["list"], help="list the VM's snapshots")
    s.set_defaults(func=cmd_ls)
    s = ops.add_parser("restore", help="put the VM's disk back to snapshot NAME")
    s.add_argument("snapshot", metavar="NAME")
    s.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="agent wait (s)")
    s.set_defaults(func=cmd_restore)
    s = ops.add_parser("rm", aliases=["delete"], help="delete snapshot NAME")
    s.add_argument("snapshot", metavar="NAME")
    s.set_defaults(func=cmd_rm)
    for op in {id(v): v for v in ops.choices.values()}.values():  # aliases share one
        _add_name(op)
        op.add_argument("--json", action="store_true", dest="json_out", help="JSON output")

    p = sub.add_parser(
        "clone",
        help="make a new VM from a stopped, prepared one (own token, socket and workspace)",
        description=(
            "Copy the stopped VM BASE into a new VM NEW (limactl clone: copy-on-write where "
            "the file system can) and start it. NEW gets its own token (BASE's is refused), "
            "its own socket forward and its own workspace; BASE's snapshots stay with BASE."
        ),
    )
    p.add_argument("base", metavar="BASE")
    p.add_argument("new", metavar="NEW")
    p.add_argument(
        "--workspace",
        help="host directory mounted at /workspace in NEW (default: BASE's workspace dir + '-NEW')",
    )
    p.add_argument("--no-start", action="store_true", help="leave NEW stopped")
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="agent wait (s)")
    p.add_argument("--json", action="store_true", dest="json_out", help="JSON output")
    p.set_defaults(func=cmd_clone)


def _show(snap: snapshots.Snapshot) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.created))
    return f"{snap.name:<24} {snap.method:<5} {when:<20} {human_bytes(snap.size):>10}  {snap.how}"


def _back_up(name: str, was_running: bool, args: argparse.Namespace) -> None:
    """After a stop/start the VM went through: wait until its agent answers again."""
    if was_running:
        _wait_agent(name, args.token_file, args.timeout)


def cmd_save(args: argparse.Namespace) -> int:
    name = _name(args)
    was_running = lima.require_instance(name).running
    snap = snapshots.save(name, args.snapshot, args.method, progress=_progress)
    _back_up(name, was_running, args)
    if _json(args):
        print_json({**snap.to_dict(), "workspace_included": False})
    else:
        print(f"saved snapshot {snap.name!r} of VM {name!r} ({snap.method}, {snap.how})")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    name = _name(args)
    snaps = snapshots.list_snapshots(name)
    if _json(args):
        for snap in snaps:
            print_json(snap.to_dict())
        return 0
    if not snaps:
        print(f"VM {name!r} has no snapshots (coworkctl snapshot save NAME --name {name})")
        return 0
    print(f"{'NAME':<24} {'KIND':<5} {'CREATED':<20} {'SIZE':>10}  HOW")
    for snap in snaps:
        print(_show(snap))
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    name = _name(args)
    was_running = lima.require_instance(name).running
    snap = snapshots.restore(name, args.snapshot, progress=_progress)
    _back_up(name, was_running, args)
    if _json(args):
        print_json({**snap.to_dict(), "restored": True, "workspace_included": False})
    else:
        print(f"VM {name!r} is back at snapshot {snap.name!r} (the workspace is unchanged)")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    name = _name(args)
    snap = snapshots.remove(name, args.snapshot)
    if _json(args):
        print_json({**snap.to_dict(), "removed": True})
    else:
        print(f"removed snapshot {snap.name!r} of VM {name!r}")
    return 0


def cmd_clone(args: argparse.Namespace) -> int:
    base, new = lima.check_name(args.base), lima.check_name(args.new)
    workspace = Path(args.workspace) if args.workspace else None
    t0 = time.monotonic()
    inst = snapshots.clone(base, new, workspace, progress=_progress)
    copied = time.monotonic() - t0
    info: dict[str, Any] = {}
    if not args.no_start:
        _progress(f"starting VM {new!r}")
        try:
            lima.start(new, progress=_progress)
        except lima.ProvisionError as exc:
            raise lima.LimaError(f"{exc}; the clone keeps running: limactl shell {new}") from None
        info = _wait_agent(new, None, args.timeout)
    if _json(args):
        print_json(
            {
                "name": new,
                "origin": base,
                "workspace": inst.mounts[0][0] if inst.mounts else "",
                "status": "Running" if not args.no_start else "Stopped",
                "clone_seconds": round(copied, 1),
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
    elif args.no_start:
        print(f"cloned {base!r} into {new!r} (stopped): coworkctl start --name {new}")
    else:
        _print_ready(new, info)
    return 0
