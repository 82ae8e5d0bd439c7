"""The emulator daemon: one trio nursery owns the FUSE loop, the control
socket, the signal handler and the background tasks.

Only a deliberate shutdown ends the daemon: the ``shutdown`` command,
SIGTERM/SIGINT/SIGHUP, or an unmount from outside.  A failing request is
answered with an error and a failing background task is restarted.  Shutdown
never waits on a request: it detaches the measured mounts' binds while the
loop still answers their lookups, ends the FUSE loop and cancels the nursery,
abandoning worker threads (they run with ``abandon_on_cancel``); then
``pyfuse3.close`` closes /dev/fuse, which fails whatever the kernel still
waits for, and detaches the mount.  A daemon that ends cleanly and logged no
error removes its log and kernel log from the runtime directory; otherwise
they stay, and ``imafs umount`` clears the dead mount a killed daemon left
(:func:`diagnose` tells a dead mount from a stopped daemon without ever
blocking on either).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import pyfuse3
import trio

from . import binds
from .binds import mounts as _mounts, reason as _reason
from .blocking import Runner
from .control import Client, ControlError, NoAnswer, Server, mount_path, socket_path
from .ima import Ima
from .klog import KernelLog
from .profile import Profile
from .passthrough import HIDDEN_PREFIX, MeasuredFs, Passthrough
from .securityfs import MOUNT_OPTIONS, SecurityFs, Tree
from .tpm import open_backend
from .tpmdev import TpmError

log = logging.getLogger(__name__)

ANSWER_TIMEOUT = 2.0  # seconds a daemon has to answer `status` when `imafs mount` finds its mount
STATFS_TIMEOUT = 2.0  # seconds a FUSE mount has to answer statfs(2) in diagnose()
DETACH_TIMEOUT = 2.0  # seconds shutdown gives the binds' detach before it ends the loop anyway
RESTART_DELAY = 1.0  # seconds before a failed background task is started again

# diagnose(): why an imafs mount's daemon does not answer
GONE = "gone"  # the FUSE connection is aborted: the daemon is dead
STUCK = "stuck"  # a daemon holds the mount but does not answer: stopped or hung
ELSEWHERE = "elsewhere"  # the filesystem answers; its control socket is elsewhere


class MountError(Exception):
    """The tree cannot be mounted; the message is for a human."""


def _top_mount(mountpoint: str) -> tuple[str, str] | None:
    """(device, fstype) of the topmost mount exactly at ``mountpoint``; read
    from mountinfo, never by asking the mount."""
    path = mount_path(mountpoint)
    found = None
    for dev, _, point, fstype in _mounts():
        if point == path:
            found = dev, fstype
    return found


def mounted_at(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint``, if any."""
    top = _top_mount(mountpoint)
    return top[1] if top else None


def statfs_errno(path: str, timeout: float) -> int | None:
    """statfs(2) of the filesystem at ``path``, which FUSE always forwards to
    its daemon, asked from a thread: None if it answers, else its errno
    (ENOTCONN, or ECONNABORTED for a request the kernel had queued when the
    daemon died: the daemon is gone), or ETIMEDOUT if no answer came within
    ``timeout`` (the thread stays blocked until the mount goes; it is a
    daemon thread and ends with the process)."""
    result: list[int | None] = []

    def ask():
        try:
            os.statvfs(path)
            result.append(None)
        except OSError as e:
            result.append(e.errno)

    t = threading.Thread(target=ask, name="imafs-statfs", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else errno.ETIMEDOUT


def diagnose(mountpoint: str, no_answer: NoAnswer) -> tuple[str, str]:
    """Why the imafs mount at ``mountpoint`` gets ``no_answer`` on its
    control socket: (GONE | STUCK | ELSEWHERE, the reason for a human).
    A daemon that took the connection is stuck; otherwise the filesystem is
    asked for statfs, which a dead daemon's aborted connection fails at once
    with ENOTCONN.  stat() would not do: it may answer from cached attributes."""
    if no_answer.listening:
        return STUCK, f"its daemon does not answer ({no_answer})"
    err = statfs_errno(mount_path(mountpoint), STATFS_TIMEOUT)
    if err is None:
        return ELSEWHERE, (f"its filesystem answers, but {no_answer} "
                           "(was it mounted with another IMAFS_RUNTIME_DIR?)")
    if err in (errno.ENOTCONN, errno.ECONNABORTED):
        return GONE, f"its daemon is gone ({errno.errorcode[err]})"
    if err == errno.ETIMEDOUT:
        return STUCK, f"{no_answer}, and its filesystem does not answer statfs within {STATFS_TIMEOUT:g} s"
    return STUCK, f"{no_answer}, and statfs fails: {os.strerror(err)}"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


def _detach(path: str) -> None:
    """umount2(MNT_DETACH): takes the mount away at once, asking nothing of its filesystem."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


def detach_mount(mountpoint: str) -> list[str]:
    """Detach the imafs mount at ``mountpoint`` and the binds of its measured
    mounts (mounts of the same filesystem whose root is a hidden name of the
    securityfs root).  Returns the paths detached, the mount point first."""
    path = mount_path(mountpoint)
    top = _top_mount(path)
    if top is None or top[1] != "fuse.imafs":
        raise OSError(errno.EINVAL, "not an imafs mount", path)
    binds = [point for dev, root, point, fstype in _mounts()
             if dev == top[0] and fstype == "fuse.imafs" and root.startswith("/" + HIDDEN_PREFIX)]
    for point in binds:
        _detach(point)
    _detach(path)
    return [path, *binds]


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: this machine cannot mount FUSE filesystems "
                         "(load the fuse module, or give the container --device /dev/fuse)")
    # mountinfo first: isdir() blocks on a mount whose daemon is stopped and
    # fails with ENOTCONN on one whose daemon is gone.
    if mounted_at(mountpoint) == "fuse.imafs":
        raise MountError(_mounted(mountpoint))
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    if socket_path(mountpoint).exists():
        try:
            Client(mountpoint, timeout=ANSWER_TIMEOUT).call("status")
        except NoAnswer:
            return  # a stale socket of a dead daemon
        raise MountError(f"an imafs daemon already serves {mountpoint}")


def _mounted(mountpoint: str) -> str:
    """What is wrong with mounting over the imafs mount at ``mountpoint``.

    A mount whose daemon is gone or stuck is named, and `imafs umount` given
    as the way to clear it; mount does not clear it itself: one verb, one job,
    and a dead mount that vanished silently would hide that a daemon crashed
    (its logs, which `imafs umount` names, are worth a look first)."""
    try:
        Client(mountpoint, timeout=ANSWER_TIMEOUT).call("status")
    except NoAnswer as e:
        kind, why = diagnose(mountpoint, e)
        if kind == GONE:
            return f"{mountpoint} is a dead imafs mount: {why}; `imafs umount {mountpoint}` removes it"
        if kind == STUCK:
            return f"imafs is mounted at {mountpoint}, but {why}; `imafs umount {mountpoint}` detaches it"
        return f"imafs is already mounted at {mountpoint}: {why}"
    return f"imafs is already mounted at {mountpoint}"


def parse_measure(spec: str, mountpoint: str) -> tuple[str, str]:
    """``SRC:DST`` of ``--measure`` as real paths, checked."""
    src, sep, dst = spec.partition(":")
    if not sep or not src or not dst:
        raise MountError(f"--measure {spec}: expected SRC:DST, two directories")
    src, dst = os.path.realpath(src), mount_path(dst)
    if mounted_at(dst) == "fuse.imafs":
        raise MountError(f"--measure {spec}: imafs is already mounted at {dst}")
    for what, path in (("SRC", src), ("DST", dst)):
        if not os.path.isdir(path):
            raise MountError(f"--measure {spec}: {what} {path} does not exist or is not a directory")
    mp = mount_path(mountpoint)
    if dst == mp or dst.startswith(mp.rstrip("/") + "/"):
        raise MountError(f"--measure {spec}: DST must lie outside the mount point {mp}")
    if _within(dst, src) or _within(src, dst):  # the daemon would wait on itself
        raise MountError(f"--measure {spec}: SRC and DST must not contain each other: the daemon "
                         "reads SRC through paths that the mount at DST would cover")
    return src, dst


def _within(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")




class _ErrorCount(logging.Handler):
    """Counts the records logged at ERROR or above."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def run(mountpoint: str, profile: Profile, ready=lambda error: None, measure: list[str] = (),
        log_file: str | None = None) -> None:
    """Mount and serve until unmounted, shut down or signalled.

    Each ``measure`` entry SRC:DST re-exports SRC at DST as a measured mount:
    a directory of this one FUSE filesystem, reached by a name the securityfs
    root does not list, bind-mounted at DST.  ``ready`` is called once: with
    None when everything is mounted and the control socket answers, or with
    an error message.  ``log_file`` is the file the daemon's output goes to;
    it and the kernel log beside the control socket are removed when the
    daemon ends cleanly without having logged an error.
    """
    pcrs = ima = None
    try:
        check_mountpoint(mountpoint)
        measured = [parse_measure(spec, mountpoint) for spec in measure]
        sock = socket_path(mountpoint)  # before mounting: never ask the mount itself
        kmsg = Path(profile.kernel_log) if profile.kernel_log else sock.with_suffix(".kmsg")
        kmsg.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        klog = KernelLog(kmsg)
        pcrs, profile = open_backend(profile, sock.with_suffix(".tpm"), klog)  # may start swtpm
        ima = Ima(profile, klog, pcrs)
        ima.measured_dirs = measured
        if measured:  # for the supervisors of imafs run (imafs/epoch.py)
            ima.epoch.share(sock.with_suffix(".epoch"))
        runner = Runner()
        ops = SecurityFs(Tree(ima), runner,
                        MeasuredFs(Passthrough(ima.measurer, measured), runner) if measured else None)
        pyfuse3.init(ops, mountpoint, list(MOUNT_OPTIONS))
    except TpmError as e:
        ready(f"TPM: {e}")
        return
    except (MountError, ControlError, RuntimeError, OSError) as e:
        if pcrs is not None:
            pcrs.close()
        if ima is not None:
            ima.epoch.close()
        ready(str(e))
        return
    # a kernel_log the profile names is the user's file: never removed
    own = [Path(p) for p in (log_file, None if profile.kernel_log else kmsg) if p]
    errors = _ErrorCount()
    logging.getLogger().addHandler(errors)
    binds = Binds(mountpoint, [dst for _, dst in measured])
    clean = False
    try:
        trio.run(_serve, ima, runner, ops, sock, binds, ready)
        clean = not errors.count
        if clean:  # before the unmount, which `imafs umount` waits for
            for path in own:
                path.unlink(missing_ok=True)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            binds.detach()
            ima.epoch.close()
            if pcrs is not None:
                pcrs.close()  # stops imafs's swtpm
                if clean:  # its state and log live as long as the mount
                    shutil.rmtree(sock.with_suffix(".tpm"), ignore_errors=True)


