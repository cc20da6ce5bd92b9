"""The policy file: strict parsing (bad keys are named), round trips, presets and limit caps."""

from __future__ import annotations

import pytest

from guest_agent import policy as pol
from guest_agent.egress import DEFAULT_ALLOW

FULL = """\
sandbox: bwrap
network:
  preset: default
  allow: [Example.COM., "*.corp.example"]
  deny: [evil.example.com]
limits:
  memory: 2GiB
  pids: 1024
  cpus: 1.5
  max: {memory: 8G, pids: 4096, cpus: 4}
"""


def test_a_full_policy_parses_with_normalised_domains_and_sizes() -> None:
    p = pol.parse(FULL)
    assert p.sandbox == "bwrap" and p.preset == "default"
    assert p.allow == ("example.com", "*.corp.example")
    assert p.deny == ("evil.example.com",)
    assert p.limits == pol.Limits(memory_bytes=2 << 30, pids=1024, cpus=1.5)
    assert p.max_limits == pol.Limits(memory_bytes=8 << 30, pids=4096, cpus=4.0)


def test_yaml_round_trips() -> None:
    p = pol.parse(FULL)
    assert pol.parse(p.to_yaml()) == p


def test_an_empty_document_is_the_builtin_default() -> None:
    assert pol.parse("") == pol.Policy()


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("sandbox: bwrap\nnetwork:\n  alow: [x.com]\n", "network.alow"),
        ("limits:\n  memroy: 1G\n", "limits.memroy"),
        ("limits:\n  max: {pid: 3}\n", "limits.max.pid"),
        ("sandbx: none\n", "sandbx"),
        ("sandbox: docker\n", "sandbox"),
        ("network:\n  preset: online\n", "network.preset"),
        ("network:\n  allow: [https://x.com]\n", "network.allow[0]"),
        ("network:\n  deny: x.com\n", "network.deny"),
        ("limits:\n  memory: lots\n", "limits.memory"),
        ("limits:\n  pids: -1\n", "limits.pids"),
        ("limits:\n  cpus: many\n", "limits.cpus"),
        ("- just\n- a list\n", "mapping"),
        ("sandbox: [unclosed\n", "YAML"),
    ],
)
def test_a_bad_policy_is_refused_naming_what_is_wrong(text: str, named: str) -> None:
    with pytest.raises(pol.PolicyError) as err:
        pol.parse(text)
    assert named in str(err.value)


def test_the_default_preset_allows_what_claude_and_package_managers_need() -> None:
    eg = pol.Policy(preset="default", allow=("extra.example",)).egress()
    assert set(DEFAULT_ALLOW) <= set(eg.allow) and "extra.example" in eg.allow
    assert eg.decide("api.anthropic.com")[0] and eg.decide("registry.npmjs.org")[0]
    assert eg.decide("pypi.org")[0] and eg.decide("github.com")[0]
    assert not eg.decide("example.org")[0]


def test_the_offline_preset_allows_nothing_and_clears_the_lists() -> None:
    p = pol.parse(FULL).with_preset("offline")
    assert p.allow == () and p.deny == ()
    assert not p.egress().decide("api.anthropic.com")[0]


def test_allow_and_deny_move_a_domain_between_the_lists() -> None:
    p = pol.Policy().with_denied("X.example.").with_allowed("x.example")
    assert p.allow == ("x.example",) and p.deny == ()
    p = p.with_denied("x.example")
    assert p.deny == ("x.example",) and p.allow == ()


def test_limits_asked_for_are_capped_by_the_maximum() -> None:
    ceiling = pol.Limits(memory_bytes=1 << 30, pids=100, cpus=2)
    assert pol.Limits(memory_bytes=4 << 30, pids=50).capped(ceiling) == pol.Limits(
        memory_bytes=1 << 30, pids=50, cpus=2
    )
    assert pol.Limits().capped(pol.Limits()) == pol.Limits()


def test_save_is_atomic_and_private(tmp_path: object) -> None:
    import os
    from pathlib import Path

    path = Path(str(tmp_path)) / "policy.yaml"
    pol.save(str(path), pol.parse(FULL))
    assert pol.load(str(path)) == pol.parse(FULL)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["policy.yaml"]
