"""One trim cycle, and the recovery that makes any interrupted cycle whole.

A cycle (docs/keeper.md has the rules and why):

1. find what the kernel holds that the archive may not: a staged list left by
   anyone (a killed keeper, another agent) is archived and deleted first;
2. mode ``stage``: `A`, read the staged list; mode ``count``: read the oldest
   records of the current list, at most a chunk (``--chunk``; N = what was read);
3. check every record (strict parse, template digest against template data)
   and place it: its position since boot is the records of this boot already
   stored, unless the kernel still holds the last stored chunk (a delete that
   did not happen), which is recognised by content; a boot_aggregate at a
   position the archive has not seen starts a new boot (at the head) or marks
   a kexec (after carried records);
4. store, one fsync'd transaction, idempotent by (boot, position);
5. only then `D` (or N), and note that the kernel confirmed it.

A crash between any two steps leaves a state that the next cycle's step 1 and
3 bring back: nothing is deleted before it is stored, nothing stored twice.
``IMAFS_KEEP_CRASH_AT=after-A|mid-save|after-commit|after-D`` makes the process
exit with os._exit(137) at that point: a test hook for fault injection.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import struct
from array import array
from bisect import bisect_right
from itertools import accumulate
from collections.abc import Sequence
from dataclasses import dataclass

from .. import templates as T
from .abi import Ima, KeeperFatal
from .abi import boot_id as read_boot_id
from .archive import Archive, ArchiveError, Conflict

log = logging.getLogger("imafs.keeper")

CHUNK = 100_000  # count mode: the oldest records one cycle takes at most (about 13 MB of ima-ng)
CRASH_STEPS = ("after-A", "mid-save", "after-commit", "after-D")


def crash_hook(step: str) -> None:
    if os.environ.get("IMAFS_KEEP_CRASH_AT") == step:
        log.warning("keeper: IMAFS_KEEP_CRASH_AT=%s: exiting with 137", step)
        logging.shutdown()
        os._exit(137)


class BadRecord(Exception):
    """A record that does not parse or whose template digest is wrong."""


class Rec:
    """One record as the sha1 binary list holds it; its fields are parsed when
    first asked for (the check and the store need only the bytes)."""

    __slots__ = ("_fields", "digest", "pcr", "raw", "template")

    def __init__(self, raw: bytes, pcr: int, digest: bytes, template: T.Template, fields: tuple | None = None):
        self.raw, self.pcr, self.digest, self.template, self._fields = raw, pcr, digest, template, fields

    @property
    def fields(self) -> tuple:
        if self._fields is None:
            self._fields = T.parse_binary_record(self.raw, 0, 20, max_name=T.MAX_LIST_TEMPLATE_NAME_LEN)[3]
        return self._fields

    @property
    def violation(self) -> bool:
        return not any(self.digest)

    @property
    def is_boot_aggregate(self) -> bool:
        if b"boot_aggregate" not in self.raw:
            return False
        for fid, v in zip(self.template.fields, self.fields):
            if fid in ("n", "n-ng"):
                return v.rstrip(b"\0") == b"boot_aggregate"
        return False

    def bank_digest(self, bank: str) -> bytes:
        """What this record extends into ``bank`` (0xff… for a violation)."""
        if self.violation:
            return b"\xff" * T.digest_size(bank)
        return T.template_digest(bank, self.template, self.fields)


_U32 = struct.Struct("<I").unpack_from
_ZERO20 = bytes(20)


def _slow(buf, o: int, where: str, index: int) -> tuple[Rec, int]:
    """The `ima` template (its digest is not over the template data), and the
    wording of every error: templates.parse_binary_record."""
    try:
        pcr, digest, tmpl, fields, end = T.parse_binary_record(buf, o, 20, max_name=T.MAX_LIST_TEMPLATE_NAME_LEN)
    except T.TemplateError as e:
        raise BadRecord(f"{where}: {e}") from None
    r = Rec(bytes(buf[o:end]), pcr, digest, tmpl, fields)
    if not r.violation and T.template_digest("sha1", tmpl, fields) != digest:
        raise BadRecord(f"{where}: record {index} (byte {o}): its template digest "
                        f"{digest.hex()} is not the sha1 of its template data")
    return r, end


def _walk(buf, where: str):
    """Check every record of a sha1 binary list: strict parse (the kernel's
    restore rules) and the template digest recomputed from the template data.
    Yields (start, end, template, Rec or None) per record. The common case (not
    `ima`) walks the field lengths and hashes the template data where it lies,
    making no object per record; anything else, and every error, goes through
    templates.parse_binary_record (the Rec it built is yielded)."""
    sha1 = hashlib.sha1
    mv = memoryview(buf)
    end = len(buf)
    o = 0
    index = 0
    known: dict[bytes, T.Template] = {}
    while o < end:
        tmpl = None
        if o + 32 <= end:
            nlen = _U32(buf, o + 24)[0]
            if 0 < nlen < T.MAX_LIST_TEMPLATE_NAME_LEN and o + 32 + nlen <= end:
                name = bytes(buf[o + 28:o + 28 + nlen])
                tmpl = known.get(name)
                if tmpl is None and name != b"ima":
                    try:
                        tmpl = known[name] = T.lookup_template(name.decode("ascii"))
                    except (UnicodeDecodeError, T.TemplateError):
                        tmpl = None
        ds = de = 0
        if tmpl is not None:
            ds = o + 32 + nlen
            de = ds + _U32(buf, ds - 4)[0]
            p = ds
            if de <= end:
                for _ in tmpl.fields:
                    if p + 4 > de:
                        p = -1  # a field's length runs past the template data
                        break
                    p += 4 + _U32(buf, p)[0]
            if p != de or de > end:
                tmpl = None
        if tmpl is None:
            r, e = _slow(buf, o, where, index)
            yield o, e, r.template, r
            o = e
        else:
            if mv[o + 4:o + 24] != _ZERO20 and sha1(mv[ds:de]).digest() != mv[o + 4:o + 24]:
                raise BadRecord(f"{where}: record {index} (byte {o}): its template digest "
                                f"{bytes(buf[o + 4:o + 24]).hex()} is not the sha1 of its template data")
            yield o, de, tmpl, None
            o = de
        index += 1


def split(buf: bytes, where: str = "list") -> list[Rec]:
    """The records of a sha1 binary list, each checked (``_walk``), as Recs."""
    return [r or Rec(bytes(buf[o:e]), _U32(buf, o)[0], bytes(buf[o + 4:o + 24]), tmpl)
            for o, e, tmpl, r in _walk(buf, where)]


class Records(Sequence):
    """The records of a checked list as one buffer and their start offsets: a
    sequence of each record's bytes, each made when asked for. A trim cycle
    holds its chunk this way: no object per record lives through the cycle, so
    the allocator's pools do not fragment over millions of records (a list of
    100k Recs per cycle grew the service's memory)."""

    __slots__ = ("buf", "starts")

    def __init__(self, buf: bytes, starts: array):
        self.buf, self.starts = buf, starts  # starts: one more than the records (the end)

    @classmethod
    def check(cls, buf: bytes, where: str = "list") -> Records:
        starts = array("Q", (o for o, _, _, _ in _walk(buf, where)))
        starts.append(len(buf))
        return cls(buf, starts)

    @classmethod
    def of(cls, raws: list[bytes]) -> Records:
        """Records already checked, one bytes each, as one buffer."""
        return cls(b"".join(raws), array("Q", accumulate(map(len, raws), initial=0)))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            lo, hi, step = i.indices(len(self))
            assert step == 1
            return Records(self.buf, self.starts[lo:max(hi, lo) + 1])
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.buf[self.starts[i]:self.starts[i + 1]]

    def __iter__(self):
        buf, s = self.buf, self.starts
        return map(buf.__getitem__, map(slice, s, s[1:]))  # no per-index checks: the store walks a chunk

    def boot_aggregates(self, lo: int = 0):
        """Indexes from ``lo`` on of the records that are a boot_aggregate: the
        buffer is searched for the name, and only the records that hold it parsed."""
        buf, s = self.buf, self.starts
        at, end = s[lo] if lo < len(self) else s[-1], s[-1]
        while (at := buf.find(b"boot_aggregate", at, end)) >= 0:
            i = bisect_right(s, at) - 1
            if split(self[i])[0].is_boot_aggregate:
                yield i
            at = s[i + 1]

    def head_is_boot_aggregate(self, i: int) -> bool:
        raw = self[i]
        return b"boot_aggregate" in raw and split(raw)[0].is_boot_aggregate


