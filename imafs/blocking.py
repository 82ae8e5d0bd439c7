"""Blocking steps of the emulated kernel's request paths, and who runs them.

A hook that hashes a file, a policy load that reads one, a record made from
a file: each is a decision path over the emulator's state with, somewhere in
the middle, file I/O that may take seconds (a 2 GiB file) or forever (a FIFO
nobody writes, if it got that far).  The state is the event loop's alone; the
I/O must not run there, or one request stops every other.

Such a path is written once, as a generator that ``yield``s what it needs
done outside the state:

* ``Blocking(fn, *args)``: run ``fn(*args)`` and send back its result (or
  throw its exception in);
* ``Exclusive(key)``: hold the lock of ``key`` until the path ends — the
  kernel's ``iint->mutex``, so that two hooks on one inode do not collect
  and store at once while hooks on other inodes go on.

:func:`run_inline` drives a path in the caller's thread (plain objects, unit
tests, scripts).  :func:`run` drives it inside the daemon: blocking steps go
to worker threads under a :class:`trio.CapacityLimiter` and are abandoned,
not waited for, when the daemon shuts down.  Between steps the generator runs
on the loop, so it must re-check what another request may have changed while
it waited (e.g. a reboot: :attr:`imafs.ima.Ima.boots`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import trio

T = TypeVar("T")
Steps = Generator[Any, Any, T]

IO_THREADS = 64  # blocking steps at once; more wait for a thread, the loop never does


class Blocking:
    __slots__ = ("fn", "args")

    def __init__(self, fn: Callable, *args):
        self.fn = fn
        self.args = args


@dataclass(frozen=True)
class Exclusive:
    key: Any


def no_steps(fn: Callable[..., T]) -> Callable[..., Steps[T]]:
    """``fn`` as a path with no blocking step, for a family of operations of
    which some block (a write to the policy file may load one by path): the
    caller drives them all alike."""
    @functools.wraps(fn)
    def path(*args, **kw):
        return fn(*args, **kw)
        yield  # makes this a generator
    return path


def _resume(steps: Steps, value, error: BaseException | None):
    """Resume ``steps`` with the last step's outcome: (its next step, None),
    or (None, StopIteration) carrying its result when it ends."""
    try:
        return (steps.throw(error) if error is not None else steps.send(value)), None
    except StopIteration as stop:
        return None, stop


def run_inline(steps: Steps[T]) -> T:
    """Drive ``steps`` in this thread: blocking steps run here, locks are moot."""
    value, error = None, None
    while True:
        step, done = _resume(steps, value, error)
        if done is not None:
            return done.value
        value, error = None, None
        if isinstance(step, Blocking):
            try:
                value = step.fn(*step.args)
            except Exception as e:
                error = e


class Locks:
    """One :class:`trio.Lock` per key while anyone holds or waits for it."""

    def __init__(self):
        self._locks: dict[Any, list] = {}  # key -> [lock, users]

    async def acquire(self, key) -> None:
        entry = self._locks.setdefault(key, [trio.Lock(), 0])
        entry[1] += 1
        try:
            try:  # free: taken at once, without a trip through the scheduler
                entry[0].acquire_nowait()
            except trio.WouldBlock:
                await entry[0].acquire()
        except BaseException:
            self._drop(key, entry)
            raise

    def release(self, key) -> None:
        entry = self._locks[key]
        entry[0].release()
        self._drop(key, entry)

    def _drop(self, key, entry) -> None:
        entry[1] -= 1
        if not entry[1]:
            del self._locks[key]

    def __len__(self) -> int:
        return len(self._locks)


class Runner:
    """Drives request paths inside the daemon's event loop."""

    def __init__(self, threads: int = IO_THREADS):
        self.limiter = trio.CapacityLimiter(threads)
        self.locks = Locks()

    async def io(self, fn: Callable[..., T], *args) -> T:
        """``fn(*args)`` in a worker thread; abandoned if the request is cancelled."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter, abandon_on_cancel=True)

    async def run(self, steps: Steps[T]) -> T:
        held: list = []
        value, error = None, None
        try:
            while True:
                step, done = _resume(steps, value, error)
                if done is not None:
                    return done.value
                value, error = None, None
                if isinstance(step, Blocking):
                    try:
                        value = await self.io(step.fn, *step.args)
                    except Exception as e:
                        error = e
                elif isinstance(step, Exclusive) and step.key not in held:
                    await self.locks.acquire(step.key)
                    held.append(step.key)
        finally:
            steps.close()
            for key in held:
                self.locks.release(key)
