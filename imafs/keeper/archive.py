"""The keeper's archive: every record taken out of the kernel, durable before
the kernel is told to forget it.

Two stores behind one class, the same SQL and the same rules:

- SQLite (a file path; the default), in WAL mode with ``synchronous=FULL``: a
  COMMIT returns only after the WAL is fsync'd;
- PostgreSQL (``postgresql://…``): many hosts' logs in one database, each row
  keyed by the keeper's host id; ``synchronous_commit=on``, so a COMMIT returns
  only once the server has flushed its WAL (with the server's ``fsync`` on).

So a chunk whose transaction committed survives a crash or a power cut, and
only then does the keeper write D or N. One transaction per chunk; a record is
keyed by (host, boot, position since that boot's first record), so storing a
chunk twice is harmless and a different record at a stored position is a
conflict that stops the trim.

A record is kept as its `binary_runtime_measurements` (sha1 list) bytes: the
other banks' digests are computed from the template data, as the kernel does
(a violation is zeros in every list and extends 0xff…), so one copy serves
every bank and the archive stays about the size of the binary list.

Tables: ``boots`` (one per cold boot: a chain of PCR extends from reset; a
kexec continues it), ``records``, ``chunks`` (each trim: where it starts, how
many, when it was stored and when the kernel confirmed the delete).
"""

from __future__ import annotations

import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SQLITE_SCHEMA = """
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

# The same tables with a host column first in every key: one database, many
# keepers. A host is a small number in the rows (hosts names it): 4 bytes per
# record and per index entry, not the 33 of a machine id.
POSTGRESQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS hosts (
    id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS boots (
    host INTEGER NOT NULL,
    id INTEGER NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    boot_id TEXT,
    from_boot_aggregate INTEGER NOT NULL,
    kernels INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (host, id)
);
CREATE TABLE IF NOT EXISTS records (
    host INTEGER NOT NULL,
    boot INTEGER NOT NULL,
    pos BIGINT NOT NULL,
    rec BYTEA NOT NULL,
    PRIMARY KEY (host, boot, pos)
);
CREATE TABLE IF NOT EXISTS chunks (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host INTEGER NOT NULL,
    boot INTEGER NOT NULL,
    first BIGINT NOT NULL,
    count BIGINT NOT NULL,
    mode TEXT NOT NULL,
    stored DOUBLE PRECISION NOT NULL,
    deleted DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS chunks_host_boot ON chunks (host, boot, id);
"""

READ_BATCH = 10_000  # records per query when a whole boot is read: memory stays bounded


class Conflict(Exception):
    """A record differs from the one already stored at its position."""


class ArchiveError(Exception):
    """The archive cannot be opened, read or written (a full disk, a lost server…):
    whatever the current transaction held is not stored."""


@dataclass
class Chunk:
    id: int
    boot: int
    first: int
    count: int
    mode: str
    stored: float
    deleted: float | None


def default_host_id() -> str:
    """/etc/machine-id, else the host name: what names a keeper in a shared archive."""
    try:
        mid = Path("/etc/machine-id").read_text().strip()
        if mid:
            return mid
    except OSError:
        pass
    return socket.gethostname()


def is_postgresql(spec: str) -> bool:
    return spec.startswith(("postgresql://", "postgres://"))


def open_archive(spec: str, crash_hook=None, host_id: str | None = None) -> Archive:
    """A file path (SQLite) or a ``postgresql://`` URL."""
    if is_postgresql(spec):
        return PostgresArchive(spec, crash_hook, host_id or default_host_id())
    return Archive(spec, crash_hook)


