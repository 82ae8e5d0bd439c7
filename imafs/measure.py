"""The measurement decision path of file hooks (the kernel's ima_main.c):
policy action, violation checks, the iint cache, hashing and the store.

:class:`Measurer` is driven by whoever sees file activity: the measured
mount for real opens, execs and closes, and the control socket for explicit
hook events.  It knows files only as :class:`OpenedFile` and tasks only as
:class:`Task`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from dataclasses import dataclass, field

from . import templates as T
from .fsinfo import FsInfo
from .iint import EMITTED_OPENWRITERS, IMA_COLLECTED, IMA_MEASURE, IMA_MEASURED, MAY_EMIT_TOMTOU, Iint, IintCache
from .errors import RequestError
from .klog import Subject
from .policy import MASKS, HookEvent, Rule, measure_decision

MAY_EXEC, MAY_WRITE, MAY_READ, MAY_APPEND = (MASKS[m] for m in ("MAY_EXEC", "MAY_WRITE", "MAY_READ", "MAY_APPEND"))
FMODE_EXEC = 0x20  # __FMODE_EXEC in the open flags FUSE passes on
VIOLATION_FUNCS = ("FILE_CHECK", "MMAP_CHECK", "MMAP_CHECK_REQPROT")
CAP_SETGID, CAP_SETUID = 6, 7
FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)
EVM_XATTRS = ("security.selinux", "security.SMACK64", "security.SMACK64EXEC",
              "security.SMACK64TRANSMUTE", "security.SMACK64MMAP", "security.apparmor",
              "security.ima", "security.capability")
_MASK64 = (1 << 64) - 1


def _status_field(text: bytes, name: bytes) -> bytes:
    """The value of ``name`` in /proc/<pid>/status (the fields are at line starts)."""
    i = text.index(name) if text.startswith(name) else text.index(b"\n" + name) + 1
    end = text.find(b"\n", i)
    return text[i + len(name):end if end >= 0 else None].strip()


@dataclass(frozen=True)
class Task:
    """The credentials of the task behind a hook."""

    pid: int = 0
    comm: str = "imafs"  # the status Name; audit records read /proc/<pid>/comm (see subject)
    uid: int = 0
    euid: int = 0
    suid: int = 0
    gid: int = 0
    egid: int = 0
    sgid: int = 0
    cap_setuid: bool = True
    cap_setgid: bool = True

    @classmethod
    def of_pid(cls, pid: int, uid: int, gid: int) -> "Task":
        """Read from /proc/<pid>/status; a task already gone keeps the ids
        FUSE gave (its fsuid/fsgid) and no capabilities."""
        try:
            fd = os.open(f"/proc/{pid}/status", os.O_RDONLY | os.O_CLOEXEC)
            try:
                text = os.read(fd, 8192)
            finally:
                os.close(fd)
            comm = _status_field(text, b"Name:").decode(errors="replace")
            u = [int(x) for x in _status_field(text, b"Uid:").split()]
            g = [int(x) for x in _status_field(text, b"Gid:").split()]
            caps = int(_status_field(text, b"CapEff:"), 16)
        except (OSError, ValueError, IndexError):
            return cls(pid, "?", uid, uid, uid, gid, gid, gid, False, False)
        return cls(pid, comm, u[0], u[1], u[2], g[0], g[1], g[2],
                   bool(caps >> CAP_SETUID & 1), bool(caps >> CAP_SETGID & 1))

    @classmethod
    def explicit(cls, uid: int, euid: int, gid: int, egid: int) -> "Task":
        """A task described by hand (``imafs measure``): saved ids equal the real
        ones, and euid 0 holds CAP_SETUID/CAP_SETGID."""
        return cls(0, "imafs", uid, euid, uid, gid, egid, gid, euid == 0, euid == 0)

    def subject(self) -> Subject:
        """The task as the kernel's audit records name it, read now: while a
        hook runs, the task waits on the request that caused it."""
        return Subject.of_pid(self.pid, self.uid, self.comm)


@dataclass
class OpenedFile:
    """A file as the hooks see it: an open of it, or a path for an explicit event."""

    key: tuple[int, int]  # (st_dev, st_ino) of the real file
    name: bytes  # the path recorded in the list
    st: os.stat_result
    fs: FsInfo
    flags: int = os.O_RDONLY  # the open flags
    fd: int | None = None  # an open descriptor of the real file, else ``path`` is used
    path: str = ""
    violations: list[str] = field(default_factory=list)  # causes recorded at this open

    @property
    def writer(self) -> bool:
        return self.flags & os.O_ACCMODE != os.O_RDONLY

    @property
    def reader(self) -> bool:
        """i_readcount counts read-only opens only (O_RDWR opens are writers)."""
        return self.flags & os.O_ACCMODE == os.O_RDONLY

    @property
    def open_mask(self) -> int:
        """The access mask of an open (FILE_CHECK's ``mask``)."""
        if self.flags & FMODE_EXEC:
            return MAY_EXEC
        acc = self.flags & os.O_ACCMODE
        mask = MAY_READ if acc in (os.O_RDONLY, os.O_RDWR) else 0
        if acc in (os.O_WRONLY, os.O_RDWR):
            mask |= MAY_APPEND if self.flags & os.O_APPEND else MAY_WRITE
        return mask

    def reopen(self) -> int:
        """A read-only descriptor of the content (works after unlink too)."""
        src = f"/proc/self/fd/{self.fd}" if self.fd is not None else self.path
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC)

    def xattr(self, name: str) -> bytes | None:
        try:
            return os.getxattr(self.fd if self.fd is not None else self.path, name)
        except OSError:
            return None


