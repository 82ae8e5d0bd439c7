"""Issue 9, part 1: every call on every node of a live mount answers with the
kernel's errno, as root and as uid 1000, and none of them stops the daemon.

The walk (tests/walker.py) applies every namespace, attribute, xattr and
descriptor call to every node of the securityfs tree, to a measured mount
(a ramfs re-exported at DST) and, through the hidden root name
``.imafs-measured-0``, across the two.  The expected answers come from two
independent witnesses, never from imafs:

* the securityfs tree: :func:`kernel`, the VFS's rules for inodes that lack
  an operation, written down from the kernel's source (docs/errnos.md has
  the same table with the function behind each entry); where a real
  securityfs can be mounted, ``test_witness_securityfs`` checks those rules
  against it;
* a measured mount: the same call on a twin directory of a real ramfs
  outside FUSE.

Where FUSE itself forces another answer that a daemon cannot change
(docs/deviations.md), :func:`fuse_forced` and :func:`measured_forced` give
what imafs answers instead; the walk asserts exactly that.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from imafs.control import Client

from . import walker

WALKER = Path(__file__).with_name("walker.py")
SETPRIV_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
HIDDEN = ".imafs-measured-0"
COUNTERS = ("runtime_measurements_count", "violations")

EACCES, EPERM, ENOTDIR, EISDIR, EEXIST, EXDEV = (errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
                                                 errno.EEXIST, errno.EXDEV)
EINVAL, ENOTSUP, ENODATA, ENOTTY, ENODEV, ENXIO, EBADF, ELOOP, EBUSY = (
    errno.EINVAL, errno.EOPNOTSUPP, errno.ENODATA, errno.ENOTTY, errno.ENODEV, errno.ENXIO, errno.EBADF,
    errno.ELOOP, errno.EBUSY)


def protected_hardlinks() -> bool:
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "0"
    except OSError:
        return True


@dataclass
class Node:
    """A securityfs inode as the kernel sees it: its kind, its permission
    bits (a symlink's: its target's, for the calls that follow it)."""
    label: str
    path: str
    kind: str  # dir, link_dir, link_file, list, counter, policy
    mode: int
    sibling: str | None = None  # an existing name beside it, for replacing renames
    sibling_dir: bool = False
    victim: bool = True  # False: a mount point, not removed or moved
    cross: str | None = None  # a directory of the other filesystem
    staging: bool = True  # the lists have the staging ABI's open mediation

    @property
    def is_link(self) -> bool:
        return self.kind.startswith("link")

    @property
    def followed(self) -> str:
        """The kind a call that follows symlinks acts on."""
        return {"link_dir": "dir", "link_file": "list"}.get(self.kind, self.kind)

    def spec(self, reset=None) -> dict:
        return {"label": self.label, "path": self.path, "sibling": self.sibling, "cross": self.cross,
                "victim": self.victim, "reset": reset}


IN_DIR = ("creat", "open_excl_new", "tmpfile", "mkdir_new", "mknod_reg", "mknod_fifo", "mknod_chr",
          "symlink_new")
NAME = ("open_excl_self", "mkdir_self", "link_sibling", "link_cross", "unlink", "rmdir", "rename_new",
        "rename_self", "rename_replace", "rename_noreplace_new", "rename_noreplace_existing",
        "rename_exchange", "rename_whiteout", "rename_cross")


def _fd_calls(n: Node, group: str, uid: int) -> dict:
    """What a descriptor of ``n`` answers: group "r" opened O_RDONLY, "w" O_WRONLY."""
    kind = n.followed
    if kind == "dir":  # simple_dir_operations: dcache_dir_lseek, noop_fsync, no mmap/ioctl/splice
        return {"ioctl_fionread": ENOTTY, "ioctl_tcgets": ENOTTY, "ioctl_getflags": ENOTTY,
                "ioctl_figetbsz": 0, "flock": 0, "lockf": 0, "mmap_shared": ENODEV, "mmap_private": ENODEV,
                "lseek_set": 0, "lseek_cur": 0, "lseek_end": EINVAL, "lseek_data": EINVAL,
                "lseek_hole": EINVAL, "sendfile": EINVAL, "copy_file_range": EISDIR, "fsync": 0,
                "fdatasync": 0, "fallocate": EBADF, "posix_fallocate": EBADF, "ftruncate": EINVAL}
    seq = kind == "list"  # seq_lseek; the counters and policy: generic_file_llseek on i_size 0
    r = group == "r"
    return {
        "ioctl_fionread": 0,  # do_vfs_ioctl: i_size - f_pos of a regular file
        "ioctl_tcgets": ENOTTY,  # vfs_ioctl: no ->unlocked_ioctl
        "ioctl_getflags": ENOTTY,  # vfs_fileattr_get: no ->fileattr_get
        "ioctl_figetbsz": 0,
        "flock": 0,  # generic locks
        "lockf": 0 if r else EBADF,  # fcntl_setlk: F_RDLCK needs FMODE_READ
        "mmap_shared": ENODEV if r else EACCES,  # do_mmap: FMODE_READ, then no ->mmap
        "mmap_private": ENODEV if r else EACCES,
        "lseek_set": 0, "lseek_cur": 0,
        "lseek_end": EINVAL if seq else 0,
        "lseek_data": EINVAL if seq else ENXIO,
        "lseek_hole": EINVAL if seq else ENXIO,
        "sendfile": EINVAL if r else EBADF,  # no ->splice_read
        "copy_file_range": EXDEV if r else EBADF,  # another superblock
        "fsync": EINVAL, "fdatasync": EINVAL,  # vfs_fsync_range: no ->fsync
        "fallocate": EBADF if r else ENOTSUP,  # vfs_fallocate: FMODE_WRITE, then no ->fallocate
        # glibc emulates the missing fallocate with a one-NUL-byte pwrite: a list
        # refuses it as a command (2 to 21 bytes), a counter has no ->write, the
        # policy takes it as an empty line (ima_parse_add_rule returns 1)
        "posix_fallocate": EBADF if r else (0 if kind == "policy" else EINVAL),
        "ftruncate": EINVAL if r else 0,  # do_ftruncate: FMODE_WRITE; simple_setattr
    }


def kernel(op: str, n: Node, uid: int):
    """The kernel's answer to ``op`` on securityfs node ``n`` for ``uid``
    (0 or 1000, neither owner nor in the group of any node); None: the call
    does not happen (its descriptor could not be opened)."""
    user = uid != 0
    others = n.mode & 0o007
    if op in IN_DIR:
        if n.followed != "dir":
            return ENOTDIR  # the path walk
        if user:
            return EACCES  # may_create / may_o_create / vfs_tmpfile: inode_permission(dir, W|X)
        return {"creat": EACCES, "open_excl_new": EACCES, "mknod_reg": EACCES,  # vfs_create, lookup_open
                "tmpfile": ENOTSUP}.get(op, EPERM)  # vfs_tmpfile; vfs_mkdir/mknod/symlink
    if op in ("open_excl_self", "mkdir_self"):
        return EEXIST  # do_open, filename_create
    if op in NAME:
        if not n.victim:
            return "n/a"
        if op == "rename_self":
            return 0  # vfs_rename: source == target
        if op in ("rename_replace", "rename_noreplace_existing", "rename_exchange") and not n.sibling:
            return "n/a"
        if op in ("link_cross", "rename_cross"):
            return EXDEV if n.cross else "n/a"  # do_linkat / do_renameat2: another mount
        if op == "rename_noreplace_existing":
            return EEXIST  # do_renameat2, before any permission
        if op == "link_sibling":
            if user:  # may_linkat: not the owner, not a safe source; else may_create
                return EPERM if protected_hardlinks() else EACCES
            return EPERM  # vfs_link: no ->link
        if user:
            return EACCES  # may_delete: inode_permission(dir, W|X)
        if op == "unlink":
            return EISDIR if n.kind == "dir" else EPERM  # may_delete; vfs_unlink
        if op == "rmdir":
            return EPERM if n.kind == "dir" else ENOTDIR  # vfs_rmdir; may_delete
        if op == "rename_replace":  # may_delete of the target
            if n.kind == "dir" and not n.sibling_dir:
                return ENOTDIR
            if n.kind != "dir" and n.sibling_dir:
                return EISDIR
        return EPERM  # vfs_rename: no ->rename
    if op in ("chmod", "chown", "utime_set"):
        return EPERM if user else 0  # setattr_prepare: owner or CAP_FOWNER; simple_setattr
    if op == "chown_noop":
        return 0
    if op == "utime_now":
        return EACCES if user and not others & 0o2 else 0  # vfs_utimes: owner or MAY_WRITE
    if op == "truncate":
        if n.followed == "dir":
            return EISDIR  # vfs_truncate
        return EACCES if user and not others & 0o2 else 0  # inode_permission; simple_setattr
    if op in ("stat", "lstat", "statvfs", "open_path", "open_path_nofollow", "listxattr"):
        return 0  # listxattr: no ->listxattr, no LSM label: empty
    if op == "readlink":
        return 0 if n.is_link else EINVAL
    if op in ("listdir", "open_directory"):
        return 0 if n.followed == "dir" else ENOTDIR
    if op in ("open_r", "open_nofollow", "r:open"):
        if op == "open_nofollow" and n.is_link:
            return ELOOP
        if n.followed == "dir":
            return 0
        if user and not others & 0o4:
            return EACCES  # may_open: inode_permission
        return EACCES if n.followed == "policy" else 0  # ima_open_policy without READ_POLICY
    if op in ("open_w", "open_rw", "w:open"):
        if n.followed == "dir":
            return EISDIR  # may_open
        if user:
            return EACCES
        return EACCES if op == "open_rw" and n.followed == "policy" else 0  # ima_open_policy
    if op.startswith(("setxattr_", "getxattr_", "removexattr_")):
        what, ns = op.split("_")
        write = what != "getxattr"
        if ns == "acl":  # vfs_get_acl: !IS_POSIXACL; set_posix_acl: no ->set_acl
            return ENOTSUP
        if ns == "user":  # xattr_permission
            if n.is_link:
                return EPERM if write else ENODATA
            if user and not others & (0o2 if write else 0o4):
                return EACCES
            return ENOTSUP  # no xattr handler
        if ns == "trusted":
            if user:
                return EPERM if write else ENODATA
            return ENOTSUP
        if ns == "security":  # cap_inode_setxattr/removexattr: CAP_SYS_ADMIN
            return EPERM if user and write else ENOTSUP
    if op[:2] in ("r:", "w:"):
        opened = kernel(op[:2] + "open", n, uid)
        return _fd_calls(n, op[0], uid)[op[2:]] if opened == 0 else None
    raise AssertionError(f"no rule for {op}")


def fuse_forced(op: str, n: Node, uid: int):
    """What imafs answers where FUSE forces another answer than the
    kernel's (docs/deviations.md); None where it answers the kernel's."""
    kind = n.followed
    fd = op[2:] if op[:2] in ("r:", "w:") else None
    if fd in ("lseek_end", "lseek_data", "lseek_hole") and kind in ("dir", "list"):
        # fuse_dir_operations: generic_file_llseek; a file's SEEK_DATA/HOLE falls
        # back to it when the daemon has no lseek (pyfuse3 has none); i_size is 0
        return 0 if fd == "lseek_end" else ENXIO
    if op in ("r:mmap_private", "r:sendfile") and kind in ("list", "counter"):
        return 0  # direct_io files: private maps and copy_splice_read are allowed
    if op == "w:ioctl_getflags" and (kind == "list" and n.staging or kind == "policy"):
        # fuse_priv_ioctl_prepare opens the file read-only on the daemon first:
        # the writer task's read-only open is EBUSY (staging), policy's EACCES
        return EBUSY if kind == "list" else EACCES
    if op == "removexattr_acl" and uid and not n.is_link:
        return EPERM  # FUSE inodes have ->set_acl: set_posix_acl checks the owner
    if op in ("link_cross", "rename_cross") and n.cross and n.victim:
        # through the hidden root name both parts are one mount to the VFS: its
        # own checks come before the daemon's EXDEV
        if op == "link_cross" and uid:
            return EPERM if protected_hardlinks() else EACCES  # may_linkat
        if op == "link_cross" and n.kind == "dir":
            return EPERM  # vfs_link: a directory
        if op == "rename_cross" and uid:
            return EACCES  # may_delete
    return None


def measured_forced(op: str, twin, what: str, uid: int, owner: bool):
    """What a measured mount answers where the real filesystem (the twin)
    answers ``twin`` and FUSE forces another answer; None: the twin's.
    ``what``: dir, file or link."""
    if op == "tmpfile" and twin == 0:
        return ENOTSUP  # pyfuse3 has no tmpfile: FUSE's no_tmpfile
    if op in ("r:lseek_end", "r:lseek_data", "r:lseek_hole") and what == "dir":
        return 0 if op == "r:lseek_end" else ENXIO  # fuse_dir_operations: generic_file_llseek
    if op == "removexattr_acl" and uid and not owner and twin == ENOTSUP and what != "link":
        return EPERM  # set_posix_acl: FUSE inodes have ->set_acl
    return None


# -- docs/errnos.md: the rules above as tables ---------------------------------------------------
DOC_NODES = {
    "directory": Node("dir", "", "dir", 0o755, sibling="s", sibling_dir=True, cross="c"),
    "list": Node("list", "", "list", 0o660, sibling="s", cross="c"),
    "counter": Node("counter", "", "counter", 0o440, sibling="s", cross="c"),
    "policy": Node("policy", "", "policy", 0o200, sibling="s", cross="c"),
    "symlink": Node("symlink", "", "link_file", 0o660, sibling="s", cross="c"),
}
# calls that act on a symlink's target (the symlink column then says so)
FOLLOWS = {*IN_DIR, "chmod", "truncate", "stat", "statvfs", "listdir", "open_r", "open_w", "open_rw",
           "open_directory", "open_path"}
CALLS = {  # the call as walker.py makes it, and where the kernel decides
    "creat": ("`creat(N/x)`", "lookup_open: no `->create` (EACCES); may_o_create"),
    "open_excl_new": ("`open(N/x, O_CREAT\\|O_EXCL)`", "as `creat`"),
    "tmpfile": ("`open(N, O_TMPFILE\\|O_RDWR)`", "vfs_tmpfile: permission, then no `->tmpfile`"),
    "mkdir_new": ("`mkdir(N/x)`", "vfs_mkdir: may_create, then no `->mkdir`"),
    "mknod_reg": ("`mknod(N/x, S_IFREG)`", "do_mknodat → vfs_create"),
    "mknod_fifo": ("`mknod(N/x, S_IFIFO)`", "vfs_mknod: may_create, then no `->mknod`"),
    "mknod_chr": ("`mknod(N/x, S_IFCHR, 1:3)`", "vfs_mknod: may_create, CAP_MKNOD, no `->mknod`"),
    "symlink_new": ("`symlink(t, N/x)`", "vfs_symlink: may_create, then no `->symlink`"),
    "open_excl_self": ("`open(N, O_CREAT\\|O_EXCL)`", "do_open"),
    "mkdir_self": ("`mkdir(N)`", "filename_create"),
    "link_sibling": ("`link(N, dir(N)/x)`", "may_linkat (protected_hardlinks); vfs_link: no `->link`"),
    "link_cross": ("`link(N, other-fs/x)`³", "do_linkat: another mount"),
    "unlink": ("`unlink(N)`", "may_delete (permission, then EISDIR); vfs_unlink: no `->unlink`"),
    "rmdir": ("`rmdir(N)`", "may_delete (permission, then ENOTDIR); vfs_rmdir: no `->rmdir`"),
    "rename_new": ("`rename(N, dir(N)/x)`", "vfs_rename: may_delete, may_create, no `->rename`"),
    "rename_self": ("`rename(N, N)`", "vfs_rename: source == target"),
    "rename_replace": ("`rename(N, sibling)`", "vfs_rename: may_delete of both¹, no `->rename`"),
    "rename_noreplace_new": ("`renameat2(N, dir(N)/x, NOREPLACE)`", "as `rename`"),
    "rename_noreplace_existing": ("`renameat2(N, sibling, NOREPLACE)`", "do_renameat2"),
    "rename_exchange": ("`renameat2(N, sibling, EXCHANGE)`", "as `rename`"),
    "rename_whiteout": ("`renameat2(N, dir(N)/x, WHITEOUT)`", "as `rename`"),
    "rename_cross": ("`rename(N, other-fs/x)`³", "do_renameat2: another mount"),
    "chmod": ("`chmod(N, mode ^ 1)`", "setattr_prepare: owner or CAP_FOWNER; simple_setattr"),
    "chown": ("`lchown(N, uid ^ 1, gid ^ 1)`", "setattr_prepare (chown_ok); simple_setattr"),
    "chown_noop": ("`lchown(N, -1, -1)`", "chown_common: nothing to check"),
    "utime_set": ("`utimensat(N, times, NOFOLLOW)`", "setattr_prepare: owner"),
    "utime_now": ("`utimensat(N, NULL, NOFOLLOW)`", "vfs_utimes: owner or MAY_WRITE"),
    "truncate": ("`truncate(N, 7)`", "vfs_truncate: EISDIR, permission; simple_setattr sets i_size"),
    "stat": ("`stat(N)`", ""),
    "lstat": ("`lstat(N)`", ""),
    "statvfs": ("`statvfs(N)`", "simple_statfs"),
    "readlink": ("`readlink(N)`", "do_readlinkat"),
    "listdir": ("`getdents(N)`", "dcache_readdir"),
    "listxattr": ("`llistxattr(N)`", "vfs_listxattr: no `->listxattr`, no LSM label: empty"),
    "open_r": ("`open(N, O_RDONLY)`", "may_open; ima_open_policy (no READ_POLICY)"),
    "open_w": ("`open(N, O_WRONLY)`", "may_open; the lists' open (staging: CAP_SYS_ADMIN)"),
    "open_rw": ("`open(N, O_RDWR)`", "may_open; ima_open_policy"),
    "open_directory": ("`open(N, O_DIRECTORY)`", "do_open"),
    "open_nofollow": ("`open(N, O_NOFOLLOW)`", "do_open"),
    "open_path": ("`open(N, O_PATH)`", "do_o_path"),
    "open_path_nofollow": ("`open(N, O_PATH\\|O_NOFOLLOW)`", "do_o_path"),
    "setxattr_user": ("`lsetxattr(N, user.x)`", "xattr_permission; no xattr handler"),
    "getxattr_user": ("`lgetxattr(N, user.x)`", "xattr_permission; no xattr handler"),
    "removexattr_user": ("`lremovexattr(N, user.x)`", "xattr_permission; no xattr handler"),
    "setxattr_security": ("`lsetxattr(N, security.x)`", "cap_inode_setxattr: CAP_SYS_ADMIN"),
    "getxattr_security": ("`lgetxattr(N, security.x)`", "no LSM label, no handler"),
    "removexattr_security": ("`lremovexattr(N, security.x)`", "cap_inode_removexattr: CAP_SYS_ADMIN"),
    "setxattr_trusted": ("`lsetxattr(N, trusted.x)`", "xattr_permission: CAP_SYS_ADMIN"),
    "getxattr_trusted": ("`lgetxattr(N, trusted.x)`", "xattr_permission: CAP_SYS_ADMIN"),
    "removexattr_trusted": ("`lremovexattr(N, trusted.x)`", "xattr_permission: CAP_SYS_ADMIN"),
    "getxattr_acl": ("`lgetxattr(N, system.posix_acl_access)`", "vfs_get_acl: !IS_POSIXACL"),
    "removexattr_acl": ("`lremovexattr(N, system.posix_acl_access)`", "set_posix_acl: no `->set_acl`"),
    "r:open": ("`open(N, O_RDONLY)`, then on it:", ""),
    "r:ioctl_fionread": ("`ioctl(FIONREAD)`", "do_vfs_ioctl (regular files); vfs_ioctl"),
    "r:ioctl_tcgets": ("`ioctl(TCGETS)`", "vfs_ioctl: no `->unlocked_ioctl`"),
    "r:ioctl_getflags": ("`ioctl(FS_IOC_GETFLAGS)`", "vfs_fileattr_get: no `->fileattr_get`"),
    "r:ioctl_figetbsz": ("`ioctl(FIGETBSZ)`", "do_vfs_ioctl: s_blocksize"),
    "r:flock": ("`flock(LOCK_EX)`", "generic locks"),
    "r:lockf": ("`lockf(F_RDLCK)`", "fcntl_setlk: FMODE_READ"),
    "r:mmap_shared": ("`mmap(MAP_SHARED)`", "do_mmap: FMODE_READ, then no `->mmap`"),
    "r:mmap_private": ("`mmap(MAP_PRIVATE)`", "do_mmap: FMODE_READ, then no `->mmap`"),
    "r:lseek_set": ("`lseek(0, SEEK_SET)`", "seq_lseek / generic_file_llseek / dcache_dir_lseek"),
    "r:lseek_cur": ("`lseek(0, SEEK_CUR)`", "as `SEEK_SET`"),
    "r:lseek_end": ("`lseek(0, SEEK_END)`", "seq_lseek, dcache_dir_lseek: EINVAL; generic_file_llseek"),
    "r:lseek_data": ("`lseek(0, SEEK_DATA)`", "as `SEEK_END`; generic_file_llseek: ENXIO at i_size 0"),
    "r:lseek_hole": ("`lseek(0, SEEK_HOLE)`", "as `SEEK_DATA`"),
    "r:sendfile": ("`sendfile(/dev/null, N)`", "do_splice_read: no `->splice_read`"),
    "r:copy_file_range": ("`copy_file_range(N, memfd)`", "generic_copy_file_checks; another superblock"),
    "r:fsync": ("`fsync`", "vfs_fsync_range: no `->fsync`; noop_fsync"),
    "r:fdatasync": ("`fdatasync`", "as `fsync`"),
    "r:fallocate": ("`fallocate(0, 4096)`", "vfs_fallocate: FMODE_WRITE, then no `->fallocate`"),
    "r:posix_fallocate": ("`posix_fallocate(0, 1)`", "glibc: fallocate, else a NUL byte pwrite²"),
    "r:ftruncate": ("`ftruncate(0)`", "do_ftruncate: FMODE_WRITE; simple_setattr"),
}
CALLS["w:open"] = ("`open(N, O_WRONLY)`, then on it:", "")
for _op in walker.FD_CALLS:
    CALLS[f"w:{_op}"] = CALLS[f"r:{_op}"]


def _cell(v) -> str:
    return "—" if v is None else _name(v)


def errno_table() -> str:
    """docs/errnos.md's table: the kernel's answer, root / uid 1000."""
    head = "| call | " + " | ".join(DOC_NODES) + " | decided by |"
    rows = [head, "|" + " --- |" * (len(DOC_NODES) + 2)]
    for op, (call, source) in CALLS.items():
        cells = []
        for name, n in DOC_NODES.items():
            if name == "symlink" and (op in FOLLOWS or op[:2] in ("r:", "w:")):
                cells.append("its target")
            else:
                cells.append(f"{_cell(kernel(op, n, 0))} / {_cell(kernel(op, n, 1000))}")
        rows.append(f"| {call} | " + " | ".join(cells) + f" | {source} |")
    return "\n".join(rows) + "\n"


def deviation_table() -> str:
    """docs/errnos.md's second table: where imafs answers otherwise, FUSE-forced."""
    found: dict[tuple, list] = {}
    for op in CALLS:
        for name, n in DOC_NODES.items():
            if name == "symlink" and (op in FOLLOWS or op[:2] in ("r:", "w:")):
                continue
            for uid in (0, 1000):
                k, f = kernel(op, n, uid), fuse_forced(op, n, uid)
                if k is not None and f is not None and f != k:
                    found.setdefault((op, k, f), []).append((name, uid))
    rows = ["| call | node: caller | kernel | imafs |", "| --- | --- | --- | --- |"]
    for (op, k, f), where in found.items():
        callers: dict[str, list] = {}
        for name, uid in where:
            callers.setdefault(name, []).append("uid 1000" if uid else "root")
        nodes = "; ".join(f"{name}: {', '.join(who)}" for name, who in callers.items())
        fd = {"r:": "O_RDONLY fd: ", "w:": "O_WRONLY fd: "}.get(op[:2], "")
        rows.append(f"| {fd}{CALLS[op][0]} | {nodes} | {_cell(k)} | {_cell(f)} |")
    return "\n".join(rows) + "\n"


