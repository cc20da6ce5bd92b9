"""Fixtures of the Lima tier (make lima-e2e): ONE VM per session, made by `coworkctl init`
from lima/cowork.yaml and provisioned by Lima, then driven through `lima:NAME` only.

The modules run in file-name order, which is the VM's life: boot (a), use (b-f),
stop/start (g), a dead forward (h), delete (y), then an init that must fail (z).
On any failure the terminal summary shows Lima's logs and the guest console.
"""

from __future__ import annotations

import atexit
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lima_e2e.harness import REPO, TOOLS, Image, LimaHost, kvm_usable, lima_image, log

_state: dict[str, Any] = {"failed": False, "host": None, "diag": "", "timings": {}}
_T0 = time.monotonic()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "lima_e2e: boots a real Lima VM with coworkctl init (make lima-e2e)"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.lima_e2e)
            # The first test pays for the boot (fixture setup counts): ~10 min under TCG.
            item.add_marker(pytest.mark.timeout(2700))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()  # type: ignore[attr-defined]
    if rep.failed:
        _state["failed"] = True
        host = _state["host"]
        if host is not None and not _state["diag"]:
            _state["diag"] = host.diagnostics()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    timings = _state["timings"]
    if timings:
        timings["session_s"] = round(time.monotonic() - _T0, 1)
        terminalreporter.write_sep("-", "Lima tier timings")
        terminalreporter.write_line(json.dumps(timings, indent=1, sort_keys=True))
        TOOLS.mkdir(parents=True, exist_ok=True)
        (TOOLS / "last-run.json").write_text(json.dumps(timings, indent=1, sort_keys=True) + "\n")
    if _state["failed"] and _state["diag"]:
        terminalreporter.write_sep("-", "Lima logs and guest console (a Lima test failed)")
        terminalreporter.write_line(_state["diag"])


def record(name: str, value: Any) -> None:
    """A figure for the closing summary (and .tools/lima-e2e/last-run.json)."""
    _state["timings"][name] = value


@pytest.fixture(scope="session")
def image() -> Image:
    t0 = time.monotonic()
    img = lima_image()
    record("image_s", round(time.monotonic() - t0, 1))
    return img


# Development only: COWORK_LIMA_E2E_ATTACH=BASE[:NAME] runs the tests against a VM
# already booted by this harness under BASE (kept afterwards), instead of a fresh init.
ATTACH = os.environ.get("COWORK_LIMA_E2E_ATTACH", "")


@pytest.fixture(scope="session")
def host(image: Image) -> Iterator[LimaHost]:
    """The host user, its LIMA_HOME and workspace; everything of this run removed after."""
    if ATTACH:
        base, _, name = ATTACH.partition(":")
        h = LimaHost.create(base=Path(base))
        h.name = name or h.name
        _state["host"] = h
        yield h
        return
    h = LimaHost.create()
    h.accel = "kvm" if kvm_usable(image, h.user) else "tcg"
    record("accel", h.accel)
    _state["host"] = h
    atexit.register(h.close)  # even if pytest itself is interrupted
    try:
        yield h
    finally:
        if _state["failed"] and not _state["diag"]:
            _state["diag"] = h.diagnostics()
        h.close()


@pytest.fixture(scope="session")
def booted(host: LimaHost, image: Image) -> dict[str, Any]:
    """`coworkctl init` of the VM, as the user types it: its result and duration."""
    if ATTACH:
        return {"code": 0, "stdout": "", "stderr": "", "seconds": 0.0, "attached": True}
    log(f"coworkctl init ({host.accel}): boot, Lima's provisioning, the agent")
    t0 = time.monotonic()
    r = host.coworkctl(*host.init_args(image), timeout=2400)
    took = time.monotonic() - t0
    record("init_to_ready_s", round(took, 1))
    log(f"coworkctl init returned {r.returncode} after {took:.0f}s")
    return {
        "code": r.returncode,
        "stdout": r.stdout.decode(errors="replace"),
        "stderr": r.stderr.decode(errors="replace"),
        "seconds": took,
    }


@pytest.fixture(scope="session")
def vm(host: LimaHost, booted: dict[str, Any]) -> LimaHost:
    """The running VM; every test that needs it fails (not skips) if init failed."""
    if booted["code"] != 0:
        pytest.fail(
            f"coworkctl init failed ({booted['code']}): {booted['stderr'][-3000:]}", pytrace=False
        )
    return host


def coworkctl_ok(
    host: LimaHost, *args: str, input: bytes | None = None, timeout: float = 120
) -> str:
    """Run coworkctl as the user; its stdout, after asserting exit 0."""
    r = host.coworkctl(*args, input=input, timeout=timeout)
    assert r.returncode == 0, (args, r.returncode, r.stderr.decode(errors="replace"))
    return r.stdout.decode(errors="replace")


__all__ = ["REPO", "coworkctl_ok", "record"]
