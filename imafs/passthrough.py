"""Measured mounts: a source directory re-exported through FUSE so that every
open, exec and close of a file there is a hook event.

:class:`Passthrough` is a plain object: the node table (one node per real
inode of each mount, so hard links share one), path bookkeeping, and the file
operations on the real files.  Errors surface as ``OSError`` with the errno
of the real system call.

:class:`MeasuredFs` answers the FUSE operations on those nodes: names and
attributes on the event loop, and every open, read, write, fsync and close
of a real file, and the hashing the hooks do, in worker threads — a FIFO
nobody writes or a file that never ends holds up its own request only.
Opens and closes go through :class:`Measurer`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import logging
import os
import stat
from dataclasses import dataclass

import pyfuse3

from .blocking import Runner
from .fsinfo import FsInfo, fs_info
from .measure import FMODE_EXEC, Measurer, OpenedFile, Task

FIRST_NODE = 1 << 32  # node ids below are the securityfs tree's
HIDDEN_PREFIX = ".imafs-measured-"  # securityfs-root names the bind mounts are made from
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MEASURE_XATTRS = ("security.ima", "security.evm")
log = logging.getLogger(__name__)
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_AT_FDCWD = -100


def _renameat2(old: bytes, new: bytes, flags: int) -> None:
    if _libc.renameat2(_AT_FDCWD, old, _AT_FDCWD, new, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Node:
    """A real inode seen through a measured mount, by the link it was last reached by."""

    __slots__ = ("nodeid", "mount", "key", "parent", "name", "lookups")

    def __init__(self, nodeid: int, mount: "MeasuredMount", key, parent: "Node | None", name: bytes):
        self.nodeid = nodeid
        self.mount = mount
        self.key = key
        self.parent = parent
        self.name = name
        self.lookups = 0

    def relpath(self) -> bytes:
        parts = []
        node = self
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return b"/".join(reversed(parts))


@dataclass
class MeasuredMount:
    src: bytes  # the real directory
    dst: bytes  # where it is seen: the names recorded in the list
    index: int
    root: Node | None = None

    def source(self, node: Node) -> bytes:
        rel = node.relpath()
        return self.src + b"/" + rel if rel else self.src

    def recorded(self, node: Node, name: bytes | None = None) -> bytes:
        rel = node.relpath()
        if name is not None:
            rel = rel + b"/" + name if rel else name
        return self.dst.rstrip(b"/") + b"/" + rel if rel else self.dst


class Handle:
    """One open of a real file."""

    __slots__ = ("fd", "file")

    def __init__(self, fd: int, file: OpenedFile):
        self.fd = fd
        self.file = file


class Passthrough:
    def __init__(self, measurer: Measurer, mounts: list[tuple[str, str]]):
        self.measurer = measurer
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple, Node] = {}
        self._next = FIRST_NODE
        self._fs: dict[int, FsInfo] = {}
        self.mounts: list[MeasuredMount] = []
        for i, (src, dst) in enumerate(mounts):
            m = MeasuredMount(os.fsencode(src), os.fsencode(dst), i)
            st = os.lstat(m.src)
            m.root = self._node(m, st, None, b"")
            m.root.lookups = 1 << 62  # never forgotten
            self.mounts.append(m)
        self.handles: dict[int, Handle] = {}
        self._fh = FIRST_NODE  # handles share the node ids' range: the FUSE front tells them apart

    # -- nodes -------------------------------------------------------------------------
    def owns(self, nodeid: int) -> bool:
        return nodeid >= FIRST_NODE

    def root_of(self, name: bytes) -> Node | None:
        """The root of a measured mount from its hidden name in the securityfs root."""
        text = os.fsdecode(name)
        if text.startswith(HIDDEN_PREFIX) and text[len(HIDDEN_PREFIX):].isdigit():
            i = int(text[len(HIDDEN_PREFIX):])
            if i < len(self.mounts):
                return self.mounts[i].root
        return None

    def _node(self, mount: MeasuredMount, st: os.stat_result, parent: Node | None, name: bytes) -> Node:
        key = (mount.index, st.st_dev, st.st_ino)
        node = self._by_key.get(key)
        if node is None:
            node = Node(self._next, mount, (st.st_dev, st.st_ino), parent, name)
            self._next += 1
            self.nodes[node.nodeid] = node
            self._by_key[key] = node
        elif parent is not None:
            node.parent, node.name = parent, name  # the link it is now reached by
        return node

    def node(self, nodeid: int) -> Node:
        node = self.nodes.get(nodeid)
        if node is None:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE))
        return node

    def path(self, node: Node) -> bytes:
        return node.mount.source(node)

    def child(self, parent: Node, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name

    def entry(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """A lookup: the node for ``name`` in ``parent``, counted once more."""
        st = os.lstat(self.child(parent, name))
        node = self._node(parent.mount, st, parent, name)
        node.lookups += 1
        return node, st

    def forget(self, nodeid: int, n: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None:
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self.nodes[nodeid]
            del self._by_key[(node.mount.index, *node.key)]

    def stat(self, node: Node) -> os.stat_result:
        try:
            return os.lstat(self.path(node))
        except FileNotFoundError:
            return os.fstat(self._alive(node).fd)

    def _alive(self, node: Node) -> "Handle":
        """An open handle of an inode whose last name is gone (it lives while open)."""
        alive = next((h for h in self.handles.values() if h.file.key == node.key), None)
        if alive is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        return alive

    def fs(self, st: os.stat_result, path: bytes) -> FsInfo:
        """What the kernel knows of the real file's filesystem, per device."""
        info = self._fs.get(st.st_dev)
        if info is None:
            info = self._fs[st.st_dev] = fs_info(os.fsdecode(path))
        return info

    # -- metadata ------------------------------------------------------------------------
    @staticmethod
    def setattr(path: bytes, fd: int | None, *, size=None, mode=None, uid=None, gid=None,
                atime_ns=None, mtime_ns=None) -> os.stat_result:
        """Blocking (a truncate may take long): the caller resolves ``path``
        and the open's ``fd``, if any, on the loop."""
        target = fd if fd is not None else path
        if size is not None:
            os.truncate(target, size)
        if mode is not None:
            os.chmod(path, stat.S_IMODE(mode), follow_symlinks=False)
        if uid is not None or gid is not None:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
        if atime_ns is not None or mtime_ns is not None:
            st = os.lstat(path)
            os.utime(path, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                               st.st_mtime_ns if mtime_ns is None else mtime_ns), follow_symlinks=False)
        return os.lstat(path)

    def readlink(self, node: Node) -> bytes:
        return os.readlink(self.path(node))

    @staticmethod
    def listdir(path: bytes) -> list[bytes]:
        return sorted(os.listdir(path))

    # -- names ---------------------------------------------------------------------------
    def _owned(self, path: bytes, parent: Node, uid: int, gid: int) -> None:
        """A new file belongs to its creator (and to a setgid directory's group)."""
        pst = os.lstat(self.path(parent))
        os.chown(path, uid, pst.st_gid if pst.st_mode & stat.S_ISGID else gid, follow_symlinks=False)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        path = self.child(parent, name)
        os.mknod(path, mode, rdev)
        os.chmod(path, stat.S_IMODE(mode))
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int):
        path = self.child(parent, name)
        os.mkdir(path, stat.S_IMODE(mode))
        os.chmod(path, stat.S_IMODE(mode))
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int):
        path = self.child(parent, name)
        os.symlink(target, path)
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def link(self, node: Node, parent: Node, name: bytes):
        os.link(self.path(node), self.child(parent, name), follow_symlinks=False)
        return self.entry(parent, name)

    def unlink(self, parent: Node, name: bytes) -> None:
        path = self.child(parent, name)
        st = os.lstat(path)
        os.unlink(path)
        self.measurer.unlinked((st.st_dev, st.st_ino), st.st_nlink - 1)

    def rmdir(self, parent: Node, name: bytes) -> None:
        os.rmdir(self.child(parent, name))

    def rename(self, old_parent: Node, old: bytes, new_parent: Node, new: bytes, flags: int) -> None:
        src, dst = self.child(old_parent, old), self.child(new_parent, new)
        st = os.lstat(src)
        try:
            replaced = os.lstat(dst)
        except FileNotFoundError:
            replaced = None
        if flags:
            _renameat2(src, dst, flags)
        else:
            os.rename(src, dst)
        node = self._by_key.get((old_parent.mount.index, st.st_dev, st.st_ino))
        if node is not None and node.parent is old_parent and node.name == old:
            node.parent, node.name = new_parent, new
        if flags & RENAME_EXCHANGE and replaced is not None:
            other = self._by_key.get((old_parent.mount.index, replaced.st_dev, replaced.st_ino))
            if other is not None and other.parent is new_parent and other.name == new:
                other.parent, other.name = old_parent, old
        elif replaced is not None and not stat.S_ISDIR(replaced.st_mode):
            self.measurer.unlinked((replaced.st_dev, replaced.st_ino), replaced.st_nlink - 1)

    # -- xattrs --------------------------------------------------------------------------
    def getxattr(self, node: Node, name: bytes) -> bytes:
        return os.getxattr(self.path(node), name, follow_symlinks=False)

    def listxattr(self, node: Node) -> list[str]:
        return os.listxattr(self.path(node), follow_symlinks=False)

    def setxattr(self, node: Node, name: bytes, value: bytes) -> None:
        os.setxattr(self.path(node), name, value, follow_symlinks=False)
        self._xattr_changed(node, name)

    def removexattr(self, node: Node, name: bytes) -> None:
        os.removexattr(self.path(node), name, follow_symlinks=False)
        self._xattr_changed(node, name)

    def _xattr_changed(self, node: Node, name: bytes) -> None:
        if os.fsdecode(name) in MEASURE_XATTRS:
            self.measurer.xattr_changed(node.key)

    # -- file I/O: blocking steps are static; the tables change on the loop --------------
    def open_source(self, node: Node) -> tuple[bytes, int | None]:
        """The path to open, and the descriptor of an open handle of the same
        inode to open through if the path is gone (reached via /proc/PID/fd)."""
        path = self.path(node)
        try:
            alive = self._alive(node).fd
        except FileNotFoundError:
            alive = None
        return path, alive

    @classmethod
    def open_real(cls, path: bytes, alive: int | None, flags: int) -> int:
        try:
            return os.open(path, cls._real_flags(flags))
        except FileNotFoundError:  # reached through /proc/PID/fd after unlink
            if alive is None:
                raise
            return os.open(f"/proc/self/fd/{alive}", cls._real_flags(flags))

    @classmethod
    def create_real(cls, path: bytes, mode: int, flags: int) -> int:
        return os.open(path, cls._real_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))

    def created(self, parent: Node, name: bytes, fd: int, mode: int, uid: int, gid: int):
        """The new file belongs to its creator; the node for it."""
        try:
            os.fchmod(fd, stat.S_IMODE(mode))
            self._owned(self.child(parent, name), parent, uid, gid)
            return self.entry(parent, name)
        except OSError:
            os.close(fd)
            raise

    @staticmethod
    def _real_flags(flags: int) -> int:
        # the daemon's own descriptor: no exec marker, no O_DIRECT alignment rules
        return (flags & ~(FMODE_EXEC | os.O_DIRECT | os.O_NOCTTY | os.O_EXCL | os.O_CREAT)) | os.O_CLOEXEC

    def register(self, node: Node, fd: int, flags: int) -> tuple[int, OpenedFile]:
        """A handle for a real descriptor, and the file as the hooks see it."""
        st = os.fstat(fd)
        path = self.path(node)
        f = OpenedFile(key=node.key, name=node.mount.recorded(node), st=st, fs=self.fs(st, path),
                       flags=flags, fd=fd, path=os.fsdecode(path))
        fh = self._fh
        self._fh += 1
        self.handles[fh] = Handle(fd, f)
        return fh, f

    def handle(self, fh: int) -> "Handle":
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return h

    def closing(self, fh: int) -> Handle:
        """Forget a handle and run the close hooks; the caller closes its fd."""
        h = self.handles.pop(fh, None)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        try:
            if stat.S_ISREG(h.file.st.st_mode):
                self.measurer.file_close(h.file)
                self.measurer.unlinked(h.file.key, os.fstat(h.fd).st_nlink)
        except Exception:  # never fail a close
            log.exception("close hooks of %s", os.fsdecode(h.file.name))
        return h


