"""`imafs keep serve`: the whole log as a read-only securityfs-like tree.

The same file names as the kernel's IMA directory (the lists per bank and
format, the sha1 names without a suffix, `runtime_measurements_count`), whose
content is the archive of the served boot followed by what the kernel still
holds: what the kernel would show had nothing been deleted. The log of a boot
only grows, and its rendering is deterministic, so a byte offset stays valid
across trims: an agent that remembers where it stopped reading reads exactly
the next records. A new boot starts the files over, as a reboot does.

Each open takes a snapshot (in a worker thread): the records archived since
the last open are added to an offset index (the archive is read whole once,
at the first open), and the live list is read and placed. A read is a range:
the archive's blocks that hold it (BLOCK records each, the last CACHED_BLOCKS
rendered blocks kept), then the snapshot's live records. The service's memory
is the index (two integers per BLOCK records) and the live list.
`runtime_measurements_count` counts the whole log: what the kernel would show
had nothing been deleted (the kernel's counts the current list only).
`--boot N` serves an earlier boot from the archive alone.
"""

from __future__ import annotations

import bisect
import errno
import logging
import os
import signal
import stat
from array import array
from collections import OrderedDict

import pyfuse3
import trio

from .. import templates as T
from .abi import Ima, KeeperFatal
from .archive import ArchiveError
from .trim import Records
from .whole import archived, parsed, render, stored, whole_log

log = logging.getLogger("imafs.keeper")


BLOCK = 256  # records between two marks of the offset index; the unit read from the archive
CACHED_BLOCKS = 64


class Snapshot:
    """What one open sees: the archive's first ``archived`` records of the boot
    (read in blocks when asked for), then the live records not archived at the
    open (held). Offsets never move: the archive only grows."""

    def __init__(self, log: WholeLog, view: tuple[str, str] | None, archived: int, live: Records):
        self.log, self.view, self.archived, self.live = log, view, archived, live
        self.index = log.index
        if view is None:
            self.tail = b"%d\n" % (archived + len(live))
            self.split = 0
        else:
            self.split = self.index.offset(view, archived)
            self.tail = None

    def live_bytes(self) -> bytes:
        if self.tail is None:
            self.tail = render(self.live, *self.view)
        return self.tail

    def read(self, off: int, size: int) -> bytes:
        """Blocking (archive reads)."""
        out = []
        if off < self.split:
            out.append(self.log.read_archived(self.index, self.view, off, min(size, self.split - off),
                                              self.archived))
        end = off + size
        if end > self.split:
            tail = self.live_bytes()
            out.append(tail[max(off - self.split, 0):end - self.split])
        return b"".join(out)


