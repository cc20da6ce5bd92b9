"""Opening gRPC channels to a Target, sync or async, with the options both clients share.

vsock:/hvsock: targets cannot be dialled by gRPC itself; for those a relay
(host_client.relay) listens on a private unix socket and splices each
connection to the guest, and the channel dials that socket instead.
"""

from __future__ import annotations

from typing import Any

import grpc

from cowork.defaults import MAX_MESSAGE_BYTES

from .targets import Target

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Spot a dead link (VM suspended, forward gone) within ~40 s even when idle.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A restarted agent is usually back within a second: reconnect quickly. Not
    # grpc.min_reconnect_backoff_ms: gRPC also takes it as each connection attempt's
    # deadline (20 s by default), and at 50 ms a busy agent's or a loaded machine's
    # handshake failed a call that cannot be retried ("timed out before receiving
    # SETTINGS frame"; tests/test_connect_slow_agent.py).
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 1_000),
    # Transparent retries would buffer client streams (uploads); the clients
    # retry explicitly where it is safe instead.
    ("grpc.enable_retries", 0),
]


class ChannelHandle:
    """A channel plus whatever keeps it reachable (a relay), closed together."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._relay: Any = None

    def address(self) -> str:
        if not self.target.needs_relay:
            return self.target.grpc_address
        if self._relay is None:
            from .relay import Relay

            self._relay = Relay(self.target)
        return str(self._relay.address)

    @property
    def relay(self) -> Any:
        """The relay of a vsock:/hvsock: target once it runs (host_client.relay.Relay), or None."""
        return self._relay

    def sync_channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address(), options=CHANNEL_OPTIONS)

    def aio_channel(self) -> grpc.aio.Channel:
        import grpc.aio

        return grpc.aio.insecure_channel(self.address(), options=CHANNEL_OPTIONS)

    def close(self) -> None:
        if self._relay is not None:
            self._relay.close()
            self._relay = None
