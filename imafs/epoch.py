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
piece: a reader that ever sees the two disagree (a torn read) takes the
epoch as unknown and asks the daemon.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

_PAIR = struct.Struct("<QQ")
_MASK = (1 << 64) - 1


class Epoch:
    """The daemon's counter; :meth:`share` publishes it in a file."""

    def __init__(self):
        self.value = 0
        self.path: Path | None = None
        self._map: mmap.mmap | None = None

    def bump(self) -> None:
        self.value += 1
        if self._map is not None:
            self._map[:_PAIR.size] = _PAIR.pack(self.value, self.value ^ _MASK)  # one memcpy

    def share(self, path: Path) -> None:
        """Publish the counter at ``path`` (mode 0644: anyone who may reach
        the control socket's directory may read it; it tells nothing but a
        number), created under a private name and renamed into place."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.fchmod(fd, 0o644)
            os.ftruncate(fd, _PAIR.size)
            self._map = mmap.mmap(fd, _PAIR.size)
        finally:
            os.close(fd)
        self.path = path
        self.bump()
        os.replace(tmp, path)

    def close(self) -> None:
        """Unpublish: a reader still mapping the file reads no epoch from now on."""
        if self._map is not None:
            self._map[:_PAIR.size] = _PAIR.pack(self.value, self.value)
            self._map.close()
            self._map = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class EpochView:
    """A reader's view of a published epoch (the supervisor's)."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, _PAIR.size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def read(self) -> int | None:
        """The epoch now; None if the read was torn."""
        value, check = _PAIR.unpack(self._map[:_PAIR.size])
        return value if value ^ check == _MASK else None
