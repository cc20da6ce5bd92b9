"""Bad input to `coworkctl init`: one line with the fix, a non-zero exit, and nothing made.

These need the real limactl but no boot; the one that does (an agent that never gets
healthy) is in the Lima tier, tests/lima_e2e/test_z_init_fails.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from host_client import lima

from .conftest import LimaEnv


def _one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _nothing_made(env: LimaEnv) -> None:
    assert [p.name for p in env.home.iterdir() if not p.name.startswith("_")] == []


def _path_without_qemu(env: LimaEnv) -> str:
    """A PATH with what the limactl wrapper needs, and no QEMU."""
    d = env.home.parent / "bin-no-qemu"
    d.mkdir(exist_ok=True)
    for tool in ("setpriv", "env", "sh"):
        for base in ("/usr/bin", "/bin"):
            if os.path.exists(f"{base}/{tool}") and not (d / tool).exists():
                (d / tool).symlink_to(f"{base}/{tool}")
    return str(d)


def test_init_without_qemu_says_how_to_install_it(lima_env: LimaEnv, wheel: Path) -> None:
    lima_env.env["PATH"] = _path_without_qemu(lima_env)
    line = _one_line(lima_env.coworkctl("init", "--wheel", str(wheel)), 1)
    assert line.startswith("coworkctl: QEMU not found (qemu-system-x86_64): Lima needs it on Linux")
    assert "apt-get install qemu-system-x86 qemu-utils" in line
    _nothing_made(lima_env)


def test_init_with_a_qemu_variable_pointing_nowhere_names_the_variable(
    lima_env: LimaEnv, wheel: Path
) -> None:
    lima_env.env["QEMU_SYSTEM_X86_64"] = "/nonexistent/qemu-system-x86_64"
    line = _one_line(lima_env.coworkctl("init", "--wheel", str(wheel)), 1)
    assert "QEMU not found (/nonexistent/qemu-system-x86_64)" in line
    assert "point QEMU_SYSTEM_X86_64 at it" in line
    _nothing_made(lima_env)


def test_init_without_lima_says_how_to_install_it(lima_env: LimaEnv) -> None:
    del lima_env.env["COWORK_LIMACTL"]
    lima_env.env["PATH"] = "/usr/bin:/bin"
    line = _one_line(lima_env.coworkctl("init"), 1)
    assert line.startswith("coworkctl: limactl not found on PATH: install Lima >= 2.0")
    _nothing_made(lima_env)


def test_init_leaves_a_vm_it_did_not_make_alone(lima_env: LimaEnv, wheel: Path) -> None:
    image = lima_env.env["COWORK_LIMA_IMAGE"]
    template = lima_env.home.parent / "plain.yaml"
    template.write_text(
        f"images:\n- location: {image}\n  arch: x86_64\n"
        "containerd: {system: false, user: false}\n"  # no nerdctl download
    )
    template.chmod(0o644)
    made = lima_env.run_limactl("--tty=false", "create", "--name=other", str(template))
    assert made.returncode == 0, made.stderr
    line = _one_line(lima_env.coworkctl("init", "--name", "other", "--wheel", str(wheel)), 1)
    assert line == (
        "coworkctl: Lima VM 'other' exists but was not made by coworkctl init "
        f"(no {lima_env.home / 'other' / 'cowork-token'}): pick another --name, or delete it"
    )
    inst = lima.get_instance("other")
    assert inst is not None and inst.status == "Stopped"
    assert not (lima_env.home / "other" / "cowork-token").exists()
    assert not (lima_env.home / "other" / "cowork-dist").exists()


def test_a_missing_image_is_a_usage_error_that_makes_nothing(lima_env: LimaEnv) -> None:
    line = _one_line(lima_env.coworkctl("init", "--image", "/nonexistent/debian.qcow2"), 2)
    assert line == (
        "coworkctl: --image /nonexistent/debian.qcow2: no such file "
        "(give a local file or an http(s):// URL)"
    )
    _nothing_made(lima_env)
    assert not any(Path(lima_env.env["COWORK_WORKSPACE"]).iterdir())


def test_a_file_that_is_no_disk_image_is_refused_before_lima_runs(lima_env: LimaEnv) -> None:
    text = lima_env.home.parent / "notes.txt"
    text.write_text("not a disk\n")
    line = _one_line(lima_env.coworkctl("init", "--image", str(text)), 2)
    assert line.startswith(f"coworkctl: --image {text}: not a disk image")
    _nothing_made(lima_env)


def test_a_corrupt_qcow2_is_refused_with_qemu_img_words(lima_env: LimaEnv) -> None:
    bad = lima_env.home.parent / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + b"\x00" * 4 + b"\xff" * 4096)  # qcow2 magic, garbage header
    line = _one_line(lima_env.coworkctl("init", "--image", str(bad)), 2)
    assert line.startswith(f"coworkctl: --image {bad}: not a disk image (")
    _nothing_made(lima_env)


def test_a_kernel_without_an_image_is_a_usage_error(lima_env: LimaEnv) -> None:
    lima_env.env.pop("COWORK_LIMA_IMAGE")
    line = _one_line(lima_env.coworkctl("init", "--kernel", "/boot/vmlinuz"), 2)
    assert line == "coworkctl: --kernel, --initrd and --kernel-cmdline need --image"


def test_an_unknown_param_names_the_ones_the_template_has(lima_env: LimaEnv) -> None:
    line = _one_line(lima_env.coworkctl("init", "--param", "CoworkToolchian=false"), 2)
    assert line.startswith("coworkctl: --param CoworkToolchian: lima/cowork.yaml has no such param")
    assert "CoworkToolchain" in line
    _nothing_made(lima_env)


def test_a_ca_cert_that_is_not_pem_is_refused(lima_env: LimaEnv) -> None:
    bad = lima_env.home.parent / "ca.crt"
    bad.write_text("hello\n")
    line = _one_line(lima_env.coworkctl("init", "--ca-cert", str(bad)), 2)
    assert line == f"coworkctl: --ca-cert {bad}: no PEM certificate in it (BEGIN CERTIFICATE)"
    _nothing_made(lima_env)
