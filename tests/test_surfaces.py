"""The sync and async clients are one surface: same parts, names and parameters.

host_client.aio adapts host_client.api; these tests enumerate both surfaces and
fail on any difference, so a method added to one cannot be missing from the other.
"""

from __future__ import annotations

import inspect
import subprocess
import sys
from collections.abc import Callable

import pytest

from host_client.aio import (
    AsyncAskStream,
    AsyncBoxes,
    AsyncBoxHandle,
    AsyncClaude,
    AsyncCoworkClient,
    AsyncExecStream,
    AsyncFiles,
    AsyncPolicy,
    AsyncProcess,
)
from host_client.api.boxes import Boxes, BoxHandle
from host_client.api.claude import AskStream, Claude
from host_client.api.files import Files
from host_client.api.policy import Policy
from host_client.api.process import ExecStream, Process
from host_client.client import CoworkClient

PAIRS = [
    (CoworkClient, AsyncCoworkClient),
    (Process, AsyncProcess),
    (Files, AsyncFiles),
    (Claude, AsyncClaude),
    (Policy, AsyncPolicy),
    (ExecStream, AsyncExecStream),
    (AskStream, AsyncAskStream),
    (Boxes, AsyncBoxes),
    (BoxHandle, AsyncBoxHandle),
]
# Protocol methods with an async counterpart of another name.
ASYNC_NAME = {"__iter__": "__aiter__", "__enter__": "__aenter__", "__exit__": "__aexit__"}
# What only the async client has: its knob for worker threads, and the sync client it adapts.
ASYNC_ONLY_PARAMETERS: dict[tuple[type, str], set[str]] = {
    (AsyncCoworkClient, "__init__"): {"max_workers"}
}
PARTS = ("process", "files", "claude", "policy", "boxes")
SEED_NAMES = (
    "execute_in_vm",
    "read_file",
    "write_file",
    "is_vm_running",
    "start_vm",
    "stop_vm",
    "ask_claude",
)


def public_methods(cls: type) -> dict[str, Callable[..., object]]:
    out = {}
    for name, member in inspect.getmembers(cls):
        special = name in ASYNC_NAME or name in ASYNC_NAME.values() or name == "__init__"
        if name.startswith("_") and not special:
            continue
        if callable(member) and not isinstance(member, type):
            out[name] = member
    return out


def public_properties(cls: type) -> set[str]:
    return {n for n, m in inspect.getmembers(cls) if isinstance(m, property)}


def parameters(fn: Callable[..., object]) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_both_surfaces_have_the_same_method_names(sync: type, aio: type) -> None:
    want = {ASYNC_NAME.get(n, n) for n in public_methods(sync)}
    have = set(public_methods(aio))
    assert have == want, f"only sync: {want - have}; only async: {have - want}"


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_both_surfaces_take_the_same_parameters(sync: type, aio: type) -> None:
    for name, fn in public_methods(sync).items():
        if name == "__init__" and sync is not CoworkClient:
            continue  # parts and streams are made by the client, not by users
        other = getattr(aio, ASYNC_NAME.get(name, name))
        extra = ASYNC_ONLY_PARAMETERS.get((aio, name), set())
        theirs = [p for p in parameters(other) if p[0] not in extra]
        assert theirs == parameters(fn), f"{aio.__name__}.{name} differs from {sync.__name__}"


# Attributes users read: sync properties or plain attributes, async properties.
ATTRIBUTES = {
    CoworkClient: {"target", "connect_timeout", "process", "files", "claude", "policy"},
    ExecStream: {"pid", "exit", "run_id", "offset"},
    AskStream: {"events", "finished", "run_id", "offset"},
}


@pytest.mark.parametrize("sync", list(ATTRIBUTES), ids=[c.__name__ for c in ATTRIBUTES])
def test_both_surfaces_expose_the_same_attributes(sync: type) -> None:
    aio = dict(PAIRS)[sync]
    client = _instance(sync)
    for name in ATTRIBUTES[sync]:
        assert hasattr(client, name), f"{sync.__name__}.{name}"
        assert hasattr(_instance(aio), name), f"{aio.__name__}.{name}"
    assert public_properties(sync) <= ATTRIBUTES[sync]
    assert public_properties(aio) - {"process", "files", "claude", "policy"} <= ATTRIBUTES[sync]


