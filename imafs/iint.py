"""The inode integrity cache (the kernel's ima_iint.c, and iint.c before 6.9).

An ordered map keyed by (device, inode) — a ``SortedDict``, as the kernel's
rb-tree was — of per-inode IMA state.  Each entry is packed into one small
``bytes`` record so that a million inodes stay within 200 bytes each; callers
work on an :class:`Iint`, a mutable copy, and put it back.

The open counts of an inode (the kernel's ``i_readcount`` and
``i_writecount``) belong to the inode, not to the iint: they are kept for
every open inode, measured or not, in :attr:`IintCache.opens`.
"""

from __future__ import annotations

import struct
import sys
from typing import Callable

from sortedcontainers import SortedDict

from . import templates as T

# iint->flags (kernel-abi.md §5.3)
IMA_MEASURE = 0x1
IMA_MEASURED = 0x2
IMA_APPRAISE = 0x4
IMA_APPRAISED = 0x8
IMA_COLLECTED = 0x20
# the appraise sub-actions, per hook kind: FILE, MMAP, BPRM, READ, CREDS; each done bit is its do bit << 1
IMA_APPRAISE_SUBMASK = 0x1000 | 0x4000 | 0x10000 | 0x40000 | 0x100000
IMA_APPRAISED_SUBMASK = IMA_APPRAISE_SUBMASK << 1
IMA_DONE_MASK = 0x2 | 0x8 | 0x80 | 0x200 | 0x20 | IMA_APPRAISED_SUBMASK  # MEASURED APPRAISED AUDITED HASHED COLLECTED
# iint->atomic_flags (bit numbers as masks)
UPDATE_XATTR = 1 << 1  # an appraised file was opened for write: its hash is rewritten at the last close
DIGSIG = 1 << 3  # security.ima holds a signature: the file is immutable
MAY_EMIT_TOMTOU = 1 << 4  # IMA_MUST_MEASURE before the 6.15 violation limits
EMITTED_OPENWRITERS = 1 << 5
# the cached appraisal results (enum integrity_status), 3 bits each: file, mmap, bprm, read, creds
STATUS_SLOTS = {"FILE_CHECK": 0, "MMAP_CHECK": 1, "MMAP_CHECK_REQPROT": 1, "BPRM_CHECK": 2, "CREDS_CHECK": 4}
INTEGRITY_UNKNOWN = 6

_ALGO_IDS = {name: ident for name, (ident, _) in T.HASH_ALGOS.items()}
_ALGO_NAMES = {ident: name for name, ident in _ALGO_IDS.items()}
_RECORD = struct.Struct("<IBQQBH")  # flags, atomic flags, measured_pcrs, cookie, algo, statuses; the digest


def _field(fmt: str, offset: int) -> property:
    """A field of the packed record; the first change copies the record."""
    st = struct.Struct(fmt)

    def get(self) -> int:
        return st.unpack_from(self._rec, offset)[0]

    def set(self, value: int) -> None:
        if type(self._rec) is bytes:
            self._rec = bytearray(self._rec)
        st.pack_into(self._rec, offset, value)
    return property(get, set)


class Iint:
    """The IMA state of one inode: a view of its packed record.

    A lookup costs one small object; fields are decoded when read."""

    __slots__ = ("key", "_rec")

    def __init__(self, key: tuple[int, int], flags: int = 0, atomic: int = 0, measured_pcrs: int = 0,
                 cookie: int = 0, algo: str = "", digest: bytes = b""):
        self.key = key  # (st_dev, st_ino)
        unknown = sum(INTEGRITY_UNKNOWN << 3 * i for i in range(5))
        self._rec = bytearray(_RECORD.pack(flags, atomic, measured_pcrs, cookie, _ALGO_IDS.get(algo, 0xFF),
                                           unknown))
        self._rec += digest

    flags = _field("<I", 0)
    atomic = _field("<B", 4)  # the atomic_flags bits
    measured_pcrs = _field("<Q", 5)
    cookie = _field("<Q", 13)  # the change cookie when the digest was collected
    _algo = _field("<B", 21)
    _statuses = _field("<H", 22)

    def status(self, func: str) -> int:
        """The cached appraisal result of ``func``'s kind (ima_get_cache_status);
        the kernel-read hooks (module, firmware, kexec, policy) share one."""
        return self._statuses >> 3 * STATUS_SLOTS.get(func, 3) & 7

    def set_status(self, func: str, status: int) -> None:
        shift = 3 * STATUS_SLOTS.get(func, 3)
        self._statuses = self._statuses & ~(7 << shift) | status << shift

    @property
    def algo(self) -> str:
        """The collected digest's algorithm, "" if none."""
        return _ALGO_NAMES.get(self._algo, "")

    @algo.setter
    def algo(self, name: str) -> None:
        self._algo = _ALGO_IDS[name] if name else 0xFF

    @property
    def digest(self) -> bytes:
        return bytes(self._rec[_RECORD.size:])

    @digest.setter
    def digest(self, value: bytes) -> None:
        self._rec = bytearray(self._rec[:_RECORD.size]) + value

    def record(self) -> bytes:
        return bytes(self._rec)

    def reset(self) -> None:
        """Forget what was done: the next matching access measures again."""
        self.flags &= ~IMA_DONE_MASK
        self.measured_pcrs = 0

    def __eq__(self, other) -> bool:
        return isinstance(other, Iint) and (self.key, self.record()) == (other.key, other.record())

    def __repr__(self) -> str:
        return (f"Iint({self.key}, flags={self.flags:#x}, atomic={self.atomic:#x}, statuses={self._statuses:#x}, "
                f"measured_pcrs={self.measured_pcrs:#x}, algo={self.algo!r}, digest={self.digest.hex()})")


