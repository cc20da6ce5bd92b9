"""The `coworkctl` console script: the mux fast path first, the full CLI otherwise.

A fresh `coworkctl exec` with a mux running (host_client/mux.py) is what shell scripts
calling coworkctl in a loop pay for, so this module decides before any heavy import:
it reads the command line by hand, and for `exec` through a running mux it imports
only `host_client.mux` (socket, struct, json). Anything else on the line, or no mux,
goes to `host_client.cli.main` (argparse, the command modules, grpc when a call needs it).
tests/test_cli_start.py checks what the fast path imports.
"""

from __future__ import annotations

import os
import sys

_TARGET_OPTS = ("--target", "--token-file")
_EXEC_OPTS = ("--cwd", "--env", "--timeout", "--box")


def fast_exec(argv: list[str]) -> int | None:
    """`[--target T] [--token-file F] exec [--cwd D] [--env K=V]... [--timeout S] [--box B]
    -- CMD...`
    through a running mux, without argparse or grpc; None = not possible (anything else on
    the line, no mux, COWORK_MUX=0): the full CLI takes over."""
    if os.environ.get("COWORK_MUX") == "0":
        return None
    opts: dict[str, str] = {}
    env: dict[str, str] = {}
    i = 0
    while i < len(argv) and argv[i] in _TARGET_OPTS:
        if i + 1 >= len(argv):
            return None
        opts[argv[i]] = argv[i + 1]
        i += 2
    if i >= len(argv) or argv[i] != "exec":
        return None
    i += 1
    req: dict[str, object] = {}
    while i < len(argv) and argv[i] != "--":
        flag = argv[i]
        if flag not in _EXEC_OPTS or i + 1 >= len(argv):
            return None  # -t, -i, limits, a typo...: the full parser handles it
        value = argv[i + 1]
        if flag == "--env":
            key, sep, val = value.partition("=")
            if not sep or not key:
                return None
            env[key] = val
        elif flag == "--timeout":
            try:
                seconds = float(value)
            except ValueError:
                return None
            if not seconds > 0:
                return None  # the full parser says why
            req["timeout"] = seconds
        elif flag == "--box":
            req["box"] = value
        else:
            req["cwd"] = value
        i += 2
    command = argv[i + 1 :]
    if not command:
        return None
    if "box" not in req and os.environ.get("COWORK_BOX"):
        req["box"] = os.environ["COWORK_BOX"]
    from . import mux

    found = mux.fast_key(opts.get("--target"), opts.get("--token-file"))
    if found is None:
        return None
    sock = mux.connect(*found)
    if sock is None:
        return None
    req.update(argv=command, env=env)
    stdin = None if sys.stdin.isatty() else sys.stdin.fileno()
    try:
        return mux.run(sock, req, stdin)
    except KeyboardInterrupt:
        print("coworkctl: interrupted; remote process stopped", file=sys.stderr)
        return 130
    except ConnectionError as exc:  # BrokenPipeError included, as before the move
        print(f"coworkctl: mux: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()


def main() -> None:
    """The console script: exits with the command's code."""
    code = fast_exec(sys.argv[1:])
    if code is not None:
        raise SystemExit(code)
    from .cli import main as full_cli

    full_cli(mux=False)  # the fast path was just tried