class Binds:
    """The bind mounts of the measured mounts, made from a second mount of
    the connection whose source is imafs (:mod:`imafs.binds`): a measured
    mount is not securityfs, and /proc/mounts says so."""

    def __init__(self, mountpoint: str, dsts: list[str]):
        self.mountpoint = mount_path(mountpoint)
        self.paths = [f"{HIDDEN_PREFIX}{i}" for i in range(len(dsts))]
        self.dsts = dsts
        self.done: list[str] = []

    def attach(self) -> None:
        """Runs in a thread: the clones are looked up through the FUSE loop."""
        if not self.dsts:
            return
        try:
            self.done.extend(binds.bind_from_child(binds.fuse_descriptor(), self.mountpoint,
                                                   list(zip(self.paths, self.dsts))))
        except OSError as e:
            raise MountError(f"cannot bind the measured mounts: {_reason(e)}") from None
        except binds.BindError as e:
            self.done.extend(e.done)
            raise MountError(str(e)) from None

    def detach(self) -> None:
        """Lazy unmounts by path: nothing here waits on the FUSE loop.  Shutdown
        may run this in a thread it abandons while the daemon's last step runs
        it again, so each bind is taken from the list exactly once."""
        while True:
            try:
                dst = self.done.pop()
            except IndexError:
                return
            try:
                _detach(dst)
            except OSError as e:
                log.warning("cannot unmount %s: %s", dst, e.strerror)


async def _serve(ima: Ima, runner: Runner, ops: SecurityFs, sock: Path, binds: Binds, ready) -> None:
    async with trio.open_nursery() as nursery:
        async def shutdown() -> None:
            """Detach the binds while the loop still answers their lookups,
            then end the loop and every task without waiting on any of them."""
            try:
                with trio.move_on_after(DETACH_TIMEOUT):
                    await trio.to_thread.run_sync(binds.detach, abandon_on_cancel=True)
            finally:
                pyfuse3.terminate()
                nursery.cancel_scope.cancel()

        nursery.start_soon(_supervised, "the reaper of deleted records", ops.reaper)
        if ima.pcrs is not None and ima.pcrs.backend != "soft":
            nursery.start_soon(ima.pcrs.run)  # sends the queued PCR extends to the TPM
        await nursery.start(Server(ima, runner, on_shutdown=shutdown, measured=ops.measured).serve, sock)
        nursery.start_soon(_signals, shutdown)
        nursery.start_soon(_attach, binds, ready, shutdown)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _supervised(what: str, task) -> None:
    """Run a background task; if it fails, log it and start it again."""
    while True:
        try:
            await task()
            return
        except Exception:
            log.exception("%s failed; it starts again in %g s", what, RESTART_DELAY)
        await trio.sleep(RESTART_DELAY)


async def _attach(binds: Binds, ready, shutdown) -> None:
    try:
        await trio.to_thread.run_sync(binds.attach, abandon_on_cancel=True)
    except Exception as e:
        if not isinstance(e, MountError):
            log.exception("binding the measured mounts failed")
        ready(str(e))
        await shutdown()
        return
    ready(None)


async def _signals(shutdown) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            await shutdown()
            return
