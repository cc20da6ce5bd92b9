"""`coworkctl cp`, `ls`, `cat`, `rm`: files between host and sandbox."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from .common import fail, human_bytes, make_client, print_json

CP_HELP = """\
Copy files or directory trees between this host and the sandbox, like `cp -a` or
`docker cp`. Write a sandbox path as vm:PATH (relative paths are under the
workspace root). Each file lands atomically (all or nothing) and is checked by
size and SHA-256. When DST is an existing directory, SRC is copied into it.

Symlinks are copied as symlinks (their target text unchanged) in both
directions, SRC itself included; nothing is read through a link unless you ask
with -L (as `cp -L`; in the sandbox only links that stay inside the workspace
can be followed). Sockets, FIFOs and devices are skipped; each skip is one
"coworkctl: skipped PATH: REASON" line on stderr (and in --json), and the
copy still exits 0, like tar's "socket ignored".

examples:
  coworkctl cp ./report.pdf vm:/workspace/
  coworkctl cp -r ./src vm:/workspace/src
  coworkctl cp vm:/workspace/out ./out
  coworkctl cp -L ./linked-config vm:/workspace/config   # copy what the link points to
  coworkctl cp --resume ./big.iso vm:/workspace/         # continue a cut upload
"""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "cp",
        help="copy files between host and sandbox (vm:PATH)",
        description=CP_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-r", "--recursive", action="store_true", help="accepted for habit; dirs copy")
    p.add_argument(
        "-L",
        "--dereference",
        action="store_true",
        help="follow symlinks and copy what they point to (default: copy links as links)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a cut upload of one file from what the agent already verified",
    )
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_cp)

    ls = sub.add_parser("ls", help="list a sandbox directory")
    ls.add_argument("-R", "--recursive", action="store_true")
    ls.add_argument("path", nargs="?", default="")
    ls.set_defaults(func=cmd_ls)

    cat = sub.add_parser("cat", help="print a sandbox file to stdout")
    cat.add_argument("path")
    cat.set_defaults(func=cmd_cat)

    rm = sub.add_parser("rm", help="remove a sandbox file or directory")
    rm.add_argument("-r", "--recursive", action="store_true")
    rm.add_argument("-f", "--force", action="store_true", help="no error if missing")
    rm.add_argument("path")
    rm.set_defaults(func=cmd_rm)


def _remote(spec: str) -> str | None:
    return spec[3:] or "." if spec.startswith("vm:") else None


class Progress:
    """A one-line progress bar on stderr, redrawn at most 10 times a second."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total = total
        self.label = label
        self.enabled = enabled
        self.done = 0
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.1 or self.done >= self.total):
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.t0, 1e-6)
        frac = min(self.done / self.total, 1.0) if self.total else 1.0
        width = 30
        bar = "#" * int(frac * width)
        sys.stderr.write(
            f"\r{self.label[:30]:30} [{bar:<{width}}] {frac * 100:5.1f}% "
            f"{human_bytes(self.done)} {human_bytes(rate)}/s "
        )
        sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            sys.stderr.write("\n")


def cmd_cp(args: argparse.Namespace) -> int:
    src_r, dst_r = _remote(args.src), _remote(args.dst)
    if (src_r is None) == (dst_r is None):
        fail("cp needs exactly one side written as vm:PATH", 2)
    show = not args.quiet and not args.json and sys.stderr.isatty()
    follow = args.dereference
    client = make_client(args)
    try:
        if dst_r is not None:  # upload
            from ..transfer import local_size

            src = args.src
            if not os.path.lexists(src):
                fail(f"no such local file or directory: {src}")
            dest = dst_r
            try:
                if client.stat(dest, follow_symlinks=True).is_dir:
                    dest = f"{dest.rstrip('/')}/{os.path.basename(os.path.abspath(src))}"
            except Exception as exc:  # NotFound: dest is the new name
                if getattr(exc, "code", "") != "NOT_FOUND":
                    raise
            bar = Progress(local_size(src, follow), os.path.basename(src), show)
            if args.resume:
                from ..transfer import resume_upload

                result = resume_upload(client.connection, src, dest, progress=bar)
            else:
                result = client.upload(src, dest, progress=bar, follow_symlinks=follow)
        else:
            assert src_r is not None
            if args.resume:
                fail("--resume continues uploads (host to vm:PATH); a download is redone whole", 2)
            info = client.stat(src_r, follow_symlinks=follow)
            dest = args.dst
            if os.path.isdir(dest):
                dest = os.path.join(dest, info.name)
            total = info.size if info.type == "file" else 0
            if info.is_dir:
                total = sum(e.size for e in client.list_dir(src_r, True) if e.type == "file")
            bar = Progress(total, info.name, show)
            result = client.download(src_r, dest, progress=bar, follow_symlinks=follow)
        bar.finish()
    finally:
        client.close()
    for skip in result.skipped:
        print(f"coworkctl: skipped {skip.path}: {skip.reason}", file=sys.stderr)
    if args.json:
        print_json(
            {
                "path": result.path,
                "bytes": result.bytes,
                "files": result.files,
                "symlinks": result.symlinks,
                "sha256": result.sha256,
                "skipped": [{"path": s.path, "reason": s.reason} for s in result.skipped],
            }
        )
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        entries = client.list_dir(args.path or ".", recursive=args.recursive)
    finally:
        client.close()
    if args.json:
        for e in entries:
            print_json(e.__dict__)
        return 0
    for e in entries:
        kind = {"directory": "d", "symlink": "l", "file": "-"}.get(e.type, "?")
        mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.mtime_ns / 1e9))
        name = e.path if args.recursive else e.name
        link = f" -> {e.symlink_target}" if e.symlink_target else ""
        print(f"{kind}{e.mode:04o} {e.size:>12} {mtime} {name}{link}")
    return 0


def cmd_cat(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        _, chunks = client.read_chunks(args.path)
        for chunk in chunks:
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    finally:
        client.close()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    client = make_client(args)
    try:
        client.remove(args.path, recursive=args.recursive, missing_ok=args.force)
    finally:
        client.close()
    return 0
