"""Keys waiting for the first custom policy (the kernel's ima_queue_keys.c).

Keys are added to keyrings from early boot on (the builtin keys before IMA
is up), before any policy can say whether to measure them.  The kernel queues
every key until a custom policy is loaded, measures the queue against that
policy, and from then on measures keys as they come.  A timer started at IMA's
init (5 minutes) ends the wait: the queue is dropped unmeasured and later keys
are measured against the policy of the moment.

The timer is a deadline checked whenever the queue is touched: nothing can
observe the queue between the deadline and the next touch, so this is the
kernel's behaviour without a task.
"""

from __future__ import annotations

import time


class KeyQueue:
    def __init__(self, timeout: float, clock=time.monotonic):
        self.clock = clock
        self.deadline = clock() + timeout
        self.entries: list[tuple[str, bytes]] = []  # (keyring, payload)
        self.processed = False  # ima_process_keys: the queue is over
        self.timer_expired = False

    def _expire(self) -> None:
        if not self.processed and self.clock() >= self.deadline:
            self.processed = self.timer_expired = True
            self.entries.clear()

    def queue(self, keyring: str, payload: bytes) -> bool:
        """ima_queue_key: whether the key waits (else it is measured now)."""
        self._expire()
        if self.processed:
            return False
        self.entries.append((keyring, payload))
        return True

    def process(self) -> list[tuple[str, bytes]]:
        """ima_process_queued_keys, on a custom policy load: the keys to
        measure now, in the order they came; nothing after the first call."""
        self._expire()
        if self.processed:
            return []
        self.processed = True
        entries, self.entries = self.entries, []
        return entries
