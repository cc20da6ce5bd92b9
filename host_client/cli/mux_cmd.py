"""`coworkctl mux start|stop|status|serve`: keep one connection open for fast shell scripts."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .common import fail, print_json

EPILOG = """\
With a mux running, `coworkctl exec` (without -t) skips loading gRPC and talks to the
mux over a private unix socket: a fresh coworkctl process then costs ~50-70 ms instead of
~150-180 ms, which is what shell scripts calling it in a loop feel (like ssh's ControlMaster).
The mux exits after 10 idle minutes, or with `coworkctl mux stop`.
COWORK_MUX=0 makes coworkctl ignore a running mux.
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "mux",
        help="keep a connection open so fresh `coworkctl exec` processes start fast",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="mux_command", metavar="ACTION")
    for name, text in (
        ("start", "start a mux for the target in the background (no-op if one runs)"),
        ("stop", "stop the target's mux"),
        ("status", "exit 0 when a mux serves the target"),
        ("serve", "run the mux in the foreground (what `start` runs)"),
    ):
        sp = ps.add_parser(name, help=text)
        sp.set_defaults(func=cmd_mux, action=name)
        if name in ("start", "serve"):
            sp.add_argument(
                "--idle", type=float, default=600, metavar="SECONDS", help="exit after idle time"
            )
    p.set_defaults(func=lambda args: fail("mux needs an action: start, stop, status", 2))


def _key(args: argparse.Namespace) -> tuple[str, bytes]:
    from .. import targets

    target = targets.parse(args.target)
    return target.spec, targets.load_token(target, args.token_file)


def cmd_mux(args: argparse.Namespace) -> int:
    from .. import mux

    spec, token = _key(args)
    path = mux.socket_path(spec, token)
    if args.action == "serve":
        return mux.serve(args.target, args.token_file, idle=args.idle)
    running = mux.connect(spec, token)
    if running is not None:
        running.close()
    if args.action == "status":
        if args.json:
            print_json({"target": spec, "running": running is not None, "socket": str(path)})
        else:
            print(f"mux for {spec}: {'running' if running else 'not running'}")
        return 0 if running else 1
    if args.action == "stop":
        if running is None:
            print(f"no mux for {spec}")
            return 0
        os.unlink(path)  # the mux notices within a second and exits
        print(f"mux for {spec} stopped")
        return 0
    if running is not None:
        print(f"mux for {spec} already running")
        return 0
    from ..client import CoworkClient

    with CoworkClient(args.target, args.token_file, connect_timeout=5) as probe:
        probe.wait_ready(10)  # AgentUnavailable: one line, exit 1, and no mux left behind
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_suffix(".log")
    with open(log_path, "ab") as log:
        proc = mux.start_background(args.target, args.token_file, log, ["--idle", str(args.idle)])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        s = mux.connect(spec, token)
        if s is not None:
            s.close()
            print(f"mux for {spec} running (pid {proc.pid})")
            return 0
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
    fail(f"the mux did not come up; see {log_path}")
