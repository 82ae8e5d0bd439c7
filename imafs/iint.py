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
from dataclasses import dataclass

from sortedcontainers import SortedDict

from . import templates as T

# iint->flags (kernel-abi.md §5.3)
IMA_MEASURE = 0x1
IMA_MEASURED = 0x2
IMA_COLLECTED = 0x20
IMA_DONE_MASK = 0x2 | 0x8 | 0x80 | 0x200 | 0x20  # MEASURED APPRAISED AUDITED HASHED COLLECTED
# iint->atomic_flags (bit numbers as masks)
MAY_EMIT_TOMTOU = 1 << 4  # IMA_MUST_MEASURE before the 6.15 violation limits
EMITTED_OPENWRITERS = 1 << 5

_ALGO_IDS = {name: ident for name, (ident, _) in T.HASH_ALGOS.items()}
_ALGO_NAMES = {ident: name for name, ident in _ALGO_IDS.items()}
_RECORD = struct.Struct("<IBQQB")  # flags, atomic flags, measured_pcrs, cookie, algo; then the digest


@dataclass(slots=True)
class Iint:
    """The IMA state of one inode."""

    key: tuple[int, int]  # (st_dev, st_ino)
    flags: int = 0
    atomic: int = 0
    measured_pcrs: int = 0
    cookie: int = 0  # the change cookie when the digest was collected
    algo: str = ""  # the collected digest's algorithm, "" if none
    digest: bytes = b""

    def reset(self) -> None:
        """Forget what was done: the next matching access measures again."""
        self.flags &= ~IMA_DONE_MASK
        self.measured_pcrs = 0


def _pack(i: Iint) -> bytes:
    return _RECORD.pack(i.flags, i.atomic, i.measured_pcrs, i.cookie,
                        _ALGO_IDS[i.algo] if i.algo else 0xFF) + i.digest


def _unpack(key: tuple[int, int], rec: bytes) -> Iint:
    flags, atomic, pcrs, cookie, algo = _RECORD.unpack_from(rec)
    return Iint(key, flags, atomic, pcrs, cookie, _ALGO_NAMES.get(algo, ""), rec[_RECORD.size:])


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
    """

    def __init__(self, limit: int = 100_000):
        if limit < 1:
            raise ValueError("the iint cache needs room for at least one inode")
        self.limit = limit
        self._map: SortedDict = SortedDict()
        self._hand = 0
        self.opens: dict[tuple[int, int], list[int]] = {}  # key -> [readers, writers]
        self.hits = self.misses = self.evictions = 0

    def __len__(self) -> int:
        return len(self._map)

    def __contains__(self, key: tuple[int, int]) -> bool:
        return _int_key(key) in self._map

    def find(self, key: tuple[int, int]) -> Iint | None:
        """The inode's state, if it has any (ima_iint_find)."""
        rec = self._map.get(_int_key(key))
        if rec is None:
            self.misses += 1
            return None
        self.hits += 1
        return _unpack(key, rec)

    def get(self, key: tuple[int, int]) -> Iint:
        """The inode's state, created empty when missing (ima_inode_get)."""
        return self.find(key) or Iint(key)

    def put(self, iint: Iint) -> None:
        k = _int_key(iint.key)
        if k not in self._map and len(self._map) >= self.limit:
            self._evict_one()
        self._map[k] = _pack(iint)

    def remove(self, key: tuple[int, int]) -> None:
        """The inode is gone (its last link removed and nobody has it open)."""
        self._map.pop(_int_key(key), None)

    def clear(self) -> None:
        """A new kernel: no inode has IMA state any more."""
        self._map.clear()
        self._hand = 0

    def _evict_one(self) -> None:
        n = len(self._map)
        for step in range(n):
            i = (self._hand + step) % n
            k, _ = self._map.peekitem(i)
            if (k >> 64, k & 0xFFFF_FFFF_FFFF_FFFF) not in self.opens:
                del self._map[k]
                self._hand = i
                self.evictions += 1
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

    def closed(self, key: tuple[int, int], reader: bool, writer: bool) -> None:
        c = self.opens.get(key)
        if c is None:
            return
        c[0] -= reader
        c[1] -= writer
        if c[0] <= 0 and c[1] <= 0:
            del self.opens[key]

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
