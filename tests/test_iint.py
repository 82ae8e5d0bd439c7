"""The inode integrity cache and the decision path, as plain objects."""

from __future__ import annotations

import hashlib
import os

import pytest

from imafs import templates as T
from imafs.blocking import run_inline
from imafs.iint import IMA_COLLECTED, IMA_MEASURED, Iint, IintCache
from imafs.ima import Ima
from imafs.measure import FMODE_EXEC, MAY_APPEND, MAY_EXEC, MAY_READ, MAY_WRITE, OpenedFile, Task
from imafs.fsinfo import fs_info
from imafs.profile import load_profile


def test_records_round_trip_and_stay_small():
    c = IintCache(limit=10)
    i = Iint((2049, 1 << 63), flags=IMA_MEASURED | IMA_COLLECTED, atomic=0x30, measured_pcrs=1 << 63 | 1 << 10,
             cookie=(1 << 64) - 1, algo="sha512", digest=bytes(range(64)))
    c.put(i)
    assert c.find((2049, 1 << 63)) == i
    assert c.find((2049, 5)) is None
    assert (c.hits, c.misses) == (1, 1)
    assert c.get((1, 1)) == Iint((1, 1)) and (1, 1) not in c  # get() does not store


def test_ordered_by_device_then_inode():
    c = IintCache()
    for key in [(3, 1), (1, 2 ** 64 - 1), (2, 0), (1, 5)]:
        c.put(Iint(key))
    keys = [(k >> 64, k & (2 ** 64 - 1)) for k in c._map.keys()]
    assert keys == sorted(keys)


def test_bounded_eviction_spares_open_inodes():
    c = IintCache(limit=3)
    c.opened((0, 1), reader=True, writer=False)
    for ino in range(1, 8):
        c.put(Iint((0, ino)))
        assert len(c) <= 3
    assert (0, 1) in c  # open: never evicted
    assert c.evictions == 4
    c.closed((0, 1), reader=True, writer=False)
    assert c.opens == {}
    assert c.stats()["bytes_per_inode"] > 0


def test_open_counts():
    c = IintCache()
    c.opened((0, 1), reader=False, writer=True)
    c.opened((0, 1), reader=True, writer=False)
    assert c.counts((0, 1)) == (1, 1)
    c.closed((0, 1), reader=False, writer=True)
    assert c.counts((0, 1)) == (1, 0)


def test_open_masks():
    def mask(flags):
        return OpenedFile((0, 0), b"", None, None, flags).open_mask
    assert mask(os.O_RDONLY) == MAY_READ
    assert mask(os.O_WRONLY) == MAY_WRITE
    assert mask(os.O_RDWR | os.O_APPEND) == MAY_READ | MAY_WRITE | MAY_APPEND  # build_open_flags
    assert mask(os.O_WRONLY | os.O_APPEND) == MAY_WRITE | MAY_APPEND
    assert mask(os.O_RDONLY | os.O_TRUNC) == MAY_READ | MAY_WRITE
    assert mask(os.O_RDONLY | FMODE_EXEC) == MAY_EXEC


# -- the decision path without a mount -------------------------------------------------
def ima_with(policy: str, *settings) -> Ima:
    ima = Ima(load_profile(None, list(settings)))
    s = ima.policy.open(os.O_WRONLY, True, Task().subject())
    data, offset = policy.encode(), 0
    while offset < len(data):  # the kernel takes one rule per write
        offset += run_inline(ima.policy.write(s, offset, data[offset:]))
    ima.policy.release(s)
    return ima


def opened(path, flags=os.O_RDONLY) -> OpenedFile:
    st_ = os.stat(path)
    return OpenedFile((st_.st_dev, st_.st_ino), os.fsencode(path), st_, fs_info(str(path)), flags, path=str(path))


def records(ima) -> list:
    """(pcr, digest, template, fields) of the list after boot_aggregate."""
    return T.parse_binary_list(ima.store.current.sha1_bytes(), 20)[1:]


def names(ima) -> list[tuple[int, str]]:
    return [(pcr, fields[1][:-1].decode()) for pcr, _, _, fields in records(ima)]


def test_pcr_9_and_10_are_two_entries(tmp_path):
    ima = ima_with("measure func=FILE_CHECK pcr=9\nmeasure func=BPRM_CHECK\n")
    f = tmp_path / "both"
    f.write_bytes(b"x")
    root = Task()
    run_inline(ima.measurer.process(opened(f), root, "FILE_CHECK", MAY_READ))
    run_inline(ima.measurer.process(opened(f), root, "FILE_CHECK", MAY_READ))
    run_inline(ima.measurer.process(opened(f), root, "BPRM_CHECK", MAY_EXEC))
    assert names(ima) == [(9, str(f)), (10, str(f))]
    assert ima.iint.find(opened(f).key).measured_pcrs == 1 << 9 | 1 << 10


def test_ima_template_rule_puts_sha1_in_d(tmp_path):
    ima = ima_with("measure func=FILE_CHECK template=ima\n")
    f = tmp_path / "legacy"
    f.write_bytes(b"legacy content")
    run_inline(ima.measurer.process(opened(f), Task(), "FILE_CHECK", MAY_READ))
    pcr, digest, template, fields = records(ima)[-1]
    assert template.name == "ima" and fields[0] == hashlib.sha1(b"legacy content").digest()


@pytest.mark.parametrize("htable, expected", [(False, 1), (True, 2)])
def test_evicted_inode_is_measured_again(tmp_path, htable, expected):
    """Eviction forgets the state; the duplicate table hides an unchanged file."""
    ima = ima_with("measure func=FILE_CHECK\n", "iint_cache_size=1", f"disable_htable={str(htable).lower()}")
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    for f in (a, b, a):
        run_inline(ima.measurer.process(opened(f), Task(), "FILE_CHECK", MAY_READ))
    assert ima.iint.evictions == 2
    assert [n for _, n in names(ima)].count(str(a)) == expected


def test_unseen_change_of_an_explicit_event(tmp_path):
    ima = ima_with("measure func=FILE_CHECK\n")
    f = tmp_path / "f"
    f.write_bytes(b"one")
    run_inline(ima.measurer.process(opened(f), Task(), "FILE_CHECK", MAY_READ))
    f.write_bytes(b"two, longer")
    run_inline(ima.measurer.process(opened(f), Task(), "FILE_CHECK", MAY_READ))
    assert len(names(ima)) == 2


def test_task_of_a_gone_process_keeps_fuse_ids():
    t = Task.of_pid(2 ** 22 + 12345, 1000, 1001)
    assert (t.uid, t.euid, t.gid, t.cap_setuid) == (1000, 1000, 1001, False)
    me = Task.of_pid(os.getpid(), 0, 0)
    assert me.euid == os.geteuid() and me.comm
