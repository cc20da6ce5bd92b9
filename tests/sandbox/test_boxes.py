"""Named boxes (issue #12): long-lived sandboxes that execs join, against a real agent
running as root with bubblewrap, a real sandbox user and real processes.

The wall tests check each property for a process that *joined* an existing box (the
second exec into it), not only for the box's first process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

from host_client import CoworkClient
from host_client.api.boxes import BoxHandle
from host_client.errors import AlreadyExists, CoworkError, InvalidArgument, NotFound
from host_client.models import Output, Started
from tests.conftest import AgentProc, wait_until
from tests.sandbox.conftest import ALLOWED, make_boxed_agent

PY = "/usr/bin/python3"
SERVE = (
    "import http.server, sys\n"
    "class H(http.server.BaseHTTPRequestHandler):\n"
    "    def do_GET(self):\n"
    "        self.send_response(200); self.end_headers(); self.wfile.write(b'from the box')\n"
    "    def log_message(self, *a): pass\n"
    "http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()\n"
)
GET = (
    "import sys, urllib.request\n"
    "opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))\n"
    "print(opener.open(sys.argv[1], timeout=5).read().decode())\n"
)


@pytest.fixture
def vm(boxed: AgentProc) -> Iterator[CoworkClient]:
    with boxed.client() as c:
        yield c


@pytest.fixture
def box(vm: CoworkClient) -> Iterator[BoxHandle]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    handle = vm.box(name, create=True)
    try:
        yield handle
    finally:
        try:
            handle.remove()
        except NotFound:
            pass


def sh(target: BoxHandle | CoworkClient, script: str, **kw: object) -> tuple[int, str, str]:
    if isinstance(target, BoxHandle):
        r = target.run(["sh", "-c", script], **kw)
    else:
        r = target.run(["sh", "-c", script], **kw)  # type: ignore[arg-type]
    return r.exit_code, r.output, r.error


def joined_status(box: BoxHandle) -> dict[str, str]:
    """/proc/self/status of a process that joined the box (after another one ran in it)."""
    sh(box, "true")
    code, out, err = sh(box, "cat /proc/self/status")
    assert code == 0, err
    return dict(line.split(":\t", 1) for line in out.splitlines() if ":\t" in line)


# -- what a box is -----------------------------------------------------------------------
def test_a_server_started_by_one_exec_answers_the_next(box: BoxHandle) -> None:
    port = 18000 + os.getpid() % 1000
    started = box.run(["sh", "-c", f'{PY} -c "$0" {port} >/dev/null 2>&1 &', SERVE], timeout=10)
    assert started.exit_code == 0
    deadline = time.monotonic() + 10
    while True:
        r = box.run([PY, "-c", GET, f"http://127.0.0.1:{port}/"])
        if r.exit_code == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert r.output.strip() == "from the box", r.error


def test_tmp_persists_across_execs_in_a_box(box: BoxHandle) -> None:
    assert sh(box, "echo kept > /tmp/note")[0] == 0
    assert sh(box, "cat /tmp/note")[1] == "kept\n"


def test_two_boxes_see_neither_each_others_processes_nor_tmp(vm: CoworkClient) -> None:
    a = vm.box(f"a-{uuid.uuid4().hex[:6]}", create=True)
    b = vm.box(f"b-{uuid.uuid4().hex[:6]}", create=True)
    try:
        sh(a, "echo secret > /tmp/mine; sleep 300 >/dev/null 2>&1 &")
        code, out, _ = sh(b, "cat /tmp/mine 2>/dev/null || echo absent; ps -eo args")
        assert code == 0
        assert out.startswith("absent\n")
        assert "sleep 300" not in out
        assert "secret" not in out
    finally:
        a.remove()
        b.remove()


def test_exec_outside_a_box_does_not_see_the_box(vm: CoworkClient, box: BoxHandle) -> None:
    sh(box, "echo only-in-box > /tmp/inbox")
    assert sh(vm, "cat /tmp/inbox")[0] != 0


def test_removing_a_box_kills_everything_in_it(vm: CoworkClient, box: BoxHandle) -> None:
    marker = _unique_sleep()
    sh(box, f"setsid {marker} >/dev/null 2>&1 &")
    assert wait_until(lambda: _pids_with(marker), 5)
    info = box.remove()
    assert info.name == box.name
    assert wait_until(lambda: not _pids_with(marker), 5), _pids_with(marker)
    with pytest.raises(NotFound):
        box.run("true")


def _unique_sleep() -> str:
    """A sleep command line no other process has (found again with pgrep -f)."""
    return f"sleep {300 + uuid.uuid4().int % 10**6}.{uuid.uuid4().int % 10**6:06d}"


def _pids_with(text: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", text], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_box_is_listed_with_its_runs(vm: CoworkClient, box: BoxHandle) -> None:
    sh(box, "true")
    sh(box, "true")
    [info] = [b for b in vm.boxes.list() if b.name == box.name]
    assert info.state == "ready"
    assert info.sandbox == "bwrap"
    assert info.runs == 2
    assert info.active == 0
    assert info.pid > 0


def test_exit_codes_and_output_pass_through_a_box(box: BoxHandle) -> None:
    code, out, err = sh(box, "echo out; echo err >&2; exit 7")
    assert (code, out, err) == (7, "out\n", "err\n")


def test_stdin_reaches_a_command_in_a_box(box: BoxHandle) -> None:
    r = box.run(["cat"], stdin=b"piped in")
    assert r.output == "piped in"


def test_pty_in_a_box(box: BoxHandle) -> None:
    stream = box.exec(
        ["sh", "-c", "test -t 0 && test -t 1 && echo terminal; stty size"],
        pty=True,
        rows=33,
        cols=101,
    )
    out = b"".join(ev.data for ev in stream if isinstance(ev, Output))
    assert out == b"terminal\r\n33 101\r\n"


def test_detached_run_in_a_box_is_listed_with_the_box(vm: CoworkClient, box: BoxHandle) -> None:
    stream = box.exec(["sh", "-c", "echo detached; sleep 0.2"], detach=True)
    first = next(iter(stream))
    stream.cancel()
    assert isinstance(first, Started)
    done = vm.process.wait(first.run_id)
    assert done.box == box.name
    assert done.exit is not None and done.exit.code == 0
    out = b"".join(ev.data for ev in vm.process.attach(first.run_id) if isinstance(ev, Output))
    assert out == b"detached\n"


def test_cancelled_exec_stops_its_group_but_not_the_box(vm: CoworkClient, box: BoxHandle) -> None:
    marker = _unique_sleep()
    stream = box.exec(["sh", "-c", f"{marker}; true"])
    events = iter(stream)
    assert isinstance(next(events), Started)
    assert wait_until(lambda: _pids_with(marker), 5)
    stream.cancel()
    assert wait_until(lambda: not _pids_with(marker), 10), _pids_with(marker)
    assert sh(box, "echo still here")[1] == "still here\n"


def test_timeout_in_a_box_is_reported(box: BoxHandle) -> None:
    r = box.run(["sleep", "30"], timeout=0.5)
    assert r.timed_out


# -- the wall, for a joined process ------------------------------------------------------
def test_joined_process_runs_as_the_sandbox_user(box: BoxHandle, sandbox_user: str) -> None:
    sh(box, "true")
    assert sh(box, "id -un")[1].strip() == sandbox_user


def test_joined_process_has_no_capabilities_and_no_new_privs(box: BoxHandle) -> None:
    status = joined_status(box)
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(status[cap], 16) == 0, (cap, status[cap])
    assert status["NoNewPrivs"].strip() == "1"


def test_joined_process_has_the_seccomp_filter(box: BoxHandle) -> None:
    status = joined_status(box)
    assert status["Seccomp"].strip() == "2"
    # The filter itself, not only its mode: a namespace-creating unshare is refused.
    code, _, err = sh(box, "unshare --user --map-root-user true")
    assert code != 0, err


def test_joined_process_is_in_the_boxs_cgroup(box: BoxHandle) -> None:
    sh(box, "true")
    stream = box.exec(["sleep", "5"])
    events = iter(stream)  # held: a dropped iterator ends the call (and the sleep)
    started = next(events)
    try:
        assert isinstance(started, Started) and started.pid > 0
        assert _cgroup_of(started.pid) == _cgroup_of(box.info().pid)
    finally:
        stream.cancel()


def _cgroup_of(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        return f.read().strip()


def test_joined_process_cannot_see_the_agent(box: BoxHandle) -> None:
    sh(box, "true")
    code, out, _ = sh(box, "ps -eo pid,args")
    assert code == 0
    assert "guest_agent" not in out and "cowork-agent" not in out


def test_joined_process_shares_the_boxs_namespaces(box: BoxHandle) -> None:
    first = sh(box, "readlink /proc/self/ns/pid /proc/self/ns/net /proc/self/ns/mnt")[1]
    second = sh(box, "readlink /proc/self/ns/pid /proc/self/ns/net /proc/self/ns/mnt")[1]
    assert first == second
    # The box's first process (pid 2 in it: bwrap's reaper is 1) is in them too.
    assert sh(box, "readlink /proc/2/ns/pid")[1].split()[0] == first.split()[0]


def test_joined_process_reaches_only_allowed_names_through_the_proxy(
    box: BoxHandle, origin: int
) -> None:
    sh(box, "true")
    r = box.run(
        [
            PY,
            "-c",
            "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5)"
            ".read().decode())",
            f"http://{ALLOWED}:{origin}/x",
        ]
    )
    assert r.output.startswith("origin says hi"), r.error


def test_killing_the_boxs_first_process_ends_the_box_cleanly(
    vm: CoworkClient, box: BoxHandle
) -> None:
    # The box's own code may kill it: the box is then reported gone, nothing hangs.
    # pid 2 in the box: its first process (killed once this exec has been answered).
    sh(box, "setsid sh -c 'sleep 0.3; kill -KILL 2' >/dev/null 2>&1 &")
    assert wait_until(lambda: box.info().state == "gone", 10)
    with pytest.raises(CoworkError) as e:
        box.run("true")
    assert e.value.code == "FAILED_PRECONDITION"
    assert f"box {box.name} is gone: its first process ended" in str(e.value)
    vm.boxes.create(box.name)  # the name is free again


# -- bad input ---------------------------------------------------------------------------
def test_unknown_box_is_not_found(vm: CoworkClient) -> None:
    with pytest.raises(NotFound) as e:
        vm.run("true", box="no-such-box")
    assert "no box named no-such-box" in str(e.value)


def test_box_name_in_use_is_already_exists(vm: CoworkClient, box: BoxHandle) -> None:
    with pytest.raises(AlreadyExists):
        vm.boxes.create(box.name)


@pytest.mark.parametrize("name", ["", "Upper", "-dash", "a/b", "x" * 64, "sp ace"])
def test_bad_box_name_is_invalid_argument(vm: CoworkClient, name: str) -> None:
    with pytest.raises(InvalidArgument):
        vm.boxes.create(name)


def test_limits_on_a_process_in_a_box_are_invalid(box: BoxHandle) -> None:
    with pytest.raises(InvalidArgument) as e:
        box.run("true", limits={"pids": 10})
    assert "share the box's limits" in str(e.value)


def test_remove_of_an_unknown_box_is_not_found(vm: CoworkClient) -> None:
    with pytest.raises(NotFound):
        vm.boxes.remove("never-made")


def test_command_not_found_in_a_box(box: BoxHandle) -> None:
    with pytest.raises(NotFound):
        box.run(["no-such-command-here"])


def test_too_many_boxes_is_resource_exhausted(sandbox_user: str) -> None:
    agent = make_boxed_agent(
        sandbox_user, "sandbox: bwrap\nnetwork: {preset: offline}\nboxes: {max: 1}\n"
    )
    try:
        with agent.client() as c:
            c.boxes.create("one")
            with pytest.raises(CoworkError) as e:
                c.boxes.create("two")
            assert e.value.code == "RESOURCE_EXHAUSTED"
            assert c.run("echo ok", box="one").output == "ok\n"
    finally:
        agent.stop()


def test_idle_box_is_removed_after_the_policys_idle(sandbox_user: str) -> None:
    agent = make_boxed_agent(
        sandbox_user, "sandbox: bwrap\nnetwork: {preset: offline}\nboxes: {idle: 2s}\n"
    )
    try:
        with agent.client() as c:
            c.boxes.create("sleepy")
            pid = c.boxes.list()[0].pid
            assert wait_until(lambda: not c.boxes.list(), 15)
            assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5)
    finally:
        agent.stop()


def test_agent_stop_ends_every_box(sandbox_user: str) -> None:
    agent = make_boxed_agent(sandbox_user)
    with agent.client() as c:
        c.boxes.create("ends")
        pid = c.boxes.list()[0].pid
    agent.stop()
    assert wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 5)


def test_disconnected_client_leaves_no_process_of_its_exec_in_the_box(
    boxed: AgentProc, box: BoxHandle
) -> None:
    marker = _unique_sleep()
    script = (
        "import sys\n"
        "from host_client import CoworkClient\n"
        "c = CoworkClient(sys.argv[1], token_file=sys.argv[2])\n"
        "s = iter(c.process.exec(['sh', '-c', sys.argv[4]], box=sys.argv[3]))\n"
        "next(s); print('started', flush=True)\n"
        "import time; time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
            f"unix:{boxed.socket}",
            str(boxed.token_file),
            box.name,
            f"{marker}; true",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(os.getcwd())},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "started"
        assert wait_until(lambda: _pids_with(marker), 5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert wait_until(lambda: not _pids_with(marker), 10), _pids_with(marker)
    finally:
        proc.kill()


# -- the CLI -------------------------------------------------------------------------------
def test_cli_box_new_exec_ls_rm(boxed: AgentProc) -> None:
    from tests.test_cli import ctl

    name = f"cli-{uuid.uuid4().hex[:6]}"
    r = ctl(boxed, "box", "new", name, "--pids", "256")
    assert (r.returncode, r.stdout) == (0, f"{name}\n".encode()), r.stderr
    r = ctl(boxed, "exec", "--box", name, "--", "sh", "-c", "echo kept > /tmp/k; exit 3")
    assert r.returncode == 3
    r = ctl(boxed, "exec", "--box", name, "--", "cat", "/tmp/k")
    assert (r.returncode, r.stdout) == (0, b"kept\n")
    r = ctl(boxed, "box", "ls")
    assert r.returncode == 0
    [line] = [ln for ln in r.stdout.decode().splitlines() if ln.startswith(name)]
    assert "ready" in line and "bwrap" in line and "pids 256" in line
    r = ctl(boxed, "--json", "box", "ls")
    [info] = [b for b in json.loads(r.stdout) if b["name"] == name]
    assert info["runs"] == 2 and info["limits"]["pids"] == 256
    r = ctl(boxed, "box", "rm", name)
    assert (r.returncode, r.stdout) == (0, f"{name}\n".encode())
    assert name not in ctl(boxed, "box", "ls").stdout.decode()


def test_cli_box_comes_from_cowork_box_when_not_given(boxed: AgentProc, box: BoxHandle) -> None:
    from tests.test_cli import ctl

    ctl(boxed, "exec", "--box", box.name, "--", "sh", "-c", "echo env-box > /tmp/e")
    r = ctl(boxed, "exec", "--", "cat", "/tmp/e", env={"COWORK_BOX": box.name})
    assert (r.returncode, r.stdout) == (0, b"env-box\n"), r.stderr


def test_cli_exec_into_an_unknown_box_is_one_line_and_exit_1(boxed: AgentProc) -> None:
    from tests.test_cli import ctl, one_line_error

    r = ctl(boxed, "exec", "--box", "nope", "--", "true")
    assert r.returncode == 1
    assert "no box named nope" in one_line_error(r)


def test_cli_box_new_with_a_bad_name_or_twice_is_one_line(boxed: AgentProc, box: BoxHandle) -> None:
    from tests.test_cli import ctl, one_line_error

    r = ctl(boxed, "box", "new", "Bad/Name")
    assert r.returncode != 0 and "invalid box name" in one_line_error(r)
    r = ctl(boxed, "box", "new", box.name)
    assert r.returncode != 0 and "exists already" in one_line_error(r)


def test_cli_box_rm_of_an_unknown_box_is_one_line_and_exit_1(boxed: AgentProc) -> None:
    from tests.test_cli import ctl, one_line_error

    r = ctl(boxed, "box", "rm", "never-there")
    assert r.returncode == 1 and "no box named never-there" in one_line_error(r)


# -- endurance -----------------------------------------------------------------------------
def test_thousands_of_execs_and_boxes_leave_the_agent_and_the_box_as_they_were(
    sandbox_user: str,
) -> None:
    """2,000 execs into one box (plain, stdin, PTY, failing, cancelled, timed out) and 50 boxes
    made and removed: the agent's fds, threads and children, and the box's first process's
    fds and children, come back to where they were."""
    from tests.resources import footprint

    agent = make_boxed_agent(sandbox_user)
    try:
        with agent.client() as c:
            box = c.box("soak", create=True)
            box.run("true")
            first_pid = box.info().pid
            base = footprint(agent.pid)
            init_base = _box_init_footprint(first_pid)
            for i in range(2000):
                kind = i % 8
                if kind == 0:
                    r = box.run(["cat"], stdin=b"x" * 1000)
                    assert r.output == "x" * 1000
                elif kind == 1:
                    stream = box.exec(["sh", "-c", "echo pty"], pty=True)
                    assert b"pty" in b"".join(e.data for e in stream if isinstance(e, Output))
                elif kind == 2:
                    with pytest.raises(NotFound):
                        box.run(["no-such-command"])
                elif kind == 3:
                    stream = box.exec(["sleep", "30"])
                    assert isinstance(next(iter(stream)), Started)
                    stream.cancel()
                elif kind == 4 and i % 80 == 4:
                    assert box.run(["sleep", "5"], timeout=0.05).timed_out
                else:
                    assert box.run(["sh", "-c", "exit 3"]).exit_code == 3
            for i in range(50):
                other = c.box(f"cycle-{i}", create=True)
                assert other.run("echo hi").output == "hi\n"
                other.remove()

            def settled() -> bool:
                now = footprint(agent.pid)
                return (
                    now.fds <= base.fds
                    and now.threads <= base.threads
                    and now.children <= base.children
                    and now.zombies == 0
                    and _box_init_footprint(first_pid) == init_base
                )

            assert wait_until(settled, 15), (
                base,
                footprint(agent.pid),
                init_base,
                _box_init_footprint(first_pid),
            )
            [left] = c.boxes.list()
            # Every exec but the 250 refused before the box was asked (command not found).
            assert left.name == "soak" and left.active == 0 and left.runs == 2001 - 250
    finally:
        agent.stop()


def _box_init_footprint(bwrap_pid: int) -> tuple[int, int]:
    """(fds, live children) of the box's first process (bwrap's reaper's child)."""
    from tests.resources import descendants

    kids = [p for p, _ in descendants(bwrap_pid)]
    init = min(p for p in kids if "-I -S /proc/self/fd/" in _cmdline(p))
    fds = len(os.listdir(f"/proc/{init}/fd"))
    return fds, len(descendants(init))


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("pty", [False, True], ids=["pipes", "pty"])
def test_a_joined_process_inherits_nothing_but_its_stdio(box: BoxHandle, pty: bool) -> None:
    """No fd of the box's first process (its socket to the agent, the program it was read
    from) reaches a command; the listing's own directory fd is the only other one."""
    probe = "import os; print(sorted(int(x) for x in os.listdir('/proc/self/fd')))"
    stream = box.exec([PY, "-c", probe], pty=pty)
    out = b"".join(ev.data for ev in stream if isinstance(ev, Output)).decode()
    assert out.strip() == "[0, 1, 2, 3]"


