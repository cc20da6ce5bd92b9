"""The second wall, tried from inside: what a sandboxed process can and cannot reach.

Every test runs real commands through a real agent (root, `--run-as` an
unprivileged user, policy `sandbox: bwrap`) and inspects the result from the
inside, the way escaping code would try.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.errors import CoworkError, InvalidArgument
from host_client.models import Exited, Output
from tests.conftest import REPO, AgentProc, make_agent, processes_with, wait_until
from tests.resources import sockets_of, zombies
from tests.sandbox.conftest import ALLOWED, DENIED, make_boxed_agent

# The system interpreter: the agent's own (a venv or pyenv under /root) is out of the box's view.
PY = "/usr/bin/python3"
FETCH = (
    "import sys, urllib.request, urllib.error\n"
    "try:\n"
    "    r = urllib.request.urlopen(sys.argv[1], timeout=10)\n"
    "    print(r.status, r.read().decode())\n"
    "except urllib.error.HTTPError as e:\n"
    "    print(e.code, e.read().decode())\n"
    "    sys.exit(1)\n"
    "except Exception as e:\n"
    "    print('ERR', type(e).__name__, e)\n"
    "    sys.exit(2)\n"
)


@pytest.fixture
def vm(boxed: AgentProc) -> Iterator[CoworkClient]:
    with boxed.client() as c:
        yield c


def sh(vm: CoworkClient, script: str) -> tuple[int, str, str]:
    r = vm.execute_in_vm(["sh", "-c", script])
    return r.exit_code, r.output, r.error


# -- identity ----------------------------------------------------------------------------
def test_processes_run_as_the_sandbox_user(vm: CoworkClient, sandbox_user: str) -> None:
    code, out, _ = sh(vm, "id -un; echo $HOME")
    assert code == 0
    name, home = out.split()
    assert name == sandbox_user
    assert home == os.path.expanduser(f"~{sandbox_user}")


def test_no_capabilities_and_no_new_privileges(vm: CoworkClient) -> None:
    _, out, _ = sh(
        vm, "grep -E '^(CapInh|CapPrm|CapEff|CapBnd|CapAmb|NoNewPrivs)' /proc/self/status"
    )
    status = dict(line.split(":\t") for line in out.splitlines())
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"] == "1"


def test_seccomp_filter_is_active(vm: CoworkClient) -> None:
    _, out, _ = sh(vm, "grep '^Seccomp:' /proc/self/status")
    assert out.split() == ["Seccomp:", "2"]  # 2 = filter mode


def test_info_reports_identity_and_sandbox(vm: CoworkClient, sandbox_user: str) -> None:
    info = vm.info()
    assert info["identity_mode"] == "user"
    assert info["run_as_user"] == sandbox_user
    assert info["agent_user"] == "root"
    assert info["sandbox"] == "bwrap"
    assert info["seccomp"] is True
    assert info["egress_proxy"] == "http://127.0.0.1:3128"


def test_files_rpcs_create_files_owned_by_the_sandbox_user(
    vm: CoworkClient, boxed: AgentProc, sandbox_user: str
) -> None:
    import pwd

    uid = pwd.getpwnam(sandbox_user).pw_uid
    d = f"{boxed.root}/owned-{uuid.uuid4().hex[:6]}"
    vm.write_file(f"{d}/sub/file.txt", "x")
    for p in (d, f"{d}/sub", f"{d}/sub/file.txt"):
        assert os.stat(p).st_uid == uid, p
    code, _, _ = sh(vm, f"echo more >> {d}/sub/file.txt")
    assert code == 0  # the sandboxed user can change what the host gave it


# -- what must stay out of reach -----------------------------------------------------------
def test_token_file_cannot_be_read(vm: CoworkClient, boxed: AgentProc) -> None:
    code, out, err = sh(vm, f"cat {boxed.token_file}")
    assert code != 0
    assert boxed.token not in out
    assert "No such file" in err


def test_agent_config_dir_is_empty(vm: CoworkClient) -> None:
    code, out, _ = sh(
        vm, "ls -A /etc/cowork /run 2>/dev/null | grep -v ':$' | grep -v '^$' || true"
    )
    assert code == 0
    assert out.strip() == ""


def test_agent_socket_cannot_be_connected_to(vm: CoworkClient, boxed: AgentProc) -> None:
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('CONNECTED')\n"
        "except OSError as e:\n"
        "    print('refused', e.errno)\n"
    )
    r = vm.execute_in_vm([PY, "-c", probe, str(boxed.socket)])
    assert "CONNECTED" not in r.output
    assert r.output.startswith("refused")


def test_ps_shows_no_agent(vm: CoworkClient) -> None:
    code, out, _ = sh(vm, "ps -eo pid,args")
    assert code == 0
    assert "guest_agent" not in out
    assert "cowork-agent" not in out
    pids = [int(line.split()[0]) for line in out.splitlines()[1:]]
    assert len(pids) <= 5, out  # bwrap's reaper, sh, ps (and nothing of the host)


def test_writes_outside_workspace_and_tmp_fail(vm: CoworkClient, boxed: AgentProc) -> None:
    for path in ("/etc/cw-escape", "/usr/cw-escape", "/var/cw-escape", "/opt/cw-escape"):
        code, _, err = sh(vm, f"echo x > {path}")
        assert code != 0, path
        assert "Read-only file system" in err or "Permission denied" in err, (path, err)
        assert not os.path.exists(path)
    assert sh(vm, f"echo x > {boxed.root}/inside && echo x > /tmp/t")[0] == 0


def test_tmp_is_private_to_each_process(vm: CoworkClient) -> None:
    marker = f"cw-tmp-{uuid.uuid4().hex}"
    assert sh(vm, f"touch /tmp/{marker}")[0] == 0
    assert not os.path.exists(f"/tmp/{marker}")
    assert sh(vm, f"test -e /tmp/{marker}")[0] == 1


def test_other_homes_are_hidden(vm: CoworkClient) -> None:
    code, out, _ = sh(vm, "ls -A /root | wc -l")
    assert code == 0 and out.strip() == "0"


# -- processes still behave ----------------------------------------------------------------
def test_exit_codes_pass_through_the_sandbox(vm: CoworkClient) -> None:
    assert sh(vm, "exit 3")[0] == 3
    assert sh(vm, "kill -9 $$")[0] == 128 + 9


def test_pty_works_inside_the_sandbox(vm: CoworkClient, sandbox_user: str) -> None:
    # bwrap shows the terminal it was given as /dev/console inside the box.
    stream = vm.exec(
        ["sh", "-c", "test -t 0 && test -t 1 && echo is-a-tty; stty size; id -un"],
        pty=True,
        rows=33,
        cols=101,
    )
    out = b"".join(e.data for e in stream if isinstance(e, Output)).decode()
    assert stream.exit is not None and stream.exit.code == 0
    lines = out.replace("\r", "").split("\n")
    assert lines[0] == "is-a-tty"
    assert lines[1] == "33 101"
    assert lines[2] == sandbox_user


def test_signal_reaches_the_sandboxed_command(vm: CoworkClient) -> None:
    stream = vm.exec(
        ["sh", "-c", "trap 'echo got INT; exit 3' INT; echo ready; sleep 30 & wait"],
        interactive=True,
    )
    seen = b""
    for ev in stream:
        if isinstance(ev, Output):
            seen += ev.data
            if b"ready" in seen:
                stream.signal(signal.SIGINT)
        elif isinstance(ev, Exited):
            break
    assert b"got INT" in seen
    assert stream.exit is not None and stream.exit.code == 3


def test_background_children_die_with_the_command(vm: CoworkClient) -> None:
    marker = f"cw-bg-{uuid.uuid4().hex}"
    stream = vm.exec(["bash", "-c", f"(exec -a {marker} sleep 300) & sleep 0.5; echo started"])
    out = stream.collect()
    assert out.exit_code == 0 and out.output == "started\n", out
    assert wait_until(lambda: not processes_with(marker), 5)


def test_cancelled_stream_leaves_no_sandboxed_process(vm: CoworkClient) -> None:
    marker = f"cw-cancel-{uuid.uuid4().hex}"
    stream = vm.exec(["bash", "-c", f"echo up; exec -a {marker} sleep 300"], interactive=True)
    events = iter(stream)  # kept alive: dropping the iterator would cancel the call
    for ev in events:
        if isinstance(ev, Output):
            break
    assert wait_until(lambda: processes_with(marker), 5)
    stream.cancel()
    del events
    assert wait_until(lambda: not processes_with(marker), 5)


# -- egress ----------------------------------------------------------------------------------
def _fetch(vm: CoworkClient, url: str) -> tuple[int, str]:
    r = vm.execute_in_vm([PY, "-c", FETCH, url])
    return r.exit_code, r.output


def _net_log(vm: CoworkClient) -> list[dict[str, object]]:
    return [json.loads(x) for x in vm.logs(net=True, tail=1000)]


def test_allowlisted_name_is_reached_through_the_proxy_and_logged(
    vm: CoworkClient, origin: int
) -> None:
    code, out = _fetch(vm, f"http://{ALLOWED}:{origin}/hello")
    assert code == 0, out
    assert out.startswith("200 origin says hi")
    rec = [r for r in _net_log(vm) if r["host"] == ALLOWED and r["port"] == origin]
    assert rec and rec[-1]["allowed"] is True
    assert int(rec[-1]["bytes_down"]) > 0  # type: ignore[call-overload]


def test_a_box_that_ends_closes_its_egress_connections_still_in_flight(
    vm: CoworkClient, boxed: AgentProc
) -> None:
    """A request the box made just before it ended must not keep an upstream connection open."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    port = silent.getsockname()[1]
    try:
        r = vm.run([PY, "-c", FETCH, f"http://{ALLOWED}:{port}/never"], timeout=1.5)
        assert r.timed_out
        # The agent dialed the origin for the box; with the box gone, that socket goes too.
        assert wait_until(lambda: not sockets_of(boxed.pid, port), 5), sockets_of(boxed.pid, port)
        # Ending a connection that way is routine: no "Exception in callback" traceback.
        assert "Traceback" not in "".join(boxed.log_lines())
    finally:
        silent.close()


