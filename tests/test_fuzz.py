"""Whatever a client sends, the agent answers with a status its input deserves: never INTERNAL.

Property-based tests (hypothesis) against a live agent: request messages are drawn
from their own descriptors, field by field (every scalar at its edges and beyond,
oneofs, repeated and map fields, nested messages), so a field added to the contract
is fuzzed without touching this file. Domain strategies replace only what must stay
safe or meaningful: paths (inside a seeded workspace, plus escapes and oddities),
commands (harmless ones, arbitrary arguments), policy YAML. After every call:

- the status is never INTERNAL or UNKNOWN (those mean the agent failed, not the input),
  and a refusal carries a message;
- the agent still answers its health check;
and after every test the agent's log holds no traceback.

The suite's own agent runs the Claude CLI as /bin/true: Claude.Ask options are
validated and a run is spawned and reaped without any model. Wall time is bounded by
EXAMPLES (COWORK_FUZZ_EXAMPLES scales it; deadline=None because a spawn has jitter).
"""

from __future__ import annotations

import collections
import os
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from google.protobuf import descriptor as gdesc
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowork.agent.v1 import (
    agent_pb2,
    agent_pb2_grpc,
    claude_pb2,
    claude_pb2_grpc,
    files_pb2,
    files_pb2_grpc,
    policy_pb2,
    policy_pb2_grpc,
    process_pb2,
    process_pb2_grpc,
)

from .conftest import AgentProc, make_agent

EXAMPLES = int(os.environ.get("COWORK_FUZZ_EXAMPLES", "80"))
FAILURE_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
FD = gdesc.FieldDescriptor

fuzz = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # each run explores afresh; a failure prints its example
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the agent under test ---------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzz_agent() -> Iterator[AgentProc]:
    """An agent of its own (policy changes stay here), Claude CLI = /bin/true."""

    def configure(a: AgentProc) -> None:
        a.extra_args += ["--policy", str(a.dir / "policy.yaml"), "--claude-bin", "/bin/true"]

    a = make_agent(before_start=configure)
    yield a
    a.stop()
    for (test, code), n in sorted(SEEN.items()):
        print(f"fuzz {test}: {code} x{n}")


@pytest.fixture(scope="module")
def channel(fuzz_agent: AgentProc) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_agent.target) as ch:
        yield ch


@pytest.fixture(autouse=True)
def no_traceback_after_each_test(fuzz_agent: AgentProc) -> Iterator[None]:
    before = len(fuzz_agent.log_lines())
    yield
    new = fuzz_agent.log_lines()[before:]
    bad = [line for line in new if "Traceback" in line or "unexpected error" in line]
    assert not bad, "the agent logged a traceback:\n" + "\n".join(bad[:3])


def md(agent: AgentProc) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {agent.token}"),)


def seed(root: Path) -> None:
    """What the paths strategy points at: files, directories, symlinks in and out, a FIFO.

    Restored before every example, whatever the last one did (a rename can leave a
    FIFO where f.txt was: writing to it would block this test forever).
    """

    def kind(p: Path) -> int | None:
        try:
            return stat.S_IFMT(os.lstat(p).st_mode)
        except FileNotFoundError:
            return None

    def clear(p: Path) -> None:
        if kind(p) == stat.S_IFDIR:
            shutil.rmtree(p)
        elif kind(p) is not None:
            os.unlink(p)

    for rel in ("d", "d/sub", "empty"):
        if kind(root / rel) != stat.S_IFDIR:
            clear(root / rel)
            (root / rel).mkdir()
    for rel, data in (("f.txt", b"hello\n"), ("d/f.txt", b"x" * 5000), ("prog", b"\x7fELF?")):
        if kind(root / rel) != stat.S_IFREG:
            clear(root / rel)
            (root / rel).write_bytes(data)
    os.chmod(root / "prog", 0o755)  # executable, but not a program
    for name, target in (("link", "d"), ("escape", "/etc"), ("dangling", "nowhere")):
        p = root / name
        if kind(p) != stat.S_IFLNK or os.readlink(p) != target:
            clear(p)
            os.symlink(target, p)
    if kind(root / "fifo") != stat.S_IFIFO:
        clear(root / "fifo")
        os.mkfifo(root / "fifo")


# Status codes seen per test (printed at the end with `pytest -s`): shows what the
# strategies reach, so a strategy that only ever produces one refusal stands out.
SEEN: collections.Counter[tuple[str, str]] = collections.Counter()


