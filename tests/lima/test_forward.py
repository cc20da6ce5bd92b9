"""`repair_forward` (coworkctl doctor --fix) says so when the SSH master it needs cannot start.

The forward rides on Lima's SSH master; when none answers and none can be started
(the VM's sshd is gone, the ssh config is stale), the repair must stop there with
one line that names the cause and the fix, not go on to a forward that cannot work.
Real ssh, against a port where nothing listens; no limactl needed.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from host_client import lima


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def unreachable_vm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> lima.Instance:
    """A 'Running' instance whose ssh config points at a port where no sshd listens."""
    monkeypatch.setenv("LIMA_HOME", str(tmp_path / "lima"))
    name = "cwfwd"
    inst_dir = tmp_path / "lima" / name
    inst_dir.mkdir(parents=True)
    cfg = inst_dir / "ssh.config"
    cfg.write_text(
        f"Host lima-{name}\n"
        "  HostName 127.0.0.1\n"
        f"  Port {_closed_port()}\n"
        "  User nobody\n"
        f"  ControlPath {tmp_path}/ctl-%C\n"
        "  BatchMode yes\n"
        "  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n"
        "  ConnectTimeout 5\n"
    )
    return lima.Instance(name=name, status="Running", dir=str(inst_dir), ssh_config_file=str(cfg))


def test_a_master_that_cannot_start_is_one_line_with_the_fix(
    unreachable_vm: lima.Instance,
) -> None:
    with pytest.raises(lima.LimaError) as ei:
        lima.repair_forward(unreachable_vm)
    msg = str(ei.value)
    assert "cannot start the SSH master of VM 'cwfwd'" in msg and "\n" not in msg
    assert "coworkctl stop --name cwfwd && coworkctl start --name cwfwd" in msg


def test_a_failed_master_leaves_the_host_socket_alone(unreachable_vm: lima.Instance) -> None:
    sock = lima.host_socket(unreachable_vm.name)
    sock.parent.mkdir(parents=True, exist_ok=True)
    sock.write_text("")  # what Lima left behind; removing it gains nothing without a master
    with pytest.raises(lima.LimaError):
        lima.repair_forward(unreachable_vm)
    assert sock.exists()
