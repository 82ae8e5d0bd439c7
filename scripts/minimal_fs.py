"""The benchmark's baseline: the smallest pyfuse3 server of one file held in memory.

    python scripts/minimal_fs.py MOUNTPOINT DATAFILE

Serves DATAFILE's bytes as MOUNTPOINT/data (st_size 0, direct_io, like the
emulator's lists) and prints "ready" once mounted.
"""

import errno
import stat
import sys

import pyfuse3
import trio


class Minimal(pyfuse3.Operations):
    def __init__(self, data: bytes):
        super().__init__()
        self.data = data

    def _attrs(self, inode):
        a = pyfuse3.EntryAttributes()
        a.st_ino = inode
        a.st_mode = (stat.S_IFDIR | 0o755) if inode == pyfuse3.ROOT_INODE else (stat.S_IFREG | 0o440)
        a.st_nlink = 1
        a.attr_timeout = a.entry_timeout = 1
        return a

    async def getattr(self, inode, ctx=None):
        return self._attrs(inode)

    async def lookup(self, parent, name, ctx=None):
        if parent != pyfuse3.ROOT_INODE or name != b"data":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(2)

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def read(self, fh, off, size):
        return self.data[off:off + size]


def main():
    mountpoint, datafile = sys.argv[1:3]
    with open(datafile, "rb") as f:
        data = f.read()
    pyfuse3.init(Minimal(data), mountpoint, ["fsname=minimal", "allow_other"])
    print("ready", flush=True)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
