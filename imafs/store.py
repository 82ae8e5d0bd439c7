"""The measurement store: the kernel's ima_queue.c in Python.

One store holds the records; the files are views of it.  Records live in
blocks of up to ``BLOCK_RECORDS`` records.  The truth of a block is the
concatenation of its records in the ``binary_runtime_measurements_sha1``
layout (the kexec serialization format, kernel-abi.md §2.2/§6.1) plus, for
every other digest slot, the records' template digests side by side.  So the
legacy binary view is served straight from the block, and every other view
(ASCII, other banks) is rendered once per block and kept in a bounded LRU
cache.  Per view the store keeps the byte offset at which each block starts,
so any offset is found by a bisection over blocks, never by a scan.

A :class:`MeasurementList` is one such sequence of blocks; the store has the
current list and, for the staging ABI, a staged list.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from . import templates as T

BLOCK_RECORDS = 1024

SHA1_SIZE = 20

_U32 = struct.Struct("<I")
_PCR_PREFIX = [b"%2d " % i for i in range(64)]


@dataclass(frozen=True)
class View:
    """One rendering of a list: ``ascii`` or ``binary`` with one bank's digests."""

    fmt: str  # "ascii" | "binary"
    bank: str


class Block:
    """Up to BLOCK_RECORDS records: sha1-layout records plus other digest slots."""

    __slots__ = ("blob", "offsets", "slots", "pcrs", "tmpl", "ascii_rest", "kexec_size", "serial")

    def __init__(self, slot_banks: tuple[str, ...], serial: int):
        self.blob = bytearray()  # records in binary sha1 layout
        self.offsets = array("I")  # start of each record in blob
        self.slots = {b: bytearray() for b in slot_banks}  # digests of non-sha1 slots
        self.pcrs = bytearray()  # pcr of each record (0..63)
        self.tmpl = bytearray()  # index into the store's template table
        self.ascii_rest = 0  # Σ len(template name + ascii_fields) over the records
        self.kexec_size = 0  # Σ binary_runtime_size contributions (kernel-abi.md §6.2)
        self.serial = serial  # unique id, key of the render cache

    def __len__(self) -> int:
        return len(self.offsets)

    def add(self, sha1_record: bytes, digests, pcr: int, tmpl_idx: int, ascii_rest_len: int,
            kexec_size: int) -> None:
        self.offsets.append(len(self.blob))
        self.blob += sha1_record
        for bank, buf in self.slots.items():
            buf += digests[bank]
        self.pcrs.append(pcr)
        self.tmpl.append(tmpl_idx)
        self.ascii_rest += ascii_rest_len
        self.kexec_size += kexec_size

    def seal(self) -> None:
        self.blob = _own_pages(self.blob)
        self.slots = {b: bytes(v) for b, v in self.slots.items()}
        self.pcrs = bytes(self.pcrs)
        self.tmpl = bytes(self.tmpl)

    def record_end(self, i: int) -> int:
        return self.offsets[i + 1] if i + 1 < len(self.offsets) else len(self.blob)

    def size(self, view: View) -> int:
        n = len(self.offsets)
        if view.fmt == "binary":
            return len(self.blob) + n * (T.digest_size(view.bank) - SHA1_SIZE)
        # "%2d " + hex digest + " " + name/fields + "\n"
        return n * (3 + 2 * T.digest_size(view.bank) + 1 + 1) + self.ascii_rest


def _own_pages(data) -> mmap.mmap | bytes:
    """``data`` in an anonymous mapping of its own: freeing it gives the pages
    back to the system at once, whatever the heap around it looks like."""
    if not data:
        return b""
    pages = mmap.mmap(-1, len(data))
    pages.write(data)
    return pages


class RenderCache:
    """A bounded LRU of rendered blocks: (serial, view) -> (records rendered, bytes)."""

    def __init__(self, budget: int):
        self.budget = budget
        self.used = 0
        self._lru: OrderedDict[tuple[int, View], tuple[int, bytes]] = OrderedDict()

    def get(self, key):
        data = self._lru.get(key)
        if data is not None:
            self._lru.move_to_end(key)
        return data

    def drop(self, serial: int, views) -> None:
        for v in views:
            entry = self._lru.pop((serial, v), None)
            if entry is not None:
                self.used -= len(entry[1])

    def put(self, key, entry: tuple[int, bytes]) -> None:
        old = self._lru.pop(key, None)
        if old is not None:
            self.used -= len(old[1])
        if len(entry[1]) > self.budget:
            return
        self._lru[key] = entry
        self.used += len(entry[1])
        while self.used > self.budget:
            _, (_, data) = self._lru.popitem(last=False)
            self.used -= len(data)