# -- the mount and its nodes -------------------------------------------------------------------
TREE_MODES = {"dir": 0o755, "link_dir": 0o755, "link_file": 0o660, "list": 0o660, "counter": 0o440,
              "policy": 0o200}
# the layouts walked: --set options, entries of integrity/ima, the staging ABI
# (kernel-observed.md F-1, F-2; staging.md §1.2, §1.3)
PROFILES = {"7.2": ((), 15, True), "6.12": (("kernel=6.12",), 9, False), "6.1": (("kernel=6.1",), 5, False)}


def tree_nodes(mp: Path, profile: str = "7.2") -> list[Node]:
    """Every node of a profile's tree (banks sha1 and sha256), with the
    kernel's modes: lists 0660 with the staging ABI, else 0440.  Links and
    renames across go to the measured mount by its hidden name."""
    _, entries, staging = PROFILES[profile]
    modes = dict(TREE_MODES, **({} if staging else {"list": 0o440, "link_file": 0o440}))
    cross = str(mp / HIDDEN / "x")
    ima = mp / "integrity" / "ima"
    nodes = [Node("/", str(mp), "dir", 0o755, victim=False, cross=cross),
             Node("integrity", str(mp / "integrity"), "dir", 0o755, sibling="ima", cross=cross),
             Node("integrity/ima", str(ima), "dir", 0o755, cross=cross),
             Node("ima", str(mp / "ima"), "link_dir", 0o755, sibling="integrity", sibling_dir=True,
                  cross=cross)]
    for name in os.listdir(ima):
        st = os.lstat(ima / name)
        if stat.S_ISLNK(st.st_mode):
            kind = "link_file"
        else:
            kind = "policy" if name == "policy" else "counter" if name in COUNTERS else "list"
        nodes.append(Node(f"ima/{name}", str(ima / name), kind, modes[kind],
                          sibling="violations" if name != "violations" else COUNTERS[0], cross=cross,
                          staging=staging))
    kinds = {n.kind for n in nodes}
    assert kinds == set(TREE_MODES) - ({"link_file"} if profile == "6.1" else set())
    assert len(nodes) == 4 + entries, sorted(n.label for n in nodes)
    return nodes


