"""Agent.Info: what this agent is, what it can do, and the machine it runs on."""

from __future__ import annotations

import getpass
import os
import platform
import shutil
import socket
import time
from collections.abc import Awaitable, Callable

from cowork.agent.v1 import agent_pb2 as pb
from cowork.agent.v1 import agent_pb2_grpc as pb_grpc
from cowork.defaults import AGENT_VERSION, PROTOCOL_VERSION

from .paths import PathPolicy
from .rpc import Context

# What every agent serves. Capabilities that depend on the configuration or the
# machine (sandbox.bwrap, sandbox.egress, limits.cgroup2, listen.vsock, claude) are
# added only where they are configured and work: clients gate features on them.
CAPABILITIES = [
    "process.exec",
    "process.run",
    "process.pty",
    # ProcessSpec.limits is understood (enforced where "limits.cgroup2" is also listed;
    # an agent without it would run the process unlimited without a word).
    "process.limits",
    "files",
    # Files.Symlink and StatRequest.follow_symlinks.
    "files.symlink",
    "health",
    "reflection",
    "policy",
    "logs",
    # ProcessSpec.claude_relay: an Exec'd process (the interactive CLI) gets the Claude
    # credential through the API relay, never in its environment (exec_relay.py).
    "process.claude_relay",
]


def _meminfo() -> tuple[int, int]:
    total = avail = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == "MemTotal":
                    total = int(rest.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return total, avail


def _distro() -> str:
    try:
        with open("/etc/os-release") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return ""


class AgentService(pb_grpc.AgentServicer):
    def __init__(
        self,
        paths: PathPolicy,
        listeners: list[str],
        capabilities: list[str],
        claude_info: Callable[[], Awaitable[pb.ClaudeInfo | None]] | None = None,
    ) -> None:
        self.paths = paths
        self.listeners = listeners
        self.capabilities = capabilities
        self.started = time.monotonic()
        # Filled by the Claude service when it is registered (a callable returning ClaudeInfo).
        self.claude_info = claude_info
        # Filled by the server: identity and sandbox facts (field name -> value).
        self.sandbox_info: Callable[[], dict[str, object]] | None = None
        # Filled by the server: capabilities that hold right now (the policy can change).
        self.live_capabilities: Callable[[], Awaitable[list[str]]] | None = None

    async def Info(self, request: pb.InfoRequest, context: Context) -> pb.InfoResponse:
        total, avail = _meminfo()
        disk_free = 0
        if self.paths.roots:
            try:
                disk_free = shutil.disk_usage(self.paths.roots[0]).free
            except OSError:
                pass
        uname = platform.uname()
        user = getpass.getuser()
        capabilities = list(self.capabilities)
        if self.live_capabilities is not None:
            capabilities += await self.live_capabilities()
        resp = pb.InfoResponse(
            agent_version=AGENT_VERSION,
            protocol_version=PROTOCOL_VERSION,
            capabilities=capabilities,
            os=f"{uname.system} {uname.release}",
            distro=_distro(),
            arch=uname.machine,
            hostname=socket.gethostname(),
            cpus=os.cpu_count() or 0,
            memory_total_bytes=total,
            memory_available_bytes=avail,
            disk_free_bytes=disk_free,
            python_version=platform.python_version(),
            roots=[] if self.paths.unrestricted else self.paths.roots,
            files_unrestricted=self.paths.unrestricted,
            agent_user=user,
            run_as_user=user,
            uptime_seconds=time.monotonic() - self.started,
            listeners=self.listeners,
        )
        if self.sandbox_info is not None:
            for key, value in self.sandbox_info().items():
                setattr(resp, key, value)
        if self.claude_info is not None:
            info = await self.claude_info()
            if info is not None:
                resp.claude.CopyFrom(info)
        return resp
