"""The emulated kernel's log: printk lines and audit records, as a kernel
without auditd prints them (kernel/printk, kernel/audit.c, integrity_audit.c).

Each line is ``[seconds.micros] text``.  An audit record is printed as
``audit: type=N audit(secs.millis:serial): body``; which fields its body has
depends on who made it: a policy rule record (type 1807) lists only the
parsed rule, while integrity records (integrity_audit_message: 1802 policy
status, 1804 PCR events) name the task whose system call caused them with
:class:`Subject`.

Decision: the emulated kernel runs the LSM of the Debian kernels the
observations come from (AppArmor) with every task unconfined, so each
integrity record carries ``subj=unconfined`` (docs/deviations.md).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

AUDIT_UNSET = 0xFFFFFFFF  # (u32)-1: no login uid, no session (AUDIT_UID_UNSET, AUDIT_SID_UNSET)
TASK_CONTEXT = "unconfined"  # what audit_log_task_context prints after " subj="


def untrusted(value: str | bytes) -> str:
    """audit_log_untrustedstring: in double quotes, or as upper-case hex when
    the string holds a quote, a space, a control character or a byte above 0x7e."""
    raw = os.fsencode(value)
    if any(b == 0x22 or b < 0x21 or b > 0x7E for b in raw):
        return raw.hex().upper()
    return f'"{raw.decode("ascii")}"'


def _read_proc(pid: int, name: str) -> bytes:
    fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 64)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Subject:
    """The task an integrity audit record names: pid, real uid, login uid,
    session and comm."""

    pid: int
    uid: int
    comm: bytes
    auid: int = AUDIT_UNSET
    ses: int = AUDIT_UNSET

    @classmethod
    def of_pid(cls, pid: int, uid: int, comm: str | bytes) -> "Subject":
        """Task ``pid`` whose real uid is ``uid``: its login uid, session and
        comm are read from /proc now.  What cannot be read (the task is gone,
        or ``pid`` is 0 for a task described by hand) stays unset, and the
        comm falls back to ``comm``."""
        try:
            auid = int(_read_proc(pid, "loginuid"))
            ses = int(_read_proc(pid, "sessionid"))
            name = _read_proc(pid, "comm").rstrip(b"\n")
        except (OSError, ValueError):
            return cls(pid, uid, os.fsencode(comm))
        return cls(pid, uid, name, auid, ses)


class KernelLog:
    """Appends kernel-format lines to ``path`` (none when path is None)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        self.boot = time.monotonic_ns()
        self.serial = 0
        self.lines = 0  # printk lines so far, written or not

    def kernel(self, text: str) -> None:
        """One printk line; ``text`` carries its prefix (``ima: …``)."""
        self.lines += 1
        if self.path is None:
            return
        secs, nsecs = divmod(time.monotonic_ns() - self.boot, 10**9)
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"[{secs:5d}.{nsecs // 1000:06d}] {text}\n")

    def audit(self, rtype: int, body: str) -> None:
        """An audit record (audit_log_start … audit_log_end)."""
        self.serial += 1
        secs, nsecs = divmod(time.time_ns(), 10**9)
        self.kernel(f"audit: type={rtype} audit({secs}.{nsecs // 10**6:03d}:{self.serial}): {body}")

    def integrity(self, rtype: int, task: Subject, op: str, cause: str, res: int, *,
                  name: str | bytes | None = None, dev: str | None = None, ino: int | None = None,
                  errno: int = 0) -> None:
        """An integrity record (integrity_audit_message); ``name`` is the file
        or event it is about, ``dev`` and ``ino`` its inode."""
        body = (f"pid={task.pid} uid={task.uid} auid={task.auid} ses={task.ses} subj={TASK_CONTEXT} "
                f"op={op} cause={cause} comm={untrusted(task.comm)}")
        if name is not None:
            body += f" name={untrusted(name)}"
        if dev is not None:
            body += f" dev={untrusted(dev)} ino={ino}"
        self.audit(rtype, body + f" res={res} errno={errno}")