def test_under_sandbox_none_a_box_is_a_name_and_a_cgroup(agent: AgentProc) -> None:
    """No bwrap: a box's processes run like any others (their leftovers end with them), and
    the box counts them, so its idle clock does not run while they do."""
    with agent.client() as c:
        box = c.box(f"plain-{uuid.uuid4().hex[:6]}", create=True)
        try:
            stream = box.exec(["sleep", "5"])
            events = iter(stream)  # held: a dropped iterator ends the call
            assert isinstance(next(events), Started)
            [info] = [b for b in c.boxes.list() if b.name == box.name]
            assert (info.sandbox, info.active, info.runs, info.pid) == ("none", 1, 1, 0)
            stream.cancel()
            assert wait_until(lambda: box.info().active == 0, 5)
            assert box.run("echo plain").output == "plain\n"
            assert box.info().runs == 2
        finally:
            box.remove()


def test_a_detached_run_ends_with_its_box_and_says_so(vm: CoworkClient) -> None:
    box = vm.box(f"det-{uuid.uuid4().hex[:6]}", create=True)
    stream = box.exec(["sh", "-c", "echo before; sleep 300"], detach=True)
    events = iter(stream)
    first = next(events)
    stream.cancel()
    assert isinstance(first, Started)

    def journaled() -> int:
        return next(r for r in vm.process.runs() if r.id == first.run_id).journal_end

    assert wait_until(lambda: journaled() == len(b"before\n"), 10)
    box.remove()
    done = vm.process.wait(first.run_id)
    assert done.exit is not None and done.exit.signal == 9
    assert done.reason == f"box {box.name} removed"
    out = b"".join(ev.data for ev in vm.process.attach(first.run_id) if isinstance(ev, Output))
    assert out == b"before\n"


