"""The rest of the emulated kernel, as files: what ``imafs run`` bind-mounts
over ``/proc/cmdline``, ``/proc/sys/kernel/osrelease``, ``/dev/kmsg``,
``/var/log/audit/audit.log`` and ``/sys/class/tpm`` inside a run.

The daemon serves them in a directory of its securityfs root that readdir
does not list (:data:`HIDDEN_NAME`, reached by lookup only, like the
measured mounts' roots), so every view is live and exact — a PCR file reads
the TPM at each open, the logs render the kernel log as it grows — and an
``imafs run --mount MP`` that joins a daemon already mounted finds the same
files under ``MP``.  Kernel counterparts: ``fs/proc/cmdline.c``,
``kernel/printk/printk.c`` (``devkmsg_read``), auditd's log writer, and
``drivers/char/tpm/tpm-sysfs.c`` (``tpm_version_major``, the
``pcr-<bank>/<n>`` groups).

Decision: the kernel prints an audit record either to auditd or, when no
auditd runs, to the kernel log; here both views show every record, so tools
that grep ``/var/log/audit/audit.log`` and tools that read ``dmesg`` find it
(docs/deviations.md).
"""

from __future__ import annotations

import errno
import os
import re
import stat

import trio

from .errors import FsError, RequestError
from .securityfs import S_DIR, Directory, Node, OpenFile, StaticFile
from .tpm import NUM_PCRS

HIDDEN_NAME = ".imafs-kernel"  # securityfs-root name of the views' directory
S_RO = stat.S_IFREG | 0o444
S_KMSG = stat.S_IFREG | 0o644
S_AUDIT = stat.S_IFREG | 0o600  # auditd's log_group root, mode 0600
KMSG_WAIT = 0.2  # seconds between looks at the kernel log of a blocking /dev/kmsg read
KMSG_WAITERS = 16  # blocking /dev/kmsg reads that may wait at once; more get EAGAIN

# linux/audit.h: AUDIT_INTEGRITY_* record types by the names auditd prints
AUDIT_TYPES = {1800: "INTEGRITY_DATA", 1801: "INTEGRITY_METADATA", 1802: "INTEGRITY_STATUS",
               1803: "INTEGRITY_HASH", 1804: "INTEGRITY_PCR", 1805: "INTEGRITY_RULE",
               1806: "INTEGRITY_EVM_XATTR", 1807: "INTEGRITY_POLICY_RULE"}
BOOT_PARAMS = ("ima_policy", "ima_template", "ima_template_fmt", "ima_hash", "ima_canonical_fmt",
               "ima_flush_htable", "ima_appraise")
LOG_NOTICE, LOG_INFO, LOG_ERR = 5, 6, 3

_LINE = re.compile(rb"\[ *(\d+)\.(\d{6})\] (.*)")
_AUDIT = re.compile(rb"audit: type=(\d+) (audit\([0-9.:]+\): .*)")


def cmdline(profile) -> bytes:
    """/proc/cmdline of the emulated kernel: a plausible boot line, then the
    boot parameters the profile sets, as the kernel's command line spells them."""
    parts = [f"BOOT_IMAGE=/boot/vmlinuz-{profile.release}", "root=/dev/vda1", "ro"]
    for key in BOOT_PARAMS:
        value = getattr(profile, key, None)
        if key not in profile.explicit and not (key == "ima_policy" and value):
            continue
        if isinstance(value, bool):
            if value:
                parts.append(key)
        elif value:
            parts.append(f"{key}={value}")
    return " ".join(parts).encode() + b"\n"


def kmsg_record(seq: int, line: bytes) -> bytes | None:
    """One kernel-log line as ``devkmsg_read`` hands it out:
    ``<level>,<seq>,<usecs>,-;<text>\\n``.  The log keeps no level: audit
    records are printed at KERN_NOTICE (audit_printk_skb), imafs's BUG lines
    at KERN_ERR, the rest at KERN_INFO (ima's pr_info)."""
    m = _LINE.fullmatch(line)
    if m is None:
        return None
    usecs = int(m[1]) * 1_000_000 + int(m[2])
    text = m[3]
    level = LOG_NOTICE if text.startswith(b"audit: ") else LOG_ERR if text.startswith(b"imafs: BUG") \
        else LOG_INFO
    return b"%d,%d,%d,-;%s\n" % (level, seq, usecs, text)


def audit_line(line: bytes) -> bytes | None:
    """An audit record of the kernel log as auditd writes it (log_format =
    RAW): ``type=NAME msg=audit(secs.millis:serial): body``."""
    m = _LINE.fullmatch(line)
    a = _AUDIT.fullmatch(m[3]) if m else None
    if a is None:
        return None
    rtype = int(a[1])
    name = AUDIT_TYPES.get(rtype, f"UNKNOWN[{rtype}]")
    return b"type=%s msg=%s\n" % (name.encode(), a[2])


