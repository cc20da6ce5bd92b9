"""`coworkctl auth set|status|clear`: the Claude API credential the agent holds for runs.

The agent keeps it in memory only (never on disk, never in a box): runs get a
placeholder, and the agent adds the credential on the way to the API. A
restarted agent has forgotten it; `auth status` says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .common import EXIT_USAGE, fail, make_client, print_json

KIND_NAMES = {1: "api key", 2: "oauth token"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "auth",
        help="hold the Claude API credential in the agent (memory only; runs never see it)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    asub = p.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    s = asub.add_parser(
        "set",
        help="hold a credential: $ANTHROPIC_API_KEY, else $CLAUDE_CODE_OAUTH_TOKEN, or --stdin",
    )
    s.add_argument(
        "--stdin", action="store_true", help="read the credential from stdin (first line)"
    )
    s.add_argument(
        "--kind",
        choices=["api_key", "oauth_token"],
        help="with --stdin: what it is (default: oauth_token for sk-ant-oat…, else api_key)",
    )
    s.add_argument(
        "--base-url",
        metavar="URL",
        help="API base URL (default $ANTHROPIC_BASE_URL, else https://api.anthropic.com)",
    )
    s.set_defaults(func=cmd_set)
    st = asub.add_parser("status", help="whether the agent holds one, which kind, and where")
    st.set_defaults(func=cmd_status)
    c = asub.add_parser("clear", help="make the agent forget the credential")
    c.set_defaults(func=cmd_clear)


def _auth(args: argparse.Namespace) -> tuple[Any, Any]:
    from ..api.auth import Auth

    client = make_client(args)
    return client, Auth(client.connection)


def _secret(args: argparse.Namespace) -> tuple[str, str]:
    if args.stdin:
        line = sys.stdin.readline().strip()
        if not line:
            fail("auth set --stdin: stdin held no credential")
        kind = args.kind or ("oauth_token" if line.startswith("sk-ant-oat") else "api_key")
        return kind, line
    if args.kind:
        fail("auth set: --kind goes with --stdin", EXIT_USAGE)
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "api_key", os.environ["ANTHROPIC_API_KEY"]
    if os.environ.get("CLAUDE_CODE_OAUTH_TOKEN"):
        return "oauth_token", os.environ["CLAUDE_CODE_OAUTH_TOKEN"]
    fail(
        "auth set: no credential: set ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN, "
        "or pipe one in with --stdin"
    )


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _show(args: argparse.Namespace, status: dict[str, Any]) -> None:
    if args.json:
        out = dict(status)
        out["kind"] = KIND_NAMES.get(status.get("kind", 0), "")
        print_json(out)
        return
    if not status.get("held"):
        print("held         no")
        print(f"where        {status.get('where', '')}")
        return
    rows = [
        ("held", f"yes, for the {status['scope']}"),
        ("kind", f"{KIND_NAMES.get(status['kind'], '?')} (sent as {status['header']})"),
        ("api", status["base_url"]),
        ("set", _when(status["set_at"])),
        ("fingerprint", status["fingerprint"]),
        ("where", status["where"]),
    ]
    for key, value in rows:
        print(f"{key:12} {value}")


def cmd_set(args: argparse.Namespace) -> int:
    kind, secret = _secret(args)
    base_url = (
        args.base_url if args.base_url is not None else os.environ.get("ANTHROPIC_BASE_URL", "")
    )
    client, auth = _auth(args)
    try:
        _show(args, auth.set(kind, secret, base_url))
    finally:
        client.close()
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    client, auth = _auth(args)
    try:
        _show(args, auth.status())
    finally:
        client.close()
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    client, auth = _auth(args)
    try:
        _show(args, auth.clear())
    finally:
        client.close()
    return 0
