"""`coworkctl init/start/stop/status/delete/list/doctor`: the Lima VM lifecycle.

All of it drives the real `limactl` (host_client.lima); agent checks go through
the host client, imported only inside the handlers that need it.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cowork import defaults

from .. import lima
from ..targets import lima_socket, lima_token
from .common import EXIT_USAGE, fail, human_bytes, print_json

READY_TIMEOUT = 180.0  # after `limactl start` returned (its probe already waited)
REPAIR_WAIT = 10.0  # doctor --fix: how long a re-created forward may take to answer


def _progress(msg: str) -> None:
    print(f"[lima] {msg}", file=sys.stderr, flush=True)


def _name(args: argparse.Namespace) -> str:
    name: str = args.name or defaults.vm_name()
    return lima.check_name(name)


def _gib(text: str) -> float:
    t = text.strip()
    for suffix in ("GiB", "G", "gib", "g"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size in GiB: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def _param(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    return key, value


def _add_name(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--name",
        "-n",
        help=f"Lima VM name (default: $COWORK_VM_NAME or {defaults.DEFAULT_VM_NAME})",
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="create and start the cowork Lima VM, then wait for its agent (idempotent)",
        description="Create the cowork Lima VM from lima/cowork.yaml (once), start it and wait "
        "until the agent answers. Sizes apply when the VM is created.",
    )
    _add_name(p)
    p.add_argument("--cpus", type=int, default=lima.DEFAULT_CPUS, help="CPUs (default 4)")
    p.add_argument(
        "--memory", type=_gib, default=lima.DEFAULT_MEMORY_GIB, help="memory in GiB (default 4)"
    )
    p.add_argument(
        "--disk", type=_gib, default=lima.DEFAULT_DISK_GIB, help="disk in GiB (default 10)"
    )
    p.add_argument(
        "--ubuntu", choices=lima.UBUNTU_RELEASES, default=lima.DEFAULT_UBUNTU, help="Ubuntu release"
    )
    p.add_argument(
        "--workspace",
        help="host directory mounted writable at /workspace "
        "(default: $COWORK_WORKSPACE or ~/cowork-workspace)",
    )
    p.add_argument("--wheel", help="agent wheel to install (default: build one from this checkout)")
    g = p.add_argument_group(
        "a local or custom image (air-gapped machines, your own build; see lima/README.md)"
    )
    g.add_argument(
        "--image",
        help="disk image file or http(s) URL to boot instead of Ubuntu "
        "(default: $COWORK_LIMA_IMAGE); --ubuntu is then ignored",
    )
    g.add_argument("--kernel", help="boot this kernel directly (file or URL; needs --image)")
    g.add_argument("--initrd", help="initial ramdisk for --kernel")
    g.add_argument(
        "--kernel-cmdline", metavar="ARGS", help='kernel command line, e.g. "root=/dev/vda rw"'
    )
    g.add_argument(
        "--legacy-bios",
        action="store_true",
        help="SeaBIOS instead of UEFI (x86_64 QEMU; hosts without OVMF, direct kernel boot)",
    )
    g.add_argument(
        "--ca-cert",
        action="append",
        default=[],
        metavar="PEM",
        help="also trust this CA certificate in the VM (a TLS-inspecting proxy's; repeatable)",
    )
    g.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=_param,
        help="set a param of lima/cowork.yaml, e.g. CoworkToolchain=false (repeatable)",
    )
    p.add_argument(
        "--timeout", type=float, default=READY_TIMEOUT, help="seconds to wait for the agent"
    )
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep a new VM whose provisioning or agent failed (default: delete it again)",
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("start", help="start the Lima VM and wait for its agent")
    _add_name(p)
    p.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="seconds to wait")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop the Lima VM")
    _add_name(p)
    p.add_argument("--force", action="store_true", help="kill it instead of shutting it down")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser(
        "status",
        help="VM state (Lima) and agent health and versions",
        description="Exit 0 when the VM runs and its agent is healthy, 1 otherwise.",
    )
    _add_name(p)
    p.add_argument("--json", action="store_true", dest="json_out", help="JSON output")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("delete", help="delete the Lima VM (its disk, token and snapshots)")
    _add_name(p)
    p.add_argument("--force", "-f", action="store_true", help="also when it is running")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("list", help="list Lima VMs (cowork ones marked)")
    p.add_argument("--json", action="store_true", dest="json_out", help="JSON lines output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "doctor",
        help="check limactl, the VM, the socket, the token and the agent; say how to fix",
    )
    _add_name(p)
    p.add_argument(
        "--fix", action="store_true", help="re-create a dead socket forward (after host sleep)"
    )
    p.add_argument("--json", action="store_true", dest="json_out", help="JSON output")
    p.set_defaults(func=cmd_doctor)


def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json_out", False) or getattr(args, "json", False))


def _wait_agent(name: str, token_file: str | None, timeout: float) -> dict[str, Any]:
    """The agent's Info once it answers on lima:NAME; LimaError (one line, with what
    to run next) when it does not within `timeout` seconds."""
    from ..client import CoworkClient
    from ..errors import CoworkError

    try:
        with CoworkClient(target=f"lima:{name}", token_file=token_file) as client:
            client.wait_ready(timeout)
            return client.info()
    except CoworkError as exc:
        raise lima.LimaError(
            f"VM {name!r} is up but its agent does not answer ({exc}): "
            f"coworkctl doctor --name {name}"
        ) from None


def _print_ready(name: str, info: dict[str, Any]) -> None:
    version = info.get("agent_version") or info.get("agentVersion") or "?"
    print(f"cowork VM {name!r} is ready: agent {version}, target lima:{name}")


# -- handlers ------------------------------------------------------------------------
def cmd_init(args: argparse.Namespace) -> int:
    name = _name(args)
    workspace = Path(args.workspace) if args.workspace else defaults.local_workspace()
    opts = lima.InitOptions(
        name=name,
        cpus=args.cpus,
        memory_gib=args.memory,
        disk_gib=args.disk,
        ubuntu=args.ubuntu,
        workspace=workspace,
        image=args.image or os.environ.get("COWORK_LIMA_IMAGE") or None,
        kernel=args.kernel,
        initrd=args.initrd,
        kernel_cmdline=args.kernel_cmdline,
        legacy_bios=args.legacy_bios,
        params=dict(args.param),
        ca_certs=tuple(Path(c) for c in args.ca_cert),
    )
    try:
        opts.validate()
    except lima.LimaError as exc:
        fail(str(exc), EXIT_USAGE)
    existed = lima.get_instance(name) is not None
    wheel = Path(args.wheel) if args.wheel else None
    lima.init_vm(opts, wheel=wheel, progress=_progress, keep_failed=args.keep_failed)
    if existed:
        _progress(f"VM {name!r} already existed: its size, image and params are left as they are")
    try:
        info = _wait_agent(name, args.token_file, args.timeout)
    except lima.LimaError as exc:
        if existed or args.keep_failed:
            raise
        lima.discard_new_vm(name)
        raise lima.LimaError(
            f"{exc}; the new VM was deleted again (--keep-failed keeps it to look inside)"
        ) from None
    _print_ready(name, info)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    name = _name(args)
    inst = lima.require_instance(name)
    if inst.running:
        _progress(f"VM {name!r} is already running")
    else:
        try:
            lima.start(name, progress=_progress)
        except lima.ProvisionError as exc:
            raise lima.LimaError(f"{exc}; the VM keeps running: limactl shell {name}") from None
    info = _wait_agent(name, args.token_file, args.timeout)
    _print_ready(name, info)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    name = _name(args)
    inst = lima.require_instance(name)
    if not inst.running and not args.force:
        print(f"VM {name!r} is already {inst.status.lower() or 'stopped'}")
        return 0
    lima.stop(name, force=args.force, progress=_progress)
    print(f"VM {name!r} stopped")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    name = _name(args)
    inst = lima.require_instance(name)
    if inst.running and not args.force:
        fail(f"VM {name!r} is running: stop it first ('coworkctl stop') or pass --force")
    lima.delete(name, force=args.force)
    from .. import snapshots

    snapshots.forget_vm(name)
    print(f"VM {name!r} deleted (with its snapshots)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..snapshots import origin

    instances = lima.list_instances()
    if _json(args):
        for inst in instances:
            print_json({**inst.to_dict(), "origin": origin(inst.name)})
        return 0
    if not instances:
        print("no Lima VMs (create one with 'coworkctl init')")
        return 0
    print(
        f"{'NAME':<20} {'STATUS':<10} {'COWORK':<7} {'CPUS':>4} {'MEMORY':>9} {'DISK':>9}  ORIGIN"
    )
    for inst in instances:
        cowork = "yes" if lima.is_cowork_instance(inst.name) else "-"
        print(
            f"{inst.name:<20} {inst.status:<10} {cowork:<7} {inst.cpus:>4} "
            f"{human_bytes(inst.memory):>9} {human_bytes(inst.disk):>9}  "
            f"{origin(inst.name) or '-'}"
        )
    return 0


def _agent_report(name: str, token_file: str | None) -> dict[str, Any]:
    """Health, versions and Claude's version of the agent behind lima:NAME."""
    from ..client import CoworkClient
    from ..errors import CoworkError
    from ..targets import TargetError

    report: dict[str, Any] = {"healthy": False}
    try:
        client = CoworkClient(target=f"lima:{name}", token_file=token_file, connect_timeout=3)
    except (TargetError, CoworkError) as exc:
        report["error"] = str(exc)
        return report
    with client:
        if not client.health(timeout=3):
            report["error"] = f"no answer on {lima_socket(name)}"
            return report
        report["healthy"] = True
        try:
            info = client.info()
            report["info"] = info
        except CoworkError as exc:
            report["error"] = f"Info refused: {exc}"
            return report
        try:
            report["claude"] = client.claude_version()
        except (CoworkError, AttributeError) as exc:
            report["claude_error"] = str(exc)
    return report


