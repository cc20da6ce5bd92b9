"""AF_VSOCK listener (relayed into the gRPC server). Implemented by the vsock work; see --help."""

from __future__ import annotations

from collections.abc import Sequence

import grpc.aio

from .listeners import Listen, ListenError


async def start_relays(server: grpc.aio.Server, listens: Sequence[Listen]) -> list[object]:
    raise ListenError(
        "vsock listeners are not implemented yet in this agent version "
        f"({', '.join(str(x) for x in listens)}); use unix: or tcp:"
    )