def stat_entry(nodeid: int, st: os.stat_result, timeout: float) -> pyfuse3.EntryAttributes:
    """Attributes of a real file under a measured mount, under its node id."""
    a = pyfuse3.EntryAttributes()
    for name in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size", "st_blksize",
                 "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
        setattr(a, name, getattr(st, name))
    a.st_ino = nodeid
    a.generation = 0
    a.entry_timeout = a.attr_timeout = timeout
    return a


class MeasuredFs:
    """The FUSE operations on the nodes of measured mounts, with the errnos
    of the real system calls."""

    def __init__(self, pt: Passthrough, runner: Runner, attr_timeout: float = 1.0):
        self.pt = pt
        self.runner = runner
        self.attr_timeout = attr_timeout

    def owns(self, nodeid: int) -> bool:
        return self.pt.owns(nodeid)

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        return stat_entry(node.nodeid, st, self.attr_timeout)

    def root_entry(self, name: bytes) -> pyfuse3.EntryAttributes | None:
        root = self.pt.root_of(name)
        return None if root is None else self._entry(root, self.pt.stat(root))

    # -- names and attributes: on the loop -------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        node = self.pt.node(parent)
        if name == b".":
            return self._entry(node, self.pt.stat(node))
        if name == b"..":
            up = node.parent or node
            return self._entry(up, self.pt.stat(up))
        return self._entry(*self.pt.entry(node, name))

    def forget(self, nodeid: int, n: int) -> None:
        self.pt.forget(nodeid, n)

    async def getattr(self, nodeid: int) -> pyfuse3.EntryAttributes:
        node = self.pt.node(nodeid)
        return self._entry(node, self.pt.stat(node))

    async def setattr(self, nodeid: int, fh: int | None, change: dict) -> pyfuse3.EntryAttributes:
        node = self.pt.node(nodeid)
        h = self.pt.handles.get(fh) if fh is not None else None
        st = await self.runner.io(functools.partial(self.pt.setattr, self.pt.path(node),
                                                    h.fd if h else None, **change))
        return self._entry(node, st)

    async def readlink(self, nodeid: int) -> bytes:
        return self.pt.readlink(self.pt.node(nodeid))

    async def mknod(self, parent, name, mode, rdev, ctx):
        return self._entry(*self.pt.mknod(self.pt.node(parent), name, mode, rdev, ctx.uid, ctx.gid))

    async def mkdir(self, parent, name, mode, ctx):
        return self._entry(*self.pt.mkdir(self.pt.node(parent), name, mode, ctx.uid, ctx.gid))

    async def symlink(self, parent, name, target, ctx):
        return self._entry(*self.pt.symlink(self.pt.node(parent), name, target, ctx.uid, ctx.gid))

    async def link(self, nodeid, new_parent, new_name):
        return self._entry(*self.pt.link(self.pt.node(nodeid), self.pt.node(new_parent), new_name))

    async def unlink(self, parent, name) -> None:
        self.pt.unlink(self.pt.node(parent), name)

    async def rmdir(self, parent, name) -> None:
        self.pt.rmdir(self.pt.node(parent), name)

    async def rename(self, old_parent, old, new_parent, new, flags) -> None:
        self.pt.rename(self.pt.node(old_parent), old, self.pt.node(new_parent), new, flags)

    async def getxattr(self, nodeid, name) -> bytes:
        return self.pt.getxattr(self.pt.node(nodeid), name)

    async def listxattr(self, nodeid) -> list[bytes]:
        return [os.fsencode(n) for n in self.pt.listxattr(self.pt.node(nodeid))]

    async def setxattr(self, nodeid, name, value) -> None:
        self.pt.setxattr(self.pt.node(nodeid), name, value)

    async def removexattr(self, nodeid, name) -> None:
        self.pt.removexattr(self.pt.node(nodeid), name)

    # -- directories -------------------------------------------------------------------------
    async def opendir(self, nodeid: int) -> int:
        node = self.pt.node(nodeid)
        if not stat.S_ISDIR(self.pt.stat(node).st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return nodeid

    async def readdir(self, fh: int, start_id: int, token) -> None:
        node = self.pt.node(fh)
        names = await self.runner.io(self.pt.listdir, self.pt.path(node))
        for i in range(start_id, len(names)):
            try:
                child, st = self.pt.entry(node, names[i])
            except OSError:
                continue  # gone meanwhile
            if not pyfuse3.readdir_reply(token, names[i], self._entry(child, st), i + 1):
                self.pt.forget(child.nodeid, 1)
                break

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.runner.io(_fsync_path, self.pt.path(self.pt.node(fh)), datasync)

    # -- files ---------------------------------------------------------------------------------
    async def open(self, nodeid: int, flags: int, ctx) -> pyfuse3.FileInfo:
        node = self.pt.node(nodeid)
        path, alive = self.pt.open_source(node)
        fd = await self.runner.io(self.pt.open_real, path, alive, flags)
        return await self._opened(node, fd, flags, ctx)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx):
        parent_node = self.pt.node(parent)
        fd = await self.runner.io(self.pt.create_real, self.pt.child(parent_node, name), mode, flags)
        node, st = self.pt.created(parent_node, name, fd, mode, ctx.uid, ctx.gid)
        return await self._opened(node, fd, flags, ctx), self._entry(node, st)

    async def _opened(self, node: Node, fd: int, flags: int, ctx) -> pyfuse3.FileInfo:
        """Register the open, then run its hooks: they never fail it."""
        try:
            fh, f = self.pt.register(node, fd, flags)
        except OSError:
            os.close(fd)
            raise
        if stat.S_ISREG(f.st.st_mode):
            try:
                task = Task.of_pid(ctx.pid, ctx.uid, ctx.gid)
                await self.runner.run(self.pt.measurer.file_open(f, task))
            except Exception:
                log.exception("open hooks of %s", os.fsdecode(f.name))
        return pyfuse3.FileInfo(fh=fh, direct_io=bool(flags & os.O_DIRECT))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.runner.io(os.pread, self.pt.handle(fh).fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.runner.io(os.pwrite, self.pt.handle(fh).fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.runner.io(os.fdatasync if datasync else os.fsync, self.pt.handle(fh).fd)

    async def release(self, fh: int) -> None:
        h = self.pt.closing(fh)
        await self.runner.io(os.close, h.fd)


def _fsync_path(path: bytes, datasync: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)
