"""The mounted tree, read and written with real system calls and real tools."""

from __future__ import annotations

import errno
import json
import os
import random
import select
import socket
import stat
import subprocess

import pytest

from imafs import templates as T

from .conftest import imafs

BOOT_NG_SHA256 = bytes.fromhex(
    "0a000000" "0adefe762c149c7cec19da62f0da1297fcfbffff" "06000000" "696d612d6e67"
    "3f000000" "28000000" "7368613235363a00" + "00" * 32 +
    "0f000000" "626f6f745f616767726567617465" "00")


def _listdir_raw(path) -> list[str]:
    """getdents order, with . and .."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [e.name for e in os.scandir(fd)]
    finally:
        os.close(fd)


def _check_common(m):
    root = os.lstat(m.path)
    assert stat.S_ISDIR(root.st_mode)
    link = os.lstat(m.path / "ima")
    assert link.st_mode == 0o120444
    assert os.readlink(m.path / "ima") == "integrity/ima"
    d = os.lstat(m.path / "integrity" / "ima")
    assert d.st_mode == 0o40755 and d.st_nlink == 2 and d.st_uid == 0 and d.st_gid == 0
    for name in os.listdir(m.ima):
        st = os.lstat(m.ima / name)
        assert st.st_uid == 0 and st.st_gid == 0
        if stat.S_ISLNK(st.st_mode):
            assert st.st_mode == 0o120444
            assert os.readlink(m.ima / name) == name.replace("measurements", "measurements_sha1", 1)
        else:
            assert st.st_size == 0 and st.st_nlink == 1


def test_layout_612_two_banks(mount_imafs):
    m = mount_imafs("kernel=6.12")
    _check_common(m)
    assert os.listdir(m.ima) == [
        "policy", "violations", "runtime_measurements_count",
        "ascii_runtime_measurements", "binary_runtime_measurements",
        "binary_runtime_measurements_sha256", "ascii_runtime_measurements_sha256",
        "binary_runtime_measurements_sha1", "ascii_runtime_measurements_sha1"]
    for name in os.listdir(m.ima):
        st = os.lstat(m.ima / name)
        if stat.S_ISREG(st.st_mode):
            assert st.st_mode == (0o100200 if name == "policy" else 0o100440), name


def test_layout_72_staging(mnt):
    """staging.md §1.2/§1.3: `_staged` twins and symlinks, lists 0660."""
    _check_common(mnt)
    assert os.listdir(mnt.ima) == [
        "policy", "violations", "runtime_measurements_count",
        "ascii_runtime_measurements_staged", "binary_runtime_measurements_staged",
        "ascii_runtime_measurements", "binary_runtime_measurements",
        "binary_runtime_measurements_sha256_staged", "ascii_runtime_measurements_sha256_staged",
        "binary_runtime_measurements_sha256", "ascii_runtime_measurements_sha256",
        "binary_runtime_measurements_sha1_staged", "ascii_runtime_measurements_sha1_staged",
        "binary_runtime_measurements_sha1", "ascii_runtime_measurements_sha1"]
    assert os.readlink(mnt.ima / "ascii_runtime_measurements_staged") == "ascii_runtime_measurements_sha1_staged"
    for name in os.listdir(mnt.ima):
        st = os.lstat(mnt.ima / name)
        if stat.S_ISREG(st.st_mode) and "_runtime_measurements" in name:
            assert st.st_mode == 0o100660, name
    assert mnt.read("ascii_runtime_measurements_staged") == b""


def test_layout_bypass_and_four_banks(mount_imafs):
    m = mount_imafs("tpm_banks=none", "staging=false")
    assert os.listdir(m.ima) == [
        "policy", "violations", "runtime_measurements_count",
        "ascii_runtime_measurements", "binary_runtime_measurements",
        "binary_runtime_measurements_sha1", "ascii_runtime_measurements_sha1"]
    m4 = mount_imafs("tpm_banks=sha256,sha384,sha512", "staging=false")
    assert os.listdir(m4.ima)[5:] == [
        "binary_runtime_measurements_sha1", "ascii_runtime_measurements_sha1",
        "binary_runtime_measurements_sha512", "ascii_runtime_measurements_sha512",
        "binary_runtime_measurements_sha384", "ascii_runtime_measurements_sha384",
        "binary_runtime_measurements_sha256", "ascii_runtime_measurements_sha256"]


def test_layout_61(mount_imafs):
    m = mount_imafs("kernel=6.1")
    assert os.listdir(m.ima) == ["policy", "violations", "runtime_measurements_count",
                                 "ascii_runtime_measurements", "binary_runtime_measurements"]
    for name in ("ascii_runtime_measurements", "binary_runtime_measurements"):
        assert os.lstat(m.ima / name).st_mode == 0o100440


def test_mount_source_and_type(mnt):
    with open("/proc/self/mountinfo") as f:
        line = next(line for line in f if f" {mnt.path} " in line)
    fields = line.split(" - ")[1].split()
    assert fields[0] == "fuse.imafs" and fields[1] == "securityfs"
    assert "allow_other" in fields[2] and "default_permissions" in fields[2]


def test_boot_aggregate_golden_bypass(mount_imafs):
    m = mount_imafs("tpm_banks=none", "ima_hash=sha256", "ima_template=ima-ng")
    assert m.read("binary_runtime_measurements") == BOOT_NG_SHA256
    assert m.read("ascii_runtime_measurements") == (
        b"10 0adefe762c149c7cec19da62f0da1297fcfbffff ima-ng sha256:" + b"0" * 64 + b" boot_aggregate\n")
    assert m.read("runtime_measurements_count") == b"1\n"
    assert m.read("violations") == b"0\n"


def test_ima_sig_boot_list_is_106_bytes(mount_imafs):
    m = mount_imafs("tpm_banks=none", "ima_template=ima-sig")
    assert len(m.read("binary_runtime_measurements")) == 106
    assert m.read("ascii_runtime_measurements").endswith(b" boot_aggregate \n")


def test_count_file_reads(mnt):
    fd = os.open(mnt.ima / "runtime_measurements_count", os.O_RDONLY)
    try:
        assert os.read(fd, 1) == b"1"
        assert os.read(fd, 100) == b"\n"
        assert os.read(fd, 100) == b""
        assert os.lseek(fd, 0, os.SEEK_END) == 0
    finally:
        os.close(fd)


def _fill(m, n=300):
    m.cli("generate", "--count", n)
    m.cli("record", "--name", "/tmp/with space", "--digest", "sha256:" + "ab" * 32)
    m.cli("record", "--name", "/etc/nine", "--digest", "sha256:" + "cd" * 32, "--pcr", "9")


def test_read_patterns(mnt):
    _fill(mnt, 3000)
    for name in ("ascii_runtime_measurements_sha1", "binary_runtime_measurements_sha256",
                 "ascii_runtime_measurements_sha256", "binary_runtime_measurements_sha1"):
        whole = mnt.read(name)
        fd = os.open(mnt.ima / name, os.O_RDONLY)
        try:
            assert b"".join(os.read(fd, 1) for _ in range(3000)) == whole[:3000]
        finally:
            os.close(fd)
        for size in (4, 7, 4096, 8192, 131072):
            fd = os.open(mnt.ima / name, os.O_RDONLY)
            parts = []
            try:
                while chunk := os.read(fd, size):
                    parts.append(chunk)
            finally:
                os.close(fd)
            assert b"".join(parts) == whole, (name, size)
        rng = random.Random(name)
        fd = os.open(mnt.ima / name, os.O_RDONLY)
        try:
            for _ in range(200):
                off = rng.randrange(len(whole) + 10)
                size = rng.choice((1, 13, 4096, 65536, 200000))
                assert os.pread(fd, size, off) == whole[off:off + size]
            os.lseek(fd, 100, os.SEEK_SET)
            os.lseek(fd, 50, os.SEEK_CUR)
            assert os.read(fd, 10) == whole[150:160]
        finally:
            os.close(fd)
    fd = os.open(mnt.ima / "ascii_runtime_measurements", os.O_RDONLY)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN)
        assert p.poll(1000) and os.read(fd, 3) == b"10 "
    finally:
        os.close(fd)
    with open(mnt.ima / "ascii_runtime_measurements", "r", encoding="utf-8") as f:
        lines = f.readlines()
    assert lines[0].split()[4] == "boot_aggregate"
    assert len(lines) == int(mnt.read("runtime_measurements_count")) == 3003


def test_long_lived_fd_sees_appends(mnt):
    with open(mnt.ima / "ascii_runtime_measurements", "rb", buffering=0) as f:
        first = f.read()
        assert f.read() == b""
        mnt.cli("record", "--name", "/bin/late", "--digest", "sha256:" + "11" * 32)
        tail = f.read()
        assert tail.endswith(b" /bin/late\n") and tail.count(b"\n") == 1
        assert f.tell() == len(first) + len(tail)


def test_writes_einval_and_trunc(mount_imafs):
    """Without the staging ABI no file has a write method (F-4)."""
    mnt = mount_imafs("kernel=6.12")
    for name in ("ascii_runtime_measurements", "binary_runtime_measurements_sha256",
                 "runtime_measurements_count", "violations"):
        fd = os.open(mnt.ima / name, os.O_WRONLY | os.O_TRUNC)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, b"1\n")
            assert e.value.errno == errno.EINVAL
        finally:
            os.close(fd)
        os.close(os.open(mnt.ima / name, os.O_RDWR))
    assert mnt.read("runtime_measurements_count") == b"1\n"


def test_seek_end_on_list(mnt):
    """The kernel answers EINVAL; FUSE handles SEEK_END itself (docs/deviations.md)."""
    fd = os.open(mnt.ima / "ascii_runtime_measurements", os.O_RDONLY)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 0
    finally:
        os.close(fd)


def test_non_root_gets_eacces(mount_imafs):
    # under pytest's 0700 temporary directory uid 1000 would be refused the path itself
    mnt = mount_imafs(reachable=True)
    r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", "ls", str(mnt.ima)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "policy" in r.stdout, r.stderr
    for name in ("ascii_runtime_measurements", "runtime_measurements_count", "policy"):
        r = subprocess.run(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                            "cat", str(mnt.ima / name)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, name


def test_policy_open_rules(mnt):
    for flags in (os.O_RDONLY, os.O_RDWR):
        with pytest.raises(OSError) as e:
            os.open(mnt.ima / "policy", flags)
        assert e.value.errno == errno.EACCES
    fd = os.open(mnt.ima / "policy", os.O_WRONLY | os.O_TRUNC)
    try:
        with pytest.raises(OSError) as e:
            os.open(mnt.ima / "policy", os.O_WRONLY | os.O_APPEND)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    os.close(os.open(mnt.ima / "policy", os.O_WRONLY))


def test_mount_errors(mnt, tmp_path):
    r = imafs("mount", mnt.path, check=False)
    assert r.returncode != 0 and "already mounted" in r.stderr
    r = imafs("mount", tmp_path / "nope", check=False)
    assert r.returncode != 0 and "does not exist" in r.stderr
    r = imafs("mount", tmp_path, "--set", "tpm_banks=sha7", check=False)
    assert r.returncode == 2 and "tpm_banks" in r.stderr


def test_bad_requests_leave_list_untouched(mnt, tmp_path):
    _fill(mnt, 10)
    before = mnt.read("binary_runtime_measurements_sha256")
    bad = [
        ("--name", "x", "--digest", "sha256:abcd"),
        ("--name", "x", "--digest", "sha999:abcd"),
        ("--name", "x", "--digest", "sha256:zz"),
        ("--name", "x", "--file", tmp_path / "missing"),
        ("--name", "x", "--file", tmp_path),
        ("--name", "x", "--digest", "sha256:" + "00" * 32, "--template", "no-such-template"),
        ("--name", "x", "--digest", "sha256:" + "00" * 32, "--template", "d-ng|bogus"),
        ("--name", "x", "--digest", "sha256:" + "00" * 32, "--pcr", "64"),
        ("--name", "x", "--buffer-hex", "xyz"),
        ("--name", "x", "--violation", "--pcr", "11"),
        ("--name", "x", "--digest", "sha256:" + "00" * 32, "--template", "ima"),
    ]
    for args in bad:
        r = mnt.cli("record", *args, check=False)
        assert r.returncode == 1 and r.stderr.startswith("imafs: "), (args, r.stderr)
        assert "Traceback" not in r.stderr
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(mnt.client.path))
        for raw in (b"{not json\n", b"[1,2]\n", b'{"cmd": "nope"}\n', b'{"cmd": "record"}\n',
                    b'{"cmd": "generate", "count": "x"}\n', b"\xff\xfe\n"):
            s.sendall(raw)
            answer = json.loads(s.makefile("rb").readline())
            assert answer["ok"] is False and answer["error"], raw
    assert mnt.read("binary_runtime_measurements_sha256") == before
    assert mnt.client.call("status")["count"] == 13


def test_duplicates_and_violations(mnt):
    args = ("record", "--name", "/bin/a", "--digest", "sha256:" + "22" * 32)
    mnt.cli(*args)
    r = mnt.cli(*args)
    assert "duplicate" in r.stderr
    mnt.cli(*args, "--pcr", "11")  # another PCR: a new record
    mnt.cli("record", "--name", "/bin/a", "--violation")
    mnt.cli("record", "--name", "/bin/a", "--violation")
    st = mnt.client.call("status")
    assert st["count"] == 5 and st["violations"] == 2
    assert mnt.read("violations") == b"2\n"
    lines = mnt.read("ascii_runtime_measurements_sha256").splitlines()
    assert lines[-1] == b"10 " + b"0" * 64 + b" ima-ng sha256:" + b"0" * 64 + b" /bin/a"
    assert lines[2].startswith(b"11 ")


def test_binary_equals_ascii(mnt):
    _fill(mnt, 500)
    for bank, size in (("sha1", 20), ("sha256", 32)):
        records = T.parse_binary_list(mnt.read(f"binary_runtime_measurements_{bank}"), size)
        ascii_lines = mnt.read(f"ascii_runtime_measurements_{bank}")
        assert b"".join(T.ascii_record(pcr, d, tmpl, fields) for pcr, d, tmpl, fields, *_ in records) \
            == ascii_lines
        assert len(records) == int(mnt.read("runtime_measurements_count"))


def test_record_file_fields(mount_imafs, tmp_path):
    m = mount_imafs("ima_template=evm-sig")
    f = tmp_path / "data.bin"
    f.write_bytes(b"hello imafs\n")
    os.chown(f, 1234, 5678)
    os.chmod(f, 0o640)
    m.cli("record", "--name", str(f), "--file", f)
    line = m.read("ascii_runtime_measurements_sha256").splitlines()[-1]
    import hashlib
    assert (b" evm-sig sha256:" + hashlib.sha256(b"hello imafs\n").hexdigest().encode()) in line
    assert line.endswith(b" 1234 5678 33184")


def test_status_and_pcrs(mnt):
    st = mnt.client.call("status")
    assert st["profile"]["kernel"] == "7.2" and st["count"] == 1
    out = mnt.cli("pcrs", "--bank", "sha256", "--format", "evmctl").stdout.splitlines()
    assert len(out) == 24 and out[10].startswith("PCR-10: ") and out[0] == "PCR-00: " + "0" * 64
    assert mnt.cli("pcrs", "--format", "evmctl", check=False).returncode == 2
    hexout = mnt.cli("pcrs").stdout.splitlines()
    assert len(hexout) == 48 and hexout[10].split()[:2] == ["sha1", "10"]


def test_concurrent_readers_see_whole_records(mnt):
    """Readers hammer every list while records are appended: each full read is a
    prefix of the final list made of whole records, and nothing is lost."""
    import threading
    names = ["ascii_runtime_measurements_sha1", "ascii_runtime_measurements_sha256",
             "binary_runtime_measurements_sha256", "binary_runtime_measurements_sha1"]
    seen: dict[str, list[bytes]] = {n: [] for n in names}
    errors = []
    stop = threading.Event()

    def reader(name):
        try:
            while not stop.is_set():
                with open(mnt.ima / name, "rb", buffering=0) as f:
                    parts = []
                    while chunk := f.read(65536):
                        parts.append(chunk)
                seen[name].append(b"".join(parts))
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(n,)) for n in names for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for _ in range(10):
            mnt.cli("generate", "--count", "700")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert int(mnt.read("runtime_measurements_count")) == 7001
    for name in names:
        final = mnt.read(name)
        size = 32 if "sha256" in name else 20
        if name.startswith("binary"):
            assert len(T.parse_binary_list(final, size)) == 7001
        else:
            assert final.count(b"\n") == 7001
        for snapshot in seen[name]:
            assert final.startswith(snapshot)
            if name.startswith("ascii"):
                assert snapshot.endswith(b"\n")
            else:
                T.parse_binary_list(snapshot, size)  # whole records only
