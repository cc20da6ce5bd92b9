"""The Lima tier's harness: the user's real path, `coworkctl init` -> Lima -> `lima:NAME`.

    host = LimaHost.create()         # an unprivileged host user (limactl refuses root),
                                     # a private LIMA_HOME and workspace, owned by that user
    host.coworkctl("init", *host.init_args())   # coworkctl, run AS that user, boots the VM
    host.coworkctl("exec", "--", "true")        # ... and everything else goes lima:NAME
    host.close()                     # deletes what is left, kills nothing it did not start

What is real: limactl v2.2.0 (scripts/tools.d/30-limactl.sh) with Lima's own boot
scripts, cloud-init, guest agent and SSH socket forward; lima/cowork.yaml and
lima/provision/*.sh; the agent; the Claude CLI installed by claude.sh in the guest.
What this machine needs overridden (and nothing else; see lima/README.md, "Tests"):
  - the image: a Debian 12 cloud image built by tests/vm/build-image.sh --lima, booted
    directly (--kernel/--initrd/--kernel-cmdline, --legacy-bios: no OVMF here), because
    Ubuntu's image server is out of reach;
  - KVM: /dev/kvm exists but cannot run a guest, so Lima's QEMU runs through
    lima/qemu-tcg ($QEMU_SYSTEM_X86_64) under TCG;
  - the param CoworkToolchain=false: deb.nodesource.com (Node.js 22) is out of reach;
    the image carries Debian's nodejs/npm, python3-venv, bubblewrap and git instead;
  - --ca-cert for every CA in /usr/local/share/ca-certificates: this network reaches
    PyPI and npm through a TLS-inspecting proxy, which the guest must trust;
  - CoworkAgentArgs=--egress-resolve api.allowed.test=<host gateway>: the scripted
    model runs on the host's loopback, which the egress proxy refuses unless pinned.

coworkctl runs as the host user, as a real user's would, from a venv of the system
python3 (the project's own .venv lives under /root here) with PYTHONPATH on this
checkout, so the code under test is the working tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tests.claude.tls_ca import TestCA, make_test_ca

if TYPE_CHECKING:
    from host_client import CoworkClient

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools" / "lima-e2e"
LIMACTL = REPO / ".tools" / "bin" / "limactl"
BUILD_SCRIPT = REPO / "tests" / "vm" / "build-image.sh"
QEMU_TCG = REPO / "lima" / "qemu-tcg"
HOST_USER = "cowork-e2e"
VM_NAME = "cwe2e"
# What the guest reaches the host's loopback as: QEMU user networking in Lima's
# subnet (192.168.5.0/24) answers the gateway address with the host's 127.0.0.1.
HOST_GATEWAY = "192.168.5.2"
API_NAME = "api.allowed.test"
CA_DIR = Path("/usr/local/share/ca-certificates")
IMAGE_BUILD_TIMEOUT = 1200.0


class HarnessError(RuntimeError):
    """The tier's machinery could not be set up; the message says what to run."""


