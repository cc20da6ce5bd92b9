"""Path confinement rules (guest_agent/paths.py), the same for both resolvers.

Each rule runs against openat2(RESOLVE_BENEATH) and against the user-space
O_NOFOLLOW walk that stands in for it on kernels before 5.6, in-process.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_agent.errors import AgentError
from guest_agent.paths import (
    DIR_FLAGS,
    LIST_FLAGS,
    READ_FLAGS,
    STAT_FLAGS,
    PathPolicy,
    openat2_available,
)


def test_this_kernel_has_openat2() -> None:
    # The machines these tests run on (Linux >= 5.6) must exercise the openat2 path;
    # the walk is forced in the tests below, so both always run.
    assert openat2_available(), os.uname().release


@pytest.fixture(params=["openat2", "walk"])
def policy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[PathPolicy]:
    root = tmp_path / "ws"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("inside")
    (tmp_path / "secret").write_text("outside")
    yield PathPolicy([str(root)], resolver=request.param)


def _root(p: PathPolicy) -> Path:
    return Path(p.roots[0])


def _read(p: PathPolicy, path: str) -> str:
    fd = p.open(p.locate(path), READ_FLAGS)
    try:
        return os.read(fd, 100).decode()
    finally:
        os.close(fd)


def _denied(p: PathPolicy, path: str, flags: int = READ_FLAGS) -> None:
    with pytest.raises(AgentError) as err:
        os.close(p.open(p.locate(path), flags))
    assert err.value.code.name == "PERMISSION_DENIED", err.value.message
    assert "outside the workspace roots" in err.value.message


def test_plain_path_opens(policy: PathPolicy) -> None:
    assert _read(policy, "a/b/f.txt") == "inside"


def test_relative_symlink_inside_the_root_is_followed(policy: PathPolicy) -> None:
    (_root(policy) / "cur").symlink_to("a/b")
    assert _read(policy, "cur/f.txt") == "inside"


def test_symlink_target_may_climb_within_the_root(policy: PathPolicy) -> None:
    (_root(policy) / "a" / "up").symlink_to("../a/b")
    assert _read(policy, "a/up/f.txt") == "inside"


def test_final_relative_symlink_is_followed_for_read(policy: PathPolicy) -> None:
    (_root(policy) / "ln").symlink_to("a/b/f.txt")
    assert _read(policy, "ln") == "inside"


def test_symlink_that_climbs_out_is_refused(policy: PathPolicy) -> None:
    (_root(policy) / "out").symlink_to("../secret")
    _denied(policy, "out")


def test_absolute_symlink_is_refused_even_into_the_root(policy: PathPolicy) -> None:
    (_root(policy) / "abs").symlink_to(_root(policy) / "a")
    _denied(policy, "abs/b/f.txt")


def test_absolute_symlink_to_outside_is_refused_for_directories(policy: PathPolicy) -> None:
    (_root(policy) / "etc").symlink_to("/etc")
    _denied(policy, "etc", LIST_FLAGS)


def test_dotdot_that_leaves_the_root_is_refused_before_any_lookup(policy: PathPolicy) -> None:
    with pytest.raises(AgentError) as err:
        policy.locate("a/../../secret")
    assert err.value.code.name == "PERMISSION_DENIED"


def test_dotdot_is_applied_to_the_text(policy: PathPolicy) -> None:
    # "cur/.." is the root as text, whatever cur points to.
    (_root(policy) / "cur").symlink_to("a/b")
    loc = policy.locate("cur/../a/b/f.txt")
    assert loc.parts == ("a", "b", "f.txt")
    assert loc.path == str(_root(policy) / "a" / "b" / "f.txt")


def test_symlink_loop_is_eloop(policy: PathPolicy) -> None:
    (_root(policy) / "l1").symlink_to("l2")
    (_root(policy) / "l2").symlink_to("l1")
    with pytest.raises(OSError) as err:
        policy.open(policy.locate("l1"), READ_FLAGS)
    assert err.value.errno == errno.ELOOP


def test_dangling_symlink_is_not_found(policy: PathPolicy) -> None:
    (_root(policy) / "gone").symlink_to("nowhere")
    with pytest.raises(FileNotFoundError):
        policy.open(policy.locate("gone"), READ_FLAGS)


def test_file_in_the_middle_is_not_a_directory(policy: PathPolicy) -> None:
    with pytest.raises(NotADirectoryError):
        policy.open(policy.locate("a/b/f.txt/x"), READ_FLAGS)


def test_stat_flags_follow_a_final_symlink_to_a_directory(policy: PathPolicy) -> None:
    (_root(policy) / "cur").symlink_to("a")
    fd = policy.open(policy.locate("cur"), STAT_FLAGS)
    try:
        assert os.fstat(fd).st_ino == (_root(policy) / "a").stat().st_ino
    finally:
        os.close(fd)


def test_parent_of_an_entry_is_opened_through_in_root_symlinks(policy: PathPolicy) -> None:
    (_root(policy) / "cur").symlink_to("a/b")
    loc = policy.locate("cur/new.txt")
    fd = policy.open_parent(loc)
    try:
        assert os.fstat(fd).st_ino == (_root(policy) / "a" / "b").stat().st_ino
        assert loc.name == "new.txt"
    finally:
        os.close(fd)


def test_root_itself_opens_as_a_directory(policy: PathPolicy) -> None:
    loc = policy.locate(".")
    assert loc.is_root
    fd = policy.open(loc, DIR_FLAGS)
    try:
        assert os.fstat(fd).st_ino == _root(policy).stat().st_ino
    finally:
        os.close(fd)


def test_unrestricted_follows_absolute_symlinks(tmp_path: Path) -> None:
    (tmp_path / "ws").mkdir()
    (tmp_path / "secret").write_text("outside")
    (tmp_path / "ws" / "abs").symlink_to(tmp_path / "secret")
    p = PathPolicy([str(tmp_path / "ws")], unrestricted=True)
    assert _read(p, str(tmp_path / "ws" / "abs")) == "outside"


def test_unknown_resolver_is_refused() -> None:
    with pytest.raises(ValueError):
        PathPolicy(["/tmp"], resolver="magic")
