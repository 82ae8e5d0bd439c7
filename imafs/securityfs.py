"""The securityfs tree of IMA (the kernel's ima_fs.c) and its FUSE front.

:class:`Tree` is a plain object: one small class per kind of securityfs
inode, as the kernel gives each file its own ``file_operations`` and every
directory ``simple_dir_inode_operations`` (``lookup`` and nothing else).
:class:`Node`, the base, answers every operation as the VFS answers for an
inode that lacks it (docs/errnos.md): ``vfs_create`` → EACCES, ``vfs_mkdir``,
``vfs_unlink``, … → EPERM, ``vfs_fsync`` → EINVAL, no xattr handler →
EOPNOTSUPP; attributes change as ``simple_setattr`` changes them.  A kind of
node overrides what its kernel file has.

:class:`SecurityFs` is the ``pyfuse3.Operations``: it finds the owner of a
request's node — this tree, or the measured mounts (:mod:`imafs.passthrough`)
— and calls it.  It is also where no request can end the daemon: an errno
goes back as the kernel's answer, anything unexpected as EIO with its
traceback in the emulated kernel's log.
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import logging
import os
import stat
import time
import traceback

import pyfuse3
import trio

from .blocking import Runner, Steps, no_steps
from .errors import FsError
from .ima import Ima
from .measure import Task
from .passthrough import MeasuredFs
from .staging import MeasureLock, parse_command
from .store import View

S_DIR = stat.S_IFDIR | 0o755
S_LNK = stat.S_IFLNK | 0o444
S_LIST = stat.S_IFREG | 0o440
S_STAGING = stat.S_IFREG | 0o660  # lists with the staging ABI (staging.md §1.3)
CAP_SYS_ADMIN = 21
log = logging.getLogger(__name__)


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


def _refuse(err: int):
    raise FsError(err)


class OpenFile:
    """One open of a securityfs file (the kernel's struct file)."""

    __slots__ = ("node", "flags", "locked", "session", "policy")

    def __init__(self, node: "Node", flags: int, locked: bool | None = None, session=None, policy=None):
        self.node = node
        self.flags = flags
        self.locked = locked  # None: not under the list lock; else whether as the writer
        self.session = session  # a policy write session
        self.policy = policy  # the policy it was opened on (a reboot makes a new one)


class Node:
    """A securityfs inode without operations of its own: every request gets
    the errno the kernel's VFS gives for an operation the inode lacks."""

    __slots__ = ("tree", "inode", "name", "mode", "parent", "uid", "gid", "size",
                 "atime_ns", "mtime_ns", "ctime_ns")

    def __init__(self, tree: "Tree", inode: int, name: str, mode: int, parent: "Directory | None"):
        self.tree = tree
        self.inode = inode
        self.name = name
        self.mode = mode
        self.parent = parent
        self.uid = self.gid = self.size = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = tree.born_ns

    @property
    def nlink(self) -> int:
        return 1

    @property
    def visible(self) -> bool:
        return True

    @property
    def stat_mode(self) -> int:
        return self.mode

    # -- attributes: simple_setattr, as for every securityfs inode --------------------
    def setattr(self, *, size=None, mode=None, uid=None, gid=None, atime_ns=None, mtime_ns=None) -> None:
        now = time.time_ns()
        if size is not None:
            if stat.S_ISDIR(self.mode):
                raise FsError(errno.EISDIR)
            self.size = size
            self.mtime_ns = self.ctime_ns = now
        if mode is not None:
            self.mode = stat.S_IFMT(self.mode) | stat.S_IMODE(mode)
        if uid is not None:
            self.uid = uid
        if gid is not None:
            self.gid = gid
        if mtime_ns is not None:
            self.mtime_ns = mtime_ns
        if atime_ns is not None:
            self.atime_ns = atime_ns
        if mode is not None or uid is not None or gid is not None or atime_ns is not None \
                or mtime_ns is not None:
            self.ctime_ns = now

    def readlink(self) -> bytes:
        raise FsError(errno.EINVAL)

    # -- xattrs: securityfs has no handlers, and no LSM here gives it a label ----------
    def getxattr(self, name: bytes) -> bytes:
        raise FsError(errno.EOPNOTSUPP)

    def setxattr(self, name: bytes, value: bytes) -> None:
        raise FsError(errno.EOPNOTSUPP)

    def removexattr(self, name: bytes) -> None:
        raise FsError(errno.EOPNOTSUPP)

    def listxattr(self) -> list[bytes]:
        return []

    # -- as a directory: this inode is none ------------------------------------------------
    def lookup(self, name: str) -> "Node":
        raise FsError(errno.ENOTDIR)

    def entries(self) -> list[tuple[str, "Node"]]:
        raise FsError(errno.ENOTDIR)

    create = mknod = mkdir = symlink = link = unlink = rmdir = rename = \
        lambda self, *a, **kw: _refuse(errno.ENOTDIR)

    # -- as a file ---------------------------------------------------------------------
    def open(self, flags: int, pid: int) -> OpenFile:
        return OpenFile(self, flags)

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        raise FsError(errno.EINVAL)  # no read method

    @no_steps
    def write(self, f: OpenFile, offset: int, data: bytes) -> Steps[int]:
        raise FsError(errno.EINVAL)  # no write method

    def fsync(self, f: OpenFile) -> None:
        raise FsError(errno.EINVAL)  # no fsync method

    def release(self, f: OpenFile) -> None:
        pass


class Directory(Node):
    """simple_dir_inode_operations: lookup; creating or removing names is
    refused as vfs_create (EACCES) and vfs_mkdir/mknod/symlink/link/unlink/
    rmdir/rename (EPERM) refuse it."""

    __slots__ = ("children",)

    def __init__(self, *args):
        super().__init__(*args)
        self.children: dict[str, Node] = {}  # in readdir order

    @property
    def nlink(self) -> int:
        return 2 + sum(1 for c in self.children.values() if isinstance(c, Directory))

    def lookup(self, name: str) -> Node:
        if name == ".":
            return self
        if name == "..":
            return self.parent or self
        child = self.children.get(name)
        if child is None or not child.visible:
            raise FsError(errno.ENOENT)
        return child

    def entries(self) -> list[tuple[str, Node]]:
        """readdir: ., .., then the children in the kernel's order."""
        return [(".", self), ("..", self.parent or self)] + \
            [(n, c) for n, c in self.children.items() if c.visible]

    def create(self, name: str, mode: int) -> None:
        raise FsError(errno.EACCES)  # vfs_create: no ->create

    def mknod(self, name: str, mode: int) -> None:
        # mknod(2) of a regular file is vfs_create; of anything else vfs_mknod
        raise FsError(errno.EACCES if stat.S_ISREG(mode) or not stat.S_IFMT(mode) else errno.EPERM)

    mkdir = symlink = link = unlink = rmdir = rename = lambda self, *a, **kw: _refuse(errno.EPERM)

    def open(self, flags: int, pid: int) -> OpenFile:
        raise FsError(errno.EISDIR)

    def fsync(self, f: OpenFile) -> None:
        pass  # simple_dir_operations: noop_fsync


class Root(Directory):
    """The securityfs root: also names reached by lookup only (the views of
    :mod:`imafs.views`), never listed."""

    __slots__ = ("hidden",)

    def __init__(self, *args):
        super().__init__(*args)
        self.hidden: dict[str, Node] = {}

    def lookup(self, name: str) -> Node:
        hidden = self.hidden.get(name)
        return hidden if hidden is not None else super().lookup(name)


class Symlink(Node):
    __slots__ = ("target",)

    def __init__(self, *args, target: str):
        super().__init__(*args)
        self.target = target
        self.size = len(os.fsencode(target))

    def readlink(self) -> bytes:
        return os.fsencode(self.target)


class ListFile(Node):
    """A measurement list (ima_measurements_ops and the ASCII twin); with the
    staging ABI a `_staged` twin and A/D/N commands (staging.md §1)."""

    __slots__ = ("view", "staged")

    def __init__(self, *args, view: View, staged: bool):
        super().__init__(*args)
        self.view = view
        self.staged = staged

    def open(self, flags: int, pid: int) -> OpenFile:
        tree = self.tree
        if not tree.staging:
            return OpenFile(self, flags)
        write = flags & os.O_ACCMODE != os.O_RDONLY
        if write and not has_cap_sys_admin(pid):
            raise FsError(errno.EPERM)
        tree.lock.open(write, pid)
        return OpenFile(self, flags, locked=write)

    def release(self, f: OpenFile) -> None:
        if f.locked is not None:
            self.tree.lock.release(f.locked)

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        store = self.tree.ima.store
        return (store.staged if self.staged else store.current).read(self.view, offset, size)

    @no_steps
    def write(self, f: OpenFile, offset: int, data: bytes) -> Steps[int]:
        tree = self.tree
        if not tree.staging:
            raise FsError(errno.EINVAL)  # no write method
        ima = tree.ima
        cmd = parse_command(data, self.staged, ima.profile.abi, ima.flush_htable, offset)
        if cmd == "A":
            ima.stage()
        elif cmd == "D":
            ima.delete_staged()
        else:
            ima.trim(cmd)
        return len(data)


class CounterFile(Node):
    """runtime_measurements_count or violations: one decimal line."""

    __slots__ = ("value",)

    def __init__(self, *args, value):
        super().__init__(*args)
        self.value = value  # () -> int

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        return (b"%d\n" % self.value())[offset:offset + size]


class StaticFile(Node):
    """A read-only file whose bytes are fixed at boot: tpm0/binary_bios_measurements
    (the TPM's boot event log, tpm_bios_measurements_ops, mode 0440) and the
    kernel views of imafs run (cmdline, osrelease, tpm_version_major)."""

    __slots__ = ("data",)

    def __init__(self, *args, data: bytes):
        super().__init__(*args)
        self.data = data

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        return self.data[offset:offset + size]


class PolicyNode(Node):
    """The `policy` file: each boot makes it anew with the policy's mode; a
    load takes away its write bit (READ_POLICY alone) or the file itself."""

    __slots__ = ("chmod",)

    def __init__(self, *args):
        super().__init__(*args)
        self.chmod = None  # (the policy it was made for, the mode a chmod gave it)

    @property
    def visible(self) -> bool:
        return self.tree.ima.policy.present

    @property
    def stat_mode(self) -> int:
        policy = self.tree.ima.policy
        if self.chmod is None or self.chmod[0] is not policy:
            return stat.S_IFREG | policy.mode
        return self.chmod[1] & ~(0 if policy.writable else stat.S_IWUSR)

    def setattr(self, *, mode=None, **change) -> None:
        super().setattr(mode=mode, **change)
        if mode is not None:
            self.chmod = (self.tree.ima.policy, stat.S_IFREG | stat.S_IMODE(mode))

    def open(self, flags: int, pid: int) -> OpenFile:
        policy = self.tree.ima.policy
        # FUSE names the task of an open only: the session keeps it for its writes and close
        opener = Task.of_pid(pid, 0, 0).subject()  # (0, 0): the ids of a task already gone
        return OpenFile(self, flags, session=policy.open(flags, has_cap_sys_admin(pid), opener),
                        policy=policy)

    def release(self, f: OpenFile) -> None:
        f.policy.release(f.session)

    def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        if f.session is not None:
            raise FsError(errno.EINVAL)
        return f.policy.read(offset, size)

    def write(self, f: OpenFile, offset: int, data: bytes) -> Steps[int]:
        if f.session is None:
            raise FsError(errno.EINVAL)
        return (yield from f.policy.write(f.session, offset, data))


class Tree:
    """The IMA part of securityfs for one :class:`Ima`, laid out per kernel version."""

    def __init__(self, ima: Ima):
        self.ima = ima
        self._ino = itertools.count(pyfuse3.ROOT_INODE)
        self.nodes: dict[int, Node] = {}
        self.born_ns = time.time_ns()
        self.root = self._node(Root, "", S_DIR, None)
        integrity = self._node(Directory, "integrity", S_DIR, self.root)
        self._node(Symlink, "ima", S_LNK, self.root, target="integrity/ima")
        self.dir = self._node(Directory, "ima", S_DIR, integrity)
        log = getattr(ima.pcrs, "event_log", None)
        if log:  # the TPM driver's files, beside integrity/
            tpm0 = self._node(Directory, "tpm0", S_DIR, self.root)
            self._node(StaticFile, "binary_bios_measurements", S_LIST, tpm0, data=log)
        self.staging = bool(ima.profile.staging)
        self.lock = MeasureLock()
        self._populate()
        from .views import add_views
        add_views(self)

    def _node(self, cls, name, mode, parent, **kw) -> Node:
        n = cls(self, next(self._ino), name, mode, parent, **kw)
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
                        created.append((ListFile, f"{fmt}_runtime_measurements_{bank}{suffix}", mode,
                                        {"view": store.view(fmt, bank), "staged": bool(suffix)}))
            for suffix in suffixes:
                for fmt in ("binary", "ascii"):
                    created.append((Symlink, f"{fmt}_runtime_measurements{suffix}", S_LNK,
                                    {"target": f"{fmt}_runtime_measurements_sha1{suffix}"}))
        else:
            for fmt in ("binary", "ascii"):
                created.append((ListFile, f"{fmt}_runtime_measurements", S_LIST,
                                {"view": store.view(fmt, "sha1"), "staged": False}))
        created += [(CounterFile, "runtime_measurements_count", S_LIST,
                     {"value": lambda: self.ima.store.current.count}),
                    (CounterFile, "violations", S_LIST, {"value": lambda: self.ima.store.violations}),
                    (PolicyNode, "policy", stat.S_IFREG, {})]
        for cls, name, mode, kw in reversed(created):
            self._node(cls, name, mode, self.dir, **kw)

    def get(self, inode: int) -> Node:
        node = self.nodes.get(inode)
        if node is None or not node.visible:
            raise FsError(errno.ENOENT)
        return node


# -- the FUSE front -------------------------------------------------------------------------------
_ENTRY = pyfuse3.EntryAttributes
# What pyfuse3 makes of each answer: anything else raises in pyfuse3, after
# the guard, and ends the daemon (a `create` that fell through to None did).
_ANSWERS = {"lookup": _ENTRY, "getattr": _ENTRY, "setattr": _ENTRY, "mknod": _ENTRY, "mkdir": _ENTRY,
            "symlink": _ENTRY, "link": _ENTRY, "readlink": bytes, "getxattr": bytes,
            "listxattr": (list, tuple), "opendir": int, "open": pyfuse3.FileInfo,
            "read": (bytes, bytearray, memoryview), "write": int, "statfs": pyfuse3.StatvfsData}


def _answer_fits(name: str, answer) -> bool:
    if name == "create":
        return isinstance(answer, tuple) and len(answer) == 2 \
            and isinstance(answer[0], pyfuse3.FileInfo) and isinstance(answer[1], _ENTRY)
    want = _ANSWERS.get(name)
    return want is None or isinstance(answer, want)


def _guarded(op):
    """No request ends the daemon: errnos go back as they are, anything else
    (an exception, an answer pyfuse3 cannot send) as EIO, logged with its
    traceback in the emulated kernel's log.  A request that queued PCR
    extends (a TPM backend) answers once they are done."""

    @functools.wraps(op)
    async def guarded(self, *args):
        pcrs = self.tree.ima.pcrs
        queued = pcrs.queued if pcrs is not None else 0
        try:
            answer = await op(self, *args)
            if pcrs is not None and pcrs.queued != queued:
                await pcrs.settle()  # records it caused are in the TPM before it returns
        except pyfuse3.FUSEError:
            raise
        except (FsError, OSError) as e:
            if e.errno is None:
                self._bug(op.__name__, args, e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            raise pyfuse3.FUSEError(e.errno) from None
        except Exception as e:
            self._bug(op.__name__, args, e)
            raise pyfuse3.FUSEError(errno.EIO) from None
        if not _answer_fits(op.__name__, answer):
            self._bug(op.__name__, args, TypeError(f"answered {type(answer).__name__}: {answer!r:.200}"))
            raise pyfuse3.FUSEError(errno.EIO)
        return answer
    return guarded


class SecurityFs(pyfuse3.Operations):
    """FUSE requests -> the owner of the node: the :class:`Tree` or the
    measured mounts.  Cross-owner links and renames are EXDEV, as between
    two filesystems."""

    enable_writeback_cache = False
    supports_dot_lookup = True

    def __init__(self, tree: Tree, runner: Runner, measured: MeasuredFs | None = None,
                 attr_timeout: float = 1.0):
        super().__init__()
        self.tree = tree
        self.runner = runner  # a write to the policy file may read and hash a file
        self.measured = measured
        self.attr_timeout = attr_timeout
        self._fh = itertools.count(1)
        self.files: dict[int, OpenFile] = {}
        self._wake: trio.Event | None = None  # wakes the reaper

    def _bug(self, op: str, args: tuple, e: BaseException) -> None:
        log.error("FUSE %s%r failed", op, args[:2], exc_info=e)
        klog = self.tree.ima.klog
        klog.kernel(f"imafs: BUG: FUSE {op} failed with {type(e).__name__}: {e}; answered EIO")
        for line in "".join(traceback.format_exception(e)).rstrip().splitlines():
            klog.kernel(f"imafs:  {line}")

    def _measured(self, inode: int) -> bool:
        return self.measured is not None and self.measured.owns(inode)

    def _node(self, inode: int) -> Node:
        return self.tree.get(inode)

    def _entry(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.inode
        a.generation = 0
        # the policy file can vanish or change mode: never cached
        a.entry_timeout = a.attr_timeout = 0 if isinstance(node, PolicyNode) else self.attr_timeout
        a.st_mode = node.stat_mode
        a.st_nlink = node.nlink
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = 0
        a.st_size = node.size
        a.st_blksize = 4096
        a.st_blocks = 0
        a.st_atime_ns = node.atime_ns
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        return a

    # -- names ------------------------------------------------------------------------------
    @_guarded
    async def lookup(self, parent_inode, name, ctx=None):
        if self._measured(parent_inode):
            return await self.measured.lookup(parent_inode, name)
        if parent_inode == pyfuse3.ROOT_INODE and self.measured is not None:
            root = await self.measured.root_entry(name)
            if root is not None:
                return root
        return self._entry(self._node(parent_inode).lookup(os.fsdecode(name)))

    async def forget(self, inode_list):
        if self.measured is None:
            return
        for inode, n in inode_list:
            try:
                self.measured.forget(inode, n)
            except Exception as e:  # forget answers nothing: log and go on
                self._bug("forget", (inode, n), e)

    @_guarded
    async def getattr(self, inode, ctx=None):
        if self._measured(inode):
            return await self.measured.getattr(inode)
        return self._entry(self._node(inode))

    @_guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        f = fields
        change = dict(size=attr.st_size if f.update_size else None,
                      mode=attr.st_mode if f.update_mode else None,
                      uid=attr.st_uid if f.update_uid else None,
                      gid=attr.st_gid if f.update_gid else None,
                      atime_ns=attr.st_atime_ns if f.update_atime else None,
                      mtime_ns=attr.st_mtime_ns if f.update_mtime else None)
        if self._measured(inode):
            return await self.measured.setattr(inode, fh, change)
        node = self._node(inode)
        node.setattr(**change)
        return self._entry(node)

    @_guarded
    async def readlink(self, inode, ctx):
        if self._measured(inode):
            return await self.measured.readlink(inode)
        return self._node(inode).readlink()

    @_guarded
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        if self._measured(parent_inode):
            return await self.measured.mknod(parent_inode, name, mode, rdev, ctx)
        self._node(parent_inode).mknod(name, mode)

    @_guarded
    async def mkdir(self, parent_inode, name, mode, ctx):
        if self._measured(parent_inode):
            return await self.measured.mkdir(parent_inode, name, mode, ctx)
        self._node(parent_inode).mkdir(name, mode)

    @_guarded
    async def symlink(self, parent_inode, name, target, ctx):
        if self._measured(parent_inode):
            return await self.measured.symlink(parent_inode, name, target, ctx)
        self._node(parent_inode).symlink(name, target)

    @_guarded
    async def link(self, inode, new_parent_inode, new_name, ctx):
        if self._measured(inode) != self._measured(new_parent_inode):
            raise FsError(errno.EXDEV)
        if self._measured(inode):
            return await self.measured.link(inode, new_parent_inode, new_name)
        self._node(inode)
        self._node(new_parent_inode).link(new_name)

    @_guarded
    async def unlink(self, parent_inode, name, ctx):
        if self._measured(parent_inode):
            return await self.measured.unlink(parent_inode, name)
        self._node(parent_inode).unlink(name)

    @_guarded
    async def rmdir(self, parent_inode, name, ctx):
        if self._measured(parent_inode):
            return await self.measured.rmdir(parent_inode, name)
        self._node(parent_inode).rmdir(name)

    @_guarded
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if self._measured(parent_inode_old) != self._measured(parent_inode_new):
            raise FsError(errno.EXDEV)
        if self._measured(parent_inode_old):
            return await self.measured.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)
        self._node(parent_inode_new)
        self._node(parent_inode_old).rename(name_old, name_new, flags)

    # -- xattrs ---------------------------------------------------------------------------------
    @_guarded
    async def getxattr(self, inode, name, ctx):
        if self._measured(inode):
            return await self.measured.getxattr(inode, name)
        return self._node(inode).getxattr(name)

    @_guarded
    async def listxattr(self, inode, ctx):
        if self._measured(inode):
            return await self.measured.listxattr(inode)
        return self._node(inode).listxattr()

    @_guarded
    async def setxattr(self, inode, name, value, ctx):
        if self._measured(inode):
            return await self.measured.setxattr(inode, name, value, ctx)
        self._node(inode).setxattr(name, value)

    @_guarded
    async def removexattr(self, inode, name, ctx):
        if self._measured(inode):
            return await self.measured.removexattr(inode, name)
        self._node(inode).removexattr(name)

    # -- directories ----------------------------------------------------------------------------
    @_guarded
    async def opendir(self, inode, ctx):
        if self._measured(inode):
            return await self.measured.opendir(inode)
        self._node(inode).entries()
        return inode

    @_guarded
    async def readdir(self, fh, start_id, token):
        if self._measured(fh):
            return await self.measured.readdir(fh, start_id, token)
        entries = self._node(fh).entries()
        for i in range(start_id, len(entries)):
            name, child = entries[i]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self._entry(child), i + 1):
                break

    @_guarded
    async def releasedir(self, fh):
        pass

    @_guarded
    async def fsyncdir(self, fh, datasync):
        if self._measured(fh):
            return await self.measured.fsyncdir(fh, datasync)
        self._node(fh).fsync(None)

    # -- files ----------------------------------------------------------------------------------
    @_guarded
    async def create(self, parent_inode, name, mode, flags, ctx):
        if self._measured(parent_inode):
            return await self.measured.create(parent_inode, name, mode, flags, ctx)
        self._node(parent_inode).create(name, mode)

    @_guarded
    async def open(self, inode, flags, ctx):
        if self._measured(inode):
            return await self.measured.open(inode, flags, ctx)
        node = self._node(inode)
        f = node.open(flags, ctx.pid)
        fh = next(self._fh)
        self.files[fh] = f
        if flags & os.O_TRUNC:  # do_truncate after the open: simple_setattr (F-4)
            node.setattr(size=0)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _file(self, fh: int) -> OpenFile:
        f = self.files.get(fh)
        if f is None:
            raise FsError(errno.EBADF)
        return f

    @_guarded
    async def read(self, fh, off, size):
        if self._measured(fh):
            return await self.measured.read(fh, off, size)
        f = self._file(fh)
        answer = f.node.read(f, off, size)
        return await answer if inspect.isawaitable(answer) else answer  # views read the TPM

    @_guarded
    async def write(self, fh, off, buf):
        if self._measured(fh):
            return await self.measured.write(fh, off, buf)
        f = self._file(fh)
        n = await self.runner.run(f.node.write(f, off, buf))
        if self.tree.ima.store.graveyard and self._wake is not None:
            self._wake.set()
        return n

    @_guarded
    async def flush(self, fh):
        pass  # nothing is buffered

    @_guarded
    async def fsync(self, fh, datasync):
        if self._measured(fh):
            return await self.measured.fsync(fh, datasync)
        f = self._file(fh)
        f.node.fsync(f)

    @_guarded
    async def release(self, fh):
        if self._measured(fh):
            return await self.measured.release(fh)
        f = self.files.pop(fh, None)
        if f is not None:
            f.node.release(f)

    @_guarded
    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def reaper(self) -> None:
        """Free deleted records one block at a time between other requests,
        after the write that deleted them has returned (the kernel too frees
        them after releasing the list lock)."""
        while True:
            self._wake = trio.Event()
            await self._wake.wait()
            while self.tree.ima.store.reap():
                await trio.sleep(0)


MOUNT_OPTIONS = ("fsname=securityfs", "subtype=imafs", "allow_other", "default_permissions")
