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
from .errors import RequestError
from .fsinfo import FsInfo, fs_info
from .measure import FMODE_EXEC, Measurer, OpenedFile, Task, dentry_path

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
    """The node and handle tables of the measured mounts: the event loop's
    state.  Every system call on a real file is a function of this module,
    run in a worker thread by :class:`MeasuredFs`."""

    def __init__(self, measurer: Measurer, mounts: list[tuple[str, str]]):
        self.measurer = measurer
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[tuple, Node] = {}
        self._next = FIRST_NODE
        self._fs: dict[int, FsInfo] = {}
        self.mounts: list[MeasuredMount] = []
        for i, (src, dst) in enumerate(mounts):
            m = MeasuredMount(os.fsencode(src), os.fsencode(dst), i)
            m.root = self._node(m, os.lstat(m.src), None, b"")  # at start, before the loop
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

    def adopt(self, parent: Node, name: bytes, st: os.stat_result) -> Node:
        """A lookup's result: the node for ``name`` in ``parent``, counted once more."""
        node = self._node(parent.mount, st, parent, name)
        node.lookups += 1
        return node

    def forget(self, nodeid: int, n: int) -> None:
        node = self.nodes.get(nodeid)
        if node is None:
            return
        node.lookups -= n
        if node.lookups <= 0:
            del self.nodes[nodeid]
            del self._by_key[(node.mount.index, *node.key)]

    def alive(self, node: Node) -> Handle | None:
        """An open handle of ``node``'s inode: it lives while open, after its
        last name is gone (its descriptor reached via /proc/PID/fd)."""
        return next((h for h in self.handles.values() if h.file.key == node.key), None)

    def alive_fd(self, node: Node) -> int | None:
        h = self.alive(node)
        return h.fd if h is not None else None

    def attributes_changed(self, key: tuple[int, int], st: os.stat_result) -> None:
        """A setattr through the mount: the open handles of the inode see it."""
        self.measurer.cache.changed()  # the owner, group and mode are in hook decisions
        for h in self.handles.values():
            if h.file.key == key:
                h.file.st = st

    def renamed(self, old_parent: Node, old: bytes, new_parent: Node, new: bytes, flags: int,
                st: os.stat_result, replaced: os.stat_result | None) -> None:
        node = self._by_key.get((old_parent.mount.index, st.st_dev, st.st_ino))
        if node is not None and node.parent is old_parent and node.name == old:
            node.parent, node.name = new_parent, new
        if flags & RENAME_EXCHANGE and replaced is not None:
            other = self._by_key.get((old_parent.mount.index, replaced.st_dev, replaced.st_ino))
            if other is not None and other.parent is new_parent and other.name == new:
                other.parent, other.name = old_parent, old
        elif replaced is not None and not stat.S_ISDIR(replaced.st_mode):
            self.measurer.unlinked((replaced.st_dev, replaced.st_ino), replaced.st_nlink - 1)

    def xattr_changed(self, node: Node, name: bytes, value: bytes | None = None) -> None:
        """``value``: the new value of a set xattr, None for a removed one."""
        if os.fsdecode(name) in MEASURE_XATTRS:
            self.measurer.xattr_changed(node.key, value if name == b"security.ima" else None)

    # -- handles -----------------------------------------------------------------------
    def known_fs(self, st: os.stat_result) -> FsInfo | None:
        """Per device; called from worker threads too (a dict read)."""
        return self._fs.get(st.st_dev)

    def register(self, node: Node, fd: int, st: os.stat_result, fs: FsInfo, flags: int,
                 created: bool = False) -> tuple[int, OpenedFile]:
        """A handle for a real descriptor, and the file as the hooks see it."""
        self._fs[st.st_dev] = fs
        path = self.path(node)
        f = OpenedFile(key=node.key, name=node.mount.recorded(node), st=st, fs=fs,
                       flags=flags, fd=fd, path=os.fsdecode(path), created=created)
        fh = self._fh
        self._fh += 1
        self.handles[fh] = Handle(fd, f)
        return fh, f

    def handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return h

    def closing(self, fh: int) -> Handle:
        """Forget a handle; the caller runs the close hooks and closes its fd."""
        h = self.handles.pop(fh, None)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return h