def test_name_not_on_the_allowlist_is_refused_and_logged(vm: CoworkClient, origin: int) -> None:
    code, out = _fetch(vm, f"http://unlisted.example:{origin}/")
    assert code == 1
    assert out.startswith("403") and "unlisted.example" in out
    rec = [r for r in _net_log(vm) if r["host"] == "unlisted.example"]
    assert rec and rec[-1]["allowed"] is False


def test_deny_list_wins_and_is_logged(vm: CoworkClient, origin: int) -> None:
    vm.set_policy(allow=f"*.{DENIED}")
    try:
        code, out = _fetch(vm, f"http://{DENIED}:{origin}/")
        assert code == 1 and out.startswith("403")
    finally:
        vm.set_policy(yaml=Path(_policy_path(vm)).read_text())


def _policy_path(vm: CoworkClient) -> str:
    path = vm.get_policy()["path"]
    assert path
    return str(path)


def test_direct_connections_bypassing_the_proxy_fail(vm: CoworkClient, origin: int) -> None:
    probe = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3); print('OPEN')\n"
        "except OSError as e:\n"
        "    print('closed', e.errno)\n"
    )
    r = vm.execute_in_vm([PY, "-c", probe, str(origin)])
    assert r.output.startswith("closed")
    _code, out, _ = sh(vm, "cat /proc/net/dev | tail -n +3 | cut -d: -f1")
    assert out.split() == ["lo"]  # the box's only interface


