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
import re
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


# Limits of what each kind can address; a value past them would be wrapped or
# truncated somewhere below us (tcp:...:99999 used to dial port 34463).
MAX_TCP_PORT = 65535
# AF_VSOCK CIDs and ports are 32-bit; all ones is VMADDR_CID_ANY / VMADDR_PORT_ANY,
# which a connect() cannot name.
VSOCK_ANY = 0xFFFFFFFF
# sun_path is 108 bytes with the terminating NUL.
MAX_UNIX_PATH = 107
_LIMA_NAME = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*")
_USAGE = "use local, lima:NAME, unix:PATH, tcp:HOST:PORT, vsock:CID:PORT or hvsock:PATH:PORT"


def _number(spec: str, what: str, text: str, low: int, high: int) -> int:
    """`text` as a decimal integer in [low, high], or a TargetError naming the target."""
    if not (text.isascii() and text.isdigit()):
        raise TargetError(f"bad target {spec!r}: {what} must be a number, not {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise TargetError(f"bad target {spec!r}: {what} {value} is out of range ({low}..{high})")
    return value


def _socket_path(spec: str, path: str) -> str:
    if not path:
        raise TargetError(f"bad target {spec!r}: the socket path is empty")
    if "\x00" in path:
        raise TargetError(f"bad target {spec!r}: the socket path contains a NUL byte")
    if len(os.fsencode(path)) > MAX_UNIX_PATH:
        raise TargetError(
            f"bad target {spec!r}: the socket path is longer than {MAX_UNIX_PATH} bytes "
            "(a unix socket cannot have it)"
        )
    return path


def parse(spec: str | None = None) -> Target:
    """Parse a target string (None = COWORK_TARGET, then lima:$COWORK_VM_NAME).

    Every part is checked here, so a typo is one line naming the target, never a
    connection to somewhere else.
    """
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
        raise TargetError(f"bad target {spec!r}: {_USAGE}")
    if kind == "lima":
        if not _LIMA_NAME.fullmatch(rest):
            raise TargetError(
                f"bad target {spec!r}: a Lima instance name is letters and digits, "
                "optionally joined by '.', '_' or '-'"
            )
        return Target(
            "lima", spec, path=str(lima_socket(rest)), name=rest, token_file=str(lima_token(rest))
        )
    if kind == "unix":
        return Target("unix", spec, path=_socket_path(spec, rest))
    if kind == "tcp":
        host, colon, port = rest.rpartition(":")
        if not colon:
            raise TargetError(f"bad target {spec!r}: use tcp:HOST:PORT")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise TargetError(f"bad target {spec!r}: the host is empty (use tcp:HOST:PORT)")
        if any(c.isspace() or c in "[]/" for c in host):
            raise TargetError(f"bad target {spec!r}: {host!r} is not a host name or address")
        return Target("tcp", spec, host=host, port=_number(spec, "port", port, 1, MAX_TCP_PORT))
    if kind == "vsock":
        cid, colon, port = rest.partition(":")
        if not colon:
            raise TargetError(f"bad target {spec!r}: use vsock:CID:PORT")
        return Target(
            "vsock",
            spec,
            cid=_number(spec, "CID", cid, 0, VSOCK_ANY - 1),
            port=_number(spec, "port", port, 1, VSOCK_ANY - 1),
        )
    if kind == "hvsock":
        path, colon, port = rest.rpartition(":")
        if not colon:
            raise TargetError(f"bad target {spec!r}: use hvsock:PATH:PORT")
        return Target(
            "hvsock",
            spec,
            path=_socket_path(spec, path),
            port=_number(spec, "port", port, 1, VSOCK_ANY - 1),
        )
    raise TargetError(f"unknown target kind {kind!r} in {spec!r}: {_USAGE}")


def load_token(target: Target, token_file: str | None = None) -> bytes:
    """The token for `target`: --token-file, COWORK_TOKEN_FILE, COWORK_TOKEN, then the default."""
    path = token_file or os.environ.get("COWORK_TOKEN_FILE")
    if not path:
        env = os.environ.get("COWORK_TOKEN")
        if env:
            return _checked_token(os.fsencode(env.strip()), "COWORK_TOKEN")
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
    return _checked_token(token, f"token file {path}")


def _checked_token(token: bytes, where: str) -> bytes:
    """A token that can travel in gRPC metadata (printable ASCII), else one line saying so."""
    bad = next((i for i, b in enumerate(token) if not 0x20 <= b <= 0x7E), None)
    if bad is not None:
        raise TargetError(
            f"{where} does not hold a token: byte {bad} is {token[bad]:#04x}, and a token is "
            "printable ASCII (the agent writes hex); point --token-file at the agent's token"
        )
    return token