def test_each_box_has_its_own_home(vm: CoworkClient, sandbox_user: str) -> None:
    """Files a box writes to ~ are its own: neither another box nor a run outside any box
    sees them, and they go with the box."""
    a = vm.box(f"ha-{uuid.uuid4().hex[:6]}", create=True)
    b = vm.box(f"hb-{uuid.uuid4().hex[:6]}", create=True)
    try:
        assert sh(a, 'echo mine > ~/a.txt; echo "$HOME"')[1].strip() == os.path.expanduser(
            f"~{sandbox_user}"
        )
        assert sh(a, "cat ~/a.txt")[1] == "mine\n"
        assert sh(b, "cat ~/a.txt 2>/dev/null || echo absent")[1] == "absent\n"
        assert sh(vm, "cat ~/a.txt 2>/dev/null || echo absent")[1] == "absent\n"
        assert sh(b, "touch ~/b.txt && echo writable")[1] == "writable\n"
    finally:
        a.remove()
        b.remove()
    import glob

    assert glob.glob(f"/var/tmp/cowork-boxes-*/{a.name}-*") == []  # its home went with it


def test_cli_shell_in_a_box_sees_what_an_exec_left_there(boxed: AgentProc, box: BoxHandle) -> None:
    """`coworkctl shell --box NAME` on a real terminal: a login shell inside the box."""
    import pty
    import select

    box.run("echo left-for-the-shell > /tmp/for-shell")
    pid, fd = pty.fork()
    if pid == 0:  # the child: coworkctl shell on the terminal
        base = [sys.executable, "-m", "host_client.cli", "--target", boxed.target]
        args = ["--token-file", str(boxed.token_file), "shell", "--box", box.name]
        os.execv(sys.executable, [*base, *args, "--shell", "/bin/sh"])
    seen = b""
    try:
        for _ in range(200):  # typed until the shell answers (before raw mode, lines flush)
            os.write(fd, b"cat /tmp/for-shell; echo marker-$((6*7))\r")
            ready, _, _ = select.select([fd], [], [], 0.25)
            while ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
                ready, _, _ = select.select([fd], [], [], 0.25)
            if b"marker-42" in seen:
                break
        assert b"left-for-the-shell" in seen and b"marker-42" in seen, seen[-500:]
        os.write(fd, b"exit 5\r")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 5
    finally:
        os.close(fd)
