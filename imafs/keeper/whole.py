"""The whole log of a boot: what the archive stored, then what the kernel
still holds (its staged list, then its current list), as the kernel would show
it had nothing been deleted; and its replay against PCR values.

A boot can hold tens of millions of records, so the log is a stream: a `Log`
is a snapshot (how many records the archive held, and the live records not
archived then) that is read in batches of `trim.Records` (one buffer and its
offsets, no object per record), the archive's READ_BATCH at a time. Export
renders batch by batch; verify replays every bank in one pass, remembering per
PCR only the record where it last matched and the first record after it.
Memory is one batch, plus the live list (which the kernel holds anyway).
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from .. import templates as T
from .abi import Busy, Ima
from .archive import READ_BATCH, Archive
from .trim import BadRecord, Placement, Records, place


PLACE_TRIES = 50
NO_RECORDS = Records(b"", array("Q", [0]))

_U32 = struct.Struct("<I").unpack_from
_ZERO20 = bytes(20)
_IMA_NAME = b"\3\0\0\0ima"  # a record of the `ima` template, at byte 24: its digest is not over template data


def _archive_state(archive: Archive):
    boot = archive.last_boot()
    return None if boot is None else (boot, archive.count(boot), archive.last_chunk(boot))


def _joined(first: Records, then: Records) -> Records:
    starts = first.starts[:-1]
    starts.extend(o + len(first.buf) for o in then.starts)
    return Records(first.buf + then.buf, starts)


def placed_live(archive: Archive, ima: Ima) -> tuple[Records, Placement | None, int]:
    """The live records (staged, then current), where they sit in the archive
    (trim.place) and how many records the archive held for the last boot, read
    so that the archive did not change while the list was read: the list is
    read before the archive is looked at, and a trim that commits a chunk or
    confirms its delete in between would make the later archive state place
    the earlier list wrong (its head counted twice). Then it is read again."""
    for _ in range(PLACE_TRIES):
        before = _archive_state(archive)
        staged, current = ima.read_live()
        live = _joined(Records.check(staged, "staged list"), Records.check(current, "current list"))
        p = place(archive, live) if live else None
        if _archive_state(archive) == before:
            return live, p, 0 if before is None else before[1]
    raise Busy(f"the archive changed during each of {PLACE_TRIES} reads of the live list")


def stored(boot: int, rows: list[tuple[int, bytes]]) -> Records:
    """Archive rows (position, record) as checked Records: the rows are walked
    as one buffer (trim's check: strict parse, sha1 template digest); if that
    fails, or cuts the buffer elsewhere than at the rows' ends, each row is
    checked alone so that the error names the stored record."""
    recs = Records.of([raw for _, raw in rows])
    try:
        if Records.check(recs.buf).starts == recs.starts:
            return recs
    except BadRecord:
        pass
    for pos, raw in rows:
        where = f"archive boot {boot} record {pos}"
        if (n := len(Records.check(raw, where))) != 1:
            raise BadRecord(f"{where}: {n} records in one row")
    return recs


def archived(archive: Archive, boot: int, first: int = 0, end: int | None = None) -> Iterator[Records]:
    """The stored records of ``boot`` at positions first … end-1 (all from
    ``first`` if end is None), checked, in batches of at most READ_BATCH."""
    rows = archive.iter_records(boot, first)
    if end is not None:
        rows = islice(rows, max(end - first, 0))
    while batch := list(islice(rows, READ_BATCH)):
        yield stored(boot, batch)


@dataclass
class Log:
    """One boot's whole log as of one moment: the archive's first ``archived``
    records of ``boot`` (read again at each pass: stored records never change),
    then ``live``. ``boot`` is None for a live list that starts a boot the
    archive has not stored (or an empty archive)."""

    archive: Archive
    boot: int | None
    archived: int
    live: Records

    def batches(self) -> Iterator[Records]:
        if self.boot is not None and self.archived:
            yield from archived(self.archive, self.boot, 0, self.archived)
        for k in range(0, len(self.live), READ_BATCH):
            yield self.live[k:k + READ_BATCH]

    def __iter__(self) -> Iterator[bytes]:
        """Each record's bytes (the sha1 binary list's)."""
        for recs in self.batches():
            yield from recs


def whole_log(archive: Archive, ima: Ima | None = None, boot: int | None = None) -> Log:
    """Boot ``boot`` (default: the latest) from its first record on. With
    ``ima``, the live records not yet archived follow; a live list that starts
    a boot the archive has not seen is that boot (``Log.boot`` None) when no
    boot is asked for."""
    if ima is not None:
        live, p, have = placed_live(archive, ima)
        if p is not None and p.boot is None and boot is None:
            return Log(archive, None, 0, live)
        if p is not None and p.boot is not None and boot in (None, p.boot):
            return Log(archive, p.boot, have, live[have - p.first:])
    if boot is None:
        boot = archive.last_boot()
    if boot is None:
        return Log(archive, None, 0, NO_RECORDS)
    return Log(archive, boot, archive.count(boot), NO_RECORDS)


def parsed(recs: Records) -> Iterator[tuple[int, bytes, T.Template, tuple]]:
    """(pcr, sha1 digest, template, fields) of each record (checked already)."""
    buf, parse, most = recs.buf, T.parse_binary_record, T.MAX_LIST_TEMPLATE_NAME_LEN
    for o in recs.starts[:-1]:
        yield parse(buf, o, 20, max_name=most)[:4]


def render(recs: Records, fmt: str, bank: str = "sha1") -> bytes:
    """``recs`` as the kernel's ``fmt`` list of ``bank`` shows them."""
    if fmt == "binary" and bank == "sha1":
        return recs.buf[recs.starts[0]:recs.starts[-1]]
    out = []
    zeros = bytes(T.digest_size(bank))
    for pcr, digest, tmpl, fields in parsed(recs):
        if bank != "sha1":
            digest = zeros if digest == _ZERO20 else T.template_digest(bank, tmpl, fields)
        if fmt == "ascii":
            out.append(T.ascii_record(pcr, digest, tmpl, fields))
        else:
            out.append(T.binary_record(pcr, digest, tmpl, fields))
    return b"".join(out)


