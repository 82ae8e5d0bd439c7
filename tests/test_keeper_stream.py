"""`imafs keep export` and `imafs keep verify` stream the whole log (issue 12):
their memory does not grow with the boot, their output is the emulator's own
rendering of the same records, a reader that goes away ends the export
cleanly, and verify's one-pass replay names the record the list-based
algorithm named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imafs import templates as T
from imafs.keeper.trim import Records, split
from imafs.keeper.whole import replay

from .test_keeper import _TEMPLATES, _record

RECORDS = 300_000
# Peak RSS of one CLI run over RECORDS ima-ng records. The list-based code (one
# Rec per record, the output joined) measured 197 MB (export, binary), 327 MB
# (export, ascii) and 199 MB (verify, two banks); streaming: 53-56 MB, of which
# 42 MB is the imafs command's start-up.
RSS_BOUND_MIB = 110

BANKS = ("sha1", "sha256")


def build(where: str) -> dict:
    """RECORDS records (boot_aggregate + generated) measured by an in-process
    emulator, stored in the archive ``where`` in 100k-record chunks, and what
    the emulator itself shows of them: its binary and ASCII sha256 lists and
    its PCRs."""
    from imafs.ima import Ima
    from imafs.keeper.archive import open_archive
    from imafs.profile import load_profile
    ima = Ima(load_profile(None, ["ima_template=ima-ng", "tpm_banks=sha1,sha256"]))
    ima.generate(RECORDS - 1)
    lst = ima.store.current
    view = ima.store.view("ascii", "sha256")
    out = {"binary": lst.sha1_bytes(), "ascii_sha256": lst.read(view, 0, lst.size(view)),
           "pcrs": {b: ima.pcrs.values(b) for b in BANKS}}
    recs = Records.check(out["binary"])
    a = open_archive(where)
    boot = a.new_boot(None, True)
    for first in range(0, len(recs), 100_000):
        a.store(boot, first, recs[first:first + 100_000], "stage")
    a.close()
    return out


@pytest.fixture(params=["sqlite", "postgresql"])
def big(request, tmp_path):
    """(archive, what the emulator showed, the PCR files of both banks); a
    SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        archive = str(tmp_path / "a.db")
    else:
        archive = request.getfixturevalue("postgres_server").new_database()
    shown = build(archive)
    files = []
    for bank in BANKS:
        f = tmp_path / f"pcrs-{bank}.txt"
        f.write_text("".join(f"PCR-{i:02d}: {v.hex()}\n" for i, v in enumerate(shown["pcrs"][bank])))
        files += ["--pcrs", f"{bank},{f}"]
    return archive, shown, files


def stored_bytes(archive: str) -> bytes:
    """The archive's records in order, read with the store's own client."""
    q = "SELECT rec FROM records ORDER BY boot, pos"
    if archive.startswith("postgresql://"):
        import psycopg
        with psycopg.connect(archive) as c:
            return b"".join(bytes(r[0]) for r in c.execute(q))
    import sqlite3
    with sqlite3.connect(archive) as c:
        return b"".join(r[0] for r in c.execute(q))


# The peak RSS of a child, measured by a small parent: a child forked from
# this process starts with its pages (and keeps them in ru_maxrss across exec).
PEAK = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
        "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); sys.exit(rc)")


def keep_measured(tmp_path: Path, *args) -> tuple[int, bytes, str, float]:
    """(exit status, stdout, stderr, peak RSS in MiB) of one `imafs keep` run."""
    out, err, peak = tmp_path / "out", tmp_path / "err", tmp_path / "peak"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run([sys.executable, "-c", PEAK, peak, sys.executable, "-m", "imafs", "keep",
                             *map(str, args)], stdout=o, stderr=e, timeout=300, check=False).returncode
    return rc, out.read_bytes(), err.read_text(), int(peak.read_text()) / 1024


