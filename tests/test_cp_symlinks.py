"""Copies keep symlinks as symlinks (`cp -a` / tar semantics), both ways, library and CLI.

A host directory holding `link -> <secret file>` must arrive in the VM as that
link, not as the secret's content; a guest link must arrive on the host as a
link; -L (`follow_symlinks=True`) copies what links point to; sockets, FIFOs
and devices are skipped and reported; and a download never writes through a
symlink on the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from host_client import AsyncCoworkClient, CoworkClient

from .conftest import AgentProc
from .test_cli import ctl

SECRET = "host-secret-4b1d"


@pytest.fixture
def secret(tmp_path: Path) -> Path:
    """A file outside the tree being copied, standing in for /etc/shadow."""
    p = tmp_path / "shadow"
    p.write_text(SECRET)
    return p


@pytest.fixture
def tree(tmp_path: Path, secret: Path) -> Path:
    """src/ with a file, an absolute link to the secret, a relative file link and a dir link."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a.txt").write_text("a")
    (src / "shadow-link").symlink_to(secret)
    (src / "rel-link").symlink_to("sub/a.txt")
    (src / "dir-link").symlink_to("sub")
    return src


@pytest.fixture
def fifo_and_socket(tree: Path) -> Iterator[Path]:
    os.mkfifo(tree / "pipe")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tree / "sock"))
    yield tree
    s.close()


def _guest_files_containing(root: Path, text: str) -> list[Path]:
    return [
        p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and text in p.read_text()
    ]


# -- upload ---------------------------------------------------------------------------
def test_upload_keeps_a_link_to_a_secret_as_a_link(
    client: CoworkClient, workdir: Path, tree: Path, secret: Path
) -> None:
    result = client.upload(str(tree), str(workdir / "up"))
    assert os.readlink(workdir / "up" / "shadow-link") == str(secret)
    assert _guest_files_containing(workdir, SECRET) == []
    assert (result.files, result.symlinks, result.skipped) == (1, 3, [])


def test_upload_keeps_a_directory_link_as_a_link_not_an_empty_directory(
    client: CoworkClient, workdir: Path, tree: Path
) -> None:
    client.upload(str(tree), str(workdir / "up"))
    assert os.readlink(workdir / "up" / "dir-link") == "sub"
    assert os.readlink(workdir / "up" / "rel-link") == "sub/a.txt"


def test_upload_of_a_top_level_symlink_creates_a_link(
    client: CoworkClient, workdir: Path, tree: Path
) -> None:
    result = client.upload(str(tree / "shadow-link"), str(workdir / "one"))
    assert (workdir / "one").is_symlink()
    assert (result.files, result.symlinks) == (0, 1)


def test_upload_with_follow_copies_what_links_point_to(
    client: CoworkClient, workdir: Path, tree: Path
) -> None:
    result = client.upload(str(tree), str(workdir / "up"), follow_symlinks=True)
    assert (workdir / "up" / "shadow-link").read_text() == SECRET
    assert not (workdir / "up" / "dir-link").is_symlink()
    assert (workdir / "up" / "dir-link" / "a.txt").read_text() == "a"
    assert (result.files, result.symlinks) == (4, 0)


def test_upload_with_follow_skips_dangling_links_and_loops(
    client: CoworkClient, workdir: Path, tree: Path
) -> None:
    (tree / "gone").symlink_to("nowhere")
    (tree / "sub" / "loop").symlink_to("..")
    result = client.upload(str(tree), str(workdir / "up"), follow_symlinks=True)
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert "dangling" in reasons["gone"]
    assert "loop" in reasons["loop"]
    assert not os.path.lexists(workdir / "up" / "gone")


def test_upload_skips_sockets_and_fifos_and_says_why(
    client: CoworkClient, workdir: Path, fifo_and_socket: Path
) -> None:
    result = client.upload(str(fifo_and_socket), str(workdir / "up"))
    reasons = {Path(s.path).name: s.reason for s in result.skipped}
    assert reasons.keys() == {"pipe", "sock"}
    assert reasons["pipe"].startswith("fifo") and reasons["sock"].startswith("socket")
    assert sorted(os.listdir(workdir / "up")) == ["dir-link", "rel-link", "shadow-link", "sub"]


# -- download -------------------------------------------------------------------------
def test_download_keeps_guest_symlinks_as_links(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "t" / "sub").mkdir(parents=True)
    (workdir / "t" / "sub" / "a.txt").write_text("a")
    (workdir / "t" / "abs").symlink_to("/etc/shadow")
    (workdir / "t" / "dir-link").symlink_to("sub")
    result = client.download(str(workdir / "t"), str(tmp_path / "back"))
    assert os.readlink(tmp_path / "back" / "abs") == "/etc/shadow"
    assert os.readlink(tmp_path / "back" / "dir-link") == "sub"
    assert (result.files, result.symlinks, result.skipped) == (1, 2, [])


def test_download_of_a_top_level_guest_symlink_creates_a_link(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "ln").symlink_to("elsewhere")
    result = client.download(str(workdir / "ln"), str(tmp_path / "ln"))
    assert os.readlink(tmp_path / "ln") == "elsewhere"
    assert result.symlinks == 1