def cmd_status(args: argparse.Namespace) -> int:
    name = _name(args)
    inst = lima.require_instance(name)
    sock = lima_socket(name)
    out: dict[str, Any] = inst.to_dict()
    out.update(
        socket=str(sock),
        socket_present=sock.is_socket(),
        token_file=str(lima_token(name)),
    )
    if inst.running:
        out["agent"] = _agent_report(name, args.token_file)
    healthy = bool(inst.running and out.get("agent", {}).get("healthy"))
    if _json(args):
        print_json(out)
        return 0 if healthy else 1
    print(
        f"VM        {name}: {inst.status} ({inst.vm_type}, {inst.arch}, {inst.cpus} CPUs, "
        f"{human_bytes(inst.memory)} memory, {human_bytes(inst.disk)} disk)"
    )
    print(f"socket    {sock}{'' if out['socket_present'] else ' (absent)'}")
    agent = out.get("agent")
    if agent is None:
        print("agent     - (VM not running: coworkctl start)")
    elif agent.get("healthy"):
        info = agent.get("info", {})
        version = info.get("agent_version") or info.get("agentVersion") or "?"
        proto = info.get("protocol_version") or info.get("protocolVersion") or "?"
        print(f"agent     healthy, version {version}, protocol {proto}")
        claude = agent.get("claude") or {}
        cv = claude.get("version") if isinstance(claude, dict) else None
        print(f"claude    {cv or agent.get('claude_error') or 'unknown'}")
    else:
        print(f"agent     NOT healthy: {agent.get('error', 'unknown')} (try: coworkctl doctor)")
    return 0 if healthy else 1


