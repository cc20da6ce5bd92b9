"""`coworkctl local up|down|status`: the embedded agent for machines without a VM."""

from __future__ import annotations

import argparse
from typing import Any

from .common import fail, print_json

LOCAL_HELP = """\
Run an agent on this host so coworkctl works without any VM (target: local).
There is NO isolation: commands run as you, on this machine. Use it to try
coworkctl, in CI, or where a VM is not available; use Lima for real sandboxing.

  coworkctl local up            # start (idempotent); workspace ~/cowork-workspace
  coworkctl --target local exec -- uname -a
  coworkctl local down
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "local",
        help="the embedded local agent (no VM, no isolation)",
        description=LOCAL_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lsub = p.add_subparsers(dest="local_command", metavar="ACTION")
    up = lsub.add_parser("up", help="start the local agent (idempotent)")
    up.add_argument(
        "--workspace", help="workspace root (default $COWORK_WORKSPACE or ~/cowork-workspace)"
    )
    up.set_defaults(func=cmd_up)
    down = lsub.add_parser("down", help="stop the local agent")
    down.set_defaults(func=cmd_down)
    st = lsub.add_parser("status", help="is the local agent running?")
    st.set_defaults(func=cmd_status)
    p.set_defaults(func=lambda args: fail("local needs an action: up, down or status", 2))


def cmd_up(args: argparse.Namespace) -> int:
    from ..local import LocalAgent

    agent = LocalAgent.default(args.workspace)
    try:
        pid = agent.start()
    except RuntimeError as exc:
        fail(str(exc))
    if args.json:
        print_json({"pid": pid, "socket": str(agent.socket), "workspace": str(agent.workspace)})
    else:
        print(f"local agent running (pid {pid}) on {agent.socket}; workspace {agent.workspace}")
        print("use it with: coworkctl --target local ...  (or export COWORK_TARGET=local)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from ..local import LocalAgent

    stopped = LocalAgent.default().stop()
    print("local agent stopped" if stopped else "local agent was not running")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ..local import LocalAgent

    agent = LocalAgent.default()
    pid = agent.pid()
    if args.json:
        print_json({"running": pid is not None, "pid": pid, "socket": str(agent.socket)})
    else:
        print(f"running (pid {pid}) on {agent.socket}" if pid else "not running")
    return 0 if pid else 1
