"""The sandbox's seccomp filter, probed for real under bubblewrap.

Each probe runs `python3 -I -S -c PROBE` (the interpreter running the tests)
inside `bwrap ... --seccomp FD`, makes one raw syscall through ctypes and
prints the errno it got. Syscall numbers come from libseccomp for the native
architecture, so the probes are not x86_64-only.

Probe arguments are chosen so the call is harmless even if a rule failed to
fire: bwrap started by root keeps almost every capability, so each probe uses
an invalid flag, a bad fd, a NULL pointer or a nonexistent path that makes the
kernel fail before any effect. That also means that, run as root without the
filter, no probe gets EPERM; where one would (a caller without capabilities
gets EPERM from the kernel itself), `test_refusal_comes_from_the_filter` still
tells the filter's answer apart by rewriting the program's errno to a sentinel.
"""

from __future__ import annotations

import errno
import os
import platform
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import pyseccomp  # type: ignore[import-untyped, unused-ignore]
import pytest

from guest_agent import seccomp

REPO = Path(__file__).resolve().parents[2]

BPF_RET_K = 0x06  # BPF_RET | BPF_K
BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_DATA_ARCH = 4  # offsetof(struct seccomp_data, arch)
# An errno no probed syscall returns on its own: seeing it proves the filter answered.
SENTINEL = errno.ENOTRECOVERABLE
CLONE_SIGHAND = 0x800  # without CLONE_VM: EINVAL before anything is created

# What the brief for the filter requires, independently of the module's table.
REQUIRED_SYSCALLS = [
    "ptrace",
    "mount",
    "umount2",
    "kexec_load",
    "kexec_file_load",
    "bpf",
    "perf_event_open",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "clone",
    "clone3",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "socket",
    "socketpair",
    "ioctl",
    "init_module",
    "finit_module",
    "delete_module",
    "open_by_handle_at",
    "pivot_root",
    "swapon",
    "swapoff",
    "reboot",
    "acct",
    "settimeofday",
    "clock_settime",
    "userfaultfd",
]

# Rule name -> syscall arguments (Python expressions; ints become C longs).
PLAIN_PROBE_ARGS: dict[str, str] = {
    "ptrace": "2, 999999, 0, 0",  # PTRACE_PEEKDATA, no such pid: ESRCH
    "mount": "None, b'/nonexistent/cowork-probe', None, 0, None",
    "umount2": "b'/nonexistent/cowork-probe', 0",
    "pivot_root": "None, None",
    "kexec_load": "0, 1000, None, 0x8000",  # too many segments, unknown flag
    "kexec_file_load": "-1, -1, 0, None, 0x8000",  # unknown flag
    "init_module": "None, 0, None",  # empty image: ENOEXEC
    "finit_module": "-1, b'', 0",
    "delete_module": "None, 0",
    "bpf": "0xFFFF, None, 0",  # unknown command
    "perf_event_open": "None, 0, -1, -1, 0",
    "keyctl": "0xFFFF, 0, 0, 0, 0",  # unknown command
    "add_key": "None, None, None, 0, 0",
    "request_key": "None, None, None, 0",
    "unshare": "0x8000",  # CLONE_PARENT: never valid for unshare
    "setns": "-1, 0",
    "clone3": "None, 0",
    "io_uring_setup": "0, None",
    "io_uring_enter": "-1, 0, 0, 0, None, 0",
    "io_uring_register": "-1, 0, None, 0",
    "ioctl:TIOCSTI": f"-1, {seccomp.TIOCSTI}, None",
    "ioctl:TIOCLINUX": f"-1, {seccomp.TIOCLINUX}, None",
    "open_by_handle_at": "-1, None, 0",
    "swapon": "None, 0x40000000",  # unknown swap flag
    "swapoff": "None",
    "reboot": "0, 0, 0, None",  # wrong magic
    "acct": "b'/nonexistent/cowork-probe'",
    "settimeofday": "(ctypes.c_long * 2)(0, -1), None",  # negative microseconds
    "clock_settime": "9999, (ctypes.c_long * 2)(0, 0)",  # no such clock
    "userfaultfd": "0xFFFF",  # unknown flags
    "clock_adjtime": "9999, None",
    "adjtimex": "None",
    "process_vm_readv": "999999, None, 0, None, 0, 0",
    "process_vm_writev": "999999, None, 0, None, 0, 0",
    "pidfd_getfd": "-1, 0, 0",
    "sethostname": "None, 9999",  # longer than any hostname
    "setdomainname": "None, 9999",
    "fsopen": "None, 0xFFFF",
    "fsconfig": "-1, 0, None, None, 0",
    "fsmount": "-1, 0xFFFF, 0",
    "fspick": "-1, None, 0xFFFF",
    "move_mount": "-1, None, -1, None, 0xFFFFFF",
    "open_tree": "-1, None, 0xFFFFFFFF",
    "mount_setattr": "-1, None, 0xFFFFFFFF, None, 0",
    "syslog": "9999, None, 0",  # unknown action
    "quotactl": "-1, None, 0, None",
    "quotactl_fd": "-1, 0, 0, None",
    "vhangup": "",  # the probe has no controlling terminal (new session)
    "fanotify_init": "0xFFFFFFFF, 0",
    "iopl": "4",  # levels stop at 3
    "ioperm": "0, 0, 0",  # empty range
}