# -- system calls on the real files: blocking steps ------------------------------------------
def stat_real(path: bytes, alive: int | None) -> os.stat_result:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        if alive is None:
            raise
        return os.fstat(alive)


def setattr_real(path: bytes, fd: int | None, *, size=None, mode=None, uid=None, gid=None,
                 atime_ns=None, mtime_ns=None) -> os.stat_result:
    if size is not None:
        os.truncate(fd if fd is not None else path, size)
    if mode is not None:
        os.chmod(path, stat.S_IMODE(mode), follow_symlinks=False)
    if uid is not None or gid is not None:
        os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid, follow_symlinks=False)
    if atime_ns is not None or mtime_ns is not None:
        st = os.lstat(path)
        os.utime(path, ns=(st.st_atime_ns if atime_ns is None else atime_ns,
                           st.st_mtime_ns if mtime_ns is None else mtime_ns), follow_symlinks=False)
    return os.lstat(path)


def listdir_real(path: bytes) -> list[bytes]:
    return sorted(os.listdir(path))


def _owned(path: bytes, parent: bytes, uid: int, gid: int) -> os.stat_result:
    """A new file belongs to its creator (and to a setgid directory's group)."""
    pst = os.lstat(parent)
    os.chown(path, uid, pst.st_gid if pst.st_mode & stat.S_ISGID else gid, follow_symlinks=False)
    return os.lstat(path)


def mknod_real(parent: bytes, path: bytes, mode: int, rdev: int, uid: int, gid: int) -> os.stat_result:
    os.mknod(path, mode, rdev)
    os.chmod(path, stat.S_IMODE(mode))
    return _owned(path, parent, uid, gid)


def mkdir_real(parent: bytes, path: bytes, mode: int, uid: int, gid: int) -> os.stat_result:
    os.mkdir(path, stat.S_IMODE(mode))
    os.chmod(path, stat.S_IMODE(mode))
    return _owned(path, parent, uid, gid)


def symlink_real(parent: bytes, path: bytes, target: bytes, uid: int, gid: int) -> os.stat_result:
    os.symlink(target, path)
    return _owned(path, parent, uid, gid)


def link_real(src: bytes, dst: bytes) -> os.stat_result:
    os.link(src, dst, follow_symlinks=False)
    return os.lstat(dst)


def unlink_real(path: bytes) -> os.stat_result:
    st = os.lstat(path)
    os.unlink(path)
    return st


def rename_real(src: bytes, dst: bytes, flags: int) -> tuple[os.stat_result, os.stat_result | None]:
    st = os.lstat(src)
    try:
        replaced = os.lstat(dst)
    except FileNotFoundError:
        replaced = None
    if flags:
        _renameat2(src, dst, flags)
    else:
        os.rename(src, dst)
    return st, replaced


def _real_flags(flags: int) -> int:
    # the daemon's own descriptor: no exec marker, no O_DIRECT alignment rules
    return (flags & ~(FMODE_EXEC | os.O_DIRECT | os.O_NOCTTY | os.O_EXCL | os.O_CREAT)) | os.O_CLOEXEC


def _opened_facts(fd: int, path: bytes, known_fs) -> tuple[int, os.stat_result, FsInfo]:
    """The descriptor, its stat, and what the kernel knows of its filesystem
    (``known_fs(st)`` remembers it per device)."""
    try:
        st = os.fstat(fd)
        return fd, st, known_fs(st) or fs_info(os.fsdecode(path))
    except BaseException:
        os.close(fd)
        raise


def open_real(path: bytes, alive: int | None, flags: int, known_fs):
    """Open the real file (through a live descriptor once its last name is
    gone); its descriptor, stat and filesystem."""
    try:
        fd = os.open(path, _real_flags(flags))
    except FileNotFoundError:
        if alive is None:
            raise
        fd = os.open(f"/proc/self/fd/{alive}", _real_flags(flags))
    return _opened_facts(fd, path, known_fs)


def create_real(parent: bytes, path: bytes, mode: int, flags: int, uid: int, gid: int, known_fs):
    fd = os.open(path, _real_flags(flags) | os.O_CREAT, stat.S_IMODE(mode))
    try:
        os.fchmod(fd, stat.S_IMODE(mode))
        _owned(path, parent, uid, gid)
    except BaseException:
        os.close(fd)
        raise
    return _opened_facts(fd, path, known_fs)


