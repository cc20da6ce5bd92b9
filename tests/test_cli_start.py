"""The CLI's own start (issue #14): what a fresh `coworkctl exec` through a running mux imports.

No timings here (bench/cli_start.py measures them); these tests check the causes instead:
the console script enters through host_client.entry, whose mux fast path loads none of the
heavy modules, and whose target/token lookup agrees with host_client.targets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowork import defaults
from host_client import mux, targets

from .conftest import REPO, AgentProc
from .test_mux import ctl

# What the fast path must not load: grpc and protobuf, the full CLI (argparse and the command
# modules), yaml, and the stdlib modules that cost a fresh process the most (typing,
# dataclasses, pathlib, subprocess, threading), through host_client.targets/cowork.defaults.
HEAVY = [
    "grpc",
    "google.protobuf",
    "yaml",
    "argparse",
    "host_client.cli",
    "host_client.client",
    "host_client.targets",
    "cowork.defaults",
    "typing",
    "dataclasses",
    "pathlib",
    "subprocess",
    "threading",
]

PROBE = """
import json, sys
before = set(sys.modules)
from host_client.entry import fast_exec
code = fast_exec(sys.argv[1:])
print(json.dumps({"code": code, "new": sorted(set(sys.modules) - before)}), file=sys.stderr)
"""


@pytest.fixture
def running_mux(agent: AgentProc) -> Iterator[dict[str, str]]:
    d = tempfile.mkdtemp(prefix="cws-", dir="/tmp")  # short: unix socket paths are limited
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "COWORK_MUX")}
    env["XDG_STATE_HOME"] = d
    assert ctl(agent, env, "mux", "start", "--idle", "60").returncode == 0
    yield env
    ctl(agent, env, "mux", "stop")
    shutil.rmtree(d, ignore_errors=True)


def fast_path_imports(agent: AgentProc, env: dict[str, str], *command: str) -> dict[str, object]:
    argv = ["--target", agent.target, "--token-file", str(agent.token_file), "exec", "--"]
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *argv, *command],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(r.stderr.decode().splitlines()[-1])
    return result


def heavy(modules: object) -> list[str]:
    assert isinstance(modules, list)
    return [m for m in modules if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_console_script_enters_through_the_fast_path() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^coworkctl = "host_client\.entry:main"', text, re.M)


def test_exec_through_a_running_mux_imports_nothing_heavy(
    agent: AgentProc, running_mux: dict[str, str]
) -> None:
    got = fast_path_imports(agent, running_mux, "true")
    assert got["code"] == 0  # it did go through the mux
    assert heavy(got["new"]) == []


def test_the_heavy_module_check_can_tell(agent: AgentProc, running_mux: dict[str, str]) -> None:
    # The same probe, when the fast path cannot run (COWORK_MUX=0) and the full CLI is what
    # a process would import next, does see heavy modules: the check above is not vacuous.
    probe = PROBE.replace("code = fast_exec(sys.argv[1:])", "import host_client.cli; code = 0")
    r = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        env=running_mux,
        capture_output=True,
        timeout=60,
    )
    assert "argparse" in heavy(json.loads(r.stderr.decode().splitlines()[-1])["new"])


def test_interpreter_start_has_no_import_hook_of_the_editable_install() -> None:
    # pyproject's package-dir makes `pip install -e` a plain sys.path line; the import hook
    # setuptools installs otherwise costs every fresh coworkctl pathlib and importlib.util.
    r = subprocess.run(
        [sys.executable, "-c", "import sys; print(sorted(sys.modules))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "__editable__" not in r.stdout and "'pathlib'" not in r.stdout


@pytest.mark.parametrize(
    ("target", "token_file", "env"),
    [
        ("unix:/tmp/x.sock", "TOKEN", {}),
        (None, None, {"COWORK_TARGET": "unix:/tmp/y.sock", "COWORK_TOKEN_FILE": "TOKEN"}),
        (None, None, {"COWORK_TARGET": "tcp:127.0.0.1:7", "COWORK_TOKEN": " tok-env \n"}),
        ("local", None, {"XDG_STATE_HOME": "STATE"}),
        ("local", None, {}),
        (None, None, {"LIMA_HOME": "LIMA"}),
        (None, None, {"LIMA_HOME": "LIMA", "COWORK_VM_NAME": "other"}),
        ("lima:third", None, {"LIMA_HOME": "LIMA", "XDG_RUNTIME_DIR": "RUN"}),
    ],
)
def test_fast_path_finds_the_mux_that_targets_finds(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str | None,
    token_file: str | None,
    env: dict[str, str],
) -> None:
    """mux.fast_key/socket_file repeat targets.parse/load_token + cowork.defaults with
    os.path; for each way of naming a target and its token, both land on the same socket."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k in ("COWORK_TARGET", "COWORK_TOKEN_FILE", "COWORK_TOKEN", "COWORK_VM_NAME"):
        monkeypatch.delenv(k, raising=False)
    for k in ("XDG_STATE_HOME", "XDG_RUNTIME_DIR", "LIMA_HOME"):
        monkeypatch.delenv(k, raising=False)
    token_path = tmp_path / "token"
    token_path.write_text("tok-file\n")
    dirs = {"TOKEN": str(token_path), "STATE": str(tmp_path / "state")}
    dirs |= {"LIMA": str(tmp_path / "lima"), "RUN": str(tmp_path / "run")}
    for k, v in env.items():
        monkeypatch.setenv(k, dirs.get(v, v))
    token_file = dirs.get(token_file or "", token_file)
    t = targets.parse(target)
    if t.token_file:  # the default token of local / lima:NAME, where targets looks for it
        Path(t.token_file).parent.mkdir(parents=True, exist_ok=True)
        Path(t.token_file).write_text(f"tok-{t.kind}\n")
    expected = (t.spec, targets.load_token(t, token_file))

    assert mux.fast_key(target, token_file) == expected
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    base = Path(runtime) / "cowork" if runtime else defaults.state_dir()
    assert Path(mux.socket_file(*expected)).parent == base / "mux"
