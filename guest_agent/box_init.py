"""The first process of a named box: it starts every command the agent asks for, inside the box.

Why a process inside the box instead of joining the box from outside (nsenter): a
process forked *inside* inherits every wall of the box by construction: its mount,
pid, net, ipc and uts namespaces, its cgroup, the user (setpriv already switched),
the empty capability sets, `no_new_privs` and the seccomp filter that bubblewrap
installed. Joining from outside would have to re-apply each one, and util-linux
setpriv before 2.40 (Ubuntu 22.04, Debian 12) cannot load a seccomp filter at all.
It is also what makes an exec into a box cheap: one fork of this small process and
one execve, no new namespaces, no mounts.

This file runs as `python3 -I -S /proc/self/fd/N` (the agent hands it over in a
memfd: its package may be out of the box's sight), so it uses the standard library
only. It trusts nothing but its socket: what runs in the box shares its user and
may kill it; then the box ends, and the agent reports the box as gone. The agent,
in turn, trusts nothing it says beyond what the box could do anyway (see boxes.py).

Protocol (SOCK_SEQPACKET on the fd named by its argument, one JSON object per message):
  agent -> box:  {"op": "spawn", "id": N, "pty": bool} with fds [spec memfd, stdin,
                 stdout, stderr] (or [spec memfd, tty]); the memfd holds
                 {"exe", "argv", "env", "cwd"} as JSON (no size limit but execve's).
                 {"op": "signal", "pgid": P, "sig": S}
  box -> agent:  {"ready": P}: running (first message);
                 {"id": N, "pid": P} with fds [pidfd]: started;
                 {"id": N, "error": errno, "where": "chdir"|"exec"}: not started;
                 {"exit": P, "status": wait status}: a command it started has ended.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import select
import signal
import socket
import sys
import termios

MAX_FDS = 4


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    for fd in fds:  # received inheritable: only a command's own stdio may reach it
        os.set_inheritable(fd, False)
    return msg, list(fds)


def _send(sock: socket.socket, obj: dict[str, object], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sock.sendmsg([data], anc)


def _read_spec(fd: int) -> dict[str, object]:
    chunks = []
    offset = 0
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    spec = json.loads(b"".join(chunks))
    if not isinstance(spec, dict):
        raise ValueError("spec is not an object")
    return spec


def _started(sock: socket.socket, rid: object, pid: int, started: set[int]) -> None:
    """Tell the agent the command runs: its pid here, and a pidfd for the agent to watch."""
    started.add(pid)
    pidfd = os.pidfd_open(pid)
    try:
        _send(sock, {"id": rid, "pid": pid}, [pidfd])
    finally:
        os.close(pidfd)


def _child(spec: dict[str, object], pty: bool, stdio: list[int], report: int) -> None:
    """In the forked child: become the command (never returns)."""
    where = "setup"
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        os.setsid()
        if pty:
            fcntl.ioctl(stdio[0], termios.TIOCSCTTY, 0)
            targets = [stdio[0]] * 3
        else:
            targets = stdio
        for number, fd in enumerate(targets):
            os.dup2(fd, number)
        os.closerange(3, report)
        os.closerange(report + 1, 1 << 16)
        where = "chdir"
        os.chdir(str(spec["cwd"]))
        where = "exec"
        argv = [str(a) for a in spec["argv"]]  # type: ignore[attr-defined]
        env = {str(k): str(v) for k, v in spec["env"].items()}  # type: ignore[attr-defined]
        os.execve(str(spec["exe"]), argv, env)
    except OSError as exc:
        code = exc.errno or errno.EIO
    except BaseException:
        code = errno.EINVAL
    try:
        os.write(report, json.dumps({"error": code, "where": where}).encode())
    finally:
        os._exit(127)


def _spawn(sock: socket.socket, req: dict[str, object], fds: list[int], started: set[int]) -> None:
    rid = req.get("id")
    try:
        if not fds:
            raise ValueError("no spec")
        spec = _read_spec(fds[0])
        stdio = fds[1:]
        pty = bool(req.get("pty"))
        if len(stdio) != (1 if pty else 3):
            raise ValueError("wrong number of fds")
    except (OSError, ValueError, KeyError):
        _send(sock, {"id": rid, "error": errno.EINVAL, "where": "request"})
        return
    finally:
        if fds:
            os.close(fds[0])
    if not pty:
        _posix_spawn(sock, rid, spec, stdio, started)
        return
    try:
        report_r, report_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
    except OSError as exc:
        for fd in stdio:
            os.close(fd)
        _send(sock, {"id": rid, "error": exc.errno or errno.EAGAIN, "where": "fork"})
        return
    if pid == 0:
        sock.close()
        os.close(report_r)
        _child(spec, pty, stdio, report_w)
    os.close(report_w)
    for fd in stdio:
        os.close(fd)
    failure = b""
    while True:  # EOF at the child's execve (the pipe is close-on-exec)
        chunk = os.read(report_r, 4096)
        if not chunk:
            break
        failure += chunk
    os.close(report_r)
    if failure:
        os.waitpid(pid, 0)
        try:
            reason = json.loads(failure)
        except ValueError:
            reason = {"error": errno.EIO, "where": "exec"}
        _send(sock, {"id": rid, **reason})
        return
    _started(sock, rid, pid, started)


def _posix_spawn(
    sock: socket.socket, rid: object, spec: dict[str, object], stdio: list[int], started: set[int]
) -> None:
    """A command on pipes: posix_spawn (vfork + exec in the C library), ~0.4 ms less than a
    fork of this interpreter. The working directory is set here first (the child inherits
    it); every fd of ours is close-on-exec, so the child gets only stdio."""
    try:
        where = "chdir"
        os.chdir(str(spec["cwd"]))
        where = "exec"
        argv = [str(a) for a in spec["argv"]]  # type: ignore[attr-defined]
        env = {str(k): str(v) for k, v in spec["env"].items()}  # type: ignore[attr-defined]
        pid = os.posix_spawn(
            str(spec["exe"]),
            argv,
            env,
            file_actions=[(os.POSIX_SPAWN_DUP2, fd, number) for number, fd in enumerate(stdio)],
            setsid=True,
            setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGINT),
        )
    except OSError as exc:
        _send(sock, {"id": rid, "error": exc.errno or errno.EIO, "where": where})
        return
    finally:
        os.chdir("/")
        for fd in stdio:
            os.close(fd)
    _started(sock, rid, pid, started)


def main() -> None:
    control = int(sys.argv[1])
    # Whatever else came in (the memfd this program was read from): closed, so that a
    # command started with posix_spawn inherits nothing but its stdio.
    os.closerange(3, control)
    os.closerange(control + 1, 1 << 16)
    os.set_inheritable(control, False)
    sock = socket.socket(fileno=control)
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    started: set[int] = set()
    _send(sock, {"ready": os.getpid()})
    while True:
        ready, _, _ = select.select([sock.fileno(), wake_r], [], [])
        if wake_r in ready:
            while True:
                try:
                    if not os.read(wake_r, 512):
                        break
                except BlockingIOError:
                    break
            while started:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                if pid in started:
                    started.discard(pid)
                    _send(sock, {"exit": pid, "status": status})
        if sock.fileno() in ready:
            msg, fds = _recv(sock)
            if not msg:
                return  # the agent let go of the box: it ends with this process
            try:
                req = json.loads(msg)
            except ValueError:
                req = {}
            op = req.get("op") if isinstance(req, dict) else None
            if op == "spawn":
                _spawn(sock, req, fds, started)
                continue
            for fd in fds:
                os.close(fd)
            if op == "signal":
                try:
                    os.killpg(int(req["pgid"]), int(req["sig"]))
                except (OSError, ValueError, KeyError, TypeError, OverflowError):
                    pass


if __name__ == "__main__":
    main()
