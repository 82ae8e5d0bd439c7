"""`imafs keep`: the loop around the trim cycle.

One thread, blocking calls: the keeper has one job at a time, and each call
(an open, a read, a commit) is bounded (EBUSY gives up after BUSY_TIMEOUT; a
commit is one fsync). Signals only set flags: SIGTERM/SIGINT end the loop after
the cycle under way (a cycle is never cut short, so no half-done state is left
by a clean stop), SIGUSR1 asks for a trim now.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

from .abi import Busy, Ima
from .archive import open_archive
from .trim import BadRecord, Keeper

log = logging.getLogger("imafs.keeper")


class Service:
    def __init__(self, keeper: Keeper, *, max_records: int | None = None, max_bytes: int | None = None,
                 interval: float | None = None, poll: float = 1.0, retry: float = 5.0):
        self.keeper = keeper
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.interval = interval
        self.poll = poll
        self.retry = retry
        self.wake = threading.Event()
        self.stop = False
        self.requested = False
        self.retry_at: float | None = None

    def install_signals(self) -> None:
        def term(signum, frame):
            self.stop = True
            self.wake.set()

        def usr1(signum, frame):
            self.requested = True
            self.wake.set()

        signal.signal(signal.SIGTERM, term)
        signal.signal(signal.SIGINT, term)
        signal.signal(signal.SIGUSR1, usr1)

    def due(self, last: float) -> str | None:
        """Why a trim is due now, or None."""
        if self.requested:
            return "requested"
        if self.retry_at is not None and time.monotonic() >= self.retry_at:
            return "retry"
        if self.interval is not None and time.monotonic() - last >= self.interval:
            return "interval"
        ima = self.keeper.ima
        if self.max_records is not None and ima.count() > self.max_records:
            return "max-records"
        if self.max_bytes is not None and len(ima.read_current()) > self.max_bytes:
            return "max-bytes"
        if ima.can_stage and ima.read_staged():
            return "staged records left"
        return None

    def once(self) -> bool:
        """One cycle; False if it failed and should be retried."""
        try:
            n = self.keeper.cycle()
        except (Busy, BadRecord, OSError) as e:
            log.error("keeper: trim failed: %s; nothing unsaved was deleted, retrying later", e)
            return False
        if self.keeper.last_error:
            return False
        log.info("keeper: %d records trimmed", n)
        return True

    def run(self) -> int:
        last = time.monotonic()
        if not self.once():  # at start: finish what a predecessor left, trim what is there
            self.retry_at = last + self.retry
        while not self.stop:
            self.wake.wait(self.poll)
            self.wake.clear()
            if self.stop:
                break
            try:
                why = self.due(last)
            except (Busy, OSError) as e:
                log.warning("keeper: cannot read the list's size: %s", e)
                why = None
            if why:
                self.requested = False
                log.info("keeper: trim (%s)", why)
                last = time.monotonic()
                self.retry_at = None if self.once() else last + self.retry
        log.info("keeper: stopped")
        return 0


def open_keeper(securityfs: str, archive: str, mode: str, abi: str, boot_id_file: str | None,
                host_id: str | None = None) -> Keeper:
    from .trim import crash_hook
    ima = Ima(securityfs, abi)
    return Keeper(ima, open_archive(archive, crash_hook, host_id), mode, boot_id_file)
