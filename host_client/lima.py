"""A thin typed wrapper around `limactl`, and the cowork VM lifecycle built on it.

Everything goes through the real `limactl` binary ($COWORK_LIMACTL, else `limactl`
on PATH) with `--log-format json`, so its failures are parsed from JSON log lines
(never scraped from text) and surface as one-line `LimaError`s. Instances are read
from `limactl list --json` (JSON Lines).

Kept free of grpc imports: `coworkctl start/stop/list` stay fast; only the agent
health checks (in the CLI) load the client.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cowork import defaults

from .errors import CoworkError
from .targets import lima_socket, lima_token

MIN_LIMA_VERSION = (2, 0, 0)
UBUNTU_RELEASES = ("22.04", "24.04")
DEFAULT_UBUNTU = "22.04"
DEFAULT_CPUS = 4
DEFAULT_MEMORY_GIB = 4.0
DEFAULT_DISK_GIB = 10.0
GUEST_DIST_DIR = f"{defaults.GUEST_INSTALL_DIR}/dist"
# Where Lima mounts the host workspace; agent.sh presents it at /workspace (bindfs).
GUEST_HOST_WORKSPACE = "/mnt/cowork/host-workspace"
START_TIMEOUT = "30m"  # first boot installs the toolchain and Claude Code

# Lima instance names: what `limactl` accepts (identifiers, dots, dashes).
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[str], None]


class LimaError(CoworkError):
    """A `limactl` failure or a Lima precondition, as one line."""

    code = "FAILED_PRECONDITION"


# -- limactl --------------------------------------------------------------------
def limactl_path() -> str:
    """The limactl to run: $COWORK_LIMACTL, else `limactl` on PATH."""
    configured = os.environ.get("COWORK_LIMACTL")
    if configured:
        found = shutil.which(configured)
        if not found:
            raise LimaError(f"limactl not found: COWORK_LIMACTL={configured} is not executable")
        return found
    found = shutil.which("limactl")
    if not found:
        raise LimaError(
            "limactl not found on PATH: install Lima >= 2.0 (macOS: brew install lima; "
            "see https://lima-vm.io/docs/installation/) or set COWORK_LIMACTL"
        )
    return found


def _log_lines(stderr: str) -> Iterator[dict[str, Any]]:
    for line in stderr.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            yield obj


def error_message(stderr: str) -> str:
    """The one line that says why limactl failed: its last fatal/error log message."""
    worst = ""
    for entry in _log_lines(stderr):
        if entry.get("level") in ("fatal", "error", "panic"):
            worst = str(entry.get("msg") or "")
            if entry.get("error"):
                worst = f"{worst}: {entry['error']}"
    if not worst:
        plain = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
        worst = plain[-1] if plain else "failed without a message"
    # Keep the first line: Lima sometimes appends a YAML excerpt after a newline.
    first = worst.strip().splitlines()[0] if worst.strip() else worst
    return first.removeprefix("limactl: ")


class ProvisionError(LimaError):
    """Provisioning in the guest failed in a way the agent cannot come back from."""


def run_limactl(
    args: Sequence[str],
    *,
    timeout: float | None = 120,
    progress: Progress | None = None,
    input: str | None = None,
) -> str:
    """Run `limactl --log-format json --tty=false ARGS`; return stdout.

    With `progress`, stderr log lines are passed on as they come (info messages).
    `input` is written to its stdin. A non-zero exit raises LimaError with
    limactl's own message.
    """
    argv = [limactl_path(), "--log-format", "json", "--tty=false", *args]
    what = f"limactl {' '.join(args[:1])}"
    try:
        if progress is None or input is not None:
            proc = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=timeout,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
            out, err, code = proc.stdout, proc.stderr, proc.returncode
        else:
            out, err, code = _run_streaming(argv, timeout, progress)
    except subprocess.TimeoutExpired:
        raise LimaError(f"{what} did not finish within {timeout:g}s") from None
    except OSError as exc:
        raise LimaError(f"cannot run {argv[0]}: {exc.strerror}") from None
    if code != 0:
        raise LimaError(f"{what}: {error_message(err)}")
    return out


def _run_streaming(
    argv: list[str], timeout: float | None, progress: Progress
) -> tuple[str, str, int]:
    with subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        err_lines: list[str] = []
        for line in proc.stderr:
            err_lines.append(line)
            for entry in _log_lines(line):
                if entry.get("level") == "info" and entry.get("msg"):
                    progress(str(entry["msg"]))
        out = proc.stdout.read()
        code = proc.wait(timeout=timeout)
    return out, "".join(err_lines), code


def parse_version(text: str) -> tuple[int, int, int]:
    """(2, 2, 0) from `limactl version 2.2.0` (or `v2.2.0-rc.1`, ...)."""
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    if not m:
        raise LimaError(f"cannot parse the limactl version from {text.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def version() -> tuple[int, int, int]:
    return parse_version(run_limactl(["--version"]))


def require_version() -> tuple[int, int, int]:
    have = version()
    if have < MIN_LIMA_VERSION:
        raise LimaError(
            f"Lima {'.'.join(map(str, have))} is too old: cowork needs Lima >= "
            f"{'.'.join(map(str, MIN_LIMA_VERSION))} (brew upgrade lima)"
        )
    return have


# -- instances --------------------------------------------------------------------
@dataclass(frozen=True)
class Instance:
    """One line of `limactl list --json`."""

    name: str
    status: str  # Running | Stopped | Broken | ...
    dir: str
    vm_type: str = ""
    arch: str = ""
    cpus: int = 0
    memory: int = 0  # bytes
    disk: int = 0  # bytes
    ssh_local_port: int = 0
    ssh_config_file: str = ""
    lima_version: str = ""
    errors: tuple[str, ...] = ()
    param: dict[str, str] = field(default_factory=dict)
    mounts: tuple[tuple[str, str, bool], ...] = ()  # (location, mountPoint, writable)

    @property
    def running(self) -> bool:
        return self.status == "Running"

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Instance:
        config = obj.get("config") or {}
        mounts = tuple(
            (str(m.get("location", "")), str(m.get("mountPoint", "")), bool(m.get("writable")))
            for m in config.get("mounts") or []
        )
        return cls(
            name=str(obj.get("name", "")),
            status=str(obj.get("status", "")),
            dir=str(obj.get("dir", "")),
            vm_type=str(obj.get("vmType", "")),
            arch=str(obj.get("arch", "")),
            cpus=int(obj.get("cpus") or 0),
            memory=int(obj.get("memory") or 0),
            disk=int(obj.get("disk") or 0),
            ssh_local_port=int(obj.get("sshLocalPort") or 0),
            ssh_config_file=str(obj.get("sshConfigFile", "")),
            lima_version=str(obj.get("limaVersion", "")),
            errors=tuple(str(e) for e in obj.get("errors") or []),
            param={str(k): str(v) for k, v in (obj.get("param") or {}).items()},
            mounts=mounts,
        )

    def to_dict(self) -> dict[str, Any]:
        """The public view (no Lima config: it holds the token's data provision)."""
        return {
            "name": self.name,
            "status": self.status,
            "dir": self.dir,
            "vmType": self.vm_type,
            "arch": self.arch,
            "cpus": self.cpus,
            "memory": self.memory,
            "disk": self.disk,
            "errors": list(self.errors),
            "cowork": is_cowork_instance(self.name),
        }


def parse_list_output(text: str) -> list[Instance]:
    """Instances from `limactl list --json` output (JSON Lines, one object a line)."""
    instances = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise LimaError(f"limactl list --json printed a line that is not JSON: {exc}") from None
        if not isinstance(obj, dict) or "name" not in obj:
            raise LimaError("limactl list --json printed an object without a name")
        instances.append(Instance.from_json(obj))
    return instances


def list_instances() -> list[Instance]:
    return parse_list_output(run_limactl(["list", "--json"]))


def get_instance(name: str) -> Instance | None:
    """The instance called `name`, or None when Lima has none by that name."""
    check_name(name)
    for inst in list_instances():
        if inst.name == name:
            return inst
    return None


def require_instance(name: str) -> Instance:
    inst = get_instance(name)
    if inst is None:
        raise LimaError(f"no Lima VM named {name!r}: create it with 'coworkctl init --name {name}'")
    return inst


def check_name(name: str) -> str:
    if not _NAME_RE.match(name) or name.startswith("_"):
        raise LimaError(f"bad VM name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def is_cowork_instance(name: str) -> bool:
    """True when the instance carries a cowork token (it was made by `coworkctl init`)."""
    return lima_token(name).is_file()


def create(name: str, template: str) -> None:
    """`limactl create` from template text on stdin (it never lands in a file of ours)."""
    run_limactl(["create", f"--name={name}", "-"], timeout=600, input=template)


# A line the provisioning scripts (lima/provision/*.sh) print: "cowork agent.sh: ...";
# their fatal errors read "cowork agent.sh: error: WHAT: FIX".
_SCRIPT_LINE = re.compile(r"\bcowork ([a-z]+)\.sh: (.*)$")
_LIMA_FAILED = re.compile(r"WARNING: Failed to execute (\S+)")


class ProvisionWatch:
    """Reads the guest's provisioning output (cloud-init's log, where Lima's boot script
    runs our scripts): passes our scripts' lines to `say` (not apt's or npm's noise)
    and remembers agent.sh's first error in `fatal`.

    Why agent.sh's error is fatal: the agent cannot come up on this boot, and Lima's
    readiness probe would retry for 10 minutes (200 x 3 s) before giving up. A failed
    toolchain or Claude step is reported but not fatal (the agent, and `coworkctl
    doctor`, still work)."""

    def __init__(self, say: Progress) -> None:
        self.say = say
        self.errors: list[str] = []
        self.fatal = ""

    def line(self, text: str) -> bool:
        """One line of the log; True when it is the fatal one."""
        m = _SCRIPT_LINE.search(text)
        if m:
            script, said = m.groups()
            self.say(f"{script}.sh: {said}")
            if said.startswith("error: "):
                self.errors.append(f"{script}.sh: {said.removeprefix('error: ')}")
                if script == "agent" and not self.fatal:
                    self.fatal = f"provisioning failed in the VM: {self.errors[-1]}"
                    return True
        elif _LIMA_FAILED.search(text):
            self.say(text[text.index("WARNING") :])
        return False


# This boot's part of cloud-init's log: from its last "running 'init-local'" line on.
_TAIL_THIS_BOOT = (
    "sh -c 'f=/var/log/cloud-init-output.log; "
    'b=$(sudo awk "/running .init-local./ {b=NR} END {print (b ? b : 1)}" "$f" 2>/dev/null); '
    'exec sudo tail -n +"${b:-1}" -F "$f" 2>/dev/null\''
)


class GuestLogTail(threading.Thread):
    """Follows the booting guest's cloud-init log over SSH (its own connection, not
    Lima's master) and feeds each line of this boot to `watch`; calls `on_fatal` once
    the watch says so. Retries until SSH answers; stop() ends it.

    Why not `limactl start --progress`: Lima stops following the log after 10
    minutes, and a first boot under TCG, or on a slow network, takes longer."""

    def __init__(self, name: str, watch: ProvisionWatch, on_fatal: Callable[[], None]) -> None:
        super().__init__(name=f"cloud-init log of {name}", daemon=True)
        self.cfg = defaults.lima_home() / name / "ssh.config"
        self.host = f"lima-{name}"
        self.watch = watch
        self.on_fatal = on_fatal
        self._stop_event = threading.Event()
        self._proc: subprocess.Popen[str] | None = None
        self._seen = 0  # lines already handled (a reconnect starts over at this boot)

    def run(self) -> None:
        while not self._stop_event.is_set():
            if not self.cfg.is_file():
                self._stop_event.wait(1)
                continue
            try:
                self._proc = subprocess.Popen(
                    ["ssh", "-F", str(self.cfg), "-o", "ControlMaster=no", "-o", "ControlPath=none",
                     "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", self.host, _TAIL_THIS_BOOT],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                    text=True,
                    errors="replace",
                )  # fmt: skip
            except OSError:
                return  # no ssh: Lima itself will say so
            assert self._proc.stdout is not None
            n = 0
            for text in self._proc.stdout:
                n += 1
                if n <= self._seen:
                    continue
                self._seen = n
                if self.watch.line(text.rstrip("\n")):
                    self.on_fatal()
            self._proc.wait()
            self._stop_event.wait(2)

    def stop(self, grace: float = 1.0) -> None:
        """Let lines already on their way arrive (`grace` seconds), then end."""
        if self.is_alive() and not self._stop_event.is_set():
            self._stop_event.wait(grace)
        self._stop_event.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
        self.join(10)


def start(name: str, progress: Progress | None = None, timeout: str = START_TIMEOUT) -> None:
    """`limactl start`, following the provisioning (GuestLogTail + ProvisionWatch):
    Lima's messages and our scripts' lines go to `progress`. ProvisionError as soon
    as agent.sh fails, with limactl stopped and the VM left as it is."""
    say = progress or (lambda _msg: None)
    watch = ProvisionWatch(say)
    argv = [limactl_path(), "--log-format", "json", "--tty=false", "start"]
    argv += [f"--timeout={timeout}", name]
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
    except OSError as exc:
        raise LimaError(f"cannot run {argv[0]}: {exc.strerror}") from None
    # limactl start only waits for the VM: stopping it leaves Lima's host agent (and
    # the VM) up, for the caller to keep or delete.
    tail = GuestLogTail(name, watch, on_fatal=proc.terminate)
    tail.start()
    err: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            for entry in _log_lines(line):
                if entry.get("level") == "info" and entry.get("msg"):
                    say(str(entry["msg"]))
        code = proc.wait()
    finally:
        tail.stop()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    if watch.fatal:
        raise ProvisionError(watch.fatal)
    if code != 0:
        raise LimaError(f"limactl start: {error_message(''.join(err))}")


def stop(name: str, force: bool = False, progress: Progress | None = None) -> None:
    run_limactl(["stop", *(["--force"] if force else []), name], timeout=600, progress=progress)


def delete(name: str, force: bool = False) -> None:
    run_limactl(["delete", *(["--force"] if force else []), name], timeout=600)


# -- the API CoworkClient uses ------------------------------------------------------
def is_vm_running(name: str) -> bool:
    """True when Lima reports the VM as Running (False when it does not exist)."""
    inst = get_instance(name)
    return inst is not None and inst.running


def start_vm(name: str, progress: Progress | None = None) -> None:
    """Start an existing VM (no-op when it runs). The caller waits for the agent."""
    inst = require_instance(name)
    if not inst.running:
        start(name, progress=progress)


def stop_vm(name: str, progress: Progress | None = None) -> None:
    """Stop the VM (no-op when it is not running)."""
    inst = require_instance(name)
    if inst.running:
        stop(name, progress=progress)


# -- the template -----------------------------------------------------------------
def template_dir() -> Path:
    """The lima/ directory: $COWORK_LIMA_DIR, else the one beside this package's source, else
    (an installed wheel) its copy in the package, host_client/lima_template."""
    configured = os.environ.get("COWORK_LIMA_DIR")
    here = Path(__file__).resolve().parent
    d = Path(configured) if configured else here.parent / "lima"
    if not configured and not (d / "cowork.yaml").is_file():
        d = here / "lima_template"
    if not (d / "cowork.yaml").is_file():
        raise LimaError(
            f"the Lima template is missing: {d / 'cowork.yaml'} "
            "(run coworkctl from a checkout of cowork-sandbox, or set COWORK_LIMA_DIR)"
        )
    return d


def template_params(lima_dir: Path | None = None) -> dict[str, str]:
    """The `param:` keys of lima/cowork.yaml with their defaults."""
    import yaml

    path = (lima_dir or template_dir()) / "cowork.yaml"
    doc = yaml.safe_load(path.read_text())
    params = doc.get("param") if isinstance(doc, dict) else None
    return {str(k): str(v) for k, v in (params or {}).items()}


@dataclass(frozen=True)
class InitOptions:
    name: str = field(default_factory=defaults.vm_name)
    cpus: int = DEFAULT_CPUS
    memory_gib: float = DEFAULT_MEMORY_GIB
    disk_gib: float = DEFAULT_DISK_GIB
    ubuntu: str = DEFAULT_UBUNTU
    workspace: Path = field(default_factory=defaults.local_workspace)
    # A local path or http(s) URL of a disk image to boot instead of Lima's Ubuntu
    # list (air-gapped or corporate machines, pre-downloaded or custom images,
    # tests): --image, else $COWORK_LIMA_IMAGE. With it, `base:` (the Ubuntu list)
    # is dropped and --ubuntu has no effect.
    image: str | None = field(default_factory=lambda: os.environ.get("COWORK_LIMA_IMAGE") or None)
    # Direct kernel boot of that image (an image without a bootloader, e.g. a
    # plain ext4 root): Lima's images[].kernel/initrd.
    kernel: str | None = None
    initrd: str | None = None
    kernel_cmdline: str | None = None
    # SeaBIOS instead of UEFI (x86_64 + QEMU): hosts without OVMF, direct kernel boot.
    legacy_bios: bool = False
    # Values for the template's `param:` keys (e.g. CoworkToolchain=false).
    params: dict[str, str] = field(default_factory=dict)
    # Extra CA certificates (PEM files) the guest trusts, e.g. a corporate
    # TLS-inspecting proxy's: Lima's caCerts (cloud-init), so apt, pip and npm in
    # the provisioning reach their registries through it.
    ca_certs: tuple[Path, ...] = ()

    def validate(self) -> None:
        check_name(self.name)
        if self.ubuntu not in UBUNTU_RELEASES:
            raise LimaError(f"--ubuntu must be one of {', '.join(UBUNTU_RELEASES)}")
        if self.cpus < 1:
            raise LimaError("--cpus must be at least 1")
        if self.memory_gib < 1:
            raise LimaError("--memory must be at least 1 GiB")
        if self.disk_gib < 5:
            raise LimaError("--disk must be at least 5 GiB")
        if (self.kernel or self.initrd or self.kernel_cmdline) and not self.image:
            raise LimaError("--kernel, --initrd and --kernel-cmdline need --image")
        if (self.initrd or self.kernel_cmdline) and not self.kernel:
            raise LimaError("--initrd and --kernel-cmdline need --kernel")
        self.locations()
        self.ca_pems()
        if self.params:
            known = template_params()
            for key in self.params:
                if key not in known:
                    raise LimaError(
                        f"--param {key}: lima/cowork.yaml has no such param "
                        f"(it has: {', '.join(known) or 'none'})"
                    )

    def ca_pems(self) -> list[str]:
        """The --ca-cert files' text; LimaError for one that holds no PEM certificate."""
        pems = []
        for path in self.ca_certs:
            try:
                text = path.expanduser().read_text(errors="replace")
            except OSError as exc:
                raise LimaError(f"--ca-cert {path}: {exc.strerror or exc}") from None
            if "-----BEGIN CERTIFICATE-----" not in text:
                raise LimaError(f"--ca-cert {path}: no PEM certificate in it (BEGIN CERTIFICATE)")
            pems.append(text.strip() + "\n")
        return pems

    def locations(self) -> dict[str, str]:
        """image/kernel/initrd as Lima should see them: URLs as given, local files
        absolute (the template reaches limactl on stdin, so nothing is relative).
        LimaError, naming the option and what is wrong, for a file that cannot be
        one: missing, unreadable, empty, or an image qemu-img cannot read."""
        out: dict[str, str] = {}
        given = {"image": self.image, "kernel": self.kernel, "initrd": self.initrd}
        for what, where in given.items():
            if where:
                out[what] = _location(what, where)
        if "image" in out and "://" not in out["image"]:
            _check_disk_image(out["image"], self.image or "")
        return out


_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# A raw disk image smaller than this is a typo'd path, not a disk.
_MIN_RAW_IMAGE = 1 << 20


def _location(what: str, where: str) -> str:
    m = _URL_RE.match(where)
    if m and m.group(1).lower() in ("http", "https"):
        return where
    if m and m.group(1).lower() != "file":
        raise LimaError(
            f"--{what} {where}: Lima fetches only http:// and https:// URLs (or give a local file)"
        )
    path = Path(where[len("file://") :] if m else where).expanduser()
    hint = "give a local file or an http(s):// URL"
    if not path.exists():
        raise LimaError(f"--{what} {where}: no such file ({hint})")
    if not path.is_file():
        raise LimaError(f"--{what} {where}: not a regular file ({hint})")
    if not os.access(path, os.R_OK):
        raise LimaError(f"--{what} {where}: not readable by {_whoami()} (chmod a+r it)")
    if path.stat().st_size == 0:
        raise LimaError(f"--{what} {where}: the file is empty ({hint})")
    return str(path.resolve())


def _whoami() -> str:
    import pwd

    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _check_disk_image(path: str, given: str) -> None:
    """Refuse what qemu-img cannot read as a disk (Lima would only fail at boot, or
    boot garbage and wait 10 minutes for SSH). Without qemu-img (vz hosts), trust it."""
    qemu_img = shutil.which("qemu-img")
    if not qemu_img:
        return
    try:
        proc = subprocess.run(
            [qemu_img, "info", "--output=json", path],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LimaError(f"--image {given}: cannot inspect it with qemu-img ({exc})") from None
    if proc.returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["unreadable"])[-1]
        raise LimaError(f"--image {given}: not a disk image ({why.removeprefix('qemu-img: ')})")
    try:
        info = json.loads(proc.stdout)
    except ValueError:
        return
    size = Path(path).stat().st_size
    if info.get("format") == "raw" and size < _MIN_RAW_IMAGE:
        raise LimaError(
            f"--image {given}: not a disk image (a {size}-byte file that is no known "
            "image format; give a qcow2 or raw disk image)"
        )


def lima_arch() -> str:
    """This host's architecture in Lima's words (x86_64, aarch64, ...)."""
    machine = platform.machine().lower()
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


def _gib(value: float) -> str:
    return f"{value:g}GiB"


class _Literal(str):
    """A string YAML dumps in literal block style (scripts, base64)."""


def _dumper() -> Any:
    """A SafeDumper that writes _Literal strings as literal blocks.

    Built on first use: yaml costs ~12 ms to import, and every coworkctl
    command imports this module (lima_cmd registers its options from it).
    """
    import yaml

    def literal(dumper: yaml.SafeDumper, data: _Literal) -> yaml.Node:
        return dumper.represent_scalar("tag:yaml.org,2002:str", str(data), style="|")

    class Dumper(yaml.SafeDumper):
        pass

    Dumper.add_representer(_Literal, literal)
    return Dumper


def render_template(
    opts: InitOptions,
    *,
    token: str | None = None,
    lima_dir: Path | None = None,
) -> str:
    """lima/cowork.yaml with the init options applied, as YAML text.

    Relative `file:` references become absolute (the result can live anywhere).
    With `token`, a `data` provision writes it to /etc/cowork/token, root:root
    0600. (The wheel does not go into the template: see dist_dir().)
    """
    opts.validate()
    lima_dir = lima_dir or template_dir()
    import yaml

    doc = yaml.safe_load((lima_dir / "cowork.yaml").read_text())
    if not isinstance(doc, dict):
        raise LimaError(f"{lima_dir / 'cowork.yaml'} is not a YAML mapping")
    locations = opts.locations()
    if "image" in locations:
        # Our image only: the Ubuntu list of `base:` would be merged in behind it.
        ubuntu = [b for b in doc.get("base") or [] if str(b).startswith("template:_images/")]
        doc["base"] = [b for b in doc.get("base") or [] if b not in ubuntu]
        if not doc["base"]:
            del doc["base"]
        image: dict[str, Any] = {"location": locations["image"], "arch": lima_arch()}
        if "kernel" in locations:
            image["kernel"] = {"location": locations["kernel"]}
            if opts.kernel_cmdline:
                image["kernel"]["cmdline"] = opts.kernel_cmdline
        if "initrd" in locations:
            image["initrd"] = {"location": locations["initrd"]}
        doc["images"] = [image]
    else:
        doc["base"] = [
            f"template:_images/ubuntu-{opts.ubuntu}"
            if str(b).startswith("template:_images/ubuntu-")
            else b
            for b in doc.get("base") or []
        ]
    if opts.legacy_bios:
        doc.setdefault("firmware", {})["legacyBIOS"] = True
    pems = opts.ca_pems()
    if pems:
        doc.setdefault("caCerts", {})["certs"] = [_Literal(pem) for pem in pems]
    params: dict[str, Any] = doc.setdefault("param", {}) or {}
    for key, value in opts.params.items():
        if key not in params:
            known = ", ".join(params) or "none"
            raise LimaError(f"--param {key}: lima/cowork.yaml has no such param (it has: {known})")
        params[key] = str(value)
    doc["param"] = params
    doc["cpus"] = opts.cpus
    doc["memory"] = _gib(opts.memory_gib)
    doc["disk"] = _gib(opts.disk_gib)
    mounts = doc.get("mounts") or []
    if not mounts:
        raise LimaError("lima/cowork.yaml has no workspace mount")
    mounts[0]["location"] = str(opts.workspace.expanduser().resolve())
    for section in ("provision", "probes"):
        for entry in doc.get(section) or []:
            f = entry.get("file")
            if isinstance(f, str) and not f.startswith("/") and "://" not in f:
                entry["file"] = str((lima_dir / f).resolve())
    provision: list[dict[str, Any]] = doc.setdefault("provision", [])
    for entry in provision:
        if isinstance(entry.get("content"), str) and "\n" in entry["content"]:
            entry["content"] = _Literal(entry["content"])
    data: list[dict[str, Any]] = []
    if token is not None:
        data.append(
            {
                "mode": "data",
                "path": defaults.GUEST_TOKEN_FILE,
                "owner": "root:root",
                "permissions": "0600",
                # Literal block: Lima reformats lima.yaml with yamlfmt, whose
                # blank-line placeholder ("#magic___^_^___line") would end up
                # inside a quoted multi-line scalar and so in the token.
                "content": _Literal(token + "\n"),
            }
        )
    doc["provision"] = data + provision
    header = "# Rendered by coworkctl init from lima/cowork.yaml; do not edit.\n"
    return header + yaml.dump(doc, Dumper=_dumper(), sort_keys=False, width=1000)


# -- the wheel ------------------------------------------------------------------------
def dist_dir(name: str) -> Path:
    """Host side of the read-only /opt/cowork/dist mount: {{.Dir}}/cowork-dist.

    Why not inside the template: a `data` provision's content lands in the
    instance's config, and `limactl list --json` then fails on the >64 KiB line
    ("bufio.Scanner: token too long"); Lima also runs data content through Go
    templating. `limactl copy` needs a running VM, but `limactl start` waits for
    the agent's probe, which needs the wheel first.
    """
    return defaults.lima_home() / name / "cowork-dist"


def _own_like_parent(path: Path) -> None:
    """As root, hand what we add to an instance dir to the dir's owner (who runs limactl)."""
    if os.geteuid() == 0:
        st = path.parent.stat()
        os.chown(path, st.st_uid, st.st_gid)


def install_wheel(name: str, wheel: Path) -> Path:
    """Put `wheel` (alone) into the VM's dist dir; the guest installs it at boot."""
    d = dist_dir(name)
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    _own_like_parent(d)
    for old in d.glob("*.whl"):
        old.unlink()
    dest = d / wheel.name
    shutil.copyfile(wheel, dest)
    dest.chmod(0o644)
    _own_like_parent(dest)
    return dest


def source_root() -> Path:
    return Path(__file__).resolve().parent.parent


def build_wheel(out_dir: Path) -> Path:
    """Build the project's wheel from this source tree into `out_dir`.

    Builds from a copy of the packaging inputs, so the checkout gets no build/
    directory while other work goes on in it.
    """
    src = source_root()
    if not (src / "pyproject.toml").is_file():
        raise LimaError(
            f"cannot build the agent wheel: no pyproject.toml in {src} (pass --wheel PATH)"
        )
    stage = out_dir / "src"
    stage.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for item in ("pyproject.toml", "README.md"):
        if (src / item).exists():
            shutil.copy2(src / item, stage / item)
    for pkg in ("cowork", "guest_agent", "host_client"):
        shutil.copytree(src / pkg, stage / pkg, ignore=ignore)
    wheels = out_dir / "wheels"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            str(wheels),
            str(stage),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    built = sorted(wheels.glob("*.whl"))
    if proc.returncode != 0 or not built:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LimaError(f"building the agent wheel failed: {last}")
    return built[0]


def generate_token() -> str:
    return secrets.token_hex(defaults.TOKEN_BYTES)


def write_token(path: Path, token: str) -> None:
    """Write the token 0600 (atomically: never a readable half file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (token + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    _own_like_parent(tmp)
    os.replace(tmp, path)


# -- init -----------------------------------------------------------------------------
def require_qemu() -> None:
    """On Linux Lima runs QEMU: fail before anything is made when it is missing
    ($QEMU_SYSTEM_<ARCH>, as Lima reads it, else qemu-system-<arch>; and qemu-img).
    macOS 13+ uses vz, and Lima itself says what an older Mac lacks."""
    if platform.system() != "Linux":
        return
    arch = lima_arch()
    env = f"QEMU_SYSTEM_{arch.upper()}"
    exe = (os.environ.get(env) or f"qemu-system-{arch}").split()[0]
    package = {"x86_64": "qemu-system-x86", "aarch64": "qemu-system-arm"}.get(arch, "qemu-system")
    if not shutil.which(exe):
        raise LimaError(
            f"QEMU not found ({exe}): Lima needs it on Linux; install it "
            f"(sudo apt-get install {package} qemu-utils, or your distribution's qemu) "
            f"or point {env} at it"
        )
    if not shutil.which("qemu-img"):
        raise LimaError(
            "qemu-img not found: Lima needs it on Linux; install it "
            "(sudo apt-get install qemu-utils, or your distribution's qemu-img)"
        )


def init_vm(
    opts: InitOptions,
    *,
    wheel: Path | None = None,
    progress: Progress | None = None,
    start_it: bool = True,
    keep_failed: bool = False,
) -> Instance:
    """Create (if needed) and start the cowork VM. Idempotent.

    A new VM gets a fresh token (host: the Lima instance dir, 0600; guest:
    /etc/cowork/token via a data provision) and the agent wheel in its
    dist_dir() (built from this checkout unless `wheel` is given). An existing VM is only started.
    The caller waits for the agent's health (and calls discard_new_vm() if it never comes).

    Nothing is half-made: every check that can fail before `limactl create` runs
    first, and a VM this call created that then fails to create, take its wheel, or
    start (provisioning included) is deleted again, unless `keep_failed`.
    """
    opts.validate()
    require_version()
    say = progress or (lambda _msg: None)
    inst = get_instance(opts.name)
    if inst is not None and not is_cowork_instance(opts.name):
        raise LimaError(
            f"Lima VM {opts.name!r} exists but was not made by coworkctl init "
            f"(no {lima_token(opts.name)}): pick another --name, or delete it"
        )
    created = False
    if inst is None:
        require_qemu()
        workspace = opts.workspace.expanduser()
        made_workspace = not workspace.exists()
        workspace.mkdir(parents=True, exist_ok=True)
        try:
            with tempfile.TemporaryDirectory(prefix="cowork-init-") as tmp:
                if wheel is None:
                    say("building the agent wheel")
                    wheel = build_wheel(Path(tmp))
                elif not wheel.is_file():
                    raise LimaError(f"wheel not found: {wheel}")
                token = generate_token()
                rendered = render_template(opts, token=token)
                what = f"image {opts.image}" if opts.image else f"Ubuntu {opts.ubuntu}"
                say(f"creating Lima VM {opts.name!r} ({what})")
                created = True
                try:
                    create(opts.name, rendered)
                    install_wheel(opts.name, wheel)
                    write_token(lima_token(opts.name), token)
                except OSError as exc:
                    raise LimaError(f"cannot deliver the agent wheel or token: {exc}") from None
        except BaseException:
            if created:
                discard_new_vm(opts.name)
            if made_workspace:
                with contextlib.suppress(OSError):
                    workspace.rmdir()  # only if still empty
            raise
        inst = require_instance(opts.name)
    if start_it and not inst.running:
        first = "; the first boot provisions it" if created else ""
        say(f"starting Lima VM {opts.name!r}{first}")
        try:
            start(opts.name, progress=progress)
        except (LimaError, KeyboardInterrupt) as exc:
            if not created or keep_failed:
                if isinstance(exc, LimaError):
                    kept = "is kept (--keep-failed)" if created else "keeps running"
                    raise LimaError(
                        f"{exc}; the VM {kept}: limactl shell {opts.name}, "
                        f"or coworkctl delete --force --name {opts.name}"
                    ) from None
                raise
            discard_new_vm(opts.name)
            if isinstance(exc, KeyboardInterrupt):
                raise
            raise LimaError(
                f"{exc}; the new VM was deleted again (--keep-failed keeps it to look inside)"
            ) from None
        inst = require_instance(opts.name)
    return inst


def discard_new_vm(name: str) -> None:
    """Delete a VM that init made and that did not come up (best effort: the caller
    is already reporting the failure that matters)."""
    with contextlib.suppress(LimaError):
        if get_instance(name) is not None:
            delete(name, force=True)


# -- the socket forward ---------------------------------------------------------------
def host_socket(name: str) -> Path:
    return lima_socket(name)


def ssh_master_alive(inst: Instance) -> bool:
    """True when Lima's SSH master (which carries the socket forward) answers."""
    if not inst.ssh_config_file or not Path(inst.ssh_config_file).is_file():
        return False
    proc = subprocess.run(
        ["ssh", "-F", inst.ssh_config_file, "-O", "check", f"lima-{inst.name}"],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=10,
    )
    return proc.returncode == 0


def forward_state(name: str) -> str:
    """The host end of the agent's socket forward: "missing" (no socket), "dead"
    (nothing listens: the SSH master that carried it is gone), or "open" (ssh
    accepts; whether the agent answers behind it is the health check's business)."""
    import socket

    sock = host_socket(name)
    if not sock.is_socket():
        return "missing"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        try:
            s.connect(str(sock))
        except (ConnectionRefusedError, FileNotFoundError):
            return "dead"
        except OSError:
            return "open"  # e.g. EACCES for another user: not ours to judge here
    return "open"


def diagnose(name: str) -> str:
    """Why `lima:NAME` gives no answer, as one line: the cause and the command that fixes it.

    For an agent call that could not connect: the VM may be missing or stopped, or
    running with a dead socket forward (Lima's SSH master died, e.g. when the host
    slept, and Lima never re-creates the forward: Lima issue #5420), or running with
    an agent that does not answer. Costs one `limactl list` and a connect().
    """
    try:
        inst = get_instance(name)
    except LimaError as exc:
        return str(exc)
    if inst is None:
        return f"no Lima VM named {name!r}: create it with 'coworkctl init --name {name}'"
    if not inst.running:
        return f"VM {name!r} is {inst.status or 'not running'}: coworkctl start --name {name}"
    fix = f"coworkctl doctor --fix --name {name}"
    state = forward_state(name)
    if state == "missing":
        return f"VM {name!r} runs but its agent socket is not forwarded: {fix}"
    if state == "dead":
        return (
            f"the socket forward of VM {name!r} is dead (Lima's SSH master went away, e.g. "
            f"when the host slept, and Lima does not re-create it): {fix}"
        )
    return f"VM {name!r} runs but its agent does not answer: coworkctl doctor --name {name}"


def _start_ssh_master(inst: Instance, cfg: str, host: str) -> None:
    """Start the SSH master the forward rides on; LimaError (what failed, and the fix) if none
    answers afterwards: the forward would otherwise fail with ssh's less helpful words."""
    fix = f"restart the VM: coworkctl stop --name {inst.name} && coworkctl start --name {inst.name}"
    try:
        proc = subprocess.run(
            [
                "ssh",
                "-F",
                cfg,
                "-o",
                "ControlMaster=auto",
                "-o",
                "ControlPersist=yes",
                "-f",
                "-N",
                host,
            ],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LimaError(f"cannot start the SSH master of VM {inst.name!r} ({exc}); {fix}") from None
    if proc.returncode != 0 or not ssh_master_alive(inst):
        last = (proc.stderr.strip().splitlines() or [f"ssh exited {proc.returncode}"])[-1]
        raise LimaError(f"cannot start the SSH master of VM {inst.name!r} ({last}); {fix}")


def repair_forward(inst: Instance) -> None:
    """Re-create the agent's socket forward (e.g. after host sleep killed it).

    Same as Lima's own forward: `ssh -O forward -L HOST_SOCKET:GUEST_SOCKET`
    through the instance's SSH master, starting a master first if none answers.
    """
    if not inst.running:
        raise LimaError(f"VM {inst.name!r} is {inst.status or 'not running'}: coworkctl start")
    cfg = inst.ssh_config_file
    if not cfg or not Path(cfg).is_file():
        raise LimaError(f"no ssh config for {inst.name!r} ({cfg or 'none reported by limactl'})")
    host = f"lima-{inst.name}"
    if not ssh_master_alive(inst):
        _start_ssh_master(inst, cfg, host)
    sock = host_socket(inst.name)
    sock.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    sock.unlink(missing_ok=True)
    proc = subprocess.run(
        ["ssh", "-F", cfg, "-T", "-O", "forward", "-L", f"{sock}:{defaults.GUEST_SOCKET}", host],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise LimaError(f"re-creating the socket forward failed: {last}")
