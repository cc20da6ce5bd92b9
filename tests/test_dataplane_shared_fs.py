"""The data plane on a FUSE file system, as the agent meets Lima's /workspace (bindfs, over
9p or virtiofs): files there are read once, hashing the very bytes sent (two readers of a
FUSE file need not agree), and transfers both ways stay byte-exact."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cowork.dataplane import on_shared_fs
from tests.conftest import AgentProc, make_agent


@pytest.fixture
def fuse_agent(tmp_path: Path) -> Iterator[AgentProc]:
    """An agent whose workspace root is a bindfs view of another directory."""
    if shutil.which("bindfs") is None:
        pytest.fail("bindfs is missing: run `make tools` (scripts/tools.d/10-apt.sh)")
    src = tmp_path / "src"
    src.mkdir()

    def mount(agent: AgentProc) -> None:
        subprocess.run(["bindfs", "-o", "allow_other", str(src), str(agent.root)], check=True)

    agent = make_agent(before_start=mount)
    try:
        yield agent
    finally:
        agent.stop()
        subprocess.run(["fusermount", "-u", "-z", str(agent.root)], check=False)


def test_a_file_on_fuse_counts_as_shared_and_one_on_local_disk_does_not(
    fuse_agent: AgentProc, tmp_path: Path
) -> None:
    on_fuse = fuse_agent.root / "f"
    on_fuse.write_bytes(b"x")
    local = tmp_path / "local"
    local.write_bytes(b"x")
    for path, shared in ((on_fuse, True), (local, False)):
        fd = os.open(path, os.O_RDONLY)
        try:
            assert on_shared_fs(fd) is shared, path
        finally:
            os.close(fd)


def test_a_download_from_fuse_is_byte_exact(fuse_agent: AgentProc, tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    (fuse_agent.root / "out.bin").write_bytes(data)
    with fuse_agent.client() as client:
        client.download("out.bin", str(tmp_path / "down.bin"))
    assert (
        hashlib.sha256((tmp_path / "down.bin").read_bytes()).digest()
        == hashlib.sha256(data).digest()
    )
    assert "/cowork.dataplane/download" in (fuse_agent.dir / "agent.log").read_text()


def test_an_upload_onto_fuse_is_byte_exact(fuse_agent: AgentProc, tmp_path: Path) -> None:
    data = os.urandom(5 << 20)
    (tmp_path / "up.bin").write_bytes(data)
    with fuse_agent.client() as client:
        client.upload(str(tmp_path / "up.bin"), "up.bin")
    assert (fuse_agent.root / "up.bin").read_bytes() == data
