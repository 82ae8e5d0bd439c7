"""The emulated kernel's log: dmesg-style lines, audit records included."""

from __future__ import annotations

import os
import time


class KernelLog:
    """Appends kernel-format lines to ``path`` (none when path is None)."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = path
        self.boot = time.monotonic()
        self.serial = 0

    def kernel(self, text: str) -> None:
        if self.path is None:
            return
        t = time.monotonic() - self.boot
        with open(self.path, "a", encoding="utf-8", errors="surrogateescape") as f:
            f.write(f"[{t:12.6f}] {text}\n")

    def audit(self, rtype: int, text: str, res: int, pid: int = 0, comm: str = "imafs") -> None:
        """An audit record as the kernel prints it without auditd."""
        self.serial += 1
        now = time.time()
        self.kernel(f"audit: type={rtype} audit({now:.3f}:{self.serial}): pid={pid} uid=0 "
                    f"auid=4294967295 ses=4294967295 {text} comm=\"{comm}\" res={res}")

    def integrity(self, rtype: int, op: str, cause: str, res: int, *, pid: int, uid: int, comm: str,
                  name: str, dev: str, ino: int) -> None:
        """An integrity audit record about a file (integrity_audit_message)."""
        self.serial += 1
        self.kernel(f"audit: type={rtype} audit({time.time():.3f}:{self.serial}): pid={pid} uid={uid} "
                    f"auid=4294967295 ses=4294967295 op={op} cause={cause} comm=\"{comm}\" "
                    f"name=\"{name}\" dev=\"{dev}\" ino={ino} res={res} errno=0")
