"""The hook epoch: a counter that the daemon moves whenever something a file
hook's decision depends on changes — an iint, the writers of an inode, the
attributes of an open file, the policy, the kernel (a boot).

It is published in a small file beside the control socket so that the
seccomp supervisor of ``imafs run`` (imafs/supervise.py) can keep the answer
to a stopped ``mmap`` that changed nothing (the file already measured and
appraised, no record, no log line, no denial) and give it again, without a
round trip to the daemon, for as long as the epoch stands still: the
kernel's own fast path, where process_measurement finds the iint's work
done under the inode's lock and returns.

The file holds the counter twice, the second copy inverted, written in one
``pwrite``: a reader that ever sees the two disagree (a torn read) takes the
epoch as unknown and asks the daemon.  Both sides use plain reads and writes,
not a shared mapping: a file that someone truncates cannot fault either of
them (SIGBUS), it only reads as unknown until the next bump writes it again.
"""

from __future__ import annotations

import logging
import os
import struct
from pathlib import Path

log = logging.getLogger(__name__)

_PAIR = struct.Struct("<QQ")
_MASK = (1 << 64) - 1


class Epoch:
    """The daemon's counter; :meth:`share` publishes it in a file."""

    def __init__(self):
        self.value = 0
        self.path: Path | None = None
        self._fd: int | None = None

    def bump(self) -> None:
        self.value += 1
        if self._fd is not None:
            self._write(self.value ^ _MASK)

    def _write(self, check: int) -> None:
        try:
            os.pwrite(self._fd, _PAIR.pack(self.value, check), 0)
        except OSError as e:  # readers must not keep the old epoch: a short read is unknown to them
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                log.error("hook epoch %s: cannot write it (%s) nor empty it", self.path, e.strerror)

    def share(self, path: Path) -> None:
        """Publish the counter at ``path`` (mode 0644: anyone who may reach
        the control socket's directory may read it; it tells nothing but a
        number), created under a private name and renamed into place."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        os.fchmod(self._fd, 0o644)
        self.path = path
        self.bump()
        os.replace(tmp, path)

    def close(self) -> None:
        """Unpublish: a reader still holding the file reads no epoch from now on."""
        if self._fd is not None:
            self._write(self.value)  # a pair that does not check
            os.close(self._fd)
            self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class EpochView:
    """A reader's view of a published epoch (the supervisor's)."""

    def __init__(self, path: Path):
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> int | None:
        """The epoch now; None if unknown (a torn or short read)."""
        data = os.pread(self._fd, _PAIR.size, 0)
        if len(data) != _PAIR.size:
            return None
        value, check = _PAIR.unpack(data)
        return value if value ^ check == _MASK else None
