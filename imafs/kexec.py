"""The kexec buffer (the kernel's ima_kexec.c): dump and restore.

Layout (kernel-abi.md §6.1): a 24-byte header — u16 version 1, u16 and u32
reserved, u64 buffer size including the header, u64 record count — then the
records in the binary_runtime_measurements_sha1 format. Little-endian.
"""

from __future__ import annotations

import struct

from . import templates as T

HEADER = struct.Struct("<HHIQQ")
VERSION = 1


class KexecBufferError(ValueError):
    """A buffer the kernel would refuse to restore."""


def dump(lists) -> bytes:
    """The buffer carrying ``lists`` in order (the staged list, then the current one)."""
    body = b"".join(lst.sha1_bytes() for lst in lists)
    count = sum(lst.count for lst in lists)
    return HEADER.pack(VERSION, 0, 0, HEADER.size + len(body), count) + body


def parse(buf: bytes):
    """(records, error): the records the kernel's restore takes from ``buf``,
    in order, and why it stopped early (None if it did not).

    A bad header restores nothing (KexecBufferError). A bad record stops the
    restore there: the records before it are kept, as in the kernel."""
    if len(buf) < HEADER.size:
        raise KexecBufferError(f"buffer of {len(buf)} bytes is shorter than its header")
    version, _, _, size, count = HEADER.unpack_from(buf)
    if version != VERSION:
        raise KexecBufferError(f"buffer version {version}, expected {VERSION}")
    if size != len(buf):
        raise KexecBufferError(f"header says {size} bytes, buffer has {len(buf)}")
    records: list[tuple[int, bytes, T.Template, tuple[bytes, ...]]] = []
    off = HEADER.size
    try:
        while off < len(buf):
            # names of 69 characters or more are refused here, as by the kernel
            pcr, digest, tmpl, fields, off = T.parse_binary_record(buf, off, 20)
            if tmpl.name == "ima":
                raise KexecBufferError(f"record {len(records)}: the 'ima' template cannot be restored")
            records.append((pcr, digest, tmpl, fields))
    except (T.TemplateError, KexecBufferError) as e:
        return records, str(e)
    if len(records) != count:
        return records, f"header says {count} records, buffer has {len(records)}"
    return records, None
