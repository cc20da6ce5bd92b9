"""The seccomp-BPF program the bubblewrap sandbox applies (`bwrap --seccomp FD`).

Why a denylist (default ALLOW) and not Docker's allowlist: the sandbox runs
arbitrary developer tools (compilers, JVMs, Node, package managers) whose
syscall needs we cannot enumerate; what we can enumerate is the small set of
syscalls that reach kernel state shared with the agent, the VM or the host and
that no ordinary tool uses. Docker's default profile
(moby `profiles/seccomp/default.json`) is the reference for that set.

Shape of the program:

- denials return an errno (EPERM) rather than killing the caller, so a tool
  that merely probes for a feature gets a clean error and falls back;
- `clone3` answers ENOSYS, as in Docker: its flags live in a struct seccomp
  cannot read, and ENOSYS is what makes glibc (>= 2.34) fall back to `clone()`,
  whose flags we do check;
- seccomp compares one argument against one value per rule and ANDs the
  comparisons of a rule, so "any of these flags" and "not one of these values"
  are several rules (one per flag, one per refused value or range);
- only the native architecture is allowed: a syscall made through another ABI
  (i386 `int 0x80`, x32 on x86_64) would have other numbers and slip past every
  rule, so it kills the process instead (libseccomp's "bad arch" action).

bwrap reads the raw `struct sock_filter` array from the fd until EOF; this
module builds it with libseccomp (through `pyseccomp`, a ctypes wrapper, so the
agent needs the system library `libseccomp2` but no compiler).
"""

from __future__ import annotations

import fcntl
import functools
import os
import tempfile
from dataclasses import dataclass
from errno import ENOSYS, EPERM
from typing import Any, Literal

__all__ = ["DENIED", "ArgCheck", "Rule", "build_filter", "filter_fd"]

# clone() flags that create namespaces (include/uapi/linux/sched.h).
CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": 0x00020000,
    "CLONE_NEWCGROUP": 0x02000000,
    "CLONE_NEWUTS": 0x04000000,
    "CLONE_NEWIPC": 0x08000000,
    "CLONE_NEWUSER": 0x10000000,
    "CLONE_NEWPID": 0x20000000,
    "CLONE_NEWNET": 0x40000000,
}

# Socket domains the sandbox may use: local and IP. Everything else is refused.
ALLOWED_SOCKET_DOMAINS = (1, 2, 10)  # AF_UNIX, AF_INET, AF_INET6
# Names for the refused domains below AF_INET6, which get one rule each.
_LOW_DOMAIN_NAMES = {
    0: "AF_UNSPEC",
    3: "AF_AX25",
    4: "AF_IPX",
    5: "AF_APPLETALK",
    6: "AF_NETROM",
    7: "AF_BRIDGE",
    8: "AF_ATMPVC",
    9: "AF_X25",
}

TIOCSTI = 0x5412
TIOCLINUX = 0x541C
# The kernel reads an ioctl request as a 32-bit unsigned int, so the upper
# half of the register must not let a caller dodge the comparison.
_U32 = 0xFFFFFFFF


@dataclass(frozen=True)
class ArgCheck:
    """One comparison of a syscall argument (libseccomp's `Arg`).

    `masked_eq` matches when `arg & mask == value`; `eq` and `gt` compare the
    full 64-bit register, which makes them fail closed: garbage in the upper
    half of an int argument makes the value large, not allowed.
    """

    index: int
    op: Literal["eq", "gt", "masked_eq"]
    value: int
    mask: int = 0


@dataclass(frozen=True)
class Rule:
    """A denial: `syscall` (when every check in `when` holds) fails with `error`.

    `required` rules exist on every architecture the agent supports (x86_64,
    aarch64): if libseccomp cannot resolve one, the build fails rather than
    produce a filter with a hole. Optional rules are defence in depth and are
    skipped where the architecture (or an older libseccomp) lacks the syscall.
    """

    name: str
    syscall: str
    why: str
    when: tuple[ArgCheck, ...] = ()
    error: int = EPERM
    required: bool = True


def _plain(syscall: str, why: str, *, required: bool = True) -> Rule:
    return Rule(name=syscall, syscall=syscall, why=why, required=required)


def _clone_rules() -> tuple[Rule, ...]:
    why = (
        "clone() with a namespace flag is unshare() in another guise: a new "
        "user/mount/net namespace undoes the view bwrap built and opens kernel "
        "surface normally reserved to root"
    )
    return tuple(
        Rule(
            name=f"clone:{flag_name}",
            syscall="clone",
            why=why,
            when=(ArgCheck(index=0, op="masked_eq", mask=flag, value=flag),),
        )
        for flag_name, flag in CLONE_NAMESPACE_FLAGS.items()
    )