@dataclass
class Placement:
    boot: int | None   # None: a new boot (created when stored)
    first: int         # position since boot of recs[0]
    kexec_at: int | None = None  # index of a new kernel's boot_aggregate after carried records


def place(archive: Archive, recs: Records) -> Placement:
    """Where ``recs`` (the head of what the kernel holds) sit in the archive."""
    boot = archive.last_boot()
    if boot is None:
        return Placement(None, 0)
    have = archive.count(boot)
    first = have
    chunk = archive.last_chunk(boot)
    # the last delete may not have happened: the kernel then still starts with that chunk
    if (chunk and chunk.deleted is None and len(recs) >= chunk.count
            and archive.records(boot, chunk.first, chunk.count) == list(recs[:chunk.count])):
        first = chunk.first
    for i in recs.boot_aggregates(max(have - first, 0)):
        if i == 0:
            return Placement(None, 0)  # a new boot: this list starts with its boot_aggregate
        return Placement(boot, first, kexec_at=i)  # a kexec: carried records, then the new kernel
    return Placement(boot, first)


class Keeper:
    """The trim cycle over one securityfs tree and one archive."""

    def __init__(self, ima: Ima, archive: Archive, mode: str = "stage", boot_id_file: str | None = None,
                 chunk: int = CHUNK):
        if chunk < 1:
            raise ValueError(f"--chunk {chunk}: at least 1 record per trim")
        if mode == "stage" and not ima.can_stage:
            raise ValueError(f"{ima.dir}: no _staged files (CONFIG_IMA_STAGING=n): use --mode count")
        self.ima = ima
        self.archive = archive
        self.mode = mode
        self.boot_id_file = boot_id_file
        self.chunk = chunk
        self.last_error: str | None = None
        self.archived = 0  # records the current cycle stored that the archive did not have

    def _save(self, recs: Records, mode: str) -> tuple[int, int] | None:
        """Store ``recs``; (boot, first) once durable, None if it must not be deleted."""
        p = place(self.archive, recs)
        bid = read_boot_id(self.boot_id_file)
        boot = p.boot
        try:
            if boot is None:
                boot = self.archive.new_boot(bid, recs.head_is_boot_aggregate(0))
                log.info("keeper: boot %d starts (%s)", boot, "boot_aggregate at the head of the list"
                         if recs.head_is_boot_aggregate(0) else "the list does not start at a boot_aggregate: "
                         "records before it were lost to the archive")
            elif p.kexec_at is not None:
                self.archive.add_kernel(boot, bid)
                log.info("keeper: kexec in boot %d: %d carried records, then a new kernel at position %d",
                         boot, p.kexec_at, p.first + p.kexec_at)
            new = self.archive.store(boot, p.first, recs, mode)
        except Conflict as e:
            self.last_error = str(e)
            log.error("keeper: %s; nothing is deleted", e)
            return None
        except ArchiveError as e:
            self.last_error = f"archive commit failed: {e}"
            log.error("keeper: the archive's commit failed (%s); nothing is deleted, retrying later", e)
            return None
        self.archived += new
        crash_hook("after-commit")
        log.info("keeper: boot %d: stored records %d-%d (%d new)", boot, p.first, p.first + len(recs) - 1, new)
        return boot, p.first

    def _finish_staged(self, recs: Records) -> bool:
        saved = self._save(recs, "stage")
        if saved is None:
            return False
        err = self.ima.delete_staged()
        crash_hook("after-D")
        if err == 0:
            self.archive.confirm_deleted(*saved)
        elif err == errno.ENOENT:
            log.warning("keeper: D: nothing staged any more (another writer deleted it); the records are stored")
        elif err == errno.ESTALE:
            log.warning("keeper: D: ESTALE: measurements are suspended (kexec or reboot); the staged records "
                        "go to the next kernel, which the archive will recognise")
        else:
            raise OSError(err, f"D on {self.ima.staged.name}: {os.strerror(err)}")
        return True

    def _head(self) -> int:
        """How many of the oldest records a count-mode cycle reads: a chunk, or
        more if the last stored chunk's N was not confirmed (the kernel may still
        start with it: place() recognises it only if it is read whole)."""
        boot = self.archive.last_boot()
        last = self.archive.last_chunk(boot) if boot is not None else None
        return max(self.chunk, last.count) if last and last.deleted is None else self.chunk

    def cycle(self) -> int:
        """One trim; returns how many records left the kernel's memory (stored first)."""
        self.last_error = None
        self.archived = 0
        if self.archive.reconnect_if_lost(probe=True):
            log.warning("keeper: the archive's connection was lost: reconnected to %s", self.archive.path)
        staged = Records.check(self.ima.read_staged(), "staged list") if self.ima.can_stage else []
        if staged:  # left by a killed keeper or another agent: archive it, finish the delete
            log.info("keeper: %d records already staged: storing and deleting them", len(staged))
            if not self._finish_staged(staged):
                return 0
            if self.mode == "stage":
                return len(staged)
        if self.mode == "stage":
            err = self.ima.stage()
            if err == errno.ENOENT:
                return 0  # nothing to stage
            if err == errno.EACCES:
                log.warning("keeper: A: EACCES: measurements are suspended (kexec or reboot under way)")
                return 0
            if err not in (0, errno.EEXIST):  # EEXIST: someone staged between our read and A
                raise OSError(err, f"A: {os.strerror(err)}")
            crash_hook("after-A")
            recs = Records.check(self.ima.read_staged(), "staged list")
            if not recs:
                return 0
            return len(recs) if self._finish_staged(recs) else 0
        recs = Records.check(self.ima.read_head(self._head()), "current list")
        if not recs:
            return 0
        saved = self._save(recs, "count")
        if saved is None:
            return 0
        err = self.ima.delete_oldest(len(recs))
        crash_hook("after-D")
        if err == 0:
            self.archive.confirm_deleted(*saved)
            return len(recs)
        if err == errno.ENOENT:
            log.warning("keeper: N=%d: ENOENT: the list is shorter than what was read (another trimmer?); "
                        "the archive will place what remains by content", len(recs))
        elif err == errno.ESTALE:
            log.warning("keeper: N: ESTALE: measurements are suspended; the records go to the next kernel")
        elif err == errno.EINVAL:  # stored, not deleted: a stage-mode run finds them by content
            raise KeeperFatal(f"N on {self.ima.original.name}: EINVAL: the kernel refuses N "
                              f"(ima_flush_htable is on?); use --mode stage")
        else:
            raise OSError(err, f"N on {self.ima.original.name}: {os.strerror(err)}")
        return 0
