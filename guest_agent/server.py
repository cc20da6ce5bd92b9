"""Assembles the gRPC server: services, interceptor, health, reflection, listeners."""

from __future__ import annotations

import asyncio
import logging
import signal
import subprocess
from typing import TYPE_CHECKING

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from cowork.agent.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    auth_pb2,
    auth_pb2_grpc,
    box_pb2,
    box_pb2_grpc,
    claude_pb2,
    files_pb2,
    files_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)
from cowork.dataplane import CAPABILITY as DATA_PLANE_CAPABILITY
from cowork.dataplane import data_socket_path
from cowork.defaults import MAX_MESSAGE_BYTES

from . import claude, listeners, reaper
from . import policy as pol
from .api_relay import ApiRelay
from .boxes import Boxes, BoxService
from .cgroups import Cgroups
from .config import AgentConfig
from .credentials import AuthService, CredentialStore
from .dataplane import DataPlane, UnixDataListener
from .egress import EgressLog, EgressProxy, public_resolver
from .errors import AgentError
from .files import FilesService
from .info import CAPABILITIES, AgentService
from .paths import PathPolicy
from .policy_service import AuditRing, PolicyService, PolicyStore
from .process import ProcessService
from .rpc import AgentInterceptor
from .runs import Runs
from .sandbox import PROXY_URL, Sandbox, install_dir, require_tool, resolve_identity

if TYPE_CHECKING:
    from .vsock import VsockRelays

log = logging.getLogger("cowork.agent")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Clients ping every 30 s to spot dead links; allow it without data. The
    # *receiving* side's minimum interval is its own option (default 5 min): without
    # it, a client's ping while the agent had sent no data for a while (long
    # commands, a loaded guest) counted as abuse, and grpc cancelled every call in
    # flight on that connection (50 concurrent execs under load: CANCELLED at 30 s).
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.so_reuseport", 0),
]