MEASURED = (("", None, "dir"), ("f", "d", "file"), ("d", "f", "dir"), ("l", "f", "link"), ("u", "d", "dir"),
            ("u/uf", None, "file"))  # name, sibling, what it is
OWNED_BY_1000 = ("u", "u/uf")


@dataclass
class Setup:
    m: object
    dst: Path
    twin: Path
    tree: list[Node]


@pytest.fixture(params=list(PROFILES))
def walk_mount(request, ramfs, mount_imafs):
    src, dst = ramfs()
    twin, _ = ramfs()
    # the measured mount is a FUSE mount: nodev, nosuid (docs/deviations.md), as the twin then
    subprocess.run(["mount", "-o", "remount,nodev,nosuid", str(twin)], check=True)
    walker.build(str(src))
    walker.build(str(twin))
    m = mount_imafs(*PROFILES[request.param][0], measure=[(src, dst)], reachable=True)
    return Setup(m, dst, twin, tree_nodes(m.path, request.param))


def measured_specs(s: Setup, uid: int) -> list[dict]:
    ima = str(s.m.path / "integrity" / "ima")
    specs = []
    for side, root in (("dst", s.dst), ("twin", s.twin)):
        reset = [str(root), None if uid == 0 else "u"]
        for name, sibling, _ in MEASURED:
            specs.append({"label": f"{side}:{name}", "path": str(root / name) if name else str(root),
                          "sibling": sibling, "cross": ima, "victim": bool(name), "reset": reset})
    reset = [str(s.dst), None if uid == 0 else "u"]
    specs.append({"label": "hidden:f", "path": str(s.m.path / HIDDEN / "f"), "sibling": "d", "cross": ima,
                  "victim": True, "reset": reset})
    # the hidden name itself is a name of the securityfs root
    specs.append({"label": "hidden:", "path": str(s.m.path / HIDDEN), "sibling": "integrity",
                  "cross": ima, "victim": True, "reset": reset})
    return specs


