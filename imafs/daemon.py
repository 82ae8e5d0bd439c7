"""The emulator daemon: one trio nursery owns the FUSE loop, the control
socket and the signal handler."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pyfuse3
import trio

from .control import Server, socket_path
from .ima import Ima
from .klog import KernelLog
from .profile import Profile
from .securityfs import MOUNT_OPTIONS, SecurityFs, Tree

log = logging.getLogger(__name__)


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


def run(mountpoint: str, profile: Profile, ready=lambda error: None) -> None:
    """Mount and serve until unmounted, shut down or signalled.

    ``ready`` is called once: with None when the tree is mounted and the
    control socket answers, or with an error message.
    """
    try:
        check_mountpoint(mountpoint)
        sock = socket_path(mountpoint)  # before mounting: realpath() would stat the mount
        klog = Path(profile.kernel_log) if profile.kernel_log else sock.with_suffix(".kmsg")
        klog.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        ima = Ima(profile, KernelLog(klog))
        ops = SecurityFs(Tree(ima))
        pyfuse3.init(ops, mountpoint, list(MOUNT_OPTIONS))
    except (MountError, RuntimeError, OSError) as e:
        ready(str(e))
        return
    try:
        trio.run(_serve, ima, ops, sock, ready)
    finally:
        pyfuse3.close(unmount=True)


async def _serve(ima: Ima, ops: SecurityFs, sock: Path, ready) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ops.reaper)
        server = Server(ima, on_shutdown=pyfuse3.terminate)
        await nursery.start(server.serve, sock)
        nursery.start_soon(_signals)
        ready(None)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _signals() -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            pyfuse3.terminate()
            return
