"""`coworkctl init` boots lima/cowork.yaml into a healthy agent behind `lima:NAME`."""

from __future__ import annotations

import json
import stat
from typing import Any

from tests.lima_e2e.conftest import coworkctl_ok
from tests.lima_e2e.harness import LimaHost


def test_init_ends_with_one_line_that_names_the_target(booted: dict[str, Any]) -> None:
    assert booted["code"] == 0, booted["stderr"][-3000:]
    assert booted["stdout"].splitlines() == [
        "cowork VM 'cwe2e' is ready: agent 0.1.0, target lima:cwe2e"
    ]


def test_init_shows_the_provisioning_steps_of_the_guest(booted: dict[str, Any]) -> None:
    """Lima tails cloud-init's output; coworkctl passes on our scripts' lines only."""
    progress = booted["stderr"]
    assert "[lima] base.sh: toolchain skipped" in progress
    assert (
        "[lima] claude.sh: claude 2.1.330 at /opt/cowork/claude/node_modules/.bin/claude"
        in progress
    )
    assert "[lima] agent.sh: cowork-agent 0.1.0 running:" in progress
    assert "EBADENGINE" not in progress and "Unpacking" not in progress  # no npm/apt noise


def test_info_through_the_lima_forward_describes_the_guest(vm: LimaHost) -> None:
    info = json.loads(coworkctl_ok(vm, "--json", "info"))
    assert info["agent_version"] == "0.1.0"
    assert info["distro"] == "Debian GNU/Linux 12 (bookworm)"
    assert info["hostname"] == f"lima-{vm.name}"
    assert (info["sandbox"], info["identity_mode"]) == ("bwrap", "user")
    assert info["run_as_user"].startswith("cowork-"), info["run_as_user"]
    assert info["roots"] == ["/workspace"]
    assert info["claude"]["version"].startswith("2.1.330 "), info["claude"]


def test_the_guest_was_provisioned_with_the_template_params(vm: LimaHost) -> None:
    [line] = vm.limactl("list", "--json", vm.name).stdout.decode().splitlines()
    param = json.loads(line)["config"]["param"]
    assert param["CoworkToolchain"] == "false"
    assert param["CoworkClaude"] == "true"
    env = vm.ssh("cat /etc/cowork/agent.env").stdout.decode()
    assert f"COWORK_SOCKET_USER={vm.user.pw_name}\n" in env
    assert "COWORK_TOOLCHAIN=false\n" in env


def test_the_token_is_private_on_both_sides(vm: LimaHost) -> None:
    assert stat.S_IMODE(vm.token_file.stat().st_mode) == 0o600
    assert vm.token_file.stat().st_uid == vm.user.pw_uid
    guest = vm.ssh("sudo stat -c %a:%U:%G /etc/cowork/token").stdout.decode().strip()
    assert guest == "600:root:root"
    host_token = vm.token_file.read_text().strip()
    assert vm.ssh("sudo cat /etc/cowork/token").stdout.decode().strip() == host_token
