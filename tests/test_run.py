"""`imafs run`: unchanged programs inside the emulated kernel, checked with
the tools an agent uses (tpm2-tools, evmctl, dmesg, grep of the audit log),
and what a run leaves behind however it ends: nothing."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from imafs.profile import load_profile
from imafs.views import KMSG_WAITERS, audit_line, cmdline, kmsg_record

from .conftest import REQUIRE_FUSE, fuse_unavailable

SETPRIV_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]


@pytest.fixture
def fuse(runtime_dir):
    why = fuse_unavailable()
    if why:
        if REQUIRE_FUSE:
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    return runtime_dir


def imafs_run(*args, timeout=120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imafs", "run", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, **kw)


def shared_dir() -> Path:
    """A directory every uid can reach (pytest's are 0700)."""
    d = Path(tempfile.mkdtemp(prefix="imafs-run-", dir="/tmp"))
    d.chmod(0o755)
    return d


RUN_PATHS = ("/sys/kernel/security", "/proc", "/dev/kmsg", "/var/log", "/run/imafs", "/sys/class")


def host_mounts_of_a_run(*dsts: Path) -> list[str]:
    """Mounts of the host's namespace that a run makes in its own (other
    engineers' tests mount elsewhere at the same time: only these paths count)."""
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    own = [p for p in points if p.startswith(RUN_PATHS) and p not in ("/proc", "/sys/kernel/security")]
    return own + [p for p in points if p in map(str, dsts) or p == "/sys/kernel/security"]


def pid_ns_members(ns: str) -> list[int]:
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == ns:
                    out.append(int(p))
            except OSError:
                pass
    return out


# -- plain objects ------------------------------------------------------------------------
def test_cmdline_shows_the_boot_parameters_the_profile_sets():
    p = load_profile(None, ["ima_policy=tcb|critical_data", "ima_template=ima-sig", "uts_release=6.12.9-x"])
    assert cmdline(p) == (b"BOOT_IMAGE=/boot/vmlinuz-6.12.9-x root=/dev/vda1 ro "
                          b"ima_policy=tcb|critical_data ima_template=ima-sig\n")
    assert cmdline(load_profile(None, ["ima_canonical_fmt=true", "ima_hash=sha512"])) == \
        b"BOOT_IMAGE=/boot/vmlinuz-7.2.0-imafs root=/dev/vda1 ro ima_hash=sha512 ima_canonical_fmt\n"


def test_kmsg_and_audit_records_from_kernel_log_lines():
    audit = (b"[    1.000250] audit: type=1804 audit(1700000000.123:7): pid=1 uid=0 auid=4294967295 "
             b"ses=4294967295 subj=unconfined op=invalid_pcr cause=open_writers comm=\"cat\" "
             b"name=\"/m/f\" dev=\"fuse\" ino=2 res=1 errno=0")
    assert kmsg_record(3, audit) == b"5,3,1000250,-;" + audit[15:] + b"\n"
    assert audit_line(audit) == (b"type=INTEGRITY_PCR msg=audit(1700000000.123:7): " + audit.split(b"): ", 1)[1]
                                 + b"\n")
    info = b"[   12.000001] ima: No architecture policies found"
    assert kmsg_record(0, info) == b"6,0,12000001,-;ima: No architecture policies found\n"
    assert audit_line(info) is None
    assert audit_line(b"[    0.000001] audit: type=1300 audit(1.000:1): x") == b"type=UNKNOWN[1300] msg=audit(1.000:1): x\n"


@given(st.binary(max_size=200))
def test_any_log_line_gives_a_record_or_nothing(line):
    rec = kmsg_record(0, line)
    assert rec is None or (rec.endswith(b"\n") and b";" in rec)
    out = audit_line(line)
    assert out is None or out.startswith(b"type=")


# -- exit status, signals, terminal ---------------------------------------------------------
def test_exit_status_and_stdio_pass_through(fuse, tmp_path):
    r = imafs_run("--", "sh", "-c", "read x; echo got $x; echo err >&2; exit 3", input="hello\n")
    assert (r.returncode, r.stdout, r.stderr) == (3, "got hello\n", "err\n")
    assert imafs_run("--", "sh", "-c", "kill -TERM $$").returncode == 128 + signal.SIGTERM
    r = imafs_run("--", "no-such-command-xyz")
    assert r.returncode == 127 and "no-such-command-xyz: command not found" in r.stderr
    (tmp_path / "data").write_text("not a program\n")
    r = imafs_run("--", tmp_path / "data")
    assert r.returncode == 126 and "Permission denied" in r.stderr


def test_sigterm_to_imafs_run_reaches_the_command(fuse, tmp_path):
    ready = tmp_path / "ready"
    p = subprocess.Popen([sys.executable, "-m", "imafs", "run", "--", "sh", "-c",
                          f"trap 'exit 7' TERM; touch {ready}; while :; do sleep 0.05; done"])
    deadline = time.monotonic() + 30
    while not ready.exists():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=30) == 7