# -- doctor -----------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"check": self.name, "ok": self.ok, "detail": self.detail, "fix": self.fix}


def _vm_type_check() -> Check:
    system = platform.system()
    if system == "Darwin":
        mac = platform.mac_ver()[0]
        major = int(mac.split(".")[0]) if mac else 0
        if major >= 13:
            return Check("vmType", True, f"macOS {mac}: vz (Virtualization.framework)")
        qemu = shutil.which(
            f"qemu-system-{'aarch64' if platform.machine() == 'arm64' else 'x86_64'}"
        )
        return Check(
            "vmType",
            qemu is not None,
            f"macOS {mac}: vz needs macOS 13+, so qemu is used"
            + (f" ({qemu})" if qemu else ", but QEMU is missing"),
            "" if qemu else "brew install qemu (or upgrade to macOS 13+)",
        )
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(platform.machine(), platform.machine())
    qemu = shutil.which(f"qemu-system-{arch}")
    kvm = os.access("/dev/kvm", os.R_OK | os.W_OK)
    detail = (
        f"{system}: qemu"
        + (f" ({qemu})" if qemu else " missing")
        + (", /dev/kvm usable" if kvm else ", no usable /dev/kvm (slow TCG)")
    )
    fix = "" if qemu else "install QEMU (apt-get install qemu-system)"
    if qemu and not kvm:
        fix = "add yourself to the kvm group for hardware acceleration"
    return Check("vmType", qemu is not None, detail, fix)


