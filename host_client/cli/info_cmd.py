"""`coworkctl info` and `coworkctl ping`."""

from __future__ import annotations

import argparse
from typing import Any

from .common import human_bytes, make_client, print_json


def register(sub: Any) -> None:
    p = sub.add_parser("info", help="agent and sandbox facts (versions, OS, resources)")
    p.set_defaults(func=cmd_info)
    h = sub.add_parser("ping", help="exit 0 when the agent answers its health check")
    h.add_argument("--wait", type=float, default=0, metavar="SECONDS", help="wait up to SECONDS")
    h.set_defaults(func=cmd_ping)


def cmd_info(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        info = client.info()
        info["credential"] = _credential(client, info)
    finally:
        client.close()
    if args.json:
        print_json(info)
        return 0
    claude = info.get("claude") or {}
    rows = [
        ("target", client.target.spec),
        ("agent", f"{info['agent_version']} (protocol {info['protocol_version']})"),
        ("os", f"{info['distro']} / {info['os']} {info['arch']}"),
        ("host", info["hostname"]),
        ("cpus", str(info["cpus"])),
        (
            "memory",
            f"{human_bytes(info['memory_available_bytes'])} free of "
            f"{human_bytes(info['memory_total_bytes'])}",
        ),
        ("disk free", human_bytes(info["disk_free_bytes"])),
        ("roots", "(unrestricted)" if info["files_unrestricted"] else ", ".join(info["roots"])),
        (
            "user",
            f"agent {info['agent_user']}, processes {info['run_as_user']}"
            + (f" ({info['identity_mode']})" if info.get("identity_mode") else ""),
        ),
        (
            "sandbox",
            f"{info.get('sandbox') or 'none'}"
            + (
                f" (seccomp, egress {info['egress_preset']} via {info['egress_proxy']})"
                if info.get("sandbox") == "bwrap"
                else ""
            ),
        ),
        ("claude", claude.get("version") or "not installed"),
        ("credential", _credential_line(info["credential"])),
        ("capabilities", ", ".join(info["capabilities"])),
        ("uptime", f"{info['uptime_seconds']:.0f}s"),
    ]
    for key, value in rows:
        print(f"{key:13} {value}")
    return 0


def _credential(client: Any, info: dict[str, Any]) -> dict[str, Any]:
    """Auth.Status (where the Claude credential lives), or {} from an agent without it."""
    if "auth" not in info.get("capabilities", ()):
        return {}
    from ..api.auth import Auth

    return Auth(client.connection).status()


def _credential_line(status: dict[str, Any]) -> str:
    if not status:
        return "agent predates held credentials: runs get the key in their environment"
    if not status.get("held"):
        return "none held (runs use the one their request carries; 'coworkctl auth set')"
    kind = "api key" if status.get("kind") == 1 else "oauth token"
    return f"{kind} for {status['base_url']}, held in the agent's memory only (never in a box)"


def cmd_ping(args: argparse.Namespace) -> int:
    from ..errors import AgentUnavailable

    client = make_client(args)
    try:
        if args.wait:
            try:
                client.wait_ready(args.wait)
                ok = True
            except AgentUnavailable:
                ok = False
        else:
            ok = client.health()
    finally:
        client.close()
    if args.json:
        print_json({"target": client.target.spec, "healthy": ok})
    else:
        print("ok" if ok else f"agent at {client.target.spec} is not answering")
    return 0 if ok else 1