def test_bad_input_is_refused_before_anything_runs(fuse, tmp_path):
    r = imafs_run("--set", "ima_policy=nope", "--", "true")
    assert r.returncode == 125 and "bad profile: ima_policy" in r.stderr
    r = imafs_run("--measure", f"{tmp_path}/missing:{tmp_path}", "--", "true")
    assert r.returncode == 125 and "does not exist" in r.stderr
    r = imafs_run("--measure", f"{tmp_path}:{tmp_path}", "--", "true")  # the daemon would wait on itself
    assert r.returncode == 125 and "must not contain each other" in r.stderr
    r = imafs_run("--mount", tmp_path, "--", "true")
    assert r.returncode == 125 and "no imafs mount there" in r.stderr
    r = imafs_run("--mount", tmp_path, "--set", "kernel=6.1", "--", "true")
    assert r.returncode == 2 and "--mount joins a running emulator" in r.stderr
    assert imafs_run().returncode == 2
    r = subprocess.run([*SETPRIV_1000, sys.executable, "-m", "imafs", "run", "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (125, "imafs run: unshare(CLONE_NEWPID): Operation not permitted "
                                             "(imafs run needs root)\n")


# -- what the command sees -----------------------------------------------------------------
def test_the_emulator_is_the_first_securityfs_and_the_kernel_views_are_its(fuse, mount_imafs):
    host = mount_imafs()  # an imafs mount of the host: not a securityfs inside the run
    r = imafs_run("--set", "ima_policy=tcb", "--set", "uts_release=6.12.1-emu", "--", "sh", "-c",
                  "grep ^securityfs /proc/mounts; echo ---; cat /proc/cmdline /proc/sys/kernel/osrelease; "
                  "echo $IMAFS_UTS_RELEASE; imafs_status=$(python3 -c 'import sys' && echo ok); "
                  f"{sys.executable} -m imafs status --mount /sys/kernel/security >/dev/null && echo status-ok; "
                  "cat /sys/kernel/security/ima/runtime_measurements_count; ls /run/imafs")
    assert r.returncode == 0, r.stderr
    mounts, rest = r.stdout.split("---\n")
    first = mounts.splitlines()[0].split()
    assert first[:3] == ["securityfs", "/sys/kernel/security", "fuse.imafs"]
    assert str(host.path) not in mounts
    lines = rest.splitlines()
    assert lines[0] == "BOOT_IMAGE=/boot/vmlinuz-6.12.1-emu root=/dev/vda1 ro ima_policy=tcb"
    assert lines[1:5] == ["6.12.1-emu", "6.12.1-emu", "status-ok", "1"]
    assert any(n.endswith(".sock") for n in lines[5:])
    host.cli("status")  # the host's mount serves on


def test_the_kernels_own_securityfs_is_hidden(fuse):
    """A host whose /sys/kernel/security is the real securityfs (here in a
    private namespace, made for the test): inside the run only the emulator is."""
    inner = f"{sys.executable} -m imafs run -- grep securityfs /proc/mounts"
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount --make-rprivate / && "
                        "mount -t securityfs securityfs /sys/kernel/security && " + inner],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    types = {line.split()[2] for line in r.stdout.splitlines()}
    assert types == {"fuse.imafs"} and r.stdout.startswith("securityfs /sys/kernel/security fuse.imafs ")


def test_uid_1000_in_a_run_gets_the_kernel_modes(fuse):
    r = imafs_run("--", *SETPRIV_1000, "sh", "-c",
                  "cat /proc/cmdline >/dev/null && echo cmdline-ok; "
                  "cat /sys/kernel/security/ima/ascii_runtime_measurements; echo rc=$?; "
                  "echo x > /sys/kernel/security/ima/policy; echo rc=$?")
    assert r.returncode == 0
    assert r.stdout.splitlines() == ["cmdline-ok", "rc=1", "rc=2"], r.stdout  # sh: 2 for a redirection
    assert "Permission denied" in r.stderr


