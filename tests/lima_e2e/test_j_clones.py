"""Clones (issue #15): one prepared VM, many tasks. test_i left the base stopped, its disk
just restored to the snapshot that says "before" outside the workspace; two clones of it
boot at the same time, each with its own token, socket and workspace, and run `ask` at
the same time."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.claude.fake_anthropic import Text, ToolUse
from tests.lima_e2e.conftest import coworkctl_ok, record
from tests.lima_e2e.harness import LimaHost
from tests.lima_e2e.test_e_claude import ask, fake_model
from tests.lima_e2e.test_i_snapshots import MARK, PACKAGE, one_line_error

CLONES = ("cwe2e-t1", "cwe2e-t2")


def workspace_of(vm: LimaHost, name: str) -> Path:
    return vm.base / f"ws-{name}"


@pytest.fixture(scope="module")
def clones(vm: LimaHost) -> Iterator[list[str]]:
    """Both clones, made and booted concurrently by two `coworkctl clone` processes."""
    procs = []
    t0 = time.monotonic()
    for name in CLONES:
        ws = workspace_of(vm, name)
        ws.mkdir()
        os.chown(ws, vm.user.pw_uid, vm.user.pw_gid)
        argv = vm.coworkctl_argv("clone", vm.name, name, "--workspace", str(ws), "--json")
        procs.append(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=vm.base)
        )
    results = [p.communicate(timeout=2400) for p in procs]
    record("two_clones_to_ready_s", round(time.monotonic() - t0, 1))
    try:
        for p, (out, err) in zip(procs, results, strict=True):
            assert p.returncode == 0, err.decode(errors="replace")[-3000:]
            made = json.loads(out)
            record(f"clone_copy_s_{made['name']}", made["clone_seconds"])
        yield list(CLONES)
    finally:
        for name in CLONES:
            vm.limactl("delete", "--force", name, timeout=300)


def on(vm: LimaHost, name: str, *args: str, timeout: float = 120) -> str:
    return coworkctl_ok(vm, "--target", f"lima:{name}", *args, timeout=timeout)


def test_each_clone_starts_from_the_base_s_restored_disk(vm: LimaHost, clones: list[str]) -> None:
    probe = f"cat {MARK}; dpkg-query -W {PACKAGE} >/dev/null 2>&1 && echo installed || echo absent"
    for name in clones:
        ssh = ["ssh", "-F", str(vm.lima_home / name / "ssh.config"), f"lima-{name}", probe]
        r = vm.run(ssh)
        assert r.stdout.decode().split() == ["before", "absent"], (name, r.stderr)


def test_each_clone_has_its_own_token_and_socket(vm: LimaHost, clones: list[str]) -> None:
    tokens = {vm.token_file.read_bytes()}
    for name in clones:
        inst = vm.lima_home / name
        tokens.add((inst / "cowork-token").read_bytes())
        assert (inst / "sock" / "cowork-agent.sock").is_socket()
        assert on(vm, name, "exec", "--", "echo", name).strip() == name
    assert len(tokens) == 3


def test_a_clone_refuses_the_base_s_token(vm: LimaHost, clones: list[str]) -> None:
    r = vm.coworkctl(
        "--target", f"lima:{clones[0]}", "--token-file", str(vm.token_file), "exec", "--", "true"
    )  # fmt: skip
    line = one_line_error(r)
    assert "token" in line.lower() or "unauthenticated" in line.lower(), line


def test_a_clone_has_no_snapshots_of_its_own(vm: LimaHost, clones: list[str]) -> None:
    out = coworkctl_ok(vm, "snapshot", "ls", "--json", "--name", clones[0])
    assert out.strip() == ""


def test_list_says_where_each_clone_came_from(vm: LimaHost, clones: list[str]) -> None:
    listed = {
        obj["name"]: obj
        for obj in (json.loads(ln) for ln in coworkctl_ok(vm, "list", "--json").splitlines() if ln)
    }
    assert listed[vm.name]["origin"] is None
    for name in clones:
        assert listed[name]["origin"] == vm.name and listed[name]["cowork"] is True
    assert f"{clones[0]}" in coworkctl_ok(vm, "list") and vm.name in coworkctl_ok(vm, "list")


def test_two_clones_ask_at_the_same_time_into_their_own_workspaces(
    vm: LimaHost, clones: list[str]
) -> None:
    results: dict[str, tuple[int, str, str]] = {}
    with fake_model(vm) as api1, fake_model(vm) as api2:
        apis = dict(zip(clones, (api1, api2), strict=True))
        for name, api in apis.items():
            write = {"file_path": "/workspace/task.txt", "content": f"done by {name}\n"}
            api.script(ToolUse("Write", write), Text(f"{name} wrote task.txt"))

        def run(name: str) -> None:
            results[name] = ask(
                vm, apis[name], "Write task.txt", "-q", "--permission-mode",
                "bypassPermissions", target=f"lima:{name}",
            )  # fmt: skip

        threads = [threading.Thread(target=run, args=(n,)) for n in clones]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    for name in clones:
        code, out, err = results[name]
        assert code == 0, err
        assert f"{name} wrote task.txt" in out
        landed = workspace_of(vm, name) / "task.txt"
        assert landed.read_text() == f"done by {name}\n"
        assert landed.stat().st_uid == vm.user.pw_uid
    assert not (vm.workspace / "task.txt").exists()


def test_deleting_a_clone_leaves_the_base_and_the_other_clone(
    vm: LimaHost, clones: list[str]
) -> None:
    coworkctl_ok(vm, "delete", "--force", "--name", clones[0], timeout=300)
    names = vm.limactl("list", "--quiet").stdout.decode().split()
    assert sorted(names) == sorted([vm.name, clones[1]])
    assert workspace_of(vm, clones[0]).is_dir()  # the user's files stay