def log(msg: str) -> None:
    print(f"[lima-e2e {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the host user ------------------------------------------------------------------
def ensure_host_user(name: str = HOST_USER) -> pwd.struct_passwd:
    """The unprivileged user limactl and coworkctl run as (created once, then reused).

    A regular account (uid >= 1000): Lima gives the guest user the host user's uid,
    and a system uid could collide with one of the guest's own system accounts."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise HarnessError(f"the Lima tier runs as root (it creates the host user {name})")
    made = subprocess.run(
        ["useradd", "--create-home", "--shell", "/bin/bash", "--user-group", name],
        capture_output=True,
        text=True,
    )
    try:
        return pwd.getpwnam(name)  # made now, or by a run of the tier in another checkout
    except KeyError:
        raise HarnessError(f"cannot create the host user {name}: {made.stderr.strip()}") from None


# -- coworkctl's interpreter for that user ----------------------------------------------
def _dependencies() -> list[str]:
    """[project] dependencies + [build-system] requires of pyproject.toml (no tomllib:
    the tests stay Python 3.10 compatible)."""
    text = (REPO / "pyproject.toml").read_text()
    out: list[str] = []
    for key in ("\ndependencies = [", "\nrequires = ["):
        start = text.index(key) + len(key)
        block = text[start : text.index("]", start)]
        out += re.findall(r'"([^"]+)"', block)
    return out


def user_venv() -> Path:
    """A venv of /usr/bin/python3 with the project's dependencies (and its build
    requirements: coworkctl init builds the agent wheel), cached per dependency list."""
    deps = _dependencies()
    key = hashlib.sha256("\n".join(deps).encode()).hexdigest()[:12]
    venv = TOOLS / f"venv-{key}"
    with _flock(TOOLS / "venv.lock"):
        if (venv / ".complete").exists():
            return venv
        for old in TOOLS.glob("venv-*"):
            shutil.rmtree(old, ignore_errors=True)
        log(f"building {venv.name} for the host user (system python3 + {len(deps)} packages)")
        py = shutil.which("python3", path="/usr/bin:/bin")
        if not py:
            raise HarnessError("/usr/bin/python3 is missing: run `make setup`")
        r = subprocess.run([py, "-m", "venv", str(venv)], capture_output=True, text=True)
        if r.returncode != 0:
            raise HarnessError(
                f"python3 -m venv failed (make setup installs python3-venv): {r.stderr}"
            )
        pip = [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
        ]
        subprocess.run([*pip, *deps], check=True, timeout=600)
        (venv / ".complete").write_text("ok\n")
    return venv


# -- the image ------------------------------------------------------------------------
@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def disk(self) -> Path:
        return self.dir / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def cmdline(self) -> str:
        return (self.dir / "cmdline").read_text().strip()


def image_key() -> str:
    h = hashlib.sha256(b"--lima\n")
    h.update(BUILD_SCRIPT.read_bytes())
    for var in ("SUITE", "MIRROR", "SIZE"):
        h.update(f"{var}={os.environ.get(var, '')}\n".encode())
    return h.hexdigest()[:16]


def lima_image() -> Image:
    """The Debian cloud image (tests/vm/build-image.sh --lima), cached under
    .tools/lima-e2e/image-<hash of its inputs>; built first when they changed (~1.5 min)."""
    img = Image(TOOLS / f"image-{image_key()}")
    with _flock(TOOLS / "image.lock"):
        if (img.dir / ".complete").exists():
            return img
        for old in TOOLS.glob("image-*"):
            shutil.rmtree(old, ignore_errors=True)
        log(f"building the Lima guest image {img.dir.name} (mmdebstrap, ~1.5 min)")
        t0 = time.monotonic()
        r = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--lima", str(img.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=IMAGE_BUILD_TIMEOUT,
        )
        if r.returncode != 0:
            shutil.rmtree(img.dir, ignore_errors=True)
            tail = r.stdout.decode(errors="replace")[-4000:]
            raise HarnessError(f"the Lima image build failed ({r.returncode}):\n{tail}")
        for p in [img.dir, *img.dir.iterdir()]:
            p.chmod(0o755 if p.is_dir() else 0o644)  # the host user reads it
        (img.dir / ".complete").write_text(f"{time.monotonic() - t0:.1f}\n")
        log(f"Lima guest image built in {time.monotonic() - t0:.0f}s")
    return img


# -- KVM or TCG --------------------------------------------------------------------
def kvm_usable(image: Image, user: pwd.struct_passwd) -> bool:
    """KVM only when it really boots this kernel and the host user may open it."""
    from tests.vm.harness import Image as VMImage
    from tests.vm.harness import kvm_works

    forced = os.environ.get("COWORK_VM_ACCEL")
    if forced:
        return forced == "kvm"
    if not os.path.exists("/dev/kvm"):
        return False
    probe = subprocess.run(
        [
            "setpriv",
            f"--reuid={user.pw_uid}",
            f"--regid={user.pw_gid}",
            "--init-groups",
            "test",
            "-r",
            "/dev/kvm",
            "-a",
            "-w",
            "/dev/kvm",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        return False
    with tempfile.TemporaryDirectory() as tmp:
        vm_image = VMImage(image.dir)  # kernel + initrd under the same names
        return kvm_works(vm_image, Path(tmp))


# -- the host side of one run ----------------------------------------------------------
@dataclass
class LimaHost:
    """A private LIMA_HOME + workspace owned by the host user, and how to run as it."""

    user: pwd.struct_passwd
    base: Path
    venv: Path
    accel: str
    name: str = VM_NAME
    timings: dict[str, float] = field(default_factory=dict)

    @classmethod
    def create(cls, accel: str = "", base: Path | None = None) -> LimaHost:
        """A fresh base dir (or, for development, an existing one from an earlier run)."""
        user = ensure_host_user()
        venv = user_venv()
        if base is None:
            base = Path(tempfile.mkdtemp(prefix="cwe2e-", dir="/tmp"))  # short: socket paths
            base.chmod(0o755)
            for d in ("lima", "workspace", "home"):
                (base / d).mkdir()
                os.chown(base / d, user.pw_uid, user.pw_gid)
        host = cls(user=user, base=base, venv=venv, accel=accel or "tcg")
        host._check_access()
        return host

    def _check_access(self) -> None:
        r = self.run(["test", "-r", str(REPO / "host_client" / "lima.py")], check=False)
        if r.returncode != 0:
            raise HarnessError(
                f"{self.user.pw_name} cannot read {REPO}: the checkout must be world-readable"
            )

    # -- paths ----------------------------------------------------------------------
    @property
    def lima_home(self) -> Path:
        return self.base / "lima"

    @property
    def workspace(self) -> Path:
        return self.base / "workspace"

    @property
    def inst_dir(self) -> Path:
        return self.lima_home / self.name

    @property
    def socket(self) -> Path:
        return self.inst_dir / "sock" / "cowork-agent.sock"

    @property
    def token_file(self) -> Path:
        return self.inst_dir / "cowork-token"

    @property
    def ssh_config(self) -> Path:
        return self.inst_dir / "ssh.config"

    @property
    def target(self) -> str:
        return f"lima:{self.name}"

    # -- running as the host user ----------------------------------------------------
    def env(self) -> dict[str, str]:
        env = {
            "HOME": str(self.base / "home"),
            "USER": self.user.pw_name,
            "LOGNAME": self.user.pw_name,
            "PATH": f"{self.venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "PYTHONPATH": str(REPO),
            "LANG": "C.UTF-8",
            "LIMA_HOME": str(self.lima_home),
            "COWORK_LIMACTL": str(LIMACTL),
            "COWORK_WORKSPACE": str(self.workspace),
            "COWORK_VM_NAME": self.name,
            "COWORK_TARGET": self.target,
        }
        if self.accel == "tcg":
            env["QEMU_SYSTEM_X86_64"] = str(QEMU_TCG)
        return env

    def argv(self, command: Sequence[str], **extra_env: str) -> list[str]:
        """`command` as the host user, with the tier's environment (and nothing else)."""
        u = self.user
        env = [f"{k}={v}" for k, v in {**self.env(), **extra_env}.items()]
        return [
            "setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups",
            "env", "-i", *env, *command,
        ]  # fmt: skip

    def run(
        self,
        command: Sequence[str],
        *,
        input: bytes | None = None,
        timeout: float = 120,
        check: bool = False,
    ) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(
            self.argv(command),
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=self.base,
        )
        if check and r.returncode != 0:
            raise HarnessError(
                f"{' '.join(command)} failed ({r.returncode}): "
                f"{r.stderr.decode(errors='replace')[-2000:]}"
            )
        return r

    def coworkctl_argv(self, *args: str) -> list[str]:
        return self.argv([str(self.venv / "bin" / "python"), "-m", "host_client.cli", *args])

    def coworkctl(
        self, *args: str, input: bytes | None = None, timeout: float = 120
    ) -> subprocess.CompletedProcess[bytes]:
        return self.run(
            [str(self.venv / "bin" / "python"), "-m", "host_client.cli", *args],
            input=input,
            timeout=timeout,
        )

    def on_pty(
        self, argv: Sequence[str], typed: bytes, *, wait_for: bytes, timeout: float = 90
    ) -> tuple[int, str]:
        """Run `argv` (as the user) on a real terminal; once `wait_for` shows up, type
        `typed`; return (exit code, everything the terminal showed)."""
        import pty
        import select

        master, slave = pty.openpty()
        proc = subprocess.Popen(
            list(argv), stdin=slave, stdout=slave, stderr=slave, start_new_session=True
        )
        os.close(slave)
        out = bytearray()
        sent = False
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if not sent and wait_for in out:
                    os.write(master, typed)
                    sent = True
                ready, _, _ = select.select([master], [], [], 0.2)
                if ready:
                    try:
                        data = os.read(master, 65536)
                    except OSError:
                        break  # EIO: the terminal's last writer is gone
                    if not data:
                        break
                    out += data
                elif proc.poll() is not None:
                    break
            code = proc.wait(max(1.0, deadline - time.monotonic()))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            os.close(master)
        return code, out.decode("utf-8", "replace")

    def limactl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        return self.run([str(LIMACTL), "--tty=false", *args], timeout=timeout)

    def ssh(self, command: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        """A command in the guest over Lima's own SSH (its ControlMaster)."""
        return self.run(
            ["ssh", "-F", str(self.ssh_config), f"lima-{self.name}", command], timeout=timeout
        )

    def client(self, connect_timeout: float = 10.0) -> CoworkClient:
        """A persistent CoworkClient on lima:NAME (in this process, as root; the host
        socket and token are the user's, 0600, which root may open)."""
        from host_client import CoworkClient

        old = os.environ.get("LIMA_HOME")
        os.environ["LIMA_HOME"] = str(self.lima_home)
        try:
            return CoworkClient(self.target, str(self.token_file), connect_timeout=connect_timeout)
        finally:
            if old is None:
                os.environ.pop("LIMA_HOME", None)
            else:
                os.environ["LIMA_HOME"] = old

    # -- the scripted model's TLS ---------------------------------------------------------
    @property
    def test_ca(self) -> TestCA:
        """A CA made for this run, installed in the guest by `init --ca-cert`: the agent's
        API relay sends the credential over verified TLS only, so the scripted model on the
        host serves https://api.allowed.test with a certificate this CA signed."""
        d = self.base / "ca"
        if not (d / "ca.pem").exists():
            d.mkdir(exist_ok=True)
            d.chmod(0o755)
            make_test_ca(d, [API_NAME], ["127.0.0.1", HOST_GATEWAY])
        return TestCA(d / "ca.pem", d / "server.pem", d / "server.key")

    # -- init ------------------------------------------------------------------------
    def init_args(self, image: Image, *extra: str) -> list[str]:
        """`coworkctl init` for this machine: the template as written, plus only the
        overrides the module docstring lists."""
        args = [
            "init",
            "--cpus", "2",
            "--memory", "3",
            "--image", str(image.disk),
            "--kernel", str(image.kernel),
            "--initrd", str(image.initrd),
            "--kernel-cmdline", image.cmdline,
            "--legacy-bios",
            "--param", "CoworkToolchain=false",
            "--param", f"CoworkAgentArgs=--egress-resolve {API_NAME}={HOST_GATEWAY}",
        ]  # fmt: skip
        for ca in [*sorted(CA_DIR.glob("*.crt")), self.test_ca.ca_cert]:
            args += ["--ca-cert", str(ca)]
        return [*args, *extra]

    # -- what is left ------------------------------------------------------------------
    def processes(self) -> list[tuple[int, str]]:
        """Processes of the host user that belong to this run (their command line
        names our LIMA_HOME): QEMU, Lima's host agent, SSH masters."""
        out = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if d.stat().st_uid != self.user.pw_uid:
                    continue
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.base) in cmd:
                out.append((int(d.name), cmd.strip()))
        return out

    def close(self) -> None:
        """Delete the VM if a test left it, then end this run's leftover processes
        (by pid, only those naming our LIMA_HOME), then the files."""
        if self.inst_dir.exists():
            self.limactl("delete", "--force", self.name, timeout=120)
        for pid, _cmd in self.processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)

    def diagnostics(self) -> str:
        """What to read when the VM misbehaved: Lima's host agent log (without its
        debug lines), the guest console, and the agent's journal if SSH still works."""
        parts = []
        for name, keep in (("ha.stderr.log", 40), ("serial.log", 60)):
            with contextlib.suppress(OSError):
                text = (self.inst_dir / name).read_bytes().decode(errors="replace")
                lines = [ln for ln in text.splitlines() if '"level":"debug"' not in ln]
                parts.append(f"--- {name} (tail) ---\n" + "\n".join(lines[-keep:]))
        if self.inst_dir.exists():
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                j = self.ssh(
                    "sudo journalctl --no-pager -n 40 -u cowork-agent -u cowork-workspace", 20
                )
                parts.append("--- journal (cowork units) ---\n" + j.stdout.decode(errors="replace"))
        return "\n".join(parts) or "(no Lima logs)"