class Index:
    """Byte offsets of one boot's archived records in every view, from two sums:
    a record's length in the binary sha1 list and as an ascii sha1 line. Another
    bank's digest only changes the digest's length (binary: size-20 bytes more
    per record, ascii: twice that in hex), so one index serves every view. A
    mark every BLOCK records: a few bytes per BLOCK records."""

    def __init__(self, boot):
        self.boot = boot
        self.n = 0                     # records indexed
        self.marks = {"binary": array("Q", [0]), "ascii": array("Q", [0])}  # at record k*BLOCK
        self.total = {"binary": 0, "ascii": 0}                              # after record n-1

    def add(self, recs: Records) -> None:
        s = recs.starts
        for k, (pcr, digest, tmpl, fields) in enumerate(parsed(recs)):
            self.total["binary"] += s[k + 1] - s[k]
            self.total["ascii"] += len(T.ascii_record(pcr, digest, tmpl, fields))
            self.n += 1
            if self.n % BLOCK == 0:
                for fmt in ("binary", "ascii"):
                    self.marks[fmt].append(self.total[fmt])

    @staticmethod
    def delta(view) -> int:
        fmt, bank = view
        return (T.digest_size(bank) - 20) * (2 if fmt == "ascii" else 1)

    def offset(self, view, n: int) -> int:
        """Where record ``n`` starts in ``view`` (n <= self.n; a mark or the end)."""
        fmt = view[0]
        if n == self.n:
            base = self.total[fmt]
        else:
            assert n % BLOCK == 0
            base = self.marks[fmt][n // BLOCK]
        return base + n * self.delta(view)

    def block_at(self, view, off: int) -> int:
        """The block holding byte ``off`` of ``view``."""
        marks, d = self.marks[view[0]], self.delta(view) * BLOCK
        return bisect.bisect_right(range(len(marks)), off, key=lambda k: marks[k] + k * d) - 1


class WholeLog:
    """The served boot: an offset index of its archive, grown at each open by
    the records archived since (the archive is never re-read whole), and the
    live records not yet archived, read at each open."""

    def __init__(self, open_archive, securityfs: str | None, boot: int | None = None):
        self.archive = open_archive()
        self.ima = Ima(securityfs) if securityfs else None
        self.fixed_boot = boot
        self.index = Index(None)
        self.blocks: OrderedDict = OrderedDict()  # (boot, block, view) -> rendered bytes

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

    def snapshot(self, view) -> Snapshot:
        """Blocking: the archive and the live list as of now."""
        a = self.archive
        if self.fixed_boot is not None:
            if self.fixed_boot not in [b[0] for b in a.boots()]:
                raise KeeperFatal(f"the archive has no boot {self.fixed_boot}")
            whole = whole_log(a, None, self.fixed_boot)
        else:
            whole = whole_log(a, self.ima)
        # None: a live list that starts a boot the archive has not stored (or nothing at all)
        boot = whole.boot if whole.boot is not None else ("new", a.last_boot())
        if boot != self.index.boot:
            if self.index.n:
                log.info("keeper serve: a new boot (%s): the files start over", boot)
            self.index = Index(boot)
            self.blocks.clear()
        if whole.archived > self.index.n:
            for recs in archived(a, whole.boot, self.index.n, whole.archived):
                self.index.add(recs)
        return Snapshot(self, view, whole.archived, whole.live)

    def _block(self, index: Index, k: int, view, archived: int) -> bytes:
        key = (index.boot, k, view)
        data = self.blocks.get(key)
        if data is None:
            first = k * BLOCK
            n = min(BLOCK, archived - first)
            recs = stored(index.boot, list(enumerate(self.archive.records(index.boot, first, n), first)))
            data = render(recs, *view)
            if n == BLOCK:  # a whole block never changes; a partial one grows
                self.blocks[key] = data
                if len(self.blocks) > CACHED_BLOCKS:
                    self.blocks.popitem(last=False)
        else:
            self.blocks.move_to_end(key)
        return data

    def read_archived(self, index: Index, view, off: int, size: int, archived: int) -> bytes:
        out = []
        k = index.block_at(view, off)
        while size > 0 and k * BLOCK < archived:
            start = index.offset(view, k * BLOCK)
            data = self._block(index, k, view, archived)
            piece = data[off - start:off - start + size]
            out.append(piece)
            off += len(piece)
            size -= len(piece)
            k += 1
        return b"".join(out)


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
        self.snapshots: dict[int, Snapshot] = {}
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
        snap = await self._blocking(self.whole.snapshot, self.files[inode][1])
        fh = self.next_fh
        self.next_fh += 1
        self.snapshots[fh] = snap
        return pyfuse3.FileInfo(fh=fh, direct_io=True)

    async def read(self, fh, off, size):
        return await self._blocking(self.snapshots[fh].read, off, size)

    async def release(self, fh):
        self.snapshots.pop(fh, None)

    async def _blocking(self, fn, *args):
        """Archive and list reads, in a worker thread, one at a time (one archive
        connection, one render cache); any failure is EIO, the server lives on.
        A connection to the archive that broke (its server restarted) is made
        again and the read tried once more."""
        async with self.lock:
            for attempt in (1, 2):
                try:
                    return await trio.to_thread.run_sync(fn, *args)
                except ArchiveError as e:
                    error = e
                    if attempt == 1 and await trio.to_thread.run_sync(self._reconnect):
                        continue
                except Exception as e:  # noqa: BLE001 - the kernel's answer to a list it cannot read
                    error = e
                log.error("keeper serve: cannot read the whole log: %s", error)
                raise pyfuse3.FUSEError(errno.EIO) from None

    def _reconnect(self) -> bool:
        try:
            if self.whole.archive.reconnect_if_lost():
                log.warning("keeper serve: the archive's connection was lost: reconnected to %s",
                            self.whole.archive.path)
                return True
        except ArchiveError as e:
            log.error("keeper serve: cannot reconnect to the archive: %s", e)
        return False


def serve(open_archive, securityfs: str | None, mountpoint: str, boot: int | None = None) -> int:
    fs = ServeFs(WholeLog(open_archive, securityfs, boot))
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
