"""Claude service registration (Claude.Ask / Claude.Version)."""

from __future__ import annotations

import grpc.aio

from .config import AgentConfig
from .info import AgentService
from .paths import PathPolicy


def register(
    server: grpc.aio.Server, cfg: AgentConfig, paths: PathPolicy, agent: AgentService
) -> None:
    """Add the Claude service to `server` and tell Agent.Info how to report the CLI."""
