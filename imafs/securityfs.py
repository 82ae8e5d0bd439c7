"""The securityfs tree of IMA (the kernel's ima_fs.c) and its FUSE front.

:class:`Tree` is a plain object: nodes, modes, readdir order, what each file
reads and how each open and write is answered.  :class:`SecurityFs` is the
thin ``pyfuse3.Operations`` that translates FUSE requests to it.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import time
from dataclasses import dataclass, field

import pyfuse3
import trio

from .errors import FsError
from .ima import Ima
from .measure import Task
from .passthrough import Passthrough
from .staging import MeasureLock, parse_command
from .store import View

S_DIR = stat.S_IFDIR | 0o755
S_LNK = stat.S_IFLNK | 0o444
S_LIST = stat.S_IFREG | 0o440
S_STAGING = stat.S_IFREG | 0o660  # lists with the staging ABI (staging.md §1.3)
S_POLICY = stat.S_IFREG | 0o200
CAP_SYS_ADMIN = 21


def has_cap_sys_admin(pid: int) -> bool:
    """Whether task ``pid`` has CAP_SYS_ADMIN in its effective set."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except OSError:
        pass
    return False


@dataclass(eq=False)
class Node:
    inode: int
    name: str
    mode: int
    kind: str  # dir | symlink | list | count | violations | policy
    parent: "Node | None" = None
    target: str = ""  # symlink target
    view: View | None = None
    staged: bool = False  # a `_staged` twin: shows the staged list
    children: dict[str, "Node"] = field(default_factory=dict)  # in readdir order
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0

    @property
    def nlink(self) -> int:
        if self.kind != "dir":
            return 1
        return 2 + sum(1 for c in self.children.values() if c.kind == "dir")


class OpenFile:
    __slots__ = ("node", "flags", "locked", "session", "policy")

    def __init__(self, node: Node, flags: int, locked: bool | None = None, session=None, policy=None):
        self.node = node
        self.flags = flags
        self.locked = locked  # None: not under the lock; else whether as the writer
        self.session = session  # a policy write session
        self.policy = policy  # the policy it was opened on (a reboot makes a new one)


