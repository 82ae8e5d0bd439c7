"""One emulated IMA instance: the profile, the PCR banks, the store, and the
store step of a measurement (the kernel's ima_init.c and ima_api.c)."""

from __future__ import annotations

import hashlib
from collections import deque
import logging
import os
import stat

import errno

from . import kexec
from . import templates as T
from .blocking import Blocking, Steps
from .errors import FsError, RequestError
from .appraise import Appraiser
from .digsig import Verifier
from .epoch import Epoch
from .klog import KernelLog
from .fsinfo import fs_info
from .iint import IintCache
from .keyqueue import KeyQueue
from .keys import BUILTIN, MACHINE, PLATFORM, Key, KeyringError, Keyrings
from .measure import EVM_XATTRS, Measurer, OpenedFile, Task
from .policy import (BUFFER_FUNCS, FUNCS, MASKS, HookEvent, Parser, PolicyFile, Rule, builtin_rules,
                     measure_decision)
from .profile import Profile
from .store import MeasurementStore
from .tpm import PcrBanks, boot_aggregate


log = logging.getLogger(__name__)

# func_measure_str(): the op of the audit record of a buffer hook's failed store
MEASURING = {"KEXEC_CMDLINE": "measuring_kexec_cmdline", "KEY_CHECK": "measuring_key",
             "CRITICAL_DATA": "measuring_critical_data"}
MAY_READ = MASKS["MAY_READ"]
QUEUED = {"queued": True, "added": False, "decision": "queued until a custom policy is loaded"}


def _getxattr(fd: int, name: str) -> bytes | None:
    try:
        return os.getxattr(fd, name)
    except OSError:
        return None


