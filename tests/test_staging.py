"""The staging ABI of Linux 7.2 through the mount (staging.md §1–§3)."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from imafs import templates as T
from imafs.staging import parse_command
from imafs.errors import FsError

from .test_evmctl import assert_matched


def sh(cmd: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], cwd=cwd, capture_output=True, text=True)


def write(path, data: bytes, flags=os.O_WRONLY) -> int:
    """One open + write + close; returns the errno of the write, or 0."""
    fd = os.open(path, flags)
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def records(m, name="binary_runtime_measurements_sha1"):
    return T.parse_binary_list(m.read(name), 20)


def test_worked_example(mnt):
    """staging.md §1.7, with the shell."""
    mnt.cli("generate", "--count", "9")
    before = mnt.read("ascii_runtime_measurements")
    assert sh("echo A > ascii_runtime_measurements_staged", mnt.ima).returncode == 0
    assert mnt.read("ascii_runtime_measurements_staged") == before
    assert mnt.read("ascii_runtime_measurements") == b""
    assert mnt.read("runtime_measurements_count") == b"0\n"
    mnt.cli("record", "--name", "/r11", "--digest", "sha256:" + "11" * 32)
    mnt.cli("record", "--name", "/r12", "--digest", "sha256:" + "12" * 32)
    assert mnt.read("runtime_measurements_count") == b"2\n"
    assert sh("cat binary_runtime_measurements_sha256_staged > /dev/null && echo D > binary_runtime_measurements_sha256_staged",
              mnt.ima).returncode == 0
    assert mnt.read("ascii_runtime_measurements_staged") == b""
    assert mnt.read("runtime_measurements_count") == b"2\n"
    r = sh("echo 1 > ascii_runtime_measurements", mnt.ima)
    assert r.returncode == 0, r.stderr
    lines = mnt.read("ascii_runtime_measurements_sha256").splitlines()
    assert len(lines) == 1 and lines[0].endswith(b" /r12")
    assert mnt.read("runtime_measurements_count") == b"1\n"
    st = mnt.client.call("status")["counters"]
    assert st["BINARY"]["records"] == 1 and st["BINARY_STAGED"]["records"] == 0
    assert st["BINARY_FULL"]["records"] == 12


@pytest.mark.parametrize("data,staged,err", [
    (b"\n", True, errno.EINVAL), (b"A", True, errno.EINVAL), (b"A\r\n", True, errno.EINVAL),
    (b"1" * 21 + b"\n", False, errno.EINVAL), (b"A\n", False, errno.EINVAL),
    (b"D\n", False, errno.EINVAL), (b"5\n", True, errno.EINVAL), (b"0\n", False, errno.EINVAL),
    (b"-1\n", False, errno.EINVAL), (b" 5\n", False, errno.EINVAL), (b"0x5\n", False, errno.EINVAL),
    (b"abc\n", False, errno.EINVAL), (b"5 \n", False, errno.EINVAL),
    (b"18446744073709551616\n", False, errno.ERANGE), (b"99999999999999999999\n", False, errno.ERANGE),
])
def test_parse_errors(data, staged, err):
    with pytest.raises(FsError) as e:
        parse_command(data, staged, "v7", False)
    assert e.value.errno == err


def test_parse_accepts_kstrtoul_forms():
    assert parse_command(b"+3\n", False, "v7", False) == 3
    assert parse_command(b"003\n", False, "v7", False) == 3
    assert parse_command(b"3\n\n", False, "v7", False) == 3
    assert parse_command(b"18446744073709551615\n", False, "v7", False) == 2**64 - 1
    # the kernel parses the buffer as a C string, so a NUL ends the number
    assert parse_command(b"3\0junk\n", False, "v7", False) == 3
    assert parse_command(b"3\n\0\n", False, "v7", False) == 3
    with pytest.raises(FsError):
        parse_command(b"\x003\n", False, "v7", False)
    assert parse_command(b"A\n", False, "v5", False) == "A"
    with pytest.raises(FsError):
        parse_command(b"A\n", True, "v5", False)
    with pytest.raises(FsError):
        parse_command(b"3\n", False, "v7", True)  # ima_flush_htable


def test_command_errnos(mnt):
    ima = mnt.ima
    staged, orig = ima / "ascii_runtime_measurements_staged", ima / "binary_runtime_measurements_sha256"
    assert write(staged, b"D\n") == errno.ENOENT          # nothing staged
    assert write(orig, b"2\n") == errno.ENOENT            # only boot_aggregate
    assert write(orig, b"18446744073709551616\n") == errno.ERANGE
    assert write(staged, b"A\n") == 0
    assert write(staged, b"A\n") == errno.EEXIST          # already staged
    assert write(ima / "binary_runtime_measurements_sha1_staged", b"D\n") == 0
    assert write(staged, b"A\n") == errno.ENOENT          # current list empty
    assert write(ima / "runtime_measurements_count", b"1\n") == errno.EINVAL
    mnt.cli("generate", "--count", "3")
    assert write(staged, b"A\n") == 0
    mnt.cli("generate", "--count", "3")
    mnt.cli("suspend")
    assert write(staged, b"D\n") == errno.ESTALE
    assert write(orig, b"1\n") == errno.ESTALE
    r = mnt.cli("record", "--name", "/late", "--digest", "sha256:" + "00" * 32, check=False)
    assert r.returncode == 1 and "suspended" in r.stderr
    assert write(ima / "ascii_runtime_measurements_sha1_staged", b"D\n") == errno.ESTALE
    # A needs an empty staged list to get as far as the suspension check
    mnt.cli("reboot")
    mnt.cli("suspend")
    assert write(staged, b"A\n") == errno.EACCES


def test_write_offset_ignored_and_full_length_returned(mnt):
    mnt.cli("generate", "--count", "5")
    fd = os.open(mnt.ima / "ascii_runtime_measurements", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.pwrite(fd, b"2\n", 100) == 2
    finally:
        os.close(fd)
    assert mnt.read("runtime_measurements_count") == b"4\n"


def test_open_mediation(mnt):
    ima = mnt.ima
    reader = os.open(ima / "ascii_runtime_measurements", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.open(ima / "binary_runtime_measurements_sha256_staged", os.O_WRONLY)
        assert e.value.errno == errno.EBUSY                    # a reader exists
        os.close(os.open(ima / "binary_runtime_measurements_sha256", os.O_RDONLY))  # readers share
        os.close(os.open(ima / "runtime_measurements_count", os.O_RDONLY))  # not under the lock
    finally:
        os.close(reader)
    w = os.open(ima / "ascii_runtime_measurements_staged", os.O_WRONLY)
    try:
        w2 = os.open(ima / "binary_runtime_measurements_sha256", os.O_RDWR)  # the writer's own
        os.close(w2)
        with pytest.raises(OSError) as e:
            os.open(ima / "ascii_runtime_measurements", os.O_RDONLY)  # the writer reading
        assert e.value.errno == errno.EBUSY
        for flags in ("os.O_RDONLY", "os.O_WRONLY"):   # another process
            r = subprocess.run([sys.executable, "-c",
                                f"import os; os.open({str(ima / 'ascii_runtime_measurements')!r}, {flags})"],
                               capture_output=True, text=True)
            assert "Device or resource busy" in r.stderr, flags
    finally:
        os.close(w)
    os.close(os.open(ima / "ascii_runtime_measurements", os.O_RDONLY))  # free again


def test_write_open_needs_cap_sys_admin(mnt):
    code = (f"import os\ntry:\n os.open({str(mnt.ima / 'ascii_runtime_measurements_staged')!r}, os.O_WRONLY)\n"
            "except OSError as e:\n print(e.errno)\nelse:\n print(0)")
    r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                        sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == str(errno.EPERM), r.stderr
    r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin",
                        "cat", str(mnt.ima / "ascii_runtime_measurements")], capture_output=True)
    assert r.returncode == 0 and r.stdout.startswith(b"10 ")   # reading needs no capability


def test_staging_off_below_72(mount_imafs):
    m = mount_imafs("kernel=6.12")
    assert not any(n.endswith("_staged") for n in os.listdir(m.ima))
    assert write(m.ima / "ascii_runtime_measurements_sha1", b"1\n") == errno.EINVAL


def test_v5_layout(mount_imafs):
    m = mount_imafs("abi=v5")
    m.cli("generate", "--count", "4")
    assert write(m.ima / "ascii_runtime_measurements_staged", b"A\n") == errno.EINVAL
    assert write(m.ima / "ascii_runtime_measurements", b"A\n") == 0
    assert int(m.read("runtime_measurements_count")) == 0
    fd = os.open(m.ima / "ascii_runtime_measurements_staged", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pwrite(fd, b"D\n", 3)
        assert e.value.errno == errno.EINVAL               # v5: no partial writes
        assert os.write(fd, b"D\n") == 2
    finally:
        os.close(fd)


def test_duplicates_survive_delete_unless_flushed(mount_imafs):
    for flush, expect in ((False, 0), (True, 1)):
        m = mount_imafs(f"ima_flush_htable={str(flush).lower()}")
        args = ("record", "--name", "/bin/x", "--digest", "sha256:" + "42" * 32)
        m.cli(*args)
        assert write(m.ima / "ascii_runtime_measurements_staged", b"A\n") == 0
        assert write(m.ima / "ascii_runtime_measurements_staged", b"D\n") == 0
        m.cli(*args)
        assert int(m.read("runtime_measurements_count")) == expect
        if flush:
            assert write(m.ima / "ascii_runtime_measurements", b"1\n") == errno.EINVAL


def test_saved_chunks_plus_current_replay(mnt, tmp_path):
    """What a keeper saves (staged chunks, trimmed heads) concatenated with the
    current list is the whole log: evmctl matches it against the PCRs."""
    saved = []
    mnt.cli("generate", "--count", "50")
    for cycle in range(3):
        assert write(mnt.ima / "binary_runtime_measurements_staged", b"A\n") == 0
        saved.append(mnt.read("binary_runtime_measurements_staged"))
        assert write(mnt.ima / "binary_runtime_measurements_staged", b"D\n") == 0
        mnt.cli("generate", "--count", "40")
        mnt.cli("record", "--name", f"/v{cycle}", "--violation")
        head = records(mnt)[:7]
        saved.append(b"".join(T.binary_record(p, d, t, f) for p, d, t, f in head))
        assert write(mnt.ima / "binary_runtime_measurements", b"7\n") == 0
    whole = tmp_path / "whole.bin"
    whole.write_bytes(b"".join(saved) + mnt.read("binary_runtime_measurements"))
    assert len(T.parse_binary_list(whole.read_bytes(), 20)) == 51 + 3 * 41
    args = ["evmctl", "-v", "ima_measurement", "--ignore-violations"]
    for bank in ("sha1", "sha256"):
        args += ["--pcrs", f"{bank},{mnt.pcr_file(bank, tmp_path)}"]
    assert_matched(subprocess.run(args + [str(whole)], capture_output=True, text=True))


def test_kexec_carries_staged_then_current(mnt, tmp_path):
    mnt.cli("generate", "--count", "20")
    assert write(mnt.ima / "ascii_runtime_measurements_staged", b"A\n") == 0
    staged = records(mnt, "binary_runtime_measurements_staged")
    mnt.cli("generate", "--count", "5")
    mnt.cli("record", "--name", "/v", "--violation")
    current = records(mnt)
    dump = tmp_path / "kexec.bin"
    mnt.cli("kexec", "--dump", dump)
    after = records(mnt)
    assert after[:-1] == staged + current
    assert after[-1][3][1] == b"boot_aggregate\0"
    assert mnt.read("binary_runtime_measurements_staged") == b""
    st = mnt.client.call("status")
    assert st["violations"] == 0 and st["counters"]["BINARY_FULL"]["records"] == len(after)
    buf = dump.read_bytes()
    assert buf[:2] == b"\1\0" and int.from_bytes(buf[8:16], "little") == len(buf)
    assert int.from_bytes(buf[16:24], "little") == len(staged) + len(current)
    # PCRs are not reset by kexec: the whole list still replays to them
    args = ["evmctl", "-v", "ima_measurement", "--ignore-violations"]
    for bank in ("sha1", "sha256"):
        args += ["--pcrs", f"{bank},{mnt.pcr_file(bank, tmp_path)}"]
    assert_matched(subprocess.run(args + [str(mnt.ima / "binary_runtime_measurements")],
                                  capture_output=True, text=True))
    # the buffer boots another machine the same way
    m2 = mnt.__class__(mnt.path)
    m2.cli("reboot")
    m2.cli("boot", "--kexec-buffer", dump)
    assert records(m2)[:-1] == staged + current
    bad = tmp_path / "bad.bin"
    bad.write_bytes(buf[:-3])
    r = m2.cli("boot", "--kexec-buffer", bad, check=False)
    assert r.returncode == 1 and "kexec buffer" in r.stderr


def test_reboot(mnt):
    mnt.cli("generate", "--count", "5")
    mnt.cli("reboot")
    assert mnt.read("runtime_measurements_count") == b"1\n"
    pcrs = mnt.client.call("pcrs", bank="sha1")["pcrs"]["sha1"]
    boot = records(mnt)[0]
    assert pcrs[10] == T.hash_bytes("sha1", bytes(20) + boot[1]).hex()


def test_n_while_staged_is_accepted(mnt):
    """staging.md §6 item 3: the kernel does not forbid mixing the flavours."""
    mnt.cli("generate", "--count", "3")
    assert write(mnt.ima / "ascii_runtime_measurements_staged", b"A\n") == 0
    mnt.cli("generate", "--count", "3")
    assert write(mnt.ima / "ascii_runtime_measurements", b"2\n") == 0
    assert int(mnt.read("runtime_measurements_count")) == 1
    assert len(records(mnt, "binary_runtime_measurements_staged")) == 4


def test_kexec_critical_data_records(mount_imafs, tmp_path):
    """kernel-abi.md §4.3/§6.2: with `ima_policy=critical_data`, kernel_version at
    boot and, from 6.16, kexec_load and kexec_execute (label ima_kexec)."""
    m = mount_imafs("ima_policy=critical_data", "uts_release=6.12.117+deb12-amd64")
    lines = m.read("ascii_runtime_measurements").decode().splitlines()
    assert lines[1].split(" ")[2:] == ["ima-buf", lines[1].split(" ")[3], "kernel_version",
                                      "362e31322e3131372b64656231322d616d643634"]  # F-12
    m.cli("generate", "--count", "4")
    m.cli("kexec", "--load-only")
    load = m.read("ascii_runtime_measurements").decode().splitlines()[-1].split(" ")
    assert load[4] == "kexec_load"
    text = bytes.fromhex(load[5]).decode()
    assert text.startswith("kexec_segment_size=") and "ima_runtime_measurements_count=6;" in text
    m.cli("kexec")
    names = [line.split(" ")[4] for line in m.read("ascii_runtime_measurements").decode().splitlines()]
    assert names[-4:] == ["kexec_load", "kexec_execute", "boot_aggregate", "kernel_version"]
    plain = mount_imafs()
    plain.cli("kexec")
    assert [line.split(" ")[4] for line in plain.read("ascii_runtime_measurements").decode().splitlines()] \
        == ["boot_aggregate", "boot_aggregate"]


def test_deleted_records_are_freed_in_the_background(mnt):
    import time
    mnt.cli("generate", "--count", "5000")
    assert write(mnt.ima / "ascii_runtime_measurements_staged", b"A\n") == 0
    mnt.read("ascii_runtime_measurements_sha256_staged")  # rendered blocks to drop too
    assert write(mnt.ima / "ascii_runtime_measurements_staged", b"D\n") == 0
    assert write(mnt.ima / "ascii_runtime_measurements", b"1\n") == errno.ENOENT  # empty list
    for _ in range(100):
        if mnt.client.call("status")["blocks_to_free"] == 0:
            break
        time.sleep(0.05)
    assert mnt.client.call("status")["blocks_to_free"] == 0
