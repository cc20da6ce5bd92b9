"""Parsing and binding of `--listen` addresses (unix:, tcp:, vsock:)."""

from __future__ import annotations

import grp
import ipaddress
import os
import socket
import stat
from dataclasses import dataclass

import grpc.aio


class ListenError(Exception):
    """A listen address that is malformed or not allowed; the message is shown to the operator."""


@dataclass(frozen=True)
class Listen:
    kind: str  # unix | tcp | vsock
    path: str = ""
    host: str = ""
    port: int = 0
    cid: int = -1  # vsock: -1 = any

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        if self.kind == "tcp":
            return f"tcp:{self.host}:{self.port}"
        return f"vsock:{self.port}" if self.cid < 0 else f"vsock:{self.cid}:{self.port}"


def parse(addr: str, allow_remote: bool = False) -> Listen:
    kind, sep, rest = addr.partition(":")
    if not sep or not rest:
        raise ListenError(
            f"bad listen address {addr!r}: use unix:PATH, tcp:HOST:PORT or vsock:PORT"
        )
    if kind == "unix":
        if not os.path.isabs(rest):
            raise ListenError(f"unix socket path must be absolute: {rest}")
        return Listen("unix", path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise ListenError(f"bad tcp address {addr!r}: use tcp:HOST:PORT")
        if not allow_remote and not _is_loopback(host):
            raise ListenError(
                f"refusing to listen on non-loopback {host}: the agent runs code for whoever "
                "holds the token; pass --allow-remote if you really mean it"
            )
        return Listen("tcp", host=host, port=int(port))
    if kind == "vsock":
        parts = rest.split(":")
        try:
            if len(parts) == 1:
                return Listen("vsock", port=int(parts[0]))
            if len(parts) == 2:
                return Listen("vsock", cid=int(parts[0]), port=int(parts[1]))
        except ValueError:
            pass
        raise ListenError(f"bad vsock address {addr!r}: use vsock:PORT or vsock:CID:PORT")
    raise ListenError(f"unknown listen scheme {kind!r} in {addr!r}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_unix(path: str, group: str | None) -> None:
    """Make the socket's directory private and clear a stale socket left by a crash."""
    parent = os.path.dirname(path)
    os.makedirs(parent, mode=0o750 if group else 0o700, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens
    else:
        raise ListenError(f"another process is already listening on {path}")
    finally:
        probe.close()


def finish_unix(path: str, group: str | None) -> None:
    """0600 by default; 0660 and the group's ownership with --socket-group."""
    if group:
        gid = grp.getgrnam(group).gr_gid
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    else:
        os.chmod(path, 0o600)


def bind(server: grpc.aio.Server, listen: Listen) -> None:
    """Bind a unix or tcp listener (vsock is relayed, see vsock.py)."""
    if listen.kind == "unix":
        # The socket is created by gRPC's core; a tight umask makes sure it is
        # never world-accessible, not even between bind() and our chmod.
        old = os.umask(0o177)
        try:
            server.add_insecure_port(f"unix:{listen.path}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on unix:{listen.path}: {exc}") from None
        finally:
            os.umask(old)
    elif listen.kind == "tcp":
        host = f"[{listen.host}]" if ":" in listen.host else listen.host
        try:
            port = server.add_insecure_port(f"{host}:{listen.port}")
        except RuntimeError as exc:
            raise ListenError(f"cannot listen on tcp:{listen.host}:{listen.port}: {exc}") from None
        if port == 0:
            raise ListenError(f"cannot listen on tcp:{listen.host}:{listen.port}")