class Archive:
    """The archive's rules, written once. Every statement goes through ``_x``,
    which scopes it to this keeper's host where the store is shared: ``{h}`` in
    a WHERE is ``host=N AND`` (nothing in SQLite), ``{hc}``/``{hv}`` the host
    column and its value in an INSERT."""

    BEGIN = "BEGIN IMMEDIATE"
    driver_errors: tuple = (sqlite3.Error,)
    host: str | None = None

    def __init__(self, path: str, crash_hook=None):
        self.path = path
        self.crash_hook = crash_hook or (lambda step: None)
        try:
            # one cycle at a time uses it; the service runs cycles in a worker thread
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SQLITE_SCHEMA)
        except sqlite3.Error as e:
            raise ArchiveError(f"archive {path}: {e}") from None

    def close(self):
        self.db.close()

    def reconnect_if_lost(self, probe: bool = False) -> bool:
        """A file has no connection to lose."""
        return False

    # -- statements, scoped to the host -----------------------------------------------
    def _sql(self, sql: str) -> str:
        return sql.format(h="", hc="", hv="")

    def _x(self, sql: str, params: tuple = ()):
        try:
            return self.db.execute(self._sql(sql), params)
        except self.driver_errors as e:
            raise ArchiveError(f"archive {self.path}: {e}") from None

    def _one(self, sql: str, params: tuple = ()):
        return self._x(sql, params).fetchone()

    def _insert_records(self, boot: int, first: int, recs: list[bytes]) -> None:
        try:
            self.db.executemany("INSERT INTO records (boot, pos, rec) VALUES (?, ?, ?)",
                                ((boot, first + i, r) for i, r in enumerate(recs)))
        except self.driver_errors as e:
            raise ArchiveError(f"archive {self.path}: {e}") from None

    # -- reading ------------------------------------------------------------------------
    def last_boot(self) -> int | None:
        return self._one("SELECT max(id) FROM boots WHERE {h} TRUE")[0]

    def boots(self) -> list[tuple]:
        return self._x("SELECT id, started, boot_id, from_boot_aggregate, kernels FROM boots "
                       "WHERE {h} TRUE ORDER BY id").fetchall()

    def count(self, boot: int) -> int:
        """Records stored for ``boot`` (positions 0 … count-1: chunks are contiguous)."""
        row = self._one("SELECT max(pos) FROM records WHERE {h} boot=?", (boot,))
        return 0 if row[0] is None else row[0] + 1

    def records(self, boot: int, first: int = 0, count: int | None = None) -> list[bytes]:
        end = self.count(boot) if count is None else first + count
        return [bytes(r[0]) for r in self._x(
            "SELECT rec FROM records WHERE {h} boot=? AND pos>=? AND pos<? ORDER BY pos", (boot, first, end))]

    def iter_records(self, boot: int, first: int = 0):
        """(pos, rec) of the stored records of ``boot`` from ``first``, in order,
        READ_BATCH at a time (neither store holds the whole boot in memory)."""
        pos = first
        while True:
            rows = self._x("SELECT pos, rec FROM records WHERE {h} boot=? AND pos>=? ORDER BY pos LIMIT ?",
                           (boot, pos, READ_BATCH)).fetchall()
            for p, rec in rows:
                yield p, bytes(rec)
            if len(rows) < READ_BATCH:
                return
            pos = rows[-1][0] + 1

    def last_chunk(self, boot: int) -> Chunk | None:
        row = self._one("SELECT id, boot, first, count, mode, stored, deleted FROM chunks "
                        "WHERE {h} boot=? ORDER BY id DESC LIMIT 1", (boot,))
        return Chunk(*row) if row else None

    def last_trim(self) -> Chunk | None:
        row = self._one("SELECT id, boot, first, count, mode, stored, deleted FROM chunks "
                        "WHERE {h} TRUE ORDER BY id DESC LIMIT 1")
        return Chunk(*row) if row else None

    # -- writing ------------------------------------------------------------------------
    def new_boot(self, boot_id: str | None, from_boot_aggregate: bool) -> int:
        boot = (self.last_boot() or 0) + 1
        self._x("INSERT INTO boots ({hc} id, started, boot_id, from_boot_aggregate) VALUES ({hv} ?, ?, ?, ?)",
                (boot, time.time(), boot_id, int(from_boot_aggregate)))
        return boot

    def add_kernel(self, boot: int, boot_id: str | None) -> None:
        self._x("UPDATE boots SET kernels = kernels + 1, boot_id = coalesce(?, boot_id) WHERE {h} id=?",
                (boot_id, boot))

    def store(self, boot: int, first: int, recs: list[bytes], mode: str) -> int:
        """Store ``recs`` at positions first…, in one durable transaction; returns
        how many were new. Raises Conflict (nothing stored) if a position holds
        another record, ArchiveError if the commit failed (nothing stored)."""
        have = self.count(boot)
        if first > have:
            raise Conflict(f"boot {boot}: a chunk at position {first} would leave a gap after {have} records")
        self._x(self.BEGIN)
        try:
            overlap = min(have, first + len(recs)) - first
            if overlap > 0:
                for pos, (old, rec) in enumerate(zip(self.records(boot, first, overlap), recs), first):
                    if old != rec:
                        raise Conflict(f"boot {boot}: record {pos} differs from the one stored at that position")
            new = recs[have - first:] if have > first else recs
            half = len(new) // 2
            self._insert_records(boot, have, new[:half])
            self.crash_hook("mid-save")
            self._insert_records(boot, have + half, new[half:])
            self._x("INSERT INTO chunks ({hc} boot, first, count, mode, stored) VALUES ({hv} ?, ?, ?, ?, ?)",
                    (boot, first, len(recs), mode, time.time()))
            self._x("COMMIT")  # durable before this returns (see the module's docstring)
        except BaseException:
            self.rollback()
            raise
        return len(new)

    def rollback(self) -> None:
        try:
            self.db.execute("ROLLBACK")
        except self.driver_errors:
            pass  # no transaction open (it failed to begin), or the connection is gone

    def confirm_deleted(self, boot: int, first: int) -> None:
        """A hint only (status, and a shortcut for the next placement): if this
        write is lost, the next cycle finds by content that the chunk is gone."""
        try:
            self._x("UPDATE chunks SET deleted=? WHERE id=(SELECT max(id) FROM chunks WHERE {h} boot=? AND first=?)",
                    (time.time(), boot, first))
        except ArchiveError:
            pass

    def status(self) -> dict:
        out = {"archive": self.path, "boots": []}
        if self.host is not None:
            out["host"] = self.host
        for bid, started, boot_id, from_ba, kernels in self.boots():
            n, size = self._one("SELECT count(*), coalesce(sum(length(rec)), 0) FROM records WHERE {h} boot=?",
                                (bid,))
            trims = self._one("SELECT count(*) FROM chunks WHERE {h} boot=?", (bid,))[0]
            out["boots"].append({"boot": bid, "started": started, "boot_id": boot_id,
                                 "from_boot_aggregate": bool(from_ba), "kernels": kernels,
                                 "records": int(n), "bytes": int(size), "trims": int(trims)})
        out["records"] = sum(b["records"] for b in out["boots"])
        out["bytes"] = sum(b["bytes"] for b in out["boots"])
        t = self.last_trim()
        out["last_trim"] = None if t is None else {
            "boot": t.boot, "first": t.first, "count": t.count, "mode": t.mode, "stored": t.stored,
            "deleted": t.deleted}
        return out


