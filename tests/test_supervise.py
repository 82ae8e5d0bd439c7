"""The hooks FUSE cannot see, through seccomp user notification (issue 11, item 2).

Real programs under the filter (a small C program of system calls, uname,
keyctl, setpriv to uid 1000) act on a ramfs measured at DST; the expected
records are computed by hand with struct and hashlib.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imafs import supervise
from imafs.control import ControlError
from imafs.supervise import Outstanding, build_filter

from .conftest import REQUIRE_FUSE, fuse_unavailable, imafs
from .test_measured_mount import SETPRIV_1000, entries, ng_line

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def hookcalls(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("bin") / "hookcalls"
    subprocess.run(["gcc", "-O2", "-o", str(out), str(HERE / "hooks" / "hookcalls.c")], check=True)
    out.parent.chmod(0o755)
    return str(out)


@pytest.fixture
def measured(ramfs, mount_imafs):
    def make(*settings):
        src, dst = ramfs()
        return mount_imafs("ima_policy=tcb", *settings, measure=[(src, dst)], reachable=True), src, dst
    return make


def run(m, argv, timeout=30) -> subprocess.CompletedProcess:
    s = supervise.spawn([str(a) for a in argv], str(m.path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = s.process.communicate(timeout=timeout)
    s.wait(timeout)
    return subprocess.CompletedProcess(argv, s.process.returncode, out.decode(), err.decode())


def buf_line(name: str, buf: bytes, pcr: int = 10) -> str:
    """An ima-buf ASCII line, by hand."""
    d_ng = b"sha256:\0" + hashlib.sha256(buf).digest()
    n_ng = name.encode() + b"\0"
    data = (struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng
            + struct.pack("<I", len(buf)) + buf)
    return f"{pcr} {hashlib.sha1(data).hexdigest()} ima-buf sha256:{hashlib.sha256(buf).hexdigest()} {name} {buf.hex()}"


def write_policy(m, *rules: str) -> None:
    fd = os.open(m.ima / "policy", os.O_WRONLY)
    try:
        data = "".join(r + "\n" for r in rules).encode()
        while data:  # the kernel takes one rule per write
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


# -- plain objects ---------------------------------------------------------------------------
def test_filter_stops_only_exec_mappings_of_files(tmp_path):
    with open(tmp_path / "pfc", "w") as f:
        build_filter(no_new_privs=True).export_pfc(f)
    pfc = (tmp_path / "pfc").read_text()
    assert pfc.count("action 0x7fc00000;") == 8  # SECCOMP_RET_USER_NOTIF
    for name in ("mmap", "mprotect", "uname", "add_key", "request_key", "keyctl", "finit_module",
                 "kexec_file_load"):
        assert f"# filter for syscall \"{name}\"" in pfc
    assert "getpid" not in pfc


def test_outstanding_ids_cover_the_sweep():
    o = Outstanding()
    slot = o.take()
    o.put(slot, 41)
    ids = o.ids()
    assert 41 in ids and 42 in ids and 41 + supervise.SWEEP in ids
    o.release(slot)
    assert o.ids().count(41) == 1  # the last id only, from the sweep


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 2**64 - 1)), max_size=60))
def test_outstanding_tells_the_holder_every_id_being_answered(ops):
    """Whatever the order of receives and answers, the holder's ids hold
    every id still being answered, and the sweep after the last received."""
    o = Outstanding()
    busy: dict[int, int] = {}  # slot -> id
    last = 0
    for receive, nid in ops:
        if receive and len(busy) < supervise.SLOTS:
            slot = o.take()
            o.put(slot, nid)
            busy[slot], last = nid, nid
        elif busy:
            o.release(busy.popitem()[0])
        ids = set(o.ids())
        assert set(busy.values()) <= ids
        assert not last or {(last + k) % 2**64 for k in range(supervise.SWEEP + 1)} <= ids
    os.close(o.fd)


def test_connection_replaces_one_the_daemon_closed(tmp_path):
    """The daemon closes an idle connection with an error line: the next
    request goes on a new connection and gets its own answer."""
    path = str(tmp_path / "sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen()

    def serve():
        for k in range(2):
            conn, _ = srv.accept()
            with conn:
                conn.makefile("rb").readline()
                conn.sendall(json.dumps({"ok": True, "n": k}).encode() + b"\n")
                conn.sendall(b'{"ok": false, "error": "no whole request line within 60 s: closed"}\n')
    t = threading.Thread(target=serve)
    t.start()
    c = supervise.Connection(path, timeout=5)
    assert c.call("status")["n"] == 0
    time.sleep(0.2)
    assert c.call("status")["n"] == 1
    t.join()
    srv.close()
    with pytest.raises(supervise.ControlError):  # nobody listens any more
        c.call("status")


def test_connection_times_out_in_the_kernel(tmp_path):
    """A daemon that takes a request and never answers: the call fails with
    the time it waited, it does not hang (SO_RCVTIMEO)."""
    path = str(tmp_path / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen()
    c = supervise.Connection(path, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ControlError, match=r"no answer within 0.3 s"):
        c.call("status")
    assert 0.25 < time.monotonic() - t0 < 5
    srv.close()


@pytest.mark.parametrize("name", [b"a\\b", b"a\nb", b"plain name", b"\xff\tx"])
def test_task_comm_is_the_raw_comm(name):
    """status escapes a newline and a backslash of the comm; what is reported
    is the comm itself, as /proc/PID/comm has it."""
    p = subprocess.Popen(["python3", "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(15, sys.argv[1].encode("
                          "'utf-8', 'surrogateescape')); print(flush=True); sys.stdin.read()", os.fsdecode(name)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        p.stdout.readline()
        with open(f"/proc/{p.pid}/comm", "rb") as f:
            assert f.read() == name + b"\n"
        assert supervise._task(p.pid)["comm"] == name.decode(errors="replace")
    finally:
        p.kill()
        p.wait()


def test_bzimage_probe():
    head = bytearray(_bzimage()[:0x238])
    assert supervise._bzimage64(bytes(head))
    head[0x202] = 0
    assert not supervise._bzimage64(bytes(head))
    assert not supervise._bzimage64(b"\x7fELF")


# -- real programs under the filter -------------------------------------------------------------
def test_uid_1000_mmap_exec_is_measured(measured, hookcalls):
    """MMAP_CHECK with the task's credentials: tcb measures uid 1000's exec
    mapping, not its read (FILE_CHECK is for uid 0); once per inode."""
    m, src, dst = measured()
    content = b"\x7fELF a library\n" * 100
    (dst / "lib.so").write_bytes(content)
    r = run(m, [*SETPRIV_1000, hookcalls, "mmap", dst / "lib.so", 3])
    assert r.stdout == "ok\n", r.stderr
    assert entries(m) == [ng_line(f"{dst}/lib.so", content)]
    with open(dst / "lib.so", "rb") as f:  # root's read: the same iint, measured already
        f.read()
    assert len(entries(m)) == 1
    last = [e for e in m.client.call("status")["last_events"] if e["func"] == "MMAP_CHECK"]
    assert last and last[0]["added"]


def test_mmap_of_a_file_open_for_write_is_an_open_writers_violation(measured, hookcalls):
    """process_measurement checks violations for MMAP_CHECK as for
    FILE_CHECK: a measured mapping of a file someone has open for write."""
    m, src, dst = measured()
    (dst / "w.so").write_bytes(b"being written\n")
    w = os.open(dst / "w.so", os.O_WRONLY)  # root's write open: tcb does not measure it
    try:
        r = run(m, [*SETPRIV_1000, hookcalls, "mmap", dst / "w.so"])
    finally:
        os.close(w)
    assert r.stdout == "ok\n", r.stderr
    assert entries(m) == [ng_line(f"{dst}/w.so", None), ng_line(f"{dst}/w.so", b"being written\n")]
    audit = [line for line in m.cli("dmesg").stdout.splitlines() if "cause=open_writers" in line]
    assert len(audit) == 1 and ' uid=1000 ' in audit[0] and 'comm="hookcalls"' in audit[0], audit


def test_mmap_exec_outside_measured_mounts_and_mprotect_make_no_record(measured, hookcalls, tmp_path):
    """Libraries the loader maps from / are not the emulated kernel's files;
    mprotect(PROT_EXEC) never measures (ima_file_mprotect only audits or
    denies under an appraise rule)."""
    m, src, dst = measured()
    (dst / "data.bin").write_bytes(b"data\n")
    r = run(m, [*SETPRIV_1000, hookcalls, "mprotect", dst / "data.bin"])
    assert r.stdout == "ok\n", r.stderr
    r = run(m, [*SETPRIV_1000, hookcalls, "mmap", "/usr/bin/true"])
    assert r.stdout == "ok\n", r.stderr
    assert entries(m) == []


def test_executable_under_dst(measured, hookcalls):
    """An executable under DST: BPRM_CHECK (FUSE) and MMAP_CHECK of its own
    mapping are one iint, one record; the host's libc gives none."""
    m, src, dst = measured()
    exe = dst / "hookcalls"
    exe.write_bytes(Path(hookcalls).read_bytes())
    exe.chmod(0o755)
    r = run(m, [*SETPRIV_1000, exe, "loop", "1"])
    assert r.returncode == 0, r.stderr
    assert entries(m) == [ng_line(str(exe), exe.read_bytes())]


