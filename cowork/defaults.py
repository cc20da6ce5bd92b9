"""Defaults shared by the guest agent and the host client: the one place they live.

Everything here is part of how the two sides find and trust each other, so a
value changed here changes both. Deliberately import-free (no grpc) so the CLI
can read it on its fast path.
"""

from __future__ import annotations

import os
from pathlib import Path

AGENT_VERSION = "0.1.0"
# Bumped on every additive change to proto/ (see agent.proto).
PROTOCOL_VERSION = 8

# Auth: `authorization: Bearer <token>` on every RPC.
AUTH_METADATA_KEY = "authorization"
AUTH_SCHEME = "Bearer"
TOKEN_BYTES = 32

# Guest-side locations (what lima/ provisioning installs).
GUEST_WORKSPACE = "/workspace"
GUEST_STATE_DIR = "/run/cowork"
GUEST_SOCKET = "/run/cowork/agent.sock"
GUEST_TOKEN_FILE = "/etc/cowork/token"
GUEST_POLICY_FILE = "/etc/cowork/policy.yaml"
GUEST_EGRESS_LOG = "/var/log/cowork/egress.jsonl"
GUEST_INSTALL_DIR = "/opt/cowork"
VSOCK_PORT = 7070

# Host-side.
DEFAULT_VM_NAME = "cowork"
LIMA_HOST_SOCKET_NAME = "cowork-agent.sock"  # under {{.Dir}}/sock/
LIMA_TOKEN_NAME = "cowork-token"  # under the Lima instance dir, 0600

# Process handling.
KILL_GRACE_SECONDS = 1.0
OUTPUT_CHUNK = 64 * 1024
OUTPUT_QUEUE_CHUNKS = 16
# Process.Run answers both streams in one gRPC message: together they keep at
# most this much (the message cap less room for the rest). Exec streams any amount.
RUN_OUTPUT_LIMIT = 4 * 1024 * 1024
DEFAULT_TERM = "xterm-256color"

# Files.
FILE_CHUNK = 256 * 1024
MAX_FILE_CHUNK = 1024 * 1024
LIST_LIMIT = 100_000

# Audit records (log line and the in-memory ring behind `coworkctl logs`) keep
# at most this much of any one value: an exec with a 1 MB argv must not cost
# the agent 1 MB per remembered call. Status messages are cut the same way.
AUDIT_VALUE_CHARS = 1024
AUDIT_RECORD_CHARS = 8192
STATUS_MESSAGE_CHARS = 2048

# Log files the agent writes (the audit log with --log-file, the egress log) roll
# over at this size, keeping one older file: sandboxed code can make the agent log
# at will (every refused connection is a line), and must not fill the disk.
LOG_FILE_MAX_BYTES = 16 * 1024 * 1024

# gRPC message cap: a chunk plus framing, with room to spare.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024 + 64 * 1024


def state_dir() -> Path:
    """Per-user state directory of the embedded local agent (socket, token, log)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "cowork"


def local_socket() -> Path:
    return state_dir() / "agent.sock"


def local_token_file() -> Path:
    return state_dir() / "token"


def local_workspace() -> Path:
    """The local agent's workspace root (COWORK_WORKSPACE, as in the seed)."""
    return Path(os.environ.get("COWORK_WORKSPACE") or Path.home() / "cowork-workspace")


def lima_home() -> Path:
    return Path(os.environ.get("LIMA_HOME") or Path.home() / ".lima")


def vm_name() -> str:
    return os.environ.get("COWORK_VM_NAME") or DEFAULT_VM_NAME