class Tree:
    """The IMA part of securityfs for one :class:`Ima`, laid out per kernel version."""

    def __init__(self, ima: Ima):
        self.ima = ima
        self._ino = itertools.count(pyfuse3.ROOT_INODE)
        self.nodes: dict[int, Node] = {}
        now = time.time_ns()
        self._now = now
        self.root = self._node("", S_DIR, "dir", None)
        integrity = self._node("integrity", S_DIR, "dir", self.root)
        self._node("ima", S_LNK, "symlink", self.root, target="integrity/ima")
        self.dir = self._node("ima", S_DIR, "dir", integrity)
        self.staging = bool(ima.profile.staging)
        self.lock = MeasureLock()
        self._populate()

    def _node(self, name, mode, kind, parent, **kw) -> Node:
        n = Node(next(self._ino), name, mode, kind, parent, mtime_ns=self._now,
                 ctime_ns=self._now, atime_ns=self._now, **kw)
        self.nodes[n.inode] = n
        if parent is not None:
            parent.children[name] = n
        return n

    def _populate(self) -> None:
        """Create the files in the kernel's order, then store them in readdir
        order, which is the reverse (kernel-observed.md F-1, F-2)."""
        store = self.ima.store
        created: list[tuple] = []
        if self.ima.profile.kernel_version >= (6, 10):
            mode = S_STAGING if self.staging else S_LIST
            suffixes = ("", "_staged") if self.staging else ("",)
            for bank in store.file_banks:
                for suffix in suffixes:
                    for fmt in ("ascii", "binary"):
                        created.append((f"{fmt}_runtime_measurements_{bank}{suffix}", mode, "list",
                                        {"view": store.view(fmt, bank), "staged": bool(suffix)}))
            for suffix in suffixes:
                for fmt in ("binary", "ascii"):
                    created.append((f"{fmt}_runtime_measurements{suffix}", S_LNK, "symlink",
                                    {"target": f"{fmt}_runtime_measurements_sha1{suffix}"}))
        else:
            for fmt in ("binary", "ascii"):
                created.append((f"{fmt}_runtime_measurements", S_LIST, "list",
                                {"view": store.view(fmt, "sha1")}))
        created += [("runtime_measurements_count", S_LIST, "count", {}),
                    ("violations", S_LIST, "violations", {}),
                    ("policy", S_POLICY, "policy", {})]
        for name, mode, kind, kw in reversed(created):
            self._node(name, mode, kind, self.dir, **kw)

    # -- lookups ------------------------------------------------------------------
    def get(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None or not self.visible(node):
            raise FsError(errno.ENOENT)
        if node.kind == "policy":
            node.mode = stat.S_IFREG | self.ima.policy.mode
        return node

    def visible(self, node: Node) -> bool:
        """The policy file is gone after a load on distribution kernels."""
        return node.kind != "policy" or self.ima.policy.present

    def lookup(self, parent: int, name: str) -> Node:
        p = self.get(parent)
        if name == ".":
            return p
        if name == "..":
            return p.parent or p
        child = p.children.get(name)
        if child is None:
            raise FsError(errno.ENOENT)
        return self.get(child.inode)

    def entries(self, node: Node) -> list[tuple[str, Node]]:
        """readdir: ., .., then the children in the kernel's order."""
        return [(".", node), ("..", node.parent or node)] + \
            [(n, c) for n, c in node.children.items() if self.visible(c)]

    # -- file I/O -------------------------------------------------------------------
    def open(self, node: Node, flags: int, pid: int = 0) -> OpenFile:
        acc = flags & os.O_ACCMODE
        if node.kind == "dir":
            raise FsError(errno.EISDIR)
        if node.kind == "list" and self.staging:
            write = acc != os.O_RDONLY
            if write and not has_cap_sys_admin(pid):
                raise FsError(errno.EPERM)
            self.lock.open(write, pid)
            return OpenFile(node, flags, locked=write)
        if node.kind == "policy":
            policy = self.ima.policy
            # FUSE names the task of an open only: the session keeps it for its writes and close
            opener = Task.of_pid(pid, 0, 0).subject()  # (0, 0): the ids of a task already gone
            return OpenFile(node, flags, session=policy.open(flags, has_cap_sys_admin(pid), opener), policy=policy)
        return OpenFile(node, flags)

    def release(self, f: OpenFile) -> None:
        if f.node.kind == "policy":
            f.policy.release(f.session)
        elif f.locked is not None:
            self.lock.release(f.locked)

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        node = f.node
        if node.kind == "list":
            lst = self.ima.store.staged if node.staged else self.ima.store.current
            return lst.read(node.view, offset, size)
        if node.kind in ("count", "violations"):
            value = self.ima.store.current.count if node.kind == "count" else self.ima.store.violations
            return (b"%d\n" % value)[offset:offset + size]
        if node.kind == "policy" and f.session is None:
            return f.policy.read(offset, size)
        raise FsError(errno.EINVAL)

    def write(self, f: OpenFile, offset: int, data: bytes) -> int:
        node = f.node
        if node.kind == "policy" and f.session is not None:
            return f.policy.write(f.session, offset, data)
        if node.kind != "list" or not self.staging:
            raise FsError(errno.EINVAL)  # no write method
        profile = self.ima.profile
        cmd = parse_command(data, node.staged, profile.abi, self.ima.flush_htable, offset)
        if cmd == "A":
            self.ima.stage()
        elif cmd == "D":
            self.ima.delete_staged()
        else:
            self.ima.trim(cmd)
        return len(data)

    def truncate(self, node: Node) -> None:
        """O_TRUNC on a securityfs file: accepted, only the times change (F-4)."""
        now = time.time_ns()
        node.mtime_ns = node.ctime_ns = now


class SecurityFs(pyfuse3.Operations):
    """FUSE requests -> :class:`Tree`."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, tree: Tree, passthrough: Passthrough | None = None, attr_timeout: float = 1.0):
        super().__init__()
        self.tree = tree
        self.pt = passthrough
        self.attr_timeout = attr_timeout
        self._fh = itertools.count(1)
        self.files: dict[int, OpenFile] = {}
        self._wake: trio.Event | None = None  # wakes the reaper

    def _attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        # the policy file can vanish or change mode: never cached
        a.entry_timeout = a.attr_timeout = 0 if node.kind == "policy" else self.attr_timeout
        a.st_mode = node.mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = 0
        a.st_size = len(node.target) if node.kind == "symlink" else 0
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    def _pt_attrs(self, nodeid: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        """Attributes of a real file under a measured mount, under its node id."""
        a = pyfuse3.EntryAttributes()
        for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                     "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(a, name, getattr(st, name))
        a.st_ino = nodeid
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.attr_timeout
        return a

    @staticmethod
    def _call(fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except (FsError, OSError) as e:
            raise pyfuse3.FUSEError(e.errno) from None

    def _is_pt(self, inode: int) -> bool:
        return self.pt is not None and self.pt.owns(inode)

    def _pt_entry(self, fn, *args) -> pyfuse3.EntryAttributes:
        node, st = self._call(fn, *args)
        return self._pt_attrs(node.nodeid, st)

    async def lookup(self, parent_inode, name, ctx=None):
        if self._is_pt(parent_inode):
            if name == b"..":
                node = self._call(self.pt.node, parent_inode)
                parent = node.parent or node
                return self._pt_attrs(parent.nodeid, self._call(self.pt.stat, parent))
            if name == b".":
                return await self.getattr(parent_inode)
            return self._pt_entry(self.pt.entry, self._call(self.pt.node, parent_inode), name)
        if parent_inode == pyfuse3.ROOT_INODE and self.pt is not None:
            root = self.pt.root_of(name)
            if root is not None:
                return self._pt_attrs(root.nodeid, self._call(self.pt.stat, root))
        return self._attrs(self._call(self.tree.lookup, parent_inode, os.fsdecode(name)))

    async def forget(self, inode_list):
        if self.pt is not None:
            for inode, n in inode_list:
                self.pt.forget(inode, n)

    async def getattr(self, inode, ctx=None):
        if self._is_pt(inode):
            return self._pt_attrs(inode, self._call(self.pt.stat, self._call(self.pt.node, inode)))
        return self._attrs(self._call(self.tree.get, inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        if self._is_pt(inode):
            node = self._call(self.pt.node, inode)
            f = fields
            st = self._call(self.pt.setattr, node, fh,
                            size=attr.st_size if f.update_size else None,
                            mode=attr.st_mode if f.update_mode else None,
                            uid=attr.st_uid if f.update_uid else None,
                            gid=attr.st_gid if f.update_gid else None,
                            atime_ns=attr.st_atime_ns if f.update_atime else None,
                            mtime_ns=attr.st_mtime_ns if f.update_mtime else None)
            return self._pt_attrs(inode, st)
        node = self._call(self.tree.get, inode)
        if fields.update_size:
            self.tree.truncate(node)
        if fields.update_mode:
            node.mode = stat.S_IFMT(node.mode) | stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mode or fields.update_uid or fields.update_gid:
            node.ctime_ns = time.time_ns()
        return self._attrs(node)

    async def readlink(self, inode, ctx):
        if self._is_pt(inode):
            return self._call(self.pt.readlink, self._call(self.pt.node, inode))
        node = self._call(self.tree.get, inode)
        if node.kind != "symlink":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(node.target)

    async def opendir(self, inode, ctx):
        if self._is_pt(inode):
            node = self._call(self.pt.node, inode)
            if not stat.S_ISDIR(self._call(self.pt.stat, node).st_mode):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            return inode
        node = self._call(self.tree.get, inode)
        if node.kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        if self._is_pt(fh):
            node = self._call(self.pt.node, fh)
            names = self._call(self.pt.listdir, node)
            for i in range(start_id, len(names)):
                try:
                    child, st = self.pt.entry(node, names[i])
                except OSError:
                    continue  # gone meanwhile
                if not pyfuse3.readdir_reply(token, names[i], self._pt_attrs(child.nodeid, st), i + 1):
                    self.pt.forget(child.nodeid, 1)
                    break
            return
        entries = self.tree.entries(self.tree.get(fh))
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._attrs(child), i + 1):
                break

    async def releasedir(self, fh):
        pass

    # -- measured mounts: names -----------------------------------------------------------
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        return self._pt_entry(self.pt.mknod, self._pt_node(parent_inode), name, mode, rdev, ctx.uid, ctx.gid)

    async def mkdir(self, parent_inode, name, mode, ctx):
        return self._pt_entry(self.pt.mkdir, self._pt_node(parent_inode), name, mode, ctx.uid, ctx.gid)

    async def symlink(self, parent_inode, name, target, ctx):
        return self._pt_entry(self.pt.symlink, self._pt_node(parent_inode), name, target, ctx.uid, ctx.gid)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        return self._pt_entry(self.pt.link, self._pt_node(inode), self._pt_node(new_parent_inode), new_name)

    async def unlink(self, parent_inode, name, ctx):
        self._call(self.pt.unlink, self._pt_node(parent_inode), name)

    async def rmdir(self, parent_inode, name, ctx):
        self._call(self.pt.rmdir, self._pt_node(parent_inode), name)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        self._call(self.pt.rename, self._pt_node(parent_inode_old), name_old,
                   self._pt_node(parent_inode_new), name_new, flags)

    def _pt_node(self, inode: int):
        """A node of a measured mount; the securityfs tree has no such operations."""
        if not self._is_pt(inode):
            raise pyfuse3.FUSEError(errno.EPERM)
        return self._call(self.pt.node, inode)

    async def getxattr(self, inode, name, ctx):
        if not self._is_pt(inode):
            raise pyfuse3.FUSEError(errno.ENODATA)
        return self._call(self.pt.getxattr, self._pt_node(inode), name)

    async def listxattr(self, inode, ctx):
        if not self._is_pt(inode):
            return []
        return [os.fsencode(n) for n in self._call(self.pt.listxattr, self._pt_node(inode))]

    async def setxattr(self, inode, name, value, ctx):
        if not self._is_pt(inode):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self._call(self.pt.setxattr, self._pt_node(inode), name, value)

    async def removexattr(self, inode, name, ctx):
        if not self._is_pt(inode):
            raise pyfuse3.FUSEError(errno.EOPNOTSUPP)
        self._call(self.pt.removexattr, self._pt_node(inode), name)

    # -- files --------------------------------------------------------------------------
    async def create(self, parent_inode, name, mode, flags, ctx):
        task = Task.of_pid(ctx.pid, ctx.uid, ctx.gid)
        fh, node, st = self._call(self.pt.create, self._pt_node(parent_inode), name, mode, flags, task,
                                  ctx.uid, ctx.gid)
        return pyfuse3.FileInfo(fh=fh, direct_io=bool(flags & os.O_DIRECT)), self._pt_attrs(node.nodeid, st)

    async def open(self, inode, flags, ctx):
        if self._is_pt(inode):
            task = Task.of_pid(ctx.pid, ctx.uid, ctx.gid)
            fh = self._call(self.pt.open, self._call(self.pt.node, inode), flags, task)
            return pyfuse3.FileInfo(fh=fh, direct_io=bool(flags & os.O_DIRECT))
        node = self._call(self.tree.get, inode)
        f = self._call(self.tree.open, node, flags, ctx.pid)
        fh = next(self._fh)
        self.files[fh] = f
        if flags & os.O_TRUNC:
            self.tree.truncate(node)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        if self._is_pt(fh):
            return self._call(self.pt.read, fh, off, size)
        return self._call(self.tree.read, self.files[fh], off, size)

    async def write(self, fh, off, buf):
        if self._is_pt(fh):
            return self._call(self.pt.write, fh, off, buf)
        n = self._call(self.tree.write, self.files[fh], off, buf)
        if self.tree.ima.store.graveyard and self._wake is not None:
            self._wake.set()
        return n

    async def reaper(self) -> None:
        """Free deleted records one block at a time between other requests,
        after the write that deleted them has returned (the kernel too frees
        them after releasing the list lock)."""
        while True:
            self._wake = trio.Event()
            await self._wake.wait()
            while self.tree.ima.store.reap():
                await trio.sleep(0)

    async def fsync(self, fh, datasync):
        if self._is_pt(fh):
            self._call(self.pt.fsync, fh, datasync)

    async def release(self, fh):
        if self._is_pt(fh):
            self._call(self.pt.release, fh)
            return
        f = self.files.pop(fh, None)
        if f is not None:
            self.tree.release(f)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s


MOUNT_OPTIONS = ("fsname=securityfs", "subtype=imafs", "allow_other", "default_permissions")
