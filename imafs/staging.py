"""The staging ABI of Linux 7.2 (staging.md §1): command parsing and the
reader/writer mediation of the measurement-list files."""

from __future__ import annotations

import errno
import re

from .errors import FsError

ULONG_MAX = 2**64 - 1
_KSTRTOUL = re.compile(rb"\+?([0-9]+)\n?")


def parse_command(data: bytes, staged_file: bool, abi: str, flush_htable: bool, offset: int = 0):
    """"A", "D" or N from one write(), checked in the kernel's order (§1.5).

    ``abi`` "v7": A and D on `_staged` files, N on originals, the file
    position ignored; "v5": A and N on originals, D on `_staged`, a write at
    a non-zero position refused.
    """
    if abi == "v5" and offset > 0:
        raise FsError(errno.EINVAL, "v5: no partial writes")
    if not 2 <= len(data) <= 21:
        raise FsError(errno.EINVAL, "a command is 2 to 21 bytes")
    if data[-1:] != b"\n":
        raise FsError(errno.EINVAL, "a command ends with a newline")
    text = data[:-1]
    first = text[:1]
    if first in (b"A", b"D"):
        on_staged = staged_file if (first == b"D" or abi != "v5") else not staged_file
        if len(data) != 2 or not on_staged:
            raise FsError(errno.EINVAL)
        return first.decode()
    if staged_file:
        raise FsError(errno.EINVAL)
    if flush_htable:
        raise FsError(errno.EINVAL, "N is refused under ima_flush_htable")
    # kstrtoul reads the command as a C string: it ends at the first NUL
    m = _KSTRTOUL.fullmatch(text.split(b"\0", 1)[0])
    if not m:
        raise FsError(errno.EINVAL)
    n = int(m.group(1))
    if n > ULONG_MAX:
        raise FsError(errno.ERANGE)
    if n == 0:
        raise FsError(errno.EINVAL)
    return n


LONG_MAX = 2**63 - 1


class MeasureLock:
    """One reader/writer scheme over every measurement-list file (v7 06/12).

    Opens never wait: readers share; a write open needs no other opener; the
    writer task may open more files for write. The writer is the task id FUSE
    reports for the open request (the calling thread, as the kernel's task).
    """

    def __init__(self):
        self.readers = 0
        self.writer: int | None = None
        self.writer_opens = 0

    def open(self, write: bool, task: int) -> None:
        if write:
            if self.writer is not None:
                if self.writer != task:
                    raise FsError(errno.EBUSY)
            elif self.readers:
                raise FsError(errno.EBUSY)
            self.writer = task
            self.writer_opens += 1
            return
        if self.writer is not None:
            raise FsError(errno.EBUSY)
        if self.readers == LONG_MAX:
            raise FsError(errno.ENFILE)
        self.readers += 1

    def release(self, write: bool) -> None:
        if write:
            self.writer_opens -= 1
            if self.writer_opens == 0:
                self.writer = None
        else:
            self.readers -= 1