def test_offline_preset_blocks_what_was_allowed(sandbox_user: str, origin: int) -> None:
    from tests.sandbox.conftest import make_boxed_agent

    agent = make_boxed_agent(sandbox_user)
    try:
        with agent.client() as c:
            assert _fetch(c, f"http://{ALLOWED}:{origin}/")[0] == 0
            resp = c.set_policy(preset="offline")
            assert resp["effective_allow"] == []
            code, out = _fetch(c, f"http://{ALLOWED}:{origin}/")
            assert code == 1 and out.startswith("403")
    finally:
        agent.stop()


# -- policy and logs -------------------------------------------------------------------------
def test_policy_with_an_unknown_key_is_refused_naming_it(vm: CoworkClient) -> None:
    before = vm.get_policy()["yaml"]
    with pytest.raises(InvalidArgument) as err:
        vm.set_policy(yaml="sandbox: bwrap\nnetwork:\n  alow: [x.com]\n")
    assert "network.alow" in str(err.value)
    assert vm.get_policy()["yaml"] == before


def test_policy_with_a_bad_domain_is_refused(vm: CoworkClient) -> None:
    with pytest.raises(InvalidArgument):
        vm.set_policy(allow="https://example.com")


def test_audit_log_streams_rpcs(vm: CoworkClient) -> None:
    marker = f"cw-audit-{uuid.uuid4().hex}"
    vm.execute_in_vm(["echo", marker])
    entries = [json.loads(x) for x in vm.logs(tail=50)]
    runs = [e for e in entries if e.get("method", "").endswith("/Run") and marker in str(e)]
    assert runs and runs[-1]["exit_code"] == 0 and runs[-1]["code"] == "OK"


def ctl(agent: AgentProc, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "host_client.cli",
            "--target",
            agent.target,
            "--token-file",
            str(agent.token_file),
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=60,
    )


