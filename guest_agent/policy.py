"""The sandbox policy: one YAML file in the guest, validated strictly, applied live.

Why strict: a typo in a security policy (`alow:` for `allow:`) must not silently
fall back to a default; every unknown key or bad value is an error that names
the key, and the previous policy stays in force.

    sandbox: bwrap          # none | bwrap
    network:
      preset: default       # default (Claude Code + package managers) | offline (nothing)
      allow: []             # extra domains (`*.example.com` = its subdomains)
      deny: []              # checked first: always refused
    limits:                 # per exec / Claude run (cgroup v2)
      memory: 2GiB          # memory.max
      pids: 1024            # pids.max
      cpus: 2               # cpu.max, in CPUs
      max: {memory: 8GiB, pids: 4096, cpus: 4}   # what a call may ask for at most
    runs:                   # runs with ids (detach, attach, replay)
      journal: 64MiB        # each detached run's journal (its head is cut beyond it)
      journal_total: 256MiB # all journals together (a new run is refused beyond it)
      detached: 32          # detached runs going at once
      keep: 24h             # how long a finished run keeps its exit and journal
    boxes:                  # named boxes (coworkctl box new)
      max: 16               # boxes at once
      idle: 12h             # a box with nothing going in it for this long is removed (0: never)
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field, replace
from typing import Any

from .egress import DEFAULT_ALLOW, DomainPolicy

SANDBOX_MODES = ("none", "bwrap")
PRESETS = ("default", "offline")
# cpu.max takes a quota in microseconds per 100 ms period; past this it means nothing
# (and .inf / .nan cannot be turned into a quota at all).
MAX_CPUS = 1_000_000
# memory.max is read as a 64-bit count (a larger number wraps in the kernel's parser);
# pids.max refuses more than PID_MAX_LIMIT (EINVAL: every run would then fail to start).
MAX_MEMORY_BYTES = 2**63 - 1
MAX_PIDS = 4 * 1024 * 1024
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


class PolicyError(ValueError):
    """A policy that cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class Limits:
    """cgroup v2 limits; 0 means "no limit" for that controller."""

    memory_bytes: int = 0
    pids: int = 0
    cpus: float = 0.0

    def capped(self, ceiling: Limits) -> Limits:
        """These limits, each no higher than `ceiling`'s (where the ceiling sets one)."""

        def cap(v: float, c: float) -> float:
            if not c:
                return v
            return c if not v else min(v, c)

        return Limits(
            memory_bytes=int(cap(self.memory_bytes, ceiling.memory_bytes)),
            pids=int(cap(self.pids, ceiling.pids)),
            cpus=cap(self.cpus, ceiling.cpus),
        )


DEFAULT_JOURNAL = 64 * 1024**2
DEFAULT_JOURNAL_TOTAL = 256 * 1024**2
DEFAULT_DETACHED = 32
DEFAULT_KEEP_SECONDS = 24 * 3600.0
DEFAULT_MAX_BOXES = 16
DEFAULT_BOX_IDLE_SECONDS = 12 * 3600.0
# A journal smaller than this could not hold one output chunk.
MIN_JOURNAL = 64 * 1024
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


@dataclass(frozen=True)
class RunLimits:
    """What detached runs may hold: journal bytes each and in all, how many, for how long."""

    journal: int = DEFAULT_JOURNAL
    journal_total: int = DEFAULT_JOURNAL_TOTAL
    detached: int = DEFAULT_DETACHED
    keep_seconds: float = DEFAULT_KEEP_SECONDS


@dataclass(frozen=True)
class BoxLimits:
    """How many named boxes may exist, and how long one may idle before it is removed."""

    max: int = DEFAULT_MAX_BOXES
    idle: float = DEFAULT_BOX_IDLE_SECONDS


