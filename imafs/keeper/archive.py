"""The keeper's archive: every record taken out of the kernel, durable before
the kernel is told to forget it.

SQLite in WAL mode with ``synchronous=FULL``: a COMMIT returns only after the
WAL is fsync'd, so a chunk whose transaction committed survives a crash or a
power cut, and only then does the keeper write D or N. One transaction per
chunk; a record is keyed by (boot, position since that boot's first record),
so storing a chunk twice is harmless and a different record at a stored
position is a conflict that stops the trim.

A record is kept as its `binary_runtime_measurements` (sha1 list) bytes: the
other banks' digests are computed from the template data, as the kernel does
(a violation is zeros in every list and extends 0xff…), so one copy serves
every bank and the archive stays about the size of the binary list.

Tables: ``boots`` (one per cold boot: a chain of PCR extends from reset; a
kexec continues it), ``records``, ``chunks`` (each trim: where it starts, how
many, when it was stored and when the kernel confirmed the delete).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS boots (
    id INTEGER PRIMARY KEY,
    started REAL NOT NULL,
    boot_id TEXT,                 -- /proc/sys/kernel/random/boot_id when it was seen
    from_boot_aggregate INTEGER NOT NULL,  -- 1: position 0 is this boot's boot_aggregate
    kernels INTEGER NOT NULL DEFAULT 1     -- 1 + the kexecs seen in this boot
);
CREATE TABLE IF NOT EXISTS records (
    boot INTEGER NOT NULL,
    pos INTEGER NOT NULL,
    rec BLOB NOT NULL,
    PRIMARY KEY (boot, pos)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY,
    boot INTEGER NOT NULL,
    first INTEGER NOT NULL,
    count INTEGER NOT NULL,
    mode TEXT NOT NULL,           -- stage | count
    stored REAL NOT NULL,
    deleted REAL                  -- when the kernel accepted D or N; NULL: not confirmed
);
"""


class Conflict(Exception):
    """A record differs from the one already stored at its position."""


@dataclass
class Chunk:
    id: int
    boot: int
    first: int
    count: int
    mode: str
    stored: float
    deleted: float | None


class Archive:
    def __init__(self, path: str, crash_hook=None):
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.crash_hook = crash_hook or (lambda step: None)

    def close(self):
        self.db.close()

    # -- reading ------------------------------------------------------------------------
    def last_boot(self) -> int | None:
        row = self.db.execute("SELECT max(id) FROM boots").fetchone()
        return row[0]

    def boots(self) -> list[tuple]:
        return self.db.execute("SELECT id, started, boot_id, from_boot_aggregate, kernels FROM boots "
                               "ORDER BY id").fetchall()

    def count(self, boot: int) -> int:
        """Records stored for ``boot`` (positions 0 … count-1: chunks are contiguous)."""
        row = self.db.execute("SELECT max(pos) FROM records WHERE boot=?", (boot,)).fetchone()
        return 0 if row[0] is None else row[0] + 1

    def records(self, boot: int, first: int = 0, count: int | None = None) -> list[bytes]:
        end = self.count(boot) if count is None else first + count
        return [r[0] for r in self.db.execute(
            "SELECT rec FROM records WHERE boot=? AND pos>=? AND pos<? ORDER BY pos", (boot, first, end))]

    def iter_records(self, boot: int):
        """(pos, rec) of every stored record of ``boot``, in order, without holding them all."""
        cur = self.db.execute("SELECT pos, rec FROM records WHERE boot=? ORDER BY pos", (boot,))
        yield from cur

    def last_chunk(self, boot: int) -> Chunk | None:
        row = self.db.execute("SELECT * FROM chunks WHERE boot=? ORDER BY id DESC LIMIT 1", (boot,)).fetchone()
        return Chunk(*row) if row else None

    def last_trim(self) -> Chunk | None:
        row = self.db.execute("SELECT * FROM chunks ORDER BY id DESC LIMIT 1").fetchone()
        return Chunk(*row) if row else None

    # -- writing ------------------------------------------------------------------------
    def new_boot(self, boot_id: str | None, from_boot_aggregate: bool) -> int:
        cur = self.db.execute("INSERT INTO boots (started, boot_id, from_boot_aggregate) VALUES (?, ?, ?)",
                              (time.time(), boot_id, int(from_boot_aggregate)))
        return cur.lastrowid

    def add_kernel(self, boot: int, boot_id: str | None) -> None:
        self.db.execute("UPDATE boots SET kernels = kernels + 1, boot_id = coalesce(?, boot_id) WHERE id=?",
                        (boot_id, boot))

    def store(self, boot: int, first: int, recs: list[bytes], mode: str) -> int:
        """Store ``recs`` at positions first…, in one durable transaction; returns
        how many were new. Raises Conflict (nothing stored) if a position holds
        another record, sqlite3.Error if the commit failed (nothing stored)."""
        have = self.count(boot)
        if first > have:
            raise Conflict(f"boot {boot}: a chunk at position {first} would leave a gap after {have} records")
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            for pos in range(first, min(have, first + len(recs))):
                old = db.execute("SELECT rec FROM records WHERE boot=? AND pos=?", (boot, pos)).fetchone()[0]
                if old != recs[pos - first]:
                    raise Conflict(f"boot {boot}: record {pos} differs from the one stored at that position")
            new = recs[have - first:] if have > first else recs
            half = len(new) // 2
            db.executemany("INSERT INTO records (boot, pos, rec) VALUES (?, ?, ?)",
                           ((boot, have + i, r) for i, r in enumerate(new[:half])))
            self.crash_hook("mid-save")
            db.executemany("INSERT INTO records (boot, pos, rec) VALUES (?, ?, ?)",
                           ((boot, have + half + i, r) for i, r in enumerate(new[half:])))
            db.execute("INSERT INTO chunks (boot, first, count, mode, stored) VALUES (?, ?, ?, ?, ?)",
                       (boot, first, len(recs), mode, time.time()))
            db.execute("COMMIT")  # synchronous=FULL: the WAL is fsync'd before this returns
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return len(new)

    def confirm_deleted(self, boot: int, first: int) -> None:
        """A hint only (status, and a shortcut for the next placement): if this
        write is lost, the next cycle finds by content that the chunk is gone."""
        try:
            self._confirm(boot, first)
        except sqlite3.Error:
            pass

    def _confirm(self, boot: int, first: int) -> None:
        self.db.execute("UPDATE chunks SET deleted=? WHERE id=(SELECT max(id) FROM chunks WHERE boot=? AND first=?)",
                        (time.time(), boot, first))

    def status(self) -> dict:
        out = {"archive": self.path, "boots": []}
        for bid, started, boot_id, from_ba, kernels in self.boots():
            n, size = self.db.execute("SELECT count(*), coalesce(sum(length(rec)), 0) FROM records WHERE boot=?",
                                      (bid,)).fetchone()
            trims = self.db.execute("SELECT count(*) FROM chunks WHERE boot=?", (bid,)).fetchone()[0]
            out["boots"].append({"boot": bid, "started": started, "boot_id": boot_id,
                                 "from_boot_aggregate": bool(from_ba), "kernels": kernels,
                                 "records": n, "bytes": size, "trims": trims})
        out["records"] = sum(b["records"] for b in out["boots"])
        out["bytes"] = sum(b["bytes"] for b in out["boots"])
        t = self.last_trim()
        out["last_trim"] = None if t is None else {
            "boot": t.boot, "first": t.first, "count": t.count, "mode": t.mode, "stored": t.stored,
            "deleted": t.deleted}
        return out
