"""What a Lima user would otherwise use, measured on a booted Lima VM (make bench-lima).

    .venv/bin/python -m bench.lima_latency                 # boots its own VM (~10 min, TCG)
    .venv/bin/python -m bench.lima_latency --attach BASE[:NAME]   # a VM the tier left up

Boots lima/cowork.yaml with `coworkctl init` exactly as the Lima tier does
(tests/lima_e2e/harness.py: the host user, the local image, TCG here), timing init to
ready; then, in one interleaved run (round-robin, so machine noise hits every path
alike), runs `true` in the VM through:
  - a persistent CoworkClient (one channel; this process),
  - `coworkctl exec -- true`, a fresh process per call, without and with `coworkctl mux`,
  - `limactl shell NAME true`,
  - `ssh -F <instance>/ssh.config lima-NAME true` (Lima's own ControlMaster);
then copies 256 MiB into /workspace and back with `coworkctl cp` and with
`limactl copy --backend=scp` (rsync is not installed here), checking every byte.
Every subprocess path runs as the host user through the same `setpriv ... env` prefix,
so that prefix's cost (a few ms) is in all of them alike.

Writes bench/results/lima.json and lima.md (bench.run's results.md is not touched).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.run import latency_stats
from tests.lima_e2e.harness import LimaHost, kvm_usable, lima_image, log

MiB = 1 << 20
PATHS = (
    "CoworkClient (persistent)",
    "coworkctl exec (fresh process)",
    "coworkctl exec + mux",
    "limactl shell NAME true",
    "ssh -F ssh.config lima-NAME true",
)
# Not an exec: what the transport alone costs (a unary RPC, through Lima's forward).
INFO = "CoworkClient Info (no process)"
# The persistent exec again with the policy's `sandbox: none`: what the box costs.
UNBOXED = "CoworkClient, sandbox: none"


def _ok(argv: Sequence[str], timeout: float = 120) -> bytes:
    r = subprocess.run(list(argv), capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        raise RuntimeError(f"{argv[-3:]} exited {r.returncode}: {r.stderr[-300:]!r}")
    return r.stdout


def _callers(host: LimaHost, client: Any) -> dict[str, Callable[[], object]]:
    py = [str(host.venv / "bin" / "python"), "-m", "host_client.cli"]
    no_mux = host.argv([*py, "exec", "--", "true"], COWORK_MUX="0")
    mux = host.argv([*py, "exec", "--", "true"])
    limactl = host.argv([str(host.env()["COWORK_LIMACTL"]), "shell", host.name, "true"])
    ssh = host.argv(["ssh", "-F", str(host.ssh_config), f"lima-{host.name}", "true"])

    def persistent() -> object:
        r = client.run(["/bin/true"])
        if r.exit_code != 0:
            raise RuntimeError(f"exit {r.exit_code}")
        return r

    return {
        PATHS[0]: persistent,
        INFO: client.info,
        PATHS[1]: lambda: _ok(no_mux),
        PATHS[2]: lambda: _ok(mux),
        PATHS[3]: lambda: _ok(limactl),
        PATHS[4]: lambda: _ok(ssh),
    }


def _timed(call: Callable[[], object], n: int, samples: list[float], errors: list[str]) -> None:
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            call()
        except Exception as exc:  # counted and reported, not fatal
            errors.append(str(exc)[:200])
            continue
        samples.append(time.perf_counter() - t0)


def latency(host: LimaHost, counts: dict[str, int], rounds: int, warmup: int) -> dict[str, Any]:
    """exec `true` through every path, interleaved in `rounds` rounds; then the
    persistent client once more with the box switched off in the policy."""
    order = [PATHS[0], INFO, *PATHS[1:]]
    samples: dict[str, list[float]] = {p: [] for p in [*order, UNBOXED]}
    errors: dict[str, list[str]] = {p: [] for p in samples}
    _ok(host.coworkctl_argv("mux", "start"))
    try:
        with host.client(connect_timeout=30) as client:
            calls = _callers(host, client)
            for p in order:
                for _ in range(warmup):
                    calls[p]()
            for r in range(rounds):
                for p in order:
                    n = counts[p] // rounds + (1 if r < counts[p] % rounds else 0)
                    _timed(calls[p], n, samples[p], errors[p])
                log(f"  round {r + 1}/{rounds}")
            policy = client.get_policy()["yaml"]
            unboxed = re.sub(r"^sandbox: .*$", "sandbox: none", policy, flags=re.M)
            client.set_policy(yaml=unboxed)
            try:
                _timed(calls[PATHS[0]], counts[PATHS[0]], samples[UNBOXED], errors[UNBOXED])
            finally:
                client.set_policy(yaml=policy)
    finally:
        subprocess.run(host.coworkctl_argv("mux", "stop"), capture_output=True, timeout=60)
    out = {}
    for p in samples:
        out[p] = latency_stats(samples[p], len(errors[p]))
        if errors[p]:
            out[p]["last_error"] = errors[p][-1]
        log(f"  {p:34} p50 {out[p].get('p50_ms', float('nan')):8.1f} ms  n={out[p]['n']}")
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def transfers(host: LimaHost, mib: int, repeat: int) -> dict[str, Any]:
    """`coworkctl cp` vs `limactl copy` (scp), up into /workspace and back down."""
    home = host.base / "home"
    src = home / "bench-src.bin"
    with open(src, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(MiB))
    os.chown(src, host.user.pw_uid, host.user.pw_gid)
    want = _sha256(src)
    lc = str(host.env()["COWORK_LIMACTL"])
    _ok(host.coworkctl_argv("exec", "--", "mkdir", "-p", "/workspace/bench"))
    ws = "/workspace/bench"
    up_cw, up_lc = host.workspace / "bench" / "cw.bin", host.workspace / "bench" / "lc.bin"
    down_cw, down_lc = home / "cw-down.bin", home / "lc-down.bin"
    scp = [lc, "copy", "--backend=scp"]
    jobs: dict[str, tuple[list[str], Path]] = {
        "coworkctl cp (up)": (host.coworkctl_argv("cp", "-q", str(src), f"vm:{ws}/cw.bin"), up_cw),
        "limactl copy --backend=scp (up)": (
            host.argv([*scp, str(src), f"{host.name}:{ws}/lc.bin"]),
            up_lc,
        ),
        "coworkctl cp (down)": (
            host.coworkctl_argv("cp", "-q", f"vm:{ws}/cw.bin", str(down_cw)),
            down_cw,
        ),
        "limactl copy --backend=scp (down)": (
            host.argv([*scp, f"{host.name}:{ws}/lc.bin", str(down_lc)]),
            down_lc,
        ),
    }
    seconds: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(repeat):
        for name, (argv, result) in jobs.items():
            t0 = time.perf_counter()
            _ok(argv, timeout=1800)
            seconds[name].append(time.perf_counter() - t0)
            if _sha256(result) != want:
                raise RuntimeError(f"{name}: the copy differs from the source")
    out = {}
    for name, xs in seconds.items():
        best = min(xs)
        out[name] = {
            "runs": len(xs),
            "seconds": [round(x, 2) for x in xs],
            "median_MBps": round(mib * MiB / statistics.median(xs) / 1e6, 1),
            "best_MBps": round(mib * MiB / best / 1e6, 1),
        }
        log(f"  {name:36} {out[name]['median_MBps']:7.1f} MB/s (median of {len(xs)})")
    _ok(host.coworkctl_argv("exec", "--", "rm", "-rf", "/workspace/bench"))
    for p in (src, down_cw, down_lc):
        p.unlink(missing_ok=True)
    return out


def markdown(res: dict[str, Any]) -> str:
    lat = res["latency"]
    base = {k: lat[k]["p50_ms"] for k in lat if lat[k].get("n")}
    ssh = base.get(PATHS[4])
    limactl = base.get(PATHS[3])
    lines = [
        "# Lima: cowork vs what a Lima user would otherwise use",
        "",
        f"`python -m bench.lima_latency` on {res['machine']}, {res['accel'].upper()} guest "
        f"({res['vm']}), {res['when']}. Exec `true` in the VM, interleaved.",
        "",
        "| path | p50 | p90 | p99 | n | vs `limactl shell` | vs `ssh` (ControlMaster) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for p in [PATHS[0], INFO, UNBOXED, *PATHS[1:]]:
        s = lat[p]
        if not s.get("n"):
            lines.append(f"| {p} | - | - | - | 0 | | |")
            continue
        vs_l = f"{limactl / s['p50_ms']:.1f}x" if limactl else ""
        vs_s = f"{ssh / s['p50_ms']:.1f}x" if ssh else ""
        lines.append(
            f"| {p} | {s['p50_ms']:.1f} ms | {s['p90_ms']:.1f} ms | {s['p99_ms']:.1f} ms | "
            f"{s['n']} | {vs_l} | {vs_s} |"
        )
    lines += ["", f"`coworkctl init` to ready: {res['init_to_ready_s']} s", ""]
    lines += [
        f"| {res['transfer_mib']} MiB, host <-> /workspace | median | best | runs |",
        "|---|---:|---:|---:|",
    ]
    for name, t in res["transfers"].items():
        lines.append(f"| {name} | {t['median_MBps']} MB/s | {t['best_MBps']} MB/s | {t['runs']} |")
    lines += ["", res["note"], ""]
    return "\n".join(lines)


NOTE = (
    "What TCG inflates: every guest instruction is emulated, so anything the guest "
    "executes (bash's login profile under `limactl shell`, sshd's per-session work, "
    "bwrap + setpriv for each boxed exec, the agent's Python) is several times slower "
    "than under KVM or vz; what runs on the host (a fresh coworkctl's Python start, the "
    "SSH client) is not. Ratios between paths are therefore closer to the truth than the "
    "absolute numbers. Transfers cross QEMU's user network and land on the 9p share "
    "through bindfs (both paths write the same place); under TCG the guest's copying "
    "and checksumming dominate."
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results", help="directory for lima.json / lima.md")
    ap.add_argument("--attach", metavar="BASE[:NAME]", help="use a VM the Lima tier left up")
    ap.add_argument("--keep", action="store_true", help="keep the VM it booted")
    ap.add_argument("--calls", type=int, default=60, help="timed calls per subprocess path")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each transfer")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench.lima_latency runs as root (it runs Lima as the tier's host user)")
    image = lima_image()
    if args.attach:
        base, _, name = args.attach.partition(":")
        host = LimaHost.create(base=Path(base))
        host.name = name or host.name
        init_s: float | str = "n/a (attached)"
    else:
        host = LimaHost.create()
    host.accel = "kvm" if kvm_usable(image, host.user) else "tcg"
    try:
        if not args.attach:
            log(f"coworkctl init ({host.accel}) ...")
            t0 = time.monotonic()
            r = host.coworkctl(*host.init_args(image), timeout=2400)
            init_s = round(time.monotonic() - t0, 1)
            if r.returncode != 0:
                sys.exit(f"coworkctl init failed: {r.stderr.decode(errors='replace')[-2000:]}")
            log(f"ready after {init_s} s")
        counts = {p: args.calls for p in PATHS}
        counts[PATHS[0]] = counts[INFO] = args.calls * 3  # no process start: more samples
        log("exec `true`, interleaved:")
        load_before = os.getloadavg()[0]
        lat = latency(host, counts, args.rounds, warmup=3)
        log(f"{args.mib} MiB transfers:")
        tr = transfers(host, args.mib, args.repeat)
        info = host.coworkctl("--json", "info")
        vm = json.loads(info.stdout) if info.returncode == 0 else {}
        res = {
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{os.cpu_count()} CPUs, 1-min load {load_before:.1f} before the "
            f"latency run and {os.getloadavg()[0]:.1f} after the transfers",
            "accel": host.accel,
            "vm": f"{vm.get('distro', '?')}, {vm.get('cpus', '?')} vCPUs, Lima 2.2.0 qemu",
            "init_to_ready_s": init_s,
            "latency": lat,
            "transfer_mib": args.mib,
            "transfers": tr,
            "note": NOTE,
        }
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "lima.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / "lima.md").write_text(markdown(res))
        print(markdown(res))
    finally:
        if not (args.attach or args.keep):
            host.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
