"""The record store as a plain object: views, offsets, duplicates, PCRs."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings, strategies as st

from imafs import store as S
from imafs import templates as T
from imafs.tpm import PcrBanks

NG = T.BUILTIN_TEMPLATES["ima-ng"]


def make_store(banks=("sha1", "sha256"), ima_hash="sha256", cache=1 << 20, **kw):
    pcrs = PcrBanks(banks) if banks else None
    return S.MeasurementStore(tpm_banks=banks, ima_hash=ima_hash, pcrs=pcrs, cache_bytes=cache, **kw)


def ev(i: int, name=None) -> T.Event:
    content = b"content %d" % i
    return T.Event(name=name or b"/usr/lib/file-%d" % i, file_digest=hashlib.sha256(content).digest(),
                   file_algo="sha256", ima_hash="sha256", d_digest=hashlib.sha1(content).digest(),
                   uid=0, gid=0, mode=0o100644)


def expected(records, fmt, bank):
    """Render records independently of the store."""
    out = []
    for tmpl, fields, pcr, violation in records:
        d = bytes(T.digest_size(bank)) if violation else T.template_digest(bank, tmpl, fields)
        out.append((T.ascii_record if fmt == "ascii" else T.binary_record)(pcr, d, tmpl, fields))
    return b"".join(out)


def fill(store, n, tmpl=NG, pcr=10):
    recs = []
    for i in range(n):
        fields = T.encode_fields(tmpl, ev(i))
        assert store.add(tmpl, fields, pcr)
        recs.append((tmpl, fields, pcr, False))
    return recs


@pytest.mark.parametrize("cache", [1 << 24, 5000])
def test_views_across_blocks(cache):
    s = make_store(cache=cache)
    recs = fill(s, 2 * S.BLOCK_RECORDS + 17)
    assert len(s.current.blocks) == 3
    for view in s.views:
        want = expected(recs, view.fmt, view.bank)
        lst = s.current
        assert lst.size(view) == len(want)
        assert lst.read(view, 0, len(want) + 100) == want
        for off in (0, 1, 4095, len(want) // 2, len(want) - 1, len(want), len(want) + 5):
            assert lst.read(view, off, 70000) == want[off:off + 70000], (view, off)


def test_tail_renders_incrementally():
    s = make_store()
    v = s.view("ascii", "sha256")
    recs = fill(s, 10)
    first = s.current.read(v, 0, 1 << 20)
    more = [(NG, T.encode_fields(NG, ev(100 + i)), 10, False) for i in range(5)]
    for tmpl, fields, pcr, _ in more:
        s.add(tmpl, fields, pcr)
    assert s.current.read(v, 0, 1 << 20) == expected(recs + more, "ascii", "sha256")
    assert s.current.read(v, len(first), 1 << 20) == expected(more, "ascii", "sha256")


def test_duplicates_by_ima_hash_digest_and_pcr():
    s = make_store()
    f = T.encode_fields(NG, ev(1))
    assert s.add(NG, f, 10)
    assert not s.add(NG, f, 10)
    assert s.add(NG, f, 11)
    assert s.current.count == 2
    s2 = make_store(disable_htable=True)
    assert s2.add(NG, f, 10) and s2.add(NG, f, 10)
    assert s2.current.count == 2


def test_pcr_extension_and_violations():
    s = make_store()
    recs = fill(s, 3)
    vf = T.encode_fields(NG, T.Event(name=b"/v", violation=True, ima_hash="sha256"))
    assert s.add(NG, vf, 10, violation=True)
    assert s.add(NG, vf, 10, violation=True)  # never deduplicated
    for bank in ("sha1", "sha256"):
        pcr = bytes(T.digest_size(bank))
        for tmpl, fields, _, _ in recs:
            pcr = T.hash_bytes(bank, pcr + T.template_digest(bank, tmpl, fields))
        for _ in range(2):
            pcr = T.hash_bytes(bank, pcr + b"\xff" * T.digest_size(bank))
        assert s.pcrs.read(bank, 10) == pcr
    line = s.current.read(s.view("ascii", "sha1"), 0, 1 << 20).splitlines()[-1]
    assert line == b"10 " + b"0" * 40 + b" ima-ng sha256:" + b"0" * 64 + b" /v"


def test_bypass_has_only_sha1_files_and_ima_hash_slot():
    s = make_store(banks=(), ima_hash="sha512")
    assert s.file_banks == ("sha1",)
    assert s.slot_banks == ("sha1", "sha512")
    fill(s, 2)
    assert s.pcrs is None


def test_restore_is_not_deduplicated_nor_extended():
    s = make_store()
    f = T.encode_fields(NG, ev(7))
    s.restore(NG, f, 10, violation=False)
    assert s.pcrs.read("sha1", 10) == bytes(20)
    assert s.add(NG, f, 10)  # not in the duplicate table
    assert s.current.count == 2


def test_sha1_bytes_is_the_binary_sha1_view():
    s = make_store()
    fill(s, S.BLOCK_RECORDS + 3)
    v = s.view("binary", "sha1")
    assert s.current.sha1_bytes() == s.current.read(v, 0, 1 << 30)
    assert [r[0] for r in T.parse_binary_list(s.current.sha1_bytes(), 20)] == [10] * (S.BLOCK_RECORDS + 3)


names = st.binary(min_size=1, max_size=300).filter(lambda b: b"\0" not in b)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(names, st.sampled_from(sorted(T.BUILTIN_TEMPLATES)),
                          st.integers(0, 23), st.booleans()), min_size=1, max_size=60),
       st.lists(st.tuples(st.integers(0, 20000), st.integers(1, 5000)), max_size=10))
def test_random_records_any_offset(items, reads):
    s = make_store(cache=3000)
    recs = []
    for i, (name, tname, pcr, violation) in enumerate(items):
        tmpl = T.BUILTIN_TEMPLATES[tname]
        e = ev(i, name)
        e.violation = violation
        if violation:
            tmpl, pcr = NG, 10
        fields = T.encode_fields(tmpl, e)
        if s.add(tmpl, fields, pcr, violation=violation):
            recs.append((tmpl, fields, pcr, violation))
    for view in s.views:
        want = expected(recs, view.fmt, view.bank)
        for off, size in reads:
            assert s.current.read(view, off, size) == want[off:off + size]


@pytest.mark.parametrize("n", [1, S.BLOCK_RECORDS - 1, S.BLOCK_RECORDS, S.BLOCK_RECORDS + 5, 3 * S.BLOCK_RECORDS])
def test_trim_keeps_views_exact_and_frees(n):
    s = make_store(cache=1 << 16)
    recs = fill(s, 3 * S.BLOCK_RECORDS + 10)
    for view in s.views:
        s.current.read(view, 0, 1 << 30)  # fill the render cache
    s.current.trim(n)
    assert s.current.count == len(recs) - n
    for view in s.views:
        want = expected(recs[n:], view.fmt, view.bank)
        assert s.current.size(view) == len(want)
        assert s.current.read(view, 0, 1 << 30) == want
        assert s.current.read(view, 1000, 5000) == want[1000:6000]
    assert s.current.kexec_size == len(s.current.sha1_bytes())
    while s.reap(2):
        pass
    assert not s.graveyard
    more = [(NG, T.encode_fields(NG, ev(10**6 + i)), 10, False) for i in range(3)]
    for tmpl, fields, pcr, _ in more:  # the list still grows after a trim
        assert s.add(tmpl, fields, pcr)
    assert s.current.read(s.view("ascii", "sha256"), 0, 1 << 30) == expected(recs[n:] + more, "ascii", "sha256")


def test_delete_staged_frees_and_keeps_or_flushes_duplicates():
    s = make_store()
    recs = fill(s, 2000)
    for view in s.views:
        s.current.read(view, 0, 1 << 30)
    s.stage()
    assert s.current.count == 0 and s.staged.count == 2000
    s.delete_staged()
    assert s.staged.count == 0 and s.graveyard
    while s.reap():
        pass
    assert s.cache.used == 0 and not s.cache._lru  # rendered bytes returned too
    tmpl, fields, pcr, _ = recs[0]
    assert not s.add(tmpl, fields, pcr)  # still in the duplicate table
    s.delete_staged(flush_htable=True)
    while s.reap():
        pass
    assert s.add(tmpl, fields, pcr)
