"""`coworkctl mux`: a per-target multiplexer, the ControlMaster of coworkctl.

A fresh `coworkctl exec` pays ~100 ms before its first byte (interpreter,
grpc, protobufs) — what shell scripts calling it in a loop feel. With a mux
running (`coworkctl mux start`), `coworkctl exec` instead connects to a unix
socket and speaks a tiny framed protocol to a long-lived process that holds one
CoworkClient; the fresh process then imports nothing heavier than `socket`.

Security: the socket is 0600 in a 0700 directory of the user's state dir (only
that user can reach it, as with the token file), and its name is derived from
the target *and* the token, so a mux never serves a different token's target.

Frames, both ways: 1 byte kind + 4 bytes big-endian length + payload.
    client -> mux:  R {argv, env, cwd, timeout, limits, box}   then I <stdin bytes>..., E (EOF)
    mux -> client:  O <stdout>  e <stderr>  X {code, oom_killed}  F {message, exit}
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys

# The client side runs in every fresh `coworkctl exec`, so this module imports only what
# that side needs; the mux process's own imports (grpc, threads, pathlib) are in its
# functions. tests/test_cli_start.py checks what a fast-path process imports.
TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any, BinaryIO

HEADER = struct.Struct("!cI")
MAX_FRAME = 4 * 1024 * 1024
IDLE_SECONDS = 600.0


def socket_path(target_spec: str, token: bytes) -> Path:
    """Where the mux for this target+token listens: $XDG_RUNTIME_DIR (made for sockets) when
    set, else the state dir. The name hashes the token: it never shows in a path."""
    from pathlib import Path

    return Path(socket_file(target_spec, token))


def socket_file(target_spec: str, token: bytes) -> str:
    """socket_path() as a string, without pathlib or cowork.defaults (the fast path's cost)."""
    from hashlib import sha256

    key = sha256(target_spec.encode() + b"\0" + token).hexdigest()[:20]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = os.path.join(runtime, "cowork") if runtime else _state_dir()
    return os.path.join(base, "mux", f"{key}.sock")


# -- the fresh-process side (no grpc) -------------------------------------------------------
# cowork.defaults and host_client.targets say where state and tokens live; their imports
# (pathlib, dataclasses, re) cost a fresh process more than the whole mux round trip, so the
# few lines the fast path needs are repeated here with os.path, and
# tests/test_cli_start.py checks that they agree with those modules.
_DEFAULT_VM_NAME = "cowork"  # defaults.DEFAULT_VM_NAME
_LIMA_TOKEN_NAME = "cowork-token"  # defaults.LIMA_TOKEN_NAME


def _state_dir() -> str:  # defaults.state_dir()
    env = os.environ
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "cowork")


def fast_key(target: str | None, token_file: str | None) -> tuple[str, bytes] | None:
    """(target spec, token) as targets.parse() and targets.load_token() find them, or None
    when only they can tell (no token, an unreadable or malformed one: they say why)."""
    env = os.environ
    spec = (
        target
        or env.get("COWORK_TARGET")
        or "lima:" + (env.get("COWORK_VM_NAME") or _DEFAULT_VM_NAME)
    )
    path = token_file or env.get("COWORK_TOKEN_FILE")
    if path:
        token = _read_token(path)
    elif env.get("COWORK_TOKEN"):
        token = os.fsencode(env["COWORK_TOKEN"].strip())
    elif spec == "local":
        token = _read_token(os.path.join(_state_dir(), "token"))
    elif spec.startswith("lima:"):
        home = env.get("LIMA_HOME") or os.path.join(os.path.expanduser("~"), ".lima")
        token = _read_token(os.path.join(home, spec[5:], _LIMA_TOKEN_NAME))
    else:
        return None
    if not token or not all(0x20 <= b <= 0x7E for b in token):
        return None
    return spec, token


