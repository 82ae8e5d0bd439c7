"""Binds of the emulator's FUSE connection that are not securityfs.

The emulator is mounted with ``fsname=securityfs`` because tools take the
first ``securityfs`` line of ``/proc/mounts``.  A bind mount keeps the
source of the mount it was made from, so a measured mount (DST of
``--measure``) or a kernel view of ``imafs run`` bound from the emulator's
mount would show ``securityfs`` too.  They are bound instead from a second
mount of the same connection whose source is ``imafs``: mount(2) of
``fuse.imafs`` given a descriptor of ``/dev/fuse`` already attached to a
connection reuses that connection's superblock (the kernel's
``fuse_get_tree``: same device, same tree, no request to the daemon).

That second mount is made where nobody sees it and nothing can outlive it:
in a private mount namespace of a thread made for it (``unshare(CLONE_NEWNS)``
acts on the calling thread only), over a tmpfs over the emulator's own mount
point (the kernel refuses a superblock over its own mount there).  The
paths wanted are taken from it as detached mounts (``open_tree`` with
``OPEN_TREE_CLONE``, which looks them up through the daemon) and the thread
ends, taking its namespace with it; the caller attaches each detached mount
where it belongs with ``move_mount``.  A process killed at any step leaves
nothing: a detached mount is a descriptor and goes with it.

The descriptor of ``/dev/fuse`` handed in is closed as soon as the second
mount exists, before any lookup: while a copy of it is open, the death of
the daemon does not abort the connection, and a lookup would wait for ever.

Needs Linux 5.6 (``open_tree``/``move_mount`` 5.2, ``pidfd_getfd`` 5.6) and
glibc 2.36 (the ``open_tree``/``move_mount`` wrappers), as Debian 12 has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import json
import re
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass

SOURCE = "imafs"  # the source the binds show in /proc/mounts
FUSE_DEVICE = os.makedev(10, 229)  # /dev/fuse (FUSE_MINOR of the misc major)
# mount(2) data: rootmode, user_id and group_id are required by the parser;
# the connection exists, so its own options stay and these are ignored
OPTIONS = "fd={fd},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other"

CLONE_NEWNS = 0x00020000
MS_NOSUID, MS_NODEV, MS_PRIVATE = 2, 4, 1 << 18
OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = 1, os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 4
AT_FDCWD = -100
SYS_PIDFD_GETFD = 438  # the same number on every architecture

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(ret: int, what: str) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return ret


def fuse_descriptor(pid: int | str = "self") -> int:
    """The number of the process's descriptor of /dev/fuse (the daemon has one)."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}") == "/dev/fuse":
                return int(name)
        except OSError:  # closed meanwhile
            pass
    raise OSError(f"process {pid} has no descriptor of /dev/fuse")


@dataclass
class FuseDaemon:
    """A daemon's /dev/fuse, reachable from another PID namespace: a pidfd
    of the daemon and the number of its descriptor."""

    pidfd: int
    number: int

    @classmethod
    def of(cls, pid: int) -> FuseDaemon:
        pidfd = os.pidfd_open(pid)
        try:
            return cls(pidfd, fuse_descriptor(pid))
        except OSError:
            os.close(pidfd)
            raise

    def copy(self) -> int:
        """A copy of the daemon's /dev/fuse (pidfd_getfd: the caller must be
        allowed to ptrace the daemon), checked to be /dev/fuse."""
        fd = _check(_libc.syscall(SYS_PIDFD_GETFD, self.pidfd, self.number, 0), "pidfd_getfd")
        st = os.fstat(fd)
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != FUSE_DEVICE:
            os.close(fd)
            raise OSError(f"the daemon's descriptor {self.number} is not /dev/fuse")
        return fd

    def close(self) -> None:
        os.close(self.pidfd)


def clone(fuse_fd: int, mountpoint: str, paths: list[str]) -> list[int]:
    """Detached mounts (descriptors) of ``paths``, relative to the root of the
    connection of ``fuse_fd`` (which is closed), whose source is imafs.
    ``mountpoint`` is where the connection is mounted in the caller's
    namespace: a descriptor of another connection is refused before anything
    is looked up."""
    result: list = []
    thread = threading.Thread(target=_clone, args=(fuse_fd, mountpoint, paths, result),
                              name="imafs-binds", daemon=True)
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _clone(fuse_fd: int, mountpoint: str, paths: list[str], result: list) -> None:
    trees: list[int] = []
    try:
        try:
            device = _top_device(mountpoint)
            _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
            # the copy of the emulator's mount is a peer of the original if that
            # is shared: private, nothing mounted on it propagates
            _mount(None, mountpoint, None, MS_PRIVATE)
            # the kernel refuses a superblock over its own mount at the same place (EBUSY)
            _mount("tmpfs", mountpoint, "tmpfs", MS_NOSUID | MS_NODEV, "size=4k")
            _mount(SOURCE, mountpoint, "fuse.imafs", MS_NOSUID | MS_NODEV, OPTIONS.format(fd=fuse_fd))
        finally:
            os.close(fuse_fd)
        if _top_device(mountpoint) != device:
            raise OSError(f"the daemon's /dev/fuse is not the connection mounted at {mountpoint}")
        for path in paths:
            target = os.path.join(mountpoint, path.lstrip("/"))
            trees.append(clone_mount(target))
        result.append(trees)
    except BaseException as e:
        for fd in trees:
            os.close(fd)
        result.append(e)