def test_download_with_follow_copies_in_root_targets_and_skips_the_rest(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "t" / "sub").mkdir(parents=True)
    (workdir / "t" / "sub" / "a.txt").write_text("a")
    (workdir / "t" / "file-link").symlink_to("sub/a.txt")
    (workdir / "t" / "dir-link").symlink_to("sub")
    (workdir / "t" / "abs").symlink_to("/etc/hostname")
    (workdir / "t" / "sub" / "loop").symlink_to("..")
    result = client.download(str(workdir / "t"), str(tmp_path / "back"), follow_symlinks=True)
    back = tmp_path / "back"
    assert (back / "file-link").read_text() == "a" and not (back / "file-link").is_symlink()
    assert (back / "dir-link" / "a.txt").read_text() == "a"
    reasons = {s.path.split("/t/", 1)[1]: s.reason for s in result.skipped}
    assert "refused by the agent" in reasons["abs"]
    assert not os.path.lexists(back / "abs")
    assert any("loop" in r for r in reasons.values()), reasons


def test_download_skips_a_guest_fifo_and_says_why(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "t").mkdir()
    os.mkfifo(workdir / "t" / "pipe")
    (workdir / "t" / "f").write_text("f")
    result = client.download(str(workdir / "t"), str(tmp_path / "back"))
    [skip] = result.skipped
    assert skip.path.endswith("/t/pipe") and skip.reason.startswith("fifo")
    assert os.listdir(tmp_path / "back") == ["f"]


def test_download_never_writes_through_a_symlink_on_the_host(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    # The destination already holds `sub -> elsewhere` (from an earlier copy, or planted):
    # the guest's real directory `sub` must replace the link, not write into `elsewhere`.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    back = tmp_path / "back"
    back.mkdir()
    (back / "sub").symlink_to(elsewhere)
    (workdir / "t" / "sub").mkdir(parents=True)
    (workdir / "t" / "sub" / "authorized_keys").write_text("guest key")
    client.download(str(workdir / "t"), str(back))
    assert os.listdir(elsewhere) == []
    assert not (back / "sub").is_symlink()
    assert (back / "sub" / "authorized_keys").read_text() == "guest key"


def test_downloaded_files_lose_setuid_bits(
    client: CoworkClient, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "suid").write_text("#!/bin/sh\n")
    (workdir / "suid").chmod(0o4755)
    client.download(str(workdir / "suid"), str(tmp_path / "suid"))
    assert (tmp_path / "suid").stat().st_mode & 0o7777 == 0o755


# -- async client -----------------------------------------------------------------------
def test_async_client_copies_symlinks_as_links_both_ways(
    agent: AgentProc, workdir: Path, tree: Path, tmp_path: Path
) -> None:
    async def main() -> tuple[int, int]:
        async with AsyncCoworkClient(agent.target, str(agent.token_file)) as c:
            up = await c.upload(str(tree), str(workdir / "up"))
            down = await c.download(str(workdir / "up"), str(tmp_path / "back"))
            return up.symlinks, down.symlinks

    assert asyncio.run(main()) == (3, 3)
    assert _guest_files_containing(workdir, SECRET) == []
    assert os.readlink(tmp_path / "back" / "dir-link") == "sub"
    assert (tmp_path / "back" / "sub" / "a.txt").read_text() == "a"


# -- coworkctl cp -------------------------------------------------------------------------
def test_cli_cp_uploads_symlinks_as_links(
    agent: AgentProc, workdir: Path, tree: Path, secret: Path
) -> None:
    dest = f"vm:{workdir}/up"
    r = ctl(agent, "cp", str(tree), dest)
    assert (r.returncode, r.stderr) == (0, b"")
    assert os.readlink(workdir / "up" / "shadow-link") == str(secret)
    assert _guest_files_containing(workdir, SECRET) == []


def test_cli_cp_dereference_copies_link_targets(
    agent: AgentProc, workdir: Path, tree: Path
) -> None:
    r = ctl(agent, "cp", "-L", str(tree), f"vm:{workdir}/up")
    assert r.returncode == 0
    assert (workdir / "up" / "shadow-link").read_text() == SECRET
    assert (workdir / "up" / "dir-link" / "a.txt").read_text() == "a"


def test_cli_cp_prints_one_line_per_skip_and_exits_0(
    agent: AgentProc, workdir: Path, fifo_and_socket: Path
) -> None:
    r = ctl(agent, "cp", str(fifo_and_socket), f"vm:{workdir}/up")
    assert r.returncode == 0
    lines = sorted(r.stderr.decode().splitlines())
    assert lines == [
        f"coworkctl: skipped {fifo_and_socket / 'pipe'}: fifo: only files, directories and"
        " symlinks are copied",
        f"coworkctl: skipped {fifo_and_socket / 'sock'}: socket: only files, directories and"
        " symlinks are copied",
    ]


def test_cli_cp_json_lists_symlinks_and_skips(
    agent: AgentProc, workdir: Path, fifo_and_socket: Path
) -> None:
    r = ctl(agent, "--json", "cp", str(fifo_and_socket), f"vm:{workdir}/up")
    out = json.loads(r.stdout)
    assert (out["files"], out["symlinks"]) == (1, 3)
    assert sorted(Path(s["path"]).name for s in out["skipped"]) == ["pipe", "sock"]


def test_cli_cp_downloads_guest_symlinks_as_links(
    agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    (workdir / "t").mkdir()
    (workdir / "t" / "abs").symlink_to("/etc/shadow")
    r = ctl(agent, "cp", f"vm:{workdir}/t", str(tmp_path / "back"))
    assert (r.returncode, r.stderr) == (0, b"")
    assert os.readlink(tmp_path / "back" / "abs") == "/etc/shadow"


def test_cli_cp_of_a_dangling_local_link_uploads_the_link(
    agent: AgentProc, workdir: Path, tmp_path: Path
) -> None:
    (tmp_path / "dangling").symlink_to("nowhere")
    r = ctl(agent, "cp", str(tmp_path / "dangling"), f"vm:{workdir}/dl")
    assert (r.returncode, r.stderr) == (0, b"")
    assert os.readlink(workdir / "dl") == "nowhere"
