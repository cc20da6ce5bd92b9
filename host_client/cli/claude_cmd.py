"""`coworkctl ask` (one Claude Code run, rendered live) and `coworkctl claude` (TUI on a PTY)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from .box_cmd import box_option
from .common import CliError, fail, make_client, print_json

if TYPE_CHECKING:
    from ..api.claude import AskStream
    from ..claude import AssistantText, ClaudeEvent

ASK_HELP = """\
Ask Claude Code (running inside the sandbox) to do something, and watch it work.

On a terminal: assistant text as it arrives, one line per tool call and
result, then turns, cost and the session id. On a pipe: stdout gets only the
final answer (like `claude -p`), progress goes to stderr as plain lines.
--json prints one JSON event per line on stdout (for scripts).

Exit code: 0 when the run succeeded, 1 when it failed (an error result, an
API error, a crash), 130 when interrupted (Ctrl-C stops the remote run).

Auth: ANTHROPIC_API_KEY, CLAUDE_CODE_OAUTH_TOKEN (`claude setup-token`) and
ANTHROPIC_BASE_URL are forwarded from this environment for the run only.

examples:
  coworkctl ask "add a --verbose flag to cli.py and run the tests"
  git diff | coworkctl ask "review this diff"         # prompt on stdin
  coworkctl ask --resume SESSION_ID "now fix the failing test"
  coworkctl ask --json --max-turns 5 "summarize README.md" | jq .type
"""

CLAUDE_HELP = """\
Run the interactive Claude Code TUI inside the sandbox, over a PTY (raw mode,
window resizes follow), like `ssh -t vm claude` without SSH. Arguments are
passed to `claude` unchanged (put them after --).

Auth: ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN (and ANTHROPIC_BASE_URL) from
this environment, else the credential held with `coworkctl auth set`. The agent
keeps it: the TUI gets a placeholder and the agent's API relay, so nothing the
session runs (`!env`, a Bash tool) can read the key.