AGENT = r"""
set -eu
dst=$1; t=$2
sfs=$(grep ^securityfs /proc/mounts | head -1 | cut -d' ' -f2)
grep -q ima_policy=tcb /proc/cmdline
[ "$(cat /sys/class/tpm/tpm0/tpm_version_major)" = 2 ]
cat "$dst/app.conf" >/dev/null                     # measured: tcb, root reads
exec 3>>"$dst/log.txt"; cat "$dst/log.txt" >/dev/null; exec 3>&-   # open_writers violation
grep " $dst/app.conf\$" "$sfs/ima/ascii_runtime_measurements" > "$t/app.line"
tpm2_createek -c "$t/ek.ctx" -G rsa -u "$t/ek.pub" >/dev/null
tpm2_flushcontext -t
tpm2_createak -C "$t/ek.ctx" -c "$t/ak.ctx" -G rsa -g sha256 -s rsassa -u "$t/ak.pem" -f pem -n "$t/ak.name" >/dev/null
tpm2_flushcontext -t; tpm2_flushcontext -s
nonce=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
tpm2_quote -c "$t/ak.ctx" -l sha256:10 -q "$nonce" -g sha256 -m "$t/q.msg" -s "$t/q.sig" -o "$t/q.pcrs" >/dev/null
tpm2_checkquote -u "$t/ak.pem" -m "$t/q.msg" -s "$t/q.sig" -f "$t/q.pcrs" -q "$nonce" -g sha256 >/dev/null
tpm2_pcrread sha256:10 | grep -io '0x[0-9a-f]*' | cut -c3- > "$t/pcr10.tpm2"
cat /sys/class/tpm/tpm0/pcr-sha256/10 > "$t/pcr10.sysfs"
tsspcrread -halg sha256 -ha 10 -ns > "$t/pcr10.tss"
evmctl ima_measurement --ignore-violations "$sfs/ima/binary_runtime_measurements" > "$t/evmctl.out" 2>&1
grep cause=open_writers /var/log/audit/audit.log > "$t/audit"
dmesg | grep cause=open_writers > "$t/dmesg"
uname -r > "$t/uname"
echo agent-ok
"""


def test_an_agent_script_runs_unchanged(fuse, tmp_path):
    base = shared_dir()
    try:
        src, dst, t = base / "src", base / "dst", tmp_path
        src.mkdir()
        dst.mkdir()
        (src / "app.conf").write_text("setting = 1\n")
        (src / "log.txt").write_text("log\n")
        (t / "agent.sh").write_text(AGENT)
        r = imafs_run("--set", "tpm=swtpm", "--set", "ima_policy=tcb", "--measure", f"{src}:{dst}",
                      "--", "sh", t / "agent.sh", dst, t)
        assert r.returncode == 0 and r.stdout == "agent-ok\n", r.stdout + r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=False)
    # the record names the file and carries its digest, computed here by hand
    fields = (t / "app.line").read_text().split()
    assert fields[:2] == ["10", fields[1]] and fields[2] == "ima-ng"
    assert fields[3] == "sha256:" + hashlib.sha256(b"setting = 1\n").hexdigest()
    # the TPM, its sysfs view and the IBM TSS agree; evmctl replays the list to it
    tpm2 = (t / "pcr10.tpm2").read_text().strip().upper()
    assert (t / "pcr10.sysfs").read_text() == tpm2 + "\n"
    assert (t / "pcr10.tss").read_text().split()[0].upper() == tpm2
    assert "Matched per TPM bank calculated digest(s)." in (t / "evmctl.out").read_text()
    for log in ("audit", "dmesg"):
        text = (t / log).read_text()
        assert f'name="{dst}/log.txt"' in text and "op=invalid_pcr" in text, (log, text)
    assert (t / "audit").read_text().startswith("type=INTEGRITY_PCR msg=audit(")
    assert (t / "uname").read_text() == "7.2.0-imafs\n"  # the seccomp hook of uname(2)


