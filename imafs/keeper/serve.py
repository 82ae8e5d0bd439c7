"""`imafs keep serve`: the whole log as a read-only securityfs-like tree.

The same file names as the kernel's IMA directory (the lists per bank and
format, the sha1 names without a suffix, `runtime_measurements_count`), whose
content is the archive of the served boot followed by what the kernel still
holds: what the kernel would show had nothing been deleted. The log of a boot
only grows, and its rendering is deterministic, so a byte offset stays valid
across trims: an agent that remembers where it stopped reading reads exactly
the next records. A new boot starts the files over, as a reboot does.

Each open refreshes the log (archive and live list, in a worker thread) and
renders only the records not yet rendered; reads are served from memory.
`runtime_measurements_count` counts the whole log (the kernel's counts the
current list only).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import stat

import pyfuse3
import trio

from .. import templates as T
from .abi import Ima
from .whole import render, whole_log

log = logging.getLogger("imafs.keeper")


class WholeLog:
    """The served boot's records and their renderings (append-only per boot)."""

    def __init__(self, open_archive, securityfs: str | None):
        self.open_archive = open_archive
        self.ima = Ima(securityfs) if securityfs else None
        self.boot: object = ()
        self.recs: list = []
        self.rendered: dict[tuple[str, str], tuple[int, bytearray]] = {}

    def banks(self) -> list[str]:
        out = ["sha1"]
        for b in (self.ima.banks() if self.ima else []):
            try:
                T.hasher(b)
            except (T.UnknownHashError, ValueError):
                continue
            if b not in out:
                out.append(b)
        return out

    def refresh(self) -> None:
        """Blocking: the archive and the live list, read now."""
        a = self.open_archive()
        try:
            boot, recs = whole_log(a, self.ima)
        finally:
            a.close()
        if boot != self.boot or len(recs) < len(self.recs) or (
                self.recs and recs[len(self.recs) - 1].raw != self.recs[-1].raw):
            if self.recs:
                log.info("keeper serve: a new boot (%s): the files start over", boot)
            self.boot, self.recs, self.rendered = boot, recs, {}
        else:
            self.recs.extend(recs[len(self.recs):])

    def content(self, fmt: str, bank: str) -> bytearray:
        done, buf = self.rendered.get((fmt, bank), (0, bytearray()))
        if done < len(self.recs):
            buf += render(self.recs[done:], fmt, bank)
            self.rendered[fmt, bank] = (len(self.recs), buf)
        return buf


class ServeFs(pyfuse3.Operations):
    def __init__(self, whole: WholeLog):
        super().__init__()
        self.whole = whole
        names: list[tuple[str, tuple[str, str] | None]] = [("runtime_measurements_count", None)]
        for bank in whole.banks():
            for fmt in ("ascii", "binary"):
                names.append((f"{fmt}_runtime_measurements_{bank}", (fmt, bank)))
        names += [("ascii_runtime_measurements", ("ascii", "sha1")),
                  ("binary_runtime_measurements", ("binary", "sha1"))]
        self.files = {pyfuse3.ROOT_INODE + 1 + i: (n.encode(), what) for i, (n, what) in enumerate(names)}
        self.by_name = {n: ino for ino, (n, _) in self.files.items()}
        self.snapshots: dict[int, bytes] = {}
        self.next_fh = 1
        self.lock = trio.Lock()

    def _attrs(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            a.st_mode = stat.S_IFDIR | 0o755
        elif inode in self.files:
            a.st_mode = stat.S_IFREG | 0o440
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        a.st_nlink = 1
        a.attr_timeout = a.entry_timeout = 1
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name not in self.by_name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(self.by_name[name])

    async def opendir(self, inode, ctx):
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        for ino in sorted(self.files):
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, self.files[ino][0], self._attrs(ino), ino):
                return

    async def releasedir(self, fh):
        pass

    async def open(self, inode, flags, ctx):
        if inode not in self.files:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise pyfuse3.FUSEError(errno.EACCES)
        async with self.lock:  # one refresh at a time; the render cache is shared
            try:
                await trio.to_thread.run_sync(self.whole.refresh)
            except Exception as e:  # noqa: BLE001 - the kernel's answer to a list it cannot read
                log.error("keeper serve: cannot read the whole log: %s", e)
                raise pyfuse3.FUSEError(errno.EIO) from None
            what = self.files[inode][1]
            data = (b"%d\n" % len(self.whole.recs)) if what is None else bytes(self.whole.content(*what))
        fh = self.next_fh
        self.next_fh += 1
        self.snapshots[fh] = data
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh, off, size):
        return self.snapshots[fh][off:off + size]

    async def release(self, fh):
        self.snapshots.pop(fh, None)


def serve(open_archive, securityfs: str | None, mountpoint: str) -> int:
    fs = ServeFs(WholeLog(open_archive, securityfs))
    pyfuse3.init(fs, mountpoint, ["fsname=imafs-keep", "subtype=imafs-keep", "ro", "allow_other",
                                  "default_permissions"])
    log.info("keeper serve: the whole log at %s", mountpoint)

    async def main():
        async with trio.open_nursery() as nursery:
            async def stop_on_signal():
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                    async for _ in sigs:
                        nursery.cancel_scope.cancel()
                        return
            nursery.start_soon(stop_on_signal)
            nursery.start_soon(pyfuse3.main)

    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=True)
    return 0
