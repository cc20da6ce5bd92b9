#!/usr/bin/env python3
"""The protocol lock: every change to proto/ must come with a PROTOCOL_VERSION bump.

A client gates features on Agent.Info's protocol_version; a field added without a
bump is invisible to that check. So proto/cowork/agent/v1/PROTOCOL.lock records,
for each protocol version ever released, the sha256 of the .proto files it had:

    <version> <sha256 of proto/cowork/agent/v1/*.proto>

The hash covers what the contract says, not how it is written: each file's tokens
(names, numbers, punctuation, string literals) with comments and layout left out,
so fixing a comment or reformatting needs no bump, and any other change does.

and the history is append-only:

  check  (make proto-check):  the .proto files must hash to the entry of the current
         PROTOCOL_VERSION (cowork/defaults.py). Otherwise one line says what to do.
  lock   (make proto-lock):   record the current hash under the current version. It
         refuses to record a new hash under a version that already has one, or a
         version lower than the last: changing a proto and re-locking without a
         bump fails here, not just in review.

Stdlib only, no imports from the project: it runs before anything is generated.
usage: proto_lock.py check|lock|status [--root DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from pathlib import Path

PROTO_DIR = Path("proto/cowork/agent/v1")
LOCK = PROTO_DIR / "PROTOCOL.lock"
DEFAULTS = Path("cowork/defaults.py")
HEADER = """\
# Protocol versions and the sha256 of proto/cowork/agent/v1/*.proto each one had
# (over their tokens: comments and layout do not count).
# Append-only, written by `make proto-lock`, checked by `make proto-check`
# (scripts/proto_lock.py). A proto change needs a PROTOCOL_VERSION bump in
# cowork/defaults.py first; then `make proto-lock` and commit this file.
"""


class LockError(Exception):
    """What is wrong and what to do, as one line."""


_TOKEN = re.compile(
    r"""
      (?P<comment>//[^\n]*|/\*.*?\*/)        # dropped
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
    | (?P<word>[A-Za-z0-9_.+-]+)
    | (?P<space>\s+)                          # dropped
    | (?P<punct>.)
    """,
    re.VERBOSE | re.DOTALL,
)


def contract_tokens(source: str) -> list[str]:
    """The tokens of a .proto file: what it says, without comments or layout."""
    return [m.group() for m in _TOKEN.finditer(source) if m.lastgroup not in ("comment", "space")]


def proto_hash(root: Path) -> str:
    """sha256 over every .proto file (sorted by name): its name, then its tokens."""
    digest = hashlib.sha256()
    files = sorted((root / PROTO_DIR).glob("*.proto"))
    if not files:
        raise LockError(f"no .proto files under {root / PROTO_DIR}")
    for f in files:
        tokens = contract_tokens(f.read_text(encoding="utf-8"))
        digest.update(f.name.encode() + b"\0" + "\n".join(tokens).encode() + b"\0")
    return digest.hexdigest()


def protocol_version(root: Path) -> int:
    text = (root / DEFAULTS).read_text(encoding="utf-8")
    m = re.search(r"^PROTOCOL_VERSION\s*=\s*(\d+)\s*$", text, re.MULTILINE)
    if not m:
        raise LockError(f"no 'PROTOCOL_VERSION = N' line in {DEFAULTS}")
    return int(m.group(1))


def read_lock(root: Path) -> list[tuple[int, str]]:
    """The recorded (version, hash) pairs, oldest first."""
    path = root / LOCK
    if not path.exists():
        return []
    entries: list[tuple[int, str]] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[0].isdigit() or not re.fullmatch(r"[0-9a-f]{64}", parts[1]):
            raise LockError(f"{LOCK}:{n}: expected '<version> <sha256>', got {line!r}")
        entries.append((int(parts[0]), parts[1]))
    versions = [v for v, _ in entries]
    if versions != sorted(set(versions)):
        raise LockError(f"{LOCK}: versions must be unique and increasing: {versions}")
    return entries


def check(root: Path) -> str:
    """'' when the protos are locked under the current version, else the one-line problem."""
    version, current = protocol_version(root), proto_hash(root)
    entries = dict(read_lock(root))
    last = max(entries, default=0)
    if entries.get(version) == current:
        return ""
    if version < last:
        return f"PROTOCOL_VERSION {version} is below the last locked version {last}: it only grows"
    if version in entries:
        return (
            f"proto/ changed but PROTOCOL_VERSION is still {version} (locked with other "
            f".proto content): bump PROTOCOL_VERSION in {DEFAULTS}, run 'make proto-lock' "
            f"and commit {LOCK}"
        )
    return f"protocol version {version} is not locked yet: run 'make proto-lock' and commit {LOCK}"


def lock(root: Path) -> str:
    """Record the current hash under the current version (append-only); returns what it did."""
    version, current = protocol_version(root), proto_hash(root)
    entries = read_lock(root)
    recorded = dict(entries)
    if recorded.get(version) == current:
        return f"protocol version {version} is already locked with these .proto files"
    if version in recorded:
        raise LockError(
            f"protocol version {version} is already locked with other .proto content: "
            f"bump PROTOCOL_VERSION in {DEFAULTS} first (released versions never change)"
        )
    last = max(recorded, default=0)
    if version < last:
        raise LockError(f"PROTOCOL_VERSION {version} is below the last locked version {last}")
    entries.append((version, current))
    body = "".join(f"{v} {h}\n" for v, h in entries)
    (root / LOCK).write_text(HEADER + body, encoding="utf-8")
    return f"locked protocol version {version} ({current[:12]}…) in {LOCK}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="proto_lock.py", description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["check", "lock", "status"])
    p.add_argument("--root", default=str(Path(__file__).resolve().parent.parent))
    args = p.parse_args(argv)
    root = Path(args.root)
    try:
        if args.command == "lock":
            print(lock(root))
            return 0
        problem = check(root)
    except (LockError, OSError) as exc:
        print(f"proto-lock: {exc}", file=sys.stderr)
        return 1
    if problem:
        print(f"proto-lock: {problem}", file=sys.stderr)
        return 1 if args.command == "check" else 0
    print(f"protocol version {protocol_version(root)} is locked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