def test_coworkctl_policy_allow_show_and_logs(boxed: AgentProc, origin: int) -> None:
    r = ctl(boxed, "policy", "allow", "extra.example.org")
    assert r.returncode == 0, r.stderr
    r = ctl(boxed, "--json", "policy", "show")
    assert "extra.example.org" in json.loads(r.stdout)["effective_allow"]
    r = ctl(boxed, "exec", "--", PY, "-c", FETCH, f"http://{ALLOWED}:{origin}/cli")
    assert r.returncode == 0, r.stderr
    r = ctl(boxed, "logs", "--net", "-n", "5")
    assert r.returncode == 0 and f"allow GET {ALLOWED}:{origin}" in r.stdout
    r = ctl(boxed, "policy", "deny", "extra.example.org")
    assert r.returncode == 0


def test_coworkctl_policy_set_with_a_bad_key_is_one_line_and_exit_1(boxed: AgentProc) -> None:
    r = ctl(boxed, "policy", "set", "-", stdin="sandbox: bwrap\nlimits:\n  memroy: 1G\n")
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "limits.memroy" in r.stderr
    assert "Traceback" not in r.stderr


def test_agent_as_root_without_run_as_or_allow_root_refuses_to_start(tmp_path: object) -> None:
    import secrets
    from pathlib import Path

    d = Path(str(tmp_path))
    tok = d / "token"
    tok.write_text(secrets.token_hex(32))
    tok.chmod(0o600)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "guest_agent",
            "--listen",
            f"unix:{d}/a.sock",
            "--token-file",
            str(tok),
            "--root",
            str(d),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert "--run-as" in r.stderr and "--allow-root" in r.stderr
    assert "Traceback" not in r.stderr


def test_unsandboxed_policy_still_switches_user(sandbox_user: str) -> None:
    from tests.sandbox.conftest import make_boxed_agent

    agent = make_boxed_agent(sandbox_user, policy="sandbox: none\n")
    try:
        with agent.client() as c:
            assert c.info()["sandbox"] == "none"
            r = c.execute_in_vm("id -un; grep ^Seccomp: /proc/self/status")
            assert r.output.split()[0] == sandbox_user
            assert r.output.split()[-1] == "0"
    finally:
        agent.stop()


def test_a_plain_agent_is_unaffected(tmp_path: object) -> None:
    agent = make_agent()
    try:
        with agent.client() as c:
            info = c.info()
            assert info["sandbox"] == "none"
            assert info["identity_mode"] in ("root", "self")
    finally:
        agent.stop()


def test_errors_are_typed(vm: CoworkClient) -> None:
    with pytest.raises(CoworkError):
        vm.execute_in_vm(["no-such-command-cw"])


def test_limits_say_plainly_which_cgroup_hierarchy_is_used(vm: CoworkClient) -> None:
    """This host mounts cgroup v1 (limits are tested in the VM tier's v2 guest); the agent
    must say so instead of pretending, and still run everything."""
    limits = vm.info()["limits"]
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        assert limits == "cgroup2"
    else:
        assert limits.startswith("unavailable: no cgroup v2 unified hierarchy"), limits
    r = vm.run(["true"], limits={"memory_bytes": 64 << 20, "pids": 10})
    assert r.exit_code == 0 and not r.oom_killed


def test_an_allowed_name_that_resolves_to_loopback_is_refused(
    vm: CoworkClient, origin: int
) -> None:
    """DNS rebinding in miniature: `localhost` is allowed, but it points into the agent's own
    network namespace, so the proxy refuses to dial it (the proxy is forced: no NO_PROXY)."""
    vm.set_policy(allow="localhost")
    probe = (
        "import os, sys, urllib.request, urllib.error\n"
        "os.environ.pop('no_proxy', None); os.environ.pop('NO_PROXY', None)\n"
        "o = urllib.request.build_opener(urllib.request.ProxyHandler("
        "{'http': 'http://127.0.0.1:3128'}))\n"
        "try:\n"
        "    print(o.open(sys.argv[1], timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code, e.read().decode())\n"
    )
    try:
        r = vm.execute_in_vm([PY, "-c", probe, f"http://localhost:{origin}/"])
    finally:
        vm.set_policy(deny="localhost")
    assert r.output.startswith("403") and "non-public address" in r.output, r.output


def test_the_agent_keeps_no_zombie_from_its_bwrap_probe(sandbox_user: str) -> None:
    """Info probes bwrap once; what that leaves behind is reaped like a run's orphans."""
    agent = make_boxed_agent(sandbox_user)
    try:
        with agent.client() as c:
            assert "sandbox.bwrap" in c.info()["capabilities"]
        assert wait_until(lambda: not zombies(agent.pid), 5), zombies(agent.pid)
    finally:
        agent.stop()
