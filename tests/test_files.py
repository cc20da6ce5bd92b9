"""Files service: confinement, atomic writes, streaming transfers."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cowork.agent.v1 import files_pb2, files_pb2_grpc
from host_client import CoworkClient
from host_client.errors import (
    AlreadyExists,
    CoworkError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

from .conftest import AgentProc


def _stub(agent: AgentProc) -> tuple[files_pb2_grpc.FilesStub, grpc.Channel, tuple[Any, ...]]:
    ch = grpc.insecure_channel(agent.target)
    return files_pb2_grpc.FilesStub(ch), ch, (("authorization", f"Bearer {agent.token}"),)


def test_write_then_read_round_trips_bytes(client: CoworkClient, workdir: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    client.write_file(str(workdir / "blob"), data)
    assert client.read_bytes(str(workdir / "blob")) == data


def test_relative_paths_are_under_the_first_root(client: CoworkClient, agent: AgentProc) -> None:
    client.write_file("rel-test.txt", "hi")
    assert (agent.root / "rel-test.txt").read_text() == "hi"


def test_read_with_offset_and_length(client: CoworkClient, workdir: Path) -> None:
    (workdir / "f").write_bytes(bytes(range(256)))
    assert client.read_bytes(str(workdir / "f"), offset=10, length=5) == bytes(range(10, 15))


def test_stat_reports_kind_size_mode(client: CoworkClient, workdir: Path) -> None:
    f = workdir / "f"
    f.write_bytes(b"12345")
    f.chmod(0o640)
    info = client.stat(str(f))
    assert (info.type, info.size, info.mode) == ("file", 5, 0o640)


def test_write_sets_the_requested_mode(client: CoworkClient, workdir: Path) -> None:
    client.write_file(str(workdir / "x.sh"), "#!/bin/sh\n", mode=0o755)
    assert (workdir / "x.sh").stat().st_mode & 0o777 == 0o755


def test_list_recursive_returns_sorted_entries(client: CoworkClient, workdir: Path) -> None:
    (workdir / "a" / "b").mkdir(parents=True)
    (workdir / "a" / "b" / "c.txt").write_text("c")
    (workdir / "z.txt").write_text("z")
    paths = [e.path for e in client.list_dir(str(workdir), recursive=True)]
    assert paths == sorted(paths)
    assert str(workdir / "a" / "b" / "c.txt") in paths


def test_missing_file_is_not_found(client: CoworkClient, workdir: Path) -> None:
    with pytest.raises(NotFound):
        client.read_bytes(str(workdir / "nope"))


def test_dotdot_escape_is_refused(client: CoworkClient, agent: AgentProc) -> None:
    with pytest.raises(PermissionDenied):
        client.read_bytes("../token")


def test_absolute_path_outside_roots_is_refused(client: CoworkClient) -> None:
    with pytest.raises(PermissionDenied):
        client.read_bytes("/etc/hostname")


def test_symlink_escape_is_refused_for_read(client: CoworkClient, workdir: Path) -> None:
    (workdir / "link").symlink_to("/etc")
    with pytest.raises(PermissionDenied):
        client.read_bytes(str(workdir / "link" / "hostname"))


def test_symlink_escape_is_refused_for_write(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    (workdir / "out").symlink_to(agent.dir)
    with pytest.raises(PermissionDenied):
        client.write_file(str(workdir / "out" / "evil"), "x")
    assert not (agent.dir / "evil").exists()


def test_write_through_a_final_symlink_replaces_the_link_not_the_target(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    outside = agent.dir / "outside.txt"
    outside.write_text("original")
    (workdir / "trap").symlink_to(outside)
    client.write_file(str(workdir / "trap"), "new")
    assert outside.read_text() == "original"
    assert (workdir / "trap").read_text() == "new" and not (workdir / "trap").is_symlink()


def test_remove_of_a_symlink_removes_the_link_only(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    target = agent.dir / "keep.txt"
    target.write_text("keep")
    (workdir / "l").symlink_to(target)
    client.remove(str(workdir / "l"))
    assert target.exists() and not (workdir / "l").exists()


def test_removing_the_root_is_refused(client: CoworkClient, agent: AgentProc) -> None:
    with pytest.raises(PermissionDenied):
        client.remove(str(agent.root), recursive=True)


_segment = st.sampled_from(["..", ".", "a", "b", "", "etc", "..."])


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(parts=st.lists(_segment, min_size=1, max_size=8), absolute=st.booleans())
def test_no_generated_path_reads_outside_the_root(
    client: CoworkClient, agent: AgentProc, parts: list[str], absolute: bool
) -> None:
    path = "/".join(parts)
    if absolute:
        path = str(agent.root) + "/" + path
    resolved = os.path.normpath(os.path.join(str(agent.root), path))
    inside = resolved == str(agent.root) or resolved.startswith(str(agent.root) + "/")
    try:
        client.stat(path)
        assert inside
    except PermissionDenied:
        assert not inside
    except (NotFound, CoworkError):
        assert inside


def test_write_without_commit_leaves_target_untouched(agent: AgentProc, workdir: Path) -> None:
    target = workdir / "atomic.txt"
    target.write_text("before")
    stub, ch, md = _stub(agent)
    reqs = [
        files_pb2.WriteRequest(header=files_pb2.WriteHeader(path=str(target), overwrite=True)),
        files_pb2.WriteRequest(data=b"partial"),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.Write(iter(reqs), metadata=md)
    ch.close()
    assert err.value.code() == grpc.StatusCode.ABORTED
    assert target.read_text() == "before"
    assert os.listdir(workdir) == ["atomic.txt"]


def test_cut_stream_leaves_no_half_file(agent: AgentProc, workdir: Path) -> None:
    target = workdir / "cut.bin"
    stub, ch, md = _stub(agent)

    def requests():
        yield files_pb2.WriteRequest(header=files_pb2.WriteHeader(path=str(target)))
        for _ in range(8):
            yield files_pb2.WriteRequest(data=b"x" * 1024 * 1024)
        raise RuntimeError("client crashed mid-upload")

    with pytest.raises(grpc.RpcError):
        stub.Write(requests(), metadata=md)
    ch.close()
    # The agent notices the cancelled stream asynchronously; wait on the directory.
    from .conftest import wait_until

    assert wait_until(lambda: os.listdir(workdir) == [], 5.0), os.listdir(workdir)


def test_checksum_mismatch_is_data_loss_and_keeps_target(agent: AgentProc, workdir: Path) -> None:
    target = workdir / "sum.txt"
    stub, ch, md = _stub(agent)
    reqs = [
        files_pb2.WriteRequest(header=files_pb2.WriteHeader(path=str(target))),
        files_pb2.WriteRequest(data=b"abc"),
        files_pb2.WriteRequest(commit=files_pb2.WriteCommit(sha256="00" * 32)),
    ]
    with pytest.raises(grpc.RpcError) as err:
        stub.Write(iter(reqs), metadata=md)
    ch.close()
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert not target.exists() and os.listdir(workdir) == []


def test_write_refuses_to_overwrite_unless_asked(agent: AgentProc, workdir: Path) -> None:
    target = workdir / "exists.txt"
    target.write_text("keep")
    with agent.client() as c, pytest.raises(AlreadyExists):
        c.files.write_file(str(target), b"new", overwrite=False)
    assert target.read_text() == "keep"


def test_write_into_missing_parent_without_create_parents_is_not_found(
    client: CoworkClient, workdir: Path
) -> None:
    with pytest.raises(NotFound, match="parent"):
        client.write_file(str(workdir / "no" / "dir" / "f"), "x", create_parents=False)


def test_mkdir_rename_remove(client: CoworkClient, workdir: Path) -> None:
    client.mkdir(str(workdir / "d1" / "d2"))
    client.write_file(str(workdir / "d1" / "d2" / "f"), "x")
    client.rename(str(workdir / "d1"), str(workdir / "d3"))
    assert (workdir / "d3" / "d2" / "f").read_text() == "x"
    with pytest.raises(AlreadyExists):
        client.rename(str(workdir / "d3" / "d2" / "f"), str(workdir / "d3" / "d2"))
    client.remove(str(workdir / "d3"), recursive=True)
    assert not (workdir / "d3").exists()


def test_upload_and_download_a_directory_tree(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    up = client.upload(str(src), str(workdir / "tree"))
    assert up.files == 2
    down = client.download(str(workdir / "tree"), str(tmp_path / "back"))
    assert down.files == 2
    assert (tmp_path / "back" / "sub" / "b.bin").read_bytes() == (
        src / "sub" / "b.bin"
    ).read_bytes()


def test_download_checksum_matches_upload(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(os.urandom(5_000_000))
    up = client.upload(str(f), str(workdir / "f.bin"))
    down = client.download(str(workdir / "f.bin"), str(tmp_path / "g.bin"))
    assert up.sha256 == down.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()


# -- symlinks: the agent creates them, never follows one out of the root ----------------
def test_symlink_rpc_creates_a_link_with_its_target_text_unchanged(
    client: CoworkClient, workdir: Path
) -> None:
    info = client.symlink("../some/where", str(workdir / "ln"))
    assert os.readlink(workdir / "ln") == "../some/where"
    assert (info.type, info.symlink_target) == ("symlink", "../some/where")


def test_symlink_to_outside_is_created_but_reading_through_it_is_refused(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    secret = agent.dir / "secret.txt"
    secret.write_text("root only")
    client.symlink(str(secret), str(workdir / "ln"))
    assert os.readlink(workdir / "ln") == str(secret)
    with pytest.raises(PermissionDenied, match="outside the workspace"):
        client.read_bytes(str(workdir / "ln"))


def test_symlink_without_overwrite_refuses_an_existing_entry(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "f").write_text("keep")
    with pytest.raises(AlreadyExists):
        client.symlink("x", str(workdir / "f"), overwrite=False)
    assert (workdir / "f").read_text() == "keep"


def test_symlink_replaces_a_file_but_never_a_directory(client: CoworkClient, workdir: Path) -> None:
    (workdir / "f").write_text("old")
    (workdir / "d").mkdir()
    client.symlink("x", str(workdir / "f"))
    assert os.readlink(workdir / "f") == "x"
    with pytest.raises(CoworkError) as err:
        client.symlink("x", str(workdir / "d"))
    assert err.value.code == "FAILED_PRECONDITION" and (workdir / "d").is_dir()


@pytest.mark.parametrize("target", ["", "a\x00b", "x" * 4096])
def test_symlink_with_a_bad_target_is_invalid_argument(
    client: CoworkClient, workdir: Path, target: str
) -> None:
    with pytest.raises(InvalidArgument):
        client.symlink(target, str(workdir / "ln"))
    assert not os.path.lexists(workdir / "ln")


def test_symlink_leaves_no_temporary_link_behind(client: CoworkClient, workdir: Path) -> None:
    client.symlink("a", str(workdir / "ln"))
    client.symlink("b", str(workdir / "ln"))
    assert os.listdir(workdir) == ["ln"]


def test_stat_follow_symlinks_describes_an_in_root_target(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "d").mkdir()
    (workdir / "ln").symlink_to("d")
    assert client.stat(str(workdir / "ln")).type == "symlink"
    followed = client.stat(str(workdir / "ln"), follow_symlinks=True)
    assert (followed.type, followed.path) == ("directory", str(workdir / "ln"))


def test_stat_follow_symlinks_refuses_a_link_out_of_the_root(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "ln").symlink_to("/etc")
    with pytest.raises(PermissionDenied):
        client.stat(str(workdir / "ln"), follow_symlinks=True)


def test_relative_symlink_inside_the_root_is_followed_for_read(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "real").mkdir()
    (workdir / "real" / "f").write_text("inside")
    (workdir / "cur").symlink_to("real")
    assert client.read_file(str(workdir / "cur" / "f")) == "inside"


def test_absolute_symlink_is_refused_even_when_it_points_into_the_root(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "real").mkdir()
    (workdir / "real" / "f").write_text("inside")
    (workdir / "abs").symlink_to(workdir / "real")
    with pytest.raises(PermissionDenied):
        client.read_file(str(workdir / "abs" / "f"))


def test_write_with_create_parents_under_an_escaping_symlink_is_refused(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    outside = agent.dir / "outside-parents"
    outside.mkdir(exist_ok=True)
    (workdir / "out").symlink_to(outside)
    with pytest.raises(PermissionDenied):
        client.write_file(str(workdir / "out" / "new" / "f"), "x", create_parents=True)
    with pytest.raises(PermissionDenied):
        client.mkdir(str(workdir / "out" / "new2" / "d"), parents=True)
    assert os.listdir(outside) == []


def test_list_does_not_descend_into_symlinked_directories(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "real").mkdir()
    (workdir / "real" / "f").write_text("x")
    (workdir / "ln").symlink_to("real")
    paths = {e.path: e for e in client.list_dir(str(workdir), recursive=True)}
    assert str(workdir / "real" / "f") in paths
    assert not any(p.startswith(str(workdir / "ln") + "/") for p in paths)
    assert paths[str(workdir / "ln")].symlink_target == "real"


def test_list_names_the_kind_of_a_special_file(client: CoworkClient, workdir: Path) -> None:
    os.mkfifo(workdir / "pipe")
    [entry] = client.list_dir(str(workdir))
    assert (entry.type, entry.special) == ("other", "fifo")


def test_read_of_a_fifo_is_failed_precondition_and_does_not_block(
    client: CoworkClient, workdir: Path
) -> None:
    os.mkfifo(workdir / "pipe")
    with pytest.raises(CoworkError, match="fifo") as err:
        client.read_bytes(str(workdir / "pipe"))
    assert err.value.code == "FAILED_PRECONDITION"


def test_recursive_remove_removes_links_not_what_they_point_to(
    client: CoworkClient, workdir: Path, agent: AgentProc
) -> None:
    outside = agent.dir / "keep-dir"
    outside.mkdir(exist_ok=True)
    (outside / "keep.txt").write_text("keep")
    (workdir / "tree" / "sub").mkdir(parents=True)
    (workdir / "tree" / "sub" / "f").write_text("x")
    (workdir / "tree" / "sub" / "dirlink").symlink_to(outside)
    (workdir / "tree" / "filelink").symlink_to(outside / "keep.txt")
    client.remove(str(workdir / "tree"), recursive=True)
    assert not (workdir / "tree").exists()
    assert (outside / "keep.txt").read_text() == "keep"


def test_rename_without_overwrite_refuses_an_existing_file(
    client: CoworkClient, workdir: Path
) -> None:
    (workdir / "a").write_text("a")
    (workdir / "b").write_text("b")
    with pytest.raises(AlreadyExists):
        client.rename(str(workdir / "a"), str(workdir / "b"))
    assert (workdir / "b").read_text() == "b"
    client.rename(str(workdir / "a"), str(workdir / "b"), overwrite=True)
    assert (workdir / "b").read_text() == "a"


def test_rename_moves_a_symlink_not_its_target(client: CoworkClient, workdir: Path) -> None:
    (workdir / "d").mkdir()
    (workdir / "ln").symlink_to("d")
    client.rename(str(workdir / "ln"), str(workdir / "ln2"))
    assert os.readlink(workdir / "ln2") == "d" and (workdir / "d").is_dir()


def _fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_files_rpcs_leave_no_descriptor_open(own_agent: AgentProc) -> None:
    ws = own_agent.root
    (ws / "esc").symlink_to("/etc")
    (ws / "d").mkdir()
    os.mkfifo(ws / "pipe")
    stub, ch, md = _stub(own_agent)

    def cut_write() -> Any:
        yield files_pb2.WriteRequest(header=files_pb2.WriteHeader(path=str(ws / "d" / "cut")))
        yield files_pb2.WriteRequest(data=b"x" * 1000)
        raise RuntimeError("client gone mid-upload")

    def round_of_calls(i: int) -> None:
        with own_agent.client() as c:
            c.write_file(f"d/sub{i}/f", "x")
            c.read_bytes(f"d/sub{i}/f")
            c.list_dir("d", recursive=True)
            c.symlink("f", f"d/sub{i}/ln")
            c.stat(f"d/sub{i}/ln", follow_symlinks=True)
            c.rename(f"d/sub{i}", f"d/moved{i}")
            for bad in (
                lambda: c.read_bytes("esc/hostname"),
                lambda: c.read_bytes("pipe"),
                lambda: c.list_dir("esc"),
                lambda: c.write_file("esc/x/y", "x"),
                lambda: c.mkdir("esc/x/y"),
                lambda: c.read_bytes("d/nope"),
                lambda: c.remove("d/nope"),
            ):
                with pytest.raises(CoworkError):
                    bad()
            _, chunks = c.read_chunks(f"d/moved{i}/f")  # opened, then abandoned
            del chunks
            c.remove(f"d/moved{i}", recursive=True)
        with pytest.raises(grpc.RpcError):
            stub.Write(cut_write(), metadata=md)

    round_of_calls(0)  # warm-up: the server's own lazily opened descriptors
    from .conftest import wait_until

    time.sleep(0.5)
    before = _fd_count(own_agent.pid)
    for i in range(1, 30):
        round_of_calls(i)
    ch.close()
    assert wait_until(lambda: _fd_count(own_agent.pid) <= before, 10.0), (
        before,
        os.listdir(f"/proc/{own_agent.pid}/fd"),
    )
    assert sorted(os.listdir(ws / "d")) == []


def test_unrestricted_agent_reads_and_writes_anywhere(tmp_path: Path) -> None:
    from .conftest import make_agent

    a = make_agent(["--unrestricted-files"])
    try:
        (a.root / "abs").symlink_to(tmp_path)
        with a.client() as c:
            c.write_file(str(tmp_path / "out.txt"), "written")
            assert c.read_file(str(a.root / "abs" / "out.txt")) == "written"
            c.symlink("out.txt", str(tmp_path / "ln"))
            c.remove(str(tmp_path / "out.txt"))
        assert os.listdir(tmp_path) == ["ln"]
    finally:
        a.stop()
