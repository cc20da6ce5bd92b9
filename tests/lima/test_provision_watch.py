"""How `coworkctl init/start` reads the guest's provisioning log (lima.ProvisionWatch):
our scripts' lines are shown, the rest is not, and agent.sh's first error stops the wait."""

from __future__ import annotations

from host_client import lima


def _watch() -> tuple[lima.ProvisionWatch, list[str]]:
    shown: list[str] = []
    return lima.ProvisionWatch(shown.append), shown


def test_our_scripts_lines_are_shown_and_package_noise_is_not() -> None:
    watch, shown = _watch()
    for text in (
        "Get:1 http://deb.debian.org/debian bookworm InRelease [151 kB]",
        "cowork base.sh: toolchain skipped",
        "npm WARN EBADENGINE Unsupported engine {",
        "[  621.2] cloud-init[1670]: cowork agent.sh: installing x.whl into /opt/cowork/venv",
    ):
        assert watch.line(text) is False
    assert shown == [
        "base.sh: toolchain skipped",
        "agent.sh: installing x.whl into /opt/cowork/venv",
    ]
    assert watch.fatal == ""


def test_an_agent_sh_error_is_fatal_with_its_own_words() -> None:
    watch, _ = _watch()
    text = "cowork agent.sh: error: cowork-agent.service does not start (boom): check X"
    assert watch.line(text) is True
    assert watch.fatal == (
        "provisioning failed in the VM: agent.sh: cowork-agent.service does not start (boom): "
        "check X"
    )
    assert watch.line("cowork agent.sh: error: a second one") is False  # the first one counts


def test_a_failed_claude_or_toolchain_step_is_shown_but_not_fatal() -> None:
    watch, shown = _watch()
    assert watch.line("cowork claude.sh: error: npm is missing") is False
    assert (
        watch.line("LIMA 2026-12-03T10:01:00+00:00| WARNING: Failed to execute /x/00000003")
        is False
    )
    assert watch.fatal == ""
    assert watch.errors == ["claude.sh: npm is missing"]
    assert shown[-1] == "WARNING: Failed to execute /x/00000003"
