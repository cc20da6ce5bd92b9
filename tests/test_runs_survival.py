"""Runs with ids (issue #12): a detached run survives a cut transport and a client stopped for
two minutes, and is followed again with no byte lost or repeated (the client exiting or being
SIGKILLed is in test_runs.py). Real agent, real client processes, real unix sockets."""

from __future__ import annotations

import hashlib
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.models import Output, Started

from .conftest import REPO, AgentProc, wait_until
from .test_runs import EXPECTED, replay

LINE = 64  # bytes per generated line: "%063d\n"


def _lines(first: int, end: int, pause_every: int = 0, pause: str = "0.05") -> str:
    """sh: print lines `first`..`end`-1 of the generated stream, pausing every `pause_every`."""
    body = "printf '%063d\\n' $i; i=$((i+1))"
    if pause_every:
        body += f"; if [ $((i % {pause_every})) -eq 0 ]; then sleep {pause}; fi"
    return f"i={first}; while [ $i -lt {end} ]; do {body}; done"


# EXPECTED (2000 lines), its first half slowly (about 2.5 s), then a gate on a stdin line (an
# EOF there, i.e. stdin closed when a client went away, is exit 9), then its second half.
SLOW_GATED = f"{_lines(0, 1000, 20)}; read x || exit 9; {_lines(1000, 2000)}"
HALF = 1000 * LINE

# A bigger stream for the stopped client: 200 lines, the gate, then 2**17 lines (8 MiB, far
# more than HTTP/2 windows and socket buffers hold) in blocks of 4096 with 0.5 s pauses, so
# the run goes on producing for about 16 s while its follower is stopped.
BULK = 2**17
FIRST = 200
STOP_RUN = (
    f"{_lines(0, FIRST)}; read x || exit 9; awk 'BEGIN {{ for (i = {FIRST}; i < {FIRST + BULK}; "
    'i++) { printf "%063d\\n", i; if (i % 4096 == 4095) { fflush(); system("sleep 0.5") } } }\''
)
STOP_EXPECTED = b"".join(b"%063d\n" % i for i in range(FIRST + BULK))
STOPPED_FOR = 120.0  # seconds: the "reconnecting fails after about 2 minutes"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LineReader:
    """A child's stdout read line by line with a deadline (the child may hang or be stopped)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.fd = proc.stdout.fileno()
        self.buf = b""
        self.lines: list[str] = []

    def until(self, pred: Callable[[str], bool], timeout: float) -> str:
        """Read lines until one satisfies `pred`; that line (AssertionError on EOF or timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                raw, self.buf = self.buf.split(b"\n", 1)
                line = raw.decode()
                self.lines.append(line)
                if pred(line):
                    return line
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"no such line within {timeout}s; got {self.lines[-5:]}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF before such a line; got {self.lines[-5:]}")
            self.buf += chunk

    def rest(self, timeout: float) -> list[str]:
        """Every line until EOF."""
        start = len(self.lines)
        deadline = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no EOF within {timeout}s; got {self.lines[-5:]}")
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            self.buf += chunk
        self.lines += [ln.decode() for ln in self.buf.split(b"\n") if ln]
        self.buf = b""
        return self.lines[start:]


def _at(line: str) -> int:
    """The offset an "at N" progress line reports (-1 for any other line)."""
    word, _, n = line.partition(" ")
    return int(n) if word == "at" else -1


# -- a relay that can be cut ------------------------------------------------------------
RELAY = textwrap.dedent(
    """
    import contextlib, os, socket, sys, threading
    listen, upstream = sys.argv[1], sys.argv[2]
    with contextlib.suppress(FileNotFoundError):
        os.unlink(listen)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(listen)
    srv.listen(16)
    print("ready", flush=True)

    def pump(src, dst):
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    while True:
        conn, _ = srv.accept()
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        up.connect(upstream)
        print("conn", flush=True)
        threading.Thread(target=pump, args=(conn, up), daemon=True).start()
        threading.Thread(target=pump, args=(up, conn), daemon=True).start()
    """
)


