"""A throw-away OpenSSH server on loopback for the SSH baselines.

Everything lives under one private directory: host key, client key,
authorized_keys, known_hosts, sshd_config and ssh_config. The server listens
on 127.0.0.1 only, allows only the generated key (root login with that key is
allowed because the bench runs as root on these machines), and is stopped and
removed by `close()`.

    with Sshd() as s:
        subprocess.run([*s.ssh(), "true"])            # one connection per call
        s.start_master()
        subprocess.run([*s.ssh(mux=True), "true"])    # through the ControlMaster
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SSHD_CANDIDATES = ("/usr/sbin/sshd", "/usr/local/sbin/sshd")


class SshdUnavailable(RuntimeError):
    """sshd or ssh is missing, or the server did not come up."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_sshd() -> str | None:
    for c in (shutil.which("sshd"), *SSHD_CANDIDATES):
        if c and os.access(c, os.X_OK):
            return c
    return None


def ssh_version() -> str:
    try:
        out = subprocess.run(["ssh", "-V"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (out.stderr or out.stdout).strip()


class Sshd:
    """A private sshd on 127.0.0.1:<free port> and the client options to reach it."""

    HOST = "cowork-bench"

    def __init__(self, max_sessions: int = 128) -> None:
        sshd = find_sshd()
        if sshd is None or shutil.which("ssh") is None:
            raise SshdUnavailable("openssh-server/client not installed (make setup installs them)")
        self.sshd = sshd
        self.dir = Path(tempfile.mkdtemp(prefix="cwb-sshd-"))
        self.dir.chmod(0o700)
        self.port = _free_port()
        self.user = getpass.getuser()
        self.control_path = self.dir / "cm.sock"
        self._proc: subprocess.Popen[bytes] | None = None
        self._master = False
        try:
            self._write_files(max_sessions)
            self._start()
        except BaseException:
            self.close()
            raise

    # -- set-up ------------------------------------------------------------------
    def _keygen(self, path: Path) -> None:
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
            check=True,
            stdin=subprocess.DEVNULL,
        )

    def _write_files(self, max_sessions: int) -> None:
        d = self.dir
        self._keygen(d / "host_key")
        self._keygen(d / "client_key")
        (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
        (d / "authorized_keys").chmod(0o600)
        host_pub = (d / "host_key.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        (d / "sshd_config").write_text(
            "\n".join(
                [
                    "ListenAddress 127.0.0.1",
                    f"Port {self.port}",
                    f"HostKey {d / 'host_key'}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {d / 'authorized_keys'}",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "StrictModes no",
                    "PrintMotd no",
                    "PrintLastLog no",
                    "UseDNS no",
                    # Concurrency workloads open up to 64 sessions/handshakes at once.
                    f"MaxSessions {max_sessions}",
                    f"MaxStartups {max_sessions}:30:{max_sessions * 2}",
                    "Subsystem sftp internal-sftp",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        (d / "ssh_config").write_text(
            "\n".join(
                [
                    f"Host {self.HOST}",
                    "  HostName 127.0.0.1",
                    f"  Port {self.port}",
                    f"  User {self.user}",
                    f"  IdentityFile {d / 'client_key'}",
                    "  IdentitiesOnly yes",
                    f"  UserKnownHostsFile {d / 'known_hosts'}",
                    "  StrictHostKeyChecking yes",
                    "  BatchMode yes",
                    "  LogLevel ERROR",
                    "  ForwardAgent no",
                    "  ForwardX11 no",
                    "",
                ]
            )
        )

    def _start(self) -> None:
        # The privilege-separation directory Debian's sshd insists on.
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self._proc = subprocess.Popen(
            [self.sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "sshd.log", "wb"),  # noqa: SIM115 - lives as long as sshd
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise SshdUnavailable(f"sshd exited: {self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    pass
            except OSError:
                time.sleep(0.02)
                continue
            probe = subprocess.run(
                [*self.ssh(), "true"], capture_output=True, timeout=30, stdin=subprocess.DEVNULL
            )
            if probe.returncode == 0:
                return
            raise SshdUnavailable(
                f"ssh to the bench sshd failed: {probe.stderr.decode(errors='replace').strip()}"
                f" / {self.log_tail()}"
            )
        raise SshdUnavailable("sshd did not listen within 15 s")

    def log_tail(self) -> str:
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")[-500:].strip()
        except OSError:
            return ""

    # -- client side ---------------------------------------------------------------
    def ssh(self, mux: bool = False) -> list[str]:
        """argv prefix of an `ssh` to the bench host; append the remote command."""
        return ["ssh", *self.options(mux), self.HOST]

    def options(self, mux: bool = False) -> list[str]:
        opts = ["-F", str(self.dir / "ssh_config")]
        if mux:
            opts += ["-o", "ControlMaster=no", "-o", f"ControlPath={self.control_path}"]
        else:
            opts += ["-o", "ControlMaster=no", "-o", "ControlPath=none"]
        return opts

    def scp(self, mux: bool = False) -> list[str]:
        return ["scp", "-q", *self.options(mux)]

    def remote(self, path: str) -> str:
        return f"{self.HOST}:{path}"

    def start_master(self) -> None:
        """A persistent ControlMaster connection that `ssh(mux=True)` reuses."""
        if self._master:
            return
        subprocess.run(
            [
                "ssh",
                "-F",
                str(self.dir / "ssh_config"),
                "-o",
                "ControlMaster=yes",
                "-o",
                f"ControlPath={self.control_path}",
                "-o",
                "ControlPersist=yes",
                "-N",
                "-f",
                self.HOST,
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        self._master = True

    def stop_master(self) -> None:
        if not self._master:
            return
        subprocess.run(
            [*self.ssh(mux=True)[:-1], "-O", "exit", self.HOST],
            capture_output=True,
            timeout=10,
        )
        self._master = False

    def close(self) -> None:
        try:
            self.stop_master()
        except (OSError, subprocess.SubprocessError):
            pass
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Sshd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