class PostgresArchive(Archive):
    """The same archive in a PostgreSQL database shared by many keepers, each
    one's rows under its host id. Connection: autocommit (each chunk's
    transaction is explicit), ``synchronous_commit=on`` whatever the server's
    default, records written with COPY in its binary format."""

    BEGIN = "BEGIN"

    def __init__(self, url: str, crash_hook, host: str):
        import psycopg
        self.driver_errors = (psycopg.Error,)
        self.host = host
        self.crash_hook = crash_hook or (lambda step: None)
        if not host or len(host) > 255 or not host.isprintable():
            raise ValueError(f"host id {host!r}: 1 to 255 printable characters")
        self.url = url
        self.path = _safe_url(url)
        self._scope = {}
        self._connect()
        if self._one("SELECT to_regclass('chunks_host_boot')")[0] is None:  # the last thing the schema makes
            self._x("SELECT pg_advisory_lock(7226212)")  # keepers of a fleet creating the tables at once
            try:
                for stmt in POSTGRESQL_SCHEMA.split(";"):
                    if stmt.strip():
                        self._x(stmt)
            finally:
                self._x("SELECT pg_advisory_unlock(7226212)")
        self._x("INSERT INTO hosts (name) VALUES (?) ON CONFLICT (name) DO NOTHING", (host,))
        hid = self._one("SELECT id FROM hosts WHERE name=?", (host,))[0]
        self._scope = {"h": f"host={hid:d} AND", "hc": "host,", "hv": f"{hid:d},"}
        self.host_number = hid

    def _connect(self) -> None:
        import psycopg
        try:
            self.db = psycopg.connect(self.url, autocommit=True, connect_timeout=30)
        except psycopg.Error as e:
            raise ArchiveError(f"archive {self.path}: {e}") from None
        self._x("SET synchronous_commit = on")

    def reconnect_if_lost(self, probe: bool = False) -> bool:
        """A new connection if the last one broke (the server restarted, the
        network went away): psycopg marks it broken at the failed statement,
        whose transaction is gone with it; with ``probe``, a round trip finds
        out first (a connection cut while idle looks whole until used).
        Whether it reconnected."""
        import psycopg
        if not (self.db.broken or self.db.closed):
            if not probe:
                return False
            try:
                self.db.execute("SELECT 1")
                return False
            except psycopg.OperationalError:
                pass
        self.db.close()
        self._connect()
        return True

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s").format(**self._scope)

    def _insert_records(self, boot: int, first: int, recs: list[bytes]) -> None:
        try:
            with (self.db.cursor() as cur,
                  cur.copy("COPY records (host, boot, pos, rec) FROM STDIN (FORMAT BINARY)") as copy):
                copy.set_types(["int4", "int4", "int8", "bytea"])  # the records as they are, not hex
                for i, r in enumerate(recs):
                    copy.write_row((self.host_number, boot, first + i, r))
        except self.driver_errors as e:
            raise ArchiveError(f"archive {self.path}: {e}") from None


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from urllib.parse import urlsplit, urlunsplit
    u = urlsplit(url)
    if u.password is None:
        return url
    netloc = u.netloc.replace(":" + u.password + "@", ":***@", 1)
    return urlunsplit(u._replace(netloc=netloc))