def _read_token(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError:
        return b""


def send(sock: socket.socket, kind: bytes, payload: bytes = b"") -> None:
    sock.sendall(HEADER.pack(kind, len(payload)) + payload)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("mux connection closed")
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> tuple[bytes, bytes]:
    kind, n = HEADER.unpack(_recv_exact(sock, HEADER.size))
    if n > MAX_FRAME:
        raise ConnectionError(f"mux frame too large ({n} bytes)")
    return kind, _recv_exact(sock, n) if n else b""


def connect(target_spec: str, token: bytes) -> socket.socket | None:
    """A connection to a running mux for this target+token, or None (then go the slow way)."""
    path = socket_file(target_spec, token)
    if not os.path.exists(path):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def run(sock: socket.socket, request: dict[str, Any], stdin_fd: int | None) -> int:
    """Run one exec through the mux, streaming our stdin/stdout/stderr; return the exit code."""
    send(sock, b"R", json.dumps(request).encode())
    if stdin_fd is not None:
        import _thread  # not threading: a fresh process would pay for importing it

        def pump() -> None:  # never joined: blocked in os.read it holds no Python lock
            try:
                while data := os.read(stdin_fd, 65536):
                    send(sock, b"I", data)
                send(sock, b"E")
            except OSError:
                pass

        _thread.start_new_thread(pump, ())
    else:
        send(sock, b"E")
    out, err = sys.stdout.buffer, sys.stderr.buffer
    while True:
        kind, payload = recv(sock)
        if kind == b"O":
            out.write(payload)
            out.flush()
        elif kind == b"e":
            err.write(payload)
            err.flush()
        elif kind == b"X":
            ex = json.loads(payload)
            if ex.get("oom_killed"):
                print("coworkctl: killed: out of memory (the run's memory limit)", file=sys.stderr)
            return int(ex["code"])
        elif kind == b"F":
            fail = json.loads(payload)
            print(f"coworkctl: {fail['message']}", file=sys.stderr)
            return int(fail["exit"])
        else:
            raise ConnectionError(f"unexpected mux frame {kind!r}")


# -- the mux process ---------------------------------------------------------------------
class _Stdin:
    """Stdin frames from the client as an iterator of bytes (ends at E or disconnect)."""

    def __init__(self, sock: socket.socket) -> None:
        import threading

        self.sock = sock
        self.done = threading.Event()  # the client sent E (or is gone): nothing more to read

    def __iter__(self) -> Iterator[bytes]:
        try:
            while True:
                try:
                    kind, data = recv(self.sock)
                except (ConnectionError, OSError):
                    return
                if kind != b"I":
                    return
                yield data
        finally:
            self.done.set()


def _cancel_on_hangup(conn: socket.socket, stdin: _Stdin, stream: Any) -> None:
    """After stdin ended, the client sends nothing more: EOF on the socket means it is gone
    (Ctrl-C, killed), and the remote process must not outlive it."""
    stdin.done.wait()
    try:
        conn.recv(1)
    except OSError:
        pass
    stream.cancel()  # a no-op once the stream has ended


def _serve_one(client: Any, conn: socket.socket) -> None:
    import threading

    from .errors import CoworkError, NotFound
    from .models import Exited, Output

    try:
        kind, payload = recv(conn)
        if kind != b"R":
            return
        req = json.loads(payload)
        stdin = _Stdin(conn)
        stream = client.exec(
            req["argv"],
            stdin=stdin,
            env=req.get("env") or None,
            cwd=req.get("cwd") or None,
            timeout=req.get("timeout") or None,
            limits=req.get("limits") or None,
            box=req.get("box") or None,
        )
        threading.Thread(target=_cancel_on_hangup, args=(conn, stdin, stream), daemon=True).start()
        code = 1
        oom = False
        for ev in stream:
            if isinstance(ev, Output):
                send(conn, b"O" if ev.stream == "stdout" else b"e", ev.data)
            elif isinstance(ev, Exited):
                code, oom = ev.shell_code, ev.oom_killed
        send(conn, b"X", json.dumps({"code": code, "oom_killed": oom}).encode())
    except NotFound as exc:
        missing = exc.message.startswith("command not found")
        _fail(conn, exc.message, 127 if missing else 1)
    except CoworkError as exc:
        _fail(conn, str(exc), 1)
    except (ConnectionError, OSError):
        pass  # the client went away: the stream's cancel stops the remote process
    finally:
        conn.close()


def _fail(conn: socket.socket, message: str, code: int) -> None:
    try:
        send(conn, b"F", json.dumps({"message": message, "exit": code}).encode())
    except OSError:
        pass


def serve(target_spec: str | None, token_file: str | None, idle: float = IDLE_SECONDS) -> int:
    """Hold one client for the target and serve fresh coworkctl processes until idle."""
    import threading
    import time

    from . import targets
    from .client import CoworkClient
    from .errors import CoworkError

    target = targets.parse(target_spec)
    token = targets.load_token(target, token_file)
    path = socket_path(target.spec, token)
    if len(str(path)) + 12 > 107:  # sun_path, with room for the temporary name
        raise CoworkError(f"mux socket path too long for a unix socket: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    client = CoworkClient(target.spec, token_file)
    client.wait_ready(30)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmp = path.with_suffix(f".{os.getpid() % 100000}")
    old = os.umask(0o177)
    try:
        listener.bind(str(tmp))
    finally:
        os.umask(old)
    listener.listen(64)
    os.replace(tmp, path)  # atomically take over a stale socket of a dead mux
    ours = os.stat(path).st_ino
    listener.settimeout(1.0)
    active = [0]
    last = time.monotonic()
    lock = threading.Lock()

    def handle(conn: socket.socket) -> None:
        try:
            _serve_one(client, conn)
        finally:
            with lock:
                active[0] -= 1

    try:
        while True:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                with lock:
                    busy = active[0] > 0
                if busy:
                    last = time.monotonic()
                elif time.monotonic() - last > idle or not _is(path, ours):
                    return 0  # idle too long, or `mux stop` removed the socket
                continue
            last = time.monotonic()
            with lock:
                active[0] += 1
            threading.Thread(target=handle, args=(conn,), daemon=True).start()
    finally:
        listener.close()
        try:
            if os.stat(path).st_ino == ours:  # not a newer mux's socket
                os.unlink(path)
        except OSError:
            pass
        client.close()


def _is(path: Path, ino: int) -> bool:
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


def start_background(
    target_spec: str | None, token_file: str | None, log: BinaryIO, extra: list[str]
) -> subprocess.Popen[bytes]:
    """Start `coworkctl mux serve` detached."""
    import subprocess

    argv = [sys.executable, "-m", "host_client.cli"]
    if target_spec:
        argv += ["--target", target_spec]
    if token_file:
        argv += ["--token-file", token_file]
    argv += ["mux", "serve", *extra]
    with open(os.devnull, "rb") as devnull:
        return subprocess.Popen(argv, stdin=devnull, stdout=log, stderr=log, start_new_session=True)
