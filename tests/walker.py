"""Every namespace, attribute and descriptor call on a list of paths, with
the errno each one got (0: it succeeded).

Self-contained (standard library and ctypes only) so that it also runs as
another user: ``setpriv --reuid 1000 … python walker.py SPEC`` prints the
results of one whole walk as JSON on stdout.  SPEC is JSON:

    {"targets": [{"label": L, "path": P, "sibling": S or null,
                  "cross": C or null, "victim": true|false,
                  "reset": [root, owned_subtree or null] or null}, ...]}

``sibling`` is an existing name in P's directory (for replacing renames),
``cross`` a directory of another part of the mount (or another
filesystem) for links and renames across.  ``victim`` false keeps calls that
remove or move P itself (mount points).  After every call that succeeded
and may have changed something, the target's ``reset`` root is rebuilt
(:func:`build`), or only its subtree owned by the caller when that is given.

``walker.py --serve`` answers such requests one JSON line at a time, and
also reads and writes files (:func:`serve`), for a test that drives one
mount for long: every call on the mount happens in this process, which the
test can wait for with a timeout and kill.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import json
import os
import shutil
import stat
import sys
import termios

NEW = "walk-new"
RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4
O_TMPFILE = getattr(os, "O_TMPFILE", 0o20200000)
FS_IOC_GETFLAGS = 0x80086601  # _IOR('f', 1, long) on 64-bit
FIGETBSZ = 2
PROT_READ, MAP_SHARED, MAP_PRIVATE = 0x1, 0x01, 0x02
AT_FDCWD = -100
TIMES_NS = (1_000_000_000_123, 1_000_000_000_456)

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long)
_libc.renameat2.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint)


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def renameat2(old: str, new: str, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def fallocate(fd: int) -> None:
    _check(_libc.fallocate(fd, 0, 0, 4096))


def mmap(fd: int, flags: int) -> None:
    addr = _libc.mmap(None, 4096, PROT_READ, flags, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    _libc.munmap(addr, 4096)  # never touched: a page past EOF would be SIGBUS


def _parent(path: str) -> str:
    return os.path.dirname(path.rstrip("/"))


# -- calls on a path ---------------------------------------------------------------------------
# Each takes (path, target) and returns None; a raised OSError is the answer.
def _open_close(path, flags, mode=0o644):
    # O_NONBLOCK: a FIFO made by an earlier call never holds the walk up
    os.close(os.open(path, flags | os.O_NONBLOCK, mode))


def _chmod(path, t):
    st = os.stat(path)
    os.chmod(path, stat.S_IMODE(st.st_mode) ^ 0o001)
    changed = stat.S_IMODE(os.stat(path).st_mode) == stat.S_IMODE(st.st_mode) ^ 0o001
    os.chmod(path, stat.S_IMODE(st.st_mode))
    if not changed:
        raise NoEffect("chmod")


def _chown(path, t):
    st = os.lstat(path)
    os.chown(path, st.st_uid ^ 1, st.st_gid ^ 1, follow_symlinks=False)
    changed = (os.lstat(path).st_uid, os.lstat(path).st_gid) == (st.st_uid ^ 1, st.st_gid ^ 1)
    os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
    if not changed:
        raise NoEffect("chown")


def _utime_set(path, t):
    os.utime(path, ns=TIMES_NS, follow_symlinks=False)
    if os.lstat(path).st_mtime_ns != TIMES_NS[1]:
        raise NoEffect("utime")


def _truncate(path, t):
    os.truncate(path, 7)
    size = os.stat(path).st_size
    os.truncate(path, 0)
    if size != 7:
        raise NoEffect("truncate")


def _listxattr(path, t):
    names = os.listxattr(path, follow_symlinks=False)
    if names:
        raise Listed(names)


def _cross(t):
    if not t.get("cross"):
        raise NotApplicable
    return os.path.join(t["cross"], NEW)


def _sibling(t):
    if not t.get("sibling"):
        raise NotApplicable
    return os.path.join(_parent(t["path"]), t["sibling"])


def _victim(t):
    if not t.get("victim", True):
        raise NotApplicable


class NotApplicable(Exception):
    pass


class NoEffect(Exception):
    """A call that reported success without doing what it says."""


class Listed(Exception):
    """listxattr found names: the answer is the names."""


PATH_CALLS = {
    # creating names in the node (ENOTDIR when it is not a directory)
    "creat": lambda p, t: _open_close(os.path.join(p, NEW), os.O_CREAT | os.O_WRONLY | os.O_TRUNC),
    "open_excl_new": lambda p, t: _open_close(os.path.join(p, NEW), os.O_CREAT | os.O_EXCL | os.O_WRONLY),
    "tmpfile": lambda p, t: _open_close(p, O_TMPFILE | os.O_RDWR),
    "mkdir_new": lambda p, t: os.mkdir(os.path.join(p, NEW)),
    "mknod_reg": lambda p, t: os.mknod(os.path.join(p, NEW), stat.S_IFREG | 0o644),
    "mknod_fifo": lambda p, t: os.mknod(os.path.join(p, NEW), stat.S_IFIFO | 0o644),
    "mknod_chr": lambda p, t: os.mknod(os.path.join(p, NEW), stat.S_IFCHR | 0o644, os.makedev(1, 3)),
    "symlink_new": lambda p, t: os.symlink("target", os.path.join(p, NEW)),
    # the node's own name
    "open_excl_self": lambda p, t: _open_close(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY),
    "mkdir_self": lambda p, t: os.mkdir(p),
    "link_sibling": lambda p, t: (_victim(t), os.link(p, os.path.join(_parent(p), NEW), follow_symlinks=False)),
    "link_cross": lambda p, t: (_victim(t), os.link(p, _cross(t), follow_symlinks=False)),
    "unlink": lambda p, t: (_victim(t), os.unlink(p)),
    "rmdir": lambda p, t: (_victim(t), os.rmdir(p)),
    "rename_new": lambda p, t: (_victim(t), os.rename(p, os.path.join(_parent(p), NEW))),
    "rename_self": lambda p, t: (_victim(t), os.rename(p, p)),
    "rename_replace": lambda p, t: (_victim(t), os.rename(p, _sibling(t))),
    "rename_noreplace_new": lambda p, t: (_victim(t), renameat2(p, os.path.join(_parent(p), NEW), RENAME_NOREPLACE)),
    "rename_noreplace_existing": lambda p, t: (_victim(t), renameat2(p, _sibling(t), RENAME_NOREPLACE)),
    "rename_exchange": lambda p, t: (_victim(t), renameat2(p, _sibling(t), RENAME_EXCHANGE)),
    "rename_whiteout": lambda p, t: (_victim(t), renameat2(p, os.path.join(_parent(p), NEW), RENAME_WHITEOUT)),
    "rename_cross": lambda p, t: (_victim(t), os.rename(p, _cross(t))),
    # attributes
    "chmod": _chmod,
    "chown": _chown,
    "chown_noop": lambda p, t: os.chown(p, -1, -1, follow_symlinks=False),
    "utime_set": _utime_set,
    "utime_now": lambda p, t: os.utime(p, None, follow_symlinks=False),
    "truncate": _truncate,
    "stat": lambda p, t: os.stat(p),
    "lstat": lambda p, t: os.lstat(p),
    "statvfs": lambda p, t: os.statvfs(p),
    "readlink": lambda p, t: os.readlink(p),
    "listdir": lambda p, t: os.listdir(p),
    "listxattr": _listxattr,
    # opens
    "open_r": lambda p, t: _open_close(p, os.O_RDONLY),
    "open_w": lambda p, t: _open_close(p, os.O_WRONLY),
    "open_rw": lambda p, t: _open_close(p, os.O_RDWR),
    "open_directory": lambda p, t: _open_close(p, os.O_RDONLY | os.O_DIRECTORY),
    "open_nofollow": lambda p, t: _open_close(p, os.O_RDONLY | os.O_NOFOLLOW),
    "open_path": lambda p, t: _open_close(p, os.O_PATH),
    "open_path_nofollow": lambda p, t: _open_close(p, os.O_PATH | os.O_NOFOLLOW),
}
for _ns in ("user", "security", "trusted"):
    PATH_CALLS[f"setxattr_{_ns}"] = lambda p, t, n=f"{_ns}.walk": os.setxattr(p, n, b"v", follow_symlinks=False)
    PATH_CALLS[f"getxattr_{_ns}"] = lambda p, t, n=f"{_ns}.walk": os.getxattr(p, n, follow_symlinks=False)
    PATH_CALLS[f"removexattr_{_ns}"] = lambda p, t, n=f"{_ns}.walk": os.removexattr(p, n, follow_symlinks=False)
PATH_CALLS["getxattr_acl"] = lambda p, t: os.getxattr(p, "system.posix_acl_access", follow_symlinks=False)
PATH_CALLS["removexattr_acl"] = lambda p, t: os.removexattr(p, "system.posix_acl_access", follow_symlinks=False)


def _ioctl_int(fd, cmd):
    fcntl.ioctl(fd, cmd, bytearray(8))


def _flock(fd):
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)


def _lockf(fd):
    fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.lockf(fd, fcntl.LOCK_UN)


def _sendfile(fd):
    out = os.open("/dev/null", os.O_WRONLY)
    try:
        os.sendfile(out, fd, 0, 64)
    finally:
        os.close(out)


def _copy_file_range(fd):
    out = os.memfd_create("walk")
    try:
        os.copy_file_range(fd, out, 64, 0, 0)
    finally:
        os.close(out)


# -- calls on a descriptor: r: opened O_RDONLY, w: opened O_WRONLY -------------------------------
FD_CALLS = {
    "ioctl_fionread": lambda fd: _ioctl_int(fd, termios.FIONREAD),
    "ioctl_tcgets": lambda fd: fcntl.ioctl(fd, termios.TCGETS, bytearray(64)),
    "ioctl_getflags": lambda fd: _ioctl_int(fd, FS_IOC_GETFLAGS),
    "ioctl_figetbsz": lambda fd: _ioctl_int(fd, FIGETBSZ),
    "flock": _flock,
    "lockf": _lockf,
    "mmap_shared": lambda fd: mmap(fd, MAP_SHARED),
    "mmap_private": lambda fd: mmap(fd, MAP_PRIVATE),
    "lseek_set": lambda fd: os.lseek(fd, 0, os.SEEK_SET),
    "lseek_cur": lambda fd: os.lseek(fd, 0, os.SEEK_CUR),
    "lseek_end": lambda fd: os.lseek(fd, 0, os.SEEK_END),
    "lseek_data": lambda fd: os.lseek(fd, 0, os.SEEK_DATA),
    "lseek_hole": lambda fd: os.lseek(fd, 0, os.SEEK_HOLE),
    "sendfile": _sendfile,
    "copy_file_range": _copy_file_range,
    "fsync": os.fsync,
    "fdatasync": os.fdatasync,
    "fallocate": fallocate,
    "posix_fallocate": lambda fd: os.posix_fallocate(fd, 0, 1),
    "ftruncate": lambda fd: os.ftruncate(fd, 0),
}

# calls after which a reset is due when they succeeded (the attribute calls
# restore what they changed themselves)
CHANGING = {"creat", "open_excl_new", "tmpfile", "mkdir_new", "mknod_reg", "mknod_fifo", "mknod_chr",
            "symlink_new", "link_sibling", "link_cross", "unlink", "rmdir", "rename_new",
            "rename_replace", "rename_noreplace_new", "rename_exchange", "rename_whiteout",
            "rename_cross", "setxattr_user", "setxattr_security", "setxattr_trusted"}


def answer(fn, *args):
    """0, an errno, or a string for what is not an errno."""
    try:
        fn(*args)
        return 0
    except NotApplicable:
        return "n/a"
    except Listed as e:
        return "names: " + ",".join(sorted(e.args[0]))
    except NoEffect as e:
        return f"no effect: {e}"
    except OSError as e:
        return e.errno


def _refused(a) -> bool:
    return a == "n/a" or isinstance(a, int) and a > 0


def _empty_with_file(base: str, name: str, data: bytes) -> None:
    """Empty ``base``, then give it one 0644 file ``name`` holding ``data``."""
    for entry in os.listdir(base):
        p = os.path.join(base, entry)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.unlink(p)
    with open(os.path.join(base, name), "wb") as f:
        f.write(data)
    os.chmod(os.path.join(base, name), 0o644)


def build(root: str, owned: str | None = None) -> None:
    """The fixture of a measured directory: f, d/inner, l -> f, u/uf owned
    by uid 1000, and x/, where only links and renames from elsewhere go.
    With ``owned``, only that subtree, as its owner."""
    if owned is not None:
        base = os.path.join(root, owned)
        os.chmod(base, 0o755)
        _empty_with_file(base, "uf", b"uf data\n")
        return
    _empty_with_file(root, "f", b"file data\n")
    os.mkdir(os.path.join(root, "d"), 0o755)
    with open(os.path.join(root, "d", "inner"), "wb") as f:
        f.write(b"inner\n")
    os.symlink("f", os.path.join(root, "l"))
    os.mkdir(os.path.join(root, "x"), 0o755)
    os.mkdir(os.path.join(root, "u"), 0o755)
    with open(os.path.join(root, "u", "uf"), "wb") as f:
        f.write(b"uf data\n")
    os.chmod(os.path.join(root, "u", "uf"), 0o644)
    for p in (os.path.join(root, "u"), os.path.join(root, "u", "uf")):
        os.chown(p, 1000, 1000)
    os.chmod(root, 0o755)


def walk(targets: list[dict], skip=(), only=None) -> dict:
    """{label: {call: answer}} for every target and call (or those in
    ``only``) but ``skip``; a descriptor call also answers its open."""
    def wanted(name):
        return name not in skip and (only is None or name in only)

    results = {}
    for t in targets:
        p = t["path"]
        reset = t.get("reset")
        out = results[t["label"]] = {}
        for name, fn in PATH_CALLS.items():
            if not wanted(name):
                continue
            out[name] = answer(fn, p, t)
            if reset and name in CHANGING and not _refused(out[name]):
                build(*reset)
        for mode, flags in (("r", os.O_RDONLY), ("w", os.O_WRONLY)):
            calls = [name for name in FD_CALLS if wanted(f"{mode}:{name}")]
            if f"{mode}:open" in skip or not calls and not wanted(f"{mode}:open"):
                continue
            try:
                fd = os.open(p, flags | os.O_NONBLOCK)
            except OSError as e:
                out[f"{mode}:open"] = e.errno
                continue
            out[f"{mode}:open"] = 0
            try:
                for name in calls:
                    out[f"{mode}:{name}"] = answer(FD_CALLS[name], fd)
            finally:
                os.close(fd)
            if reset and mode == "w":
                build(*reset)
    return results


def _read(path: str, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        if size >= 0:
            return os.pread(fd, size, offset)
        parts = []
        while chunk := os.pread(fd, 1 << 20, offset):
            parts.append(chunk)
            offset += len(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def _write(path: str, data: bytes) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.write(fd, data)
    finally:
        os.close(fd)


def serve() -> None:
    """One JSON request a line on stdin, one JSON answer a line on stdout:
    {"walk": SPEC} -> results; {"read": P, "offset": O, "size": N (-1: all)}
    -> {"data": HEX}; {"write": P, "data": HEX} -> {"written": N};
    {"build": [ROOT, OWNED]} -> {}; an OSError -> {"errno": E}."""
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if "walk" in req:
                spec = req["walk"]
                out = walk(spec["targets"], set(spec.get("skip", ())), spec.get("only"))
            elif "build" in req:
                build(*req["build"])
                out = {}
            elif "read" in req:
                out = {"data": _read(req["read"], req.get("offset", 0), req.get("size", -1)).hex()}
            else:
                out = {"written": _write(req["write"], bytes.fromhex(req["data"]))}
        except OSError as e:
            out = {"errno": e.errno}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main() -> None:
    if sys.argv[1:] == ["--serve"]:
        serve()
        return
    spec = json.loads(sys.argv[1])
    json.dump(walk(spec["targets"], set(spec.get("skip", ())), spec.get("only")), sys.stdout)


if __name__ == "__main__":
    main()