def change_cookie(fd: int) -> int:
    """What user space can see of a change: ctime, mtime, size and the inode
    generation, folded into 64 bits (docs/measured-mount.md has its limits)."""
    st = os.fstat(fd)
    try:
        gen = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8))[0]
    except OSError:
        gen = 0
    return hash((st.st_ctime_ns, st.st_mtime_ns, st.st_size, gen)) & _MASK64


def xattr_hash_algo(xattr: bytes | None) -> str | None:
    """The file hash algorithm ``security.ima`` asks for (ima_get_hash_algo)."""
    if not xattr:
        return None
    kind = xattr[0]
    ident = None
    if kind in (0x03, 0x06) and len(xattr) >= 3 and xattr[1] in (2, 3):  # signature v2/v3
        ident = xattr[2]
    elif kind == 0x04 and len(xattr) >= 2:  # IMA_XATTR_DIGEST_NG
        ident = xattr[1]
    elif kind == 0x01:  # IMA_XATTR_DIGEST: legacy sha1 (or md5)
        if len(xattr) == 21:
            return "md5" if xattr[17:21] == b"\0\0\0\0" else "sha1"
        return "md5" if len(xattr) == 17 else None
    for name, (i, _) in T.HASH_ALGOS.items():
        if i == ident:
            return name
    return None