def test_uname_is_the_emulated_release(measured, hookcalls):
    m, src, dst = measured("uts_release=6.12.99-emulated")
    host = os.uname()
    assert run(m, ["uname", "-r"]).stdout == "6.12.99-emulated\n"
    assert run(m, ["uname", "-n"]).stdout == host.nodename + "\n"
    assert run(m, [*SETPRIV_1000, "/usr/bin/python3", "-c", "import os; print(os.uname().release)"]).stdout \
        == "6.12.99-emulated\n"
    assert run(m, ["uname", "-v"]).stdout == host.version + "\n"
    assert run(m, [hookcalls, "uname-bad"]).stdout == "errno=14\n"  # EFAULT, as the kernel


def test_finit_module_is_module_check(measured, hookcalls):
    """MODULE_CHECK (tcb measures it) of the file, then the host's call runs:
    this host has no modules (ENOSYS)."""
    m, src, dst = measured()
    module = b"\x7fELF not really a module\n"
    (dst / "m.ko").write_bytes(module)
    r = run(m, [hookcalls, "finit_module", dst / "m.ko"])
    assert r.stdout.startswith("errno="), r.stderr
    assert entries(m) == [ng_line(f"{dst}/m.ko", module)]
    # uid 1000 has no CAP_SYS_MODULE: EPERM before the file is read, no record
    # (the call then fails as the host has it)
    (dst / "n.ko").write_bytes(b"other\n")
    host = subprocess.run([*SETPRIV_1000, hookcalls, "finit_module", dst / "n.ko"], capture_output=True, text=True)
    assert run(m, [*SETPRIV_1000, hookcalls, "finit_module", dst / "n.ko"]).stdout == host.stdout
    assert len(entries(m)) == 1


