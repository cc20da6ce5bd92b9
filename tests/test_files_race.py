"""Confinement under a race: the workspace changes *while* the agent resolves paths.

Code in the sandbox owns the workspace. Here a process swaps `ws/d` between a
real directory and a symlink to a canary directory outside the root (absolute
and relative forms), with renameat2(RENAME_EXCHANGE) as fast as it can, while
the host hammers every Files RPC on paths under `ws/d/`. A string-checking
agent escapes within a fraction of a second (issue #10); this one must give
0 changes in the canary, 0 reads of its secret, 0 temporary files outside the
root, only clean statuses, and no traceback in its log -- with either
resolver (openat2, and the O_NOFOLLOW walk used on kernels without it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.errors import CoworkError

from .conftest import AgentProc, make_agent

SECRET = "CANARY-SECRET-7f3a9c"
OPS_PER_RESOLVER = 20_000
THREADS = 3
# Statuses a call may end with when the directory changed under it.
CLEAN = {"NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION", "ALREADY_EXISTS", "ABORTED"}

FLIPPER = r"""
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
ws = sys.argv[1].encode()
d, alts = b"d", [b".alt-abs", b".alt-rel"]
root = os.open(ws, os.O_RDONLY | os.O_DIRECTORY)
flips = 0
def stop(*_):
    print(flips, flush=True)
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
while True:
    for alt in alts:
        for _ in range(2):  # swap the link in, then back out
            if libc.renameat2(root, d, root, alt, RENAME_EXCHANGE) == 0:
                flips += 1
"""


def _snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything observable about a tree: kind, mode, owner, times, content hash."""
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
            key = str(p.relative_to(top))
            out[key] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_size, digest)
    st = top.lstat()
    out["."] = (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns)
    return out


def _temp_files(top: Path) -> list[str]:
    return [
        os.path.join(d, n)
        for d, dirs, files in os.walk(top)
        for n in dirs + files
        if ".cowork-tmp-" in n
    ]


