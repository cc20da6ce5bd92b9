"""What a process holds, read from /proc: the figures the endurance tests compare to a baseline."""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _stat_fields(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest[0], int(rest[1])


def descendants(pid: int) -> list[tuple[int, str]]:
    """Every live descendant of `pid` as (pid, state), zombies included."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(fields[1], []).append((int(entry), fields[0]))
    out: list[tuple[int, str]] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child[0])
    return out


@dataclass(frozen=True)
class Footprint:
    """A snapshot of what the agent holds."""

    fds: int
    sockets: int
    threads: int
    rss: int
    children: int
    zombies: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def max(self, other: Footprint) -> Footprint:
        """Field by field, the larger of the two (a running peak)."""
        mine, theirs = self.as_dict(), other.as_dict()
        return Footprint(**{k: max(v, theirs[k]) for k, v in mine.items()})


def footprint(pid: int) -> Footprint:
    fd_dir = f"/proc/{pid}/fd"
    sockets = 0
    fds = 0
    for name in os.listdir(fd_dir):
        fds += 1
        try:
            if os.readlink(f"{fd_dir}/{name}").startswith("socket:"):
                sockets += 1
        except FileNotFoundError:
            pass
    threads = len(os.listdir(f"/proc/{pid}/task"))
    kids = descendants(pid)
    return Footprint(
        fds=fds,
        sockets=sockets,
        threads=threads,
        rss=rss_bytes(pid),
        children=len(kids),
        zombies=sum(1 for _, state in kids if state == "Z"),
    )


def sockets_of(pid: int, peer_port: int | None = None) -> list[str]:
    """`ss` lines of the inet/unix sockets `pid` holds, optionally only those to `peer_port`."""
    out = subprocess.run(["ss", "-anp"], capture_output=True, text=True, check=False).stdout
    lines = [line for line in out.splitlines() if f"pid={pid}," in line]
    if peer_port is not None:
        lines = [line for line in lines if f":{peer_port} " in line.split("users:")[0]]
    return lines


def zombies(pid: int) -> list[str]:
    """Zombie descendants of `pid` as "pid (comm) of ppid" (for a failure message)."""
    out = []
    for child, state in descendants(pid):
        if state == "Z":
            fields = _stat_fields(child)
            try:
                comm = Path(f"/proc/{child}/comm").read_text().strip()
            except OSError:
                comm = "?"
            out.append(f"{child} ({comm}) of {fields[1] if fields else '?'}")
    return out