def _socket_rules(syscall: str) -> tuple[Rule, ...]:
    why = (
        "only AF_UNIX, AF_INET and AF_INET6: netlink configures the kernel, "
        "AF_PACKET sees raw frames past the egress proxy, AF_VSOCK reaches the "
        "host (the agent's own channel), AF_ALG and the rest are rarely used "
        "kernel attack surface"
    )
    low = tuple(
        Rule(
            name=f"{syscall}:{family}",
            syscall=syscall,
            why=why,
            when=(ArgCheck(index=0, op="eq", value=domain),),
        )
        for domain, family in _LOW_DOMAIN_NAMES.items()
    )
    above = Rule(
        name=f"{syscall}:above_AF_INET6",
        syscall=syscall,
        why=why,
        when=(ArgCheck(index=0, op="gt", value=max(ALLOWED_SOCKET_DOMAINS)),),
    )
    return (*low, above)


def _ioctl_rule(name: str, request: int, why: str) -> Rule:
    return Rule(
        name=f"ioctl:{name}",
        syscall="ioctl",
        why=why,
        when=(ArgCheck(index=1, op="masked_eq", mask=_U32, value=request),),
    )


_KEYRING = "the kernel keyring is not namespaced: it holds the keys of the agent and other sessions"
_MOUNT = "changes the filesystem view bwrap built (remount binds writable, uncover hidden paths)"
_MODULE = "loads or unloads kernel code"
_CLOCK = "the system clock is not namespaced: changing it affects the agent and the VM"
_RENAME = "renames the machine: the VM itself unless bwrap was given --unshare-uts"
_PTRACE_DOOR = "reads or takes another process's memory or fds: ptrace by another name"
_IO_URING = (
    "io_uring runs I/O in kernel workers that seccomp does not see, and has "
    "been a steady source of kernel exploits; programs fall back to plain I/O"
)

DENIED: tuple[Rule, ...] = (
    _plain(
        "ptrace",
        "inspects or rewrites other processes (the agent, other sessions) running as the same "
        "user, and a tracer can rewrite a tracee's syscalls after the filter has run",
    ),
    _plain("mount", _MOUNT),
    _plain("umount2", _MOUNT),
    _plain("pivot_root", "swaps the root filesystem under bwrap's view"),
    _plain("kexec_load", "replaces the running kernel"),
    _plain("kexec_file_load", "replaces the running kernel"),
    _plain("init_module", _MODULE),
    _plain("finit_module", _MODULE),
    _plain("delete_module", _MODULE),
    _plain("bpf", "loads programs into the kernel; a large source of kernel bugs"),
    _plain(
        "perf_event_open",
        "kernel and cross-process performance counters: side channels and kernel bugs",
    ),
    _plain("keyctl", _KEYRING),
    _plain("add_key", _KEYRING),
    _plain("request_key", _KEYRING),
    _plain(
        "unshare",
        "new namespaces (a user namespace above all) undo the sandbox's view and open kernel "
        "surface normally reserved to root",
    ),
    _plain("setns", "joins another process's namespaces, e.g. the VM's via /proc/PID/ns"),
    *_clone_rules(),
    Rule(
        name="clone3",
        syscall="clone3",
        why="its flags sit in a struct seccomp cannot read; ENOSYS (not EPERM) makes glibc "
        "fall back to clone(), whose namespace flags are checked",
        error=ENOSYS,
    ),
    _plain("io_uring_setup", _IO_URING),
    _plain("io_uring_enter", _IO_URING),
    _plain("io_uring_register", _IO_URING),
    *_socket_rules("socket"),
    *_socket_rules("socketpair"),
    _ioctl_rule(
        "TIOCSTI",
        TIOCSTI,
        "pushes characters into the terminal's input queue: types commands into the shell "
        "that started the sandbox, to run after it exits",
    ),
    _ioctl_rule(
        "TIOCLINUX",
        TIOCLINUX,
        "virtual console selection/paste: the same injection as TIOCSTI (CVE-2023-28100)",
    ),
    _plain(
        "open_by_handle_at",
        "opens any inode of a filesystem by handle, bypassing the mount tree (the 'shocker' "
        "container escape)",
    ),
    _plain("swapon", "system-wide memory configuration"),
    _plain("swapoff", "system-wide memory configuration"),
    _plain("reboot", "reboots or halts the VM"),
    _plain("acct", "process accounting is system wide: it can be switched off or redirected"),
    _plain("settimeofday", _CLOCK),
    _plain("clock_settime", _CLOCK),
    _plain(
        "userfaultfd",
        "stalls kernel page-fault handling at a moment of the caller's choosing: the standard "
        "tool for winning kernel races",
    ),
    # Optional: defence in depth from Docker's default denials, skipped where
    # the architecture or libseccomp lacks them.
    _plain("clock_adjtime", _CLOCK, required=False),
    _plain("adjtimex", _CLOCK, required=False),
    _plain("process_vm_readv", _PTRACE_DOOR, required=False),
    _plain("process_vm_writev", _PTRACE_DOOR, required=False),
    _plain("pidfd_getfd", _PTRACE_DOOR, required=False),
    _plain("sethostname", _RENAME, required=False),
    _plain("setdomainname", _RENAME, required=False),
    _plain("fsopen", _MOUNT + " (new mount API)", required=False),
    _plain("fsconfig", _MOUNT + " (new mount API)", required=False),
    _plain("fsmount", _MOUNT + " (new mount API)", required=False),
    _plain("fspick", _MOUNT + " (new mount API)", required=False),
    _plain("move_mount", _MOUNT + " (new mount API)", required=False),
    _plain("open_tree", _MOUNT + " (new mount API)", required=False),
    _plain("mount_setattr", _MOUNT + " (new mount API)", required=False),
    _plain(
        "syslog", "reads or clears the kernel log (kernel addresses, other users)", required=False
    ),
    _plain("quotactl", "filesystem quota administration", required=False),
    _plain("quotactl_fd", "filesystem quota administration", required=False),
    _plain(
        "vhangup",
        "hangs up the controlling terminal, which processes outside the sandbox share",
        required=False,
    ),
    _plain(
        "fanotify_init",
        "watches (and can block) file access system wide, beyond the sandbox",
        required=False,
    ),
    _plain("iopl", "raw I/O port access to the (virtual) hardware; x86 only", required=False),
    _plain("ioperm", "raw I/O port access to the (virtual) hardware; x86 only", required=False),
)