def run_walk(specs: list[dict], uid: int, skip=()) -> dict:
    """The whole walk in one subprocess (as ``uid``), which a hung call
    cannot keep from being killed."""
    r = subprocess.run([*(SETPRIV_1000 if uid else []), sys.executable, str(WALKER),
                        json.dumps({"targets": specs, "skip": list(skip)})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def all_calls(results: dict) -> set:
    return {op for answers in results.values() for op in answers}


def _name(v) -> str:
    if v == ENOTSUP:
        return "EOPNOTSUPP"  # the kernel's name (Python's errorcode says ENOTSUP)
    return errno.errorcode.get(v, str(v)) if isinstance(v, int) and v else str(v)


def check_tree(results: dict, nodes: list[Node], uid: int) -> None:
    wrong = []
    for n in nodes:
        got = results[n.label]
        ops = list(walker.PATH_CALLS) + [f"{g}:{c}" for g in "rw" for c in ["open", *walker.FD_CALLS]]
        for op in ops:
            want = kernel(op, n, uid)
            if want is not None and fuse_forced(op, n, uid) is not None:
                want = fuse_forced(op, n, uid)
            if got.get(op) != want:
                wrong.append(f"{n.label:45} {op:26} got {_name(got.get(op)):12} want {_name(want)}")
    assert not wrong, f"uid {uid}: {len(wrong)} answers differ:\n" + "\n".join(wrong)


def check_measured(results: dict, uid: int) -> None:
    """DST answers what the real filesystem answers (the twin), but for what
    FUSE forces; the hidden root name is a name of the securityfs root."""
    wrong = []
    pairs = [(f"dst:{name}", f"twin:{name}", what, name) for name, _, what in MEASURED]
    pairs.append(("hidden:f", "twin:f", "file", "f"))
    for label, twin_label, what, name in pairs:
        got, twin = results[label], results[twin_label]
        assert set(got) == set(twin), (label, set(got) ^ set(twin))
        for op, theirs in twin.items():
            want = measured_forced(op, theirs, what, uid, owner=uid != 0 and name in OWNED_BY_1000)
            if want is None:
                want = theirs
            if label == "hidden:f" and op in ("link_cross", "rename_cross") and uid:
                # one mount to the VFS: may_linkat / may_delete come before EXDEV
                want = (EPERM if protected_hardlinks() else EACCES) if op == "link_cross" else EACCES
            if got[op] != want:
                wrong.append(f"{label:12} {op:26} got {_name(got[op]):12} want {_name(want)} (real fs:"
                             f" {_name(theirs)})")
    hidden = results["hidden:"]
    as_name = Node("hidden:", "", "dir", 0o755, sibling="integrity", sibling_dir=True, cross="tree")
    for op, value in hidden.items():
        if op in NAME:  # its name: a directory entry of the securityfs root
            want = kernel(op, as_name, uid)
            if op in ("link_cross", "rename_cross"):  # to ima/: within the tree
                want = kernel("link_sibling" if op == "link_cross" else "rename_new", as_name, uid)
        else:  # the directory it names: the measured mount's root
            want = measured_forced(op, results["twin:"][op], "dir", uid, owner=False)
            if want is None:
                want = results["twin:"][op]
        if value != want:
            wrong.append(f"hidden:      {op:26} got {_name(value):12} want {_name(want)}")
    assert not wrong, f"uid {uid}: {len(wrong)} answers differ:\n" + "\n".join(wrong)


# -- what must not change ----------------------------------------------------------------------
def lists(m) -> dict[str, bytes]:
    return {name: m.read(name) for name in sorted(os.listdir(m.ima))
            if "runtime_measurements" in name and "count" not in name}


def tree_stat(nodes: list[Node], with_times: bool) -> dict:
    out = {}
    for n in nodes:
        st = os.lstat(n.path)
        out[n.label] = (st.st_mode, st.st_uid, st.st_gid, st.st_size) + \
            ((st.st_mtime_ns,) if with_times else ())
    return out


def assert_alive_and_unchanged(s: Setup, before_lists: dict, before_stat: dict, with_times: bool) -> None:
    status = Client(str(s.m.path), timeout=10).call("status")  # answers, and soon
    assert status["count"] == 1
    assert s.m.cli("status").returncode == 0
    assert lists(s.m) == before_lists
    assert tree_stat(s.tree, with_times) == before_stat
    klog = Path(status["kernel_log"])
    log = klog.read_text(errors="replace") if klog.exists() else ""
    assert "BUG" not in log, log[-3000:]


def _walk_half(s: Setup, uid: int) -> None:
    before_lists = lists(s.m)
    with_times = uid != 0
    before = tree_stat(s.tree, with_times)
    specs = [n.spec() for n in s.tree] + measured_specs(s, uid)
    results = run_walk(specs, uid)
    assert len(all_calls(results)) >= 90  # every call, both descriptor groups
    check_tree(results, s.tree, uid)
    check_measured(results, uid)
    assert_alive_and_unchanged(s, before_lists, before, with_times)


def test_walk_as_root(walk_mount):
    """Root: securityfs refuses every namespace call, answers simple_setattr
    (chmod, chown, utime, truncate succeed and are undone by the walk), and the
    measured mount answers as its ramfs."""
    _walk_half(walk_mount, 0)


def test_walk_as_uid_1000(walk_mount):
    """uid 1000, in one subprocess for the whole walk: DAC and capability
    refusals first, and nothing at all changes."""
    _walk_half(walk_mount, 1000)


# -- an independent witness: a real securityfs -------------------------------------------------
@pytest.fixture
def securityfs():
    """The running kernel's securityfs, mounted again (it has one superblock:
    the calls below change nothing there)."""
    if os.geteuid() != 0:
        pytest.skip("mounting securityfs needs root")
    base = Path(tempfile.mkdtemp(prefix="imafs-secfs-", dir="/tmp"))
    base.chmod(0o755)
    r = subprocess.run(["mount", "-t", "securityfs", "securityfs", str(base)], capture_output=True, text=True)
    if r.returncode != 0:
        base.rmdir()
        pytest.skip(f"cannot mount securityfs: {r.stderr.strip()}")
    try:
        yield base
    finally:
        subprocess.run(["umount", str(base)], check=False)
        base.rmdir()


# calls that would change the running kernel's securityfs if they succeeded
WITNESS_SKIP = ("chmod", "chown", "chown_noop", "utime_set", "utime_now", "truncate", "w:open")


def test_witness_securityfs(securityfs):
    """:func:`kernel` against the running kernel: its securityfs root (a
    simple_dir like integrity/ and ima/) and `lsm` (read + generic_file_llseek,
    as the counters), as root and as uid 1000, calls that would change
    anything left out."""
    lsm = securityfs / "lsm"
    if not lsm.exists():
        pytest.skip("this kernel's securityfs has no lsm file")
    others = [p.name for p in securityfs.iterdir() if p.name != "lsm" and p.is_file()]
    nodes = [Node("/", str(securityfs), "dir", stat.S_IMODE(os.stat(securityfs).st_mode), victim=False),
             Node("lsm", str(lsm), "counter", stat.S_IMODE(os.stat(lsm).st_mode),
                  sibling=others[0] if others else None)]
    assert nodes[0].mode == 0o755 and nodes[1].mode == 0o444
    for uid in (0, 1000):
        results = run_walk([n.spec() for n in nodes], uid, skip=WITNESS_SKIP)
        wrong = []
        for n in nodes:
            for op, got in results[n.label].items():
                want = kernel(op, n, uid)
                if got != want:
                    wrong.append(f"{n.label} {op} got {_name(got)} want {_name(want)}")
        assert not wrong, f"uid {uid}:\n" + "\n".join(wrong)
        assert len(all_calls(results)) >= 60


def test_errnos_doc_is_the_rules():
    """docs/errnos.md shows :func:`kernel` and :func:`fuse_forced` as they
    are (regenerate: ``python -m tests.test_walk``)."""
    doc = (Path(__file__).parent.parent / "docs" / "errnos.md").read_text()
    assert errno_table() in doc
    assert deviation_table() in doc


if __name__ == "__main__":
    print(errno_table())
    print(deviation_table())


def test_a_wrong_answer_is_eio_not_the_end(tmp_path, monkeypatch):
    """An operation that answers what pyfuse3 cannot send (issue 9: a
    `create` that fell through to None ended the daemon, as the walk still
    shows if Directory.create answers None) gets EIO and a BUG line."""
    import pyfuse3
    import trio

    from imafs import securityfs
    from imafs.blocking import Runner
    from imafs.ima import Ima
    from imafs.klog import KernelLog
    from imafs.profile import load_profile

    klog = tmp_path / "kmsg"
    ops = securityfs.SecurityFs(securityfs.Tree(Ima(load_profile(None, []), KernelLog(klog))), Runner())
    monkeypatch.setattr(securityfs.Directory, "create", lambda self, name, mode: None)
    monkeypatch.setattr(securityfs.Directory, "lookup", lambda self, name: "not a node")
    for call in (lambda: ops.create(pyfuse3.ROOT_INODE, b"x", 0o644, os.O_CREAT, None),
                 lambda: ops.lookup(pyfuse3.ROOT_INODE, b"integrity", None)):
        with pytest.raises(pyfuse3.FUSEError) as e:
            trio.run(call)
        assert e.value.errno == errno.EIO
    log = klog.read_text()
    assert "BUG: FUSE create failed with TypeError: answered NoneType" in log
    assert "BUG: FUSE lookup failed with AttributeError" in log
    assert trio.run(ops.getattr, pyfuse3.ROOT_INODE, None).st_ino == pyfuse3.ROOT_INODE
