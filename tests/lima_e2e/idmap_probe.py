"""Can PATH take an idmapped mount? Run as root in the guest: `python3 - PATH...`.

For each path: clone its mount (open_tree), make a user namespace with a one-uid
mapping, and ask the kernel to idmap the clone (mount_setattr MOUNT_ATTR_IDMAP).
Prints `PATH: OK` or `PATH: <errno name>`; EINVAL means the filesystem does not
support idmapped mounts. Nothing is attached anywhere: the clone is dropped.
Python 3.10+, standard library only (the guest's python3).
"""

import ctypes
import errno
import os
import sys

SYS_OPEN_TREE, SYS_MOUNT_SETATTR = 428, 442  # x86_64
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, 0o2000000
AT_EMPTY_PATH, AT_RECURSIVE = 0x1000, 0x8000
MOUNT_ATTR_IDMAP = 0x00100000
CLONE_NEWUSER = 0x10000000
libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]  # fmt: skip


def userns() -> tuple[int, int]:
    """(pid, fd) of a child in a new user namespace mapping uid/gid 0 to 65534."""
    go_r, go_w = os.pipe()  # parent -> child: done, exit
    ready_r, ready_w = os.pipe()  # child -> parent: unshared
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(ready_r)
        ok = libc.unshare(CLONE_NEWUSER) == 0
        os.write(ready_w, b"1" if ok else b"0")
        os.read(go_r, 1)
        os._exit(0)
    os.close(go_r)
    os.close(ready_w)
    if os.read(ready_r, 1) != b"1":
        sys.exit("unshare(CLONE_NEWUSER) failed in the child")
    for f in ("uid_map", "gid_map"):
        with open(f"/proc/{pid}/{f}", "w") as m:
            m.write("0 65534 1\n")
    fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
    os.close(go_w)
    return pid, fd


for path in sys.argv[1:]:
    tree = libc.syscall(SYS_OPEN_TREE, -100, path.encode(), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    if tree < 0:
        print(f"{path}: open_tree {errno.errorcode[ctypes.get_errno()]}")
        continue
    pid, ns = userns()
    attr = MountAttr(MOUNT_ATTR_IDMAP, 0, 0, ns)
    rc = libc.syscall(SYS_MOUNT_SETATTR, tree, b"", AT_EMPTY_PATH | AT_RECURSIVE,
                      ctypes.byref(attr), ctypes.sizeof(attr))  # fmt: skip
    err = ctypes.get_errno()
    os.waitpid(pid, 0)
    os.close(ns)
    os.close(tree)
    print(f"{path}: {'OK' if rc == 0 else errno.errorcode[err]}")