def _bzimage() -> bytes:
    head = bytearray(4096)
    head[0x1FE:0x200] = b"\x55\xaa"
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = struct.pack("<H", 0x20F)
    head[0x211] = 1
    head[0x234] = 1
    head[0x236:0x238] = struct.pack("<H", 3)
    return bytes(head)


def test_kexec_file_load_records(measured, hookcalls):
    m, src, dst = measured()
    write_policy(m, "measure func=KEXEC_KERNEL_CHECK", "measure func=KEXEC_INITRAMFS_CHECK",
                 "measure func=KEXEC_CMDLINE")
    kernel, initrd = _bzimage(), b"initrd image\n"
    (dst / "vmlinuz").write_bytes(kernel)
    (dst / "initrd").write_bytes(initrd)
    r = run(m, [hookcalls, "kexec_file_load", dst / "vmlinuz", dst / "initrd", "root=/dev/vda ima_policy=tcb"])
    assert r.stdout.startswith("errno="), r.stderr  # the host has no kexec
    assert entries(m) == [ng_line(f"{dst}/vmlinuz", kernel), ng_line(f"{dst}/initrd", initrd),
                          buf_line("kexec-cmdline", b"root=/dev/vda ima_policy=tcb")]


def test_keyctl_padd_asymmetric_is_key_check(measured, tmp_path):
    """`keyctl padd asymmetric` of a DER certificate into a keyring a
    KEY_CHECK rule names: ima-buf, name = the keyring's description, buf =
    the payload; a keyring no rule names, a rule for another uid and a
    refused payload: nothing."""
    m, src, dst = measured()
    write_policy(m, "measure func=KEY_CHECK keyrings=imafs_ring",
                 "measure func=KEY_CHECK keyrings=user_ring uid=1000")
    ders = []
    for who in ("root", "user"):  # two certificates: the list keeps one record per template digest
        der = src.parent / f"{who}.der"  # where uid 1000 reaches it
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout",
                        str(tmp_path / "k"), "-subj", f"/CN=imafs {who}", "-days", "2", "-outform", "DER",
                        "-out", str(der)], check=True, capture_output=True)
        ders.append(der)
    for prefix, der in zip(([], SETPRIV_1000), ders):
        script = ('keyctl newring imafs_ring @s >/dev/null && keyctl newring other_ring @s >/dev/null && '
                  'keyctl newring user_ring @s >/dev/null && '
                  f'keyctl padd asymmetric "" %keyring:imafs_ring < {der} >/dev/null && '
                  f'keyctl padd asymmetric "" %keyring:user_ring < {der} >/dev/null && '
                  f'keyctl padd asymmetric "" %keyring:other_ring < {der} >/dev/null && '
                  '! echo garbage | keyctl padd asymmetric "" %keyring:imafs_ring 2>/dev/null')
        r = run(m, [*prefix, "keyctl", "session", "-", "sh", "-ec", script])
        assert r.returncode == 0, r.stderr
    root, user = (der.read_bytes() for der in ders)
    assert entries(m) == [buf_line("imafs_ring", root), buf_line("imafs_ring", user),
                          buf_line("user_ring", user)]  # uid=1000: the task's uid