examples:
  coworkctl claude
  coworkctl claude -- --resume SESSION_ID
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "ask",
        help="ask Claude Code in the sandbox (streams progress, exit 0/1)",
        description=ASK_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("prompt", nargs="*", help="the prompt (default: read stdin; '-' = stdin)")
    p.add_argument("--resume", metavar="SESSION_ID", help="continue that session")
    p.add_argument(
        "--continue",
        dest="continue_session",
        action="store_true",
        help="continue the most recent session in the working directory",
    )
    p.add_argument("--fork-session", action="store_true", help="with --resume: fork a new session")
    p.add_argument("--session-id", metavar="UUID", help="id for the new session")
    p.add_argument("--model", help="model name or alias")
    p.add_argument("--max-turns", type=int, metavar="N", help="stop after N agentic turns")
    p.add_argument("--max-budget-usd", type=float, metavar="USD", help="stop past this spend")
    p.add_argument(
        "--permission-mode",
        metavar="MODE",
        help="acceptEdits | auto | bypassPermissions | default | dontAsk | plan",
    )
    p.add_argument(
        "--allowed-tools",
        action="append",
        default=[],
        metavar="TOOLS",
        help='tools allowed without asking, e.g. "Bash(git *),Edit" (repeatable)',
    )
    p.add_argument(
        "--disallowed-tools", action="append", default=[], metavar="TOOLS", help="tools to deny"
    )
    p.add_argument("--append-system-prompt", metavar="TEXT", help="added to the system prompt")
    p.add_argument("--cwd", help="working directory in the sandbox (default: the workspace root)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="stop the run after SECONDS")
    p.add_argument(
        "--env", action="append", default=[], metavar="K=V", help="extra variable for the run"
    )
    p.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="one JSON event per line on stdout",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, only the answer")
    p.add_argument(
        "-d",
        "--detach",
        action="store_true",
        help="start it detached: print the run's id and leave it going (coworkctl attach ID)",
    )
    p.add_argument("--show-logs", action="store_true", help="also show the CLI's stderr lines")
    box_option(p)
    p.set_defaults(func=cmd_ask)

    c = sub.add_parser(
        "claude",
        help="interactive Claude Code TUI in the sandbox (PTY)",
        description=CLAUDE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument("--cwd", help="working directory in the sandbox (default: the workspace root)")
    box_option(c)
    c.add_argument("args", nargs=argparse.REMAINDER, metavar="-- ARGS...", help="claude arguments")
    c.set_defaults(func=cmd_claude)


def _tools(values: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += [t.strip() for t in v.split(",") if t.strip()]
    return out


def _prompt(args: argparse.Namespace) -> str:
    words: list[str] = list(args.prompt)
    if words and words != ["-"]:
        return " ".join(words)
    if sys.stdin.isatty() and words != ["-"]:
        if args.resume or args.continue_session:
            return ""
        fail("ask needs a prompt: coworkctl ask PROMPT (or pipe it on stdin)", 2)
    text = sys.stdin.read()
    if not text.strip() and not (args.resume or args.continue_session):
        fail("the prompt on stdin is empty", 2)
    return text


def cmd_ask(args: argparse.Namespace) -> int:
    from .exec_cmd import parse_env

    prompt = _prompt(args)
    if args.max_turns is not None and args.max_turns <= 0:
        fail("--max-turns must be > 0", 2)
    if args.timeout is not None and args.timeout <= 0:
        fail("--timeout must be > 0", 2)
    if args.resume and args.continue_session:
        fail("give either --resume or --continue", 2)
    env = parse_env(args.env)
    as_json = bool(getattr(args, "json", False))
    tty = sys.stdout.isatty() and not as_json
    client = make_client(args)
    try:
        stream = client.ask_stream(
            prompt,
            cwd=args.cwd,
            model=args.model,
            max_turns=args.max_turns,
            max_budget_usd=args.max_budget_usd,
            permission_mode=args.permission_mode,
            allowed_tools=_tools(args.allowed_tools),
            disallowed_tools=_tools(args.disallowed_tools),
            append_system_prompt=args.append_system_prompt,
            resume=args.resume,
            continue_session=args.continue_session,
            session_id=args.session_id,
            fork_session=args.fork_session,
            include_partial_messages=tty and not args.detach,
            timeout=args.timeout,
            env=env,
            detach=args.detach,
            box=args.box,
        )
        if args.detach:
            return _detached(stream)
        renderer = Renderer(
            sys.stdout,
            sys.stderr,
            json_lines=as_json,
            tty=tty,
            quiet=args.quiet,
            show_logs=args.show_logs,
        )
        return run_stream(stream, renderer)
    finally:
        client.close()


def _detached(stream: AskStream) -> int:
    """A detached run's first event names it: print its id and leave it going."""
    events = iter(stream)
    try:
        next(events)
    finally:
        stream.cancel()
    print(stream.run_id)
    return 0


def run_stream(stream: AskStream, renderer: Renderer) -> int:
    from ..claude import summarize

    try:
        for ev in stream:
            renderer.event(ev)
    except KeyboardInterrupt:
        stream.cancel()  # the agent interrupts the CLI and reaps its process group
        renderer.interrupted()
        raise CliError("interrupted; the remote claude run was stopped", 130) from None
    return summarize(stream.events).exit_code


# -- rendering -----------------------------------------------------------------------------
_KEY_ARGS = ("file_path", "command", "pattern", "path", "url", "query", "description", "prompt")


def tool_summary(name: str, input_json: str, width: int = 100) -> str:
    """`Name(key arg)` on one line: the argument a reader recognizes the call by."""
    try:
        data = json.loads(input_json)
    except ValueError:
        data = None
    arg = ""
    if isinstance(data, dict):
        for key in _KEY_ARGS:
            if isinstance(data.get(key), str) and data[key]:
                arg = data[key]
                break
        else:
            arg = ", ".join(f"{k}=…" for k in list(data)[:3])
    arg = " ".join(arg.split())
    line = f"{name}({arg})"
    return line if len(line) <= width else line[: width - 1] + "…"


def _first_line(text: str, width: int = 100) -> str:
    lines = [x for x in text.strip().splitlines() if x.strip()]
    if not lines:
        return "(no output)"
    first = lines[0].strip()
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    if len(first) > width:
        first = first[: width - 1] + "…"
    return first + more


class Renderer:
    """Turns events into output: live on a TTY, plain on pipes, JSON lines with --json."""

    def __init__(
        self,
        out: TextIO,
        err: TextIO,
        *,
        json_lines: bool = False,
        tty: bool = False,
        quiet: bool = False,
        show_logs: bool = False,
    ) -> None:
        self.out = out
        self.err = err
        self.json_lines = json_lines
        self.tty = tty
        self.quiet = quiet
        self.show_logs = show_logs
        self.width = _width() if tty else 100
        self._streamed = False  # partial text printed for the current block
        self._at_line_start = True
        self._printed_text = False
        self._started = time.monotonic()
        self._texts: list[AssistantText] = []  # complete text events, for a cut result

    # styling (TTY only)
    def _style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.tty else text

    def _progress(self, line: str) -> None:
        """A progress line: on the terminal itself, or stderr when stdout is a pipe."""
        if self.quiet:
            return
        stream = self.out if self.tty else self.err
        if self.tty and not self._at_line_start:
            stream.write("\n")
        stream.write(line + "\n")
        stream.flush()
        self._at_line_start = True

    def _text(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        self._at_line_start = text.endswith("\n")
        self._printed_text = True

    def event(self, ev: ClaudeEvent) -> None:
        from ..claude import (
            AssistantText,
            ClaudeError,
            ClaudeGap,
            ClaudeInit,
            ClaudeLog,
            ClaudeResult,
            ToolResult,
            ToolUse,
            last_answer,
        )

        if self.json_lines:
            print_json(ev.to_dict())
            return
        if isinstance(ev, ClaudeGap):
            self._error(
                f"[the run's journal no longer holds its first {ev.first_offset - ev.from_offset}"
                f" events asked for: replay starts at event {ev.first_offset}]"
            )
            return
        if isinstance(ev, ClaudeInit):
            if self.tty:
                where = f"{ev.cwd} as {ev.user}" if ev.user else ev.cwd
                self._progress(
                    self._style(f"● claude {ev.claude_version} · {ev.model} · {where}", "2")
                )
        elif isinstance(ev, AssistantText):
            if not ev.partial:
                self._texts.append(ev)
            if not self.tty or ev.parent_tool_use_id:
                return  # pipes get the final answer only; subagent text stays inside
            if ev.partial:
                if not self._streamed and not self._at_line_start:
                    self.out.write("\n")
                self._streamed = True
                self._text(ev.text)
            elif self._streamed:
                self._streamed = False  # this full block was already streamed
                if not self._at_line_start:
                    self._text("\n")
            else:
                end = ev.more or ev.text.endswith("\n")  # parts of one text: no break between
                self._text(ev.text if end else ev.text + "\n")
        elif isinstance(ev, ToolUse):
            indent = "  " if ev.parent_tool_use_id else ""
            line = tool_summary(ev.name, ev.input_json, self.width - 4 - len(indent))
            self._progress(indent + self._style("⏺ ", "36") + line)
        elif isinstance(ev, ToolResult):
            indent = "  " if ev.parent_tool_use_id else ""
            if ev.is_error:
                text = self._style("error: " + _first_line(ev.content, self.width - 16), "31")
            else:
                text = self._style(_first_line(ev.content, self.width - 8), "2")
            self._progress(f"{indent}  ⎿ {text}")
        elif isinstance(ev, ClaudeLog):
            if self.show_logs:
                self._progress(self._style(f"[{ev.stream}] {ev.line}", "2"))
        elif isinstance(ev, ClaudeResult):
            if ev.is_error:
                why = ev.result or "; ".join(ev.errors) or ev.subtype
                self._error(f"error: {why}")
            elif not self.tty:
                # A result too large for one message came cut; its parts came whole.
                answer = last_answer(self._texts) if ev.truncated else ev.result
                self.out.write(answer if answer.endswith("\n") else answer + "\n")
                self.out.flush()
            status = "failed" if ev.is_error else "done"
            # An API error ends with subtype "success" and is_error; say what ended it.
            reason = ev.subtype
            if ev.is_error and reason == "success":
                reason = ev.terminal_reason or "error"
            seconds = ev.duration_ms / 1000
            summary = (
                f"{status} ({reason}) · {ev.num_turns} turn{'s' if ev.num_turns != 1 else ''}"
                f" · ${ev.total_cost_usd:.4f} · {seconds:.1f}s · session {ev.session_id}"
            )
            if ev.exit_code:
                summary += f" · exit {ev.exit_code}"
            self._progress(self._style(summary, "31" if ev.is_error else "32"))
        elif isinstance(ev, ClaudeError):
            extra = f" (exit {ev.exit_code})" if ev.exit_code else ""
            if ev.signal:
                extra = f" (signal {ev.signal})"
            if ev.timed_out:
                extra += " (timed out)"
            if ev.oom_killed:
                extra += " (out of memory: the run's memory limit)"
            self._error(f"error: {ev.message}{extra}")

    def _error(self, line: str) -> None:
        """Errors are shown even with --quiet: on the terminal, else on stderr."""
        stream = self.out if self.tty else self.err
        if self.tty and not self._at_line_start:
            stream.write("\n")
        stream.write(self._style(line, "31") + "\n")
        stream.flush()
        self._at_line_start = True

    def interrupted(self) -> None:
        if not self._at_line_start and self.tty:
            self.out.write("\n")
            self.out.flush()


def _width() -> int:
    try:
        return max(40, os.get_terminal_size(sys.stdout.fileno()).columns)
    except OSError:
        return 100


# -- interactive ---------------------------------------------------------------------------
def interactive_argv(version: dict[str, Any], args: list[str]) -> list[str]:
    """argv for the TUI: the agent's claude binary.

    Since protocol 2 the agent runs every process as its run-as user (with that
    user's HOME, inside the sandbox when the policy says so), so the TUI shares
    the sessions and settings of `coworkctl ask` runs without any switching here.
    """
    exe = version.get("path") or "claude"
    return [exe, *args]


def cmd_claude(args: argparse.Namespace) -> int:
    from ..claude_relay import ClaudeRelay
    from ..terminal import run_pty_session

    if not os.isatty(sys.stdin.fileno()):
        fail("claude needs a terminal; use 'coworkctl ask' from scripts", 2)
    extra = list(args.args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    client = make_client(args)
    try:
        version = client.claude_version()
        if not version.get("installed"):
            fail(f"Claude Code is not usable in the sandbox: {version.get('error') or 'not found'}")
        # The credential goes in its own field: the agent keeps it and gives the TUI a
        # placeholder on its API relay, so nothing the session runs can read the key.
        env: dict[str, str] = {}
        bypass = (
            "--dangerously-skip-permissions" in extra
            or "--permission-mode=bypassPermissions" in extra
            or ("--permission-mode" in extra and "bypassPermissions" in extra)
        )
        if bypass and version.get("run_as_user") == "root":
            env["IS_SANDBOX"] = "1"
        return run_pty_session(
            client,
            interactive_argv(version, extra),
            env=env,
            cwd=args.cwd,
            claude_relay=ClaudeRelay.from_env(),
            box=args.box,
        )
    finally:
        client.close()