def _arg_index(syscall: str, index: int, on_s390: bool) -> int:
    """clone()'s first two arguments are swapped on s390, so its flags are arg 1 there."""
    if syscall == "clone" and on_s390 and index in (0, 1):
        return 1 - index
    return index


def build_filter() -> bytes:
    """The raw BPF program (`struct sock_filter[]`) for the native architecture.

    Builds afresh on every call (a few milliseconds); `filter_fd` caches it.
    Raises RuntimeError if libseccomp is missing or a required rule cannot be
    expressed on this architecture: a sandbox without its filter must not start.
    """
    try:
        # pyseccomp ships no type information; its API mirrors libseccomp's own bindings.
        import pyseccomp as seccomp  # type: ignore[import-untyped, unused-ignore]
    except (ImportError, OSError, RuntimeError) as exc:
        raise RuntimeError(
            "the sandbox's seccomp filter needs libseccomp: install the Debian package "
            f"libseccomp2 (and the pyseccomp module): {exc}"
        ) from exc

    ops = {"eq": seccomp.EQ, "gt": seccomp.GT, "masked_eq": seccomp.MASKED_EQ}
    on_s390 = seccomp.system_arch() in (seccomp.Arch.S390, seccomp.Arch.S390X)

    flt = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
    flt.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.KILL_PROCESS)
    for rule in DENIED:
        # Negative numbers: -1 for names libseccomp does not know, other
        # negatives for "exists elsewhere, not on this architecture".
        nr = seccomp.resolve_syscall(seccomp.Arch.NATIVE, rule.syscall)
        if nr < 0:
            if rule.required:
                raise RuntimeError(
                    f"seccomp rule {rule.name!r}: libseccomp does not know syscall "
                    f"{rule.syscall!r} on this architecture (libseccomp2 too old?)"
                )
            continue
        args: list[Any] = []
        for check in rule.when:
            index = _arg_index(rule.syscall, check.index, on_s390)
            if check.op == "masked_eq":
                args.append(seccomp.Arg(index, ops[check.op], check.mask, check.value))
            else:
                args.append(seccomp.Arg(index, ops[check.op], check.value))
        try:
            flt.add_rule(seccomp.ERRNO(rule.error), nr, *args)
        except OSError as exc:
            raise RuntimeError(f"seccomp rule {rule.name!r} rejected by libseccomp: {exc}") from exc

    # libseccomp writes the program straight to a file descriptor.
    with tempfile.TemporaryFile() as out:
        flt.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise RuntimeError(f"libseccomp exported a malformed BPF program ({len(program)} bytes)")
    return program


@functools.lru_cache(maxsize=1)
def _cached_program() -> bytes:
    """Built once per agent: the program never changes, and processes start often."""
    return build_filter()


def filter_fd() -> int:
    """A new fd to hand to `bwrap --seccomp FD`, positioned at the program's start.

    One fd per child: bwrap reads it to EOF and the offset is shared with our
    copy. It is close-on-exec (Popen's `pass_fds` makes it inheritable in that
    child only); the caller closes its copy once the child has started. The
    memfd is sealed, so nothing can alter the program between here and bwrap.
    """
    program = _cached_program()
    fd = os.memfd_create("cowork-seccomp", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        view = memoryview(program)
        while view:
            view = view[os.write(fd, view) :]
        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE,
        )
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd
