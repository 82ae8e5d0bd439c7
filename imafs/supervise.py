"""The hooks FUSE cannot see, through seccomp user notification.

A command run under the emulated kernel (``imafs run``, or :func:`spawn`)
loads, just before it execs, a seccomp filter that stops only the system
calls behind IMA hooks that no filesystem request shows, filtered on their
arguments where the kernel's hook is (``mmap`` only with ``PROT_EXEC`` of a
file, never anonymous memory).  Everything else runs with no stop.  The
filter's listener descriptor goes to two processes outside the command:

* the **supervisor** (:class:`Supervisor`, a forked process) answers each stopped call as the emulated kernel's hook would
  (:class:`Hooks`): it reads the task's descriptors, memory and credentials
  in /proc, asks the daemon over the control socket to measure (a file of a
  measured mount by its FUSE node, so that the open, the mmap and the module
  load of one file share one iint), then lets the call continue
  (``SECCOMP_USER_NOTIF_FLAG_CONTINUE``), or fails it with the errno of a
  hook that refuses it (appraisal), or, for ``uname`` and the emulated
  kernel's keyrings, answers it.
* the **holder** (:func:`hold`, a forked process) keeps the
  listener open and watches the supervisor: if it dies, the holder lets every
  stopped call continue — the one the supervisor was answering included —
  so a dead supervisor fails safe (the kernel would fail them with ENOSYS
  once nobody holds the listener).  The supervisor records the id of each
  notification it received in a shared page (:class:`Outstanding`) before
  doing anything else; the holder answers those, and the few ids after the
  last recorded one (a supervisor killed between its receive and its record).

python3-seccomp builds and loads the filter in the command; its receive and
respond methods serve only the process that loaded it, so the supervisor and
the holder speak the three listener ioctls themselves (:func:`receive`,
:func:`respond`, :func:`id_valid`).

Which hook does what (the kernel's ``ima_main.c``, ``ima_asymmetric_keys.c``,
``kernel/kexec_file.c``, ``kernel/module/main.c``) is in docs/hooks.md.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import mmap
import os
import select
import socket
import struct
import signal
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import seccomp

from .control import Client, ControlError
from .epoch import EpochView
from .passthrough import FIRST_NODE
from .profile import Profile

log = logging.getLogger(__name__)

# <linux/seccomp.h>
NOTIF = struct.Struct("=QIIiIQ6Q")  # struct seccomp_notif: id, pid, flags, seccomp_data
RESPONSE = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
IOCTL_RECV = 0xC0502100  # SECCOMP_IOWR(0, struct seccomp_notif)
IOCTL_SEND = 0xC0182101  # SECCOMP_IOWR(1, struct seccomp_notif_resp)
IOCTL_ID_VALID = 0x40082102  # SECCOMP_IOW(2, __u64)
FLAG_CONTINUE = 1  # SECCOMP_USER_NOTIF_FLAG_CONTINUE

PROT_EXEC, MAP_ANONYMOUS = 0x4, 0x20
PAGE = mmap.PAGESIZE
MAY_EXEC, MAY_READ = 0x1, 0x4
CAP_SYS_MODULE, CAP_SYS_BOOT, CAP_SYS_ADMIN = 16, 22, 21
O_PATH = 0o10000000
MODULE_INIT_FLAGS = 0x7  # IGNORE_MODVERSIONS | IGNORE_VERMAGIC | COMPRESSED_FILE
KEXEC_FILE_UNLOAD, KEXEC_FILE_NO_INITRAMFS, KEXEC_FILE_FLAGS = 0x1, 0x4, 0x1F
KEY_SPEC_USER_KEYRING, KEY_SPEC_USER_SESSION_KEYRING = -4, -5
KEYCTL_DESCRIBE, KEYCTL_INVALIDATE = 6, 21
KEY_NEED_WRITE = 0x04
KEY_MAX_PAYLOAD = 1024 * 1024 - 1
KEY_SERIALS, KEY_SERIALS_MASK = 0x10000000, 0x70000000  # the emulated kernel's keys (control.keyring_serial)
UTS_FIELD = 65  # __NEW_UTS_LEN + 1
CLONE_NEWUTS = 0x04000000
SLOTS = 16  # notifications answered at once
SWEEP = 64  # ids after the last recorded one that a dying supervisor may have received
QUIET_ANSWERS = 4096  # file hooks' quiet answers kept at most (imafs/epoch.py)

HOOKED = ("mmap", "mprotect", "uname", "add_key", "request_key", "keyctl", "finit_module", "kexec_file_load")
ARCH = seccomp.Arch.NATIVE
NR = {name: seccomp.resolve_syscall(ARCH, name) for name in HOOKED}
SYS = {name: seccomp.resolve_syscall(ARCH, name) for name in ("add_key", "keyctl", "setfsuid", "setfsgid",
                                                                 "pidfd_getfd")}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


@dataclass
class Notification:
    id: int
    pid: int
    nr: int
    args: tuple[int, ...]


# -- the listener ------------------------------------------------------------------------------
def receive(listener: int) -> Notification:
    buf = bytearray(NOTIF.size)  # the kernel wants it zeroed
    fcntl.ioctl(listener, IOCTL_RECV, buf)
    nid, pid, _flags, nr, _arch, _ip, *args = NOTIF.unpack(buf)
    return Notification(nid, pid, nr, tuple(args))


def respond(listener: int, nid: int, val: int = 0, error: int = 0, flags: int = 0) -> bool:
    """Answer notification ``nid``; False if it is no longer waiting (its task
    was killed, or it was answered already)."""
    try:
        fcntl.ioctl(listener, IOCTL_SEND, bytearray(RESPONSE.pack(nid, val, -error, flags)))
        return True
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.EINPROGRESS):
            return False
        raise


def proceed(listener: int, nid: int) -> bool:
    """Let the stopped call run as the host runs it."""
    return respond(listener, nid, flags=FLAG_CONTINUE)


def id_valid(listener: int, nid: int) -> bool:
    """Whether the task of ``nid`` still waits: what was read of it in /proc
    since it stopped is its, not a recycled pid's."""
    try:
        fcntl.ioctl(listener, IOCTL_ID_VALID, bytearray(struct.pack("=Q", nid)))
        return True
    except OSError:
        return False


# -- the filter, loaded by the command -----------------------------------------------------------
def build_filter(no_new_privs: bool) -> seccomp.SyscallFilter:
    """Allow everything; stop the hooked calls.  Calls of another ABI (i386,
    x32) are allowed, not killed."""
    f = seccomp.SyscallFilter(seccomp.ALLOW)
    f.set_attr(seccomp.Attr.ACT_BADARCH, seccomp.ALLOW)
    f.set_attr(seccomp.Attr.CTL_NNP, int(no_new_privs))
    f.add_rule(seccomp.NOTIFY, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC),
               seccomp.Arg(3, seccomp.MASKED_EQ, MAP_ANONYMOUS, 0))
    f.add_rule(seccomp.NOTIFY, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add_rule(seccomp.NOTIFY, "keyctl", seccomp.Arg(0, seccomp.EQ, KEYCTL_DESCRIBE))
    for name in ("uname", "add_key", "request_key", "finit_module", "kexec_file_load"):
        f.add_rule(seccomp.NOTIFY, name)
    return f


def _cap_eff(pid: int | str) -> int:
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return int(line.split()[1], 16)
    return 0


def install(channel: socket.socket) -> None:
    """In the command's process, just before exec: load the filter and send
    its listener over ``channel``.  With CAP_SYS_ADMIN no_new_privs stays
    off, so set-uid programs under the filter keep working."""
    try:
        f = build_filter(no_new_privs=not _cap_eff("self") >> CAP_SYS_ADMIN & 1)
        f.load()  # EBUSY under another listener (a run inside a run)
        listener = f.get_notify_fd()
    except Exception:  # noqa: BLE001 -- the command runs all the same, without the hooks
        channel.send(b"N")
        return
    socket.send_fds(channel, [b"L"], [listener])
    os.close(listener)


# -- what the supervisor has received, for the holder ---------------------------------------------
class Outstanding:
    """A shared page: the last notification id received, and the ids being
    answered.  ``fd`` is a memfd the holder maps too."""

    def __init__(self, fd: int | None = None):
        if fd is None:
            fd = os.memfd_create("imafs-outstanding", os.MFD_CLOEXEC)
            os.ftruncate(fd, 8 * (SLOTS + 1))
        self.fd = fd
        self.map = mmap.mmap(fd, 8 * (SLOTS + 1))
        self._free = list(range(1, SLOTS + 1))
        self._cond = threading.Condition()

    def take(self) -> int:
        """A free slot; waits while SLOTS notifications are being answered."""
        with self._cond:
            while not self._free:
                self._cond.wait()
            return self._free.pop()

    def put(self, slot: int, nid: int) -> None:
        struct.pack_into("=Q", self.map, 0, nid)
        struct.pack_into("=Q", self.map, 8 * slot, nid)

    def release(self, slot: int) -> None:
        struct.pack_into("=Q", self.map, 8 * slot, 0)
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    def ids(self) -> list[int]:
        """The ids a dead supervisor may have left waiting."""
        last, *busy = struct.unpack_from(f"={SLOTS + 1}Q", self.map)
        return [i for i in busy if i] + ([(last + k) & (2**64 - 1) for k in range(SWEEP + 1)] if last else [])


# -- reading the task --------------------------------------------------------------------------------
class TargetGone(Exception):
    """The task stopped in the call is gone, or its memory unreadable."""


def _status(pid: int) -> dict[bytes, list[bytes]]:
    """The Uid, Gid and CapEff lines of the task's status, split, and its
    Name (the comm, escaped: the kernel writes a newline or a backslash in it
    as a backslash sequence)."""
    text = _read_proc(pid, "status")
    out = {b"Name": [text[len(b"Name:\t"):text.find(b"\n")]]} if text.startswith(b"Name:\t") else {}
    for key in (b"\nUid:", b"\nGid:", b"\nCapEff:"):
        at = text.find(key)
        if at >= 0:
            out[key[1:-1]] = text[at + len(key):text.find(b"\n", at + 1)].split()
    return out


def _read_proc(pid: int, name: str) -> bytes:
    """A whole /proc file of the task, with plain system calls (a stopped call waits on each)."""
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise TargetGone from None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        raise TargetGone from None
    finally:
        os.close(fd)


def _creds(status: dict[bytes, list[bytes]]) -> tuple[bytes, ...]:
    """What of a task's status a file hook's decision depends on: its ids
    and capabilities (the comm, pid and audit identity only go into what it
    records and logs)."""
    try:
        return (*status[b"Uid"][:3], *status[b"Gid"][:3], status[b"CapEff"][0])
    except (KeyError, IndexError):
        raise TargetGone from None


def _task(pid: int, status: dict[bytes, list[bytes]] | None = None) -> dict:
    """The task's credentials and audit identity, read here: the daemon's
    PID namespace may not be ours (imafs run --mount), so it gets the values,
    not the pid to look up (measure.Task.reported)."""
    status = status or _status(pid)
    try:
        uid, gid = [int(x) for x in status[b"Uid"][:3]], [int(x) for x in status[b"Gid"][:3]]
        name = status.get(b"Name", [b"\\"])[0]
        comm = name if b"\\" not in name else _read_proc(pid, "comm").rstrip(b"\n")  # the comm file has it raw
        return {"pid": pid, "comm": comm.decode(errors="replace"),
                "uid": uid[0], "euid": uid[1], "suid": uid[2], "gid": gid[0], "egid": gid[1], "sgid": gid[2],
                "cap_eff": int(status[b"CapEff"][0], 16), "auid": int(_read_proc(pid, "loginuid")),
                "ses": int(_read_proc(pid, "sessionid"))}
    except (KeyError, IndexError, ValueError):
        raise TargetGone from None


def _fd_flags(pid: int, fd: int) -> int | None:
    try:
        for line in _read_proc(pid, f"fdinfo/{fd}").splitlines():
            if line.startswith(b"flags:"):
                return int(line.split()[1], 8)
    except (TargetGone, ValueError):
        pass
    return None


def _fd_arg(value: int) -> int:
    """An ``int fd`` argument from its 64-bit register."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def _read_mem(pid: int, addr: int, size: int) -> bytes:
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        raise TargetGone from None
    try:
        data = os.pread(fd, size, addr)
    except (OSError, OverflowError):
        raise TargetGone from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise TargetGone
    return data


def _write_mem(listener: int, n: Notification, addr: int, data: bytes) -> bool:
    """Copy ``data`` to the stopped task's ``addr`` (copy_to_user), once the
    notification is known to be still valid; False where the kernel's copy
    would fault (EFAULT)."""
    try:
        fd = os.open(f"/proc/{n.pid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        raise TargetGone from None
    try:
        if not id_valid(listener, n.id):
            raise TargetGone
        return os.pwrite(fd, data, addr) == len(data)
    except (OSError, OverflowError):
        return False
    finally:
        os.close(fd)


def _read_string(pid: int, addr: int, limit: int) -> bytes:
    """A NUL-terminated string of at most ``limit`` bytes of the task's memory."""
    out = b""
    while len(out) < limit:
        step = min(256, limit - len(out), 4096 - (addr + len(out)) % 4096)  # never past a page that may be the last
        chunk = _read_mem(pid, addr + len(out), step)
        end = chunk.find(b"\0")
        if end >= 0:
            return out + chunk[:end]
        out += chunk
    raise TargetGone


def _syscall(*args) -> int:
    ret = _libc.syscall(*args)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def _describe_key(key: int, fsuid: int, fsgid: int) -> tuple[str, int, int, int, str]:
    """KEYCTL_DESCRIBE of ``key`` as a thread with the task's fsuid/fsgid
    (key permissions are checked against them; root has no bypass): type,
    uid, gid, perm, description."""
    buf = ctypes.create_string_buffer(4096)
    _syscall(SYS["setfsgid"], fsgid)
    _syscall(SYS["setfsuid"], fsuid)
    try:
        n = _syscall(SYS["keyctl"], KEYCTL_DESCRIBE, ctypes.c_long(key), buf, ctypes.c_long(len(buf)))
    finally:
        _syscall(SYS["setfsuid"], 0)
        _syscall(SYS["setfsgid"], 0)
    ktype, uid, gid, perm, desc = buf.raw[:max(n - 1, 0)].decode(errors="replace").split(";", 4)
    return ktype, int(uid), int(gid), int(perm, 16), desc


def _host_accepts(ktype: bytes, payload: bytes) -> bool:
    """Whether this kernel's key type takes ``payload`` (its parser, its
    algorithms): the same add_key into this thread's own keyring, then gone."""
    try:
        key = _syscall(SYS["add_key"], ctypes.c_char_p(ktype), None, ctypes.c_char_p(payload),
                       ctypes.c_size_t(len(payload)), ctypes.c_long(-1))  # KEY_SPEC_THREAD_KEYRING
    except OSError:
        return False
    try:
        _syscall(SYS["keyctl"], KEYCTL_INVALIDATE, ctypes.c_long(key))
    except OSError:
        pass
    return True


def _uname_of(pid: int) -> os.uname_result:
    """uname(2) as the task's UTS namespace answers it (setns is per thread)."""
    try:
        same = os.stat(f"/proc/{pid}/ns/uts").st_ino == os.stat("/proc/thread-self/ns/uts").st_ino
    except OSError:
        raise TargetGone from None
    if same:
        return os.uname()
    own = os.open("/proc/thread-self/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    theirs = os.open(f"/proc/{pid}/ns/uts", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(theirs, CLONE_NEWUTS) != 0:
            raise TargetGone
        try:
            return os.uname()
        finally:
            _libc.setns(own, CLONE_NEWUTS)
    finally:
        os.close(own)
        os.close(theirs)


def _peek(pid: int, fd: int, size: int) -> bytes:
    """The first ``size`` bytes of the task's open file ``fd``, read through
    a copy of its descriptor (pidfd_getfd): no open of our own, which on a
    measured mount would be a hook event of the supervisor's."""
    pidfd = os.pidfd_open(pid)
    try:
        copy = _syscall(SYS["pidfd_getfd"], pidfd, fd, 0)
    finally:
        os.close(pidfd)
    try:
        return os.pread(copy, size, 0)
    finally:
        os.close(copy)


def _bzimage64(head: bytes) -> bool:
    """x86's kexec_file_load probe (arch/x86/kernel/kexec-bzimage64.c): a
    relocatable 64-bit bzImage of boot protocol 2.12 or later, else ENOEXEC
    and no later hook runs."""
    if len(head) < 0x238 or head[0x202:0x206] != b"HdrS":
        return False
    boot_flag, = struct.unpack_from("<H", head, 0x1FE)
    version, = struct.unpack_from("<H", head, 0x206)
    xloadflags, = struct.unpack_from("<H", head, 0x236)
    return (boot_flag == 0xAA55 and version >= 0x20C and head[0x211] & 1 and head[0x234]
            and xloadflags & 0x3 == 0x3)


class Connection(threading.local):
    """One control connection per worker thread, kept between requests (a
    stopped call should not pay a connect and the daemon's new task).  The
    daemon closes a connection idle for a minute, with an error line: a
    connection with anything to read before a request is stale, and is
    replaced.  Raises ControlError like :class:`Client`."""

    def __init__(self, path: str, timeout: float):
        self.path = path
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def call(self, cmd: str, **args) -> dict:
        request = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        try:
            try:
                line = self._exchange(request)
            except (ConnectionError, FileNotFoundError):  # closed meanwhile: once more, on a new one
                self._close()
                line = self._exchange(request)
        except OSError as e:
            self._close()
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        try:
            answer = json.loads(line)
        except ValueError:
            self._close()
            raise ControlError(f"the daemon at {self.path} answered something that is not JSON") from None
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "unknown error"))
        return answer

    def _exchange(self, request: bytes) -> bytes:
        if self.sock is not None and select.select([self.sock], [], [], 0)[0]:
            self._close()  # the daemon closed it (idle, or to make room) with an error line
        if self.sock is None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            self.sock.settimeout(self.timeout)
            self.sock.connect(self.path)
            # a blocking socket whose sends and receives time out in the kernel: Python's
            # timeout would poll() before each of them, on the stopped call's path
            self.sock.settimeout(None)
            limit = struct.pack("@ll", int(self.timeout), int(self.timeout % 1 * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        try:
            self.sock.sendall(request)
            while b"\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionResetError(errno.ECONNRESET, "the daemon closed the connection")
                self.buf += chunk
        except BlockingIOError:  # SO_SNDTIMEO, SO_RCVTIMEO
            raise TimeoutError(errno.ETIMEDOUT, f"no answer within {self.timeout:g} s") from None
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock, self.buf = None, b""


class Hooks:
    """What each stopped call means to the emulated kernel.  ``client``
    reaches the daemon; ``fuse_dev`` is the st_dev of its mount (and of its
    measured mounts, binds of it)."""

    def __init__(self, client: Connection, fuse_dev: int, release: str):
        self.client = client
        self.fuse_dev = fuse_dev
        self.release = release
        self._by_nr = {NR[name]: getattr(self, name) for name in HOOKED}
        self._epoch: EpochView | None = None  # the daemon's hook epoch, once opened
        self._quiet: dict[tuple, int] = {}  # a file hook's question -> the epoch its quiet answer holds for

    def answer(self, listener: int, n: Notification) -> None:
        """Answer ``n``; whatever fails, the call continues."""
        handler = self._by_nr.get(n.nr)
        try:
            result = handler(listener, n) if handler else None
        except TargetGone:
            result = None
        except Exception:
            log.exception("hook of system call %d of task %d", n.nr, n.pid)
            result = None
        if result is None:
            proceed(listener, n.id)
        else:
            val, err = result
            respond(listener, n.id, val, err)

    def _node(self, pid: int, fd: int) -> int | None:
        """The FUSE node of the task's descriptor ``fd`` if it is a file of a
        measured mount of this daemon."""
        if fd < 0:
            return None
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return None
        return st.st_ino if st.st_dev == self.fuse_dev and st.st_ino >= FIRST_NODE else None

    def _hook(self, listener: int, n: Notification, fd: int, funcs: list[str], mask: int) -> int | None:
        """A file hook on the task's descriptor ``fd``, if it is a file the
        emulated kernel sees: the errno the emulated kernel fails the call
        with (appraisal in enforce mode), else None."""
        node = self._node(n.pid, fd)
        if node is None:
            return None
        flags = _fd_flags(n.pid, fd)
        if flags is None or flags & O_PATH:  # fdget() refuses an O_PATH descriptor: EBADF, no hook
            return None
        status = _status(n.pid)
        question = (node, flags, mask, *funcs, *_creds(status))
        epoch = self._epoch_now()
        if epoch is not None and self._quiet.get(question) == epoch:
            return None  # asked at this epoch: nothing to record, log or refuse (imafs/epoch.py)
        task = _task(n.pid, status)
        if not id_valid(listener, n.id):
            return None
        try:
            answer = self.client.call("hook", node=node, task=task, funcs=funcs, mask=mask, flags=flags)
        except ControlError as e:
            log.warning("hook %s of task %d: %s", ",".join(funcs), n.pid, e)
            return None
        if "epoch" in answer:
            if len(self._quiet) >= QUIET_ANSWERS:
                self._quiet.clear()
            self._quiet[question] = answer["epoch"]
        return next((e["denied"] for e in answer["events"] if "denied" in e), None)

    def _epoch_now(self) -> int | None:
        """The daemon's hook epoch; None if it has none to read (then every
        file hook asks)."""
        if self._epoch is None:
            try:
                self._epoch = EpochView(Path(self.client.path).with_suffix(".epoch"))
            except OSError:
                return None
        return self._epoch.read()

    def _measure_buffer(self, func: str, name: str, data: bytes, **kw) -> None:
        try:
            self.client.call("measure", func=func, name=name, data_hex=data.hex(), **kw)
        except ControlError as e:
            log.warning("%s %s: %s", func, name, e)

    # -- the calls -------------------------------------------------------------------------------
    def mmap(self, listener: int, n: Notification):
        """ima_file_mmap: PROT_EXEC asked for, so MMAP_CHECK_REQPROT then
        MMAP_CHECK, with MAY_EXEC (the filter stops nothing else)."""
        denied = self._hook(listener, n, _fd_arg(n.args[4]), ["MMAP_CHECK_REQPROT", "MMAP_CHECK"], MAY_EXEC)
        return None if denied is None else (-1, denied)

    def mprotect(self, listener: int, n: Notification):
        """ima_file_mprotect on each mapping of the range, in address order, as
        mprotect_fixup meets them: one of a file the emulated kernel sees, not
        executable yet, may fail the call (EPERM).  Whatever the kernel checks
        before (alignment, holes, flags) is left to the host's call."""
        start, length = n.args[0], n.args[1]
        if start & (PAGE - 1) or not length:
            return None
        end = start + (length + PAGE - 1 & ~(PAGE - 1))
        targets, at = [], start
        for line in _read_proc(n.pid, "maps").splitlines():
            span, perms, _off, dev, inode = line.split(None, 5)[:5]
            lo, hi = (int(x, 16) for x in span.split(b"-"))
            if hi <= start:
                continue
            if lo >= end or lo > at:  # past the range, or a hole: ENOMEM from there on
                break
            at = hi
            major, minor = (int(x, 16) for x in dev.split(b":"))
            if b"x" not in perms and os.makedev(major, minor) == self.fuse_dev and int(inode) >= FIRST_NODE:
                targets.append(int(inode))
        if not targets:
            return None
        task = _task(n.pid)
        if not id_valid(listener, n.id):
            return None
        for node in targets:
            try:
                err = self.client.call("mprotect", node=node, task=task)["errno"]
            except ControlError as e:
                log.warning("mprotect of task %d: %s", n.pid, e)
                return None
            if err:
                return -1, err
        return None

    def uname(self, listener: int, n: Notification):
        """The emulated release in the task's struct new_utsname; the other
        fields are the host's (of the task's UTS namespace)."""
        u = _uname_of(n.pid)
        fields = (u.sysname, u.nodename, self.release, u.version, u.machine, "(none)")
        try:
            with open(f"/proc/{n.pid}/sys/kernel/domainname", "rb") as f:
                fields = fields[:5] + (f.read().rstrip(b"\n").decode(errors="replace"),)
        except OSError:
            pass
        buf = b"".join(os.fsencode(v)[:UTS_FIELD - 1].ljust(UTS_FIELD, b"\0") for v in fields)
        return (0, 0) if _write_mem(listener, n, n.args[0], buf) else (-1, errno.EFAULT)

    def finit_module(self, listener: int, n: Notification):
        """MODULE_CHECK (ima_post_read_file, MAY_READ) once the kernel would
        read the module: CAP_SYS_MODULE, known flags, a readable regular file."""
        fd, flags = _fd_arg(n.args[0]), n.args[2] & 0xFFFFFFFF
        if not _cap_eff(n.pid) >> CAP_SYS_MODULE & 1 or flags & ~MODULE_INIT_FLAGS:
            return None
        if self._readable(n.pid, fd):
            denied = self._hook(listener, n, fd, ["MODULE_CHECK"], MAY_READ)
            if denied is not None:  # ima_post_read_file fails the read: no module is loaded
                return -1, denied
        return None

    def _readable(self, pid: int, fd: int) -> bool:
        flags = _fd_flags(pid, fd)
        if flags is None or flags & O_PATH or flags & os.O_ACCMODE == os.O_WRONLY:
            return False
        try:
            st = os.stat(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return False
        return st.st_size > 0 and (st.st_mode & 0o170000) == 0o100000

    def kexec_file_load(self, listener: int, n: Notification):
        """kimage_file_prepare_segments: KEXEC_KERNEL_CHECK, the image probe,
        KEXEC_INITRAMFS_CHECK, then the command line (without its NUL) as
        the ``kexec-cmdline`` buffer of KEXEC_CMDLINE."""
        kernel_fd, initrd_fd = _fd_arg(n.args[0]), _fd_arg(n.args[1])
        cmdline_len, cmdline_ptr, flags = n.args[2], n.args[3], n.args[4]
        if not _cap_eff(n.pid) >> CAP_SYS_BOOT & 1 or flags & ~KEXEC_FILE_FLAGS or flags & KEXEC_FILE_UNLOAD:
            return None
        if not self._readable(n.pid, kernel_fd):
            return None
        denied = self._hook(listener, n, kernel_fd, ["KEXEC_KERNEL_CHECK"], MAY_READ)
        if denied is not None:  # kernel_read_file_from_fd fails: before the image probe
            return -1, denied
        try:
            head = _peek(n.pid, kernel_fd, 0x238)
        except OSError:
            return None
        if not _bzimage64(head):
            return None
        if not flags & KEXEC_FILE_NO_INITRAMFS:
            if not self._readable(n.pid, initrd_fd):
                return None
            denied = self._hook(listener, n, initrd_fd, ["KEXEC_INITRAMFS_CHECK"], MAY_READ)
            if denied is not None:
                return -1, denied
        if cmdline_len:
            if cmdline_len > 1 << 20:
                return None
            cmdline = _read_mem(n.pid, cmdline_ptr, cmdline_len)
            if cmdline[-1] != 0 or not id_valid(listener, n.id):
                return None
            if cmdline_len > 1:
                self._measure_buffer("KEXEC_CMDLINE", "kexec-cmdline", cmdline[:-1])
        return None

    def _kernel_keyring(self, serial: int) -> dict | None:
        """The emulated kernel's keyring of ``serial``, if it is one."""
        if serial <= 0 or serial & KEY_SERIALS_MASK != KEY_SERIALS:
            return None
        try:
            return self.client.call("keyring", serial=serial)
        except ControlError:
            return None

    def request_key(self, listener: int, n: Notification):
        """A lookup of one of the emulated kernel's keyrings by name (what
        ``keyctl ... %keyring:.ima`` does first) finds it: its serial.  Any
        other lookup is the host's."""
        if not n.args[0] or not n.args[1]:
            return None
        if _read_string(n.pid, n.args[0], 32) != b"keyring":
            return None
        name = _read_string(n.pid, n.args[1], 4096)
        if not name.startswith(b".") and name != b"_ima" or _status(n.pid)[b"Uid"][3] != b"0":
            return None  # root's alone: owned by root, no permission for others (not even to view)
        try:
            ring = self.client.call("keyring", name=name.decode(errors="replace"))
        except ControlError:
            return None
        return (ring["serial"], 0) if id_valid(listener, n.id) else None

    def keyctl(self, listener: int, n: Notification):
        """KEYCTL_DESCRIBE of an emulated keyring: "keyring;uid;gid;perm;name",
        copied when the buffer holds it all; its length either way."""
        serial = _fd_arg(n.args[1])
        ring = self._kernel_keyring(serial)
        if ring is None:
            return None
        if _status(n.pid)[b"Uid"][3] != b"0":
            return -1, errno.EACCES  # KEY_NEED_VIEW: owned by root, nothing for others
        text = f"keyring;0;0;{ring['perm']};{ring['name']}".encode() + b"\0"
        buf, size = n.args[2], n.args[3]
        if buf and size >= len(text) and not _write_mem(listener, n, buf, text):
            return -1, errno.EFAULT
        return len(text), 0

    def _add_to_kernel_keyring(self, listener: int, n: Notification, ring: dict):
        """add_key into an emulated keyring: the daemon adds it (its
        restrictions, IMA's KEY_CHECK) and the call gets the key's serial or
        the kernel's errno; the host's keyrings are not touched."""
        type_ptr, payload_ptr, plen = n.args[0], n.args[2], n.args[3]
        try:
            ktype = _read_string(n.pid, type_ptr, 32) if type_ptr else None
            if ktype is not None and ktype != b"asymmetric":
                return -1, errno.EOPNOTSUPP  # the kernel's keyrings take asymmetric keys only (restrictions)
            if ktype is not None and payload_ptr and plen and plen <= KEY_MAX_PAYLOAD:
                payload = _read_mem(n.pid, payload_ptr, plen)
            elif ktype is not None:
                return -1, errno.EINVAL
        except TargetGone:
            ktype = None
        if ktype is None:  # copy_from_user failed (or the task is gone: then nobody reads the answer)
            return -1, errno.EFAULT
        status = _status(n.pid)
        fsuid = int(status[b"Uid"][3])
        if not id_valid(listener, n.id):
            return None
        try:
            done = self.client.call("keyring_add", serial=ring["serial"], data_hex=payload.hex(), uid=fsuid)
        except ControlError as e:
            log.warning("add_key to %s: %s", ring["name"], e)
            return -1, errno.EIO
        return (done["serial"], 0) if not done["errno"] else (-1, done["errno"])

    def add_key(self, listener: int, n: Notification):
        """ima_post_key_create_or_update: an ``asymmetric`` key with a payload
        into a keyring → KEY_CHECK, the keyring's description as name and as
        ``keyring=``.  Measured before the call continues, when the call
        would succeed: the host's key type takes the payload (probed with
        the same add_key) and the keyring exists, is a keyring and is
        writable for the task (possession assumed)."""
        type_ptr, payload_ptr, plen, ring = n.args[0], n.args[2], n.args[3], n.args[4]
        kernel_ring = self._kernel_keyring(_fd_arg(ring))
        if kernel_ring is not None:
            return self._add_to_kernel_keyring(listener, n, kernel_ring)
        if not type_ptr or not payload_ptr or not plen or plen > KEY_MAX_PAYLOAD:
            return None
        if _read_string(n.pid, type_ptr, 32) != b"asymmetric":
            return None
        payload = _read_mem(n.pid, payload_ptr, plen)
        status = _status(n.pid)
        ruid = int(status[b"Uid"][0])
        fsuid, fsgid = int(status[b"Uid"][3]), int(status[b"Gid"][3])
        ring = ring - (1 << 64) if ring >= 1 << 63 else ring
        ring = ring - (1 << 32) if ring >= 1 << 31 else ring  # key_serial_t is an int
        if ring == KEY_SPEC_USER_KEYRING:
            desc = f"_uid.{ruid}"
        elif ring == KEY_SPEC_USER_SESSION_KEYRING:
            desc = f"_uid_ses.{ruid}"
        elif ring > 0:
            try:
                ktype, uid, gid, perm, desc = _describe_key(ring, fsuid, fsgid)
            except (OSError, ValueError):
                return None
            mine = perm >> 16 if uid == fsuid else perm >> 8 if gid == fsgid else perm
            if ktype != "keyring" or not (mine | perm >> 24) & KEY_NEED_WRITE:
                return None
        else:
            return None  # the thread's, process's or session keyring: not resolvable from outside
        if not id_valid(listener, n.id) or not _host_accepts(b"asymmetric", payload):
            return None
        try:  # the daemon's IMA key hook: queued before the first custom policy, else KEY_CHECK
            self.client.call("key_check", keyring=desc, data_hex=payload.hex(), uid=ruid)
        except ControlError as e:
            log.warning("KEY_CHECK %s: %s", desc, e)
        return None


class Supervisor:
    """Receives the notifications of one listener and answers each in a
    worker thread; a slow daemon holds up only the calls that wait on it.

    SLOTS threads take turns to wait on the listener (one at a time, the
    leader); the one that receives a notification hands the turn on and
    answers it itself: no hand-off between threads on a stopped call's path."""

    def __init__(self, listener: int, hooks: Hooks, outstanding: Outstanding):
        self.listener = listener
        self.hooks = hooks
        self.outstanding = outstanding
        self._turn = threading.Lock()
        self._done = False
        self._failure: BaseException | None = None

    def serve(self) -> None:
        """Until no task uses the filter any more."""
        threads = [threading.Thread(target=self._work, name=f"hook{i}") for i in range(SLOTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self._failure is not None:
            raise self._failure

    def _work(self) -> None:
        poller = select.poll()
        poller.register(self.listener, select.POLLIN)
        while True:
            slot = self.outstanding.take()
            try:
                with self._turn:
                    n = None if self._done else self._next(poller, slot)
                if n is None:
                    self.outstanding.release(slot)
                    return
            except BaseException as e:  # noqa: BLE001 -- the supervisor ends; the holder takes over
                self._done, self._failure = True, e
                self.outstanding.release(slot)
                return
            try:
                self.hooks.answer(self.listener, n)
            except Exception:  # noqa: BLE001 -- the answer's ioctl failed; the next calls still get theirs
                log.exception("answer to system call %d of task %d", n.nr, n.pid)
            finally:
                self.outstanding.release(slot)

    def _next(self, poller: select.poll, slot: int) -> Notification | None:
        """The next notification, recorded in ``slot``; None once no task
        uses the filter (and then for every thread)."""
        while True:
            events = dict(poller.poll()).get(self.listener, 0)
            if not events & select.POLLIN:
                if events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    self._done = True
                    return None
                continue
            try:
                n = receive(self.listener)
            except OSError as e:  # ENOENT: its task was killed meanwhile
                if e.errno in (errno.ENOENT, errno.EINTR):
                    continue
                raise
            self.outstanding.put(slot, n.id)
            return n


def hold(listener: int, outstanding: Outstanding, supervisor: int) -> None:
    """Wait for the supervisor to end; then let every call it left, and every
    later one, continue, until no task uses the filter any more."""
    try:
        pidfd = os.pidfd_open(supervisor)
        select.select([pidfd], [], [])
        os.close(pidfd)
    except ProcessLookupError:
        pass
    for nid in outstanding.ids():
        proceed(listener, nid)
    poller = select.poll()
    poller.register(listener, select.POLLIN)
    while True:
        events = dict(poller.poll()).get(listener, 0)
        if events & select.POLLIN:
            try:
                proceed(listener, receive(listener).id)
            except OSError:
                pass
        elif events & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
            return


# -- starting it all ---------------------------------------------------------------------------------
class Supervised:
    """A command under the hooks, with the pids of its supervisor and holder."""

    def __init__(self, process: subprocess.Popen, supervisor: int, holder: int):
        self.process = process
        self.supervisor = supervisor
        self.holder = holder
        self.helpers: dict[int, int] = {}  # pid -> wait status

    def wait(self, timeout: float | None = None) -> int:
        """The command's status, once its helpers are gone too (they end when
        the last task under the filter does)."""
        rc = self.process.wait(timeout)
        deadline = time.monotonic() + 10
        for pid in (self.supervisor, self.holder):
            while pid not in self.helpers:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    self.helpers[pid] = status
                elif time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                else:
                    time.sleep(0.01)
        return rc


def _let_go_of_pipes(null: int) -> None:
    """Point every inherited pipe and socket at /dev/null: a helper forked
    beside a command whose input is a pipe must not hold that pipe's write
    end (the command would never read its end of file, and the helpers wait
    for the command).  The numbers stay taken, so that no object inherited
    from the parent closes a descriptor of the helper's own."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            kind = os.fstat(fd).st_mode
        except OSError:
            continue  # the listing's own descriptor, closed by now
        if fd > 2 and (stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind)):
            os.dup2(null, fd)


def _fork(body, log_file: str | None) -> int:
    """A helper process running ``body()``: forked, not a new interpreter
    (``imafs run`` starts in a fraction of a second), in its own session,
    its output to ``log_file``."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setsid()
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        out = os.open(log_file or os.devnull, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out, 1)
        os.dup2(out, 2)
        _let_go_of_pipes(null)
        logging.basicConfig(level=logging.WARNING, format="imafs supervise[%(process)d]: %(message)s", force=True)
        body()
        code = 0
    except BaseException:  # noqa: BLE001 -- a forked helper exits, never returns
        log.exception("seccomp helper failed")
    finally:
        os._exit(code)


def start_helpers(listener: int, socket_path: str, fuse_dev: int, release: str,
                  log_file: str | None = None) -> tuple[int, int]:
    """Fork the supervisor and the holder of ``listener`` (their pids); the
    caller then closes its own copy of it."""
    outstanding = Outstanding()
    hooks = Hooks(Connection(socket_path, timeout=60), fuse_dev, release)
    sup = _fork(lambda: Supervisor(listener, hooks, outstanding).serve(), log_file)
    holder = _fork(lambda: hold(listener, outstanding, sup), log_file)
    os.close(outstanding.fd)
    return sup, holder


class RunHooks:
    """The hooks of ``imafs run`` (imafs/run.py), for the emulator at
    ``mountpoint``: made in the runner, :meth:`prepare` runs in the command
    just before execve, :meth:`started` in the init once it has exec'd."""

    def __init__(self, mountpoint: str):
        self.mountpoint = mountpoint
        self.parent, self.child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def prepare(self) -> None:
        install(self.child)

    def started(self, pid: int) -> None:
        from .control import socket_path
        self.child.close()
        sock = socket_path(self.mountpoint)  # the run's own runtime directory
        try:
            self.parent.settimeout(10)
            _, fds, _, _ = socket.recv_fds(self.parent, 1, 1)
        except OSError as e:
            fds = []
            log.error("imafs run: no seccomp listener from the command (%s)", e)
        finally:
            self.parent.close()
        if not fds:
            print("imafs run: the command runs without the seccomp hooks (mmap, uname, add_key, "
                  "finit_module, kexec_file_load)", file=sys.stderr)
            return
        try:
            release = Client(self.mountpoint, timeout=10).call("status")["release"]
            start_helpers(fds[0], str(sock), os.stat(self.mountpoint).st_dev, release,
                          str(sock.with_suffix(".hooks.log")))
        finally:
            os.close(fds[0])


def spawn(argv: list[str], mountpoint: str, profile: Profile | None = None, socket_path: str | None = None,
          log_file: str | None = None, **popen) -> Supervised:
    """Run ``argv`` under the hooks of the imafs mounted at ``mountpoint``
    (its release from ``profile``, else asked of the daemon)."""
    from .control import socket_path as default_socket
    release = profile.release if profile else Client(mountpoint, timeout=10).call("status")["release"]
    fuse_dev = os.stat(mountpoint).st_dev
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with parent, child:
        proc = subprocess.Popen(argv, preexec_fn=lambda: install(child), **popen)
        child.close()
        parent.settimeout(10)
        _, fds, _, _ = socket.recv_fds(parent, 1, 1)
    if not fds:
        proc.kill()
        proc.wait()
        raise OSError(errno.EBUSY, "the command could not load the seccomp filter (already under one?)")
    listener = fds[0]
    try:
        sup, holder = start_helpers(listener, socket_path or str(default_socket(mountpoint)), fuse_dev, release,
                                    log_file)
    finally:
        os.close(listener)
    return Supervised(proc, sup, holder)