BANK_BY_SIZE = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}


def read_pcr_file(spec: str) -> tuple[str, dict[int, bytes]]:
    """``[BANK,]FILE`` of 'PCR-NN: hex' lines (evmctl --pcrs, imafs pcrs --format evmctl)."""
    bank, _, path = spec.rpartition(",")
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("PCR-") and ":" in line:
            idx, _, hexval = line[4:].partition(":")
            values[int(idx)] = bytes.fromhex(hexval.strip())
    if not values:
        raise ValueError(f"{path}: no 'PCR-NN: hex' lines")
    if not bank:
        size = len(next(iter(values.values())))
        bank = BANK_BY_SIZE.get(size)
        if bank is None:
            raise ValueError(f"{path}: {size}-byte PCRs: say the bank as BANK,{path}")
    T.hasher(bank)  # a bank hashlib cannot compute: said now, before the log is read
    return bank, values


def describe(i: int, raw: bytes) -> str:
    pcr, _, tmpl, fields = next(parsed(Records.of([raw])))
    name = next((v.rstrip(b"\0") for f, v in zip(tmpl.fields, fields) if f in ("n", "n-ng")), b"?")
    return f"record {i} (PCR {pcr}, {tmpl.display_name}, {name.decode(errors='replace')!r})"


class _Expected:
    """One PCR file's values, and per PCR the record after which it last
    matched and the first record after that (or the first record on the PCR)."""

    def __init__(self, bank: str, values: dict[int, bytes]):
        self.bank, self.values = bank, values
        self.matched: dict[int, tuple[int, bytes]] = {}
        self.first_after: dict[int, tuple[int, bytes]] = {}


class Replay:
    """The whole log replayed against PCR files, several banks in one pass:
    each record's digest per bank is computed once. ``feed`` batches in order,
    then ``verdicts``."""

    def __init__(self, pcr_files: Iterable[tuple[str, dict[int, bytes]]]):
        self.files = [_Expected(bank, values) for bank, values in pcr_files]
        self.banks = []  # (bank, its hash's constructor, 0xff… of a violation, its PCRs, the files on it)
        for bank in dict.fromkeys(f.bank for f in self.files):
            self.banks.append((bank, T.hasher(bank), b"\xff" * T.digest_size(bank), {},
                               [f for f in self.files if f.bank == bank]))
        self.n = 0

    def feed(self, recs: Records) -> None:
        buf, s = recs.buf, recs.starts
        mv = memoryview(buf)
        i = self.n
        for o, e in zip(s, s[1:]):
            pcr = _U32(buf, o)[0]
            sha1 = buf[o + 4:o + 24]
            for bank, h, ff, pcrs, files in self.banks:
                if sha1 == _ZERO20:
                    d = ff
                elif bank == "sha1":
                    d = sha1
                elif buf[o + 24:o + 31] != _IMA_NAME:  # the template data, as it lies in the record
                    d = h(mv[o + 32 + _U32(buf, o + 24)[0]:e]).digest()
                else:
                    _, _, tmpl, fields, _ = T.parse_binary_record(buf, o, 20, max_name=T.MAX_LIST_TEMPLATE_NAME_LEN)
                    d = T.template_digest(bank, tmpl, fields)
                old = pcrs.get(pcr)
                value = pcrs[pcr] = h((old or bytes(len(ff))) + d).digest()
                for f in files:
                    if pcr not in f.first_after:
                        f.first_after[pcr] = (i, buf[o:e])
                    if f.values.get(pcr) == value:
                        f.matched[pcr] = (i, buf[o:e])
                        del f.first_after[pcr]
            i += 1
        self.n = i

    def verdicts(self) -> list[str | None]:
        """Per PCR file: None if the log replays to its values for every PCR the
        log extends; else what does not fit, naming the first record after the
        last point where the PCR still matched."""
        return [self._verdict(f) for f in self.files]

    def _verdict(self, f: _Expected) -> str | None:
        pcrs = next(b[3] for b in self.banks if b[0] == f.bank)
        for pcr, value in sorted(pcrs.items()):
            want = f.values.get(pcr)
            if want is None:
                return f"{f.bank}: PCR {pcr} is extended by the log but not in the PCR file"
            if value != want:
                bad = describe(*f.first_after[pcr])
                if pcr in f.matched:
                    return (f"{f.bank}: PCR {pcr} matches after {describe(*f.matched[pcr])}; "
                            f"the first record that does not fit is {bad}")
                return (f"{f.bank}: PCR {pcr} never matches; the first record that does not fit is "
                        f"{bad} (records missing before it, or another boot)")
        return None


def replay(batches: Iterable[Records], pcr_files) -> tuple[int, list[str | None]]:
    """(records replayed, a verdict per PCR file) in one pass over ``batches``."""
    r = Replay(pcr_files)
    for recs in batches:
        r.feed(recs)
    return r.n, r.verdicts()