def _instance(cls: type) -> object:
    if cls in (CoworkClient, AsyncCoworkClient):
        return cls("unix:/nonexistent.sock", token_file=_token_file())
    client = CoworkClient("unix:/nonexistent.sock", token_file=_token_file())
    aio = AsyncCoworkClient("unix:/nonexistent.sock", token_file=_token_file())
    return {
        ExecStream: lambda: client.exec("true"),
        AsyncExecStream: lambda: aio.exec("true"),
        AskStream: lambda: AskStream(client.connection, None, None),  # type: ignore[arg-type]
        AsyncAskStream: lambda: AsyncAskStream(
            AskStream(client.connection, None, None),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
        ),
    }[cls]()


@pytest.mark.parametrize(("sync", "aio"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_every_public_method_has_a_docstring(sync: type, aio: type) -> None:
    for cls in (sync, aio):
        for name, fn in public_methods(cls).items():
            if name == "__init__":
                continue
            assert inspect.getdoc(fn), f"{cls.__name__}.{name} has no docstring"


def test_the_async_methods_are_awaitable_where_the_sync_ones_block() -> None:
    # Calls that return a stream stay plain methods on both sides (iterate with async for).
    streams = {"exec", "stream", "ask_stream", "logs", "attach", "__aiter__"}
    for _, aio in PAIRS:
        for name, fn in public_methods(aio).items():
            if name == "__init__" or name in streams or name in ASYNC_NAME.values():
                continue
            if aio in (AsyncExecStream, AsyncAskStream) and name != "collect":
                continue  # write/signal/cancel: queue a message, no waiting
            assert inspect.iscoroutinefunction(fn), f"{aio.__name__}.{name} is not async"


def test_both_clients_have_the_typed_parts() -> None:
    sync = CoworkClient("unix:/nonexistent.sock", token_file=_token_file())
    aio = AsyncCoworkClient("unix:/nonexistent.sock", token_file=_token_file())
    want = {
        "process": Process,
        "files": Files,
        "claude": Claude,
        "policy": Policy,
        "boxes": Boxes,
    }
    async_want = {
        "process": AsyncProcess,
        "files": AsyncFiles,
        "claude": AsyncClaude,
        "policy": AsyncPolicy,
        "boxes": AsyncBoxes,
    }
    for part in PARTS:
        assert isinstance(getattr(sync, part), want[part])
        assert isinstance(getattr(aio, part), async_want[part])


@pytest.mark.parametrize("name", SEED_NAMES)
def test_the_seed_controllers_names_stay_on_both_clients(name: str) -> None:
    assert callable(getattr(CoworkClient, name))
    assert inspect.iscoroutinefunction(getattr(AsyncCoworkClient, name))


SHORTHANDS = {
    "run": ("process", "run"),
    "exec": ("process", "exec"),
    "stat": ("files", "stat"),
    "list_dir": ("files", "list_dir"),
    "read_bytes": ("files", "read_bytes"),
    "read_chunks": ("files", "read_chunks"),
    "read_file": ("files", "read_file"),
    "write_file": ("files", "write_file"),
    "remove": ("files", "remove"),
    "mkdir": ("files", "mkdir"),
    "rename": ("files", "rename"),
    "symlink": ("files", "symlink"),
    "upload": ("files", "upload"),
    "download": ("files", "download"),
    "get_policy": ("policy", "get"),
    "set_policy": ("policy", "set"),
    "logs": ("policy", "logs"),
    "ask_claude": ("claude", "ask"),
    "ask_stream": ("claude", "stream"),
    "claude_version": ("claude", "version"),
}


@pytest.mark.parametrize("name", sorted(SHORTHANDS))
def test_a_client_shorthand_takes_the_parameters_of_its_part(name: str) -> None:
    part, method = SHORTHANDS[name]
    cls = {"process": Process, "files": Files, "claude": Claude, "policy": Policy}[part]
    assert parameters(getattr(CoworkClient, name)) == parameters(getattr(cls, method))


def test_the_client_modules_import_no_cycle() -> None:
    # Each module imports cleanly on its own, in a fresh interpreter, in any order.
    modules = [
        "host_client.claude",
        "host_client.api.connection",
        "host_client.api.process",
        "host_client.api.files",
        "host_client.api.claude",
        "host_client.api.policy",
        "host_client.client",
        "host_client.aio",
    ]
    for mod in modules:
        r = subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    code = (
        "import sys, host_client.client\n"
        "assert 'host_client.aio' not in sys.modules, 'the sync client loaded the async one'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _token_file() -> str:
    import tempfile

    f = tempfile.NamedTemporaryFile("w", suffix=".token", delete=False)  # noqa: SIM115
    f.write("x" * 64)
    f.close()
    return f.name
