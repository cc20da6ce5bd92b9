"""`coworkctl exec` and `coworkctl shell`."""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from .box_cmd import box_option
from .common import CliError, fail, make_client

EXEC_HELP = """\
Run a command in the sandbox. stdout and stderr arrive on the matching local
streams, byte for byte; the exit code is the remote one (128+N when killed by
signal N, 124 on --timeout, 127 when the command does not exist).

stdin is forwarded when it is not a terminal (pipes, files) or with -i.

examples:
  coworkctl exec -- ls -la /workspace
  coworkctl exec --cwd /workspace/app --env DEBUG=1 -- make test
  tar c src | coworkctl exec -- tar x -C /workspace
  coworkctl exec -t -- htop
  coworkctl exec --box web -- curl -s 127.0.0.1:3000   # inside a named box
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "exec",
        help="run a command in the sandbox",
        description=EXEC_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-t", "--tty", action="store_true", help="allocate a pseudo-terminal")
    p.add_argument("-i", "--interactive", action="store_true", help="forward stdin even from a TTY")
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="start it detached: print the run's id and leave it going (coworkctl attach ID)",
    )
    p.add_argument("--cwd", help="working directory (default: the workspace root)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="kill after SECONDS (exit 124)")
    p.add_argument(
        "--memory", metavar="SIZE", help="memory limit, e.g. 512M (capped by the policy)"
    )
    p.add_argument("--pids", type=int, metavar="N", help="most processes/threads at once")
    p.add_argument("--cpus", type=float, metavar="N", help="CPU limit in CPUs, e.g. 1.5")
    box_option(p)
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGV...", help="the command")
    p.set_defaults(func=cmd_exec)

    s = sub.add_parser(
        "shell",
        help="interactive shell in the sandbox (PTY)",
        description="Open an interactive login shell on a PTY in the sandbox, like `ssh -t`.",
    )
    s.add_argument("--cwd", help="start directory (default: the workspace root)")
    s.add_argument("--shell", default="/bin/bash", help="shell to run (default /bin/bash)")
    box_option(s)
    s.set_defaults(func=cmd_shell)


def parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--env wants KEY=VALUE, got {pair!r}", 2)
        env[key] = value
    return env


def limits_arg(args: argparse.Namespace) -> dict[str, float] | None:
    """--memory/--pids/--cpus as the client's `limits` mapping (usage errors exit 2)."""
    out: dict[str, float] = {}
    if getattr(args, "memory", None):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", args.memory, re.IGNORECASE)
        if not m:
            fail(f"--memory wants a size like 512M or 2G, not {args.memory!r}", 2)
        out["memory_bytes"] = int(
            float(m.group(1)) * 1024 ** "BKMGT".index(m.group(2).upper() or "B")
        )
        if not 0 < out["memory_bytes"] < 2**64:  # the field is a uint64
            fail(f"--memory {args.memory} is out of range", 2)
    if getattr(args, "pids", None) is not None:
        if not 0 < args.pids < 2**32:  # the field is a uint32
            fail(f"--pids must be from 1 to {2**32 - 1}", 2)
        out["pids"] = args.pids
    if getattr(args, "cpus", None) is not None:
        if not 0 < args.cpus < math.inf:  # also refuses nan
            fail("--cpus must be a number > 0", 2)
        out["cpus"] = args.cpus
    return out or None


def cmd_exec(args: argparse.Namespace) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        fail("exec needs a command: coworkctl exec -- ARGV...", 2)
    env = parse_env(args.env)
    if args.timeout is not None and args.timeout <= 0:
        fail("--timeout must be > 0", 2)
    limits = limits_arg(args)  # usage errors before any connection
    if args.detach and args.interactive:
        fail("a detached run takes no stdin from exec: coworkctl attach -i ID forwards it", 2)
    from ..errors import NotFound

    client = make_client(args)
    try:
        if args.detach:
            return _exec_detached(client, argv, env, args, limits)
        if args.tty:
            from ..terminal import run_pty_session

            return run_pty_session(
                client,
                argv,
                env=env,
                cwd=args.cwd,
                timeout=args.timeout,
                limits=limits,
                box=args.box,
            )
        return _exec_pipes(client, argv, env, args, limits)
    except NotFound as exc:
        if exc.message.startswith("command not found"):
            print(f"coworkctl: {exc.message}", file=sys.stderr)
            return 127
        raise
    finally:
        client.close()


def raw_stdin(chunk: int = 65536) -> Iterator[bytes]:
    """Our stdin, read with os.read on the fd.

    Not sys.stdin.buffer: gRPC reads the request iterator on a daemon thread,
    and one still blocked in a BufferedReader (holding its lock) when the
    command ends made the interpreter abort at shutdown ("could not acquire
    lock for <stdin>", SIGABRT) in about 1 run in 150. A raw read holds no lock.
    """
    fd = sys.stdin.fileno()
    while True:
        data = os.read(fd, chunk)
        if not data:
            return
        yield data


def _exec_pipes(
    client: Any,
    argv: list[str],
    env: dict[str, str],
    args: argparse.Namespace,
    limits: dict[str, float] | None,
) -> int:
    from ..models import Exited, Output

    stdin: Any = None
    if args.interactive or not sys.stdin.isatty():
        stdin = raw_stdin()
    stream = client.exec(
        argv,
        stdin=stdin,
        env=env,
        cwd=args.cwd,
        timeout=args.timeout,
        limits=limits,
        box=args.box,
    )
    out, err = sys.stdout.buffer, sys.stderr.buffer
    code = 1
    try:
        for ev in stream:
            if isinstance(ev, Output):
                target = out if ev.stream == "stdout" else err
                target.write(ev.data)
                target.flush()
            elif isinstance(ev, Exited):
                code = ev.shell_code
                if ev.oom_killed:
                    print(
                        "coworkctl: killed: out of memory (the run's memory limit)", file=sys.stderr
                    )
    except KeyboardInterrupt:
        stream.cancel()  # the agent kills the remote process group
        raise CliError("interrupted; remote process stopped", 130) from None
    return code


def _exec_detached(
    client: Any,
    argv: list[str],
    env: dict[str, str],
    args: argparse.Namespace,
    limits: dict[str, float] | None,
) -> int:
    from ..models import Started
    from ..terminal import terminal_size

    rows, cols = terminal_size() if args.tty else (0, 0)
    stream = client.exec(
        argv,
        env=env,
        cwd=args.cwd,
        timeout=args.timeout,
        limits=limits,
        pty=args.tty,
        rows=rows,
        cols=cols,
        term=os.environ.get("TERM", "") if args.tty else "",
        detach=True,
        box=args.box,
    )
    events = iter(stream)
    try:
        first = next(events)
    finally:
        stream.cancel()  # leaves the run going: it is detached
    assert isinstance(first, Started)
    print(first.run_id)
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    from ..terminal import run_pty_session

    if not os.isatty(sys.stdin.fileno()):
        fail("shell needs a terminal; use 'coworkctl exec -- CMD' from scripts", 2)
    client = make_client(args)
    try:
        return run_pty_session(client, [args.shell, "-l"], cwd=args.cwd, box=args.box)
    finally:
        client.close()