def fsync_dir_real(path: bytes, datasync: bool) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        (os.fdatasync if datasync else os.fsync)(fd)
    finally:
        os.close(fd)


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
    of the real system calls, each of which runs in a worker thread."""

    def __init__(self, pt: Passthrough, runner: Runner, attr_timeout: float = 1.0):
        self.pt = pt
        self.runner = runner
        self.io = runner.io
        self.attr_timeout = attr_timeout

    def owns(self, nodeid: int) -> bool:
        return self.pt.owns(nodeid)

    def _entry(self, node: Node, st: os.stat_result) -> pyfuse3.EntryAttributes:
        return stat_entry(node.nodeid, st, self.attr_timeout)

    async def _stat(self, node: Node) -> pyfuse3.EntryAttributes:
        return self._entry(node, await self.io(stat_real, self.pt.path(node), self.pt.alive_fd(node)))

    async def _adopt(self, parent: Node, name: bytes, st: os.stat_result) -> pyfuse3.EntryAttributes:
        return self._entry(self.pt.adopt(parent, name, st), st)

    async def root_entry(self, name: bytes) -> pyfuse3.EntryAttributes | None:
        root = self.pt.root_of(name)
        return None if root is None else await self._stat(root)

    # -- names and attributes ---------------------------------------------------------------
    async def lookup(self, parent: int, name: bytes) -> pyfuse3.EntryAttributes:
        node = self.pt.node(parent)
        if name == b".":
            return await self._stat(node)
        if name == b"..":
            return await self._stat(node.parent or node)
        return await self._adopt(node, name, await self.io(os.lstat, self.pt.child(node, name)))

    def forget(self, nodeid: int, n: int) -> None:
        self.pt.forget(nodeid, n)

    async def getattr(self, nodeid: int) -> pyfuse3.EntryAttributes:
        return await self._stat(self.pt.node(nodeid))

    async def setattr(self, nodeid: int, fh: int | None, change: dict) -> pyfuse3.EntryAttributes:
        node = self.pt.node(nodeid)
        h = self.pt.handles.get(fh) if fh is not None else None
        st = await self.io(functools.partial(setattr_real, self.pt.path(node), h.fd if h else None, **change))
        self.pt.attributes_changed(node.key, st)
        return self._entry(node, st)

    async def readlink(self, nodeid: int) -> bytes:
        return await self.io(os.readlink, self.pt.path(self.pt.node(nodeid)))

    async def mknod(self, parent, name, mode, rdev, ctx):
        p = self.pt.node(parent)
        st = await self.io(mknod_real, self.pt.path(p), self.pt.child(p, name), mode, rdev, ctx.uid, ctx.gid)
        return await self._adopt(p, name, st)

    async def mkdir(self, parent, name, mode, ctx):
        p = self.pt.node(parent)
        st = await self.io(mkdir_real, self.pt.path(p), self.pt.child(p, name), mode, ctx.uid, ctx.gid)
        return await self._adopt(p, name, st)

    async def symlink(self, parent, name, target, ctx):
        p = self.pt.node(parent)
        st = await self.io(symlink_real, self.pt.path(p), self.pt.child(p, name), target, ctx.uid, ctx.gid)
        return await self._adopt(p, name, st)

    async def link(self, nodeid, new_parent, new_name):
        node, p = self.pt.node(nodeid), self.pt.node(new_parent)
        st = await self.io(link_real, self.pt.path(node), self.pt.child(p, new_name))
        return await self._adopt(p, new_name, st)

    async def unlink(self, parent, name) -> None:
        st = await self.io(unlink_real, self.pt.child(self.pt.node(parent), name))
        self.pt.measurer.unlinked((st.st_dev, st.st_ino), st.st_nlink - 1)

    async def rmdir(self, parent, name) -> None:
        await self.io(os.rmdir, self.pt.child(self.pt.node(parent), name))

    async def rename(self, old_parent, old, new_parent, new, flags) -> None:
        op, np = self.pt.node(old_parent), self.pt.node(new_parent)
        st, replaced = await self.io(rename_real, self.pt.child(op, old), self.pt.child(np, new), flags)
        self.pt.renamed(op, old, np, new, flags, st, replaced)

    async def getxattr(self, nodeid, name) -> bytes:
        return await self.io(functools.partial(os.getxattr, self.pt.path(self.pt.node(nodeid)), name,
                                               follow_symlinks=False))

    async def listxattr(self, nodeid) -> list[bytes]:
        names = await self.io(functools.partial(os.listxattr, self.pt.path(self.pt.node(nodeid)),
                                                follow_symlinks=False))
        return [os.fsencode(n) for n in names]

    async def setxattr(self, nodeid, name, value, ctx) -> None:
        node = self.pt.node(nodeid)
        path = self.pt.path(node)
        if name == b"security.ima":
            st = await self.io(os.lstat, path)
            fs = self.pt.known_fs(st) or await self.io(fs_info, os.fsdecode(path))
            where = await self.io(dentry_path, os.fsdecode(path))
            f = OpenedFile(key=node.key, name=node.mount.recorded(node), st=st, fs=fs, path=where)
            self.pt.measurer.check_ima_xattr(value, f, Task.of_pid(ctx.pid, ctx.uid, ctx.gid))
        await self.io(functools.partial(os.setxattr, path, name, value, follow_symlinks=False))
        self.pt.xattr_changed(node, name, value)

    async def removexattr(self, nodeid, name) -> None:
        node = self.pt.node(nodeid)
        await self.io(functools.partial(os.removexattr, self.pt.path(node), name, follow_symlinks=False))
        self.pt.xattr_changed(node, name)

    # -- directories -------------------------------------------------------------------------
    async def opendir(self, nodeid: int) -> int:
        node = self.pt.node(nodeid)
        st = await self.io(stat_real, self.pt.path(node), None)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        return nodeid

    async def readdir(self, fh: int, start_id: int, token) -> None:
        node = self.pt.node(fh)
        path = self.pt.path(node)
        names = await self.io(listdir_real, path)
        wanted = names[start_id:]
        stats = await self.io(_lstat_all, path, wanted)
        for i, (name, st) in enumerate(zip(wanted, stats), start_id):
            if st is None:
                continue  # gone meanwhile
            child = self.pt.adopt(node, name, st)
            if not pyfuse3.readdir_reply(token, name, self._entry(child, st), i + 1):
                self.pt.forget(child.nodeid, 1)
                break

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        await self.io(fsync_dir_real, self.pt.path(self.pt.node(fh)), datasync)

    # -- files ---------------------------------------------------------------------------------
    async def open(self, nodeid: int, flags: int, ctx) -> pyfuse3.FileInfo:
        node = self.pt.node(nodeid)
        opened = await self.io(open_real, self.pt.path(node), self.pt.alive_fd(node), flags, self.pt.known_fs)
        return await self._opened(node, *opened, flags, ctx)

    async def create(self, parent: int, name: bytes, mode: int, flags: int, ctx):
        p = self.pt.node(parent)
        fd, st, fs = await self.io(create_real, self.pt.path(p), self.pt.child(p, name), mode, flags,
                                   ctx.uid, ctx.gid, self.pt.known_fs)
        node = self.pt.adopt(p, name, st)
        return await self._opened(node, fd, st, fs, flags, ctx, created=True), self._entry(node, st)

    async def _opened(self, node: Node, fd: int, st: os.stat_result, fs: FsInfo, flags: int,
                      ctx, created: bool = False) -> pyfuse3.FileInfo:
        """Register the open, then run its hooks: only an appraisal that
        fails in enforce mode fails it (the kernel then releases the file)."""
        fh, f = self.pt.register(node, fd, st, fs, flags, created)
        denied = None
        if stat.S_ISREG(st.st_mode):
            try:
                task = Task.of_pid(ctx.pid, ctx.uid, ctx.gid)
                done = await self.runner.run(self.pt.measurer.file_open(f, task))
                denied = next((d["denied"] for d in done if "denied" in d), None)
            except Exception:
                log.exception("open hooks of %s", os.fsdecode(f.name))
        if denied is not None:
            await self.release(fh)
            raise pyfuse3.FUSEError(denied)
        return pyfuse3.FileInfo(fh=fh, direct_io=bool(flags & os.O_DIRECT))

    async def hook(self, nodeid: int, funcs: list[str], mask: int, task: Task,
                   flags: int) -> tuple[list[dict], bool]:
        """A hook FUSE does not see (mmap, finit_module, kexec_file_load: see
        imafs/supervise.py) on a file of a measured mount, reached by its node
        id (the st_ino the task's descriptor shows), for ``task``, whose
        descriptor was opened with ``flags``.  The file is the open's: same
        iint, same recorded name; its content is read through a live handle
        (the task holds the file open), so a later unlink does not matter.
        Returns the events, and whether the file was decided on the
        attributes of an open with no writer (nothing read from the real file
        but what the hook's work needed: a decision the hook epoch covers)."""
        f, steady = await self._hooked_file(nodeid, flags)

        def steps():  # one path: the hooks of one call run in order, as the kernel's; a denial ends the call
            done = []
            for func in funcs:
                done.append((yield from self.pt.measurer.process(f, task, func, mask)))
                if "denied" in done[-1]:
                    break
            return done
        return await self.runner.run(steps()), steady

    async def mprotect(self, nodeid: int, task: Task) -> int:
        """ima_file_mprotect for a mapping of a file of a measured mount that
        is being made executable: 0 or the errno (EPERM) the call fails with."""
        f, _ = await self._hooked_file(nodeid, os.O_RDONLY)
        return self.pt.measurer.file_mprotect(f, task)

    async def _hooked_file(self, nodeid: int, flags: int) -> tuple[OpenedFile, bool]:
        """The file of a hook the supervisor reports, by its node id, and
        whether its attributes are those of an open with no writer."""
        node = self.pt.nodes.get(nodeid)
        if node is None:
            raise RequestError(f"hook: no file of a measured mount has node {nodeid}")
        name, path = node.mount.recorded(node), self.pt.path(node)
        h = self.pt.alive(node)
        steady = h is not None and not self.pt.measurer.cache.counts(node.key)[1]
        if steady:
            # an open of the inode and no writer: its attributes are those of the open, kept up to
            # date by setattr; no stat in a worker thread
            st, fs = h.file.st, h.file.fs
        else:
            st = await self.io(stat_real, path, h.fd if h else None)
            fs = self.pt.known_fs(st) or await self.io(fs_info, os.fsdecode(path))
        if not stat.S_ISREG(st.st_mode):
            raise RequestError(f"hook: node {nodeid} is not a regular file")
        return OpenedFile(key=node.key, name=name, st=st, fs=fs, flags=flags & ~FMODE_EXEC,
                          fd=h.fd if h else None, path=os.fsdecode(path)), steady

    async def read(self, fh: int, off: int, size: int) -> bytes:
        """From the page cache on the loop if it is all there (RWF_NOWAIT
        never waits), else — a miss, a short read, a filesystem without
        it — in a worker thread: a short answer would be taken for EOF."""
        fd = self.pt.handle(fh).fd
        buf = bytearray(size)
        try:
            if os.preadv(fd, [buf], off, os.RWF_NOWAIT) == size:
                return bytes(buf)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise
        return await self.io(os.pread, fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.io(os.pwrite, self.pt.handle(fh).fd, buf, off)

    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.io(os.fdatasync if datasync else os.fsync, self.pt.handle(fh).fd)

    async def release(self, fh: int) -> None:
        """The close hooks first, before this request yields to any other
        (Measurer.file_close says why); then the descriptor is closed."""
        h = self.pt.closing(fh)
        f = h.file
        rest = None
        if stat.S_ISREG(f.st.st_mode):
            try:
                rest = self.pt.measurer.file_close(f)
                st = os.fstat(h.fd)
                self.pt.measurer.unlinked(f.key, st.st_nlink)
                if f.writer:  # what it wrote: the other opens' attributes (size, times)
                    self.pt.attributes_changed(f.key, st)
            except Exception:  # never fail a close
                log.exception("close hooks of %s", os.fsdecode(f.name))
        try:
            if rest is not None:
                await self.io(rest)
        except OSError as e:
            log.warning("close hooks of %s: security.ima not updated: %s", os.fsdecode(f.name), e.strerror)
        finally:
            await self.io(os.close, h.fd)


def _lstat_all(path: bytes, names: list[bytes]) -> list[os.stat_result | None]:
    out = []
    for name in names:
        try:
            out.append(os.lstat(path + b"/" + name))
        except OSError:
            out.append(None)
    return out
