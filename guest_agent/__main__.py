"""`cowork-agent` / `python -m guest_agent`: the command line of the guest agent."""

from __future__ import annotations

import argparse
import asyncio
import os
import stat
import sys
from typing import TYPE_CHECKING

from cowork.defaults import (
    AGENT_VERSION,
    GUEST_POLICY_FILE,
    GUEST_WORKSPACE,
    KILL_GRACE_SECONDS,
)

if TYPE_CHECKING:
    from .config import AgentConfig

# AF_VSOCK CIDs are 32-bit; all ones is VMADDR_CID_ANY (not a peer). 2 is the host.
VMADDR_CID_ANY = 0xFFFFFFFF
VMADDR_CID_HOST = 2

EPILOG = """\
listen addresses (repeatable):
  unix:PATH         unix socket, created 0600 (0660 + group with --socket-group)
  tcp:HOST:PORT     TCP; only loopback hosts unless --allow-remote
  vsock:PORT        AF_VSOCK on any CID (relayed into the gRPC server; see docs)
  vsock:CID:PORT    AF_VSOCK on one CID

every RPC needs the metadata 'authorization: Bearer <token>' where <token> is
the content of --token-file (only grpc.health.v1.Health is open).

example:
  cowork-agent --listen unix:/run/cowork/agent.sock --token-file /etc/cowork/token \\
               --root /workspace --log-format json
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cowork-agent",
        description="The cowork guest agent: runs processes, moves files and drives Claude Code "
        "inside the sandbox VM for an authenticated host client.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--listen",
        action="append",
        default=[],
        metavar="ADDR",
        help="address to serve on (repeatable; see below)",
    )
    p.add_argument(
        "--token-file",
        required=True,
        metavar="PATH",
        help="file holding the shared secret (must not be world-readable)",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="DIR",
        help=f"workspace root the Files service is confined to (repeatable; "
        f"default {GUEST_WORKSPACE})",
    )
    p.add_argument(
        "--unrestricted-files",
        action="store_true",
        help="let Files RPCs reach any path (no confinement)",
    )
    p.add_argument(
        "--socket-group",
        metavar="GROUP",
        help="make unix sockets 0660 and owned by GROUP (e.g. for Lima's forwarder)",
    )
    p.add_argument(
        "--allow-remote", action="store_true", help="allow tcp: listeners on non-loopback addresses"
    )
    p.add_argument(
        "--kill-grace",
        type=float,
        default=KILL_GRACE_SECONDS,
        metavar="SECONDS",
        help="time between SIGTERM and SIGKILL when a process group is stopped",
    )
    p.add_argument(
        "--claude-bin",
        metavar="PATH",
        help="Claude Code CLI to run (default: $COWORK_CLAUDE_BIN, then PATH)",
    )
    p.add_argument(
        "--run-as",
        metavar="USER",
        help="run every process and Claude Code as this unprivileged user (agent must be root)",
    )
    p.add_argument(
        "--allow-root",
        action="store_true",
        help="let processes run as root when the agent is root and no --run-as is given "
        "(otherwise the agent refuses to start as root without --run-as)",
    )
    p.add_argument(
        "--policy",
        metavar="PATH",
        help=f"sandbox policy YAML (default {GUEST_POLICY_FILE} when it exists; "
        "Policy.Set writes it)",
    )
    p.add_argument(
        "--sandbox",
        choices=["none", "bwrap"],
        default="none",
        help="sandbox when the policy file sets none (default none; lima provisioning "
        "writes a policy with bwrap)",
    )
    p.add_argument(
        "--no-limits",
        action="store_true",
        help="do not put runs in cgroups (by default, on a cgroup v2 host, each exec and "
        "Claude run gets its own cgroup with the policy's memory/pids/cpu limits)",
    )
    p.add_argument(
        "--egress-log", metavar="PATH", help="append the egress proxy's log here (JSON lines)"
    )
    p.add_argument(
        "--egress-resolve",
        action="append",
        default=[],
        metavar="NAME=ADDR",
        help="make the egress proxy dial ADDR for host NAME, after the policy allowed NAME "
        "(repeatable; for tests and split-horizon setups, like curl --resolve)",
    )
    p.add_argument(
        "--api-ca-cert",
        metavar="PATH",
        help="PEM CA certificate(s) the Claude API relay trusts for the API host, beside the "
        "system's (a TLS-inspecting gateway, or tests); verification is never off",
    )
    p.add_argument(
        "--vsock-peer-cid",
        action="append",
        type=int,
        default=[],
        metavar="CID",
        help="accept vsock connections only from this CID (repeatable; default 2 = the host)",
    )
    p.add_argument(
        "--vsock-any-peer",
        action="store_true",
        help="accept vsock connections from any CID (e.g. sibling VMs: only with a reason)",
    )
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-file", metavar="PATH", help="write logs here instead of stderr")
    p.add_argument("--version", action="version", version=f"cowork-agent {AGENT_VERSION}")
    return p


def read_token(path: str) -> bytes:
    """Read the shared secret, refusing files other users could read."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise SystemExit(f"cowork-agent: cannot read token file {path}: {exc.strerror}") from None
    if st.st_mode & stat.S_IROTH:
        raise SystemExit(f"cowork-agent: token file {path} is world-readable; chmod 600 it")
    if len(token) < 16:
        raise SystemExit(f"cowork-agent: token in {path} is too short (need >= 16 bytes)")
    if not all(0x21 <= b <= 0x7E for b in token):
        # gRPC metadata carries printable ASCII only: no client could ever send this token.
        raise SystemExit(
            f"cowork-agent: token in {path} is not printable ASCII (write e.g. "
            "'openssl rand -hex 32' into it)"
        )
    return token


