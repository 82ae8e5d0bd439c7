"""`imafs keep`: the loop around the trim cycle, and its control socket.

A trio loop decides when to trim; each cycle (and each look at the list's
size) runs in a worker thread, one at a time, and is never cancelled: a cycle
is never cut short, so a clean stop leaves no half-done state. What wakes the
loop: the poll interval (thresholds), SIGUSR1 or a control-socket ``trim``
(trim now), SIGTERM/SIGINT (stop after the cycle under way). Signals that
arrive while one is pending are one request (a storm of SIGUSR1 is one trim).

The control socket (``--control PATH``, mode 0600: root only) speaks the
daemon's protocol (imafs/control.py, JSON lines): ``{"cmd": "trim"}`` answers
once a cycle that began after the request has ended (records archived and
deleted, or the error); ``{"cmd": "status"}`` answers at once.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path

import trio

from ..control import LineServer
from .abi import Busy, Ima
from .archive import ArchiveError, open_archive
from .trim import CHUNK, BadRecord, Keeper

log = logging.getLogger("imafs.keeper")


class Service:
    def __init__(self, keeper: Keeper, *, max_records: int | None = None, max_bytes: int | None = None,
                 interval: float | None = None, poll: float = 1.0, retry: float = 5.0,
                 control: str | None = None):
        self.keeper = keeper
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.interval = interval
        self.poll = poll
        self.retry = retry
        self.control = control
        self.stop = False
        self.requested = False
        self.retry_at: float | None = None
        self.started = 0   # cycles begun
        self.finished = 0  # cycles ended
        self.last: dict | None = None  # what the last cycle did
        self._wake: trio.Event | None = None
        self._ended: trio.Event | None = None

    def due(self, last: float) -> str | None:
        """Why a trim is due now, or None (blocking: reads the list's size)."""
        if self.requested:
            return "requested"
        if self.retry_at is not None and time.monotonic() >= self.retry_at:
            return "retry"
        if self.interval is not None and time.monotonic() - last >= self.interval:
            return "interval"
        ima = self.keeper.ima
        if self.max_records is not None and ima.count() > self.max_records:
            return "max-records"
        if self.max_bytes is not None and ima.longer_than(self.max_bytes):
            return "max-bytes"
        if ima.can_stage and ima.read_staged():
            return "staged records left"
        return None

    def once(self) -> bool:
        """One cycle (blocking); False if it failed and should be retried."""
        t0 = time.monotonic()
        k = self.keeper
        try:
            n = k.cycle()
            error = k.last_error
        except (Busy, BadRecord, ArchiveError, OSError) as e:
            n, error = 0, str(e)
            log.error("keeper: trim failed: %s; nothing unsaved was deleted, retrying later", e)
        self.last = {"ended": time.time(), "seconds": round(time.monotonic() - t0, 6),
                     "archived": k.archived, "deleted": n, "error": error}
        if error is None:
            log.info("keeper: %d records trimmed", n)
        return error is None

    # -- the service ----------------------------------------------------------------------
    def wake(self, *, request: bool = False) -> None:
        self.requested = self.requested or request
        if self._wake is not None:
            self._wake.set()

    async def cycle(self, why: str) -> None:
        self.requested = False
        self.started += 1
        log.info("keeper: trim (%s)", why)
        ok = await trio.to_thread.run_sync(self.once)  # not cancellable: never cut short
        self.retry_at = None if ok else time.monotonic() + self.retry
        self.finished += 1
        self._ended.set()
        self._ended = trio.Event()

    async def trim(self) -> dict:
        """Ask for a cycle and wait for one that began after the request."""
        want = self.started + 1
        self.wake(request=True)
        while self.finished < want:
            if self.stop:
                raise ValueError("the keeper is stopping: no trim")
            await self._ended.wait()
        return self.last

    async def _loop(self) -> None:
        last = time.monotonic()
        await self.cycle("start: finish what a predecessor left, trim what is there")
        trimmed = self._trimmed()
        while not self.stop:
            if not trimmed:  # a cycle that trimmed: look again at once, no poll in between
                with trio.move_on_after(self.poll):
                    await self._wake.wait()
                self._wake = trio.Event()
            if self.stop:
                break
            try:
                why = await trio.to_thread.run_sync(self.due, last)
            except (Busy, OSError) as e:
                log.warning("keeper: cannot read the list's size: %s", e)
                why = None
            if why:
                last = time.monotonic()
                await self.cycle(why)
            trimmed = bool(why) and self._trimmed()

    def _trimmed(self) -> bool:
        """Whether the last cycle took records out without an error: under load
        the next one may be due already (records arrived while it ran)."""
        return bool(self.last and self.last["deleted"] and self.last["error"] is None)

    async def _signals(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    self.wake(request=True)
                else:
                    self.stop = True
                    self.wake()
                    self._ended.set()  # trim requests waiting get their answer: stopping

    async def main(self) -> int:
        self._wake, self._ended = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._signals)
            if self.control:
                await nursery.start(lambda task_status: Control(self).serve(Path(self.control),
                                                                            task_status=task_status))
                log.info("keeper: control socket %s", self.control)
            await self._loop()
            nursery.cancel_scope.cancel()
        log.info("keeper: stopped")
        return 0

    def run(self) -> int:
        return trio.run(self.main)


class Control(LineServer):
    """The keeper's control socket: ``trim`` and ``status``."""

    def __init__(self, service: Service):
        super().__init__()
        self.service = service

    async def cmd_trim(self):
        return await self.service.trim()

    async def cmd_status(self):
        s = self.service
        k = s.keeper
        try:
            current = await trio.to_thread.run_sync(k.ima.count)
        except (Busy, OSError) as e:
            current = f"unreadable: {e}"
        return {"archive": k.archive.path, "host": k.archive.host, "mode": k.mode,
                "trimming": s.started != s.finished, "cycles": s.finished, "last": s.last,
                "runtime_measurements_count": current,
                "thresholds": {"max_records": s.max_records, "max_bytes": s.max_bytes, "interval": s.interval}}


def open_keeper(securityfs: str, archive: str, mode: str, abi: str, boot_id_file: str | None,
                host_id: str | None = None, chunk: int = CHUNK) -> Keeper:
    from .trim import crash_hook
    ima = Ima(securityfs, abi)
    return Keeper(ima, open_archive(archive, crash_hook, host_id), mode, boot_id_file, chunk)