class Tally:
    """Counts operations, outcomes and escapes across the hammering threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.ops = 0
        self.codes: Counter[str] = Counter()
        self.escapes: list[str] = []
        self.unclean: list[str] = []

    def record(self, code: str, op: str, message: str = "") -> None:
        with self.lock:
            self.ops += 1
            self.codes[code] += 1
            if code not in CLEAN and code != "OK":
                self.unclean.append(f"{op}: {code}: {message}")

    def escape(self, what: str) -> None:
        with self.lock:
            self.escapes.append(what)


def _operations(
    c: CoworkClient, t: int, canary_inodes: set[int]
) -> Iterator[tuple[str, Callable[[], object]]]:
    """An endless mix of every Files operation on paths under ws/d/ (thread `t`)."""

    def read() -> object:
        data = c.read_bytes("d/f")
        return "escape: read the canary's secret" if SECRET.encode() in data else None

    def read_sub() -> object:
        data = c.read_bytes("d/sub/f")
        return "escape: read the canary's secret (sub)" if SECRET.encode() in data else None

    def listing() -> object:
        names = {e.name for e in c.list_dir("d", recursive=True)}
        return "escape: listed the canary" if "canary-only" in names else None

    def stat() -> object:
        for follow in (False, True):
            info = c.stat("d/f", follow_symlinks=follow)
            if info.inode in canary_inodes:
                return "escape: stat of a canary file"
        return None

    for i in itertools.count():
        n = f"{t}-{i % 50}"
        yield "write-overwrite", partial(c.write_file, "d/f", "mine")
        yield "read", read
        yield "write-new", partial(c.write_file, f"d/new{n}", "x", create_parents=False)
        yield "stat", stat
        yield "write-create-parents", partial(c.write_file, f"d/p{n}/q/f", "x")
        yield "list", listing
        yield "mkdir", partial(c.mkdir, f"d/mk{n}", parents=False)
        yield "mkdir-parents", partial(c.mkdir, f"d/mkp{n}/x/y")
        yield "symlink", partial(c.symlink, "target", f"d/ln{n}")
        yield "rename", partial(c.rename, f"d/new{n}", f"d/renamed{n}", overwrite=True)
        yield "read-sub", read_sub
        yield "remove-file", partial(c.remove, "d/victim")
        yield "remove-tree", partial(c.remove, "d/sub", recursive=True)
        yield "remove-new", partial(c.remove, f"d/renamed{n}")
        yield "remove-tree-p", partial(c.remove, f"d/p{n}", recursive=True)
        yield "rmdir", partial(c.remove, f"d/mk{n}")


def _hammer(agent: AgentProc, canary: Path, target_ops: int) -> tuple[Tally, float]:
    canary_inodes = {p.lstat().st_ino for p in canary.rglob("*")} | {canary.lstat().st_ino}
    tally = Tally()
    stop = threading.Event()

    def worker(t: int) -> None:
        with agent.client() as c:
            for op, fn in _operations(c, t, canary_inodes):
                if stop.is_set() or tally.ops >= target_ops:
                    return
                try:
                    verdict = fn()
                except CoworkError as exc:
                    tally.record(exc.code, op, exc.message)
                    continue
                tally.record("OK", op)
                if isinstance(verdict, str):
                    tally.escape(f"{op}: {verdict}")

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=240)
    stop.set()
    return tally, time.monotonic() - t0


@pytest.fixture(params=["openat2", "walk"])
def race_agent(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[AgentProc]:
    if request.param == "walk":
        monkeypatch.setenv("COWORK_FILES_RESOLVER", "walk")
    else:
        monkeypatch.delenv("COWORK_FILES_RESOLVER", raising=False)
    agent = make_agent()
    agent.extra["resolver"] = request.param
    monkeypatch.delenv("COWORK_FILES_RESOLVER", raising=False)
    yield agent
    agent.stop()
    shutil.rmtree(agent.dir, ignore_errors=True)


def prepare(agent: AgentProc, owner: tuple[int, int] | None = None) -> Path:
    """ws/d (a directory), two links to a root-only canary outside the root, and the canary."""
    ws, outside = agent.root, agent.dir
    canary = outside / "canary"
    (canary / "sub").mkdir(parents=True)
    for p in (canary / "f", canary / "sub" / "f", canary / "victim"):
        p.write_text(SECRET)
    (canary / "canary-only").write_text(SECRET)
    os.chmod(canary, 0o700)  # root-owned and private, like /root
    (ws / "d").mkdir()
    (ws / "d" / "f").write_text("mine")
    (ws / ".alt-abs").symlink_to(canary)
    (ws / ".alt-rel").symlink_to("../canary")
    if owner is not None:  # what the sandbox made is the sandbox user's
        for p in (ws / "d", ws / "d" / "f", ws / ".alt-abs", ws / ".alt-rel"):
            os.lchown(p, *owner)
    return canary


def run_race(
    agent: AgentProc,
    label: str,
    start_flipper: Callable[[], Callable[[], int]],
    owner: tuple[int, int] | None = None,
) -> None:
    """Flip ws/d while hammering the Files RPCs; then prove nothing escaped (and print it).

    `start_flipper` starts the flipping process once it flips, and returns a
    function that stops it and gives the number of flips it made.
    """
    canary = prepare(agent, owner)
    outside = agent.dir
    before = _snapshot(canary)
    outside_before = sorted(os.listdir(outside))
    stop_flipper = start_flipper()
    try:
        tally, wall = _hammer(agent, canary, OPS_PER_RESOLVER)
    finally:
        flips = stop_flipper()

    after = _snapshot(canary)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    temps_outside = _temp_files(canary) + [
        n for n in os.listdir(outside) if n not in outside_before and n != "agent.log"
    ]
    log = agent.log_lines()
    tracebacks = [line for line in log if "Traceback" in line]
    internal = [line for line in log if json.loads(line).get("code") in ("INTERNAL", "UNKNOWN")]
    resolvers = {json.loads(line).get("resolver") for line in log} - {None}
    escapes = len(tally.escapes) + len(changed) + len(temps_outside)
    print(
        f"\nrace [{label}, resolver {'/'.join(sorted(resolvers))}]: {tally.ops} Files operations"
        f" in {wall:.1f} s ({THREADS} threads) against {flips} flips of ws/d;"
        f" escapes: {escapes}; outcomes: {dict(tally.codes)}"
    )

    assert tally.ops >= OPS_PER_RESOLVER
    # The race was real: both sides of the flip were seen by the agent.
    assert tally.codes["OK"] > 0 and tally.codes["PERMISSION_DENIED"] > 0, tally.codes
    assert flips > 1000
    assert tally.escapes == []
    assert changed == [], changed
    assert temps_outside == []
    assert tally.unclean == [], tally.unclean[:10]
    assert tracebacks == [] and internal == [], (tracebacks + internal)[:5]


def test_no_files_rpc_escapes_the_root_while_a_directory_flips_to_a_symlink(
    race_agent: AgentProc,
) -> None:
    resolver = str(race_agent.extra["resolver"])

    def start() -> Callable[[], int]:
        flipper = subprocess.Popen(
            [sys.executable, "-c", FLIPPER, str(race_agent.root)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert flipper.stdout is not None and flipper.stdout.readline().strip() == "ready"

        def stop() -> int:
            flipper.send_signal(signal.SIGTERM)
            out, _ = flipper.communicate(timeout=10)
            return int(out.strip() or 0)

        return stop

    run_race(race_agent, f"root flipper, {resolver}", start)
    log = race_agent.log_lines()
    assert {json.loads(line).get("resolver") for line in log} - {None} == {resolver}