def check(
    call: Callable[[], Any], agent: AgentProc, ch: grpc.Channel, *, may_time_out: bool = False
) -> None:
    """Run `call`; a refusal must be a status the input earns, and the agent must live on."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    try:
        call()
        SEEN[test, "OK"] += 1
    except grpc.RpcError as exc:
        code = exc.code()
        SEEN[test, code.name] += 1
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and may_time_out:
            pass
        else:
            assert code not in FAILURE_CODES, f"{code.name}: {exc.details()}"
            assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"the agent hung: {exc.details()}"
            assert exc.details(), f"{code.name} without a message"
    health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def drain(stream: Any) -> None:
    for _ in stream:
        pass


# -- strategies from descriptors ----------------------------------------------------------


def edgy_ints(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [lo, lo + 1, -1, 0, 1, 2, 255, 256, 4096, 65535, 65536, 2**31 - 1, 2**31]
    edges += [2**32 - 1, 2**32, 2**53, 2**63 - 1, 2**63, hi - 1, hi]
    return st.one_of(st.sampled_from([e for e in edges if lo <= e <= hi]), st.integers(lo, hi))


_RANGES = {
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
}

TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", " ", "\x00", "a\x00b", "\n", "é", "\U0001f600", "x" * 5000, "-", "--help"]
    ),
)
BYTES = st.one_of(st.binary(max_size=64), st.sampled_from([b"", b"\x00", b"\xff" * 10]))

Overrides = dict[str, st.SearchStrategy[Any]]


def scalar(field: gdesc.FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t in _RANGES:
        return edgy_ints(*_RANGES[t])
    if t in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        edges = [0.0, -0.0, -1.0, 1e-300, 1e300, float("inf"), float("-inf"), float("nan")]
        floats = st.floats() if t == FD.TYPE_DOUBLE else st.floats(width=32)
        return st.one_of(st.sampled_from(edges), floats)
    if t == FD.TYPE_BOOL:
        return st.booleans()
    if t == FD.TYPE_STRING:
        return TEXT
    if t == FD.TYPE_BYTES:
        return BYTES
    if t == FD.TYPE_ENUM:
        assert field.enum_type is not None
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), edgy_ints(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def field_values(
    field: gdesc.FieldDescriptor,
    cls_of: Callable[[gdesc.Descriptor], type[Message]],
    over: Overrides,
    depth: int,
) -> st.SearchStrategy[Any]:
    """What one field may hold (a list for repeated fields, a dict for maps)."""
    if field.name in over:
        return over[field.name]
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        key, value = (
            field.message_type.fields_by_name["key"],
            field.message_type.fields_by_name["value"],
        )
        return st.dictionaries(scalar(key), field_values(value, cls_of, over, depth), max_size=4)
    if field.message_type is not None:
        one: st.SearchStrategy[Any] = messages(field.message_type, cls_of, over, depth + 1)
    else:
        one = scalar(field)
    if field.is_repeated:
        return st.lists(one, max_size=4)
    return one


def messages(
    desc: gdesc.Descriptor,
    cls_of: Callable[[gdesc.Descriptor], type[Message]],
    over: Overrides,
    depth: int = 0,
) -> st.SearchStrategy[Any]:
    """Any message of type `desc`: each field set or not, at most one member of each oneof."""
    cls = cls_of(desc)
    if depth > 3:
        return st.just(cls())
    plain = [f for f in desc.fields if f.containing_oneof is None]
    parts: dict[str, st.SearchStrategy[Any]] = {
        f.name: st.one_of(st.none(), field_values(f, cls_of, over, depth)) for f in plain
    }

    def member(f: gdesc.FieldDescriptor) -> st.SearchStrategy[tuple[str, Any]]:
        return field_values(f, cls_of, over, depth).map(lambda v: (f.name, v))

    oneofs = [
        st.one_of(st.none(), st.sampled_from(list(o.fields)).flatmap(member)) for o in desc.oneofs
    ]

    def build(values: dict[str, Any], chosen: list[tuple[str, Any] | None]) -> Message:
        msg = cls()
        for name, value in [*values.items(), *(c for c in chosen if c is not None)]:
            if value is None:
                continue
            field = desc.fields_by_name[name]
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                container = getattr(msg, name)
                for k, v in value.items():
                    if field.message_type.fields_by_name["value"].message_type is not None:
                        container[k].CopyFrom(v)
                    else:
                        container[k] = v
            elif field.is_repeated:
                if field.message_type is not None:
                    getattr(msg, name).extend(value)
                else:
                    getattr(msg, name).extend(value)
            elif field.message_type is not None:
                getattr(msg, name).CopyFrom(value)
            else:
                setattr(msg, name, value)
        return msg

    return st.builds(
        build, st.fixed_dictionaries(parts), st.tuples(*oneofs) if oneofs else st.just(())
    )


def classes(*modules: Any) -> Callable[[gdesc.Descriptor], type[Message]]:
    by_name: dict[str, type[Message]] = {}

    def walk(cls: type[Message]) -> None:
        by_name[cls.DESCRIPTOR.full_name] = cls
        for nested in cls.DESCRIPTOR.nested_types:
            walk(getattr(cls, nested.name))

    for m in modules:
        for name in dir(m):
            obj = getattr(m, name)
            if isinstance(obj, type) and issubclass(obj, Message) and obj is not Message:
                walk(obj)
    return lambda d: by_name[d.full_name]


CLS = classes(agent_pb2, claude_pb2, files_pb2, policy_pb2, process_pb2)

# -- domain strategies --------------------------------------------------------------------

NAME = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="/"),
    min_size=1,
    max_size=12,
)
PATHS = st.one_of(
    st.sampled_from(
        [
            "",
            ".",
            "..",
            "/",
            "f.txt",
            "d",
            "d/sub",
            "d/f.txt",
            "empty",
            "link",
            "link/f.txt",
            "escape",
            "escape/passwd",
            "dangling",
            "fifo",
            "new.txt",
            "d/new/deeper/x",
            "../x",
            "../../etc/passwd",
            "/etc/passwd",
            "/proc/self/mem",
            "/dev/zero",
            "a\x00b",
            "x" * 300,
            "/".join(["x"] * 2100),
            "d//f.txt",
            "./d/../f.txt",
            "f.txt/",
        ]
    ),
    NAME,
    st.lists(
        st.one_of(NAME, st.sampled_from(["..", ".", "d", "f.txt", "link"])), min_size=1, max_size=4
    ).map("/".join),
)
# Commands that cannot harm this host, whatever their arguments; argument text is free.
COMMANDS = st.sampled_from(
    [
        "true",
        "false",
        "echo",
        "/bin/echo",
        "cat",
        "no-such-command-xyz",
        "./prog",
        "",
        "/",
        "./f.txt",
        "env",
    ]
)
ARGV = st.tuples(COMMANDS, st.lists(TEXT, max_size=3)).map(lambda t: [t[0], *t[1]])
SHELL = st.one_of(
    st.sampled_from(["", "true", "exit 3", "echo out; echo err >&2", "kill -9 $$", "cat"]),
    TEXT.map(lambda t: "echo " + "'" + t.replace("'", "") + "'"),
)
BIG_ARGV = st.just(["echo", "a" * (200 * 1024)])
# Biased toward specs that can run (one of argv/shell, small sizes) so the run path is
# fuzzed as much as the refusals; the edges are still drawn.
PROCESS = {
    "argv": st.one_of(ARGV, BIG_ARGV),
    "shell": st.one_of(st.just(""), st.just(""), SHELL),
    "cwd": st.one_of(st.just(""), PATHS),
    "rows": st.one_of(st.integers(0, 300), edgy_ints(0, 2**32 - 1)),
    "cols": st.one_of(st.integers(0, 300), edgy_ints(0, 2**32 - 1)),
    "cpus": st.one_of(st.just(0.0), st.floats(0, 8), st.floats()),
    "signal": st.one_of(
        st.sampled_from([1, 2, 15, 18, 19, 20, 28, 64]), edgy_ints(-(2**31), 2**31 - 1)
    ),
}
FILES = {"path": PATHS, "source": PATHS, "destination": PATHS}


def yaml_docs() -> st.SearchStrategy[str]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        edgy_ints(-(2**70), 2**70),
        st.floats(),
        TEXT,
        st.sampled_from(["2GiB", "512M", "1e400", "-1", "bwrap", "none", "offline", "default"]),
        st.sampled_from(["*.example.com", "9" * 400 + "M", "99999999999999999999T", "4194305"]),
    )
    keys = st.one_of(
        st.sampled_from(
            [
                "sandbox",
                "network",
                "limits",
                "preset",
                "allow",
                "deny",
                "memory",
                "pids",
                "cpus",
                "max",
            ]
        ),
        TEXT,
    )
    tree = st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=4)
        ),
        max_leaves=12,
    )
    structured = st.dictionaries(
        st.sampled_from(["sandbox", "network", "limits"]), tree, max_size=3
    )
    return st.one_of(
        structured.map(lambda d: yaml.safe_dump(d)),
        tree.map(lambda d: yaml.safe_dump(d)),
        st.text(max_size=80),
        st.sampled_from(
            [
                "[" * 5000,
                "{a: " * 3000,
                "&a [*a]",
                "a: &x 1\nb: *y",
                "\t:",
                "--- !!python/object:os.system x",
            ]
        ),
    )


POLICY = {
    "yaml": yaml_docs(),
    "allow_domain": st.one_of(
        TEXT, st.sampled_from(["example.com", "*.example.com", "*", "1.2.3.4", "::1", "a" * 300])
    ),
    "deny_domain": st.one_of(
        TEXT, st.sampled_from(["example.com", "*.example.com", "*", "localhost"])
    ),
    "preset": st.one_of(TEXT, st.sampled_from(["default", "offline"])),
}

# -- Files ----------------------------------------------------------------------------------


@fuzz
@given(req=messages(files_pb2.StatRequest.DESCRIPTOR, CLS, FILES))
def test_files_stat(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.StatRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: stub.Stat(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


@fuzz
@given(req=messages(files_pb2.ListRequest.DESCRIPTOR, CLS, FILES))
def test_files_list(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.ListRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: stub.List(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


@fuzz
@given(req=messages(files_pb2.ReadRequest.DESCRIPTOR, CLS, FILES))
def test_files_read(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.ReadRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: drain(stub.Read(req, metadata=md(fuzz_agent), timeout=20)), fuzz_agent, channel)


WRITE_DATA = st.one_of(BYTES, st.just(b"\x00" * ((1 << 20) + 1)))


@fuzz
@given(
    header=st.one_of(st.none(), *[messages(files_pb2.WriteHeader.DESCRIPTOR, CLS, FILES)] * 3),
    chunks=st.lists(WRITE_DATA, max_size=3),
    commit=st.one_of(st.none(), messages(files_pb2.WriteCommit.DESCRIPTOR, CLS, {})),
    extra=st.one_of(
        st.just([]),
        st.lists(
            messages(files_pb2.WriteRequest.DESCRIPTOR, CLS, {**FILES, "data": WRITE_DATA}),
            max_size=2,
        ),
    ),
)
def test_files_write(
    fuzz_agent: AgentProc,
    channel: grpc.Channel,
    header: files_pb2.WriteHeader | None,
    chunks: list[bytes],
    commit: files_pb2.WriteCommit | None,
    extra: list[files_pb2.WriteRequest],
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    msgs = [files_pb2.WriteRequest(header=header)] if header is not None else []
    msgs += [files_pb2.WriteRequest(data=c) for c in chunks]
    msgs += [files_pb2.WriteRequest(commit=commit)] if commit is not None else []
    msgs += extra
    check(lambda: stub.Write(iter(msgs), metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


@fuzz
@given(req=messages(files_pb2.RemoveRequest.DESCRIPTOR, CLS, FILES))
def test_files_remove(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.RemoveRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: stub.Remove(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


@fuzz
@given(req=messages(files_pb2.MakeDirRequest.DESCRIPTOR, CLS, FILES))
def test_files_make_dir(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.MakeDirRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: stub.MakeDir(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


@fuzz
@given(req=messages(files_pb2.RenameRequest.DESCRIPTOR, CLS, FILES))
def test_files_rename(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: files_pb2.RenameRequest
) -> None:
    seed(fuzz_agent.root)
    stub = files_pb2_grpc.FilesStub(channel)
    check(lambda: stub.Rename(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)


def _other_files_rpcs() -> list[str]:
    """Files RPCs added to the contract after this suite was written (fuzzed generically)."""
    known = {"Stat", "List", "Read", "Write", "Remove", "MakeDir", "Rename"}
    service = files_pb2.DESCRIPTOR.services_by_name["Files"]
    return sorted(m.name for m in service.methods if m.name not in known)


def test_files_rpcs_added_later(fuzz_agent: AgentProc, channel: grpc.Channel) -> None:
    """Every other Files RPC (e.g. one added after this suite), fuzzed from its descriptor."""
    service = files_pb2.DESCRIPTOR.services_by_name["Files"]
    for name in _other_files_rpcs():
        m = service.methods_by_name[name]
        assert not m.client_streaming, f"add a dedicated test for the client stream Files/{name}"
        make = channel.unary_stream if m.server_streaming else channel.unary_unary
        call: Any = make(
            f"/cowork.agent.v1.Files/{name}",
            request_serializer=CLS(m.input_type).SerializeToString,
            response_deserializer=CLS(m.output_type).FromString,
        )

        _fuzz_unary(fuzz_agent, channel, call, m)


def _fuzz_unary(
    agent: AgentProc, channel: grpc.Channel, call: Any, m: gdesc.MethodDescriptor
) -> None:
    @fuzz
    @given(req=messages(m.input_type, CLS, FILES))
    def run(req: Message) -> None:
        seed(agent.root)

        def go() -> None:
            r = call(req, metadata=md(agent), timeout=20)
            if m.server_streaming:
                drain(r)

        check(go, agent, channel)

    run()


# -- Process ----------------------------------------------------------------------------


@fuzz
@given(req=messages(process_pb2.RunRequest.DESCRIPTOR, CLS, PROCESS))
def test_process_run(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: process_pb2.RunRequest
) -> None:
    seed(fuzz_agent.root)
    stub = process_pb2_grpc.ProcessStub(channel)
    # A timeout_ms of 0 with `cat` on an open pipe is not possible (Run closes stdin).
    check(lambda: stub.Run(req, metadata=md(fuzz_agent), timeout=30), fuzz_agent, channel)


CONTROL = messages(process_pb2.ExecRequest.DESCRIPTOR, CLS, PROCESS)


@fuzz
@given(
    start=messages(process_pb2.ProcessSpec.DESCRIPTOR, CLS, PROCESS),
    control=st.lists(CONTROL, max_size=5),
    with_start=st.sampled_from([True, True, True, False]),
)
def test_process_exec_start_and_control(
    fuzz_agent: AgentProc,
    channel: grpc.Channel,
    start: process_pb2.ProcessSpec,
    control: list[process_pb2.ExecRequest],
    with_start: bool,
) -> None:
    seed(fuzz_agent.root)
    stub = process_pb2_grpc.ProcessStub(channel)
    first = [process_pb2.ExecRequest(start=start)] if with_start else []
    # Whatever came before (SIGSTOP, a PTY `cat` waiting for input), the run ends.
    last = [
        process_pb2.ExecRequest(signal=signal.SIGCONT),
        process_pb2.ExecRequest(signal=signal.SIGKILL),
    ]
    msgs = first + control + last
    check(
        lambda: drain(stub.Exec(iter(msgs), metadata=md(fuzz_agent), timeout=30)),
        fuzz_agent,
        channel,
    )


# -- Policy ----------------------------------------------------------------------------------


@fuzz
@given(req=messages(policy_pb2.SetPolicyRequest.DESCRIPTOR, CLS, POLICY), then_run=st.booleans())
def test_policy_set_then_the_next_run(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: policy_pb2.SetPolicyRequest, then_run: bool
) -> None:
    stub = policy_pb2_grpc.PolicyStub(channel)
    check(lambda: stub.Set(req, metadata=md(fuzz_agent), timeout=20), fuzz_agent, channel)
    check(
        lambda: stub.Get(policy_pb2.GetPolicyRequest(), metadata=md(fuzz_agent), timeout=20),
        fuzz_agent,
        channel,
    )
    if then_run:  # whatever policy was accepted, a process can still be started or refused
        run = process_pb2.RunRequest(spec=process_pb2.ProcessSpec(argv=["true"]))
        proc = process_pb2_grpc.ProcessStub(channel)
        check(lambda: proc.Run(run, metadata=md(fuzz_agent), timeout=30), fuzz_agent, channel)


@fuzz
@given(req=messages(policy_pb2.LogsRequest.DESCRIPTOR, CLS, {}))
def test_policy_logs(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: policy_pb2.LogsRequest
) -> None:
    stub = policy_pb2_grpc.PolicyStub(channel)
    follow = bool(getattr(req, "follow", False))
    check(
        lambda: drain(stub.Logs(req, metadata=md(fuzz_agent), timeout=0.5 if follow else 20)),
        fuzz_agent,
        channel,
        may_time_out=follow,
    )


def test_policy_get(fuzz_agent: AgentProc, channel: grpc.Channel) -> None:
    stub = policy_pb2_grpc.PolicyStub(channel)
    check(
        lambda: stub.Get(policy_pb2.GetPolicyRequest(), metadata=md(fuzz_agent), timeout=20),
        fuzz_agent,
        channel,
    )


# -- Agent, Claude ---------------------------------------------------------------------------


def test_agent_info(fuzz_agent: AgentProc, channel: grpc.Channel) -> None:
    stub = agent_pb2_grpc.AgentStub(channel)
    check(
        lambda: stub.Info(agent_pb2.InfoRequest(), metadata=md(fuzz_agent), timeout=20),
        fuzz_agent,
        channel,
    )


ASK = {
    "cwd": st.one_of(st.just(""), st.just("d"), PATHS),
    "prompt": st.one_of(TEXT, st.just("p")),
    "resume": st.one_of(TEXT, st.uuids().map(str)),
    "session_id": st.one_of(TEXT, st.uuids().map(str)),
    "permission_mode": st.one_of(
        TEXT, st.sampled_from(["default", "acceptEdits", "bypassPermissions", "plan"])
    ),
}


@settings(
    max_examples=max(10, EXAMPLES // 2),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(req=messages(claude_pb2.AskRequest.DESCRIPTOR, CLS, ASK))
def test_claude_ask_options(
    fuzz_agent: AgentProc, channel: grpc.Channel, req: claude_pb2.AskRequest
) -> None:
    seed(fuzz_agent.root)
    stub = claude_pb2_grpc.ClaudeStub(channel)
    check(lambda: drain(stub.Ask(req, metadata=md(fuzz_agent), timeout=30)), fuzz_agent, channel)


def test_claude_version(fuzz_agent: AgentProc, channel: grpc.Channel) -> None:
    stub = claude_pb2_grpc.ClaudeStub(channel)
    check(
        lambda: stub.Version(
            claude_pb2.ClaudeVersionRequest(), metadata=md(fuzz_agent), timeout=20
        ),
        fuzz_agent,
        channel,
    )


# -- bytes that are not a message at all ---------------------------------------------------


def _all_methods() -> list[tuple[str, gdesc.MethodDescriptor]]:
    """Every method the agent serves: ours, health and reflection (but Health.Watch, whose
    stream for a parsed request rightly never ends: test_agent_input covers it)."""
    out = []
    modules = (agent_pb2, claude_pb2, files_pb2, policy_pb2, process_pb2, health_pb2)
    for module in (*modules, reflection_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            out += [(f"/{service.full_name}/{m.name}", m) for m in service.methods]
    return [(path, m) for path, m in out if path != "/grpc.health.v1.Health/Watch"]


# A first byte that is field 1 with wire type 7: no message parses from it. Methods that
# run commands get only such payloads (random bytes can decode into a real argv).
UNPARSABLE = b"\x0f"
RUNS_COMMANDS = {
    "/cowork.agent.v1.Process/Exec",
    "/cowork.agent.v1.Process/Run",
    "/cowork.agent.v1.Claude/Ask",
}


@pytest.mark.parametrize(("path", "method"), _all_methods(), ids=[p for p, _ in _all_methods()])
def test_raw_bytes(
    fuzz_agent: AgentProc, channel: grpc.Channel, path: str, method: gdesc.MethodDescriptor
) -> None:
    ident: Callable[[bytes], bytes] = bytes
    if method.client_streaming and method.server_streaming:
        kind: Any = channel.stream_stream
    elif method.client_streaming:
        kind = channel.stream_unary
    elif method.server_streaming:
        kind = channel.unary_stream
    else:
        kind = channel.unary_unary
    call = kind(path, request_serializer=ident, response_deserializer=ident)

    @settings(max_examples=max(5, EXAMPLES // 6), deadline=None, database=None)
    @given(payload=st.binary(max_size=64), more=st.lists(st.binary(max_size=32), max_size=3))
    def run(payload: bytes, more: list[bytes]) -> None:
        if path in RUNS_COMMANDS:
            payload, more = UNPARSABLE + payload, [UNPARSABLE + m for m in more]
        seed(fuzz_agent.root)

        def go() -> None:
            arg: Any = iter([payload, *more]) if method.client_streaming else payload
            r = call(arg, metadata=md(fuzz_agent), timeout=2 if method.server_streaming else 20)
            if method.server_streaming:
                drain(r)

        # A payload can decode into Logs{follow: true}: a stream that rightly never ends.
        check(go, fuzz_agent, channel, may_time_out=method.server_streaming)

    run()