_PROBE = """\
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
args = [ctypes.c_long(a) if isinstance(a, int) else a for a in [{args}]]
ret = libc.syscall(ctypes.c_long({nr}), *args)
print("errno=%d" % (ctypes.get_errno() if ret == -1 else 0))
"""


def probe_args(rule: seccomp.Rule) -> str:
    """The arguments that make `rule` match, harmlessly."""
    if rule.syscall == "clone":
        (flag,) = (c.value for c in rule.when)
        return f"{flag} | {CLONE_SIGHAND}, 0, 0, 0, 0"
    if rule.syscall in ("socket", "socketpair"):
        (check,) = rule.when
        domain = check.value if check.op == "eq" else 16  # AF_NETLINK, above AF_INET6
        # An invalid type: EINVAL before any socket exists.
        pair = ", (ctypes.c_int * 2)()" if rule.syscall == "socketpair" else ""
        return f"{domain}, 9999, 0{pair}"
    return PLAIN_PROBE_ARGS[rule.name]


def syscall_nr(name: str) -> int:
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert isinstance(nr, int)
    return nr


def native_rules() -> list[seccomp.Rule]:
    """The rules the filter holds on this machine (optional ones may be absent)."""
    return [r for r in seccomp.DENIED if syscall_nr(r.syscall) >= 0]


@lru_cache(maxsize=1)
def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        pytest.fail("bwrap (bubblewrap) is not installed: `make setup` installs it")
    return path


def fd_with(program: bytes) -> int:
    """A pipe read end holding `program` (a few KB: fits the pipe buffer)."""
    r, w = os.pipe()
    with os.fdopen(w, "wb") as out:
        out.write(program)
    return r