def _open_regular(path: str) -> int:
    """A read-only descriptor of ``path`` if it is a regular file: the kernel
    measures nothing else, and a FIFO or a device would never end (the open
    itself must not wait for a FIFO's writer)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RequestError(f"{path}: not a regular file (the kernel measures regular files only)")
    return fd


def _file_facts(path: str, ima_hash: str | None) -> tuple[os.stat_result, bytes | None, bytes | None, dict]:
    """A blocking step: stat, digests (``ima_hash`` and sha1/md5 for `d`,
    when asked) and the xattrs a template can record, of a regular file."""
    fd = _open_regular(path)
    try:
        st = os.fstat(fd)
        digest = d = None
        if ima_hash is not None:
            h = T.new_hash(ima_hash)
            legacy = hashlib.md5() if ima_hash == "md5" else hashlib.sha1()
            while chunk := os.read(fd, 1 << 20):
                h.update(chunk)
                legacy.update(chunk)
            digest, d = h.digest(), legacy.digest()
        xattrs = {n: v for n in EVM_XATTRS + ("security.evm",) if (v := _getxattr(fd, n)) is not None}
        return st, digest, d, xattrs
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)


def _stat_fs(path: str):
    try:
        return os.stat(path), fs_info(path)
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None


class Ima:
    """The emulated kernel's IMA: boots with boot_aggregate, then records events."""

    def __init__(self, profile: Profile, klog: KernelLog | None = None, pcrs=None):
        """``pcrs``: the PCR banks (imafs.tpm.open_backend); by default
        software banks as the profile describes them."""
        self.profile = profile
        self.klog = klog or KernelLog(None)
        self.template = profile.template
        self.ima_hash = profile.ima_hash
        if pcrs is None and profile.tpm_banks:
            pcrs = PcrBanks(profile.tpm_banks, {b: profile.boot_pcr_values(b) for b in profile.tpm_banks})
        self.pcrs = pcrs
        self.flush_htable = profile.ima_flush_htable and not profile.disable_htable
        self._synthetic = 0  # synthetic records made so far
        self.last_events: deque = deque(maxlen=16)  # how the latest hook events were decided
        self.measured_dirs: list[tuple[str, str]] = []  # (SRC, DST) of the measured mounts
        self.epoch = Epoch()  # moves with whatever a file hook's decision depends on
        self.iint = IintCache(profile.iint_cache_size, self.epoch.bump)
        self.appraiser = Appraiser(profile.ima_appraise, Verifier(lambda: self.keyrings, self.klog.kernel),
                                   profile.kernel_version)
        self.measurer = Measurer(self, self.iint, profile.violation_limits)
        self.boots = 0  # kernels booted: a path that waited on I/O re-checks it
        self._boot(())

    def _boot(self, restored) -> None:
        """A new kernel: a fresh store holding the ``restored`` kexec records,
        then this kernel's boot_aggregate."""
        self.boots += 1
        self.suspended = False
        self.iint.clear()
        p = self.profile
        self._boot_keyrings()
        for line in p.boot_log:
            self.klog.kernel(line)
        if not p.tpm_banks:
            self.klog.kernel("ima: No TPM chip found, activating TPM-bypass!")
        self.klog.kernel(f"ima: Allocated hash algorithm: {self.ima_hash}")
        self.policy = PolicyFile(builtin_rules(p.ima_policy, p.kernel_version),
                                 Parser(p.kernel_version, p.appraise_modsig, self.template),
                                 read_policy=p.read_policy, write_policy=p.write_policy, log=self.klog,
                                 measure_policy_file=self._policy_check,
                                 real_path=self.real_path, on_update=self._policy_updated)
        self.store = MeasurementStore(tpm_banks=self.profile.tpm_banks, ima_hash=self.ima_hash,
                                      pcrs=self.pcrs, disable_htable=self.profile.disable_htable,
                                      # Debian's 6.1 has no sha384/sha512 at IMA init (F-19)
                                      sha1_padded=("sha384", "sha512") if p.kernel == "6.1" else ())
        for pcr, digest, template, fields in restored:
            self.store.restore(template, fields, pcr, violation=not any(digest))
        self.kexec_segment = None  # size of a loaded kexec segment
        algo, digest, sha1 = boot_aggregate(self.pcrs, self.ima_hash)
        self.add_event(T.Event(name=b"boot_aggregate", file_digest=digest, file_algo=algo,
                               ima_hash=self.ima_hash, d_digest=sha1))
        self.klog.kernel("ima: No architecture policies found")  # imafs emulates no arch policy
        self.critical_data("kernel_version", "kernel_info", self.profile.release.encode())
        self._boot_firmware_keys()

    def _boot_keyrings(self) -> None:
        """The keyrings of a new kernel, before IMA starts: the blacklist's
        compiled-in hashes, then the builtin certificates (certs/ loads them
        first), queued for measurement."""
        p = self.profile
        self.keyrings = Keyrings(p.integrity_trusted_keyring, p.ima_keyrings_permit_signed_by_builtin_or_secondary,
                                 tbs_sha256=p.kernel_version >= (7, 0))
        for entry in p.blacklist_hashes:
            self.keyrings.add_blacklist(entry)
        self.key_queue = KeyQueue(p.key_queue_timeout)
        builtin = dict(p.boot_certs).get(BUILTIN, ())
        if builtin:
            self.klog.kernel("Loading compiled-in X.509 certificates")
        for der in builtin:
            self._boot_key(BUILTIN, der, "Problem loading in-kernel X.509 certificate ({})", "Loaded X.509 cert '{}'")

    def _boot_firmware_keys(self) -> None:
        """The MOK (.machine) and UEFI db (.platform) certificates, which
        load_uefi_certs adds after IMA's init: queued as well."""
        for ring, source in ((MACHINE, "UEFI:MokListRT (MOKvar table)"), (PLATFORM, "UEFI:db")):
            for der in dict(self.profile.boot_certs).get(ring, ()):
                self.klog.kernel(f"integrity: Loading X.509 certificate: {source}")
                self._boot_key(ring, der, "integrity: Problem loading X.509 certificate {}",
                               "integrity: Loaded X.509 cert '{}'")

    def _boot_key(self, ring: str, der: bytes, problem: str, loaded: str) -> None:
        """One certificate loaded by the kernel, logged as it logs it; one the
        blacklist refuses is left out (the profile checked everything else)."""
        try:
            key, _ = self.add_key(ring, der, boot=True)
        except KeyringError as e:
            for line in e.log:
                self.klog.kernel(line)
            self.klog.kernel(problem.format(-e.errno))
        else:
            self.klog.kernel(loaded.format(key.description))

    def add_key(self, keyring: str, data: bytes, *, uid: int = 0, boot: bool = False) -> tuple[Key, dict]:
        """key_create_or_update of a certificate, then IMA's hook: the key
        and how the hook decided (:meth:`key_check`)."""
        key = self.keyrings.add(keyring, data, uid=uid, boot=boot)
        if boot:  # before IMA's init: queued, or dropped once the timer has run out
            self.key_queue.queue(key.keyring, key.der)
            return key, dict(QUEUED)
        return key, self.key_check(key.keyring, key.der, uid=uid)

    def key_check(self, keyring: str, payload: bytes, *, uid: int = 0) -> dict:
        """ima_post_key_create_or_update, for a key added to ``keyring``
        (an emulated one, or a real one in ``imafs run``): queued until a
        custom policy is loaded, or measured as a KEY_CHECK buffer named
        after the keyring.  How it was decided, with "queued"."""
        if not payload:
            return {"queued": False, "added": False, "decision": "no payload: not measured"}
        if self.key_queue.queue(keyring, payload):
            return dict(QUEUED)
        return {"queued": False, **self.measure_buffer("KEY_CHECK", keyring, payload, keyring=keyring, uid=uid)}

    def _policy_updated(self) -> None:
        """A custom policy was loaded: hooks decide anew; the queued keys are
        measured against it (as the policy writer, root)."""
        self.epoch.bump()
        for keyring, payload in self.key_queue.process():
            self.measure_buffer("KEY_CHECK", keyring, payload, keyring=keyring, uid=0)

    def critical_data(self, name: str, label: str, buf: bytes) -> None:
        """A CRITICAL_DATA event, measured when the policy says so."""
        self.measure_buffer("CRITICAL_DATA", name, buf, label=label)

    def measure_buffer(self, func: str, name: str, buf: bytes, *, keyring: str | None = None,
                       label: str | None = None, uid: int | None = None) -> dict:
        """A buffer hook (KEXEC_CMDLINE, KEY_CHECK, CRITICAL_DATA): the first
        matching measure/dont_measure rule decides; the record uses ima-buf
        unless the rule names a template. Returns how it was decided."""
        rule = measure_decision(self.policy.rules, HookEvent(func, keyring=keyring, label=label,
                                                                   uid=uid, euid=uid))
        added = False
        if rule is not None and rule.action == "measure":
            if self.suspended:
                return self._buffer_suspended(func, name, rule, uid or 0)
            ev = self._content_event(name.encode(), buf)
            ev.buf = buf
            added = self.add_event(ev, rule.template or T.BUILTIN_TEMPLATES["ima-buf"], rule.pcr)
        return self.decided(name, func, rule, added)

    def _buffer_suspended(self, func: str, name: str, rule: Rule, uid: int) -> dict:
        """A buffer measured while measurements are suspended: the store step
        refuses it (-ENODEV) and audits why, then process_buffer_measurement
        audits its failed store; nothing is recorded."""
        subject = Task.explicit(uid, uid, 0, 0).subject()
        self.klog.integrity(1804, subject, "add_template_measure", "measurements_suspended", 0, name=name)
        self.klog.integrity(1804, subject, MEASURING[func], "store_entry", 0, name=name, errno=-errno.ENODEV)
        return self.decided(name, func, rule, False, "measure: not stored, measurements are suspended")

    # -- the store step ----------------------------------------------------------
    def add_event(self, ev: T.Event, template: T.Template | None = None, pcr: int | None = None) -> bool:
        """Encode ``ev`` with ``template`` (default: the boot template) and append it.

        Violations always use the default template and PCR (kernel-abi.md §4.4)
        and count in ``violations`` first, even when the entry cannot be
        stored (measurements suspended); they are never deduplicated.
        """
        if ev.violation:
            template, pcr = self.template, self.profile.pcr_idx
            self.store.violations += 1
        if self.suspended:
            raise RequestError("measurements are suspended: a reboot or kexec is under way")
        template = template or self.template
        pcr = self.profile.pcr_idx if pcr is None else pcr
        fields = T.encode_fields(template, ev)
        return self.store.add(template, fields, pcr, violation=ev.violation)

    # -- requests (control socket) ------------------------------------------------
    def record(self, *, name: str, file: str | None = None, digest: str | None = None,
               buffer_hex: str | None = None, violation: bool = False,
               pcr: int | None = None, template: str | None = None) -> Steps[dict]:
        """Append one record for the ``record`` command; returns what was done."""
        sources = [x is not None for x in (file, digest, buffer_hex)]
        if violation:
            if digest is not None or buffer_hex is not None:
                raise RequestError("a violation has no digest or buffer (it is recorded as zeros)")
            if pcr is not None or template is not None:
                raise RequestError("a violation always uses the default template and PCR "
                                   f"({self.template.display_name}, {self.profile.pcr_idx})")
        elif sum(sources) != 1:
            raise RequestError("give exactly one of --file, --digest, --buffer-hex or --violation")
        if not name:
            raise RequestError("the record name must not be empty")
        if "\0" in name:
            raise RequestError("the record name must not contain NUL")
        if pcr is not None and not 0 <= pcr <= 63:
            raise RequestError(f"pcr {pcr} out of range 0..63")
        try:
            tmpl = T.lookup_template(template) if template else None
        except T.TemplateError as e:
            raise RequestError(f"template: {e}") from None
        ev = T.Event(name=os.fsencode(name), ima_hash=self.ima_hash, violation=violation)
        if file is not None:
            boot = self.boots
            st, ev.file_digest, ev.d_digest, xattrs = yield Blocking(
                _file_facts, self.real_path(file), None if violation else self.ima_hash)
            if self.boots != boot:
                raise RequestError("the emulated kernel rebooted while the file was read: nothing recorded")
            if not violation:
                ev.file_algo = self.ima_hash
            ev.uid, ev.gid, ev.mode = st.st_uid, st.st_gid, st.st_mode & 0xFFFF
            ev.ima_xattr, ev.evm_xattr = xattrs.get("security.ima"), xattrs.get("security.evm")
            ev.evm_xattrs = tuple((n, xattrs[n]) for n in EVM_XATTRS if n in xattrs)
        elif digest is not None:
            self._fill_digest(ev, digest)
        elif buffer_hex is not None:
            try:
                buf = bytes.fromhex(buffer_hex)
            except ValueError:
                raise RequestError("--buffer-hex: not a hexadecimal string") from None
            ev = self._content_event(ev.name, buf)
            ev.buf = buf
            tmpl = tmpl or T.BUILTIN_TEMPLATES["ima-buf"]
        if (tmpl or self.template).fields.count("d") and ev.d_digest is None and not violation \
                and ev.file_algo not in ("sha1", "md5"):
            raise RequestError(f"template {(tmpl or self.template).display_name} has the legacy 'd' field: "
                               "give a sha1 or md5 digest, a file or a buffer")
        added = self.add_event(ev, tmpl, pcr)
        return {"added": added, "count": self.store.current.count, "violations": self.store.violations}

    # -- hooks (ima_main.c process_measurement) -------------------------------------------
    def _policy_check(self, path: str, writer) -> Steps[dict]:
        """The POLICY_CHECK hook of a policy loaded by path: the file is read
        (measured, appraised) by the task that wrote the path."""
        return self.measure_file(path, "POLICY_CHECK", MAY_READ, task=Task.of_pid(writer.pid, writer.uid, 0))

    def measure_file(self, path: str, func: str, mask: int = 0, *, uid: int = 0, euid: int | None = None,
                     gid: int = 0, egid: int | None = None, name: str | None = None,
                     task: Task | None = None) -> Steps[dict]:
        """An explicit file hook: the policy decides with the given credentials
        (or those of ``task``) and the file's owner and filesystem, through
        the iint cache."""
        func = FUNCS.get(func)
        if func is None or func in BUFFER_FUNCS:
            raise RequestError("--func: not a file hook; file hooks: "
                               + ", ".join(sorted(set(FUNCS.values()) - set(BUFFER_FUNCS))))
        real = self.real_path(path)
        boot = self.boots
        st, fs = yield Blocking(_stat_fs, real)
        if self.boots != boot:
            raise RequestError("the emulated kernel rebooted while the file was looked up: nothing measured")
        recorded = name or (path if real != path else os.path.realpath(path))
        if not stat.S_ISREG(st.st_mode):
            return self.decided(recorded, func, None, False, "not a regular file: never measured")
        task = task or Task.explicit(uid, uid if euid is None else euid, gid, gid if egid is None else egid)
        f = OpenedFile(key=(st.st_dev, st.st_ino), name=os.fsencode(recorded), st=st, fs=fs, path=real)
        return (yield from self.measurer.process(f, task, func, mask))

    def real_path(self, path: str) -> str:
        """Where the daemon finds ``path`` without going through its own FUSE
        loop: a path under a measured mount maps to its source directory."""
        for src, dst in self.measured_dirs:
            if path == dst or path.startswith(dst.rstrip("/") + "/"):
                return src + path[len(dst):]
        return path

    def decided(self, name: str, func: str, rule: Rule | None, added: bool, why: str = "",
                violations: list[str] = ()) -> dict:
        """Remember and report how a hook event was decided."""
        event = {"name": name, "func": func, "added": added,
                 "decision": why or (rule.action if rule else "no matching measure rule: not measured"),
                 "rule": rule.render().rstrip() if rule else None}
        if violations:
            event["violations"] = list(violations)
        self.last_events.append(event)
        return event

    def _content_event(self, name: bytes, content: bytes) -> T.Event:
        """An event for ``content`` hashed with the IMA hash (and sha1/md5 for `d`)."""
        return T.Event(name=name, file_algo=self.ima_hash, file_digest=T.hash_bytes(self.ima_hash, content),
                       ima_hash=self.ima_hash, d_digest=self._d_of(content))

    def _d_of(self, content: bytes) -> bytes:
        return hashlib.md5(content).digest() if self.ima_hash == "md5" else hashlib.sha1(content).digest()

    def _fill_digest(self, ev: T.Event, spec: str) -> None:
        algo, sep, hexd = spec.partition(":")
        if not sep:
            raise RequestError("--digest: expected ALG:HEX, e.g. sha256:5891b5b5…")
        try:
            size = T.digest_size(algo)
        except T.UnknownHashError:
            raise RequestError(f"--digest: unknown hash algorithm {algo!r}; known: "
                               + ", ".join(T.HASH_ALGOS)) from None
        try:
            raw = bytes.fromhex(hexd)
        except ValueError:
            raise RequestError("--digest: not a hexadecimal digest") from None
        if len(raw) != size:
            raise RequestError(f"--digest: a {algo} digest has {size} bytes, got {len(raw)}")
        ev.file_algo, ev.file_digest = algo, raw
        if algo in ("sha1", "md5"):
            ev.d_digest = raw

    def generate(self, count: int) -> int:
        """Append ``count`` realistic synthetic file records, each new since
        the daemon started; returns how many were added."""
        start = self._synthetic
        self._synthetic += count
        tmpl = self.template
        has_inode = any(f in tmpl.fields for f in ("iuid", "igid", "imode"))
        added = 0
        for i in range(start, start + count):
            content = b"imafs synthetic content %d" % i
            name = _synthetic_path(i)
            ev = self._content_event(name, content)
            if has_inode:
                ev.uid, ev.gid, ev.mode = 0, 0, 0o100755 if name.startswith(b"/usr/bin") else 0o100644
            added += self.add_event(ev, tmpl)
        return added

    # -- staging (staging.md §1.6) ----------------------------------------------------
    def stage(self) -> None:
        s = self.store
        if s.staged.count:
            raise FsError(errno.EEXIST)
        if not s.current.count:
            raise FsError(errno.ENOENT)
        if self.suspended:
            raise FsError(errno.EACCES)
        s.stage()

    def delete_staged(self) -> None:
        if not self.store.staged.count:
            raise FsError(errno.ENOENT)
        if self.suspended:
            raise FsError(errno.ESTALE)
        self.store.delete_staged(self.flush_htable)

    def trim(self, n: int) -> None:
        if self.store.current.count < n:
            raise FsError(errno.ENOENT)
        if self.suspended:
            raise FsError(errno.ESTALE)
        self.store.current.trim(n)

    # -- reboot and kexec (kernel-abi.md §6, staging.md §3.2) -----------------------------
    def suspend(self) -> None:
        """The reboot notifier: later measurements are rejected, A gets
        EACCES, D and N get ESTALE."""
        self.suspended = True

    def kexec_buffer(self) -> bytes:
        """The kexec buffer as it would be copied now: staged records, then current."""
        return kexec.dump([self.store.staged, self.store.current])

    def kexec_load(self) -> None:
        """kexec_file_load: size the segment for the lists (kernel-abi.md §6.2)
        and, from 6.16, record the `kexec_load` critical data."""
        page = 4096
        need = self.store.current.kexec_size + self.store.staged.kexec_size + kexec.HEADER.size + page // 2
        self.kexec_segment = -(-need // page) * page
        self._kexec_event("kexec_load")

    def _kexec_event(self, name: str) -> None:
        if self.profile.kernel_version < (6, 16):
            return
        full = self.counters()["BINARY_FULL"]
        text = (f"kexec_segment_size={self.kexec_segment};ima_binary_runtime_size={full['binary_runtime_size']};"
                f"ima_runtime_measurements_count={full['records']};")
        self.critical_data(name, "ima_kexec", text.encode())

    def kexec(self) -> bytes:
        """Load if not loaded, record `kexec_execute`, suspend, copy the lists
        into the kexec buffer and boot the next kernel from it (a kexec does
        not reset the PCRs). Returns the buffer."""
        if self.kexec_segment is None:
            self.kexec_load()
        if not self.suspended:
            self._kexec_event("kexec_execute")
        self.suspend()
        buf = self.kexec_buffer()
        records, error = kexec.parse(buf)
        if error:
            log.warning("ima: restoring the kexec buffer stopped: %s", error)
        self._boot(records)
        return buf

    def boot_from_buffer(self, buf: bytes) -> None:
        """Boot a new kernel from a kexec buffer captured elsewhere."""
        try:
            records, error = kexec.parse(buf)
        except kexec.KexecBufferError as e:
            raise RequestError(f"kexec buffer: {e}") from None
        if error:
            raise RequestError(f"kexec buffer: {error} (the kernel would restore only "
                               f"the {len(records)} records before it)")
        self._boot(records)

    def reboot(self) -> None:
        """A cold boot: PCRs back to their boot values, an empty list."""
        if self.pcrs is not None:
            self.pcrs.reset()
        self._boot(())

    def counters(self) -> dict:
        """The staging counters (staging.md §2); sizes include the kexec header
        and are ULONG_MAX without CONFIG_IMA_KEXEC."""
        s = self.store
        hdr = kexec.HEADER.size

        def size(n):
            return min(n + hdr, 2**64 - 1) if self.profile.kexec else 2**64 - 1
        return {
            "BINARY": {"records": s.current.count, "binary_runtime_size": size(s.current.kexec_size)},
            "BINARY_STAGED": {"records": s.staged.count, "binary_runtime_size": size(s.staged.kexec_size)},
            "BINARY_FULL": {"records": s.full_count, "binary_runtime_size": size(s.full_size)},
        }

    def status(self) -> dict:
        from .profile import profile_to_dict
        return {
            "pid": os.getpid(),
            "profile": profile_to_dict(self.profile),
            "release": self.profile.release,  # uname -r
            "template": self.template.display_name,
            "ima_hash": self.ima_hash,
            "kernel_log": os.fspath(self.klog.path) if self.klog.path else None,
            "policy": [r.render().rstrip() for r in self.policy.rules if not r.inert],
            "last_events": list(self.last_events),
            "count": self.store.current.count,
            "staged": self.store.staged.count,
            "violations": self.store.violations,
            "suspended": self.suspended,
            "blocks_to_free": len(self.store.graveyard),
            "iint_cache": self.iint.stats(),
            "counters": self.counters(),
            "tpm": self.pcrs.describe() if self.pcrs else {"backend": "none (TPM-bypass)"},
            # a TPM's PCRs are read by the daemon (control.cmd_status), not here
            "pcrs": {b: {str(i): v.hex() for i, v in enumerate(self.pcrs.values(b))}
                     for b in self.pcrs.banks} if self.pcrs and self.pcrs.backend == "soft" else {},
        }


_DIRS = (b"/usr/bin/", b"/usr/sbin/", b"/usr/lib/x86_64-linux-gnu/", b"/usr/libexec/",
         b"/etc/", b"/usr/lib/python3/dist-packages/", b"/opt/app/bin/", b"/var/lib/")
_STEMS = (b"libc", b"libssl", b"python", b"bash", b"systemd", b"sshd", b"keylime",
          b"libcrypto", b"ld-linux", b"agent", b"config", b"module")
_SUFFIX = (b".so.6", b"", b".py", b".conf", b".so.3", b"", b".sh", b".so.1")


def _synthetic_path(i: int) -> bytes:
    return (_DIRS[i % 8] + _STEMS[(i // 8) % 12] + b"-%d" % i + _SUFFIX[(i // 96) % 8])