def test_join_a_running_emulator_and_leave_it_running(fuse, mount_imafs, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "x").write_text("x\n")
    m = mount_imafs("ima_policy=tcb", measure=[(src, dst)])
    m.cli("record", "--name", "from-the-host", "--digest", "sha256:" + "ab" * 32)
    r = imafs_run("--mount", m.path, "--", "sh", "-c",
                  "grep ^securityfs /proc/mounts | cut -d' ' -f2; "
                  f"cat {dst}/x >/dev/null; "
                  "grep -c from-the-host /sys/kernel/security/ima/ascii_runtime_measurements; "
                  f"{sys.executable} -m imafs record --mount /sys/kernel/security --name from-the-run "
                  "--digest sha256:" + "cd" * 32)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["/sys/kernel/security", "1"]  # the only securityfs
    listed = m.read("ascii_runtime_measurements")
    assert b"from-the-run" in listed and f" {dst}/x\n".encode() in listed
    m.cli("status")


VIEWS = ("/proc/cmdline", "/proc/sys/kernel/osrelease", "/dev/kmsg", "/var/log/audit/audit.log")


@pytest.mark.parametrize("how", ["new", "swtpm", "join"])
def test_the_emulator_is_the_only_securityfs(fuse, mount_imafs, tmp_path, how):
    """Tools take the first securityfs line of /proc/mounts: inside a run
    there is one, the emulator; its measured mounts and the kernel views are
    binds of the same filesystem whose source is imafs."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "x").write_text("x\n")
    (tmp_path / "hsrc").mkdir()
    (tmp_path / "hdst").mkdir()
    host = mount_imafs(measure=[(tmp_path / "hsrc", tmp_path / "hdst")])  # another emulator: gone in the run
    script = "cat /proc/mounts; echo ---; findmnt -n -o SOURCE /sys/kernel/security; cat " + str(dst / "x")
    if how == "join":
        m = mount_imafs(measure=[(src, dst)])
        r = imafs_run("--mount", m.path, "--", "sh", "-c", script)
    else:
        r = imafs_run(*(["--set", "tpm=swtpm"] if how == "swtpm" else []), "--measure", f"{src}:{dst}",
                      "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    mounts, rest = r.stdout.split("---\n")
    lines = [line.split() for line in mounts.splitlines()]
    assert [(li[0], li[1], li[2]) for li in lines if li[0] == "securityfs"] == [
        ("securityfs", "/sys/kernel/security", "fuse.imafs")]
    assert rest == "securityfs\nx\n"
    imafs_points = {li[1]: li[0] for li in lines if li[2] == "fuse.imafs"}
    expected = {*VIEWS, str(dst)} | ({"/sys/class/tpm"} if how == "swtpm" else set())
    assert imafs_points == {"/sys/kernel/security": "securityfs", **{p: "imafs" for p in expected}}
    assert str(host.path) not in mounts and str(tmp_path / "hdst") not in mounts
    host.cli("status")


# -- nothing left behind --------------------------------------------------------------------
def test_two_runs_at_once_never_see_each_other(fuse, tmp_path):
    def start(name, other):
        script = (f"{sys.executable} -m imafs record --mount /sys/kernel/security --name {name} "
                  f"--digest sha256:{'ab' * 32} && touch {tmp_path}/{name} && "
                  f"while [ ! -e {tmp_path}/{other} ]; do sleep 0.05; done; "
                  "cat /sys/kernel/security/ima/ascii_runtime_measurements")
        return subprocess.Popen([sys.executable, "-m", "imafs", "run", "--", "sh", "-c", script],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a, b = start("run-a", "run-b"), start("run-b", "run-a")
    out_a, err_a = a.communicate(timeout=120)
    out_b, err_b = b.communicate(timeout=120)
    assert a.returncode == b.returncode == 0, err_a + err_b
    assert "run-a" in out_a and "run-b" not in out_a
    assert "run-b" in out_b and "run-a" not in out_b


@pytest.mark.parametrize("moment", [0.0, 0.15, 0.4, "started"])
def test_sigkill_at_any_moment_leaves_nothing(fuse, tmp_path, moment):
    base = shared_dir()
    (base / "src").mkdir()
    (base / "dst").mkdir()
    before = host_mounts_of_a_run(base / "dst")
    marker = tmp_path / "started"
    p = subprocess.Popen([sys.executable, "-m", "imafs", "run", "--set", "tpm=swtpm",
                          "--measure", f"{base}/src:{base}/dst", "--", "sh", "-c",
                          f"touch {marker}; sleep 1000"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ns = None
        deadline = time.monotonic() + 60
        while ns is None or ns == os.readlink("/proc/self/ns/pid"):
            try:  # ENOENT between the unshare and the namespace's first process
                ns = os.readlink(f"/proc/{p.pid}/ns/pid_for_children")
            except FileNotFoundError:
                pass
            assert time.monotonic() < deadline and p.poll() is None
        if moment == "started":
            while not marker.exists():
                assert time.monotonic() < deadline and p.poll() is None
                time.sleep(0.02)
        else:
            time.sleep(moment)
    finally:
        p.kill()
        p.wait()
    while pid_ns_members(ns):  # the kernel kills the namespace's processes as its init goes
        assert time.monotonic() < deadline, pid_ns_members(ns)
        time.sleep(0.02)
    assert host_mounts_of_a_run(base / "dst") == before == []
    assert not fuse.exists() or not any(fuse.iterdir())  # the test's IMAFS_RUNTIME_DIR
    os.rmdir(base / "src")
    os.rmdir(base / "dst")
    os.rmdir(base)


def _fuse_holder(pids: list[int]) -> int | None:
    """The process among ``pids`` that holds /dev/fuse: the run's daemon."""
    for pid in pids:
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/fuse" for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:
            pass
    return None


