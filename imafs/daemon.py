"""The emulator daemon: one trio nursery owns the FUSE loop, the control
socket and the signal handler."""

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

from .blocking import Runner
from .control import Server, socket_path
from .ima import Ima
from .klog import KernelLog
from .profile import Profile
from .passthrough import HIDDEN_PREFIX, MeasuredFs, Passthrough
from .securityfs import MOUNT_OPTIONS, SecurityFs, Tree
from .tpm import open_backend
from .tpmdev import TpmError

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
    pcrs = None
    try:
        check_mountpoint(mountpoint)
        measured = [parse_measure(spec, mountpoint) for spec in measure]
        sock = socket_path(mountpoint)  # before mounting: realpath() would stat the mount
        klog = Path(profile.kernel_log) if profile.kernel_log else sock.with_suffix(".kmsg")
        klog.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        klog = KernelLog(klog)
        pcrs, profile = open_backend(profile, sock.with_suffix(".tpm"), klog)  # may start swtpm
        ima = Ima(profile, klog, pcrs)
        ima.measured_dirs = measured
        runner = Runner()
        ops = SecurityFs(Tree(ima), MeasuredFs(Passthrough(ima.measurer, measured), runner) if measured else None)
        pyfuse3.init(ops, mountpoint, list(MOUNT_OPTIONS))
    except TpmError as e:
        ready(f"TPM: {e}")
        return
    except (MountError, RuntimeError, OSError) as e:
        if pcrs is not None:
            pcrs.close()
        ready(str(e))
        return
    binds = Binds(mountpoint, [dst for _, dst in measured])
    try:
        trio.run(_serve, ima, runner, ops, sock, binds, ready)
    finally:
        binds.detach()
        pyfuse3.close(unmount=True)
        if pcrs is not None:
            pcrs.close()  # stops imafs's swtpm


class Binds:
    """The bind mounts of the measured mounts."""

    def __init__(self, mountpoint: str, dsts: list[str]):
        self.sources = [os.path.join(mountpoint, f"{HIDDEN_PREFIX}{i}") for i in range(len(dsts))]
        self.dsts = dsts
        self.done: list[str] = []

    def attach(self) -> None:
        """Runs in a thread: mount(8) looks the source up through the FUSE loop."""
        for src, dst in zip(self.sources, self.dsts):
            r = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True)
            if r.returncode != 0:
                raise MountError(f"cannot bind the measured mount at {dst}: {r.stderr.strip()}")
            self.done.append(dst)

    def detach(self) -> None:
        """Lazy unmounts by path: nothing here waits on the FUSE loop."""
        while self.done:
            dst = self.done.pop()
            if _libc.umount2(os.fsencode(dst), MNT_DETACH) != 0:
                log.warning("cannot unmount %s: %s", dst, os.strerror(ctypes.get_errno()))


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
MNT_DETACH = 2


SHUTDOWN_GRACE = 2.0  # seconds in-flight requests get to answer once shutdown begins


async def _serve(ima: Ima, runner: Runner, ops: SecurityFs, sock: Path, binds: Binds, ready) -> None:
    async with trio.open_nursery() as nursery:
        async def shutdown():
            """Stop taking requests; those in flight get SHUTDOWN_GRACE, then
            are cancelled (a worker thread stuck on a dead file is abandoned)."""
            await trio.to_thread.run_sync(binds.detach)
            pyfuse3.terminate()
            scope = nursery.cancel_scope
            scope.deadline = min(scope.deadline, trio.current_time() + SHUTDOWN_GRACE)

        nursery.start_soon(ops.reaper)
        if ima.pcrs is not None and ima.pcrs.backend != "soft":
            nursery.start_soon(ima.pcrs.run)  # sends the queued PCR extends to the TPM
        server = Server(ima, runner, on_shutdown=shutdown)
        await nursery.start(server.serve, sock)
        nursery.start_soon(_signals, shutdown)
        nursery.start_soon(_attach, binds, ready, shutdown)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _attach(binds: Binds, ready, shutdown) -> None:
    try:
        await trio.to_thread.run_sync(binds.attach)
    except MountError as e:
        ready(str(e))
        await shutdown()
        return
    ready(None)


async def _signals(shutdown) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for _ in signals:
            await shutdown()
            return
