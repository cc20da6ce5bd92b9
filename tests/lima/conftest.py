"""Fixtures for the Lima tier: the real, pinned `limactl` (scripts/tools.d/30-limactl.sh)
under a throw-away LIMA_HOME, so the tests never touch the user's ~/.lima.

limactl refuses to run as root. When the tests run as root (CI), every limactl
call goes through a tiny wrapper (COWORK_LIMACTL) that drops to a fresh
unprivileged user, as a real macOS user would be; the Python code under test
runs unchanged. A missing limactl fails the tests: they never skip.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_client import lima

REPO = Path(__file__).resolve().parent.parent.parent
LIMACTL = REPO / ".tools" / "bin" / "limactl"
USER_PREFIX = "cwl-"


@dataclass
class LimaEnv:
    """A private LIMA_HOME and the environment that makes coworkctl and limactl use it."""

    home: Path  # LIMA_HOME
    limactl: Path  # what COWORK_LIMACTL points at (limactl or the dropping wrapper)
    env: dict[str, str]
    user: str | None

    def run_limactl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.limactl), *args], env=self.env, capture_output=True, text=True, timeout=120
        )

    def coworkctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REPO / ".venv" / "bin" / "coworkctl"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture(scope="session")
def limactl_bin() -> Path:
    if not os.access(LIMACTL, os.X_OK):
        pytest.fail(f"{LIMACTL} is missing: run `make setup` (scripts/tools.d/30-limactl.sh)")
    return LIMACTL


@pytest.fixture(scope="session")
def lima_user() -> Iterator[str | None]:
    """A fresh unprivileged user to run limactl as when we are root; None otherwise."""
    if os.geteuid() != 0:
        yield None
        return
    name = USER_PREFIX + secrets.token_hex(3)
    home = Path("/var/tmp") / f"{name}-home"
    subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--shell",
            "/bin/sh",
            "--home-dir",
            str(home),
            "--create-home",
            name,
        ],
        check=True,
    )
    try:
        yield name
    finally:
        subprocess.run(["userdel", name], check=False)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project's wheel, built once by the code coworkctl init uses."""
    d = tmp_path_factory.mktemp("wheel")
    built = lima.build_wheel(d)
    d.chmod(0o755)
    for p in d.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return built


@pytest.fixture()
def lima_env(
    limactl_bin: Path, lima_user: str | None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[LimaEnv]:
    base = Path(tempfile.mkdtemp(prefix="cwl-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "lima"
    home.mkdir()
    workspace = base / "workspace"
    workspace.mkdir()
    # `limactl create` fetches the image and makes the disk: give it a tiny local
    # qcow2 instead of Ubuntu's (no network, and no boot here).
    image = base / "tiny.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    image.chmod(0o644)
    limactl = limactl_bin
    if lima_user:
        pw = pwd.getpwnam(lima_user)
        for d in (home, workspace):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        limactl = base / "limactl"
        limactl.write_text(
            "#!/bin/sh\n"
            f"exec setpriv --reuid={pw.pw_uid} --regid={pw.pw_gid} --init-groups "
            f'env HOME={pw.pw_dir} {limactl_bin} "$@"\n'
        )
        limactl.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COWORK_", "LIMA_"))}
    env.update(
        LIMA_HOME=str(home),
        COWORK_LIMACTL=str(limactl),
        COWORK_WORKSPACE=str(workspace),
        COWORK_VM_NAME="cowork-test",
        COWORK_LIMA_IMAGE=str(image),
    )
    for k, v in env.items():
        if k.startswith(("COWORK_", "LIMA_")):
            monkeypatch.setenv(k, v)
    for k in list(os.environ):
        if k.startswith(("COWORK_", "LIMA_")) and k not in env:
            monkeypatch.delenv(k)
    try:
        yield LimaEnv(home=home, limactl=limactl, env=env, user=lima_user)
    finally:
        for inst in _instances(limactl, env):
            subprocess.run(
                [str(limactl), "--tty=false", "delete", "--force", inst],
                env=env,
                capture_output=True,
                check=False,
            )
        shutil.rmtree(base, ignore_errors=True)


def _instances(limactl: Path, env: dict[str, str]) -> list[str]:
    proc = subprocess.run(
        [str(limactl), "list", "--quiet"], env=env, capture_output=True, text=True, check=False
    )
    return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip()]
