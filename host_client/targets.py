"""Where the agent is: parsing `--target` strings and finding the token that goes with them.

Kept free of grpc imports so `coworkctl --help` and usage errors stay instant.

Targets:
  local               the embedded agent on this host (`coworkctl local up`)
  lima:NAME           the socket Lima forwards from the VM NAME
  unix:PATH           a unix socket
  tcp:HOST:PORT       TCP (tests, or a forwarded port)
  vsock:CID:PORT      Linux AF_VSOCK to a guest (relayed in-process)
  hvsock:PATH:PORT    hybrid vsock unix socket (Firecracker, Cloud Hypervisor, vhost-device-vsock)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cowork import defaults


class TargetError(ValueError):
    """A target string or token location that cannot be used; the message says why."""


@dataclass(frozen=True)
class Target:
    kind: str  # local | lima | unix | tcp | vsock | hvsock
    spec: str  # as the user wrote it
    path: str = ""  # unix socket path (local, lima, unix, hvsock)
    host: str = ""
    port: int = 0
    cid: int = 0
    name: str = ""  # lima instance name
    token_file: str = ""  # default token location for this kind ("" = none)

    @property
    def grpc_address(self) -> str:
        """The address gRPC dials directly (vsock/hvsock go through a relay instead)."""
        if self.kind in ("local", "lima", "unix"):
            return f"unix:{self.path}"
        if self.kind == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.port}"
        raise TargetError(f"{self.spec} needs an in-process relay")

    @property
    def needs_relay(self) -> bool:
        return self.kind in ("vsock", "hvsock")


def lima_socket(name: str) -> Path:
    return defaults.lima_home() / name / "sock" / defaults.LIMA_HOST_SOCKET_NAME


def lima_token(name: str) -> Path:
    return defaults.lima_home() / name / defaults.LIMA_TOKEN_NAME


def default_target_spec() -> str:
    return os.environ.get("COWORK_TARGET") or f"lima:{defaults.vm_name()}"


def parse(spec: str | None = None) -> Target:
    """Parse a target string (None = COWORK_TARGET, then lima:$COWORK_VM_NAME)."""
    spec = spec or default_target_spec()
    if spec == "local":
        return Target(
            "local",
            spec,
            path=str(defaults.local_socket()),
            token_file=str(defaults.local_token_file()),
        )
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise TargetError(
            f"bad target {spec!r}: use local, lima:NAME, unix:PATH, tcp:HOST:PORT, "
            "vsock:CID:PORT or hvsock:PATH:PORT"
        )
    if kind == "lima":
        return Target(
            "lima", spec, path=str(lima_socket(rest)), name=rest, token_file=str(lima_token(rest))
        )
    if kind == "unix":
        return Target("unix", spec, path=rest)
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit():
            raise TargetError(f"bad target {spec!r}: use tcp:HOST:PORT")
        return Target("tcp", spec, host=host.strip("[]"), port=int(port))
    if kind == "vsock":
        cid, _, port = rest.partition(":")
        if not cid.isdigit() or not port.isdigit():
            raise TargetError(f"bad target {spec!r}: use vsock:CID:PORT")
        return Target("vsock", spec, cid=int(cid), port=int(port))
    if kind == "hvsock":
        path, _, port = rest.rpartition(":")
        if not path or not port.isdigit():
            raise TargetError(f"bad target {spec!r}: use hvsock:PATH:PORT")
        return Target("hvsock", spec, path=path, port=int(port))
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}")


def load_token(target: Target, token_file: str | None = None) -> bytes:
    """The token for `target`: --token-file, COWORK_TOKEN_FILE, COWORK_TOKEN, then the default."""
    path = token_file or os.environ.get("COWORK_TOKEN_FILE")
    if not path:
        env = os.environ.get("COWORK_TOKEN")
        if env:
            return env.strip().encode()
        path = target.token_file
    if not path:
        raise TargetError(f"no token for {target.spec}: pass --token-file or set COWORK_TOKEN_FILE")
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except FileNotFoundError:
        hint = ""
        if target.kind == "local":
            hint = " (start the local agent with 'coworkctl local up')"
        elif target.kind == "lima":
            hint = f" (create the VM with 'coworkctl init --name {target.name}')"
        raise TargetError(f"token file not found: {path}{hint}") from None
    except OSError as exc:
        raise TargetError(f"cannot read token file {path}: {exc.strerror}") from None
    if not token:
        raise TargetError(f"token file is empty: {path}")
    return token
