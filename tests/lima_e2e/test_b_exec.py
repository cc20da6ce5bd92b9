"""`coworkctl exec` through Lima's socket forward: codes, stdin and bytes pass through."""

from __future__ import annotations

import hashlib
import os

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost


def test_the_remote_exit_code_is_coworkctl_exit_code(vm: LimaHost) -> None:
    r = vm.coworkctl("exec", "--", "sh", "-c", "exit 7")
    assert r.returncode == 7, r.stderr


def test_a_missing_command_exits_127_with_one_line(vm: LimaHost) -> None:
    r = vm.coworkctl("exec", "--", "no-such-command-here")
    assert r.returncode == 127
    assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr


def test_stdin_is_piped_to_the_remote_process(vm: LimaHost) -> None:
    data = os.urandom(3 << 20)
    out = coworkctl_ok(vm, "exec", "--", "sha256sum", input=data)
    assert out.split()[0] == hashlib.sha256(data).hexdigest()


def test_output_comes_back_byte_exact(vm: LimaHost) -> None:
    data = bytes(range(256)) * 4096 + b"\r\n\x00no newline at the end"
    r = vm.coworkctl("exec", "--", "cat", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout == data


def test_stdout_and_stderr_stay_apart(vm: LimaHost) -> None:
    r = vm.coworkctl("exec", "--", "sh", "-c", "printf out; printf err >&2; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"out", b"err")


def test_commands_run_as_the_sandbox_user_in_the_workspace(vm: LimaHost) -> None:
    out = coworkctl_ok(vm, "exec", "--", "sh", "-c", "id -un; pwd")
    user, cwd = out.split()
    assert user.startswith("cowork-") and cwd == "/workspace"


def test_a_persistent_client_reuses_one_channel_for_many_calls(vm: LimaHost) -> None:
    with vm.client() as c:
        results = [c.execute_in_vm(f"echo {i}") for i in range(20)]
    assert [r.output.strip() for r in results] == [str(i) for i in range(20)]
    assert all(r.exit_code == 0 for r in results)