def test_export_and_verify_of_a_large_archive_in_flat_memory(big, tmp_path):
    archive, shown, pcr_files = big
    rc, out, err, mib = keep_measured(tmp_path, "export", "--archive", archive)
    assert rc == 0, err
    assert mib < RSS_BOUND_MIB, f"export (binary) peaked at {mib:.0f} MiB"
    assert out == shown["binary"] == stored_bytes(archive)
    rc, out, err, mib = keep_measured(tmp_path, "export", "--archive", archive, "--format", "ascii", "--bank",
                                      "sha256")
    assert rc == 0, err
    assert mib < RSS_BOUND_MIB, f"export (ascii, sha256) peaked at {mib:.0f} MiB"
    assert out == shown["ascii_sha256"]
    rc, out, err, mib = keep_measured(tmp_path, "verify", "--archive", archive, *pcr_files)
    assert rc == 0, err
    assert mib < RSS_BOUND_MIB, f"verify peaked at {mib:.0f} MiB"
    assert out.decode() == f"boot 1: {RECORDS} records replay to the PCRs of sha1, sha256\n"


def test_export_into_a_pipe_closed_early(big, tmp_path):
    """`export | head -c 100`: head takes 100 bytes and exits; the export gets
    EPIPE at its next write and ends with a clear message, at once."""
    archive = big[0]
    r = subprocess.run(["bash", "-c", 'set -o pipefail; "$@" 2>err | head -c 100 > out', "bash",
                        sys.executable, "-m", "imafs", "keep", "export", "--archive", archive],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1
    err = (tmp_path / "err").read_text()
    assert err == "imafs keep: writing to stdout: Broken pipe: the export is incomplete\n", err
    assert (tmp_path / "out").read_bytes() == big[1]["binary"][:100]
    r = subprocess.run(f'"{sys.executable}" -m imafs keep export --archive "{archive}" > /dev/full',
                       shell=True, capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode, r.stderr) == (1, "imafs keep: writing to stdout: No space left on device: "
                                           "the export is incomplete\n")


def test_export_stopped_by_a_signal_or_without_stdout(big, tmp_path):
    """A reader that stops reading and a SIGKILL halfway: the archive is read
    only, the next export is whole. A closed stdout: said, nothing written
    (a file opened by the export could otherwise take descriptor 1)."""
    archive, shown, _ = big
    p = subprocess.Popen([sys.executable, "-m", "imafs", "keep", "export", "--archive", archive],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.read(1 << 20) == shown["binary"][:1 << 20]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    rc, out, err, _ = keep_measured(tmp_path, "export", "--archive", archive)
    assert rc == 0 and out == shown["binary"], err
    r = subprocess.run(f'"{sys.executable}" -m imafs keep export --archive "{archive}" >&-', shell=True,
                       capture_output=True, text=True, timeout=60, check=False)
    assert (r.returncode, r.stderr) == (1, "imafs keep: stdout is closed\n")


def test_export_and_verify_as_another_user():
    """uid 1000 cannot read root's archive (0600, in a directory it can reach):
    a clear error, no traceback."""
    from imafs.keeper.archive import open_archive
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        os.chmod(d, 0o755)
        archive = Path(d) / "a.db"
        a = open_archive(str(archive))
        a.new_boot(None, True)
        a.close()
        archive.chmod(0o600)
        pcrs = Path(d) / "pcrs"
        pcrs.write_text("PCR-10: " + "00" * 20 + "\n")
        pcrs.chmod(0o644)
        for verb in (["export"], ["verify", "--pcrs", f"sha1,{pcrs}"]):
            r = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", sys.executable,
                                "-m", "imafs", "keep", *verb, "--archive", str(archive)],
                               capture_output=True, text=True, timeout=60, check=False, cwd="/")
            assert r.returncode == 1 and r.stderr.startswith(f"imafs keep: archive {archive}: "), r.stderr
            assert "Traceback" not in r.stderr, r.stderr


def test_verify_refuses_a_bank_it_cannot_compute(tmp_path):
    (tmp_path / "p").write_text("PCR-10: " + "00" * 32 + "\n")
    r = subprocess.run([sys.executable, "-m", "imafs", "keep", "verify", "--archive", str(tmp_path / "none.db"),
                        "--pcrs", f"tpm_alg_18,{tmp_path / 'p'}"], capture_output=True, text=True, check=False)
    assert r.returncode == 1 and "unknown hash algorithm 'tpm_alg_18'" in r.stderr, r.stderr


# -- the one-pass replay against the list-based one it replaced -------------------------