@dataclass(frozen=True)
class Policy:
    sandbox: str = "none"
    preset: str = "default"
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    max_limits: Limits = field(default_factory=Limits)
    runs: RunLimits = field(default_factory=RunLimits)
    boxes: BoxLimits = field(default_factory=BoxLimits)

    def egress(self) -> DomainPolicy:
        """The domain policy the egress proxy enforces."""
        base = DEFAULT_ALLOW if self.preset == "default" else ()
        return DomainPolicy(allow=tuple(dict.fromkeys(base + self.allow)), deny=self.deny)

    def to_dict(self) -> dict[str, Any]:
        def lim(x: Limits) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if x.memory_bytes:
                out["memory"] = format_size(x.memory_bytes)
            if x.pids:
                out["pids"] = x.pids
            if x.cpus:
                out["cpus"] = int(x.cpus) if float(x.cpus).is_integer() else x.cpus
            return out

        limits = lim(self.limits)
        ceiling = lim(self.max_limits)
        if ceiling:
            limits["max"] = ceiling
        out: dict[str, Any] = {
            "sandbox": self.sandbox,
            "network": {"preset": self.preset, "allow": list(self.allow), "deny": list(self.deny)},
            "limits": limits,
        }
        if self.runs != RunLimits():
            out["runs"] = {
                "journal": format_size(self.runs.journal),
                "journal_total": format_size(self.runs.journal_total),
                "detached": self.runs.detached,
                "keep": format_duration(self.runs.keep_seconds),
            }
        if self.boxes != BoxLimits():
            out["boxes"] = {"max": self.boxes.max, "idle": format_duration(self.boxes.idle)}
        return out

    def to_yaml(self) -> str:
        import yaml

        text: str = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)
        return text

    def with_allowed(self, domain: str) -> Policy:
        domain = DomainPolicy.validate_pattern(domain)
        return replace(
            self,
            allow=tuple(dict.fromkeys((*self.allow, domain))),
            deny=tuple(d for d in self.deny if d != domain),
        )

    def with_denied(self, domain: str) -> Policy:
        domain = DomainPolicy.validate_pattern(domain)
        return replace(
            self,
            deny=tuple(dict.fromkeys((*self.deny, domain))),
            allow=tuple(d for d in self.allow if d != domain),
        )

    def with_preset(self, preset: str) -> Policy:
        if preset not in PRESETS:
            raise PolicyError(f"policy: unknown preset {preset!r} (use {' or '.join(PRESETS)})")
        return replace(self, preset=preset, allow=(), deny=())