def _doctor(name: str, token_file: str | None, fix: bool) -> list[Check]:
    checks: list[Check] = []
    try:
        path = lima.limactl_path()
        have = lima.version()
        ok = have >= lima.MIN_LIMA_VERSION
        checks.append(
            Check(
                "limactl",
                ok,
                f"Lima {'.'.join(map(str, have))} at {path}",
                "" if ok else "brew upgrade lima (cowork needs Lima >= 2.0)",
            )
        )
    except lima.LimaError as exc:
        checks.append(Check("limactl", False, str(exc), "install Lima >= 2.0: brew install lima"))
        return checks
    checks.append(_vm_type_check())
    inst = lima.get_instance(name)
    if inst is None:
        checks.append(
            Check("vm", False, f"no Lima VM named {name!r}", f"coworkctl init --name {name}")
        )
        return checks
    checks.append(
        Check(
            "vm",
            inst.running,
            f"{name}: {inst.status} ({inst.vm_type})"
            + (f"; errors: {'; '.join(inst.errors)}" if inst.errors else ""),
            "" if inst.running else f"coworkctl start --name {name}",
        )
    )
    expected = (lima.GUEST_HOST_WORKSPACE, lima.GUEST_DIST_DIR)
    extra = [m for m in inst.mounts if m[1] not in expected]
    checks.append(
        Check(
            "mounts",
            not extra,
            "only the workspace (and the read-only agent wheel dir) is shared"
            if not extra
            else "extra mounts: " + ", ".join(f"{loc} -> {mp or loc}" for loc, mp, _ in extra),
            ""
            if not extra
            else "remove them from ~/.lima/_config/default.yaml or override.yaml, then re-create",
        )
    )
    tok = Path(token_file) if token_file else lima_token(name)
    try:
        st = tok.stat()
        private = not (st.st_mode & (stat.S_IRWXG | stat.S_IRWXO))
        checks.append(
            Check(
                "token",
                private and st.st_size > 0,
                f"{tok} ({stat.filemode(st.st_mode)})",
                "" if private else f"chmod 600 {tok}",
            )
        )
    except FileNotFoundError:
        checks.append(
            Check(
                "token",
                False,
                f"{tok} is missing",
                f"the VM was not made by coworkctl init: coworkctl delete --name {name} && "
                f"coworkctl init --name {name}",
            )
        )
        return checks
    if not inst.running:
        return checks
    sock = lima_socket(name)
    present = sock.is_socket()
    checks.append(
        Check(
            "socket",
            present,
            f"{sock}" + ("" if present else " is missing"),
            "" if present else f"coworkctl doctor --fix --name {name} (or coworkctl stop/start)",
        )
    )
    report: dict[str, Any] = _agent_report(name, token_file) if present else {"healthy": False}
    if not report.get("healthy") and fix:
        try:
            lima.repair_forward(inst)
            # This process's failed attempt left gRPC backing off (1 s and more)
            # before it dials the same socket again: give the new forward a few tries.
            deadline = time.monotonic() + REPAIR_WAIT
            report = _agent_report(name, token_file)
            while not report.get("healthy") and time.monotonic() < deadline:
                time.sleep(0.5)
                report = _agent_report(name, token_file)
            checks.append(Check("forward", True, "re-created the socket forward"))
        except lima.LimaError as exc:
            checks.append(Check("forward", False, str(exc), f"coworkctl stop/start --name {name}"))
    if report.get("healthy"):
        info: dict[str, Any] = report.get("info") or {}
        version = info.get("agent_version") or info.get("agentVersion") or "?"
        proto = info.get("protocol_version") or info.get("protocolVersion")
        same = proto in (None, defaults.PROTOCOL_VERSION, str(defaults.PROTOCOL_VERSION))
        checks.append(
            Check(
                "agent",
                same,
                f"healthy, agent {version}, protocol {proto}",
                ""
                if same
                else f"protocol differs from this client ({defaults.PROTOCOL_VERSION}): "
                f"re-create the VM with this checkout (coworkctl delete/init)",
            )
        )
        claude = report.get("claude") or info.get("claude")
        cv = claude.get("version") if isinstance(claude, dict) else None
        checks.append(
            Check(
                "claude",
                bool(cv),
                f"Claude Code {cv}" if cv else str(report.get("claude_error", "not found")),
                ""
                if cv
                else f"see the provisioning log: limactl shell {name} "
                "sudo tail -n 50 /var/log/cloud-init-output.log",
            )
        )
    else:
        # A refused connection means the forward itself is dead (Lima's SSH master
        # went away, and Lima never re-creates the forward): --fix re-creates it.
        dead = lima.forward_state(name) != "open" or not lima.ssh_master_alive(inst)
        checks.append(
            Check(
                "agent",
                False,
                f"not answering: {report.get('error', 'no socket')}"
                + ("; the socket forward is dead (Lima's SSH master is gone?)" if dead else ""),
                f"coworkctl doctor --fix --name {name}"
                if dead
                else f"limactl shell {name} sudo journalctl -u cowork-agent.service",
            )
        )
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    name = _name(args)
    checks = _doctor(name, args.token_file, args.fix)
    ok = all(c.ok for c in checks)
    if _json(args):
        print_json({"ok": ok, "checks": [c.to_dict() for c in checks]})
        return 0 if ok else 1
    for c in checks:
        mark = "ok  " if c.ok else "FAIL"
        print(f"{mark} {c.name:<9} {c.detail}")
        if not c.ok and c.fix:
            print(f"     {'':<9} fix: {c.fix}")
    return 0 if ok else 1
