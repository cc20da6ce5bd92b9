"""File transfers, interleaved in one run: the agent's data plane vs gRPC streaming vs SSH.

    .venv/bin/python -m bench.transfer [--mib 256] [--reps 3] [--files 10000] [--out DIR]

Every repetition runs each method once, round-robin, so machine noise (these
machines are shared; a VM may be running) hits every method alike:

- upload and download of one MiB-sized random file:
  `agent` (CoworkClient over unix:, data plane), `agent_grpc` (the same client with
  the data plane off: gRPC Files.Write/Read streaming), `agent_hvsock` (hvsock: target
  through a hybrid-vsock stand-in and the agent's own vsock RelayListener, whose
  first-byte sniff sends data connections to the data plane; no VM needed),
  `scp` and `ssh_cat` (through a ControlMaster to a real sshd on loopback);
- upload of a tree of N small files (1-8 KiB, 100 per directory):
  `agent` (one data connection for the whole tree), `tar_ssh` (`tar c | ssh tar x`);
  `agent_grpc` (three RPCs per file) only with --grpc-tree, it is slow.

Every copy is checked (size; SHA-256 of the file, or the tree's file count) outside
the timed part. Writes bench/results/transfer.json and transfer.md with MB/s
medians and the ratios to scp, ssh cat and tar | ssh tar x.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.run import Agent, loadavg, machine_info
from bench.sshd import Sshd

MiB = 1 << 20
RESULTS = Path(__file__).resolve().parent / "results"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def make_tree(root: Path, n: int) -> int:
    """n small files (1-8 KiB) in directories of 100; returns the total bytes."""
    total = 0
    blob = os.urandom(8192)
    for i in range(n):
        d = root / f"d{i // 100:03d}"
        if i % 100 == 0:
            d.mkdir(parents=True)
        size = 1024 + (i * 7919) % 7168
        (d / f"f{i:05d}.txt").write_bytes(blob[:size])
        total += size
    return total


def count_files(root: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(root))


class HvsockPath:
    """hvsock:PATH:PORT to the agent without a VM: the test suite's hybrid-vsock stand-in
    and the agent's own RelayListener (on a unix socket in place of AF_VSOCK), which
    relays gRPC to the agent's socket and diverts data connections to its data socket."""

    PORT = 7070

    def __init__(self, agent_sock: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from cowork.dataplane import data_socket_path
        from guest_agent import vsock
        from tests.vsock_fakes import FakeHybridVsock, GuestRelay

        data = data_socket_path(str(agent_sock))

        def divert(conn: socket.socket, addr: Any) -> None:
            up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            up.connect(data)
            vsock.Splice(conn, up, name="data").run_b_to_a_here()

        self.guest = GuestRelay(str(agent_sock))
        self.guest.listener.divert = divert
        self.hv = FakeHybridVsock({self.PORT: self.guest.path})
        self.target = self.hv.target(self.PORT)

    def close(self) -> None:
        self.hv.close()
        self.guest.close()


_TICK = os.sysconf("SC_CLK_TCK")


def _proc_table() -> dict[int, tuple[int, str, float]]:
    """pid -> (parent, cmdline, CPU seconds incl. reaped children) for every process."""
    out = {}
    for e in os.listdir("/proc"):
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{e}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        cpu = sum(int(x) for x in fields[11:15]) / _TICK  # utime stime cutime cstime
        out[int(e)] = (int(fields[1]), cmd, cpu)
    return out


def cpu_of(roots: set[int], marker: str) -> float:
    """CPU seconds used so far by `roots` and their descendants (children they reaped
    included), plus processes whose command line holds `marker` (the ssh ControlMaster)."""
    table = _proc_table()
    total = 0.0
    for pid, (_, cmd, cpu) in table.items():
        p, seen = pid, 0
        while p > 1 and p not in roots and seen < 64:
            p, seen = table.get(p, (0, "", 0.0))[0], seen + 1
        if p in roots or (marker and marker in cmd):
            total += cpu
    return total


def timed(fn: Callable[[], bool], cpu: Callable[[], float]) -> tuple[float | None, float, str]:
    c0 = cpu()
    t0 = time.perf_counter()
    try:
        ok = fn()
    except Exception as exc:  # reported, not fatal: the other methods still run
        return None, 0.0, f"{type(exc).__name__}: {str(exc)[:300]}"
    dt = time.perf_counter() - t0
    used = cpu() - c0
    return (dt, used, "") if ok else (None, 0.0, "size or checksum mismatch")


def run(mib: int, reps: int, nfiles: int, grpc_tree: bool, out_dir: Path) -> dict[str, Any]:
    from host_client import CoworkClient
    from host_client import transfer as tr

    base = Path(tempfile.mkdtemp(prefix="cw-bt-", dir="/tmp"))
    agent = Agent(base)
    agent.start()
    sshd = Sshd()
    sshd.start_master()
    hv = HvsockPath(agent.sock)
    fast = CoworkClient(agent.target, str(agent.token_file))
    slow = CoworkClient(agent.target, str(agent.token_file))
    over_hv = CoworkClient(hv.target, str(agent.token_file))
    tr._PLANES[slow.connection] = tr._NONE  # this client streams over gRPC only
    assert tr.data_plane(fast.connection) is not None, "agent has no data plane"
    assert tr.data_plane(over_hv.connection) is not None, "no data plane over hvsock"
    scp = sshd.scp(mux=True)
    ssh = sshd.ssh(mux=True)
    ws = agent.ws
    size = mib * MiB
    src = base / "payload.bin"
    with open(src, "wb") as f:
        for _ in range(mib // 16 or 1):
            f.write(os.urandom(min(size, 16 * MiB)))
    size = src.stat().st_size
    digest = sha256_file(src)
    back = base / "back.bin"
    tree = base / "tree"
    tree_bytes = make_tree(tree, nfiles)

    def up_client(c: Any, name: str) -> Callable[[], bool]:
        return lambda: c.upload(str(src), str(ws / name)).sha256 == digest

    def down_client(c: Any, name: str) -> Callable[[], bool]:
        return lambda: c.download(str(ws / name), str(back)).sha256 == digest

    def up_scp() -> bool:
        subprocess.run([*scp, str(src), sshd.remote(str(ws / "up-scp.bin"))], check=True)
        return (ws / "up-scp.bin").stat().st_size == size

    def down_scp() -> bool:
        subprocess.run([*scp, sshd.remote(str(ws / "up-scp.bin")), str(back)], check=True)
        return back.stat().st_size == size

    def up_cat() -> bool:
        with open(src, "rb") as f:
            dest = shlex.quote(str(ws / "up-cat.bin"))
            subprocess.run([*ssh, f"cat > {dest}"], stdin=f, check=True)
        return (ws / "up-cat.bin").stat().st_size == size

    def down_cat() -> bool:
        with open(back, "wb") as f:
            path = shlex.quote(str(ws / "up-cat.bin"))
            subprocess.run([*ssh, f"cat {path}"], stdout=f, stdin=subprocess.DEVNULL, check=True)
        return back.stat().st_size == size

    def tree_client(c: Any, name: str) -> Callable[[], bool]:
        def go() -> bool:
            r = c.upload(str(tree), str(ws / name))
            return bool(r.files == nfiles and not r.skipped)

        return go

    def tree_tar() -> bool:
        dest = shlex.quote(str(ws / "tree-tar"))
        tar = subprocess.Popen(["tar", "-C", str(tree), "-cf", "-", "."], stdout=subprocess.PIPE)
        subprocess.run([*ssh, f"mkdir -p {dest} && tar -C {dest} -xf -"], stdin=tar.stdout)
        assert tar.stdout is not None
        tar.stdout.close()
        return tar.wait() == 0

    plan: dict[str, dict[str, Callable[[], bool]]] = {
        "upload": {
            "agent": up_client(fast, "up-agent.bin"),
            "agent_grpc": up_client(slow, "up-grpc.bin"),
            "agent_hvsock": up_client(over_hv, "up-hv.bin"),
            "scp": up_scp,
            "ssh_cat": up_cat,
        },
        "download": {
            "agent": down_client(fast, "up-agent.bin"),
            "agent_grpc": down_client(slow, "up-grpc.bin"),
            "agent_hvsock": down_client(over_hv, "up-hv.bin"),
            "scp": down_scp,
            "ssh_cat": down_cat,
        },
        "tree_upload": {"agent": tree_client(fast, "tree-agent"), "tar_ssh": tree_tar},
    }
    if grpc_tree:
        plan["tree_upload"]["agent_grpc"] = tree_client(slow, "tree-grpc")
    times: dict[str, dict[str, list[float]]] = {k: {m: [] for m in v} for k, v in plan.items()}
    cpus: dict[str, dict[str, list[float]]] = {k: {m: [] for m in v} for k, v in plan.items()}
    assert agent.proc is not None and sshd._proc is not None
    roots = {os.getpid(), agent.proc.pid, sshd._proc.pid}

    def cpu() -> float:
        return cpu_of(roots, str(sshd.control_path))

    errors: dict[str, dict[str, str]] = {k: {} for k in plan}
    load0 = loadavg()
    tree_counts: dict[str, int] = {}
    try:
        for rep in range(reps):
            for kind, methods in plan.items():
                names = list(methods)
                names = names[rep % len(names) :] + names[: rep % len(names)]  # rotate
                for m in names:
                    fn = methods[m]
                    # Untimed: the previous tree goes, and every method starts with no dirty
                    # pages left by the one before (scp and cat do not fsync; the agent does).
                    for old in ws.glob("tree-*"):
                        shutil.rmtree(old, ignore_errors=True)
                    os.sync()
                    dt, used, err = timed(fn, cpu)
                    if dt is None:
                        errors[kind][m] = err
                    else:
                        times[kind][m].append(dt)
                        cpus[kind][m].append(used)
                    if kind == "tree_upload":
                        dest = {"agent": "tree-agent", "tar_ssh": "tree-tar"}.get(m, "tree-grpc")
                        tree_counts[m] = count_files(ws / dest)
                    print(f"rep {rep} {kind:11} {m:12} {dt or err}", file=sys.stderr, flush=True)
        checks = {
            "tree_agent_files": tree_counts.get("agent", -1),
            "tree_tar_files": tree_counts.get("tar_ssh", -1),
            "download_sha256_ok": sha256_file(back) == digest,
        }
    finally:
        for c in (fast, slow, over_hv):
            c.close()
        hv.close()
        sshd.close()
        agent.stop()
        shutil.rmtree(base, ignore_errors=True)
    out: dict[str, Any] = {
        "bytes": size,
        "tree_files": nfiles,
        "tree_bytes": tree_bytes,
        "reps": reps,
        "machine": machine_info(),
        "loadavg_before": load0,
        "loadavg_after": loadavg(),
        "checks": checks,
    }
    for kind, by_method in times.items():
        nbytes = tree_bytes if kind == "tree_upload" else size
        out[kind] = {}
        for m, xs in by_method.items():
            entry: dict[str, Any] = {"runs": len(xs)}
            if xs:
                med = statistics.median(xs)
                entry.update(
                    seconds=round(med, 4),
                    mb_per_s=round(nbytes / 1e6 / med, 1),
                    all_seconds=[round(x, 4) for x in xs],
                    cpu_seconds=round(statistics.median(cpus[kind][m]), 3),
                )
            if m in errors[kind]:
                entry["error"] = errors[kind][m]
            out[kind][m] = entry
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "transfer.json").write_text(json.dumps(out, indent=2) + "\n")
    (out_dir / "transfer.md").write_text(report(out))
    return out


def _ratio(a: dict[str, Any], b: dict[str, Any] | None) -> str:
    if not b or "seconds" not in a or "seconds" not in b:
        return "n/a"
    return f"{b['seconds'] / a['seconds']:.2f}x"


def report(r: dict[str, Any]) -> str:
    lines = [
        "# File transfers: data plane vs gRPC streaming vs SSH (bench/transfer.py)",
        "",
        f"One interleaved run: {r['reps']} rounds, every method once per round, the order "
        "rotated each round, `sync` before each (medians).",
        f"File: {r['bytes'] / MiB:g} MiB random; tree: {r['tree_files']} files, "
        f"{r['tree_bytes'] / 1e6:.1f} MB. Load average before/after: "
        f"{r['loadavg_before']} / {r['loadavg_after']}. Checks: {r['checks']}.",
        "Ratios are speed-ups of the medians: the other method's time divided by this one's "
        "(> 1 = faster). Best = the fastest of the rounds (the least disturbed).",
        "",
        "| transfer | method | MB/s (median) | MB/s (best) | seconds | CPU s (both ends) "
        "| vs scp | vs ssh cat | vs tar\\|ssh |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in ("upload", "download", "tree_upload"):
        ms = r.get(kind, {})
        nbytes = r["tree_bytes"] if kind == "tree_upload" else r["bytes"]
        for m, e in ms.items():
            best = f"{nbytes / 1e6 / min(e['all_seconds']):.1f}" if e.get("all_seconds") else ""
            lines.append(
                f"| {kind} | {m} | {e.get('mb_per_s', e.get('error', 'n/a'))} | {best} | "
                f"{e.get('seconds', '')} | {e.get('cpu_seconds', '')} | "
                f"{_ratio(e, ms.get('scp'))} | "
                f"{_ratio(e, ms.get('ssh_cat'))} | {_ratio(e, ms.get('tar_ssh'))} |"
            )
    lines += [
        "",
        "agent = CoworkClient over unix: with the data plane; agent_grpc = the same client "
        "with it off (Files.Write/Read streaming); agent_hvsock = hvsock: through a "
        "hybrid-vsock stand-in and the agent's vsock relay (its first-byte sniff) - no VM, "
        "so no virtio cost; scp / ssh cat / tar | ssh tar x go through one ControlMaster "
        "to a real sshd on loopback. The agent fsyncs every file before the rename "
        "(trees: one syncfs per 2048 files); scp, cat and tar do not. CPU s = CPU time of "
        "both ends during the copy (client, agent or ssh/scp/sshd/ControlMaster and what "
        "they ran), the figure that does not depend on how busy the machine was.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--files", type=int, default=10_000)
    p.add_argument("--grpc-tree", action="store_true", help="also the gRPC tree upload (slow)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    r = run(a.mib, a.reps, a.files, a.grpc_tree, a.out)
    print(report(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