def parse_resolve(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, addr = item.partition("=")
        if not sep or not name or not addr:
            raise SystemExit(f"cowork-agent: --egress-resolve wants NAME=ADDR, not {item!r}")
        out[name.strip().lower().rstrip(".")] = addr.strip()
    return out


def secret_paths(args: argparse.Namespace) -> list[str]:
    """Directories (or files) the sandbox must hide: where the agent keeps what is its own."""
    out = [os.path.abspath(args.token_file)]
    for a in args.listen:
        if a.startswith("unix:"):
            out.append(os.path.dirname(os.path.abspath(a[5:])))
    for f in (args.log_file, args.egress_log, args.policy):
        if f:
            out.append(os.path.abspath(f))
    return out


def api_ca_file(path: str | None) -> str | None:
    """--api-ca-cert, checked now: a file that cannot be loaded fails the start in one line."""
    if not path:
        return None
    import ssl

    try:
        ssl.create_default_context().load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise SystemExit(f"cowork-agent: --api-ca-cert {path}: {exc}") from None
    return os.path.abspath(path)


def vsock_peers(args: argparse.Namespace) -> list[int] | None:
    """The CIDs allowed to connect over vsock (None = any), checked like every other flag."""
    if args.vsock_any_peer:
        if args.vsock_peer_cid:
            raise SystemExit("cowork-agent: --vsock-any-peer and --vsock-peer-cid contradict")
        return None
    for cid in args.vsock_peer_cid:
        if not 0 <= cid < VMADDR_CID_ANY:
            raise SystemExit(
                f"cowork-agent: --vsock-peer-cid {cid} is not a CID (0..{VMADDR_CID_ANY - 1})"
            )
    return sorted(set(args.vsock_peer_cid)) or [VMADDR_CID_HOST]


def config_from_args(args: argparse.Namespace) -> AgentConfig:
    """The AgentConfig the command line asks for; SystemExit with one line when it cannot be."""
    from .config import AgentConfig

    if args.kill_grace < 0:
        raise SystemExit("cowork-agent: --kill-grace must be >= 0")
    roots = args.root or [GUEST_WORKSPACE]
    if not args.unrestricted_files:
        for r in roots:
            if not os.path.isdir(r):
                raise SystemExit(f"cowork-agent: workspace root is not a directory: {r}")
    return AgentConfig(
        listen=args.listen,
        token=read_token(args.token_file),
        roots=roots,
        unrestricted_files=args.unrestricted_files,
        socket_group=args.socket_group,
        allow_remote=args.allow_remote,
        kill_grace=args.kill_grace,
        claude_bin=args.claude_bin or os.environ.get("COWORK_CLAUDE_BIN"),
        run_as=args.run_as,
        vsock_peer_cids=vsock_peers(args),
        allow_root=args.allow_root,
        policy_file=args.policy
        or (GUEST_POLICY_FILE if os.path.exists(GUEST_POLICY_FILE) else None),
        default_sandbox=args.sandbox,
        limits=not args.no_limits,
        egress_log_file=args.egress_log,
        egress_resolve=parse_resolve(args.egress_resolve),
        api_ca_file=api_ca_file(args.api_ca_cert),
        secret_paths=secret_paths(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from . import logs
    from .listeners import ListenError
    from .server import AgentServer, StartError

    logs.setup(args.log_format, args.log_level, args.log_file)
    cfg = config_from_args(args)

    async def serve() -> None:
        # grpc.aio binds its server to the running loop: build it inside it.
        await AgentServer(cfg).serve_forever()

    try:
        asyncio.run(serve())
    except StartError as exc:
        print(f"cowork-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except ListenError as exc:
        print(f"cowork-agent: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
