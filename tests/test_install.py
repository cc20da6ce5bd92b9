"""Installing the host side (issue #14, "First run, on Linux and on the Mac").

`make setup` and `pip install` of the wheel must work on a machine without the system
package tools: here PATH holds python3, make and a few coreutils, and apt-get, dpkg, sudo,
brew & co. are traps that record any call. Offline: the scratch venvs find pip, setuptools
and the dependencies in this test run's own venv (a .pth line), and pip gets no index.
Everything runs on a copy of the tree, so the installed code cannot come from the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.install

TREE = ["pyproject.toml", "README.md", "Makefile", "cowork", "guest_agent", "host_client", "lima"]
TREE += ["scripts"]
TOOLS = ["make", "bash", "sh", "env", "touch", "mkdir", "rm", "cat", "uname", "ls", "dirname"]
PACKAGE_TOOLS = ["apt-get", "apt", "dpkg", "sudo", "brew", "dnf", "yum", "apk", "pacman", "port"]


@dataclass(frozen=True)
class Box:
    """A copy of the tree, a PATH without package tools, and the environment to run in."""

    root: Path
    tree: Path
    env: dict[str, str]
    trap_log: Path

    def run(
        self, argv: list[str], cwd: Path, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def venv(self, name: str) -> Path:
        """A venv of the base interpreter, with pip, setuptools and the dependencies reached
        through a .pth line to this test run's venv (no pip of its own: that one would win)."""
        path = self.root / name
        r = self.run(["python3", "-m", "venv", "--without-pip", str(path)], cwd=self.root)
        assert r.returncode == 0, r.stderr
        (site_packages(path) / "_deps_from_test_venv.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n"
        )
        return path

    def package_tools_called(self) -> str:
        return self.trap_log.read_text() if self.trap_log.exists() else ""


def site_packages(venv: Path) -> Path:
    (sp,) = (venv / "lib").glob("python3*/site-packages")
    return sp


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Box]:
    root = tmp_path_factory.mktemp("install")
    tree = root / "src"
    tree.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for item in TREE:
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, tree / item, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(src, tree / item)
    bindir = root / "bin"
    bindir.mkdir()
    os.symlink(getattr(sys, "_base_executable", sys.executable), bindir / "python3")
    for tool in TOOLS:
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run this test"
        os.symlink(found, bindir / tool)
    trap_log = root / "package-tools-called"
    for tool in PACKAGE_TOOLS:
        trap = bindir / tool
        trap.write_text(f'#!/bin/sh\necho "{tool} $*" >> "$TRAP_LOG"\nexit 1\n')
        trap.chmod(0o755)
    keep = ("HOME", "LANG", "LC_ALL", "TMPDIR")
    env = {k: v for k, v in os.environ.items() if k in keep}
    env |= {
        "PATH": str(bindir),
        "TRAP_LOG": str(trap_log),
        "HOME": str(root / "home"),
        "PIP_NO_INDEX": "1",  # offline: everything comes from the test run's venv
        "PIP_NO_BUILD_ISOLATION": "0",  # (pip's spelling of --no-build-isolation)
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    yield Box(root, tree, env, trap_log)


def test_make_setup_installs_the_host_side_without_package_tools(box: Box) -> None:
    # The venv exists already (made as `make setup` makes it, plus the .pth to the
    # dependencies); `make setup` then runs its own pip steps on it.
    venv = box.venv("setup-venv")
    r = box.run(["make", "setup", f"VENV={venv}"], cwd=box.tree)
    assert r.returncode == 0, r.stdout + r.stderr
    assert box.package_tools_called() == ""
    help_ = box.run([str(venv / "bin" / "coworkctl"), "--help"], cwd=box.root)
    assert help_.returncode == 0 and "usage: coworkctl" in help_.stdout


def test_the_traps_see_the_test_tools_installer(box: Box, tmp_path: Path) -> None:
    # Not vacuous: `make tools` (what `make test` adds) does reach for them on this PATH.
    log = tmp_path / "called"
    r = subprocess.run(
        ["make", "tools"],
        cwd=box.tree,
        env={**box.env, "TRAP_LOG": str(log)},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0
    assert log.read_text() != ""


@pytest.fixture(scope="module")
def wheel(box: Box) -> Path:
    out = box.root / "dist"
    py = sys.executable  # pip and setuptools of the test run; PATH has no package tools
    r = box.run([py, "-m", "pip", "wheel", "--no-deps", "-w", str(out), str(box.tree)], box.root)
    assert r.returncode == 0, r.stderr
    (whl,) = out.glob("cowork_sandbox-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(box: Box, wheel: Path) -> Path:
    venv = box.venv("wheel-venv")
    r = box.run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", str(wheel)], box.root
    )
    assert r.returncode == 0, r.stderr
    assert box.package_tools_called() == ""
    return venv


@pytest.mark.parametrize("args", [["--help"], ["init", "--help"], ["exec", "--help"]])
def test_coworkctl_from_the_wheel_runs_outside_the_tree(
    box: Box, installed: Path, args: list[str]
) -> None:
    r = box.run([str(installed / "bin" / "coworkctl"), *args], cwd=box.root)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: coworkctl")


def test_library_from_the_wheel_is_the_installed_copy(box: Box, installed: Path) -> None:
    code = (
        "import host_client, cowork.agent.v1.process_pb2_grpc\n"
        "from host_client import CoworkClient, AsyncCoworkClient\n"
        "print(host_client.__file__)"
    )
    r = box.run([str(installed / "bin" / "python"), "-c", code], cwd=box.root)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_relative_to(site_packages(installed))


def test_lima_template_from_the_wheel_is_found_by_init(box: Box, installed: Path) -> None:
    code = "from host_client import lima; print(lima.template_dir())"
    r = box.run([str(installed / "bin" / "python"), "-c", code], cwd=box.root)
    assert r.returncode == 0, r.stderr
    template = Path(r.stdout.strip())
    assert template.is_relative_to(site_packages(installed))
    provision = {p.name for p in (template / "provision").iterdir()}
    assert (template / "cowork.yaml").is_file() and "agent.sh" in provision


def test_wheel_carries_the_generated_contract(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    generated = {f"cowork/agent/v1/{p.name}" for p in (REPO / "cowork/agent/v1").glob("*_pb2*.py*")}
    assert generated and generated <= names
