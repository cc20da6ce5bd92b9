"""lima/cowork.yaml, as written and as `coworkctl init` renders it, checked by the real limactl."""

from __future__ import annotations

import itertools
import subprocess
from pathlib import Path

import pytest
import yaml

from cowork import defaults
from cowork.dataplane import data_socket_path
from host_client import lima

from .conftest import REPO, LimaEnv

LIMA_DIR = REPO / "lima"
SIZES = [(lima.DEFAULT_CPUS, lima.DEFAULT_MEMORY_GIB, lima.DEFAULT_DISK_GIB), (1, 1.5, 20.0)]
COMBOS = list(itertools.product(lima.UBUNTU_RELEASES, SIZES, ["default", "custom"], [False, True]))


def _write(env: LimaEnv, name: str, text: str) -> Path:
    path = env.home.parent / f"{name}.yaml"
    path.write_text(text)
    path.chmod(0o644)
    return path


def _validate(env: LimaEnv, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return env.run_limactl("--tty=false", "validate", *extra, str(path))


def test_the_template_as_written_validates(lima_env: LimaEnv) -> None:
    proc = _validate(lima_env, LIMA_DIR / "cowork.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stderr
    assert "LIMA_CIDATA" not in proc.stderr  # no warnings about Lima internals


@pytest.mark.parametrize(("ubuntu", "sizes", "workspace", "with_payload"), COMBOS)
def test_every_init_option_combination_renders_a_valid_template(
    lima_env: LimaEnv,
    ubuntu: str,
    sizes: tuple[int, float, float],
    workspace: str,
    with_payload: bool,
) -> None:
    cpus, memory, disk = sizes
    ws = Path(lima_env.env["COWORK_WORKSPACE"]) if workspace == "custom" else Path.home()
    opts = lima.InitOptions(
        name="combo",
        cpus=cpus,
        memory_gib=memory,
        disk_gib=disk,
        ubuntu=ubuntu,
        workspace=ws,
        image=None,  # Lima's Ubuntu list (the fixture's COWORK_LIMA_IMAGE is for create)
    )
    text = lima.render_template(opts, token=lima.generate_token() if with_payload else None)
    proc = _validate(lima_env, _write(lima_env, "combo", text))
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(text)
    assert doc["base"] == [f"template:_images/ubuntu-{ubuntu}"]
    assert (doc["cpus"], doc["memory"], doc["disk"]) == (cpus, f"{memory:g}GiB", f"{disk:g}GiB")
    assert doc["mounts"][0]["location"] == str(ws.resolve())


def test_only_the_workspace_is_writable_and_the_wheel_dir_read_only(lima_env: LimaEnv) -> None:
    ws = Path(lima_env.env["COWORK_WORKSPACE"])
    text = lima.render_template(lima.InitOptions(name="fill", workspace=ws))
    proc = _validate(lima_env, _write(lima_env, "fill", text), "--fill")
    assert proc.returncode == 0, proc.stderr
    filled = yaml.safe_load(proc.stdout)
    assert [(m["location"], m["mountPoint"], m["writable"]) for m in filled["mounts"]] == [
        (str(ws), lima.GUEST_HOST_WORKSPACE, True),  # agent.sh maps it to /workspace
        (str(lima_env.home / "cowork-dist"), lima.GUEST_DIST_DIR, False),  # {{.Dir}}: see above
    ]


def test_the_share_is_mapped_to_the_workspace_root_the_agent_serves() -> None:
    doc = yaml.safe_load(lima.render_template(lima.InitOptions(name="ws")))
    [env] = [p for p in doc["provision"] if p.get("path") == "/etc/cowork/agent.env"]
    assert f"COWORK_WORKSPACE_SOURCE={lima.GUEST_HOST_WORKSPACE}\n" in env["content"]
    assert doc["mounts"][0]["mountPoint"] == lima.GUEST_HOST_WORKSPACE
    assert defaults.GUEST_WORKSPACE == "/workspace"  # where the agent and the box see it


def _image_files(env: LimaEnv) -> dict[str, Path]:
    files = {"image": Path(env.env["COWORK_LIMA_IMAGE"])}
    for name in ("vmlinuz", "initrd.img"):
        f = env.home.parent / name
        f.write_bytes(b"\x00" * 4096)
        f.chmod(0o644)
        files[name] = f
    return files


def test_a_local_image_with_direct_kernel_boot_renders_a_valid_template(
    lima_env: LimaEnv,
) -> None:
    f = _image_files(lima_env)
    opts = lima.InitOptions(
        name="img",
        image=str(f["image"]),
        kernel=str(f["vmlinuz"]),
        initrd=str(f["initrd.img"]),
        kernel_cmdline="root=/dev/vda rw console=ttyS0 ds=nocloud",
        legacy_bios=True,
    )
    text = lima.render_template(opts, token=lima.generate_token())
    proc = _validate(lima_env, _write(lima_env, "img", text))
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(text)
    assert "base" not in doc  # only our image: no Ubuntu list merged in behind it
    assert doc["images"] == [
        {
            "location": str(f["image"]),
            "arch": lima.lima_arch(),
            "kernel": {
                "location": str(f["vmlinuz"]),
                "cmdline": "root=/dev/vda rw console=ttyS0 ds=nocloud",
            },
            "initrd": {"location": str(f["initrd.img"])},
        }
    ]
    assert doc["firmware"] == {"legacyBIOS": True}


def test_an_image_url_is_passed_to_lima_as_given(lima_env: LimaEnv) -> None:
    url = "https://images.example.com/debian-12.qcow2"
    doc = yaml.safe_load(lima.render_template(lima.InitOptions(name="url", image=url)))
    assert doc["images"] == [{"location": url, "arch": lima.lima_arch()}]


def test_params_and_ca_certs_reach_the_template(lima_env: LimaEnv) -> None:
    pem = lima_env.home.parent / "corp-ca.crt"
    pem.write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    opts = lima.InitOptions(
        name="p", params={"CoworkToolchain": "false", "CoworkAgentArgs": "--log-level debug"},
        ca_certs=(pem,),
    )  # fmt: skip
    text = lima.render_template(opts)
    proc = _validate(lima_env, _write(lima_env, "p", text))
    assert proc.returncode == 0, proc.stderr
    doc = yaml.safe_load(text)
    assert doc["param"]["CoworkToolchain"] == "false"
    assert doc["param"]["CoworkAgentArgs"] == "--log-level debug"
    assert doc["param"]["CoworkClaude"] == "true"  # the rest as written
    assert doc["caCerts"] == {"certs": [pem.read_text()]}


def test_the_agent_socket_is_forwarded_into_the_instance_sock_dir(lima_env: LimaEnv) -> None:
    text = lima.render_template(lima.InitOptions(name="sock"))
    proc = _validate(lima_env, _write(lima_env, "sock", text), "--fill")
    assert proc.returncode == 0, proc.stderr
    rules = yaml.safe_load(proc.stdout)["portForwards"]
    [rule] = [r for r in rules if r.get("guestSocket") == defaults.GUEST_SOCKET]
    # validate fills {{.Dir}} with LIMA_HOME; a created instance's is checked in test_lifecycle.
    assert rule["hostSocket"].endswith(f"/sock/{defaults.LIMA_HOST_SOCKET_NAME}")


def test_the_data_plane_socket_is_forwarded_beside_the_agent_socket(lima_env: LimaEnv) -> None:
    text = lima.render_template(lima.InitOptions(name="data"))
    proc = _validate(lima_env, _write(lima_env, "data", text), "--fill")
    assert proc.returncode == 0, proc.stderr
    rules = yaml.safe_load(proc.stdout)["portForwards"]
    guest = data_socket_path(defaults.GUEST_SOCKET)
    [rule] = [r for r in rules if r.get("guestSocket") == guest]
    assert rule["hostSocket"].endswith("/sock/" + data_socket_path(defaults.LIMA_HOST_SOCKET_NAME))


def test_no_guest_port_is_forwarded_to_the_host(lima_env: LimaEnv) -> None:
    text = lima.render_template(lima.InitOptions(name="ports"))
    proc = _validate(lima_env, _write(lima_env, "ports", text), "--fill")
    assert proc.returncode == 0, proc.stderr
    port_rules = [
        r for r in yaml.safe_load(proc.stdout)["portForwards"] if not r.get("guestSocket")
    ]
    assert port_rules[0]["ignore"] is True
    assert port_rules[0]["guestIP"] == "0.0.0.0"
    assert port_rules[0]["guestPortRange"] == [1, 65535]


def test_the_token_reaches_the_guest_root_only() -> None:
    token = lima.generate_token()
    doc = yaml.safe_load(lima.render_template(lima.InitOptions(name="t"), token=token))
    [entry] = [p for p in doc["provision"] if p.get("path") == defaults.GUEST_TOKEN_FILE]
    assert entry == {
        "mode": "data",
        "path": defaults.GUEST_TOKEN_FILE,
        "owner": "root:root",
        "permissions": "0600",
        "content": token + "\n",
    }


def test_data_provisions_come_before_the_scripts() -> None:
    doc = yaml.safe_load(
        lima.render_template(lima.InitOptions(name="o"), token=lima.generate_token())
    )
    modes = [p["mode"] for p in doc["provision"]]
    assert modes == sorted(modes, key=lambda m: m != "data")


def test_every_referenced_script_exists_and_passes_shellcheck() -> None:
    doc = yaml.safe_load((LIMA_DIR / "cowork.yaml").read_text())
    files = [LIMA_DIR / p["file"] for p in doc["provision"] if "file" in p]
    assert [f.name for f in files] == ["base.sh", "claude.sh", "agent.sh"]
    proc = subprocess.run(["shellcheck", "-x", *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_bad_init_options_are_refused_before_limactl_runs() -> None:
    with pytest.raises(lima.LimaError, match=r"--ubuntu must be one of 22\.04, 24\.04"):
        lima.render_template(lima.InitOptions(name="x", ubuntu="20.04"))
    with pytest.raises(lima.LimaError, match="bad VM name"):
        lima.render_template(lima.InitOptions(name="no/slash"))
