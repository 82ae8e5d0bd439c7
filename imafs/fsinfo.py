"""What the kernel knows of a file's filesystem: magic, type name, subtype, UUID."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
NULL_UUID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class FsInfo:
    magic: int
    name: str  # the superblock's type name, e.g. "ext4", "fuse"
    subtype: str | None  # e.g. the FUSE subtype
    uuid: str
    s_id: str  # the superblock's id in audit records: the block device's name, else the type


def _statfs_magic(path: str) -> int:
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is its first long
    if _libc.statfs(os.fsencode(path), buf) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return ctypes.c_ulong.from_buffer(buf).value


def _mount_of(path: str) -> tuple[str, str]:
    """(fstype, source) of the mount that holds ``path``."""
    best, found = -1, ("", "")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            point = left.split()[4].encode().decode("unicode_escape")
            fstype, source = right.split()[:2]
            if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) > best:
                best, found = len(point), (fstype, source)
    return found


def _uuid_of(source: str) -> str:
    """The UUID a block device's filesystem has, from /dev/disk/by-uuid."""
    try:
        dev = os.path.realpath(source)
        for entry in os.scandir("/dev/disk/by-uuid"):
            if os.path.realpath(entry.path) == dev:
                return entry.name.lower()
    except OSError:
        pass
    return NULL_UUID


def fs_info(path: str) -> FsInfo:
    real = os.path.realpath(path)
    fstype, source = _mount_of(real)
    name, _, subtype = fstype.partition(".")
    block = source.startswith("/dev/")
    return FsInfo(_statfs_magic(real), name, subtype or None, _uuid_of(source) if block else NULL_UUID,
                  os.path.basename(os.path.realpath(source)) if block else name)