def sandboxed(argv: list[str], program_fd: int | None) -> subprocess.CompletedProcess[str]:
    """Run `argv` under bwrap, with the filter in `program_fd` (closed here) if given."""
    cmd = [bwrap_path(), "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    cmd += ["--unshare-pid", "--die-with-parent"]
    if program_fd is not None:
        cmd += ["--seccomp", str(program_fd)]
    try:
        return subprocess.run(
            [*cmd, "--", *argv],
            pass_fds=() if program_fd is None else (program_fd,),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=30,
            start_new_session=True,  # no controlling terminal for the probes
            check=False,
        )
    finally:
        if program_fd is not None:
            os.close(program_fd)


def python(code: str, program_fd: int | None) -> subprocess.CompletedProcess[str]:
    return sandboxed([sys.executable, "-I", "-S", "-c", code], program_fd)


def probe_errno(syscall: str, args: str, program_fd: int | None) -> int:
    """errno of one raw syscall made under the sandbox (0 if it succeeded)."""
    nr = syscall_nr(syscall)
    assert nr >= 0, f"{syscall} does not exist on this architecture"
    res = python(_PROBE.format(nr=nr, args=args), program_fd)
    for line in res.stdout.splitlines():
        if line.startswith("errno="):
            return int(line.removeprefix("errno="))
    pytest.fail(f"probe of {syscall}({args}) printed no errno: rc={res.returncode} {res.stderr}")


def errno_name(n: int) -> str:
    return errno.errorcode.get(n, str(n))


def with_errno(program: bytes, new_errno: int) -> bytes:
    """`program` with every ERRNO return answering `new_errno` instead."""
    out = bytearray(program)
    for off in range(0, len(out), 8):
        code, jt, jf, k = struct.unpack_from("=HBBI", out, off)
        if code == BPF_RET_K and k & 0xFFFF0000 == SECCOMP_RET_ERRNO:
            struct.pack_into("=HBBI", out, off, code, jt, jf, SECCOMP_RET_ERRNO | new_errno)
    return bytes(out)


@lru_cache(maxsize=1)
def sentinel_program() -> bytes:
    return with_errno(seccomp.build_filter(), SENTINEL)


def instructions(program: bytes) -> list[tuple[int, int, int, int]]:
    return [struct.unpack_from("=HBBI", program, off) for off in range(0, len(program), 8)]


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    seccomp._cached_program.cache_clear()
    yield
    seccomp._cached_program.cache_clear()


# --- each rule, under bwrap -------------------------------------------------


@pytest.mark.parametrize("rule", native_rules(), ids=lambda r: r.name)
def test_rule_denies_with_eperm_or_enosys_for_clone3(rule: seccomp.Rule) -> None:
    expected = errno.ENOSYS if rule.syscall == "clone3" else errno.EPERM
    got = probe_errno(rule.syscall, probe_args(rule), seccomp.filter_fd())
    assert got == expected, f"{rule.name}: got {errno_name(got)}"


@pytest.mark.parametrize("rule", native_rules(), ids=lambda r: r.name)
def test_refusal_comes_from_the_filter(rule: seccomp.Rule) -> None:
    got = probe_errno(rule.syscall, probe_args(rule), fd_with(sentinel_program()))
    assert got == SENTINEL, f"{rule.name}: the kernel answered {errno_name(got)}"


@pytest.mark.parametrize(
    "domain",
    [16, 17, 38, 40, -1, (1 << 32) | 2],
    ids=["AF_NETLINK", "AF_PACKET", "AF_ALG", "AF_VSOCK", "negative", "AF_INET_with_upper_bits"],
)
def test_socket_family_is_refused(domain: int) -> None:
    got = probe_errno("socket", f"{domain}, 9999, 0", seccomp.filter_fd())
    assert got == errno.EPERM, errno_name(got)


def test_tiocsti_with_upper_bits_set_is_refused() -> None:
    # The kernel reads the request as 32 bits, so this is still TIOCSTI.
    request = (0xDEAD << 32) | seccomp.TIOCSTI
    assert probe_errno("ioctl", f"-1, {request}, None", seccomp.filter_fd()) == errno.EPERM


def test_without_filter_the_ptrace_probe_is_not_eperm() -> None:
    got = probe_errno("ptrace", PLAIN_PROBE_ARGS["ptrace"], None)
    assert got == errno.ESRCH, errno_name(got)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="the x32 ABI exists on x86_64 only")
def test_syscall_through_another_abi_kills_the_process() -> None:
    # getpid through the x32 ABI (nr | 0x40000000) would dodge every rule's number.
    code = (
        "import ctypes\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no core file\n"
        "libc.syscall(ctypes.c_long(0x40000000 | 39))\n"
        "print('survived')\n"
    )
    res = python(code, seccomp.filter_fd())
    assert "survived" not in res.stdout
    assert res.returncode == 128 + signal.SIGSYS, res


# --- what ordinary programs do still works -----------------------------------


@pytest.mark.parametrize("family", ["AF_UNIX", "AF_INET", "AF_INET6"])
def test_allowed_socket_family_can_be_created(family: str) -> None:
    code = f"import socket; socket.socket(socket.{family}, socket.SOCK_STREAM).close(); print('ok')"
    res = python(code, seccomp.filter_fd())
    assert res.stdout.strip() == "ok", res.stderr


def test_unix_socketpair_can_be_created() -> None:
    code = "import socket; [s.close() for s in socket.socketpair()]; print('ok')"
    res = python(code, seccomp.filter_fd())
    assert res.stdout.strip() == "ok", res.stderr


def test_shell_can_fork_and_exec() -> None:
    res = sandboxed(["/bin/sh", "-c", "/bin/echo ok; /bin/echo done"], seccomp.filter_fd())
    assert res.stdout.split() == ["ok", "done"], res.stderr


def test_python_threads_start() -> None:
    # glibc tries clone3 first; ENOSYS sends it to clone() without namespace flags.
    code = (
        "import threading\n"
        "out = []\n"
        "t = threading.Thread(target=out.append, args=('ok',))\n"
        "t.start(); t.join(); print(out[0])\n"
    )
    res = python(code, seccomp.filter_fd())
    assert res.stdout.strip() == "ok", res.stderr


def test_python_subprocess_run_works() -> None:
    code = "import subprocess; subprocess.run(['true'], check=True); print('ok')"
    res = python(code, seccomp.filter_fd())
    assert res.stdout.strip() == "ok", res.stderr


def test_clone_without_namespace_flags_reaches_the_kernel() -> None:
    got = probe_errno("clone", f"{CLONE_SIGHAND}, 0, 0, 0, 0", seccomp.filter_fd())
    assert got == errno.EINVAL, errno_name(got)


