"""The confinement race with the flipper where it really lives: inside the bwrap sandbox.

The same race as tests/test_files_race.py, but the process that swaps `ws/d`
for a symlink to the root-only canary runs as the sandbox user inside the
box (started through the agent's own Process.Exec), and the agent, as in the
VM, runs as root with `--run-as` that user, so every directory and file it
creates is chowned to it: the canary snapshot covers owners too.
"""

from __future__ import annotations

import pwd
from collections.abc import Callable

from host_client.models import Exited, Output
from tests.conftest import AgentProc
from tests.test_files_race import FLIPPER, run_race

# The system interpreter: the agent's own venv is out of the box's view.
PY = "/usr/bin/python3"


def test_no_files_rpc_escapes_while_sandboxed_code_flips_a_directory(
    boxed: AgentProc, sandbox_user: str
) -> None:
    pw = pwd.getpwnam(sandbox_user)
    client = boxed.client()

    def start() -> Callable[[], int]:
        stream = client.exec([PY, "-c", FLIPPER, str(boxed.root)], interactive=True)
        events = iter(stream)
        out = b""
        while b"ready\n" not in out:
            ev = next(events)
            assert not isinstance(ev, Exited), f"flipper ended: {ev} {out!r}"
            if isinstance(ev, Output):
                out += ev.data
                assert ev.stream == "stdout", ev.data

        def stop() -> int:
            stream.signal(15)
            rest = b"".join(ev.data for ev in events if isinstance(ev, Output))
            client.close()
            return int(rest.strip() or 0)

        return stop

    run_race(boxed, "flipper inside the bwrap sandbox", start, owner=(pw.pw_uid, pw.pw_gid))


def test_symlinks_and_directories_the_agent_makes_belong_to_the_sandbox_user(
    boxed: AgentProc, sandbox_user: str
) -> None:
    pw = pwd.getpwnam(sandbox_user)
    with boxed.client() as c:
        c.mkdir("owned-mk/a/b")
        c.symlink("/etc/shadow", "owned-ln/x/link")
        c.write_file("owned-mk/a/b/f", "x")
    for rel in ("owned-mk", "owned-mk/a", "owned-mk/a/b", "owned-mk/a/b/f"):
        assert (boxed.root / rel).lstat().st_uid == pw.pw_uid, rel
    for rel in ("owned-ln", "owned-ln/x", "owned-ln/x/link"):
        st = (boxed.root / rel).lstat()
        assert (st.st_uid, st.st_gid) == (pw.pw_uid, pw.pw_gid), rel


def test_sandboxed_code_cannot_read_through_a_link_the_agent_created(
    boxed: AgentProc,
) -> None:
    with boxed.client() as c:
        c.symlink("/etc/shadow", "shadow-link")
        r = c.run([PY, "-c", f"open('{boxed.root}/shadow-link').read()"])
    assert r.exit_code != 0 and "PermissionError" in r.error
