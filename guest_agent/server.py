"""Assembles the gRPC server: services, interceptor, health, reflection, listeners."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cowork.agent.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    claude_pb2,
    files_pb2,
    files_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)
from cowork.defaults import MAX_MESSAGE_BYTES

from . import claude, listeners
from .config import AgentConfig
from .files import FilesService
from .info import CAPABILITIES, AgentService
from .paths import PathPolicy
from .process import ProcessService
from .rpc import AgentInterceptor

log = logging.getLogger("cowork.agent")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping every 30 s to spot dead links; allow it without data.
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.so_reuseport", 0),
]


class AgentServer:
    """A configured, not yet started agent; create it inside the event loop that will run it."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.listens = [listeners.parse(a, cfg.allow_remote) for a in cfg.listen]
        if not self.listens:
            raise listeners.ListenError("no --listen address given")
        self.paths = PathPolicy(cfg.roots, cfg.unrestricted_files)
        self.server = grpc.aio.server(
            interceptors=[AgentInterceptor(cfg.token)], options=SERVER_OPTIONS
        )
        caps = list(CAPABILITIES)
        self.agent = AgentService(self.paths, [str(x) for x in self.listens], caps)
        agent_pb2_grpc.add_AgentServicer_to_server(self.agent, self.server)
        process_pb2_grpc.add_ProcessServicer_to_server(
            ProcessService(self.paths, cfg.kill_grace), self.server
        )
        files_pb2_grpc.add_FilesServicer_to_server(FilesService(self.paths), self.server)
        claude.register(self.server, cfg, self.paths, self.agent)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [
            agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
            process_pb2.DESCRIPTOR.services_by_name["Process"].full_name,
            files_pb2.DESCRIPTOR.services_by_name["Files"].full_name,
            claude_pb2.DESCRIPTOR.services_by_name["Claude"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self.server)
        self._relays: list[object] = []

    async def start(self) -> None:
        for listen in self.listens:
            if listen.kind == "unix":
                listeners.prepare_unix(listen.path, self.cfg.socket_group)
            if listen.kind in ("unix", "tcp"):
                listeners.bind(self.server, listen)
        vsocks = [x for x in self.listens if x.kind == "vsock"]
        if vsocks:
            from . import vsock

            self._relays = await vsock.start_relays(self.server, vsocks)
        await self.server.start()
        for listen in self.listens:
            if listen.kind == "unix":
                listeners.finish_unix(listen.path, self.cfg.socket_group)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", ", ".join(str(x) for x in self.listens))

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        for relay in self._relays:
            close = getattr(relay, "close", None)
            if close is not None:
                close()
        await self.server.stop(grace)

    async def serve_forever(self) -> None:
        await self.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        wait = asyncio.ensure_future(self.server.wait_for_termination())
        halt = asyncio.ensure_future(stop.wait())
        await asyncio.wait([wait, halt], return_when=asyncio.FIRST_COMPLETED)
        if halt.done():
            log.info("stopping")
            await self.stop()
        wait.cancel()
        halt.cancel()