class MeasurementList:
    """An ordered sequence of records, stored in blocks, readable in every view."""

    def __init__(self, store: "MeasurementStore"):
        self.store = store
        self.blocks: list[Block] = []
        self.count = 0
        # per view: start offset of every block (same length as self.blocks)
        self.starts: dict[View, array] = {v: array("Q") for v in store.views}

    # -- appending ----------------------------------------------------------
    def _tail(self) -> Block:
        if not self.blocks or len(self.blocks[-1]) >= BLOCK_RECORDS:
            if self.blocks:
                self.blocks[-1].seal()
            block = Block(self.store.extra_slots, self.store.next_serial())
            for v, starts in self.starts.items():
                starts.append(self.size(v))
            self.blocks.append(block)
        return self.blocks[-1]

    def append(self, *record) -> None:
        """Append one record: the arguments of :meth:`Block.add`."""
        self._tail().add(*record)
        self.count += 1

    # -- deleting from the head (staging: N) ---------------------------------------
    def trim(self, n: int) -> None:
        """Remove the ``n`` oldest records (n <= count); their memory is returned."""
        whole = 0
        while whole < len(self.blocks) and len(self.blocks[whole]) <= n:
            n -= len(self.blocks[whole])
            self.count -= len(self.blocks[whole])
            whole += 1
        dropped, self.blocks = self.blocks[:whole], self.blocks[whole:]
        if n:
            old = self.blocks[0]
            self.blocks[0] = self.store.copy_block(old, n, sealed=len(self.blocks) > 1)
            dropped.append(old)
            self.count -= n
        self.store.graveyard.extend(dropped)
        for v, starts in self.starts.items():
            starts[:] = array("Q")
            pos = 0
            for b in self.blocks:
                starts.append(pos)
                pos += b.size(v)

    @property
    def kexec_size(self) -> int:
        """binary_runtime_size of this list, without the kexec header."""
        return sum(b.kexec_size for b in self.blocks)

    # -- sizes and reads ------------------------------------------------------
    def size(self, view: View) -> int:
        if not self.blocks:
            return 0
        return self.starts[view][-1] + self.blocks[-1].size(view)

    def read(self, view: View, offset: int, size: int) -> bytes:
        """Bytes [offset, offset+size) of the list rendered in ``view``."""
        if size <= 0 or not self.blocks:
            return b""
        starts = self.starts[view]
        i = bisect.bisect_right(starts, offset) - 1  # starts[0] == 0
        out = []
        want = size
        pos = offset - starts[i]
        while want > 0 and i < len(self.blocks):
            piece = memoryview(self.store.render(self.blocks[i], view))[pos:pos + want]
            out.append(piece)
            want -= len(piece)
            pos = 0
            i += 1
        return bytes(out[0]) if len(out) == 1 else b"".join(out)

    def sha1_bytes(self) -> bytes:
        """The whole list in the kexec (binary sha1) serialization format."""
        return b"".join(bytes(b.blob) for b in self.blocks)


