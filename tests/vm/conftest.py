"""Fixtures of the VM tier: one booted guest per session, with the agent installed by
lima/provision/agent.sh, reached over real virtio-vsock (hvsock: via vhost-device-vsock).

On any failure the terminal summary shows the guest console and the agent's journal.
Every process the harness started is stopped at the end, pass or fail.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from host_client import CoworkClient
from tests.vm.harness import VM, guest_image, install_agent, log

_state: dict[str, Any] = {"failed": False, "vm": None, "journal": "", "timings": {}}
_T0 = time.monotonic()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.vm)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed:
        _state["failed"] = True
        vm = _state["vm"]
        if vm is not None and not _state["journal"]:
            _state["journal"] = vm.agent_journal()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = _state["timings"]
    if timings:
        timings["session_s"] = round(time.monotonic() - _T0, 1)
        terminalreporter.write_sep("-", "VM harness timings")
        terminalreporter.write_line(json.dumps(timings, indent=1, sort_keys=True))
    vm = _state["vm"]
    if _state["failed"] and vm is not None:
        terminalreporter.write_sep("-", "guest console and agent journal (a VM test failed)")
        terminalreporter.write_line(vm.logs_tail())
        terminalreporter.write_line("--- cowork-agent (journal) ---")
        terminalreporter.write_line(_state["journal"] or "(not collected)")


def record(name: str, value: Any) -> None:
    """Numbers for the closing note (shown at the end, saved to .tools/vm/last-run.json)."""
    _state["timings"][name] = value


@pytest.fixture(scope="session")
def vm() -> Iterator[VM]:
    t0 = time.monotonic()
    image = guest_image()
    record("image_s", round(time.monotonic() - t0, 1))
    workdir = Path(tempfile.mkdtemp(prefix="cw-vm-", dir="/tmp"))  # short socket paths
    machine = VM(image, workdir)
    _state["vm"] = machine
    atexit.register(machine.stop)  # even if pytest itself is interrupted
    try:
        machine.start()
        record("accel", machine.accel)
        record("boot_to_ssh_s", round(machine.wait_ssh(), 1))
        t1 = time.monotonic()
        install_agent(machine)
        record("agent_install_s", round(time.monotonic() - t1, 1))
        yield machine
    finally:
        if _state["failed"] and not _state["journal"]:
            _state["journal"] = machine.agent_journal()
        machine.stop()
        out = Path(__file__).resolve().parents[2] / ".tools" / "vm" / "last-run.json"
        out.write_text(json.dumps(_state["timings"], indent=1, sort_keys=True) + "\n")
        # Keep the console of a failed run next to the timings; the rest goes.
        if _state["failed"]:
            shutil.copy(machine.console, out.with_name("last-console.log"))
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def vclient(vm: VM) -> Iterator[CoworkClient]:
    c = CoworkClient(vm.hvsock_target, str(vm.token_file), connect_timeout=30)
    t0 = time.monotonic()
    c.wait_ready(60)
    log(f"agent ready over {vm.hvsock_target} after {time.monotonic() - t0:.2f}s")
    yield c
    c.close()
