"""The VM lifecycle on the real limactl, as far as it goes without booting a VM:
create (`limactl create --tty=false`), list --json, delete, and the errors."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from cowork import defaults
from cowork.dataplane import data_socket_path
from host_client import lima
from host_client.targets import lima_socket, lima_token

from .conftest import LimaEnv


def _create(env: LimaEnv, wheel: Path, name: str = "cowork-test", **kw: object) -> lima.Instance:
    opts = lima.InitOptions(name=name, workspace=Path(env.env["COWORK_WORKSPACE"]), **kw)  # type: ignore[arg-type]
    return lima.init_vm(opts, wheel=wheel, start_it=False)


def _one_line_error(proc: object) -> str:
    stderr: str = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 1, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_init_creates_a_stopped_vm_with_the_requested_sizes(lima_env: LimaEnv, wheel: Path) -> None:
    inst = _create(lima_env, wheel, cpus=2, memory_gib=3, disk_gib=12)
    assert (inst.name, inst.status) == ("cowork-test", "Stopped")
    assert (inst.cpus, inst.memory, inst.disk) == (2, 3 * 2**30, 12 * 2**30)
    assert inst.dir == str(lima_env.home / "cowork-test")


def test_init_stores_a_fresh_private_token_on_the_host(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    token_file = lima_token("cowork-test")
    st = token_file.stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) == 2 * defaults.TOKEN_BYTES
    int(token, 16)


def test_the_created_instance_forwards_the_socket_lima_targets_use(
    lima_env: LimaEnv, wheel: Path
) -> None:
    _create(lima_env, wheel)
    [line] = lima_env.run_limactl("list", "--json", "cowork-test").stdout.splitlines()
    rules = json.loads(line)["config"]["portForwards"]
    [rule] = [r for r in rules if r.get("guestSocket") == defaults.GUEST_SOCKET]
    assert rule["hostSocket"] == str(lima_socket("cowork-test"))
    [data] = [r for r in rules if r.get("guestSocket") == data_socket_path(defaults.GUEST_SOCKET)]
    assert data["hostSocket"] == data_socket_path(str(lima_socket("cowork-test")))


def test_the_created_instance_delivers_the_token_as_data(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    [line] = lima_env.run_limactl("list", "--json", "cowork-test").stdout.splitlines()
    config = json.loads(line)["config"]
    data = {p["path"]: p for p in config["provision"] if p["mode"] == "data"}
    token = lima_token("cowork-test").read_text()
    assert data[defaults.GUEST_TOKEN_FILE]["content"] == token
    assert data[defaults.GUEST_TOKEN_FILE]["permissions"] == "0600"
    user = lima_env.user or __import__("getpass").getuser()
    assert f"COWORK_SOCKET_USER={user}\n" in data["/etc/cowork/agent.env"]["content"]


def test_the_wheel_waits_in_the_instance_dist_dir(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    dist = lima_env.home / "cowork-test" / "cowork-dist"
    assert [p.name for p in dist.iterdir()] == [wheel.name]
    assert (dist / wheel.name).read_bytes() == wheel.read_bytes()


def test_init_is_idempotent(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    token = lima_token("cowork-test").read_text()
    again = _create(lima_env, wheel, cpus=8)
    assert again.cpus == lima.DEFAULT_CPUS  # sizes apply at creation only
    assert lima_token("cowork-test").read_text() == token
    assert [i.name for i in lima.list_instances()] == ["cowork-test"]


def test_init_refuses_a_vm_it_did_not_make(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    lima_token("cowork-test").unlink()
    with pytest.raises(lima.LimaError, match="exists but was not made by coworkctl init"):
        _create(lima_env, wheel)


def test_list_json_lines_parse_into_instances(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel, name="one")
    _create(lima_env, wheel, name="two")
    out = lima_env.run_limactl("list", "--json").stdout
    parsed = lima.parse_list_output(out)
    assert [(i.name, i.status) for i in parsed] == [("one", "Stopped"), ("two", "Stopped")]
    assert parsed[0].mounts == (
        (lima_env.env["COWORK_WORKSPACE"], lima.GUEST_HOST_WORKSPACE, True),
        (str(lima_env.home / "one" / "cowork-dist"), lima.GUEST_DIST_DIR, False),
    )


def test_a_stopped_or_missing_vm_is_not_running(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    assert lima.is_vm_running("cowork-test") is False
    assert lima.is_vm_running("absent") is False


def test_stop_vm_of_a_stopped_vm_is_a_no_op(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    lima.stop_vm("cowork-test")
    assert lima.get_instance("cowork-test") is not None


def test_delete_removes_the_vm_and_its_token(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    proc = lima_env.coworkctl("delete")
    assert proc.returncode == 0, proc.stderr
    assert lima.get_instance("cowork-test") is None
    assert not lima_token("cowork-test").exists()


def test_coworkctl_list_shows_cowork_vms_without_their_config(
    lima_env: LimaEnv, wheel: Path
) -> None:
    _create(lima_env, wheel)
    proc = lima_env.coworkctl("list", "--json")
    assert proc.returncode == 0, proc.stderr
    [entry] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert (entry["name"], entry["status"], entry["cowork"]) == ("cowork-test", "Stopped", True)
    assert lima_token("cowork-test").read_text().strip() not in proc.stdout


def test_coworkctl_status_of_a_stopped_vm_says_so_and_exits_1(
    lima_env: LimaEnv, wheel: Path
) -> None:
    _create(lima_env, wheel)
    proc = lima_env.coworkctl("status", "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert (out["status"], out["socket_present"], "agent" in out) == ("Stopped", False, False)


def test_coworkctl_doctor_says_how_to_start_a_stopped_vm(lima_env: LimaEnv, wheel: Path) -> None:
    _create(lima_env, wheel)
    proc = lima_env.coworkctl("doctor", "--json")
    assert proc.returncode == 1
    checks = {c["check"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["limactl"]["ok"] and "Lima 2.2.0" in checks["limactl"]["detail"]
    assert checks["mounts"]["ok"]
    assert checks["token"]["ok"]
    assert not checks["vm"]["ok"]
    assert checks["vm"]["fix"] == "coworkctl start --name cowork-test"


def test_an_unknown_vm_is_one_line_and_exit_1(lima_env: LimaEnv) -> None:
    for command in ("start", "stop", "status", "delete"):
        line = _one_line_error(lima_env.coworkctl(command, "--name", "nope"))
        assert line == (
            "coworkctl: no Lima VM named 'nope': create it with 'coworkctl init --name nope'"
        )


def test_limactl_own_errors_become_one_line(lima_env: LimaEnv) -> None:
    with pytest.raises(lima.LimaError) as err:
        lima.run_limactl(["stop", "nope"])
    assert str(err.value).startswith("limactl stop: ")
    assert "nope" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_limactl_is_one_line_and_exit_1(lima_env: LimaEnv) -> None:
    lima_env.env["COWORK_LIMACTL"] = "/nonexistent/limactl"
    line = _one_line_error(lima_env.coworkctl("list"))
    assert line == (
        "coworkctl: limactl not found: COWORK_LIMACTL=/nonexistent/limactl is not executable"
    )


def test_no_limactl_on_path_is_one_line_and_says_how_to_install(lima_env: LimaEnv) -> None:
    del lima_env.env["COWORK_LIMACTL"]
    lima_env.env["PATH"] = "/usr/bin:/bin"
    line = _one_line_error(lima_env.coworkctl("status"))
    assert line.startswith("coworkctl: limactl not found on PATH: install Lima >= 2.0")


def test_a_bad_ubuntu_release_is_a_usage_error(lima_env: LimaEnv) -> None:
    proc = lima_env.coworkctl("init", "--ubuntu", "20.04")
    assert proc.returncode == 2
    assert "invalid choice: '20.04'" in proc.stderr