def _mounts_of(device: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line.split()[4] for line in f if line.split()[2] == device]


@pytest.mark.parametrize("delay", [0.0, 0.003, 0.01, 0.03])
def test_the_runs_daemon_killed_while_the_run_binds(fuse, tmp_path, delay):
    """The daemon dies while the init binds the views from a copy of its
    /dev/fuse: the copy is closed before any lookup, so the lookups fail
    (the connection aborts) instead of waiting for ever; the run ends and
    leaves nothing."""
    base = shared_dir()
    (base / "src").mkdir()
    (base / "dst").mkdir()
    p = subprocess.Popen([sys.executable, "-m", "imafs", "run", "--measure", f"{base}/src:{base}/dst", "--",
                          "true"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ns, daemon = None, None
        deadline = time.monotonic() + 60
        while ns is None or ns == os.readlink("/proc/self/ns/pid"):
            try:
                ns = os.readlink(f"/proc/{p.pid}/ns/pid_for_children")
            except FileNotFoundError:
                pass
            assert time.monotonic() < deadline and p.poll() is None
        while daemon is None:
            daemon = _fuse_holder(pid_ns_members(ns))
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read()
        time.sleep(delay)
        try:
            os.kill(daemon, signal.SIGKILL)
        except ProcessLookupError:  # the run has ended already
            pass
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
        p.wait()
    assert "Traceback" not in err, err  # whatever the moment: a clean end (CMD may not even start)
    while pid_ns_members(ns):
        assert time.monotonic() < deadline, pid_ns_members(ns)
        time.sleep(0.02)
    assert host_mounts_of_a_run(base / "dst") == []
    os.rmdir(base / "src")
    os.rmdir(base / "dst")
    os.rmdir(base)


@pytest.mark.parametrize("delay", [0.1, 0.15, 0.2, 0.25])
def test_a_joined_daemon_killed_while_the_run_binds(fuse, mount_imafs, tmp_path, delay):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    m = mount_imafs(measure=[(src, dst)])
    pid = m.client.call("status")["pid"]
    with open("/proc/self/mountinfo") as f:
        device = next(line.split()[2] for line in f if line.split()[4] == str(m.path))
    p = subprocess.Popen([sys.executable, "-m", "imafs", "run", "--mount", m.path, "--", "true"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        err = p.communicate(timeout=60)[1]
    finally:
        p.kill()
        p.wait()
    assert "Traceback" not in err, err  # whatever the moment: a clean end (CMD may not even start)
    assert sorted(_mounts_of(device)) == sorted([str(m.path), str(dst)])  # the dead daemon's own
    r = subprocess.run([sys.executable, "-m", "imafs", "umount", m.path], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert _mounts_of(device) == [] and host_mounts_of_a_run(dst) == []


def test_uid_1000_cannot_take_a_daemons_fuse_descriptor(fuse, mount_imafs):
    """Binding from a second mount of the connection needs a copy of the
    daemon's /dev/fuse (which serves or hijacks the filesystem): uid 1000
    gets none, and `imafs run --mount` as uid 1000 fails as any run does."""
    m = mount_imafs(reachable=True)
    pid = m.client.call("status")["pid"]
    from imafs.binds import fuse_descriptor
    number = fuse_descriptor(pid)
    probe = ("import errno, os, sys; sys.path.insert(0, sys.argv[3]); from imafs.binds import FuseDaemon\n"
             "d = FuseDaemon(os.pidfd_open(int(sys.argv[1])), int(sys.argv[2]))\n"
             "try:\n    d.copy()\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n")
    r = subprocess.run([*SETPRIV_1000, sys.executable, "-c", probe, str(pid), str(number),
                        str(Path(__file__).resolve().parents[1])], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout) == (0, "EPERM\n"), r.stderr
    r = subprocess.run([*SETPRIV_1000, sys.executable, "-m", "imafs", "run", "--mount", m.path, "--", "true"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (125, "imafs run: unshare(CLONE_NEWPID): Operation not permitted "
                                             "(imafs run needs root)\n")
    m.cli("status")


# -- the views, driven on a mount -----------------------------------------------------------
def test_views_are_hidden_read_only_and_kmsg_reads_one_record_at_a_time(mount_imafs):
    m = mount_imafs("ima_policy=tcb", "kernel=6.12", reachable=True)
    views = m.path / ".imafs-kernel"
    assert ".imafs-kernel" not in os.listdir(m.path)
    assert sorted(os.listdir(views)) == ["audit.log", "cmdline", "kmsg", "osrelease"]  # soft PCRs: no tpm
    assert (views / "cmdline").read_bytes() == \
        b"BOOT_IMAGE=/boot/vmlinuz-6.12.0-imafs root=/dev/vda1 ro ima_policy=tcb\n"
    with pytest.raises(OSError) as e:
        with open(views / "cmdline", "wb") as f:
            f.write(b"x")
    assert e.value.errno == 22  # EINVAL: no write method
    fd = os.open(views / "kmsg", os.O_RDONLY | os.O_NONBLOCK)
    try:
        with pytest.raises(OSError) as e:
            os.read(fd, 8)  # a record does not fit: EINVAL, and the record stays
        assert e.value.errno == 22
        records = []
        while True:
            try:
                records.append(os.read(fd, 8192))
            except BlockingIOError:
                break
    finally:
        os.close(fd)
    assert records[0].startswith(b"6,0,") and records[0].endswith(b"\n") and len(records) >= 2
    assert all(r.count(b"\n") == 1 for r in records)
    # uid 1000: the log and cmdline are readable, audit.log (0600) is not, nothing is writable
    r = subprocess.run([*SETPRIV_1000, "sh", "-c", f"cat {views}/cmdline >/dev/null && echo ok; "
                        f"cat {views}/audit.log; echo x > {views}/kmsg"], capture_output=True, text=True)
    assert r.stdout == "ok\n" and r.stderr.count("Permission denied") == 2, r.stderr


def test_blocking_kmsg_readers_wait_for_records_and_never_stall_the_daemon(mount_imafs):
    m = mount_imafs(reachable=True)
    kmsg = m.path / ".imafs-kernel" / "kmsg"
    reader = ("import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\n"
              "while True:\n    sys.stdout.buffer.write(os.read(fd, 8192)); sys.stdout.flush()\n")
    procs = [subprocess.Popen([*SETPRIV_1000, sys.executable, "-c", reader, str(kmsg)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(40)]
    try:
        # every reader reads the log; KMSG_WAITERS wait, the others get EAGAIN and end (40
        # interpreters starting on a slow machine may take seconds)
        deadline = time.monotonic() + 120
        while len(waiting := [p for p in procs if p.poll() is None]) > KMSG_WAITERS:
            assert time.monotonic() < deadline, f"{len(waiting)} readers still running"
            time.sleep(0.05)
        time.sleep(0.5)
        assert len([p for p in procs if p.poll() is None]) == KMSG_WAITERS
        assert all(b"BlockingIOError" in p.stderr.read() for p in procs if p not in waiting)
        t = time.monotonic()
        m.cli("status")
        assert m.read("runtime_measurements_count") == b"1\n"
        assert time.monotonic() - t < 10
        subprocess.run(["sh", "-c", "echo bogus > policy"], cwd=m.ima, capture_output=True)
        for p in waiting:  # each waiting reader gets the new records
            line = p.stdout.readline()
            while b"policy update failed" not in line:
                line = p.stdout.readline()
                assert line, p.stderr.read()
    finally:
        for p in procs:  # a killed reader's wait ends (EINTR), it does not wait for a record
            p.kill()
            p.wait(timeout=10)
    m.cli("status")
