"""The VM harness: a real Debian 12 guest under QEMU with a real virtio-vsock device.

    image  = guest_image()          # cached under .tools/vm/image-<hash>/ (tests/vm/build-image.sh)
    vm = VM(image, workdir)         # vhost-device-vsock + QEMU (KVM if it really boots, else TCG)
    vm.start(); vm.wait_ssh()       # user-mode net with a hostfwd to the guest's sshd
    install_agent(vm)               # the project's wheel + lima/provision/agent.sh, as Lima runs it
    CoworkClient(vm.hvsock_target, vm.token_file)   # hvsock:<vhost-device-vsock uds>:7070
    vm.stop()                       # every process we started, always

Every wait is bounded; a VM that does not come up raises VMError with the
console's tail. Also usable from bench/vm_latency.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from cowork.defaults import VSOCK_PORT

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / ".tools" / "vm"
BUILD_SCRIPT = Path(__file__).resolve().parent / "build-image.sh"
PROVISION = REPO / "lima" / "provision"
VHOST_DEVICE_VSOCK = TOOLS / "cargo" / "bin" / "vhost-device-vsock"
GUEST_CID = 3
IMAGE_BUILD_TIMEOUT = 900.0
BOOT_TIMEOUT = float(os.environ.get("COWORK_VM_BOOT_TIMEOUT", "240"))
KVM_PROBE_SECONDS = 6.0


class VMError(RuntimeError):
    """The guest could not be built, booted or provisioned; the message says where it stopped."""


def log(msg: str) -> None:
    print(f"[vm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Image:
    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.dir / "initrd.img"

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs.img"

    @property
    def ssh_key(self) -> Path:
        return self.dir / "id_ed25519"


def require_tools() -> None:
    missing = [
        t
        for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "mkfs.ext4", "ssh")
        if shutil.which(t) is None
    ]
    if not VHOST_DEVICE_VSOCK.exists():
        missing.append(str(VHOST_DEVICE_VSOCK))
    if missing:
        raise VMError(
            "VM harness tools missing: "
            + ", ".join(missing)
            + " (run `make setup`, which runs scripts/tools.d/40-vm.sh)"
        )


def image_key() -> str:
    h = hashlib.sha256()
    h.update(BUILD_SCRIPT.read_bytes())
    for var in ("SUITE", "MIRROR", "SIZE"):
        h.update(f"{var}={os.environ.get(var, '')}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def guest_image() -> Image:
    """The cached guest image, built first when its inputs changed (~1 min)."""
    key = image_key()
    img = Image(TOOLS / f"image-{key}")
    with _flock(TOOLS / "image.lock"):
        if (img.dir / ".complete").exists():
            return img
        # Old images (other keys) go: they are 3 GB sparse files each.
        for old in TOOLS.glob("image-*"):
            if old.is_dir() and old != img.dir:
                shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(img.dir, ignore_errors=True)
        log(f"building the guest image {img.dir.name} (mmdebstrap, ~1 min)")
        t0 = time.monotonic()
        r = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(img.dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=IMAGE_BUILD_TIMEOUT,
        )
        if r.returncode != 0:
            tail = r.stdout.decode(errors="replace")[-4000:]
            raise VMError(f"guest image build failed ({r.returncode}):\n{tail}")
        (img.dir / ".complete").write_text(f"{time.monotonic() - t0:.1f}\n")
        log(f"guest image built in {time.monotonic() - t0:.0f}s")
    return img


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kvm_works(image: Image, workdir: Path) -> bool:
    """Does KVM really boot the kernel here? (/dev/kvm may exist and still fail.)"""
    forced = os.environ.get("COWORK_VM_ACCEL")
    if forced:
        return forced == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    out = workdir / "kvm-probe.log"
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{out}",
        "-kernel",
        str(image.kernel),
        "-append",
        "console=ttyS0 earlyprintk=ttyS0 panic=-1",
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + KVM_PROBE_SECONDS
    ok = False
    try:
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and b"Linux version" in out.read_bytes():
                ok = True
                break
            time.sleep(0.1)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(5)
    return ok


@dataclass
class VM:
    image: Image
    workdir: Path
    memory_mb: int = 2048
    cpus: int = 2
    accel: str = ""
    ssh_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    boot_seconds: float = 0.0
    token_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.token_file = self.workdir / "token"

    @property
    def vhost_socket(self) -> Path:
        return self.workdir / "vhost.sock"

    @property
    def uds(self) -> Path:
        """vhost-device-vsock's host-side hybrid-vsock socket."""
        return self.workdir / "vsock.sock"

    @property
    def console(self) -> Path:
        return self.workdir / "console.log"

    @property
    def hvsock_target(self) -> str:
        return f"hvsock:{self.uds}:{VSOCK_PORT}"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        require_tools()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.accel:
            self.accel = "kvm" if kvm_works(self.image, self.workdir) else "tcg"
        log(f"accelerator: {self.accel}")
        overlay = self.workdir / "overlay.qcow2"
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.image.rootfs),
                str(overlay),
            ],
            check=True,
            timeout=60,
        )
        self.ssh_port = self.ssh_port or free_port()
        vlog = open(self.workdir / "vhost-device-vsock.log", "wb")  # noqa: SIM115
        self._spawn(
            [
                str(VHOST_DEVICE_VSOCK),
                "--vm",
                f"guest-cid={GUEST_CID},socket={self.vhost_socket},uds-path={self.uds}",
            ],
            vlog,
        )
        _wait_for(lambda: self.vhost_socket.exists(), 10, "vhost-device-vsock socket")
        cpu = ["-cpu", "host"] if self.accel == "kvm" else ["-cpu", "max"]
        mem = f"{self.memory_mb}M"
        qlog = open(self.workdir / "qemu.log", "wb")  # noqa: SIM115
        cmd = [
            "qemu-system-x86_64",
            "-accel",
            self.accel,
            *cpu,
            "-smp",
            str(self.cpus),
            "-m",
            mem,
            # vhost-user devices need the guest RAM shared with the backend.
            "-object",
            f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa",
            "node,memdev=mem",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.console}",
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            "console=ttyS0 root=/dev/vda rw panic=-1 quiet loglevel=4 systemd.show_status=1",
            "-drive",
            f"file={overlay},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
            "-netdev",
            f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.ssh_port}-:22",
            "-device",
            "virtio-net-pci,netdev=n0",
            "-chardev",
            f"socket,id=vsock0,path={self.vhost_socket}",
            "-device",
            "vhost-user-vsock-pci,chardev=vsock0",
        ]
        self._t0 = time.monotonic()
        self._spawn(cmd, qlog)

    def _spawn(self, cmd: Sequence[str], out: IO[bytes]) -> None:
        p = subprocess.Popen(
            list(cmd),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(p)

    def wait_ssh(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until sshd in the guest runs commands; returns seconds since QEMU started."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                r = self.ssh("true", timeout=10, check=False, connect_timeout=3)
                if r.returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() > deadline:
                raise VMError(f"guest sshd not reachable after {timeout:g}s\n{self.console_tail()}")
            time.sleep(0.5)
        self.boot_seconds = time.monotonic() - self._t0
        log(f"guest up (ssh) in {self.boot_seconds:.1f}s")
        return self.boot_seconds

    def _check_alive(self) -> None:
        for p in self.procs:
            if p.poll() is not None:
                raise VMError(
                    f"{Path(str(p.args[0])).name} exited with {p.returncode}\n"  # type: ignore[index]
                    f"{self.logs_tail()}"
                )

    def stop(self) -> None:
        """Stop QEMU (then the vsock backend): SIGTERM, then SIGKILL; never leaves a process."""
        for p in reversed(self.procs):
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        self.procs.clear()

    # -- talking to the guest ----------------------------------------------------
    def ssh_argv(self, connect_timeout: int = 10) -> list[str]:
        return [
            "ssh",
            "-q",
            "-i",
            str(self.image.ssh_key),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={connect_timeout}",
            "-p",
            str(self.ssh_port),
            "root@127.0.0.1",
        ]

    def ssh(
        self,
        command: str,
        *,
        timeout: float = 120,
        check: bool = True,
        stdin: bytes | None = None,
        connect_timeout: int = 10,
    ) -> subprocess.CompletedProcess[bytes]:
        r = subprocess.run(
            [*self.ssh_argv(connect_timeout), command],
            input=stdin,
            capture_output=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise VMError(
                f"guest command failed ({r.returncode}): {command}\n"
                f"{r.stdout.decode(errors='replace')[-2000:]}"
                f"{r.stderr.decode(errors='replace')[-2000:]}"
            )
        return r

    def put_tree(self, local: Path, remote: str, timeout: float = 180) -> None:
        """Copy a local directory's contents to `remote` in the guest (tar over ssh)."""
        tar = subprocess.run(
            ["tar", "-C", str(local), "-cf", "-", "."], stdout=subprocess.PIPE, check=True
        )
        q = shlex.quote(remote)
        self.ssh(f"mkdir -p {q} && tar -C {q} -xf -", stdin=tar.stdout, timeout=timeout)

    # -- diagnostics -------------------------------------------------------------
    def console_tail(self, lines: int = 80) -> str:
        try:
            text = self.console.read_bytes().decode(errors="replace")
        except OSError:
            return "(no console output)"
        return "--- guest console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    def logs_tail(self) -> str:
        parts = [self.console_tail()]
        for name in ("qemu.log", "vhost-device-vsock.log"):
            with contextlib.suppress(OSError):
                t = (self.workdir / name).read_bytes().decode(errors="replace")[-2000:]
                if t.strip():
                    parts.append(f"--- {name} ---\n{t}")
        return "\n".join(parts)

    def agent_journal(self) -> str:
        try:
            r = self.ssh(
                "systemctl --no-pager status cowork-agent.service; "
                "journalctl --no-pager -u cowork-agent.service -n 60",
                timeout=20,
                check=False,
                connect_timeout=3,
            )
            return r.stdout.decode(errors="replace") + r.stderr.decode(errors="replace")
        except (subprocess.TimeoutExpired, OSError) as exc:
            return f"(no journal: {exc})"


def _wait_for(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise VMError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# -- the agent: the project's wheel, installed by lima/provision/agent.sh ------------


def _requirements_key() -> str:
    text = (REPO / "pyproject.toml").read_text()
    start = text.index("dependencies = [")
    return hashlib.sha256(text[start : text.index("]", start)].encode()).hexdigest()[:16]


def build_wheelhouse(dest: Path) -> Path:
    """dest/dist/<project wheel> and dest/wheels/<dependencies, cp311 manylinux, cached>."""
    dist = dest / "dist"
    wheels = dest / "wheels"
    dist.mkdir(parents=True, exist_ok=True)
    # Build from a copy: never write build/ or egg-info into the shared checkout.
    with tempfile.TemporaryDirectory(prefix="cw-wheel-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for name in ("host_client", "guest_agent", "cowork"):
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "-w",
                str(dist),
                str(src),
            ],
            check=True,
            timeout=300,
        )
    (wheel,) = dist.glob("*.whl")
    cache = TOOLS / f"wheels-{_requirements_key()}"
    with _flock(TOOLS / "wheels.lock"):
        if not (cache / ".complete").exists():
            shutil.rmtree(cache, ignore_errors=True)
            log("downloading the agent's dependency wheels for the guest (cp311, manylinux)")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                    "--python-version",
                    "3.11",
                    "--implementation",
                    "cp",
                    "--platform",
                    "manylinux_2_17_x86_64",
                    "--platform",
                    "manylinux2014_x86_64",
                    "--platform",
                    "manylinux_2_28_x86_64",
                    "--platform",
                    "any",
                    "-d",
                    str(cache),
                    str(wheel),
                ],
                check=True,
                timeout=600,
            )
            for w in cache.glob("cowork_sandbox-*.whl"):
                w.unlink()
            (cache / ".complete").write_text("ok\n")
    shutil.copytree(cache, wheels, ignore=shutil.ignore_patterns(".complete"))
    return wheel


def install_agent(vm: VM) -> None:
    """Install the agent exactly as Lima's provisioning does: lima/provision/agent.sh.

    The harness only supplies what Lima supplies through params/data: the
    wheel, an offline wheelhouse (the guest has no PyPI here), the token file.
    """
    if not (PROVISION / "agent.sh").exists():
        raise VMError(f"{PROVISION}/agent.sh is missing: the VM harness installs the agent with it")
    t0 = time.monotonic()
    stage = vm.workdir / "stage"
    if stage.exists():
        shutil.rmtree(stage)
    wheel = build_wheelhouse(stage)
    shutil.copytree(PROVISION, stage / "provision")
    token = secrets.token_hex(32)
    vm.token_file.write_text(token + "\n")
    vm.token_file.chmod(0o600)
    (stage / "token").write_text(token + "\n")
    (stage / "token").chmod(0o600)
    vm.put_tree(stage, "/tmp/cowork-stage")
    env = {
        "COWORK_WHEEL": f"/tmp/cowork-stage/dist/{wheel.name}",
        "COWORK_WHEELHOUSE": "/tmp/cowork-stage/wheels",
        "COWORK_TOKEN_SRC": "/tmp/cowork-stage/token",
        "COWORK_VSOCK": "1",
        "COWORK_VSOCK_PORT": str(VSOCK_PORT),
        "COWORK_SOCKET_USER": "",
        "COWORK_RUN_AS": "",
        "COWORK_START": "1",
    }
    assign = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    r = vm.ssh(f"{assign} bash /tmp/cowork-stage/provision/agent.sh", timeout=600, check=False)
    out = (r.stdout + r.stderr).decode(errors="replace")
    if r.returncode != 0:
        raise VMError(f"lima/provision/agent.sh failed ({r.returncode}):\n{out[-4000:]}")
    vm.ssh("rm -f /tmp/cowork-stage/token")
    # The readiness probe Lima runs, as root here.
    if (PROVISION / "probe.sh").exists():
        deadline = time.monotonic() + 60
        while True:
            p = vm.ssh("bash /tmp/cowork-stage/provision/probe.sh", check=False, timeout=30)
            if p.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise VMError(
                    "lima/provision/probe.sh never passed:\n"
                    + (p.stdout + p.stderr).decode(errors="replace")
                )
            time.sleep(0.5)
    log(f"agent installed by lima/provision/agent.sh in {time.monotonic() - t0:.1f}s")
    for line in out.strip().splitlines()[-3:]:
        log(f"  {line}")
