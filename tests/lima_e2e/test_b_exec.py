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


def test_a_named_box_keeps_a_server_between_coworkctl_execs(vm: LimaHost) -> None:
    """Issue #12 through lima:NAME: `box new`, a server one exec starts answers the next,
    /tmp persists, the box is listed, and `box rm` ends it."""
    import json

    assert coworkctl_ok(vm, "box", "new", "e2e", "--pids", "512").strip() == "e2e"
    try:
        serve = (
            'python3 -c \'import http.server as h; h.HTTPServer(("127.0.0.1", 8765), '
            "h.SimpleHTTPRequestHandler).serve_forever()' >/dev/null 2>&1 & "
            "echo served > /tmp/note"
        )
        coworkctl_ok(vm, "exec", "--box", "e2e", "--", "sh", "-c", serve)
        probe = (  # the server may take a moment to listen (TCG): ask until it answers
            "for i in $(seq 50); do "
            "code=$(curl -s --noproxy '*' -o /dev/null -w '%{http_code}' http://127.0.0.1:8765/) "
            '&& echo "$code" && exit 0; sleep 0.2; done; exit 1'
        )
        assert coworkctl_ok(vm, "exec", "--box", "e2e", "--", "sh", "-c", probe) == "200\n"
        assert coworkctl_ok(vm, "exec", "--box", "e2e", "--", "cat", "/tmp/note") == "served\n"
        # Outside the box, neither the server's /tmp nor its loopback is there.
        r = vm.coworkctl("exec", "--", "cat", "/tmp/note")
        assert r.returncode != 0
        [info] = [
            b for b in json.loads(coworkctl_ok(vm, "--json", "box", "ls")) if b["name"] == "e2e"
        ]
        assert info["state"] == "ready" and info["sandbox"] == "bwrap"
        assert info["limits"]["pids"] == 512 and info["runs"] == 3
    finally:
        coworkctl_ok(vm, "box", "rm", "e2e")
    r = vm.coworkctl("exec", "--box", "e2e", "--", "true")
    assert r.returncode == 1 and b"no box named e2e" in r.stderr
