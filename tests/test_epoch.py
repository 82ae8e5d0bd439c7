"""The hook epoch (imafs/epoch.py) and what moves it."""

from __future__ import annotations

import os

from imafs.epoch import Epoch, EpochView
from imafs.iint import IMA_MEASURED, Iint, IintCache


def test_a_reader_sees_each_bump_and_nothing_after_close(tmp_path):
    path = tmp_path / "x.epoch"
    e = Epoch()
    e.bump()  # before it is shared: counted all the same
    e.share(path)
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["x.epoch"]  # no private name left behind
    view = EpochView(path)
    assert view.read() == e.value == 2
    for _ in range(300):  # across a byte boundary of the counter
        e.bump()
    assert view.read() == 302
    e.close()
    assert view.read() is None and not path.exists()  # a reader left with the file asks the daemon


def test_a_torn_pair_reads_as_unknown(tmp_path):
    path = tmp_path / "x.epoch"
    e = Epoch()
    e.share(path)
    view = EpochView(path)
    with open(path, "r+b") as f:  # half of a write: the new value, the old check
        f.write((7).to_bytes(8, "little"))
    assert view.read() is None
    e.bump()
    assert view.read() == 2


def test_a_truncated_file_reads_as_unknown_until_the_next_bump(tmp_path):
    """Someone empties the file: neither side faults (no shared mapping), the
    reader asks the daemon, the next bump publishes again."""
    path = tmp_path / "x.epoch"
    e = Epoch()
    e.share(path)
    view = EpochView(path)
    os.truncate(path, 0)
    assert view.read() is None
    e.bump()
    assert view.read() == 2
    os.truncate(path, 3)
    assert view.read() is None


def test_the_iint_cache_calls_changed_on_each_change_and_only_then():
    calls = []
    cache = IintCache(limit=2, changed=lambda: calls.append(1))
    a = Iint((1, 1))
    cache.put(a)
    assert len(calls) == 1
    cache.put(cache.get((1, 1)))  # the same record again: no change
    assert len(calls) == 1
    a = cache.get((1, 1))
    a.flags |= IMA_MEASURED
    cache.put(a)
    assert len(calls) == 2
    cache.opened((1, 1), reader=True, writer=False)  # a reader: decisions do not move
    cache.closed((1, 1), reader=True, writer=False)
    assert len(calls) == 2
    cache.opened((1, 1), reader=False, writer=True)  # a writer: open_writers, ToMToU
    cache.closed((1, 1), reader=False, writer=True)
    assert len(calls) == 4
    cache.put(Iint((1, 2)))
    cache.put(Iint((1, 3)))  # full: one evicted, one put
    assert len(calls) == 7 and cache.evictions == 1
    cache.remove((9, 9))  # nothing there
    assert len(calls) == 7
    cache.remove((1, 3))
    cache.clear()
    assert len(calls) == 9