def bwrap_works() -> bool:
    """Whether bubblewrap is installed and can build a box like the sandbox's on this kernel
    (a container without user namespaces has the binary but cannot use it)."""
    try:
        exe = require_tool("bwrap")
    except AgentError:
        return False
    probe = [exe, "--die-with-parent", "--unshare-pid", "--unshare-net", "--unshare-ipc"]
    probe += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--", "true"]
    try:
        # A session of its own, like a run's: with --unshare-pid, bwrap's box init
        # outlives the outer bwrap for a moment and is re-parented to the agent (a
        # subreaper), whose sweep reaps only what is outside the agent's session.
        # In the agent's session it stayed a zombie for the agent's whole life.
        done = subprocess.run(
            probe, capture_output=True, timeout=10, check=False, start_new_session=True
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("bwrap does not work here: %s", exc)
        return False
    if done.returncode != 0:
        reason = done.stderr.decode("utf-8", "replace").strip() or f"exit {done.returncode}"
        log.warning("bwrap does not work here: %s", reason)
    return done.returncode == 0


class Health(HealthServicer):  # type: ignore[misc]
    """The standard async health servicer, plus List (grpcio's async one lacks it, so every
    List call failed): the status of each service the agent reports on."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: object
    ) -> health_pb2.HealthListResponse:
        statuses = getattr(self, "_server_status", {})
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in statuses.items()
            }
        )


class StartError(Exception):
    """The configuration cannot be served safely (e.g. root without --run-as); one line."""


class AgentServer:
    """A configured, not yet started agent; create it inside the event loop that will run it."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.listens = [listeners.parse(a, cfg.allow_remote) for a in cfg.listen]
        if not self.listens:
            raise listeners.ListenError("no --listen address given")
        self.paths = PathPolicy(cfg.roots, cfg.unrestricted_files)
        try:
            self.identity = resolve_identity(cfg.run_as, cfg.allow_root)
            self.policy = PolicyStore(cfg.policy_file, pol.Policy(sandbox=cfg.default_sandbox))
        except AgentError as exc:
            raise StartError(exc.message) from None
        except (OSError, ValueError) as exc:
            raise StartError(f"policy {cfg.policy_file}: {exc}") from None
        self.egress_log = EgressLog(path=cfg.egress_log_file)
        self.egress = EgressProxy(
            lambda: self.policy.current.egress(),
            self.egress_log,
            public_resolver(cfg.egress_resolve),
        )
        # The Claude API credential (memory only) and the relay that adds it to runs' calls.
        self.credentials = CredentialStore()
        self.relay = ApiRelay(
            lambda: self.policy.current.egress(),
            self.egress_log,
            public_resolver(cfg.egress_resolve),
            cfg.egress_resolve,
            cfg.api_ca_file,
        )
        self.sandbox = Sandbox(
            identity=self.identity,
            roots=list(self.paths.roots),
            mode=lambda: self.policy.current.sandbox,
            hidden=list(cfg.secret_paths),
            proxy_handler=self.egress.handle,
            cgroups=Cgroups.setup() if cfg.limits else Cgroups(None, "disabled (--no-limits)"),
            limits=lambda: (self.policy.current.limits, self.policy.current.max_limits),
            read_only=[install_dir(cfg.claude_bin)] if cfg.claude_bin else [],
        )
        self.audit_ring = AuditRing()
        self.server = grpc.aio.server(
            interceptors=[AgentInterceptor(cfg.token)], options=SERVER_OPTIONS
        )
        caps = [*CAPABILITIES, "auth"]  # Auth: the Claude credential, held in memory
        if any(x.kind == "vsock" for x in self.listens):
            caps.append("listen.vsock")
        if any(x.kind in ("unix", "vsock") for x in self.listens):
            caps.append(DATA_PLANE_CAPABILITY)
        if self.sandbox.cgroups is not None and self.sandbox.cgroups.available:
            caps.append("limits.cgroup2")
        self.agent = AgentService(self.paths, [str(x) for x in self.listens], caps)
        self.agent.sandbox_info = self._sandbox_info
        self.agent.live_capabilities = self._live_capabilities
        self._bwrap_works: bool | None = None
        agent_pb2_grpc.add_AgentServicer_to_server(self.agent, self.server)
        # Runs with ids; detached runs' journals beside the reaper's state file.
        state_file = reaper.state_file_for(cfg.listen, reaper.default_run_dir())
        self.runs = Runs(
            state_file.removesuffix(".runs.json") + ".journal", lambda: self.policy.current.runs
        )
        caps.append("runs")
        # Named boxes: long-lived sandboxes that runs join (ProcessSpec.box).
        self.boxes = Boxes(
            self.sandbox,
            lambda: self.policy.current.boxes,
            lambda: self.paths.default_dir,
            self.relay,
        )
        caps.append("boxes")
        box_pb2_grpc.add_BoxServicer_to_server(BoxService(self.boxes), self.server)
        process_pb2_grpc.add_ProcessServicer_to_server(
            ProcessService(
                self.paths,
                cfg.kill_grace,
                self.sandbox,
                self.runs,
                relay=self.relay,
                credentials=self.credentials,
                boxes=self.boxes,
            ),
            self.server,
        )
        files = FilesService(
            self.paths, owner=self.identity.user if self.identity.mode == "user" else None
        )
        files_pb2_grpc.add_FilesServicer_to_server(files, self.server)
        # File bytes on connections of their own (guest_agent/dataplane.py).
        self.dataplane = DataPlane(files, cfg.token)
        self.data_listeners: list[UnixDataListener] = []
        policy_pb2_grpc.add_PolicyServicer_to_server(
            PolicyService(self.policy, self.audit_ring, self.egress_log), self.server
        )
        claude.register(
            self.server,
            cfg,
            self.paths,
            self.agent,
            self.sandbox,
            self.relay,
            self.credentials,
            self.runs,
            self.boxes,
        )
        auth_pb2_grpc.add_AuthServicer_to_server(AuthService(self.credentials), self.server)
        self.health = Health()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = [
            agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name,
            process_pb2.DESCRIPTOR.services_by_name["Process"].full_name,
            box_pb2.DESCRIPTOR.services_by_name["Box"].full_name,
            files_pb2.DESCRIPTOR.services_by_name["Files"].full_name,
            claude_pb2.DESCRIPTOR.services_by_name["Claude"].full_name,
            policy_pb2.DESCRIPTOR.services_by_name["Policy"].full_name,
            auth_pb2.DESCRIPTOR.services_by_name["Auth"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ]
        reflection.enable_server_reflection(names, self.server)
        # The vsock relays (vsock.VsockRelays) once started; each decides which peers it accepts.
        self.relays: list[VsockRelays] = []

    async def _live_capabilities(self) -> list[str]:
        """sandbox.bwrap and sandbox.egress while the policy in force boxes runs and bwrap
        can actually build a box here (tried once; the egress proxy lives inside the box)."""
        if self.policy.current.sandbox != "bwrap":
            return []
        if self._bwrap_works is None:
            loop = asyncio.get_running_loop()
            self._bwrap_works = await loop.run_in_executor(None, bwrap_works)
        return ["sandbox.bwrap", "sandbox.egress"] if self._bwrap_works else []

    def _sandbox_info(self) -> dict[str, object]:
        p = self.policy.current
        boxed = p.sandbox == "bwrap"
        return {
            "identity_mode": self.identity.mode,
            "run_as_user": self.identity.user.name,
            "sandbox": p.sandbox,
            "seccomp": boxed,
            "egress_preset": p.preset,
            "egress_proxy": PROXY_URL if boxed else "",
            "limits": self.sandbox.cgroups.describe() if self.sandbox.cgroups else "",
        }

    async def start(self) -> None:
        self.audit_ring.install(asyncio.get_running_loop())
        for listen in self.listens:
            if listen.kind == "unix":
                listeners.prepare_unix(listen.path, self.cfg.socket_group)
            if listen.kind in ("unix", "tcp"):
                listeners.bind(self.server, listen)
            if listen.kind == "unix":
                data_path = data_socket_path(listen.path)
                listeners.prepare_unix(data_path, self.cfg.socket_group)
                self.data_listeners.append(UnixDataListener(self.dataplane, data_path))
        vsocks = [x for x in self.listens if x.kind == "vsock"]
        if vsocks:
            from . import vsock

            self.relays = await vsock.start_relays(
                self.server,
                vsocks,
                self.cfg.vsock_peer_cids,
                divert=lambda conn, addr: self.dataplane.serve(conn, f"vsock:{addr}"),
            )
        # Subreaper, guardian and a previous life's leftovers: before any run can start.
        reaper.REAPER.install(reaper.state_file_for(self.cfg.listen, reaper.default_run_dir()))
        try:
            self.runs.load()
        except OSError as exc:
            log.warning("run journals at %s: %s (detach is not available)", self.runs.dir, exc)
            self.runs.dir = None
        await self.server.start()
        for listen in self.listens:
            if listen.kind == "unix":
                listeners.finish_unix(listen.path, self.cfg.socket_group)
        for dl in self.data_listeners:
            listeners.finish_unix(dl.path, self.cfg.socket_group)
            dl.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s", ", ".join(str(x) for x in self.listens))

    async def stop(self, grace: float = 2.0) -> None:
        self.audit_ring.uninstall()
        await self.health.enter_graceful_shutdown()
        for relay in self.relays:
            relay.close()
        for dl in self.data_listeners:
            dl.close()
        # New calls are refused at once; Claude runs end with a cancelled ErrorEvent
        # (sent within the grace period) instead of a bare CANCELLED status.
        await asyncio.gather(
            claude.cancel_all("the agent is shutting down"),
            self.runs.close(),
            self.server.stop(grace),
        )
        await self.boxes.close()
        await self.relay.aclose()
        reaper.REAPER.close()

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
