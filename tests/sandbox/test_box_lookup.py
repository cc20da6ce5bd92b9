"""A command is looked up the way the run will find it: in its PATH, as its user, in the box.

The agent (root, outside the box) sees more than the box does: /root, /home,
/run and the agent's own directories are empty inside, and the run's user may
not execute what root may. A command that only the agent could run used to
start the wrapper anyway, and the run ended with exit 127 and a setpriv/bwrap
message instead of the NOT_FOUND / PERMISSION_DENIED a direct run gives.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_client import CoworkClient
from host_client.errors import NotFound, PermissionDenied
from tests.conftest import AgentProc

TOOL = "cw-tool"


def make_tool(directory: Path, mode: int) -> Path:
    directory.mkdir(mode=0o755)
    tool = directory / TOOL
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(mode)
    return tool


@pytest.fixture
def vm(boxed: AgentProc) -> Iterator[CoworkClient]:
    with boxed.client() as c:
        yield c


@pytest.fixture
def hidden_tool() -> Iterator[Path]:
    """An executable in a directory the box always hides (/root)."""
    d = Path("/root") / f"cw-hidden-bin-{uuid.uuid4().hex[:8]}"
    yield make_tool(d, 0o755)
    shutil.rmtree(d, ignore_errors=True)


def test_a_command_only_in_a_directory_the_box_hides_is_not_found(
    vm: CoworkClient, hidden_tool: Path
) -> None:
    with pytest.raises(NotFound, match=f"command not found: {TOOL}"):
        vm.run([TOOL], env={"PATH": f"{hidden_tool.parent}:/usr/bin:/bin"})


def test_a_path_the_box_hides_is_not_found(vm: CoworkClient, hidden_tool: Path) -> None:
    with pytest.raises(NotFound, match="command not found"):
        vm.run([str(hidden_tool)])


def test_a_command_in_the_runs_path_inside_the_box_is_found(
    vm: CoworkClient, boxed: AgentProc
) -> None:
    tool = make_tool(boxed.root / f"bin-{uuid.uuid4().hex[:8]}", 0o755)
    result = vm.run([TOOL], env={"PATH": f"{tool.parent}:/usr/bin:/bin"})
    assert (result.exit_code, result.output) == (0, "tool ran\n")


def test_the_first_match_the_runs_user_cannot_execute_is_skipped(
    vm: CoworkClient, boxed: AgentProc
) -> None:
    locked = make_tool(boxed.root / f"locked-{uuid.uuid4().hex[:8]}", 0o700)  # root's only
    usable = make_tool(boxed.root / f"usable-{uuid.uuid4().hex[:8]}", 0o755)
    path = f"{locked.parent}:{usable.parent}:/usr/bin:/bin"
    assert vm.run([TOOL], env={"PATH": path}).output == "tool ran\n"


def test_a_command_the_runs_user_cannot_execute_is_permission_denied(
    vm: CoworkClient, boxed: AgentProc
) -> None:
    locked = make_tool(boxed.root / f"locked-{uuid.uuid4().hex[:8]}", 0o700)
    with pytest.raises(PermissionDenied, match="not executable by"):
        vm.run([TOOL], env={"PATH": f"{locked.parent}:/usr/bin:/bin"})
    with pytest.raises(PermissionDenied, match="not executable by"):
        vm.run([str(locked)])