class MeasurementStore:
    """The lists, the duplicate table, the counters and the PCR banks.

    ``slot_banks`` are the algorithms a template digest is computed in: sha1
    (always), every TPM bank, and the IMA hash (for the duplicate table).
    ``file_banks`` are the banks that get files: the TPM banks, plus sha1.
    """

    def __init__(self, *, tpm_banks: tuple[str, ...], ima_hash: str, pcrs=None,
                 disable_htable: bool = False, cache_bytes: int = 256 << 20,
                 sha1_padded: tuple[str, ...] = ()):
        self.tpm_banks = tuple(tpm_banks)
        self.ima_hash = ima_hash
        self.ima_d_len = 16 if ima_hash == "md5" else 20
        self.file_banks = self.tpm_banks + (() if "sha1" in self.tpm_banks else ("sha1",))
        slots = ["sha1"]
        for b in self.tpm_banks + (ima_hash,):
            if b not in slots:
                slots.append(b)
        self.slot_banks = tuple(slots)
        self.extra_slots = tuple(b for b in slots if b != "sha1")
        self._hashers = tuple((b, T.hasher(b)) for b in slots)
        self._zero_digests = {b: bytes(T.digest_size(b)) for b in slots}
        # banks whose slot is the SHA-1 template digest zero-padded: the kernel
        # has no implementation of their hash (kernel-abi.md §4.2, F-19)
        self._padded = tuple((b, bytes(T.digest_size(b) - SHA1_SIZE)) for b in sha1_padded
                             if b in slots and b != ima_hash)
        self.views = tuple(View(f, b) for b in self.file_banks for f in ("ascii", "binary"))
        self.pcrs = pcrs
        self.disable_htable = disable_htable
        self.htable: set[int] = set()
        self.violations = 0
        self.cache = RenderCache(cache_bytes)
        self._serial = 0
        self.templates: list[T.Template] = []
        self._tmpl_index: dict[T.Template, int] = {}
        self.current = MeasurementList(self)
        self.staged = MeasurementList(self)
        self.graveyard: list = []  # deleted blocks (and flushed tables) still to free
        self.full_count = 0  # BINARY_FULL: every record added in this boot
        self.full_size = 0

    # -- staging -----------------------------------------------------------------------
    def stage(self) -> None:
        """A: the current list becomes the staged list; appends go to a new one."""
        self.staged, self.current = self.current, MeasurementList(self)

    def delete_staged(self, flush_htable: bool = False) -> None:
        """D: free the staged list; its digests stay in the duplicate table
        unless ``flush_htable`` replaces the table."""
        old, self.staged = self.staged, MeasurementList(self)
        self.graveyard.extend(old.blocks)
        if flush_htable:
            self.graveyard.append(self.htable)
            self.htable = set()

    def reap(self, batch: int = 1) -> bool:
        """Free up to ``batch`` deleted blocks; True while more remain.

        Deleting is detaching (O(1)); freeing happens here, in small steps the
        daemon interleaves with other requests, as the kernel frees deleted
        records after releasing the list lock."""
        freed = 0
        while self.graveyard and freed < batch:
            item = self.graveyard[-1]
            if isinstance(item, Block):
                self.graveyard.pop()
                self.forget(item)
                freed += 1
            else:  # a flushed duplicate table: one slice is a whole step
                for _ in range(min(20_000, len(item))):
                    item.pop()
                if not item:
                    self.graveyard.pop()
                freed = batch
        return bool(self.graveyard)

    def forget(self, block: Block) -> None:
        self.cache.drop(block.serial, self.views)

    def copy_block(self, old: Block, first: int, sealed: bool) -> Block:
        """A new block holding the records ``first``.. of ``old``."""
        new = Block(self.extra_slots, self.next_serial())
        for i in range(first, len(old)):
            record = bytes(old.blob[old.offsets[i]:old.record_end(i)])
            template = self.templates[old.tmpl[i]]
            fields = T.parse_binary_record(record, 0, SHA1_SIZE, self.ima_d_len, T.MAX_LIST_TEMPLATE_NAME_LEN)[3]
            digests = {b: v[i * T.digest_size(b):(i + 1) * T.digest_size(b)] for b, v in old.slots.items()}
            new.add(record, digests, old.pcrs[i], old.tmpl[i],
                    len(template.display_name) + T.ascii_fields_len(template, fields),
                    self._kexec_size(template, record))
        if sealed:
            new.seal()
        return new

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    def view(self, fmt: str, bank: str) -> View:
        v = View(fmt, bank)
        if v not in self.views:
            raise KeyError(f"no {fmt} view for bank {bank}")
        return v

    # -- adding records (ima_add_template_entry) --------------------------------
    def _tmpl_idx(self, template: T.Template) -> int:
        idx = self._tmpl_index.get(template)
        if idx is None:
            idx = len(self.templates)
            self.templates.append(template)
            self._tmpl_index[template] = idx
        return idx

    def _dup_key(self, pcr: int, digest: bytes) -> int:
        return (int.from_bytes(digest, "little") << 6) | pcr

    def add(self, template: T.Template, fields: tuple[bytes, ...], pcr: int, *, violation: bool = False) -> bool:
        """Append one record as the kernel's store step does.

        Returns False when the duplicate table suppressed it (nothing appended,
        nothing extended).  Violations are never suppressed, extend 0xFF and
        show zero template digests; the caller counts them (``violations``).
        """
        data = None
        if violation:
            digests = self._zero_digests
        elif template.name == "ima":
            digests = {b: T.template_digest(b, template, fields) for b in self.slot_banks}
        else:
            data = T.template_data(fields)
            digests = {b: h(data).digest() for b, h in self._hashers}
        if self._padded and not violation:
            for b, pad in self._padded:
                digests[b] = digests["sha1"] + pad
        key = self._dup_key(pcr, digests[self.ima_hash])
        if not violation and not self.disable_htable and key in self.htable:
            return False
        self.htable.add(key)
        self._append(self.current, template, fields, pcr, digests, data)
        if self.pcrs is not None:  # after the append, as ima_add_template_entry does
            if violation:
                self.pcrs.extend_violation(pcr)
            else:
                self.pcrs.extend(pcr, digests)
        return True

    def _append(self, lst: MeasurementList, template, fields, pcr, digests, data=None) -> None:
        record = T.binary_record(pcr, digests["sha1"], template, fields, data)
        rest = len(template.display_name) + T.ascii_fields_len(template, fields)
        size = self._kexec_size(template, record)
        lst.append(record, digests, pcr, self._tmpl_idx(template), rest, size)
        self.full_count += 1
        self.full_size += size

    @staticmethod
    def _kexec_size(template: T.Template, record: bytes) -> int:
        """What the record adds to binary_runtime_size, with the kernel's quirks
        (kernel-abi.md §6.2): a custom template's name counts 0 bytes although
        it is written; an `ima` record counts the data-length word, the `d`
        field's length word and the name's NUL that its layout does not write."""
        if template.name == "ima":
            return len(record) + 4 + 4 + 1
        if not template.name:
            return len(record) - len(template.fmt)
        return len(record)

    def restore(self, template: T.Template, fields, pcr: int, violation: bool) -> None:
        """Append a record carried over by kexec: digests recomputed (zeros kept
        for violations), not in the duplicate table, no PCR extend."""
        digests = self._zero_digests if violation else \
            {b: T.template_digest(b, template, fields) for b in self.slot_banks}
        if self._padded and not violation:
            digests.update((b, digests["sha1"] + pad) for b, pad in self._padded)
        self._append(self.current, template, fields, pcr, digests)

    # -- rendering ------------------------------------------------------------
    def render(self, block: Block, view: View):
        """The bytes of ``block`` in ``view``.

        The sha1 binary view is the block itself.  Other views are rendered
        once and cached; a block that is still growing (the tail) only gets
        its new records rendered and appended.
        """
        if view.fmt == "binary" and view.bank == "sha1":
            return block.blob
        key = (block.serial, view)
        n = len(block)
        hit = self.cache.get(key)
        done, data = hit if hit is not None else (0, b"")
        if done < n:
            data = data + self._render_range(block, view, done, n)
            self.cache.put(key, (n, data))
        return data

    def _render_range(self, block: Block, view: View, i0: int, i1: int) -> bytes:
        blob = block.blob
        offs = block.offsets
        d = T.digest_size(view.bank)
        slot = block.slots.get(view.bank)
        out = []
        if view.fmt == "binary":
            for i in range(i0, i1):
                s = offs[i]
                out.append(blob[s:s + 4])
                out.append(slot[i * d:(i + 1) * d])
                out.append(blob[s + 4 + SHA1_SIZE:block.record_end(i)])
            return b"".join(out)
        # ASCII: hex all digests of the range at once, walk the fields of each
        # record in place (the layout of a non-ima record is fixed by its template)
        if slot is None:
            digests = b"".join([blob[offs[i] + 4:offs[i] + 4 + SHA1_SIZE] for i in range(i0, i1)])
        else:
            digests = slot[i0 * d:i1 * d]
        hexes = digests.hex().encode()
        w = 2 * d
        pcrs, tmpl, templates = block.pcrs, block.tmpl, self.templates
        unpack = _U32.unpack_from
        for i in range(i0, i1):
            t = templates[tmpl[i]]
            s = offs[i]
            if t.name == "ima":
                fields = T.parse_binary_record(blob, s, SHA1_SIZE, self.ima_d_len, T.MAX_LIST_TEMPLATE_NAME_LEN)[3]
            else:
                o = s + 4 + SHA1_SIZE + 4 + len(t.display_name) + 4
                e = block.record_end(i)
                fields = []
                while o < e:
                    n, = unpack(blob, o)
                    fields.append(blob[o + 4:o + 4 + n])
                    o += 4 + n
            k = (i - i0) * w
            out.append(_PCR_PREFIX[pcrs[i]] + hexes[k:k + w] + b" " + t.display_name.encode()
                       + T.ascii_fields(t, fields) + b"\n")
        return b"".join(out)