def parse_size(value: Any, key: str) -> int:
    """'2GiB', '2G', '512M', 1073741824 -> bytes (units are powers of 1024, as Docker's)."""
    if isinstance(value, bool):
        raise PolicyError(f"policy: {key} must be a size like 2GiB, not {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = _SIZE_RE.match(str(value))
        if not m:
            raise PolicyError(f"policy: {key} must be a size like 512MiB or 2GiB, not {value!r}")
        number, unit = float(m.group(1)), (m.group(2) or "B").upper()
        power = "BKMGT".index(unit[0])
        exact = number * 1024**power  # a float: inf for an absurdly long digit string
        size = int(exact) if exact <= MAX_MEMORY_BYTES else MAX_MEMORY_BYTES + 1
    if size < 0:
        raise PolicyError(f"policy: {key} must not be negative")
    if size > MAX_MEMORY_BYTES:
        raise PolicyError(f"policy: {key} is larger than {MAX_MEMORY_BYTES} bytes: {value!r}")
    return size


def format_size(n: int) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def parse_duration(value: Any, key: str) -> float:
    """'24h', '30m', '90s', '500ms', '2d', or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise PolicyError(f"policy: {key} must be a duration like 30m or 24h, not {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION_RE.match(str(value))
        if not m:
            raise PolicyError(f"policy: {key} must be a duration like 30m or 24h, not {value!r}")
        unit = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2) or "s"]
        seconds = float(m.group(1)) * unit
    if not 0 <= seconds <= 366 * 86400:
        raise PolicyError(f"policy: {key} must be from 0 to 366 days, not {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _runs(obj: Any) -> RunLimits:
    d = _keys(obj, {"journal", "journal_total", "detached", "keep"}, "runs")
    journal = parse_size(d.get("journal", DEFAULT_JOURNAL), "runs.journal")
    total = parse_size(d.get("journal_total", DEFAULT_JOURNAL_TOTAL), "runs.journal_total")
    if journal < MIN_JOURNAL:
        raise PolicyError(f"policy: runs.journal must be at least {format_size(MIN_JOURNAL)}")
    if total < journal:
        raise PolicyError("policy: runs.journal_total must be at least runs.journal")
    detached = d.get("detached", DEFAULT_DETACHED)
    if isinstance(detached, bool) or not isinstance(detached, int) or not 0 <= detached <= 4096:
        raise PolicyError(
            f"policy: runs.detached must be a whole number from 0 to 4096, not {detached!r}"
        )
    keep = parse_duration(d.get("keep", DEFAULT_KEEP_SECONDS), "runs.keep")
    return RunLimits(journal=journal, journal_total=total, detached=detached, keep_seconds=keep)


def _boxes(obj: Any) -> BoxLimits:
    d = _keys(obj, {"max", "idle"}, "boxes")
    most = d.get("max", DEFAULT_MAX_BOXES)
    if isinstance(most, bool) or not isinstance(most, int) or not 0 <= most <= 1024:
        raise PolicyError(f"policy: boxes.max must be a whole number from 0 to 1024, not {most!r}")
    idle = parse_duration(d.get("idle", DEFAULT_BOX_IDLE_SECONDS), "boxes.idle")
    return BoxLimits(max=most, idle=idle)


def _keys(obj: Any, allowed: set[str], where: str) -> dict[str, Any]:
    if obj is None:
        return {}
    if not isinstance(obj, dict):
        raise PolicyError(f"policy: {where or 'the document'} must be a mapping")
    for k in obj:
        if k not in allowed:
            path = f"{where}.{k}" if where else str(k)
            raise PolicyError(f"policy: unknown key {path!r} (known: {', '.join(sorted(allowed))})")
    return obj


def _limits(obj: Any, where: str, with_max: bool) -> tuple[Limits, Limits]:
    d = _keys(obj, {"memory", "pids", "cpus", *(["max"] if with_max else [])}, where)
    pids = d.get("pids", 0)
    if isinstance(pids, bool) or not isinstance(pids, int) or not 0 <= pids <= MAX_PIDS:
        raise PolicyError(
            f"policy: {where}.pids must be a whole number from 0 to {MAX_PIDS}, not {pids!r}"
        )
    cpus = d.get("cpus", 0)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not 0 <= cpus <= MAX_CPUS:
        raise PolicyError(
            f"policy: {where}.cpus must be a number from 0 to {MAX_CPUS}, not {cpus!r}"
        )
    own = Limits(
        memory_bytes=parse_size(d.get("memory", 0), f"{where}.memory"),
        pids=pids,
        cpus=float(cpus),
    )
    ceiling = _limits(d.get("max"), f"{where}.max", False)[0] if with_max else Limits()
    return own, ceiling


def _domains(obj: Any, key: str) -> tuple[str, ...]:
    if obj is None:
        return ()
    if not isinstance(obj, list):
        raise PolicyError(f"policy: {key} must be a list of domains")
    out = []
    for i, d in enumerate(obj):
        if not isinstance(d, str):
            raise PolicyError(f"policy: {key}[{i}] must be a domain name, not {d!r}")
        try:
            out.append(DomainPolicy.validate_pattern(d))
        except ValueError as exc:
            raise PolicyError(f"policy: {key}[{i}]: {exc}") from None
    return tuple(out)


def parse(text: str) -> Policy:
    """Parse and validate policy YAML; raise PolicyError naming the bad key."""
    import yaml

    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise PolicyError(f"policy: not valid YAML{where}") from None
    except RecursionError:
        raise PolicyError("policy: the document is nested too deeply") from None
    d = _keys(doc, {"sandbox", "network", "limits", "runs", "boxes"}, "")
    sandbox = d.get("sandbox", "none")
    if sandbox not in SANDBOX_MODES:
        raise PolicyError(
            f"policy: sandbox must be one of {', '.join(SANDBOX_MODES)}, not {sandbox!r}"
        )
    net = _keys(d.get("network"), {"preset", "allow", "deny"}, "network")
    preset = net.get("preset", "default")
    if preset not in PRESETS:
        raise PolicyError(
            f"policy: network.preset must be one of {', '.join(PRESETS)}, not {preset!r}"
        )
    limits, ceiling = _limits(d.get("limits"), "limits", True)
    return Policy(
        sandbox=sandbox,
        preset=preset,
        allow=_domains(net.get("allow"), "network.allow"),
        deny=_domains(net.get("deny"), "network.deny"),
        limits=limits,
        max_limits=ceiling,
        runs=_runs(d.get("runs")),
        boxes=_boxes(d.get("boxes")),
    )


def load(path: str | None, default: Policy | None = None) -> Policy:
    """The policy at `path`; `default` (or the built-in one) when there is no file."""
    if not path or not os.path.exists(path):
        return default or Policy()
    with open(path, encoding="utf-8") as f:
        return parse(f.read())


def save(path: str, policy: Policy) -> None:
    """Write atomically (temp + fsync + rename), root-only readable."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".policy.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("# cowork sandbox policy (written by the agent: Policy.Set)\n")
            f.write(policy.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
