"""The daemon's life on a real mount: signals, a killed or stopped daemon,
what `imafs umount` and `imafs mount` make of what it left, and the files it
keeps in the runtime directory."""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import trio

from imafs import cli, daemon
from imafs.control import Client

from .conftest import imafs

NESTED = b'{"cmd":"status","x":' + b"[" * 100000 + b"]" * 100000 + b"}\n"


def _mountinfo_has(path) -> bool:
    """Whether anything is mounted at ``path`` (read from mountinfo: never asks the mount)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _alive(pid: int) -> bool:
    """The daemon is not our child: once dead it may stay a zombie nobody reaps."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_dead(pid: int, timeout: float) -> float:
    """Seconds until ``pid`` is dead; fails after ``timeout``."""
    t0 = time.monotonic()
    while _alive(pid):
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"pid {pid} still alive after {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def _runtime_files(runtime_dir) -> list[str]:
    return sorted(p.name for p in runtime_dir.iterdir())


def _wait_aborted(path) -> None:
    """Until the FUSE connection at ``path`` is aborted, which happens once
    the last thread of a killed daemon has let go of /dev/fuse (its main
    thread may be a zombie before): new requests then fail with ENOTCONN
    (`ls` says "Transport endpoint is not connected")."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.listdir(path)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                return
        assert time.monotonic() < deadline, f"{path} still answers"
        time.sleep(0.02)


def test_nested_json_line_answers_an_error(mnt):
    pid = mnt.client.call("status")["pid"]
    before = mnt.read("ascii_runtime_measurements")
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(mnt.client.path))
        s.sendall(NESTED)
        answer = s.makefile("rb").readline()
    assert answer == b'{"ok": false, "error": "malformed JSON request: nested too deeply"}\n'
    assert mnt.client.call("status")["pid"] == pid
    assert mnt.read("ascii_runtime_measurements") == before


def _hold_connection(m):
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(m.client.path))
    s.sendall(b'{"cmd": "sta')
    return s.close


def _cat_in_progress(m):
    """A `cat` of the list that has read its first chunk and waits to write
    the rest into a pipe nobody reads: the list stays open, mid-read."""
    m.cli("generate", "--count", 5000)
    r, w = os.pipe()
    cat = subprocess.Popen(["cat", str(m.ima / "ascii_runtime_measurements")], stdout=w)
    os.close(w)
    deadline = time.monotonic() + 10
    while not any("/integrity/ima/ascii_runtime_measurements" in os.readlink(f"/proc/{cat.pid}/fd/{fd}")
                  for fd in os.listdir(f"/proc/{cat.pid}/fd")):
        assert time.monotonic() < deadline, "cat did not open the list"
        time.sleep(0.02)

    def done():
        cat.kill()
        cat.wait(timeout=10)
        os.close(r)
    return done


@pytest.mark.parametrize("busy", [None, _hold_connection, _cat_in_progress],
                         ids=["idle", "client-connected", "cat-in-progress"])
def test_sigterm_stops_the_daemon(mount_imafs, runtime_dir, busy):
    m = mount_imafs()
    pid = m.client.call("status")["pid"]
    release = busy(m) if busy else None
    try:
        os.kill(pid, signal.SIGTERM)
        assert _wait_dead(pid, 10) < 5
    finally:
        if release:
            release()
    assert not _mountinfo_has(m.path)
    assert _runtime_files(runtime_dir) == []  # socket, log and kernel log: a clean end


def test_shutdown_answers_and_leaves_nothing(mount_imafs, runtime_dir, tmp_path):
    """`imafs umount` of a healthy daemon: the answer to `shutdown` arrives
    (no complaint), the mount goes, and so do the socket, the daemon's log and
    the kernel log beside it; a kernel log the profile names stays."""
    m = mount_imafs()
    with open(m.ima / "policy", "w") as f:
        f.write("measure func=BPRM_CHECK\n")  # the kernel logs the policy update
    assert {p.suffix for p in runtime_dir.iterdir()} == {".sock", ".log", ".kmsg"}
    r = imafs("umount", m.path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert not _mountinfo_has(m.path)
    assert _runtime_files(runtime_dir) == []

    kmsg = tmp_path / "my-kernel.log"
    m = mount_imafs(f"kernel_log={kmsg}")
    with open(m.ima / "policy", "w") as f:
        f.write("measure func=BPRM_CHECK\n")
    assert imafs("umount", m.path).returncode == 0
    assert b"policy update completed" in kmsg.read_bytes()
    assert _runtime_files(runtime_dir) == []


def test_kill_9_then_umount_clears_and_mount_works(mount_imafs, runtime_dir, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "a").write_text("a\n")
    m = mount_imafs(measure=[(src, dst)])
    pid = m.client.call("status")["pid"]
    sock = m.client.path
    os.kill(pid, signal.SIGKILL)
    _wait_dead(pid, 10)
    _wait_aborted(m.path)

    r = imafs("mount", m.path, check=False)
    assert r.returncode == 1
    assert r.stderr == (f"imafs: {m.path} is a dead imafs mount: its daemon is gone (ENOTCONN); "
                        f"`imafs umount {m.path}` removes it\n")

    r = imafs("umount", m.path, check=False)
    log, kmsg = sock.with_suffix(".log"), sock.with_suffix(".kmsg")
    assert (r.returncode, r.stderr) == (0, f"imafs: {m.path}: its daemon is gone (ENOTCONN); removed its "
                                           f"dead mount and its measured mounts at {dst}; its logs: {log}, "
                                           f"{kmsg}\n")
    assert not _mountinfo_has(m.path) and not _mountinfo_has(dst)
    assert not sock.exists() and log.exists() and kmsg.exists()  # the logs of a crash stay

    imafs("mount", m.path)
    assert Client(str(m.path), timeout=10).call("status")["pid"] != pid
    assert os.listdir(m.path) == ["integrity", "ima"]


def _devices_at(*points) -> set[str]:
    with open("/proc/self/mountinfo") as f:
        return {line.split()[2] for line in f if line.split()[4] in map(str, points)}


def _mounts_of(device: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[2] == device]


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.002, 0.004, 0.02])
def test_kill_9_while_binding_the_measured_mounts(runtime_dir, tmp_path, delay):
    """The measured mounts are bound from a second mount of the connection,
    made in a namespace of the binding thread: a daemon killed at any moment
    of it leaves no mount but the ones `imafs umount` clears."""
    src, dst, mp = tmp_path / "src", tmp_path / "dst", tmp_path / "mnt"
    for d in (src, dst, mp):
        d.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "imafs", "mount", "--foreground", mp, "--measure",
                          f"{src}:{dst}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not _devices_at(mp):
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.001)
        time.sleep(delay)
    finally:
        p.kill()
        p.wait()
    (device,) = _devices_at(mp)
    assert set(_mounts_of(device)) <= {str(mp), str(dst)}
    _wait_aborted(mp)
    imafs("umount", mp, check=False)
    assert _mounts_of(device) == []


def _binder_of(pid: int) -> int | None:
    """The daemon's child that makes its binds (``python -m imafs.binds``), if any."""
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rpartition(")")[2].split()[1]) != pid:
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"imafs.binds" in f.read():
                    return int(entry)
        except (OSError, ValueError):
            pass
    return None