def clone_mount(path: str) -> int:
    """A detached bind mount (descriptor) of ``path``: the mount there, or the
    subtree of a mount (OPEN_TREE_CLONE); it keeps that mount's source."""
    return _check(_libc.open_tree(AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC),
                  f"open_tree {path}")


def attach(tree: int, target: str) -> None:
    """Attach the detached mount ``tree`` at ``target`` (move_mount)."""
    _check(_libc.move_mount(tree, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH),
           f"move_mount to {target}")


def _mount(source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def _top_device(point: str) -> str | None:
    """major:minor of the topmost mount at ``point`` in the calling thread's namespace."""
    found = None
    for dev, _, p, _ in mounts("/proc/thread-self/mountinfo"):
        if p == point:
            found = dev
    return found


def unescape(field: bytes) -> str:
    """A path field of mountinfo, whose space, tab, newline and backslash are octal escapes."""
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field))


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[str, str, str, str]]:
    """(device, root, mount point, fstype) of each mount of this namespace, bottom to top."""
    out = []
    with open(mountinfo, "rb") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index(b"-") + 1].decode()
            out.append((parts[2].decode(), unescape(parts[3]), unescape(parts[4]), fstype))
    return out


# -- the daemon's own binds, made by a child process -------------------------------------------
BIND_TIMEOUT = 30.0  # seconds the child has to look the measured mounts up and attach them


class BindError(Exception):
    """A bind the child could not make; ``done`` the targets it attached before."""

    def __init__(self, message: str, done: list[str]):
        super().__init__(message)
        self.done = done


def bind_from_child(fuse_fd: int, mountpoint: str, binds: list[tuple[str, str]]) -> list[str]:
    """Bind each (path in the connection, target) by a child process given a
    copy of ``fuse_fd``; the targets attached, in order.

    Not in the daemon itself: a thread of the daemon that looks a path up
    through its own connection shares the daemon's descriptors, so a daemon
    killed while the lookup waits for its answer would keep its /dev/fuse
    open through that thread, which waits for ever (the connection is never
    aborted, the mount hangs). The child closes its copy before any lookup,
    and a daemon that dies aborts the connection: the child's lookup fails."""
    request = json.dumps({"fd": fuse_fd, "mountpoint": mountpoint, "binds": binds})
    try:
        r = subprocess.run([sys.executable, "-m", "imafs.binds", request], pass_fds=(fuse_fd,),
                           capture_output=True, text=True, timeout=BIND_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        raise BindError(f"cannot bind the measured mounts: no answer within {BIND_TIMEOUT:g} s",
                        [json.loads(line) for line in out.splitlines()]) from None
    done = [json.loads(line) for line in r.stdout.splitlines()]
    if r.returncode != 0:
        raise BindError(r.stderr.strip() or f"the binding process ended with status {r.returncode}", done)
    return done


def _child(request: dict) -> int:
    """``python -m imafs.binds REQUEST``: the binds of :func:`bind_from_child`;
    prints each target attached (a JSON string per line), says what failed."""
    binds = request["binds"]
    try:
        trees = clone(request["fd"], request["mountpoint"], [path for path, _ in binds])
    except OSError as e:
        print(f"cannot bind the measured mounts: {reason(e)}", file=sys.stderr)
        return 1
    for tree, (_, target) in zip(trees, binds):
        try:
            attach(tree, target)
        except OSError as e:
            print(f"cannot bind the measured mount at {target}: {reason(e)}", file=sys.stderr)
            return 1
        print(json.dumps(target), flush=True)
    return 0


def reason(e: OSError) -> str:
    """An OSError for a human: the system call's message without "[Errno N]"."""
    return e.strerror if e.filename is None and e.strerror else str(e)


if __name__ == "__main__":
    sys.exit(_child(json.loads(sys.argv[1])))
