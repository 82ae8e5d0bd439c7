"""The emulator daemon: one trio nursery owns the FUSE loop, the control
socket, the signal handler and the background tasks.

Only a deliberate shutdown ends the daemon: the ``shutdown`` command,
SIGTERM/SIGINT/SIGHUP, or an unmount from outside.  A failing request is
answered with an error and a failing background task is restarted.  Shutdown
never waits on a request: it detaches the measured mounts' binds while the
loop still answers their lookups, ends the FUSE loop and cancels the nursery,
abandoning worker threads (they run with ``abandon_on_cancel``); then
``pyfuse3.close`` closes /dev/fuse, which fails whatever the kernel still
waits for, and detaches the mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
from pathlib import Path

import pyfuse3
import trio

from .control import Server, socket_path
from .ima import Ima
from .klog import KernelLog
from .profile import Profile
from .passthrough import HIDDEN_PREFIX, Passthrough
from .securityfs import MOUNT_OPTIONS, SecurityFs, Tree

log = logging.getLogger(__name__)

DETACH_TIMEOUT = 2.0  # seconds shutdown gives the binds' detach before it ends the loop anyway
BIND_TIMEOUT = 30.0  # seconds mount(8) has to bind a measured mount
RESTART_DELAY = 1.0  # seconds before a failed background task is started again


class MountError(Exception):
    """The tree cannot be mounted; the message is for a human."""


def mounted_at(mountpoint: str) -> str | None:
    """The filesystem type mounted exactly at ``mountpoint``, if any."""
    real = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")
            if point == real:
                return parts[parts.index("-") + 1]
    return None


def check_mountpoint(mountpoint: str) -> None:
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse is missing: this machine cannot mount FUSE filesystems "
                         "(load the fuse module, or give the container --device /dev/fuse)")
    if not os.path.isdir(mountpoint):
        raise MountError(f"mount point {mountpoint} does not exist or is not a directory")
    fstype = mounted_at(mountpoint)
    if fstype == "fuse.imafs":
        raise MountError(f"imafs is already mounted at {mountpoint}")
    if socket_path(mountpoint).exists():
        from .control import Client, ControlError
        try:
            Client(mountpoint, timeout=2).call("status")
            raise MountError(f"an imafs daemon already serves {mountpoint}")
        except ControlError:
            pass  # a stale socket of a dead daemon


def parse_measure(spec: str, mountpoint: str) -> tuple[str, str]:
    """``SRC:DST`` of ``--measure`` as real paths, checked."""
    src, sep, dst = spec.partition(":")
    if not sep or not src or not dst:
        raise MountError(f"--measure {spec}: expected SRC:DST, two directories")
    src, dst = os.path.realpath(src), os.path.realpath(dst)
    for what, path in (("SRC", src), ("DST", dst)):
        if not os.path.isdir(path):
            raise MountError(f"--measure {spec}: {what} {path} does not exist or is not a directory")
    mp = os.path.realpath(mountpoint)
    if dst == mp or dst.startswith(mp.rstrip("/") + "/"):
        raise MountError(f"--measure {spec}: DST must lie outside the mount point {mp}")
    if mounted_at(dst) == "fuse.imafs":
        raise MountError(f"--measure {spec}: imafs is already mounted at {dst}")
    return src, dst


def run(mountpoint: str, profile: Profile, ready=lambda error: None, measure: list[str] = ()) -> None:
    """Mount and serve until unmounted, shut down or signalled.

    Each ``measure`` entry SRC:DST re-exports SRC at DST as a measured mount:
    a directory of this one FUSE filesystem, reached by a name the securityfs
    root does not list, bind-mounted at DST.  ``ready`` is called once: with
    None when everything is mounted and the control socket answers, or with
    an error message.
    """
    try:
        check_mountpoint(mountpoint)
        measured = [parse_measure(spec, mountpoint) for spec in measure]
        sock = socket_path(mountpoint)  # before mounting: realpath() would stat the mount
        klog = Path(profile.kernel_log) if profile.kernel_log else sock.with_suffix(".kmsg")
        klog.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ima = Ima(profile, KernelLog(klog))
        ima.measured_dirs = measured
        ops = SecurityFs(Tree(ima), Passthrough(ima.measurer, measured) if measured else None)
        pyfuse3.init(ops, mountpoint, list(MOUNT_OPTIONS))
    except (MountError, RuntimeError, OSError) as e:
        ready(str(e))
        return
    binds = Binds(mountpoint, [dst for _, dst in measured])
    try:
        trio.run(_serve, ima, ops, sock, binds, ready)
    finally:
        try:
            pyfuse3.close(unmount=True)
        finally:
            binds.detach()


class Binds:
    """The bind mounts of the measured mounts."""

    def __init__(self, mountpoint: str, dsts: list[str]):
        self.sources = [os.path.join(mountpoint, f"{HIDDEN_PREFIX}{i}") for i in range(len(dsts))]
        self.dsts = dsts
        self.done: list[str] = []

    def attach(self) -> None:
        """Runs in a thread: mount(8) looks the source up through the FUSE loop."""
        for src, dst in zip(self.sources, self.dsts):
            try:
                r = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True,
                                   timeout=BIND_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise MountError(f"cannot bind the measured mount at {dst}: {e}") from None
            if r.returncode != 0:
                raise MountError(f"cannot bind the measured mount at {dst}: {r.stderr.strip()}")
            self.done.append(dst)

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


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


def _detach(path: str) -> None:
    """umount2(MNT_DETACH): takes the mount away at once, asking nothing of its filesystem."""
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)


async def _serve(ima: Ima, ops: SecurityFs, sock: Path, binds: Binds, ready) -> None:
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
        await nursery.start(Server(ima, on_shutdown=shutdown).serve, sock)
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