def test_imafs_run_has_the_hooks(ramfs, hookcalls):
    """`imafs run`: the command and its children are under the filter."""
    if why := fuse_unavailable():
        if REQUIRE_FUSE:
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    src, dst = ramfs()
    (src / "lib.so").write_bytes(b"run lib\n")
    script = (f"setpriv --reuid 1000 --regid 1000 --clear-groups {hookcalls} mmap {dst}/lib.so && uname -r && "
              "tail -n 1 /sys/kernel/security/ima/ascii_runtime_measurements")
    r = imafs("run", "--set", "ima_policy=tcb", "--set", "uts_release=6.12.5-run", "--measure", f"{src}:{dst}",
              "--", "sh", "-ec", script, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["ok", "6.12.5-run", ng_line(f"{dst}/lib.so", b"run lib\n")]


def test_imafs_run_joining_a_mount_reports_the_task(measured, hookcalls):
    """`imafs run --mount MP`: the daemon is in the host's PID namespace, the
    command in the run's; the hook carries the task's credentials, so a
    `uid=1000` rule matches the uid-1000 task."""
    m, src, dst = measured()
    write_policy(m, "measure func=MMAP_CHECK uid=1000")
    (dst / "a.so").write_bytes(b"joined\n")
    (dst / "b.so").write_bytes(b"not 1000\n")
    r = imafs("run", "--mount", m.path, "--", "sh", "-ec",
              f"{' '.join(SETPRIV_1000)} {hookcalls} mmap {dst}/a.so && {hookcalls} mmap {dst}/b.so", check=False)
    assert r.returncode == 0 and r.stdout == "ok\nok\n", r.stderr
    assert entries(m) == [ng_line(f"{dst}/a.so", b"joined\n")]


def test_threads_map_at_once(measured):
    """Threads of one task stopped at once: each mapping is answered, each
    file measured once."""
    m, src, dst = measured()
    for i in range(8):
        (dst / f"lib{i}.so").write_bytes(b"lib %d\n" % i)
    prog = (
        "import mmap, sys, threading\n"
        "def work(i):\n"
        "    with open(f'{sys.argv[1]}/lib{i}.so', 'rb') as f:\n"
        "        for _ in range(30):\n"
        "            mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()\n"
        "ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
        "print('done')\n")
    r = run(m, [*SETPRIV_1000, "/usr/bin/python3", "-c", prog, dst])
    assert r.stdout == "done\n", r.stderr
    assert sorted(entries(m)) == sorted(ng_line(f"{dst}/lib{i}.so", b"lib %d\n" % i) for i in range(8))


class Mapper:
    """A uid-1000 task under the filter that maps a file executable each
    time it is told to, with a fresh open: one long-lived supervisor
    answers all of its calls."""

    PROG = ("import mmap, sys\n"
            "for path in sys.stdin:\n"
            "    with open(path.rstrip('\\n'), 'rb') as f:\n"
            "        mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ | mmap.PROT_EXEC).close()\n"
            "    print('ok', flush=True)\n")

    def __init__(self, m):
        self.s = supervise.spawn([*SETPRIV_1000, "/usr/bin/python3", "-c", self.PROG], str(m.path),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def map(self, path) -> None:
        self.s.process.stdin.write(f"{path}\n")
        self.s.process.stdin.flush()
        assert self.s.process.stdout.readline() == "ok\n"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """The task ends with its input; killed if the test failed first."""
        p = self.s.process
        if exc[0] is not None:
            p.kill()
        p.stdin.close()
        assert p.wait(30) == 0 or exc[0] is not None
        self.s.wait(30)


def mmap_events(m) -> int:
    return sum(e["func"] == "MMAP_CHECK" for e in m.client.call("status")["last_events"])


def test_quiet_mmap_answers_are_kept_until_something_changes(measured):
    """The supervisor keeps the daemon's quiet answer to an mmap (nothing
    recorded, logged or refused) while the hook epoch stands still, and asks
    again after each change the decision depends on: a policy update, a
    write through the mount, an owner change (fowner=), a reboot."""
    m, src, dst = measured("write_policy=true")
    lib = dst / "lib.so"
    lib.write_bytes(b"v1\n")
    write_policy(m, "measure func=FILE_CHECK mask=MAY_READ uid=0")  # no MMAP_CHECK rule yet
    with Mapper(m) as mapper:
        mapper.map(lib)
        asked = mmap_events(m)
        assert asked == 1 and entries(m) == []
        for _ in range(10):
            mapper.map(lib)
        assert mmap_events(m) == asked  # answered by the supervisor alone
        write_policy(m, "measure func=MMAP_CHECK mask=MAY_EXEC fowner=1000")
        mapper.map(lib)
        assert entries(m) == []  # root's file
        os.chown(lib, 1000, 1000)  # an owner change through the mount
        mapper.map(lib)
        mapper.map(lib)  # measured once, then quiet again
        assert entries(m) == [ng_line(str(lib), b"v1\n")]
        os.chown(lib, 0, 0)
        mapper.map(lib)  # no rule: quiet
        write_policy(m, "measure func=MMAP_CHECK mask=MAY_EXEC pcr=11")  # a policy update
        mapper.map(lib)
        assert entries(m)[1:] == [ng_line(str(lib), b"v1\n", pcr=11)]
        with open(lib, "r+b") as f:  # a write through the mount: the last writer's close resets the iint
            f.write(b"v2")
        mapper.map(lib)
        assert entries(m)[2:] == [ng_line(str(lib), b"v2\n", pcr=11)]
        m.cli("reboot")  # a new kernel: the tcb policy measures the mapping again
        mapper.map(lib)
        assert entries(m) == [ng_line(str(lib), b"v2\n")]
        assert mmap_events(m) > asked


# -- fail safe, hostile targets ------------------------------------------------------------------
def test_supervisor_killed_calls_continue(measured, hookcalls):
    m, src, dst = measured()
    (dst / "lib.so").write_bytes(b"lib\n")
    s = supervise.spawn([hookcalls, "mmap-loop", str(dst / "lib.so"), "20000"], str(m.path),
                        stdout=subprocess.PIPE)
    time.sleep(0.3)
    os.kill(s.supervisor, signal.SIGKILL)
    out, _ = s.process.communicate(timeout=60)
    assert out == b"ok\n"  # every mmap succeeded: none failed with ENOSYS
    assert s.wait(10) == 0
    assert os.WIFSIGNALED(s.helpers[s.supervisor]) and s.helpers[s.holder] == 0
    assert entries(m) == [ng_line(f"{dst}/lib.so", b"lib\n")]  # measured before the kill


def test_a_command_reading_a_pipe_sees_its_end(measured):
    """The helpers, forked beside the command, do not hold the write end of
    its input pipe: the command reads end of file when its parent closes it
    (before, both waited for each other forever)."""
    m, src, dst = measured()
    s = supervise.spawn(["cat"], str(m.path), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        out, _ = s.process.communicate(b"to the end\n", timeout=30)
    finally:
        s.process.kill()  # if it still waits: the helpers end with it
    assert out == b"to the end\n" and s.wait(30) == 0


def test_hostile_targets(measured, hookcalls):
    m, src, dst = measured()
    assert run(m, [hookcalls, "bogus-mmap"]).stdout == "errno=9\n"  # EBADF, as the host says
    (dst / "p.so").write_bytes(b"o_path\n")
    assert run(m, [*SETPRIV_1000, hookcalls, "mmap-opath", dst / "p.so"]).stdout == "errno=9\n"
    assert entries(m) == []  # EBADF comes before the hook
    assert run(m, [hookcalls, "add_key-bad"]).stdout == "errno=14\n"  # EFAULT
    assert run(m, [hookcalls, "add_key-huge"]).stdout == "errno=22\n"  # EINVAL
    write_policy(m, "measure func=KEXEC_KERNEL_CHECK", "measure func=KEXEC_CMDLINE")
    (dst / "vmlinuz").write_bytes(_bzimage())
    host = subprocess.run([hookcalls, "kexec-bad-cmdline", dst / "vmlinuz"], capture_output=True, text=True)
    assert run(m, [hookcalls, "kexec-bad-cmdline", dst / "vmlinuz"]).stdout == host.stdout
    assert entries(m) == [ng_line(f"{dst}/vmlinuz", _bzimage())]  # no kexec-cmdline: it cannot be read
    # a target killed while stopped: the supervisor goes on with the next
    s = supervise.spawn([hookcalls, "loop", "1000000"], str(m.path), stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    s.process.kill()
    s.wait(10)
    assert run(m, ["uname", "-r"]).stdout == "7.2.0-imafs\n"
    # bad control requests
    task = {"pid": 1, "comm": "x", "uid": 0, "euid": 0, "suid": 0, "gid": 0, "egid": 0, "sgid": 0,
            "cap_eff": 0, "auid": -1, "ses": -1}
    for args, error in ((dict(node=1, funcs=["BPRM_CHECK"]), "func must be"),
                        (dict(node=1, funcs=[{"a": 1}]), "func must be"),
                        (dict(node=5, funcs=["MMAP_CHECK"]), "no file"),
                        (dict(node=5, funcs=["MMAP_CHECK"], task={**task, "uid": "0"}), "task: give"),
                        (dict(node=5, funcs=["MMAP_CHECK"], task={**task, "extra": 1}), "task: give"),
                        (dict(node=5, funcs="MMAP_CHECK"), "funcs must be")):
        with pytest.raises(ControlError, match=error):
            m.client.call("hook", **{"task": task, "mask": 1, **args})
    assert run(m, ["uname", "-r"]).stdout == "7.2.0-imafs\n"  # the daemon and supervisor go on
