"""`coworkctl`: the command line of the host client.

Each subcommand group lives in its own module with a `register(subparsers)`
function; handlers take the parsed args and return an exit code. Errors are
printed as one line (never a traceback): usage errors exit 2, refused calls 1,
and `exec` passes the remote exit code through.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .common import EXIT_USAGE, CliError

COMMAND_MODULES = [
    "host_client.cli.exec_cmd",
    "host_client.cli.files_cmd",
    "host_client.cli.info_cmd",
    "host_client.cli.local_cmd",
    "host_client.cli.claude_cmd",
    "host_client.cli.runs_cmd",
    "host_client.cli.box_cmd",
    "host_client.cli.auth_cmd",
    "host_client.cli.lima_cmd",
    "host_client.cli.snapshot_cmd",
    "host_client.cli.policy_cmd",
    "host_client.cli.mux_cmd",
]

EPILOG = """\
targets (--target, or $COWORK_TARGET; default lima:$COWORK_VM_NAME, i.e. lima:cowork):
  local              the embedded agent on this host (start it: coworkctl local up)
  lima:NAME          the agent in Lima VM NAME (through the socket Lima forwards)
  unix:PATH | tcp:HOST:PORT | vsock:CID:PORT | hvsock:PATH:PORT

examples:
  coworkctl local up                       # no VM? run an agent on this host
  coworkctl --target local exec -- uname -a
  echo hi | coworkctl exec -i -- cat       # stdin is piped through
  coworkctl cp ./src vm:/workspace/src     # upload a directory
  coworkctl shell                          # interactive shell over a PTY
"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"coworkctl: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="coworkctl",
        description="Drive the cowork sandbox agent: run commands, move files, ask Claude Code.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--target", help="where the agent is (see below)")
    p.add_argument("--token-file", help="token file (default: per target, or $COWORK_TOKEN_FILE)")
    p.add_argument("--json", action="store_true", help="machine-readable output where it applies")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        # A command module that fails to import is a broken install or a bug: say so
        # and stop, rather than ship a coworkctl that quietly lacks commands.
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            raise CommandModuleError(
                f"command module {name} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        module.register(sub)
    return p


class CommandModuleError(ImportError):
    """A coworkctl command module could not be imported (a broken install or a bug)."""


def main(argv: list[str] | None = None, *, mux: bool = True) -> None:
    """The coworkctl entry point: every failure ends as one line on stderr and an exit code.

    Known failures (usage, refused calls, bad targets) have their own messages; anything
    else is a bug or an environment problem, reported as one line too, with the
    traceback only under COWORK_DEBUG=1. `mux=False`: the caller already tried the mux
    fast path (host_client.entry, the console script).
    """
    try:
        code = _main(argv, mux)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print("coworkctl: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        code = 141
    except BaseException as exc:
        code = _unexpected(exc)
    raise SystemExit(code)


def _unexpected(exc: BaseException) -> int:
    import os

    if os.environ.get("COWORK_DEBUG") == "1":
        import traceback

        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    detail = " ".join(str(exc).split()) or "no details"
    hint = "" if os.environ.get("COWORK_DEBUG") == "1" else " (COWORK_DEBUG=1 shows the traceback)"
    _say(f"unexpected error: {type(exc).__name__}: {detail}{hint}")
    return 1


def _main(argv: list[str] | None, mux: bool = True) -> int:
    if mux:
        from ..entry import fast_exec

        fast = fast_exec(sys.argv[1:] if argv is None else argv)
        if fast is not None:
            return fast
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ..errors import CoworkError
    from ..targets import TargetError

    try:
        code: int = args.func(args)
    except CliError as exc:
        _say(str(exc))
        code = exc.exit_code
    except (CoworkError, TargetError) as exc:
        _say(_unreachable_lima(args, exc) or str(exc))
        code = 1
    except OSError as exc:
        if exc.errno is None or isinstance(exc, BrokenPipeError):
            raise
        # A local file or device the command used (cp's destination, a token file...).
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"{exc.strerror or exc}{where}")
        code = 1
    return code


def _unreachable_lima(args: argparse.Namespace, exc: Exception) -> str | None:
    """For a lima: target whose agent could not be reached: why, and the fix (a stopped
    VM, a dead socket forward after host sleep, ...; host_client.lima.diagnose)."""
    from ..errors import AgentUnavailable
    from ..targets import TargetError, parse

    if not isinstance(exc, AgentUnavailable):
        return None
    try:
        target = parse(getattr(args, "target", None))
    except TargetError:
        return None
    if target.kind != "lima":
        return None
    from .. import lima

    return f"agent unavailable at {target.spec}: {lima.diagnose(target.name)}"


def _say(message: str) -> None:
    """An error as the one line on stderr that scripts and people expect."""
    print("coworkctl: " + " / ".join(x for x in message.splitlines() if x.strip()), file=sys.stderr)
