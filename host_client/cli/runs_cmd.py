"""`coworkctl runs`, `attach`, `kill`, `wait`: runs with ids (detached exec and Claude runs).

Detach keys: in an attached PTY run, Ctrl-\\ (0x1c, the key that is SIGQUIT on a
local terminal) detaches, as Ctrl-P Ctrl-Q does in `docker attach`; the run goes
on. Without a PTY, Ctrl-C detaches (it never stops a detached run: `coworkctl
kill ID` does).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from ..units import human_age
from .common import CliError, fail, make_client, print_json

if TYPE_CHECKING:
    from ..client import CoworkClient
    from ..models import RunInfo

DETACH_KEY = b"\x1c"  # Ctrl-\
DETACH_KEY_NAME = "Ctrl-\\"


def register(sub: Any) -> None:
    r = sub.add_parser(
        "runs",
        help="list runs (running, and finished detached ones the agent keeps)",
        description="List the agent's runs: every exec and Claude run going on, and the "
        "detached ones that ended and are still kept (the policy's runs.keep).",
    )
    r.set_defaults(func=cmd_runs)

    a = sub.add_parser(
        "attach",
        help="follow a detached run again (replay with --from 0)",
        description=(
            "Follow a detached run: by default only what it prints from now on; --from N "
            "replays its journal from offset N (0: from the start; bytes for an exec run, "
            "events for a Claude run), then goes on live until it ends; the exit code is "
            f"the run's. A PTY run gets this terminal: {DETACH_KEY_NAME} detaches. Without a "
            "PTY, Ctrl-C detaches. Either way the run goes on (coworkctl kill ID stops it)."
        ),
    )
    a.add_argument("run_id", metavar="ID", help="the run's id (or a unique prefix)")
    a.add_argument("--from", dest="from_offset", type=int, metavar="N", help="replay from N")
    a.add_argument(
        "-i", "--interactive", action="store_true", help="forward stdin (no PTY: EOF closes it)"
    )
    a.set_defaults(func=cmd_attach)

    k = sub.add_parser(
        "kill",
        help="stop a run (or send it a signal with -s)",
        description="Stop a run like an ended stream does: SIGTERM to its process group, "
        "SIGKILL after the agent's grace period. With -s SIG, only send that signal.",
    )
    k.add_argument("run_id", metavar="ID", help="the run's id (or a unique prefix)")
    k.add_argument("-s", "--signal", metavar="SIG", help="send SIG (name or number) instead")
    k.set_defaults(func=cmd_kill)

    w = sub.add_parser(
        "wait",
        help="wait for a run to end; exit with its exit code",
        description="Wait until a run has ended, print how, and exit with its exit code.",
    )
    w.add_argument("run_id", metavar="ID", help="the run's id (or a unique prefix)")
    w.set_defaults(func=cmd_wait)


def _ago(ts: float) -> str:
    return f"{human_age(time.time() - ts)} ago"


def describe_end(info: RunInfo) -> str:
    if info.state == "running":
        return "running"
    if info.exit is None:
        return info.reason or info.state
    e = info.exit
    if e.timed_out:
        how = "timed out"
    elif e.oom_killed:
        how = "out of memory"
    elif e.signal:
        how = f"signal {e.signal}"
    else:
        how = f"exit {e.code}"
    return f"{how} ({info.reason})" if info.reason else how


def run_dict(info: RunInfo) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(info)


def cmd_runs(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        runs = client.process.runs()
    finally:
        client.close()
    if getattr(args, "json", False):
        print_json([run_dict(r) for r in runs])
        return 0
    if not runs:
        print("no runs")
        return 0
    print(f"{'ID':<12}  {'KIND':<6}  {'STATE':<24}  {'STARTED':<9}  {'OUTPUT':>9}  COMMAND")
    for r in runs:
        kind = r.kind + ("" if r.detached else "*")
        output = str(r.journal_end) if r.detached else "-"
        command = r.command if len(r.command) <= 60 else r.command[:59] + "…"
        print(
            f"{r.id:<12}  {kind:<6}  {describe_end(r)[:24]:<24}  {_ago(r.started_at):<9}  "
            f"{output:>9}  {command}"
        )
    if any(not r.detached for r in runs):
        print("* attached to the stream that started it (no journal: attach is not possible)")
    return 0


def _find(client: CoworkClient, ref: str) -> RunInfo:
    runs = client.process.runs()
    exact = [r for r in runs if r.id == ref]
    matches = exact or [r for r in runs if r.id.startswith(ref)]
    if not matches:
        fail(f"no such run: {ref}")
    if len(matches) > 1:
        fail(f"run id {ref!r} is ambiguous: {len(matches)} runs start with it", 2)
    return matches[0]


def cmd_attach(args: argparse.Namespace) -> int:
    if args.from_offset is not None and args.from_offset < 0:
        fail("--from must be >= 0", 2)
    client = make_client(args)
    try:
        info = _find(client, args.run_id)
        tail = args.from_offset is None
        offset = args.from_offset or 0
        if info.kind == "claude":
            return _attach_claude(client, info, offset, tail, bool(getattr(args, "json", False)))
        if info.pty and os.isatty(sys.stdin.fileno()):
            return _attach_pty(client, info, offset, tail)
        return _attach_pipes(client, info, offset, tail, args.interactive)
    finally:
        client.close()


def gap_line(dropped: int, first: int, unit: str) -> str:
    return (
        f"coworkctl: [the run's journal no longer holds the first {dropped} {unit} asked for "
        f"(it keeps the policy's runs.journal): replay starts at offset {first}]"
    )


def _detached_line(run_id: str) -> str:
    return f"coworkctl: detached from run {run_id}; it goes on (coworkctl attach {run_id})"


def _attach_pipes(
    client: CoworkClient, info: RunInfo, offset: int, tail: bool, interactive: bool
) -> int:
    from ..models import Exited, Gap, Output
    from .exec_cmd import raw_stdin

    stream = client.process.attach(info.id, from_offset=offset, tail=tail, interactive=interactive)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    code = 0

    def feed() -> None:
        for data in raw_stdin():
            stream.write(data)
        stream.close_stdin()

    try:
        for ev in stream:
            if isinstance(ev, Output):
                target = out if ev.stream == "stdout" else err
                target.write(ev.data)
                target.flush()
            elif isinstance(ev, Gap):
                print(gap_line(ev.dropped, ev.first_offset, "bytes"), file=sys.stderr)
            elif isinstance(ev, Exited):
                code = ev.shell_code
            elif interactive:
                threading.Thread(target=feed, daemon=True).start()
    except KeyboardInterrupt:
        stream.cancel()
        print(_detached_line(info.id), file=sys.stderr)
        return 130
    return code


def _attach_pty(client: CoworkClient, info: RunInfo, offset: int, tail: bool) -> int:
    from ..models import Exited, Gap, Output
    from ..terminal import raw_terminal, terminal_size

    stream = client.process.attach(info.id, from_offset=offset, tail=tail, interactive=True)
    stdin_fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    detached = threading.Event()
    previous: Any = None

    def pump() -> None:
        while True:
            try:
                data = os.read(stdin_fd, 4096)
            except OSError:
                return
            if not data:
                return
            if DETACH_KEY in data:
                before = data.split(DETACH_KEY, 1)[0]
                if before:
                    stream.write(before)
                detached.set()
                stream.cancel()
                return
            stream.write(data)

    def on_winch(signum: int, frame: Any) -> None:
        stream.resize(*terminal_size())

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGWINCH, on_winch)
    code = 0
    try:
        with raw_terminal(stdin_fd):
            started = False
            try:
                for ev in stream:
                    if not started:
                        started = True
                        stream.resize(*terminal_size())
                        threading.Thread(target=pump, daemon=True).start()
                    if isinstance(ev, Output):
                        out.write(ev.data)
                        out.flush()
                    elif isinstance(ev, Gap):
                        out.write(b"\r\n" + gap_line(ev.dropped, ev.first_offset, "bytes").encode())
                        out.write(b"\r\n")
                    elif isinstance(ev, Exited):
                        code = ev.shell_code
            except Exception:
                if not detached.is_set():
                    raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
    if detached.is_set():
        print(_detached_line(info.id), file=sys.stderr)
        return 0
    return code


def _attach_claude(
    client: CoworkClient, info: RunInfo, offset: int, tail: bool, as_json: bool
) -> int:
    from ..claude import summarize
    from .claude_cmd import Renderer

    tty = sys.stdout.isatty() and not as_json
    stream = client.claude.attach(info.id, from_offset=offset, tail=tail)
    renderer = Renderer(sys.stdout, sys.stderr, json_lines=as_json, tty=tty)
    try:
        for ev in stream:
            renderer.event(ev)
    except KeyboardInterrupt:
        stream.cancel()
        renderer.interrupted()
        print(_detached_line(info.id), file=sys.stderr)
        return 130
    if tail and not stream.finished:
        return 0
    return summarize(stream.events).exit_code


def _signal_number(value: str) -> int:
    if value.isdigit():
        num = int(value)
    else:
        name = value.upper()
        name = name if name.startswith("SIG") else "SIG" + name
        try:
            num = int(signal.Signals[name])
        except KeyError:
            fail(f"unknown signal: {value}", 2)
    if not 0 < num < signal.NSIG:
        fail(f"signal {value} is out of range (1..{signal.NSIG - 1})", 2)
    return num


def cmd_kill(args: argparse.Namespace) -> int:
    num = _signal_number(args.signal) if args.signal else 0
    client = make_client(args)
    try:
        if num:
            info = client.process.signal_run(args.run_id, num)
            print(f"{info.id}: sent {signal.Signals(num).name}")
            return 0
        info = client.process.kill(args.run_id)
    finally:
        client.close()
    print(f"{info.id}: {describe_end(info)}")
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        info = client.process.wait(args.run_id)
    finally:
        client.close()
    if getattr(args, "json", False):
        print_json(run_dict(info))
    else:
        print(f"{info.id}: {describe_end(info)}")
    if info.exit is None:
        raise CliError(f"run {info.id} has no exit status: {info.reason or info.state}", 1)
    return info.exit.shell_code