_new_iint = object.__new__  # an Iint around a stored record, without __init__


def _int_key(key: tuple[int, int]) -> int:
    """(dev, ino) as one int: ordered like the tuple, a third of its size."""
    return key[0] << 64 | key[1]


class IintCache:
    """Per-inode IMA state, bounded to ``limit`` inodes.

    When full, an inode that nobody has open is evicted, as the kernel's inode
    cache drops unused inodes with their iint: the evicted file is measured
    again on its next access, and the duplicate table keeps an unchanged file
    from being listed twice.  The victim is the next closed inode after a clock
    hand that walks the keys in order.

    ``changed`` is called on every change of an entry and of an inode's
    writers (the hook epoch, imafs/epoch.py).
    """

    def __init__(self, limit: int = 100_000, changed: Callable[[], None] = lambda: None):
        if limit < 1:
            raise ValueError("the iint cache needs room for at least one inode")
        self.limit = limit
        self._map: SortedDict = SortedDict()
        self._get = self._map.get
        self._hand = 0
        self.opens: dict[tuple[int, int], list[int]] = {}  # key -> [readers, writers]
        self.hits = self.misses = self.evictions = 0
        self.changed = changed

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return _int_key(key) in self._map

    def find(self, key: tuple[int, int]) -> Iint | None:
        """The inode's state, if it has any (ima_iint_find)."""
        rec = self._get(key[0] << 64 | key[1])  # _int_key, inlined: the hot path
        if rec is None:
            self.misses += 1
            return None
        self.hits += 1
        iint = _new_iint(Iint)
        iint.key = key
        iint._rec = rec
        return iint

    def get(self, key: tuple[int, int]) -> Iint:
        """The inode's state, created empty when missing (ima_inode_get)."""
        return self.find(key) or Iint(key)

    def put(self, iint: Iint) -> None:
        k = _int_key(iint.key)
        rec = iint.record()
        old = self._get(k)
        if old is None and len(self._map) >= self.limit:
            self._evict_one()
        if rec != old:
            self._map[k] = rec
            self.changed()

    def remove(self, key: tuple[int, int]) -> None:
        """The inode is gone (its last link removed and nobody has it open)."""
        if self._map.pop(_int_key(key), None) is not None:
            self.changed()

    def clear(self) -> None:
        """A new kernel: no inode has IMA state any more."""
        self._map.clear()
        self._hand = 0
        self.changed()

    def _evict_one(self) -> None:
        n = len(self._map)
        for step in range(n):
            i = (self._hand + step) % n
            k, _ = self._map.peekitem(i)
            if (k >> 64, k & 0xFFFF_FFFF_FFFF_FFFF) not in self.opens:
                del self._map[k]
                self._hand = i
                self.evictions += 1
                self.changed()
                return
        # every cached inode is open: grow past the bound rather than lose state in use

    # -- open counts (i_readcount, i_writecount) --------------------------------------
    def counts(self, key: tuple[int, int]) -> tuple[int, int]:
        c = self.opens.get(key)
        return (c[0], c[1]) if c else (0, 0)

    def opened(self, key: tuple[int, int], reader: bool, writer: bool) -> None:
        """An open: read-only opens count as readers, any write mode as a writer."""
        c = self.opens.setdefault(key, [0, 0])
        c[0] += reader
        c[1] += writer
        if writer:
            self.changed()

    def closed(self, key: tuple[int, int], reader: bool, writer: bool) -> None:
        c = self.opens.get(key)
        if c is None:
            return
        c[0] -= reader
        c[1] -= writer
        if c[0] <= 0 and c[1] <= 0:
            del self.opens[key]
        if writer:
            self.changed()

    def stats(self) -> dict:
        size = len(self._map)
        return {"size": size, "limit": self.limit, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions, "open_inodes": len(self.opens),
                "bytes_per_inode": round(self.memory() / size) if size else 0}

    def memory(self) -> int:
        """Bytes held by the entries: keys, records, and the map's own tables.

        Exact for the records and keys; the SortedDict's hash table and sorted
        key lists are counted by their allocated sizes."""
        m = self._map
        keys = m._list  # the SortedList of keys
        total = sys.getsizeof(m) + sum(map(sys.getsizeof, (keys._lists, keys._maxes, keys._index)))
        total += sum(map(sys.getsizeof, keys._lists))
        for k, rec in m.items():
            total += sys.getsizeof(k) + sys.getsizeof(rec)
        return total
