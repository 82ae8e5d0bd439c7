"""Measured mounts: a source directory re-exported through FUSE so that every
open, exec and close of a file there is a hook event.

:class:`Passthrough` is a plain object: the node table (one node per real
inode of each mount, so hard links share one), path bookkeeping, and the file
operations on the real files.  Errors surface as ``OSError`` with the errno
of the real system call.  Opens and closes go through :class:`Measurer`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from dataclasses import dataclass

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

    def _child(self, parent: Node, name: bytes) -> bytes:
        return self.path(parent) + b"/" + name

    def entry(self, parent: Node, name: bytes) -> tuple[Node, os.stat_result]:
        """A lookup: the node for ``name`` in ``parent``, counted once more."""
        st = os.lstat(self._child(parent, name))
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
    def setattr(self, node: Node, fh: int | None, *, size=None, mode=None, uid=None, gid=None,
                atime_ns=None, mtime_ns=None) -> os.stat_result:
        path = self.path(node)
        target = self.handles[fh].fd if fh in self.handles else path
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

    def listdir(self, node: Node) -> list[bytes]:
        return sorted(os.listdir(self.path(node)))

    def statvfs(self, node: Node) -> os.statvfs_result:
        return os.statvfs(self.path(node))

    # -- names ---------------------------------------------------------------------------
    def _owned(self, path: bytes, parent: Node, uid: int, gid: int) -> None:
        """A new file belongs to its creator (and to a setgid directory's group)."""
        pst = os.lstat(self.path(parent))
        os.chown(path, uid, pst.st_gid if pst.st_mode & stat.S_ISGID else gid, follow_symlinks=False)

    def mknod(self, parent: Node, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        path = self._child(parent, name)
        os.mknod(path, mode, rdev)
        os.chmod(path, stat.S_IMODE(mode))
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def mkdir(self, parent: Node, name: bytes, mode: int, uid: int, gid: int):
        path = self._child(parent, name)
        os.mkdir(path, stat.S_IMODE(mode))
        os.chmod(path, stat.S_IMODE(mode))
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def symlink(self, parent: Node, name: bytes, target: bytes, uid: int, gid: int):
        path = self._child(parent, name)
        os.symlink(target, path)
        self._owned(path, parent, uid, gid)
        return self.entry(parent, name)

    def link(self, node: Node, parent: Node, name: bytes):
        os.link(self.path(node), self._child(parent, name), follow_symlinks=False)
        return self.entry(parent, name)

    def unlink(self, parent: Node, name: bytes) -> None:
        path = self._child(parent, name)
        st = os.lstat(path)
        os.unlink(path)
        self.measurer.unlinked((st.st_dev, st.st_ino), st.st_nlink - 1)

    def rmdir(self, parent: Node, name: bytes) -> None:
        os.rmdir(self._child(parent, name))

    def rename(self, old_parent: Node, old: bytes, new_parent: Node, new: bytes, flags: int) -> None:
        src, dst = self._child(old_parent, old), self._child(new_parent, new)
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

    # -- file I/O -----------------------------------------------------------------------
    def open(self, node: Node, flags: int, task: Task) -> int:
        """Open the real file, then run the open's hooks; returns a handle."""
        path = self.path(node)
        try:
            fd = os.open(path, self._real_flags(flags))
        except FileNotFoundError:  # reached through /proc/PID/fd after unlink
            fd = os.open(f"/proc/self/fd/{self._alive(node).fd}", self._real_flags(flags))
        return self._opened(node, path, fd, flags, task)

    def create(self, parent: Node, name: bytes, mode: int, flags: int, task: Task, uid: int, gid: int):
        path = self._child(parent, name)
        fd = os.open(path, self._real_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))
        try:
            os.fchmod(fd, stat.S_IMODE(mode))
            self._owned(path, parent, uid, gid)
            node, st = self.entry(parent, name)
        except OSError:
            os.close(fd)
            raise
        return self._opened(node, path, fd, flags, task), node, st

    @staticmethod
    def _real_flags(flags: int) -> int:
        # the daemon's own descriptor: no exec marker, no O_DIRECT alignment rules
        return (flags & ~(FMODE_EXEC | os.O_DIRECT | os.O_NOCTTY | os.O_EXCL | os.O_CREAT)) | os.O_CLOEXEC

    def _opened(self, node: Node, path: bytes, fd: int, flags: int, task: Task) -> int:
        st = os.fstat(fd)
        f = OpenedFile(key=node.key, name=node.mount.recorded(node), st=st, fs=self.fs(st, path),
                       flags=flags, fd=fd, path=os.fsdecode(path))
        fh = self._fh
        self._fh += 1
        self.handles[fh] = Handle(fd, f)
        if stat.S_ISREG(st.st_mode):
            try:
                self.measurer.file_open(f, task)
            except Exception:  # a bug must not take the mount down: the open goes on
                log.exception("open hooks of %s", os.fsdecode(f.name))
        return fh

    def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    def write(self, fh: int, off: int, buf: bytes) -> int:
        return os.pwrite(self.handles[fh].fd, buf, off)

    def fsync(self, fh: int, datasync: bool) -> None:
        (os.fdatasync if datasync else os.fsync)(self.handles[fh].fd)

    def release(self, fh: int) -> None:
        h = self.handles.pop(fh)
        try:
            if stat.S_ISREG(h.file.st.st_mode):
                self.measurer.file_close(h.file)
                self.measurer.unlinked(h.file.key, os.fstat(h.fd).st_nlink)
        except Exception:  # as in open: never fail a close
            log.exception("close hooks of %s", os.fsdecode(h.file.name))
        finally:
            os.close(h.fd)