def _wchans(pid: int) -> list[str]:
    """Where each thread of ``pid`` sleeps in the kernel."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                out.append(f.read())
    except OSError:
        pass
    return out


def test_daemon_killed_while_its_binder_waits_on_a_lookup(runtime_dir, tmp_path):
    """The binds are made by a child process whose lookups go through the
    daemon: the daemon stopped while the child waits on its answer (or has
    its answer from the dentry cache), then killed, aborts the connection
    (nobody else holds /dev/fuse): the child's lookup fails, the child ends,
    no mount is left but what `imafs umount` clears. (When a thread of the
    daemon looked the paths up, a daemon killed in that window kept its own
    /dev/fuse open through that thread, waiting for ever: a hung mount.)"""
    src, dst, mp = tmp_path / "src", tmp_path / "dst", tmp_path / "mnt"
    for d in (src, dst, mp):
        d.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "imafs", "mount", "--foreground", mp, "--measure",
                          f"{src}:{dst}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    binder = None
    try:
        deadline = time.monotonic() + 30
        while binder is None:
            assert time.monotonic() < deadline and p.poll() is None
            binder = _binder_of(p.pid)
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        # its lookups wait on the stopped daemon, or were answered from the dentry cache: it is done
        while "request_wait_answer" not in _wchans(binder) and _alive(binder):
            assert time.monotonic() < deadline, _wchans(binder)
            time.sleep(0.005)
    finally:
        p.kill()
        p.wait()
    _wait_aborted(mp)
    _wait_dead(binder, 10)
    (device,) = _devices_at(mp)
    assert set(_mounts_of(device)) <= {str(mp), str(dst)}
    imafs("umount", mp, check=False)
    assert _mounts_of(device) == []


def test_umount_of_a_stopped_daemon(mount_imafs):
    m = mount_imafs()
    pid = m.client.call("status")["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        r = imafs("mount", m.path, check=False)
        assert r.returncode == 1 and "its daemon does not answer" in r.stderr
        assert f"`imafs umount {m.path}` detaches it" in r.stderr
        t0 = time.monotonic()
        r = imafs("umount", m.path, check=False)
        assert time.monotonic() - t0 < 10
        assert r.returncode == 0
        assert r.stderr.startswith(f"imafs: {m.path}: its daemon does not answer (no answer from the "
                                   f"daemon at {m.client.path} within 5 s); detached it lazily")
        assert not _mountinfo_has(m.path)
        os.kill(pid, signal.SIGCONT)
        _wait_dead(pid, 10)  # it runs again, finds its mount gone (and a `shutdown` waiting): it ends
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            os.kill(pid, signal.SIGCONT)


def test_umount_of_nothing(tmp_path, runtime_dir):
    r = imafs("umount", tmp_path, check=False)
    assert r.returncode == 1 and r.stderr.startswith(f"imafs: no imafs mount at {tmp_path} (no imafs "
                                                     "daemon listens at ")


def test_a_failing_background_task_is_logged_and_started_again(monkeypatch, caplog):
    monkeypatch.setattr(daemon, "RESTART_DELAY", 0.01)
    runs = []

    async def task():
        runs.append(trio.current_time())
        if len(runs) < 3:
            raise RuntimeError(f"failure {len(runs)}")

    trio.run(daemon._supervised, "the test task", task)
    assert len(runs) == 3
    assert [(r.levelname, r.getMessage(), str(r.exc_info[1])) for r in caplog.records] == [
        ("ERROR", "the test task failed; it starts again in 0.01 s", f"failure {i}") for i in (1, 2)]


def test_mount_gives_up_on_a_daemon_that_never_says_ready(tmp_path, runtime_dir, monkeypatch, capsys):
    """`imafs mount` waits READY_TIMEOUT for its daemon (here a stand-in that
    never answers), then stops it and says so."""
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho $$ > {tmp_path}/pid\nexec sleep 60\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    monkeypatch.setattr(cli, "READY_TIMEOUT", 0.5)
    args = argparse.Namespace(mountpoint=str(tmp_path), profile=None, set=[], measure=[])
    t0 = time.monotonic()
    assert cli._spawn_daemon(args) == 1
    assert time.monotonic() - t0 < 10
    log = cli.socket_path(str(tmp_path)).with_suffix(".log")
    assert capsys.readouterr().err == (f"imafs: the daemon did not say it was mounted within 0.5 s; "
                                       f"stopped it; see {log}\n")
    assert not _alive(int((tmp_path / "pid").read_text()))
