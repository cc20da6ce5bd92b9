"""In-process relay from a private unix socket to a vsock/hvsock target (vsock work)."""

from __future__ import annotations

from .targets import Target, TargetError


class Relay:
    """Listens on a private unix socket; each accepted connection is spliced to the guest."""

    def __init__(self, target: Target) -> None:
        raise TargetError(f"{target.kind}: targets are not supported by this client version yet")

    @property
    def address(self) -> str:
        raise NotImplementedError

    def close(self) -> None:
        pass
