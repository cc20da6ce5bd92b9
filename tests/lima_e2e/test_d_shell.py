"""`coworkctl shell`: an interactive login shell on a PTY in the box, through Lima's forward."""

from __future__ import annotations

from tests.lima_e2e.harness import LimaHost


def test_shell_is_interactive_on_a_terminal_and_passes_the_exit_code(vm: LimaHost) -> None:
    argv = vm.argv(
        [str(vm.venv / "bin" / "python"), "-m", "host_client.cli", "shell"], TERM="xterm"
    )
    typed = b"echo product=$((6*7)); test -t 0 && echo on-a-tty; id -un; exit 5\n"
    code, screen = vm.on_pty(argv, typed, wait_for=b"$ ")
    assert code == 5, screen
    assert "product=42" in screen
    assert "on-a-tty" in screen  # a real terminal on the guest side too
    assert "cowork-" in screen  # the sandbox user, not the Lima user
