"""The measurement decision path of file hooks (the kernel's ima_main.c):
policy action, violation checks, the iint cache, hashing and the store.

:class:`Measurer` is driven by whoever sees file activity: the measured
mount for real opens, execs and closes, and the control socket for explicit
hook events.  It knows files only as :class:`OpenedFile` and tasks only as
:class:`Task`.

A hook is a generator of steps (:mod:`imafs.blocking`): the decision runs on
the caller's state, hashing is a ``Blocking`` step, and the collect-and-store
part holds the inode's ``Exclusive`` lock, as the kernel holds iint->mutex.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from . import digsig as D
from . import templates as T
from .appraise import (FILE_APPRAISE, NEW_FILE, PASS, PERMIT_DIRECTIO, VERITY_REQUIRED, Verdict,
                       appraise_decision, appraised_flags, rule_flags, subaction)
from .blocking import Blocking, Exclusive, Steps
from .fsinfo import FsInfo
from .iint import (DIGSIG, EMITTED_OPENWRITERS, IMA_APPRAISE, IMA_COLLECTED, IMA_MEASURE, IMA_MEASURED,
                   MAY_EMIT_TOMTOU, UPDATE_XATTR, IintCache)
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
    audit: Subject | None = None  # the subject as reported, when /proc/<pid> is another namespace's

    REPORTED = ("pid", "uid", "euid", "suid", "gid", "egid", "sgid", "cap_eff", "auid", "ses")

    @classmethod
    def reported(cls, fields: dict) -> "Task":
        """A task as the seccomp supervisor read it in its /proc (imafs/supervise.py):
        its PID namespace may not be the daemon's (``imafs run --mount``), so
        nothing is read again here.  ``fields``: the ints of REPORTED and ``comm``."""
        bad = [k for k in cls.REPORTED if not isinstance(fields.get(k), int) or isinstance(fields[k], bool)]
        if bad or not isinstance(fields.get("comm"), str) or set(fields) - {*cls.REPORTED, "comm"}:
            raise RequestError(f"task: give the integers {', '.join(cls.REPORTED)} and the string comm")
        f = fields
        return cls(f["pid"], f["comm"], f["uid"], f["euid"], f["suid"], f["gid"], f["egid"], f["sgid"],
                   bool(f["cap_eff"] >> CAP_SETUID & 1), bool(f["cap_eff"] >> CAP_SETGID & 1),
                   Subject(f["pid"], f["uid"], os.fsencode(f["comm"]), f["auid"] & 0xFFFFFFFF,
                           f["ses"] & 0xFFFFFFFF))

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
        return self.audit or Subject.of_pid(self.pid, self.uid, self.comm)


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
    created: bool = False  # this open made the file (FMODE_CREATED)
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
        """The access mask of an open (FILE_CHECK's ``mask``): build_open_flags'
        acc_mode, where O_APPEND adds MAY_APPEND to the write bit and O_TRUNC
        implies MAY_WRITE."""
        if self.flags & FMODE_EXEC:
            return MAY_EXEC
        acc = self.flags & os.O_ACCMODE
        mask = MAY_READ if acc in (os.O_RDONLY, os.O_RDWR) else 0
        if acc in (os.O_WRONLY, os.O_RDWR) or self.flags & os.O_TRUNC:
            mask |= MAY_WRITE
        if self.flags & os.O_APPEND:
            mask |= MAY_APPEND
        return mask

    def reopen(self) -> int:
        """A read-only descriptor of the content (works after unlink too)."""
        src = f"/proc/self/fd/{self.fd}" if self.fd is not None else self.path
        return os.open(src, os.O_RDONLY | os.O_CLOEXEC)

    def xattrs(self) -> dict[str, bytes]:
        """A blocking step: the xattrs a template may record (security.evm
        and those EVM protects), by name."""
        target = self.fd if self.fd is not None else self.path
        found = {}
        for name in EVM_XATTRS + ("security.evm",):
            try:
                found[name] = os.getxattr(target, name)
            except OSError:
                pass
        return found


def change_cookie(fd: int) -> int:
    """What user space can see of a change: ctime, mtime, size and the inode
    generation, folded into 64 bits (docs/measured-mount.md has its limits)."""
    st = os.fstat(fd)
    try:
        gen = struct.unpack("l", fcntl.ioctl(fd, FS_IOC_GETVERSION, b"\0" * 8))[0]
    except OSError:
        gen = 0
    return hash((st.st_ctime_ns, st.st_mtime_ns, st.st_size, gen)) & _MASK64


def _available(algo: str) -> bool:
    try:
        T.hasher(algo)
        return True
    except T.UnknownHashError:
        return False


def dentry_path(path: str) -> str:
    """A blocking step: ``path`` from the root of its filesystem (dentry_path)."""
    real = os.path.realpath(path)
    root = real
    while not os.path.ismount(root):
        root = os.path.dirname(root)
    return "/" + os.path.relpath(real, root) if real != root else "/"


class Measurer:
    """process_measurement and its neighbours, over one :class:`IintCache`.

    ``ima`` is the :class:`~imafs.ima.Ima` whose policy decides and whose
    store records; ``limits`` picks the violation model of 6.15+ (and of
    Debian's 6.12.117): one open_writers per writers-open period and one
    ToMToU per measured reader.

    Every system call on the real file (xattrs, the change cookie, hashing)
    of an open's hooks is a ``Blocking`` step; an :class:`Iint` is never held
    across one, since violation checks of other opens change its atomic
    flags meanwhile.  The close hooks run at once (:meth:`file_close`).
    """

    def __init__(self, ima, cache: IintCache, limits: bool):
        self.ima = ima
        self.cache = cache
        self.limits = limits

    # -- hooks ---------------------------------------------------------------------
    def file_open(self, f: OpenedFile, task: Task) -> Steps[list[dict]]:
        """An open: count it, then FILE_CHECK with its mask, and BPRM_CHECK for
        an exec open.  Returns how each hook was decided; a hook whose result
        has ``denied`` fails the open with that errno (and the caller closes
        it with :meth:`file_close`)."""
        self.cache.opened(f.key, f.reader, f.writer)
        done = [(yield from self.process(f, task, "FILE_CHECK", f.open_mask))]
        if f.flags & FMODE_EXEC and "denied" not in done[0]:
            done.append((yield from self.process(f, task, "BPRM_CHECK", MAY_EXEC)))
        return done

    def file_close(self, f: OpenedFile) -> Callable[[], None] | None:
        """The last reference to an open is gone (ima_file_free), then uncount it.

        Not a path of steps: the kernel has run this when close() returns,
        and FUSE sends the release after it, so the next open may already
        be queued.  Done before anything else is read, the state is the
        kernel's for that open.  The change cookie comes from the open's own
        descriptor (an fstat and an ioctl).

        Returns the blocking rest, if any, for the caller to run before it
        closes the descriptor: the new hash of an appraised file that its
        last writer changed (ima_update_xattr)."""
        try:
            if f.writer and self.cache.counts(f.key)[1] == 1:
                return self._last_writer(f)
        finally:
            self.cache.closed(f.key, f.reader, f.writer)
        return None

    def file_mprotect(self, f: OpenedFile, task: Task) -> int:
        """ima_file_mprotect: a mapping of ``f`` that was not executable is
        being made so.  Only with an appraise rule in the policy (and
        appraisal on); then, when MMAP_CHECK or MMAP_CHECK_REQPROT would
        measure or appraise the file, a ``failed-mprotect`` record, and EPERM
        if it would appraise.  Nothing is measured (the kernel cannot take the
        inode's lock under the mmap lock).  Returns 0 or the errno."""
        ima = self.ima
        if not ima.appraiser.mode or not any(r.action == "appraise" for r in ima.policy.rules):
            return 0
        measure = appraise = False
        for func in ("MMAP_CHECK", "MMAP_CHECK_REQPROT"):
            ev = self._hook_event(f, task, func, MAY_EXEC)
            rule = measure_decision(ima.policy.rules, ev)
            arule = appraise_decision(ima.policy.rules, ev)
            measure |= rule is not None and rule.action == "measure"
            appraise |= arule is not None and arule.action == "appraise"
        if not measure and not appraise:
            return 0
        ima.klog.integrity(1800, task.subject(), "collect_data", "failed-mprotect", int(not appraise),
                           name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)
        return errno.EPERM if appraise else 0

    def check_ima_xattr(self, value: bytes, f: OpenedFile, task: Task) -> None:
        """ima_inode_setxattr's checks of a new security.ima on ``f``: EINVAL
        for an empty value or an unknown type; EACCES and a ``set_data``
        record for a hash algorithm that the policy's SETXATTR_CHECK rule
        does not allow, or, without one, that the kernel lacks
        (validate_hash_algo).  ``f.path`` is the dentry path the record names."""
        if not value or value[0] >= D.IMA_XATTR_LAST:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        ima = self.ima
        algo = D.hash_algo(value, ima.ima_hash, ima.profile.kernel_version)
        allowed = next((r.appraise_algos for r in ima.policy.rules if r.func == "SETXATTR_CHECK"), None)
        if allowed:
            ok, cause = algo in allowed, "denied-hash-algorithm"
        else:
            ok, cause = algo == ima.ima_hash or _available(algo), "unavailable-hash-algorithm"
        if not ok:
            ima.klog.integrity(1800, task.subject(), "set_data", cause, 0, name=f.path, dev=f.fs.s_id,
                               ino=f.st.st_ino)
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))

    def xattr_changed(self, key: tuple[int, int], ima_value: bytes | None = None) -> None:
        """security.ima or an EVM xattr was set or removed: measure and
        appraise again (ima_reset_appraise_flags); ``ima_value`` is the new
        security.ima, whose being a signature makes the file immutable."""
        iint = self.cache.find(key)
        if iint is not None:
            iint.reset()
            digsig = ima_value is not None and ima_value[:1] == bytes([D.EVM_IMA_XATTR_DIGSIG])
            iint.atomic = iint.atomic | DIGSIG if digsig else iint.atomic & ~DIGSIG
            self.cache.put(iint)

    def unlinked(self, key: tuple[int, int], nlink: int) -> None:
        """The inode dies with its last link once nobody has it open."""
        if nlink == 0 and key not in self.cache.opens:
            self.cache.remove(key)

    # -- the decision path ------------------------------------------------------------
    def process(self, f: OpenedFile, task: Task, func: str, mask: int) -> Steps[dict]:
        """process_measurement: the decision, violations, then measure and
        appraise under the inode's lock.  The result's ``denied`` is the
        errno the hook fails the access with (appraisal in enforce mode)."""
        ima = self.ima
        ev = self._hook_event(f, task, func, mask)
        rule = measure_decision(ima.policy.rules, ev)
        must_measure = rule is not None and rule.action == "measure"
        appraiser = ima.appraiser
        arule = appraise_decision(ima.policy.rules, ev) if appraiser.mode else None
        must_appraise = arule is not None and arule.action == "appraise"
        violation_check = func in VIOLATION_FUNCS and any(r.action == "measure" for r in ima.policy.rules)
        if not must_measure and not must_appraise and not violation_check:
            return self._decided(f, func, rule, False)
        if violation_check:
            yield from self._violation_check(f, task, must_measure)
        if not must_measure and not must_appraise:
            return self._decided(f, func, rule, False)
        boot = ima.boots
        yield Exclusive(f.key)  # iint->mutex
        if ima.boots == boot and f.fd is None and not self.cache.counts(f.key)[1]:
            iint = self.cache.get(f.key)
            if iint.flags & IMA_COLLECTED and (yield Blocking(self._cookie_moved, iint.cookie, f)):
                self._reset(f.key)
        if ima.boots != boot:  # a reboot or kexec while waiting: this kernel is gone
            return self._decided(f, func, rule, False, "measure: dropped, the kernel rebooted")
        kv = ima.profile.kernel_version
        pcr = ima.profile.pcr_idx if rule is None or rule.pcr is None else rule.pcr
        action, afunc, sub = 0, func, 0
        if must_measure:
            action |= IMA_MEASURE | rule_flags(rule, kv)
        if must_appraise:
            sub = subaction(arule, func)
            afunc = "FILE_CHECK" if sub == FILE_APPRAISE else func  # the status is cached as FILE_CHECK's
            action |= IMA_APPRAISE | sub | rule_flags(arule, kv)
        iint = self.cache.get(f.key)
        iint.flags |= action
        self.cache.put(iint)
        do_measure = must_measure and not iint.measured_pcrs >> pcr & 1
        do_appraise = must_appraise and not iint.flags & sub << 1
        added, why, verdict, collected = False, "", None, None
        if do_measure or do_appraise:
            template = (rule.template if must_measure else None) or ima.template
            collected = yield from self._collect(f, do_appraise or template.name != "ima")
            if ima.boots != boot:
                return self._decided(f, func, rule, False, "measure: dropped, the kernel rebooted")
            if collected is not None:
                xattrs, direct = collected
                if do_measure:
                    added = yield from self._measure(f, task, template, pcr, xattrs, direct)
                if do_appraise:
                    verdict = yield from self._appraise(f, task, afunc, xattrs)
        elif must_measure:
            why = "measure: already measured into this PCR"
        if must_appraise:
            return self._appraised(f, task, func, afunc, mask, rule, arule, added, why, do_appraise, verdict,
                                   collected[0] if collected else None)
        return self._decided(f, func, rule, added, why)

    def _hook_event(self, f: OpenedFile, task: Task, func: str, mask: int) -> HookEvent:
        return HookEvent(func, mask, uid=task.uid, euid=task.euid, suid=task.suid, gid=task.gid,
                         egid=task.egid, sgid=task.sgid, cap_setuid=task.cap_setuid,
                         cap_setgid=task.cap_setgid, fowner=f.st.st_uid, fgroup=f.st.st_gid,
                         fsmagic=f.fs.magic, fsname=f.fs.name, fs_subtype=f.fs.subtype, fsuuid=f.fs.uuid)

    def _violation_check(self, f: OpenedFile, task: Task, must_measure: bool) -> Steps[None]:
        """ima_rdwr_violation_check; the open is already counted."""
        readers, writers = self.cache.counts(f.key)
        causes = []
        iint = self.cache.get(f.key) if must_measure else None
        if f.writer:
            if readers:
                iint = self.cache.find(f.key)
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
            yield from self._violation(f, task, cause)

    def _violation(self, f: OpenedFile, task: Task, cause: str) -> Steps[None]:
        """ima_add_violation: a zero-digest record in the default template and
        PCR, and an INTEGRITY_PCR audit record."""
        ima = self.ima
        ev = T.Event(name=f.name, ima_hash=ima.ima_hash, violation=True)
        self._fill_inode(ev, f, (yield Blocking(f.xattrs)))
        stored = self._store(ev, f, task)
        f.violations.append(cause)
        ima.klog.integrity(1804, task.subject(), "invalid_pcr", cause, int(stored is not None),
                           name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)

    def _last_writer(self, f: OpenedFile) -> Callable[[], None] | None:
        """ima_check_last_writer: the last writer closes; a change measures
        and appraises again, and the hash of a file that passed appraisal
        with a hash is brought up to date (ima_update_xattr)."""
        iint = self.cache.find(f.key)
        if iint is None:
            return None
        try:
            moved = change_cookie(f.fd) != iint.cookie
        except OSError:
            moved = True  # no cookie: assume changed, as the kernel does
        update = iint.atomic & UPDATE_XATTR
        iint.atomic &= ~(EMITTED_OPENWRITERS | UPDATE_XATTR)
        rest = None
        if moved:
            if update and not iint.atomic & DIGSIG and iint.status("FILE_CHECK") == PASS:
                rest = functools.partial(self._update_xattr, f, self.ima.ima_hash)
            iint.reset()
            iint.flags &= ~NEW_FILE
        self.cache.put(iint)
        return rest

    @classmethod
    def _update_xattr(cls, f: OpenedFile, algo: str) -> None:
        """Hash the content with the IMA hash and write it to security.ima."""
        _, algo, digest = cls._hash(f, algo)
        cls._set_ima_xattr(f, D.hash_xattr(algo, digest))

    def _reset(self, key: tuple[int, int]) -> None:
        iint = self.cache.find(key)
        if iint is not None:
            iint.reset()
            self.cache.put(iint)

    @staticmethod
    def _cookie_moved(cookie: int, f: OpenedFile) -> bool | None:
        """Whether the change cookie differs from ``cookie``; None if unreadable.

        An explicit event on a file whose writes the emulator cannot see: a
        moved cookie stands for the last writer's close.  (Not for opens under
        a measured mount: there the closes are seen, and a cookie moved by
        link, chmod or rename must not measure again.)"""
        try:
            fd = f.reopen()
        except OSError:
            return None
        try:
            return change_cookie(fd) != cookie
        except OSError:
            return None
        finally:
            os.close(fd)

    def _collect(self, f: OpenedFile, read_xattr: bool) -> Steps[tuple[dict, bool] | None]:
        """ima_collect_measurement, once per change: security.ima decides the
        algorithm (when it is read), a verity rule takes the fs-verity digest.
        Returns (xattrs, O_DIRECT) or None when no hash can be made."""
        ima = self.ima
        direct = bool(f.flags & os.O_DIRECT)
        xattrs = yield Blocking(f.xattrs)
        iint = self.cache.get(f.key)
        if not iint.flags & IMA_COLLECTED or direct:
            algo = D.hash_algo(xattrs.get("security.ima") if read_xattr else None, ima.ima_hash,
                               ima.profile.kernel_version)
            try:
                T.hasher(algo)
            except T.UnknownHashError:
                return None  # the kernel cannot allocate the hash: nothing is stored
            verity = bool(iint.flags & VERITY_REQUIRED)
            if direct:  # hashing an O_DIRECT open fails: a zero digest, not collected
                digest, cookie = bytes(T.digest_size(algo)), iint.cookie
            else:
                try:
                    cookie, algo, digest = yield Blocking(self._hash, f, algo, verity)
                except OSError as e:
                    if e.errno == errno.ENOMEM:
                        return None
                    cookie, digest = iint.cookie, bytes(T.digest_size(algo))
            iint = self.cache.get(f.key)
            iint.cookie, iint.digest, iint.algo = cookie, digest, algo
            if not direct:
                iint.flags |= IMA_COLLECTED
            self.cache.put(iint)
        return xattrs, direct

    def _measure(self, f: OpenedFile, task: Task, template, pcr: int, xattrs: dict, direct: bool) -> Steps[bool]:
        """ima_store_measurement of the collected digest."""
        iint = self.cache.get(f.key)
        algo, digest = iint.algo, iint.digest
        ev = T.Event(name=f.name, ima_hash=self.ima.ima_hash, file_algo=algo, file_digest=digest,
                     digest_type="verity" if iint.flags & VERITY_REQUIRED else "ima")
        if "d" in template.fields:
            ev.d_digest = digest if algo in ("sha1", "md5") else (yield Blocking(self._sha1, f, direct))
        self._fill_inode(ev, f, xattrs)
        added = self._store(ev, f, task, template, pcr)
        if added is not None and not direct:
            iint = self.cache.get(f.key)
            iint.flags |= IMA_MEASURED
            iint.measured_pcrs |= 1 << pcr
            self.cache.put(iint)
        return bool(added)

    def _appraise(self, f: OpenedFile, task: Task, func: str, xattrs: dict) -> Steps[Verdict]:
        """ima_appraise_measurement on the collected digest; in fix mode the
        hash is written to the real file; the result is cached in the iint."""
        ima = self.ima
        iint = self.cache.get(f.key)
        xattr = xattrs.get("security.ima")
        v = ima.appraiser.appraise(func, iint.flags, xattr, iint.algo, iint.digest,
                                   size=f.st.st_size, created=f.created)
        if v.fix is not None:
            try:
                yield Blocking(self._set_ima_xattr, f, v.fix)
                v.status = 0
            except OSError:
                pass
        if v.audit:
            ima.klog.integrity(1800, task.subject(), "appraise_data", v.cause, int(not v.rc),
                               name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)
        iint = self.cache.get(f.key)
        if f.created and not xattr:
            iint.flags |= NEW_FILE
        if v.digsig is not None:
            iint.atomic = iint.atomic | DIGSIG if v.digsig else iint.atomic & ~DIGSIG
        if v.passed:
            iint.flags |= appraised_flags(func)
        iint.set_status(func, v.status)
        self.cache.put(iint)
        return v

    @staticmethod
    def _set_ima_xattr(f: OpenedFile, value: bytes) -> None:
        """ima_fix_xattr: __vfs_setxattr_noperm on the real file."""
        os.setxattr(f.fd if f.fd is not None else f.path, "security.ima", value)

    def _appraised(self, f: OpenedFile, task: Task, func: str, afunc: str, mask: int, rule: Rule | None,
                   arule: Rule, added: bool, why: str, appraised: bool, verdict: Verdict | None,
                   xattrs: dict | None) -> dict:
        """The end of process_measurement for an access that must be
        appraised: the allowed algorithms, the write to a signed file, and
        EACCES when any failed in enforce mode."""
        ima = self.ima
        iint = self.cache.get(f.key)
        if appraised:
            failed = verdict is None or not verdict.passed
            note = "appraise: " + ("pass" if not failed else verdict.cause if verdict else "no hash collected")
        else:
            failed = iint.status(afunc) != PASS
            note = "appraise: cached " + ("pass" if not failed else "failure")
        if f.flags & os.O_DIRECT and iint.flags & PERMIT_DIRECTIO:
            failed = False
        if appraised and not failed and arule.appraise_algos and xattrs is not None:
            algo = D.hash_algo(xattrs.get("security.ima"), ima.ima_hash, ima.profile.kernel_version)
            if algo not in arule.appraise_algos:
                failed, note = True, "appraise: denied-hash-algorithm"
                ima.klog.integrity(1800, task.subject(), "collect_data", "denied-hash-algorithm", 0,
                                   name=f.name, dev=f.fs.s_id, ino=f.st.st_ino)
        if mask & MAY_WRITE and iint.atomic & DIGSIG and not iint.flags & NEW_FILE:
            failed, note = True, "appraise: a signed file is not opened for write"
        denied = failed and ima.appraiser.enforcing
        if not denied and f.writer:
            iint.atomic |= UPDATE_XATTR
            self.cache.put(iint)
        event = self._decided(f, func, rule, added, why)
        event["appraise"] = note + (" (denied: EACCES)" if denied else " (allowed)" if failed else "")
        if denied:
            event["denied"] = errno.EACCES
        return event

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
    def _hash(f: OpenedFile, algo: str, verity: bool = False) -> tuple[int, str, bytes]:
        """(change cookie, algorithm, digest) of the content; with ``verity``
        the fs-verity digest and its algorithm."""
        fd = f.reopen()
        try:
            cookie = change_cookie(fd)
            if verity:
                return (cookie, *D.verity_digest(fd))
            h = T.new_hash(algo)
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
            return cookie, algo, h.digest()
        finally:
            os.close(fd)

    @classmethod
    def _sha1(cls, f: OpenedFile, direct: bool) -> bytes:
        """The `ima` template's digest is sha1 whatever the IMA hash is."""
        if direct:
            return bytes(20)
        try:
            return cls._hash(f, "sha1")[2]
        except OSError:
            return bytes(20)

    @staticmethod
    def _fill_inode(ev: T.Event, f: OpenedFile, xattrs: dict[str, bytes]) -> None:
        ev.uid, ev.gid, ev.mode = f.st.st_uid, f.st.st_gid, f.st.st_mode & 0xFFFF
        ev.ima_xattr = xattrs.get("security.ima")
        ev.evm_xattr = xattrs.get("security.evm")
        ev.evm_xattrs = tuple((n, xattrs[n]) for n in EVM_XATTRS if n in xattrs)

    def _decided(self, f: OpenedFile, func: str, rule: Rule | None, added: bool, why: str = "") -> dict:
        return self.ima.decided(os.fsdecode(f.name), func, rule, added, why, f.violations)
