"""A thin typed wrapper around `limactl`, and the cowork VM lifecycle built on it.

Everything goes through the real `limactl` binary ($COWORK_LIMACTL, else `limactl`
on PATH) with `--log-format json`, so its failures are parsed from JSON log lines
(never scraped from text) and surface as one-line `LimaError`s. Instances are read
from `limactl list --json` (JSON Lines).

Kept free of grpc imports: `coworkctl start/stop/list` stay fast; only the agent
health checks (in the CLI) load the client.
"""

from __future__ import annotations

import json
import os
import platform
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
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


def start(name: str, progress: Progress | None = None, timeout: str = START_TIMEOUT) -> None:
    run_limactl(["start", f"--timeout={timeout}", name], timeout=None, progress=progress)


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
    """The lima/ directory: $COWORK_LIMA_DIR, else the one beside this package's source."""
    configured = os.environ.get("COWORK_LIMA_DIR")
    d = Path(configured) if configured else Path(__file__).resolve().parent.parent / "lima"
    if not (d / "cowork.yaml").is_file():
        raise LimaError(
            f"the Lima template is missing: {d / 'cowork.yaml'} "
            "(run coworkctl from a checkout of cowork-sandbox, or set COWORK_LIMA_DIR)"
        )
    return d


@dataclass(frozen=True)
class InitOptions:
    name: str = field(default_factory=defaults.vm_name)
    cpus: int = DEFAULT_CPUS
    memory_gib: float = DEFAULT_MEMORY_GIB
    disk_gib: float = DEFAULT_DISK_GIB
    ubuntu: str = DEFAULT_UBUNTU
    workspace: Path = field(default_factory=defaults.local_workspace)
    # A local path or URL of a disk image to use instead of Lima's Ubuntu list
    # (pre-downloaded images, offline machines, tests): $COWORK_LIMA_IMAGE.
    image: str | None = field(default_factory=lambda: os.environ.get("COWORK_LIMA_IMAGE") or None)

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
    doc["base"] = [
        f"template:_images/ubuntu-{opts.ubuntu}"
        if str(b).startswith("template:_images/ubuntu-")
        else b
        for b in doc.get("base") or []
    ]
    if opts.image:
        doc["images"] = [{"location": opts.image, "arch": lima_arch()}]
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
def init_vm(
    opts: InitOptions,
    *,
    wheel: Path | None = None,
    progress: Progress | None = None,
    start_it: bool = True,
) -> Instance:
    """Create (if needed) and start the cowork VM. Idempotent.

    A new VM gets a fresh token (host: the Lima instance dir, 0600; guest:
    /etc/cowork/token via a data provision) and the agent wheel in its
    dist_dir() (built from this checkout unless `wheel` is given). An existing VM is only started.
    The caller waits for the agent's health.
    """
    opts.validate()
    require_version()
    say = progress or (lambda _msg: None)
    inst = get_instance(opts.name)
    if inst is None:
        workspace = opts.workspace.expanduser()
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="cowork-init-") as tmp:
            if wheel is None:
                say("building the agent wheel")
                wheel = build_wheel(Path(tmp))
            elif not wheel.is_file():
                raise LimaError(f"wheel not found: {wheel}")
            token = generate_token()
            rendered = render_template(opts, token=token)
            say(f"creating Lima VM {opts.name!r} (Ubuntu {opts.ubuntu})")
            try:
                create(opts.name, rendered)
                install_wheel(opts.name, wheel)
            except (LimaError, OSError) as exc:
                # limactl may leave a half-made instance behind: remove it.
                if get_instance(opts.name) is not None:
                    try:
                        delete(opts.name, force=True)
                    except LimaError:
                        pass
                if isinstance(exc, OSError):
                    raise LimaError(f"cannot deliver the agent wheel: {exc}") from None
                raise
        write_token(lima_token(opts.name), token)
        inst = require_instance(opts.name)
    elif not is_cowork_instance(opts.name):
        raise LimaError(
            f"Lima VM {opts.name!r} exists but was not made by coworkctl init "
            f"(no {lima_token(opts.name)}): pick another --name, or delete it"
        )
    if start_it and not inst.running:
        say(f"starting Lima VM {opts.name!r} (the first boot installs the toolchain)")
        start(opts.name, progress=progress)
        inst = require_instance(opts.name)
    return inst


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
