"""Interactive PTY sessions (`coworkctl shell`, `exec -t`, `claude`): raw mode, resize, exit code.

The local terminal is put in raw mode so every key (Ctrl-C included) reaches
the remote PTY, which turns it into the right signal for the remote
foreground job, exactly as `ssh -t` does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .models import Exited, Output

if TYPE_CHECKING:
    from .claude_relay import ClaudeRelay
    from .client import CoworkClient, ExecStream


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on `fd` if it is a TTY; restored whatever happens."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
        return size.lines, size.columns
    except OSError:
        return 24, 80


def _pump_stdin(stream: ExecStream, fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data:
            stream.close_stdin()
            return
        stream.write(data)


def run_pty_session(
    client: CoworkClient,
    argv: str | Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    timeout: float | None = None,
    limits: Mapping[str, float] | None = None,
    claude_relay: ClaudeRelay | None = None,
    box: str | None = None,
) -> int:
    """Run `argv` on a remote PTY wired to this terminal; return the shell-style exit code.

    `limits` are the run's cgroup limits (memory_bytes, pids, cpus), as for `exec`;
    `claude_relay` gives it the Claude API through the agent's relay (as for `exec`).
    """
    rows, cols = terminal_size()
    term_env = dict(env or {})
    term = os.environ.get("TERM", "xterm-256color")
    stream = client.exec(
        argv,
        interactive=True,
        pty=True,
        rows=rows,
        cols=cols,
        term=term,
        env=term_env,
        cwd=cwd,
        timeout=timeout,
        limits=limits,
        claude_relay=claude_relay,
        box=box,
    )
    stdin_fd = sys.stdin.fileno()
    out = sys.stdout.buffer
    previous: Any = None

    def on_winch(signum: int, frame: Any) -> None:
        r, c = terminal_size()
        stream.resize(r, c)

    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGWINCH, on_winch)
    reader = threading.Thread(target=_pump_stdin, args=(stream, stdin_fd), daemon=True)
    code = 1
    oom = False
    try:
        with raw_terminal(stdin_fd):
            started = False
            for ev in stream:
                if not started:
                    started = True
                    reader.start()
                if isinstance(ev, Output):
                    out.write(ev.data)
                    out.flush()
                elif isinstance(ev, Exited):
                    code = ev.shell_code
                    oom = ev.oom_killed
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
    if oom:  # after the terminal is back to normal, so the line is readable
        print("coworkctl: killed: out of memory (the run's memory limit)", file=sys.stderr)
    return code
