"""`coworkctl box new|ls|rm`: named boxes, long-lived sandboxes that commands join.

`exec`, `shell`, `ask` and `claude` take `--box NAME` (default: $COWORK_BOX) to run
inside one: a server one command starts answers the next on 127.0.0.1, /tmp is
kept, and an exec into an existing box skips building a sandbox.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import TYPE_CHECKING, Any

from ..units import human_age, human_bytes
from .common import fail, make_client, print_json

if TYPE_CHECKING:
    from ..models import BoxInfo

BOX_HELP = """\
A box is a named, long-lived sandbox: its own processes, /tmp, loopback network
and egress bridge, and one cgroup with its limits, shared by everything that
runs in it. Commands join it with --box NAME (exec, shell, ask, claude), or
with $COWORK_BOX set. What a command leaves running (a dev server started with
&) stays in the box until `box rm`; two boxes see neither each other's
processes nor their files outside the workspace. A box idle for the policy's
boxes.idle (default 12h) is removed; boxes end when the agent stops.

examples:
  coworkctl box new web --memory 2G
  coworkctl exec --box web -- sh -c 'npm run dev > /tmp/dev.log 2>&1 &'
  coworkctl exec --box web -- curl -s 127.0.0.1:5173
  coworkctl box ls
  coworkctl box rm web
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "box",
        help="named boxes: long-lived sandboxes that commands join (--box NAME)",
        description=BOX_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = p.add_subparsers(dest="box_command", metavar="VERB", required=True)
    new = verbs.add_parser("new", help="make a box", description="Make a named box.")
    new.add_argument("name", metavar="NAME", help="1-63 of a-z 0-9 . _ - (a letter or digit first)")
    new.add_argument("--memory", metavar="SIZE", help="memory limit of the whole box, e.g. 2G")
    new.add_argument("--pids", type=int, metavar="N", help="most processes/threads in the box")
    new.add_argument("--cpus", type=float, metavar="N", help="CPU limit of the box, e.g. 1.5")
    new.set_defaults(func=cmd_new)
    ls = verbs.add_parser("ls", help="list boxes", description="List the agent's boxes.")
    ls.set_defaults(func=cmd_ls)
    rm = verbs.add_parser(
        "rm",
        help="remove boxes (kills everything in them)",
        description="Remove boxes: every process in them is killed, their /tmp is gone.",
    )
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_rm)


def box_option(parser: Any) -> None:
    """--box on a command that runs something (exec, shell, ask, claude)."""
    parser.add_argument(
        "--box",
        default=os.environ.get("COWORK_BOX") or None,
        metavar="NAME",
        help="run inside the named box (coworkctl box new NAME); default $COWORK_BOX",
    )


def box_dict(info: BoxInfo) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)


def cmd_new(args: argparse.Namespace) -> int:
    from .exec_cmd import limits_arg

    limits = limits_arg(args)
    client = make_client(args)
    try:
        info = client.boxes.create(args.name, limits=limits)
    finally:
        client.close()
    if getattr(args, "json", False):
        print_json(box_dict(info))
    else:
        print(info.name)
    return 0


def _limits(info: BoxInfo) -> str:
    lim = info.limits
    parts = []
    if lim.get("memory_bytes"):
        parts.append(f"mem {human_bytes(lim['memory_bytes'])}")
    if lim.get("pids"):
        parts.append(f"pids {int(lim['pids'])}")
    if lim.get("cpus"):
        parts.append(f"cpus {lim['cpus']:g}")
    return ", ".join(parts) or "-"


def cmd_ls(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        boxes = client.boxes.list()
    finally:
        client.close()
    if getattr(args, "json", False):
        print_json([box_dict(b) for b in boxes])
        return 0
    if not boxes:
        print("no boxes (coworkctl box new NAME makes one)")
        return 0
    print(
        f"{'NAME':<20}  {'STATE':<6}  {'SANDBOX':<7}  {'AGE':>5}  {'IDLE':>5}  "
        f"{'RUNNING':>7}  {'RUNS':>6}  LIMITS"
    )
    now = time.time()
    for b in boxes:
        state = b.state if b.state == "ready" else f"gone: {b.reason}"
        idle = "-" if b.active else human_age(b.idle_seconds)
        print(
            f"{b.name:<20}  {state:<6}  {b.sandbox:<7}  {human_age(now - b.created_at):>5}  "
            f"{idle:>5}  {b.active:>7}  {b.runs:>6}  {_limits(b)}"
        )
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from ..errors import NotFound

    client = make_client(args)
    missing = []
    try:
        for name in args.names:
            try:
                client.boxes.remove(name)
                if not getattr(args, "json", False):
                    print(name)
            except NotFound:
                missing.append(name)
    finally:
        client.close()
    if missing:
        fail(f"no box named {', '.join(missing)} (coworkctl box ls lists them)")
    return 0