def _start_relay(listen: Path, agent: AgentProc) -> subprocess.Popen[bytes]:
    """A forwarder process (like Lima's socket forward) from `listen` to the agent's socket."""
    relay = subprocess.Popen(
        [sys.executable, "-c", RELAY, str(listen), str(agent.socket)], stdout=subprocess.PIPE
    )
    assert relay.stdout is not None and relay.stdout.readline() == b"ready\n"
    return relay


def _end(proc: subprocess.Popen[bytes]) -> list[bytes]:
    """SIGKILL `proc` (every connection it carries dies with it); what it still printed."""
    proc.kill()
    out, _ = proc.communicate()
    return out.splitlines()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Child processes a test starts (relays, clients): those left are killed at the end."""
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGCONT)  # a stopped one too
            p.kill()
        p.wait()
        if p.stdout is not None:
            p.stdout.close()


# -- 3. the transport is cut ------------------------------------------------------------
CUT_CLIENT = textwrap.dedent(
    """
    import sys
    from host_client import CoworkClient
    from host_client.errors import CoworkError
    from host_client.models import Exited, Output, Started
    target, token, command, path = sys.argv[1:5]
    c = CoworkClient(target, token)
    stream = c.process.exec(command, detach=True, interactive=True)
    written = 0
    with open(path, "wb") as out:
        try:
            for ev in stream:
                if isinstance(ev, Started):
                    print("run", ev.run_id, flush=True)
                elif isinstance(ev, Output):
                    if ev.offset != written:
                        print("jump", written, ev.offset, flush=True)
                    out.write(ev.data)
                    out.flush()
                    written += len(ev.data)
                    print("at", written, flush=True)
                elif isinstance(ev, Exited):
                    print("exit", ev.code, flush=True)
        except CoworkError as exc:
            print("cut", written, stream.offset, exc.code, flush=True)
    """
)


def test_detached_run_survives_its_transport_cut_and_replays_from_the_offset_seen(
    own_agent: AgentProc, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    relay_sock = own_agent.dir / "relay.sock"
    children.append(relay := _start_relay(relay_sock, own_agent))
    got_file = tmp_path / "first-client.out"
    argv = [sys.executable, "-c", CUT_CLIENT, f"unix:{relay_sock}", str(own_agent.token_file)]
    argv += [SLOW_GATED, str(got_file)]
    client = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
    children.append(client)
    out = _LineReader(client)
    run_id = out.until(lambda ln: ln.startswith("run "), 30).split()[1]
    # Cut in the middle of the slow half: once the client has consumed 200 lines.
    out.until(lambda ln: _at(ln) >= 200 * LINE, 30)
    relay_said = _end(relay)
    assert relay_said.count(b"conn") >= 1  # the client did go through the relay
    said = out.rest(30)
    assert client.wait(30) == 0
    cut = said[-1].split()
    assert cut[0] == "cut", f"the client did not see its stream cut: {said[-3:]}"
    offset = int(cut[1])
    assert int(cut[2]) == offset, cut  # the stream's own offset agrees with what was written
    assert not any(ln.startswith("jump") for ln in out.lines), out.lines
    first = got_file.read_bytes()
    assert 200 * LINE <= offset == len(first) < len(EXPECTED)
    assert first == EXPECTED[:offset]

    with own_agent.client() as direct:
        info = {r.id: r for r in direct.process.runs()}[run_id]
        assert info.state == "running", info
        # Past the gate: the second half is produced with nobody following the run.
        poke = direct.process.attach(run_id, tail=True, interactive=True)
        events = iter(poke)
        next(events)
        poke.write(b"go\n")
        assert any(isinstance(ev, Output) for ev in events)
        poke.cancel()
        direct.process.wait(run_id, timeout=60)

    # The forward comes back: reattach through a new relay at the same path.
    children.append(relay := _start_relay(relay_sock, own_agent))
    with CoworkClient(f"unix:{relay_sock}", str(own_agent.token_file)) as again:
        rest, err, exit_ev = replay(again, run_id, from_offset=offset)
    assert _end(relay).count(b"conn") >= 1
    assert err == b"" and exit_ev.code == 0 and exit_ev.signal == 0
    assert rest == EXPECTED[offset:]
    assert _sha(first + rest) == _sha(EXPECTED)


# -- 4. the client is stopped for two minutes -------------------------------------------
FOLLOWER = textwrap.dedent(
    """
    import sys, time
    from host_client import CoworkClient
    from host_client.errors import CoworkError
    from host_client.models import Exited, Gap, Output
    target, token, run_id, path = sys.argv[1:5]
    c = CoworkClient(target, token)
    written = 0
    with open(path, "wb") as out:
        for attempt in range(10):
            stream = c.process.attach(run_id, from_offset=written)
            try:
                for ev in stream:
                    if isinstance(ev, Gap):
                        print("gap", ev.from_offset, ev.first_offset, flush=True)
                    elif isinstance(ev, Output):
                        if ev.offset != written:
                            print("jump", written, ev.offset, flush=True)
                        out.write(ev.data)
                        out.flush()
                        written += len(ev.data)
                        print("at", written, flush=True)
                    elif isinstance(ev, Exited):
                        print("exit", ev.code, ev.signal, flush=True)
                        sys.exit(0)
                print("ended without an exit", written, flush=True)
            except CoworkError as exc:
                # The stream was dropped: follow again from what was written.
                print("reattach", written, exc.code, str(exc)[:200], flush=True)
            time.sleep(1)
    sys.exit(3)
    """
)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.timeout(STOPPED_FOR + 240)
def test_client_stopped_for_two_minutes_follows_its_run_to_the_end_without_loss(
    own_agent: AgentProc, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    got_file = tmp_path / "follower.out"
    with own_agent.client() as c:
        stream = c.process.exec(STOP_RUN, detach=True, interactive=True)
        first = next(iter(stream))
        stream.cancel()
        assert isinstance(first, Started)
        argv = [sys.executable, "-c", FOLLOWER, own_agent.target, str(own_agent.token_file)]
        argv += [first.run_id, str(got_file)]
        run_id = first.run_id
        follower = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE)
        children.append(follower)
        out = _LineReader(follower)
        # Following: it has all there is before the gate.
        out.until(lambda ln: _at(ln) >= FIRST * LINE, 30)
        follower.send_signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        assert wait_until(lambda: _state(follower.pid) == "T", 10)  # the signal is async
        poke = c.process.attach(run_id, tail=True, interactive=True)
        events = iter(poke)
        next(events)
        poke.write(b"go\n")
        assert any(isinstance(ev, Output) for ev in events)  # past the gate: producing
        poke.cancel()
        time.sleep(STOPPED_FOR)
        # The run went on to its end while its follower was stopped.
        info = c.process.wait(run_id, timeout=5)
        assert info.state == "exited" and info.exit is not None and info.exit.code == 0, info
        assert info.journal_end == len(STOP_EXPECTED), info
        assert _state(follower.pid) == "T"
        follower.send_signal(signal.SIGCONT)
        stopped = time.monotonic() - stopped_at
    said = out.rest(120)
    assert follower.wait(30) == 0, out.lines[-5:]
    assert stopped >= STOPPED_FOR
    assert said[-1] == "exit 0 0", out.lines[-5:]
    odd = [ln for ln in out.lines if not ln.startswith(("at ", "exit "))]
    # A reattach (its stream dropped) is allowed; a gap, a jump or a stream without exit is not.
    assert all(ln.startswith("reattach ") for ln in odd), odd
    got = got_file.read_bytes()
    assert len(got) == len(STOP_EXPECTED)
    assert _sha(got) == _sha(STOP_EXPECTED)