class KernelLogLines:
    """The lines of the kernel log file, read as it grows (only what was
    appended since the last look), off the event loop."""

    def __init__(self, path):
        self.path = path
        self.lines: list[bytes] = []
        self._offset = 0
        self._tail = b""
        self._lock = trio.Lock()  # one look at a time: each takes what the last one left

    def _read_new(self) -> bytes:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                return f.read()
        except FileNotFoundError:  # created by the first line logged
            return b""

    async def refresh(self) -> list[bytes]:
        if self.path is None:
            return self.lines
        async with self._lock:
            data = await trio.to_thread.run_sync(self._read_new)
            self._offset += len(data)
            *done, self._tail = (self._tail + data).split(b"\n")
            self.lines.extend(done)
        return self.lines


def signalled(pid: int) -> bool:
    """Whether task ``pid`` has a signal pending that it neither blocks nor
    ignores, or is gone: what ends an interruptible wait in the kernel.
    (pyfuse3 does not pass FUSE_INTERRUPT on, so a waiting read asks.)"""
    wanted = ("SigPnd", "ShdPnd", "SigBlk", "SigIgn")
    try:
        with open(f"/proc/{pid}/status") as f:
            masks = {k: int(v, 16) for k, _, v in (line.partition(":") for line in f) if k in wanted}
    except OSError:
        return True
    pending = masks["SigPnd"] | masks["ShdPnd"]
    return bool(pending & ~masks["SigBlk"] & ~masks["SigIgn"])


class PcrFile(Node):
    """pcr-<bank>/<n>: the PCR read from the TPM at each read from offset 0,
    in upper-case hex and a newline (pcr_value_show)."""

    __slots__ = ("bank", "index")

    def __init__(self, *args, bank: str, index: int):
        super().__init__(*args)
        self.bank, self.index = bank, index

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        if offset == 0 or f.session is None:
            try:
                values = await self.tree.ima.pcrs.snapshot()
            except RequestError:  # the TPM failed: tpm_pcr_read's error, as -EIO
                raise FsError(errno.EIO) from None
            f.session = values[self.bank][self.index].hex().upper().encode() + b"\n"
        return f.session[offset:offset + size]


class KmsgFile(Node):
    """/dev/kmsg: each open reads from the first record on; each read gets
    one whole record (EINVAL if it does not fit); at the end, EAGAIN with
    O_NONBLOCK, else the read waits for the next record, or until the
    task that opened it is signalled (EINTR) or gone.  A waiting read holds
    one of the FUSE loop's workers, so at most KMSG_WAITERS wait at once and
    the next get EAGAIN: no number of readers stalls the daemon."""

    __slots__ = ("lines", "waiting")

    def __init__(self, *args, lines: KernelLogLines):
        super().__init__(*args)
        self.lines = lines
        self.waiting = 0

    def open(self, flags: int, pid: int) -> OpenFile:
        return OpenFile(self, flags, session=[0, pid])  # the next sequence number, the opener

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        while True:
            lines = await self.lines.refresh()
            while f.session[0] < len(lines):
                seq = f.session[0]
                record = kmsg_record(seq, lines[seq])
                if record is not None and len(record) > size:
                    raise FsError(errno.EINVAL)
                f.session[0] += 1
                if record is not None:
                    return record
            if f.flags & os.O_NONBLOCK or self.waiting >= KMSG_WAITERS:
                raise FsError(errno.EAGAIN)
            if signalled(f.session[1]):  # ^C, a kill: the wait ends as devkmsg_read's
                raise FsError(errno.EINTR)
            self.waiting += 1
            try:
                await trio.sleep(KMSG_WAIT)
            finally:
                self.waiting -= 1


class AuditLogFile(Node):
    """audit.log: the audit records of the kernel log as auditd writes them,
    rendered at each read from offset 0."""

    __slots__ = ("lines",)

    def __init__(self, *args, lines: KernelLogLines):
        super().__init__(*args)
        self.lines = lines

    async def read(self, f: OpenFile, offset: int, size: int) -> bytes:
        if offset == 0 or f.session is None:
            lines = await self.lines.refresh()
            f.session = b"".join(filter(None, map(audit_line, lines)))
        return f.session[offset:offset + size]


def add_views(tree) -> None:
    """The hidden views directory of ``tree`` (a securityfs Tree): in its
    root's ``hidden`` names, never in a readdir."""
    ima = tree.ima
    views = tree._node(Directory, HIDDEN_NAME, S_DIR, None)
    views.parent = tree.root
    tree.root.hidden[HIDDEN_NAME] = views
    lines = KernelLogLines(ima.klog.path)
    tree._node(StaticFile, "cmdline", S_RO, views, data=cmdline(ima.profile))
    tree._node(StaticFile, "osrelease", S_RO, views, data=ima.profile.release.encode() + b"\n")
    tree._node(KmsgFile, "kmsg", S_KMSG, views, lines=lines)
    tree._node(AuditLogFile, "audit.log", S_AUDIT, views, lines=lines)
    pcrs = ima.pcrs
    if pcrs is not None and pcrs.backend != "soft":  # /sys/class/tpm/tpm0 of a TPM 2.0
        tpm0 = tree._node(Directory, "tpm0", S_DIR, tree._node(Directory, "tpm", S_DIR, views))
        tree._node(StaticFile, "tpm_version_major", S_RO, tpm0, data=b"2\n")
        for bank in pcrs.banks:
            group = tree._node(Directory, f"pcr-{bank}", S_DIR, tpm0)
            for i in range(NUM_PCRS):
                tree._node(PcrFile, str(i), S_RO, group, bank=bank, index=i)