def test_other_ioctls_reach_the_kernel() -> None:
    tcgets = 0x5401
    got = probe_errno("ioctl", f"-1, {tcgets}, None", seccomp.filter_fd())
    assert got == errno.EBADF, errno_name(got)


# --- the program and the table ------------------------------------------------


def test_program_is_whole_sock_filter_instructions() -> None:
    program = seccomp.build_filter()
    assert program
    assert len(program) % 8 == 0


def test_program_only_allows_refuses_with_eperm_or_enosys_or_kills() -> None:
    returns = {k for code, _, _, k in instructions(seccomp.build_filter()) if code == BPF_RET_K}
    allowed = {
        SECCOMP_RET_ALLOW,
        SECCOMP_RET_ERRNO | errno.EPERM,
        SECCOMP_RET_ERRNO | errno.ENOSYS,
        SECCOMP_RET_KILL_PROCESS,
    }
    assert returns <= allowed, sorted(hex(k) for k in returns - allowed)


def test_program_kills_syscalls_of_another_architecture() -> None:
    (code0, _, _, k0), (code1, _, jf, k1), *rest = instructions(seccomp.build_filter())
    assert (code0, k0) == (BPF_LD_W_ABS, SECCOMP_DATA_ARCH)
    assert (code1, k1) == (BPF_JEQ_K, pyseccomp.system_arch())
    assert rest[jf] == (BPF_RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS)


def test_required_denials_are_all_in_the_table() -> None:
    required = {r.syscall for r in seccomp.DENIED if r.required}
    assert set(REQUIRED_SYSCALLS) <= required, set(REQUIRED_SYSCALLS) - required


@pytest.mark.parametrize("arch", ["X86_64", "AARCH64"])
def test_required_syscalls_exist_on_supported_architectures(arch: str) -> None:
    arch_id = getattr(pyseccomp.Arch, arch)
    missing = [
        r.syscall
        for r in seccomp.DENIED
        if r.required and pyseccomp.resolve_syscall(arch_id, r.syscall) < 0
    ]
    assert not missing


def test_clone_rules_cover_every_namespace_flag() -> None:
    masks = {c.mask for r in seccomp.DENIED if r.syscall == "clone" for c in r.when}
    assert sum(masks) == 0x7E020000  # Docker's mask of namespace flags


def test_every_rule_has_a_unique_name_a_reason_and_a_probe() -> None:
    names = [r.name for r in seccomp.DENIED]
    assert len(names) == len(set(names))
    assert all(r.why for r in seccomp.DENIED)
    for rule in seccomp.DENIED:
        probe_args(rule)  # KeyError: a rule nobody probes


def test_unknown_optional_syscall_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = seccomp.Rule(name="nope", syscall="no_such_syscall", why="test", required=False)
    monkeypatch.setattr(seccomp, "DENIED", (*seccomp.DENIED, extra))
    assert seccomp.build_filter()


def test_unknown_required_syscall_fails_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = seccomp.Rule(name="nope", syscall="no_such_syscall", why="test")
    monkeypatch.setattr(seccomp, "DENIED", (*seccomp.DENIED, extra))
    with pytest.raises(RuntimeError, match="no_such_syscall"):
        seccomp.build_filter()


def test_missing_libseccomp_names_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyseccomp", None)  # import now raises ImportError
    with pytest.raises(RuntimeError, match="libseccomp2"):
        seccomp.build_filter()


def test_importing_the_module_does_not_load_libseccomp() -> None:
    code = "import sys, guest_agent.seccomp; print('pyseccomp' in sys.modules)"
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert res.stdout.strip() == "False"


# --- filter_fd ------------------------------------------------------------------


def test_filter_fd_reads_back_the_program() -> None:
    fd = seccomp.filter_fd()
    with os.fdopen(fd, "rb") as f:
        assert f.read() == seccomp.build_filter()


def test_filter_fd_is_not_inheritable() -> None:
    fd = seccomp.filter_fd()
    try:
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_filter_fd_is_a_new_fd_each_call() -> None:
    a, b = seccomp.filter_fd(), seccomp.filter_fd()
    try:
        assert a != b
        assert os.read(a, 1 << 16) == os.read(b, 1 << 16)
    finally:
        os.close(a)
        os.close(b)


def test_program_is_built_once(monkeypatch: pytest.MonkeyPatch, fresh_cache: None) -> None:
    calls: list[int] = []
    real = seccomp.build_filter

    def counting() -> bytes:
        calls.append(1)
        return real()

    monkeypatch.setattr(seccomp, "build_filter", counting)
    for _ in range(3):
        os.close(seccomp.filter_fd())
    assert len(calls) == 1
