"""The agent's runtime configuration, built from the command line (see __main__)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cowork.defaults import KILL_GRACE_SECONDS


@dataclass
class AgentConfig:
    listen: list[str]
    token: bytes
    roots: list[str]
    unrestricted_files: bool = False
    socket_group: str | None = None
    allow_remote: bool = False
    kill_grace: float = KILL_GRACE_SECONDS
    claude_bin: str | None = None
    run_as: str | None = None
    # vsock: CIDs allowed to connect (None = any); default the host only (CID 2).
    vsock_peer_cids: list[int] | None = field(default_factory=lambda: [2])
    extra: dict[str, str] = field(default_factory=dict)
    # The second wall (guest_agent/sandbox.py): processes run as root only with allow_root.
    allow_root: bool = False
    policy_file: str | None = None
    # Built-in policy when policy_file is absent: sandbox none|bwrap.
    default_sandbox: str = "none"
    egress_log_file: str | None = None
    # Host name -> address the egress proxy dials instead of resolving the name.
    egress_resolve: dict[str, str] = field(default_factory=dict)
    # Give each run its own cgroup v2 with the policy's limits (when the host has v2).
    limits: bool = True
    # Extra CA certificates the API relay trusts for the API host (beside the system's).
    api_ca_file: str | None = None
    # Paths the sandbox hides (token file, sockets, logs): filled in by __main__.
    secret_paths: list[str] = field(default_factory=list)
