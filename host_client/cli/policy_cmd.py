"""`coworkctl policy ...` and `coworkctl logs`: the sandbox policy and the agent's logs."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .common import EXIT_USAGE, fail, make_client, print_json

POLICY_EPILOG = """\
the policy (YAML, /etc/cowork/policy.yaml in the VM):
  sandbox: bwrap                 # none | bwrap
  network:
    preset: default              # default (Claude Code, npm, PyPI, GitHub) | offline
    allow: [example.com, "*.example.org"]   # *.x = subdomains of x
    deny: [evil.example.com]     # checked first
  limits: {memory: 2GiB, pids: 1024, cpus: 2, max: {memory: 8GiB, pids: 4096, cpus: 4}}

examples:
  coworkctl policy show
  coworkctl policy allow api.example.com
  coworkctl policy preset offline        # nothing leaves the sandbox
  coworkctl policy set my-policy.yaml    # replace it (validated; bad keys are named)
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="show or change the sandbox policy (network allow/deny, sandbox, limits)",
        epilog=POLICY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ps = p.add_subparsers(dest="policy_command", metavar="ACTION")
    show = ps.add_parser("show", help="print the policy in force (YAML; --json for details)")
    show.set_defaults(func=cmd_policy, action="show")
    s = ps.add_parser("set", help="replace the policy with a YAML file ('-' = stdin)")
    s.add_argument("file")
    s.set_defaults(func=cmd_policy, action="set")
    a = ps.add_parser("allow", help="allow a domain (`*.example.com` = its subdomains)")
    a.add_argument("domain")
    a.set_defaults(func=cmd_policy, action="allow")
    d = ps.add_parser("deny", help="deny a domain (deny wins over allow)")
    d.add_argument("domain")
    d.set_defaults(func=cmd_policy, action="deny")
    pr = ps.add_parser("preset", help="network preset: default or offline (clears allow/deny)")
    pr.add_argument("name", choices=["default", "offline"])
    pr.set_defaults(func=cmd_policy, action="preset")
    p.set_defaults(func=_policy_usage)

    lg = sub.add_parser("logs", help="the agent's RPC audit log, or its egress log with --net")
    lg.add_argument("--net", action="store_true", help="the egress proxy's log instead")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new entries")
    lg.add_argument("-n", "--tail", type=int, default=100, metavar="N", help="recent entries")
    lg.set_defaults(func=cmd_logs)


def _policy_usage(args: argparse.Namespace) -> int:
    fail(
        "policy needs an action: show, set FILE, allow DOMAIN, deny DOMAIN, preset NAME", EXIT_USAGE
    )


def cmd_policy(args: argparse.Namespace) -> int:
    text: str | None = None
    if args.action == "set":
        try:
            if args.file == "-":
                text = sys.stdin.read()
            else:
                with open(args.file, encoding="utf-8") as f:
                    text = f.read()
        except OSError as exc:
            fail(f"cannot read {args.file}: {exc.strerror}")
    client = make_client(args)
    try:
        if args.action == "show":
            resp = client.get_policy()
        elif args.action == "set":
            resp = client.set_policy(text)
        elif args.action == "allow":
            resp = client.set_policy(allow=args.domain)
        elif args.action == "deny":
            resp = client.set_policy(deny=args.domain)
        else:
            resp = client.set_policy(preset=args.name)
    finally:
        client.close()
    if args.json:
        print_json(resp)
    else:
        sys.stdout.write(resp["yaml"])
        if args.action != "show":
            where = resp["path"] or "memory only (the agent has no policy file)"
            print(f"# saved: {where}", file=sys.stderr)
    return 0


def _when(entry: dict[str, Any]) -> str:
    """The entry's epoch seconds as UTC ISO time (what a person reads in a log)."""
    import time

    ts = entry.get("ts")
    if not isinstance(ts, (int, float)):
        return str(ts or "")
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _line(entry: dict[str, Any], net: bool) -> str:
    if net:
        verdict = "allow" if entry.get("allowed") else "DENY "
        return (
            f"{_when(entry)} {verdict} {entry.get('method', '')} "
            f"{entry.get('host', '')}:{entry.get('port', '')} "
            f"up={entry.get('bytes_up', 0)} down={entry.get('bytes_down', 0)} "
            f"{entry.get('duration_ms', 0)}ms {entry.get('reason', '')}"
        ).rstrip()
    what = entry.get("argv") or entry.get("path") or ""
    extra = f" exit={entry['exit_code']}" if "exit_code" in entry else ""
    return (
        f"{_when(entry)} {entry.get('method', '')} {entry.get('code', '')} "
        f"{entry.get('duration_ms', '')}ms {what}{extra}"
    ).rstrip()


def cmd_logs(args: argparse.Namespace) -> int:
    if args.tail < 0:
        fail("--tail must be >= 0", EXIT_USAGE)
    client = make_client(args)
    try:
        for raw in client.logs(net=args.net, tail=args.tail, follow=args.follow):
            if args.json:
                sys.stdout.write(raw + "\n")
            else:
                sys.stdout.write(_line(json.loads(raw), args.net) + "\n")
            sys.stdout.flush()
    finally:
        client.close()
    return 0