class Measurer:
    """process_measurement and its neighbours, over one :class:`IintCache`.

    ``ima`` is the :class:`~imafs.ima.Ima` whose policy decides and whose
    store records; ``limits`` picks the violation model of 6.15+ (and of
    Debian's 6.12.117): one open_writers per writers-open period and one
    ToMToU per measured reader.
    """

    def __init__(self, ima, cache: IintCache, limits: bool):
        self.ima = ima
        self.cache = cache
        self.limits = limits

    # -- hooks ---------------------------------------------------------------------
    def file_open(self, f: OpenedFile, task: Task) -> list[dict]:
        """An open: count it, then FILE_CHECK with its mask, and BPRM_CHECK for
        an exec open.  Returns how each hook was decided."""
        self.cache.opened(f.key, f.reader, f.writer)
        done = [self.process(f, task, "FILE_CHECK", f.open_mask)]
        if f.flags & FMODE_EXEC:
            done.append(self.process(f, task, "BPRM_CHECK", MAY_EXEC))
        return done

    def file_close(self, f: OpenedFile) -> None:
        """The last reference to an open is gone (ima_file_free), then uncount it."""
        if f.writer:
            iint = self.cache.find(f.key)
            if iint is not None and self.cache.counts(f.key)[1] == 1:
                self._last_writer(iint, f)
        self.cache.closed(f.key, f.reader, f.writer)

    def xattr_changed(self, key: tuple[int, int]) -> None:
        """security.ima or an EVM xattr was set or removed: measure again."""
        iint = self.cache.find(key)
        if iint is not None:
            iint.reset()
            self.cache.put(iint)

    def unlinked(self, key: tuple[int, int], nlink: int) -> None:
        """The inode dies with its last link once nobody has it open."""
        if nlink == 0 and key not in self.cache.opens:
            self.cache.remove(key)

    # -- the decision path ------------------------------------------------------------
    def process(self, f: OpenedFile, task: Task, func: str, mask: int) -> dict:
        ima = self.ima
        rule = measure_decision(ima.policy.rules, self._hook_event(f, task, func, mask))
        must_measure = rule is not None and rule.action == "measure"
        violation_check = func in VIOLATION_FUNCS and any(r.action == "measure" for r in ima.policy.rules)
        if not must_measure and not violation_check:
            return self._decided(f, func, rule, False)
        iint = self.cache.get(f.key) if must_measure else None
        if violation_check:
            iint = self._violation_check(f, task, iint, must_measure)
        if not must_measure:
            return self._decided(f, func, rule, False)
        if f.fd is None and iint.flags & IMA_COLLECTED and not self.cache.counts(f.key)[1]:
            self._check_unseen_change(iint, f)
        pcr = ima.profile.pcr_idx if rule.pcr is None else rule.pcr
        iint.flags |= IMA_MEASURE
        if iint.measured_pcrs >> pcr & 1:
            self.cache.put(iint)
            return self._decided(f, func, rule, False, "measure: already measured into this PCR")
        added = self._measure(iint, f, task, rule, pcr)
        self.cache.put(iint)
        return self._decided(f, func, rule, added)

    def _hook_event(self, f: OpenedFile, task: Task, func: str, mask: int) -> HookEvent:
        return HookEvent(func, mask, uid=task.uid, euid=task.euid, suid=task.suid, gid=task.gid,
                         egid=task.egid, sgid=task.sgid, cap_setuid=task.cap_setuid,
                         cap_setgid=task.cap_setgid, fowner=f.st.st_uid, fgroup=f.st.st_gid,
                         fsmagic=f.fs.magic, fsname=f.fs.name, fs_subtype=f.fs.subtype, fsuuid=f.fs.uuid)

    def _violation_check(self, f: OpenedFile, task: Task, iint: Iint | None, must_measure: bool) -> Iint | None:
        """ima_rdwr_violation_check; the open is already counted."""
        readers, writers = self.cache.counts(f.key)
        causes = []
        if f.writer:
            if readers:
                iint = iint or self.cache.find(f.key)
                if iint is not None and iint.atomic & MAY_EMIT_TOMTOU:
                    if self.limits:
                        iint.atomic &= ~MAY_EMIT_TOMTOU
                    causes.append("ToMToU")
        elif must_measure:
            iint.atomic |= MAY_EMIT_TOMTOU
            if writers:
                if not self.limits:
                    causes.append("open_writers")
                elif not iint.atomic & EMITTED_OPENWRITERS:
                    iint.atomic |= EMITTED_OPENWRITERS
                    causes.append("open_writers")
        if iint is not None and (causes or must_measure):
            self.cache.put(iint)
        for cause in causes:
            self._violation(f, task, cause)
        return iint

    def _violation(self, f: OpenedFile, task: Task, cause: str) -> None:
        """ima_add_violation: a zero-digest record in the default template and
        PCR, and an INTEGRITY_PCR audit record."""
        ima = self.ima
        ev = T.Event(name=f.name, ima_hash=ima.ima_hash, violation=True)
        self._fill_inode(ev, f)
        stored = self._store(ev, f, task)
        f.violations.append(cause)
        ima.klog.integrity(1804, task.subject(), "invalid_pcr", cause, int(stored is not None),
                           name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)

    def _last_writer(self, iint: Iint, f: OpenedFile) -> None:
        """ima_check_last_writer: the last writer closes; a change measures again."""
        iint.atomic &= ~EMITTED_OPENWRITERS
        if self._cookie_moved(iint, f) is not False:  # no cookie: assume changed, as the kernel does
            iint.reset()
        self.cache.put(iint)

    def _check_unseen_change(self, iint: Iint, f: OpenedFile) -> None:
        """An explicit event on a file whose writes the emulator cannot see:
        a moved cookie stands for the last writer's close.  (Not for opens
        under a measured mount: there the closes are seen, and a cookie moved
        by link, chmod or rename must not measure again.)"""
        if self._cookie_moved(iint, f):
            iint.reset()

    @staticmethod
    def _cookie_moved(iint: Iint, f: OpenedFile) -> bool | None:
        """Whether the change cookie differs from the collected one; None if unreadable."""
        try:
            fd = f.reopen()
        except OSError:
            return None
        try:
            return change_cookie(fd) != iint.cookie
        except OSError:
            return None
        finally:
            os.close(fd)

    def _measure(self, iint: Iint, f: OpenedFile, task: Task, rule: Rule, pcr: int) -> bool:
        """Collect the digest (once per change) and store the measurement."""
        ima = self.ima
        template = rule.template or ima.template
        direct = bool(f.flags & os.O_DIRECT)
        xattr = f.xattr("security.ima")
        if not iint.flags & IMA_COLLECTED or direct:
            algo = (xattr_hash_algo(xattr) if template.name != "ima" else None) or ima.ima_hash
            try:
                T.hasher(algo)
            except T.UnknownHashError:
                return False  # the kernel cannot allocate the hash: nothing is stored
            if direct:  # hashing an O_DIRECT open fails: a zero digest, not collected
                iint.algo, iint.digest = algo, bytes(T.digest_size(algo))
            else:
                try:
                    iint.cookie, iint.digest = self._hash(f, algo)
                except OSError as e:
                    if e.errno == errno.ENOMEM:
                        return False
                    iint.digest = bytes(T.digest_size(algo))
                iint.algo = algo
                iint.flags |= IMA_COLLECTED
        ev = T.Event(name=f.name, ima_hash=ima.ima_hash, file_algo=iint.algo, file_digest=iint.digest)
        if "d" in template.fields:
            ev.d_digest = iint.digest if iint.algo in ("sha1", "md5") else self._sha1(f, direct)
        self._fill_inode(ev, f, xattr)
        added = self._store(ev, f, task, template, pcr)
        if added is not None and not direct:
            iint.flags |= IMA_MEASURED
            iint.measured_pcrs |= 1 << pcr
        return bool(added)

    def _store(self, ev: T.Event, f: OpenedFile, task: Task, template=None, pcr: int | None = None) -> bool | None:
        """Append (ima_store_template); None when measurements are suspended (a
        kexec or reboot is under way): the record is dropped, the inode stays
        unmeasured, and the kernel's store step audits the refusal."""
        try:
            return self.ima.add_event(ev, template, pcr)
        except RequestError:
            self.ima.klog.integrity(1804, task.subject(), "add_template_measure", "measurements_suspended", 0,
                                    name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)
            return None

    @staticmethod
    def _hash(f: OpenedFile, algo: str) -> tuple[int, bytes]:
        fd = f.reopen()
        try:
            cookie = change_cookie(fd)
            h = T.new_hash(algo)
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            return cookie, h.digest()
        finally:
            os.close(fd)

    def _sha1(self, f: OpenedFile, direct: bool) -> bytes:
        """The `ima` template's digest is sha1 whatever the IMA hash is."""
        if direct:
            return bytes(20)
        try:
            return self._hash(f, "sha1")[1]
        except OSError:
            return bytes(20)

    @staticmethod
    def _fill_inode(ev: T.Event, f: OpenedFile, ima_xattr: bytes | None = None) -> None:
        ev.uid, ev.gid, ev.mode = f.st.st_uid, f.st.st_gid, f.st.st_mode & 0xFFFF
        ev.ima_xattr = ima_xattr if ima_xattr is not None else f.xattr("security.ima")
        ev.evm_xattr = f.xattr("security.evm")
        ev.evm_xattrs = tuple((n, v) for n in EVM_XATTRS if (v := f.xattr(n)) is not None)

    def _decided(self, f: OpenedFile, func: str, rule: Rule | None, added: bool, why: str = "") -> dict:
        return self.ima.decided(os.fsdecode(f.name), func, rule, added, why, f.violations)