def _list_describe(i, r) -> str:
    name = next((v.rstrip(b"\0") for f, v in zip(r.template.fields, r.fields) if f in ("n", "n-ng")), b"?")
    return f"record {i} (PCR {r.pcr}, {r.template.display_name}, {name.decode(errors='replace')!r})"


def _list_replay(recs: list, bank: str, expected: dict[int, bytes]) -> str | None:
    """The list-based replay `keep verify` used before it streamed (the whole
    boot as a list of trim.Rec, indexed after the pass)."""
    size = T.digest_size(bank)
    pcrs: dict[int, bytes] = {}
    last_match: dict[int, int] = {}
    for i, r in enumerate(recs):
        pcrs[r.pcr] = T.hash_bytes(bank, pcrs.get(r.pcr, bytes(size)) + r.bank_digest(bank))
        if expected.get(r.pcr) == pcrs[r.pcr]:
            last_match[r.pcr] = i
    for pcr, value in sorted(pcrs.items()):
        want = expected.get(pcr)
        if want is None:
            return f"{bank}: PCR {pcr} is extended by the log but not in the PCR file"
        if value != want:
            on_pcr = [i for i, r in enumerate(recs) if r.pcr == pcr]
            if pcr in last_match:
                nxt = next(i for i in on_pcr if i > last_match[pcr])
                return (f"{bank}: PCR {pcr} matches after {_list_describe(last_match[pcr], recs[last_match[pcr]])}; "
                        f"the first record that does not fit is {_list_describe(nxt, recs[nxt])}")
            return (f"{bank}: PCR {pcr} never matches; the first record that does not fit is "
                    f"{_list_describe(on_pcr[0], recs[on_pcr[0]])} (records missing before it, or another boot)")
    return None


def _pcrs_by_hand(raws: list[bytes], bank: str) -> dict[int, bytes]:
    """PCR values of a list, with struct + hashlib (templates only parses)."""
    size = T.digest_size(bank)
    acc: dict[int, bytes] = {}
    for pcr, digest, tmpl, fields in T.parse_binary_list(b"".join(raws), 20, max_name=T.MAX_LIST_TEMPLATE_NAME_LEN):
        d = b"\xff" * size if not any(digest) else T.template_digest(bank, tmpl, fields)
        acc[pcr] = T.hash_bytes(bank, acc.get(pcr, bytes(size)) + d)
    return acc


_RECORD = st.tuples(st.sampled_from(_TEMPLATES), st.binary(min_size=1, max_size=12).map(
    lambda b: b"/" + b.replace(b"\0", b"x")), st.binary(max_size=20), st.integers(0, 4),
    st.integers(0, 9).map(lambda x: x == 0))  # a violation, one time in ten


@settings(max_examples=400, deadline=None)
@given(st.lists(_RECORD, min_size=1, max_size=40), st.integers(0, 10_000), _RECORD,
       st.sampled_from(["replace", "drop", "insert", "none"]),
       st.lists(st.sampled_from(BANKS), min_size=1, max_size=3), st.lists(st.integers(1, 12), min_size=1),
       st.booleans())
def test_one_pass_replay_names_what_the_list_replay_named(clean, at, other, how, banks, pieces,
                                                          drop_a_pcr):
    """Random records on random PCRs, the PCR files made from them; then one
    record replaced, dropped or inserted (or a PCR left out of the files): the
    one-pass replay, fed in batches of random sizes, gives every file the
    verdict the list-based replay gave."""
    raws = [_record(*r) for r in clean]
    files = [(bank, _pcrs_by_hand(raws, bank)) for bank in banks]
    if drop_a_pcr:
        for _, values in files:
            values.pop(min(values), None)
    log = list(raws)
    k = at % len(log)
    if how == "replace":
        log[k] = _record(*other)
    elif how == "drop" and len(log) > 1:
        del log[k]
    elif how == "insert":
        log.insert(k, _record(*other))
    recs = Records.of(log)
    batches, lo = [], 0
    while lo < len(recs):
        step = pieces[len(batches) % len(pieces)]
        batches.append(recs[lo:lo + step])
        lo += step
    n, verdicts = replay(batches, files)
    listed = split(recs.buf)
    assert n == len(log)
    assert verdicts == [_list_replay(listed, bank, values) for bank, values in files]
