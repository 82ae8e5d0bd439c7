"""The securityfs side of the keeper: reading the lists and writing A, D and N.

Only the files of staging.md §1 are used, so the keeper runs on a real 7.2
kernel as on imafs. Every open is its own open/close: the kernel's exclusion
lock (one writer, or readers) is held as briefly as possible, and a busy list
(EBUSY, another reader or writer) is retried with a backoff. The layout is
found from the files present; where `A` goes (v7: the `_staged` file; v5: the
original) is learned from the kernel's answer, since both layouts have the
same files.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import time
from pathlib import Path

from ..templates import MAX_LIST_TEMPLATE_NAME_LEN

log = logging.getLogger("imafs.keeper")

_U32 = struct.Struct("<I").unpack_from
KEXEC_HEADER = 24  # struct ima_kexec_hdr, counted in binary_runtime_size (kernel-abi.md §6.1)
BUSY_TIMEOUT = 30.0  # seconds of EBUSY before a cycle gives up (and retries later)
READ_SIZE = 1 << 20  # bytes per read(2) of a list
IMA_HEAD = 20  # the `ima` template: its d (sha1) before the name's length, no template data length


class KeeperFatal(Exception):
    """An error no retry will fix (permissions, no IMA, no staging)."""


class Busy(Exception):
    """The lists stayed busy (another reader or writer) for BUSY_TIMEOUT."""


class Ima:
    """The measurement-list files of one securityfs tree."""

    def __init__(self, securityfs: str | os.PathLike, abi: str = "auto", busy_timeout: float = BUSY_TIMEOUT):
        root = Path(securityfs)
        self.dir = root / "ima" if (root / "ima").is_dir() else root
        if not (self.dir / "binary_runtime_measurements").exists():
            raise KeeperFatal(f"{self.dir}: no binary_runtime_measurements (not an IMA securityfs directory)")
        self.staged = self._first("binary_runtime_measurements_staged", "binary_runtime_measurements_sha1_staged")
        self.original = self.dir / "binary_runtime_measurements"
        self.abi = abi  # "v7", "v5" or "auto" until the first A answers
        self.busy_timeout = busy_timeout

    def _first(self, *names):
        for n in names:
            if (self.dir / n).exists():
                return self.dir / n
        return None

    @property
    def can_stage(self) -> bool:
        return self.staged is not None

    def banks(self) -> list[str]:
        """The PCR banks, from the per-bank file names (staging.md §1.2)."""
        pre = "binary_runtime_measurements_"
        return sorted(n[len(pre):] for n in os.listdir(self.dir)
                      if n.startswith(pre) and not n.endswith("_staged"))

    # -- opens, with the kernel's errors turned into decisions ----------------------
    def _open(self, path: Path, flags: int) -> int:
        deadline = time.monotonic() + self.busy_timeout
        delay = 0.01
        while True:
            try:
                return os.open(path, flags)
            except OSError as e:
                if e.errno == errno.EBUSY and time.monotonic() < deadline:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.5)
                    continue
                if e.errno == errno.EBUSY:
                    raise Busy(f"{path.name}: busy for {self.busy_timeout:.0f}s (another reader or writer)") from None
                if e.errno in (errno.EPERM, errno.EACCES):
                    what = "write" if flags & (os.O_WRONLY | os.O_RDWR) else "read"
                    raise KeeperFatal(f"{path}: {os.strerror(e.errno)} opening for {what}: the keeper must run "
                                      f"as root with CAP_SYS_ADMIN") from None
                raise

    def read(self, path: Path) -> bytes:
        fd = self._open(path, os.O_RDONLY)
        try:
            out = []
            while chunk := os.read(fd, READ_SIZE):
                out.append(chunk)
            return b"".join(out)
        finally:
            os.close(fd)

    def write(self, path: Path, data: bytes) -> int:
        """One command; 0 or the errno the kernel answered to the write."""
        fd = self._open(path, os.O_WRONLY)
        try:
            os.write(fd, data)
            return 0
        except OSError as e:
            return e.errno
        finally:
            os.close(fd)

    def read_staged(self) -> bytes:
        return self.read(self.staged) if self.staged else b""

    def read_head(self, records: int) -> bytes:
        """The oldest ``records`` records of the current list (all of it if it
        is shorter): read from the start in pieces and cut at a record's end,
        so a bounded chunk costs its own size, not the list's (N takes the
        oldest N). Only the length fields are walked; the cycle checks the
        records. A length that cannot be right (a name longer than the kernel
        allows) stops the walk: the rest is read whole, and the check says why."""
        fd = self._open(self.original, os.O_RDONLY)
        try:
            buf = bytearray()
            o = n = 0
            while n < records or len(buf) < o:
                if n < records and len(buf) >= o + 28:
                    nlen = _U32(buf, o + 24)[0]
                    if nlen > MAX_LIST_TEMPLATE_NAME_LEN:
                        n, o = records, -1  # not a record: no cut
                        continue
                    head = IMA_HEAD if buf[o + 28:o + 28 + nlen] == b"ima" else 0  # no data length
                    if len(buf) >= o + 32 + nlen + head:
                        o += 32 + nlen + head + _U32(buf, o + 28 + nlen + head)[0]
                        n += 1
                        continue
                chunk = os.read(fd, READ_SIZE)
                if not chunk:
                    break  # the list is shorter, or its last record is cut: the check says so
                buf += chunk
            if o < 0:
                while chunk := os.read(fd, READ_SIZE):
                    buf += chunk
                return bytes(buf)
            return bytes(buf[:o]) if n == records and o <= len(buf) else bytes(buf)
        finally:
            os.close(fd)

    def read_live(self) -> tuple[bytes, bytes]:
        """(staged list, current list) as one state: both are open for read
        before either is read, and no writer can open while readers hold them."""
        fds = []
        try:
            for path in (self.staged, self.original):
                fds.append(self._open(path, os.O_RDONLY) if path else None)
            out = []
            for fd in fds:
                parts = []
                while fd is not None and (chunk := os.read(fd, READ_SIZE)):
                    parts.append(chunk)
                out.append(b"".join(parts))
            return out[0], out[1]
        finally:
            for fd in fds:
                if fd is not None:
                    os.close(fd)

    def count(self) -> int:
        """``runtime_measurements_count``, in one read: the kernel prints the
        number at each read(2), so a second read (for EOF) would be cut from a
        newer number while records arrive ("0\n" then "00\n" of "2100\n")."""
        fd = self._open(self.dir / "runtime_measurements_count", os.O_RDONLY)
        try:
            return int(os.pread(fd, 64, 0))
        finally:
            os.close(fd)

    def longer_than(self, size: int) -> bool:
        """Whether ``binary_runtime_size`` exceeds ``size``. No securityfs file
        shows it (staging.md §2); it is the current list's length in the kexec
        format, i.e. the sha1 `binary_runtime_measurements` plus the 24-byte
        kexec header. So: one byte read at offset ``size - 24`` (the kernel's
        seq_file walks to it without copying the list to user space)."""
        fd = self._open(self.original, os.O_RDONLY)
        try:
            return bool(os.pread(fd, 1, max(size - KEXEC_HEADER, 0)))
        finally:
            os.close(fd)

    # -- commands -----------------------------------------------------------------------
    def stage(self) -> int:
        """`A`; 0 or the kernel's errno (EEXIST, ENOENT, EACCES)."""
        if self.abi in ("auto", "v7"):
            err = self.write(self.staged, b"A\n")
            if err != errno.EINVAL or self.abi == "v7":
                if not err and self.abi == "auto":
                    self.abi = "v7"
                return err
        err = self.write(self.original, b"A\n")  # v5: A on the original files
        if self.abi == "auto" and err != errno.EINVAL:
            log.info("keeper: A is taken on the original list: the v5 staging ABI")
            self.abi = "v5"
        return err

    def delete_staged(self) -> int:
        """`D`; 0 or the kernel's errno (ENOENT, ESTALE)."""
        return self.write(self.staged, b"D\n")

    def delete_oldest(self, n: int) -> int:
        """N; 0 or the kernel's errno (ENOENT, ESTALE, EINVAL in flush mode)."""
        return self.write(self.original, b"%d\n" % n)


def boot_id(path: str | None) -> str | None:
    """The kernel's boot id (/proc/sys/kernel/random/boot_id), or None."""
    if not path:
        return None
    try:
        return Path(path).read_text().strip() or None
    except OSError:
        return None
