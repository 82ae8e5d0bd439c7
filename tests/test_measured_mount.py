"""Real file activity through a measured mount (kernel-observed.md F-10, F-13…F-15).

Shell commands and system calls act on a ramfs re-exported at DST; the
expected lists are computed by hand: file digests with `sha256sum`, template
digests with struct and hashlib, not with imafs.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import struct
import subprocess
import sys

import pytest

from .test_evmctl import assert_matched, evmctl_replay

SETPRIV_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]


def sha256sum(content: bytes) -> str:
    out = subprocess.run(["sha256sum"], input=content, capture_output=True, check=True).stdout
    return out.split()[0].decode()


def ng_line(name: str, content: bytes | None, pcr: int = 10) -> str:
    """An ima-ng ASCII line; ``content`` None is a violation."""
    if content is None:
        return f"{pcr} {'0' * 40} ima-ng sha256:{'0' * 64} {name}"
    hexd = sha256sum(content)
    d_ng = b"sha256:\0" + bytes.fromhex(hexd)
    n_ng = name.encode() + b"\0"
    data = struct.pack("<I", len(d_ng)) + d_ng + struct.pack("<I", len(n_ng)) + n_ng
    return f"{pcr} {hashlib.sha1(data).hexdigest()} ima-ng sha256:{hexd} {name}"


def entries(m) -> list[str]:
    """The list after boot_aggregate."""
    return m.read("ascii_runtime_measurements", "r").splitlines()[1:]


def sh(script: str, cwd) -> None:
    r = subprocess.run(["sh", "-ec", script], cwd=cwd, timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.fixture
def measured(ramfs, mount_imafs):
    """Factory: (Mount, SRC, DST) with a ramfs measured at DST."""
    def make(*settings):
        src, dst = ramfs()
        return mount_imafs("ima_policy=tcb", *settings, measure=[(src, dst)]), src, dst
    return make


def test_f13_shell_scenario(measured, tmp_path):
    m, src, dst = measured()
    sh("""
        echo A > a.txt
        cat a.txt; cat a.txt            # measured once
        echo B > a.txt; cat a.txt       # the last writer's close: measured again
        echo A > a.txt; cat a.txt       # A again: the duplicate table keeps it out
        ln a.txt hard.txt; cat hard.txt
        mv a.txt moved.txt; cat moved.txt
        cp moved.txt copy.txt; cat copy.txt
        printf '#!/bin/sh\\necho hi\\n' > run.sh; chmod 755 run.sh; ./run.sh
        echo U > user.txt; chmod 644 user.txt
        setpriv --reuid 1000 --regid 1000 --clear-groups cat user.txt
        printf '#!/bin/sh\\n:\\n' > user.sh; chmod 755 user.sh
        setpriv --reuid 1000 --regid 1000 --clear-groups ./user.sh
        echo D > del.txt; exec 5>>del.txt; rm del.txt
        cat /proc/self/fd/5             # F-10: no " (deleted)"; a writer is open: open_writers
        exec 5>&-
    """, dst)
    d = str(dst)
    assert entries(m) == [
        ng_line(f"{d}/a.txt", b"A\n"),
        ng_line(f"{d}/a.txt", b"B\n"),
        ng_line(f"{d}/copy.txt", b"A\n"),
        ng_line(f"{d}/run.sh", b"#!/bin/sh\necho hi\n"),
        ng_line(f"{d}/user.sh", b"#!/bin/sh\n:\n"),
        ng_line(f"{d}/del.txt", None),
        ng_line(f"{d}/del.txt", b"D\n"),
    ]
    assert m.read("violations") == b"1\n"
    assert m.read("runtime_measurements_count") == b"8\n"
    klog = m.cli("dmesg").stdout
    with open("/proc/self/loginuid") as a, open("/proc/self/sessionid") as b:
        auid, ses = int(a.read()), int(b.read())  # what the shell inherited
    assert re.search(rf'audit: type=1804 audit\([0-9.:]+\): pid=\d+ uid=0 auid={auid} ses={ses} subj=unconfined '
                     rf'op=invalid_pcr cause=open_writers comm="cat" name="{d}/del.txt" dev="ramfs" '
                     r'ino=\d+ res=1 errno=0', klog), klog
    # the interpreter's read of run.sh was decided, and found measured already
    events = m.client.call("status")["last_events"]
    assert any(e["name"] == f"{d}/run.sh" and e["func"] == "BPRM_CHECK" and e["added"] for e in events)
    assert_matched(evmctl_replay(m, tmp_path, "--ignore-violations"))


def test_uid_1000_mmap_exec_is_an_explicit_event(measured):
    """FUSE cannot see mmap(PROT_EXEC): `imafs measure --func MMAP_CHECK` stands in (F-13)."""
    m, src, dst = measured()
    (dst / "lib.so").write_bytes(b"\x7fELF fake\n")
    subprocess.run([*SETPRIV_1000, "cat", str(dst / "lib.so")], check=True, capture_output=True)
    assert entries(m) == []
    r = m.cli("measure", dst / "lib.so", "--func", "MMAP_CHECK", "--mask", "MAY_EXEC",
              "--uid", "1000", "--euid", "1000", "--gid", "1000", "--egid", "1000")
    assert '"added": true' in r.stdout
    assert entries(m) == [ng_line(f"{dst}/lib.so", b"\x7fELF fake\n")]
    with open(dst / "lib.so", "rb") as f:  # root's read finds the inode measured
        f.read()
    assert len(entries(m)) == 1


def _open_close(path, flags=os.O_RDONLY):
    os.close(os.open(path, flags))


def f15_cases(dst) -> None:
    """The violation cases of kernel-observed.md F-15, with system calls."""
    # open_writers: one writer, then 2 readers
    f = dst / "ow.txt"
    f.write_bytes(b"ow\n")
    w = os.open(f, os.O_WRONLY | os.O_APPEND)
    _open_close(f)
    _open_close(f)
    os.close(w)
    # ToMToU: one reader, then 2 writers
    g = dst / "tomtou.txt"
    g.write_bytes(b"tt\n")
    r = os.open(g, os.O_RDONLY)
    _open_close(g, os.O_WRONLY)
    _open_close(g, os.O_WRONLY)
    os.close(r)
    # a new reader plus a writer
    h = dst / "new.txt"
    h.write_bytes(b"new\n")
    r = os.open(h, os.O_RDONLY)
    _open_close(h, os.O_WRONLY)
    os.close(r)
    # one shared writable mmap (its descriptor closed), then a read
    k = dst / "mapped.txt"
    k.write_bytes(b"mapped\n")
    fd = os.open(k, os.O_RDWR)
    mapping = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    _open_close(k)
    mapping.close()


@pytest.mark.parametrize("kernel, violations", [("6.12", 4), ("6.1", 6)])
def test_f15_violation_counts(measured, tmp_path, kernel, violations):
    m, src, dst = measured(f"kernel={kernel}")
    f15_cases(dst)
    assert int(m.read("violations")) == violations
    lines = entries(m)
    zero = [ln for ln in lines if ln.split()[1] == "0" * 40]
    assert len(zero) == violations
    d = str(dst)
    # each open_writers violation comes before the measurement of the same read
    assert lines[:2] == [ng_line(f"{d}/ow.txt", None), ng_line(f"{d}/ow.txt", b"ow\n")]
    causes = re.findall(r"cause=(\w+)", m.cli("dmesg").stdout)
    assert causes.count("ToMToU") == (1 if kernel == "6.12" else 2) + 1
    assert causes.count("open_writers") == violations - causes.count("ToMToU")
    assert_matched(evmctl_replay(m, tmp_path, "--ignore-violations"))


def test_violation_uses_default_template_and_pcr(measured, tmp_path):
    """F-14: even when the matching rule says pcr=11 template=ima-sig."""
    m, src, dst = measured("kernel=6.12", "write_policy=true")
    rule = "measure func=FILE_CHECK mask=^MAY_READ pcr=11 template=ima-sig\n"
    with open(m.ima / "policy", "w") as p:
        p.write(rule)
    f = dst / "v.txt"
    f.write_bytes(b"v\n")
    w = os.open(f, os.O_WRONLY)
    _open_close(f)
    os.close(w)
    lines = entries(m)
    assert lines[0] == ng_line(f"{dst}/v.txt", None)
    assert lines[1].startswith("11 ") and " ima-sig sha256:" in lines[1] and lines[1].endswith("/v.txt ")
    assert_matched(evmctl_replay(m, tmp_path, "--ignore-violations"))


def test_o_direct_records_zero_digest_then_real(measured):
    m, src, dst = measured()
    f = dst / "direct.txt"
    f.write_bytes(b"direct\n")
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    os.close(fd)
    _open_close(f)
    d = str(dst)
    zero_file = f"10 {{}} ima-ng sha256:{'0' * 64} {d}/direct.txt"
    lines = entries(m)
    assert len(lines) == 2
    assert lines[0] == zero_file.format(lines[0].split()[1]) and lines[0].split()[1] != "0" * 40
    assert lines[1] == ng_line(f"{d}/direct.txt", b"direct\n")


def test_passthrough_semantics(measured):
    """What happens under DST happens to SRC, with the caller's ownership."""
    m, src, dst = measured()
    sh("""
        mkdir -p d/e; echo x > d/e/f; ln -s e/f d/link; mkfifo d/fifo
        chmod 600 d/e/f; touch -d '2001-02-03 04:05:06' d/e/f
        mv d/e d/g; printf 'abc' >> d/g/f; truncate -s 2 d/g/f
    """, dst)
    assert (src / "d/g/f").read_bytes() == b"x\n"
    assert os.readlink(dst / "d/link") == "e/f"
    st = os.stat(src / "d/g/f")
    assert oct(st.st_mode & 0o777) == "0o600" and os.stat(dst / "d/g/f").st_mtime == st.st_mtime
    assert sorted(os.listdir(dst / "d")) == ["fifo", "g", "link"]
    (dst / "pub").mkdir()
    os.chmod(dst / "pub", 0o1777)
    subprocess.run([*SETPRIV_1000, "sh", "-c", f"cd {dst}/pub && mkdir u && echo u > u/file"], check=True)
    st = os.stat(src / "pub/u/file")
    assert (st.st_uid, st.st_gid) == (1000, 1000)
    r = subprocess.run([*SETPRIV_1000, "cat", str(dst / "d/g/f")], capture_output=True, text=True)
    assert r.returncode == 1 and "Permission denied" in r.stderr
    with pytest.raises(OSError) as e:
        os.rmdir(dst / "d")
    assert e.value.errno == 39  # ENOTEMPTY, from the real rmdir
    # the securityfs root does not list the name the bind mount was made from
    assert sorted(os.listdir(m.path)) == ["ima", "integrity"]


def ima_sig_line(name: str, content: bytes, xattr: bytes = b"", algo: str = "sha256") -> str:
    hexd = subprocess.run([f"{algo}sum"], input=content, capture_output=True, check=True).stdout.split()[0].decode()
    fields = [algo.encode() + b":\0" + bytes.fromhex(hexd), name.encode() + b"\0", xattr]
    data = b"".join(struct.pack("<I", len(x)) + x for x in fields)
    return f"10 {hashlib.sha1(data).hexdigest()} ima-sig {algo}:{hexd} {name} {xattr.hex()}"


def test_security_ima_decides_algorithm_and_sig(ramfs, mount_imafs):
    """On tmpfs (ramfs has no xattrs), with a policy that measures it."""
    src, dst = ramfs("tmpfs")
    m = mount_imafs("ima_template=ima-sig", measure=[(src, dst)])
    with open(m.ima / "policy", "w") as p:
        p.write("measure func=FILE_CHECK mask=^MAY_READ\n")
    digest_ng = b"\x04\x06" + bytes(64)  # IMA_XATTR_DIGEST_NG, sha512
    sigv2 = b"\x03\x02\x04" + b"\x01\x02\x03\x04" + b"\x00\x03" + b"sig"  # v2 signature, sha256
    for name, xattr in (("ng.txt", digest_ng), ("signed.txt", sigv2), ("plain.txt", None)):
        (src / name).write_bytes(name.encode())
        if xattr:
            os.setxattr(src / name, "security.ima", xattr)
        (dst / name).read_bytes()
    d = str(dst)
    assert entries(m) == [ima_sig_line(f"{d}/ng.txt", b"ng.txt", algo="sha512"),
                          ima_sig_line(f"{d}/signed.txt", b"signed.txt", sigv2),
                          ima_sig_line(f"{d}/plain.txt", b"plain.txt")]
    # setting security.ima through the mount measures the file again (IMA_CHANGE_XATTR)
    os.setxattr(dst / "plain.txt", "security.ima", digest_ng)
    assert os.getxattr(src / "plain.txt", "security.ima") == digest_ng
    (dst / "plain.txt").read_bytes()
    assert entries(m)[-1] == ima_sig_line(f"{d}/plain.txt", b"plain.txt", algo="sha512")
    os.removexattr(dst / "plain.txt", "security.ima")
    (dst / "plain.txt").read_bytes()
    assert len(entries(m)) == 4  # back to the sha256 entry already listed


def test_measure_option_errors(ramfs, mount_imafs, tmp_path):
    from .conftest import imafs
    src, dst = ramfs()
    mp = tmp_path / "mp"
    mp.mkdir()
    for spec, msg in ((f"{src}", "expected SRC:DST"), (f"{src}:{tmp_path}/nope", "DST"),
                      (f"{tmp_path}/nope:{dst}", "SRC"), (f"{src}:{mp}", "outside the mount point")):
        r = imafs("mount", mp, "--measure", spec, check=False)
        assert r.returncode == 1 and msg in r.stderr, r.stderr


STRESS_SECONDS = int(os.environ.get("IMAFS_STRESS_SECONDS", "60"))
WORKERS = {
    "reader": 'for f in f*.txt; do cat "$f" >/dev/null 2>&1; done',
    "writer": 'echo "$RANDOM" >> "f$((RANDOM % 40)).txt"; echo x > "f$((RANDOM % 40)).txt"',
    "exec": './s$((RANDOM % 8)).sh >/dev/null',
    "churn": 'n=$((RANDOM % 20)); cp "f$n.txt" "t$n" 2>/dev/null; mv "t$n" "u$n" 2>/dev/null; '
             'ln "u$n" "l$n" 2>/dev/null; cat "l$n" >/dev/null 2>&1; rm -f "u$n" "l$n"',
    "user": 'setpriv --reuid 1000 --regid 1000 --clear-groups sh -c '
            '\'cat f$((RANDOM % 40)).txt >/dev/null; ./s$((RANDOM % 8)).sh >/dev/null\'',
}


def test_concurrent_activity(measured, tmp_path):
    """Many processes read, write, execute, copy and rename under the mount."""
    m, src, dst = measured("iint_cache_size=32", "kernel=6.12")
    for i in range(40):
        (dst / f"f{i}.txt").write_text(f"file {i}\n")
        os.chmod(dst / f"f{i}.txt", 0o666)
    for i in range(8):
        (dst / f"s{i}.sh").write_text(f"#!/bin/sh\necho {i}\n")
        os.chmod(dst / f"s{i}.sh", 0o755)
    procs = [subprocess.Popen(["bash", "-c", f"while [ $SECONDS -lt {STRESS_SECONDS} ]; do {body}; done"],
                              cwd=dst, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for kind, body in WORKERS.items() for _ in range(2)]
    for p in procs:
        p.wait(timeout=STRESS_SECONDS + 120)
    status = m.client.call("status")
    cache = status["iint_cache"]
    assert cache["size"] <= 32 and cache["evictions"] > 0 and cache["hits"] > 0
    lines = m.read("ascii_runtime_measurements").splitlines()
    assert len(lines) == int(m.read("runtime_measurements_count")) > 40
    assert status["violations"] > 0
    assert_matched(evmctl_replay(m, tmp_path, "--ignore-violations"))
    # every open was closed again
    assert m.client.call("status")["iint_cache"]["open_inodes"] == 0


def test_policy_file_and_explicit_events_under_dst(measured):
    """The daemon reads files under DST from SRC (never through its own loop):
    a policy loaded from DST is measured (POLICY_CHECK) and `record --file` works."""
    m, src, dst = measured()
    policy = b"measure func=BPRM_CHECK\n"
    (dst / "p.policy").write_bytes(policy)
    with open(m.ima / "policy", "w") as p:
        p.write(f"{dst}/p.policy\n")
    assert entries(m) == [ng_line(f"{dst}/p.policy", policy)]
    m.cli("record", "--name", "/etc/copy", "--file", dst / "p.policy")
    assert entries(m)[-1] == ng_line("/etc/copy", policy)


def test_suspended_measurements_drop_records_not_opens(measured):
    """After `suspend` (kexec under way) opens still work; nothing is stored,
    and the inode stays unmeasured, so after a reboot it is measured again."""
    m, src, dst = measured()
    (dst / "late.txt").write_bytes(b"late\n")
    m.cli("suspend")
    assert (dst / "late.txt").read_bytes() == b"late\n"
    assert entries(m) == []
    m.cli("reboot")
    (dst / "late.txt").read_bytes()
    assert entries(m) == [ng_line(f"{dst}/late.txt", b"late\n")]



def _mount_lines(*points) -> dict[str, list[str]]:
    """The /proc/mounts lines (source, type) at each of ``points``, bottom to top."""
    found = {str(p): [] for p in points}
    with open("/proc/self/mounts") as f:
        for line in f:
            source, point, fstype = line.split()[:3]
            if point in found:
                found[point].append((source, fstype))
    return found


def test_dst_is_not_securityfs_and_umount_takes_it_away(ramfs, mount_imafs):
    """A measured mount is a bind of the emulator's filesystem, but not
    securityfs: /proc/mounts and findmnt show its source as imafs."""
    src, dst = ramfs()
    (src / "f").write_text("f\n")
    m = mount_imafs(measure=[(src, dst)])
    assert _mount_lines(m.path, dst) == {str(m.path): [("securityfs", "fuse.imafs")],
                                         str(dst): [("imafs", "fuse.imafs")]}
    r = subprocess.run(["findmnt", "-n", "-o", "SOURCE,FSTYPE", str(dst)], capture_output=True,
                       text=True, check=True)
    assert r.stdout.split() == ["imafs[/.imafs-measured-0]", "fuse.imafs"]  # findmnt's way with a bind
    assert (dst / "f").read_text() == "f\n"
    assert os.stat(dst).st_dev == os.stat(m.path).st_dev  # one filesystem
    subprocess.run([sys.executable, "-m", "imafs", "umount", str(m.path)], check=True, timeout=60)
    assert _mount_lines(m.path, dst) == {str(m.path): [], str(dst): []}


def test_nothing_of_the_second_mount_reaches_a_shared_host(tmp_path, mount_imafs):
    """systemd makes every mount shared: the second mount of the connection
    the binds come from, made in a thread's namespace, must not propagate
    back (the test's own namespace, made shared, stands for such a host).
    ``mount_imafs`` is asked for its checks (/dev/fuse, root) only."""
    src, dst, mp = tmp_path / "src", tmp_path / "dst", tmp_path / "mnt"
    for d in (src, dst, mp):
        d.mkdir()
    imafs = f"{sys.executable} -m imafs"
    script = (f"mount --make-rshared / && {imafs} mount {mp} --measure {src}:{dst} && "
              f"grep -E ' ({mp}|{dst}) ' /proc/self/mountinfo | cut -d' ' -f3-5,9; {imafs} umount {mp}")
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    (dev_mp, root_mp, point_mp, type_mp), (dev_dst, root_dst, point_dst, type_dst) = (
        line.split() for line in r.stdout.splitlines())
    assert (root_mp, point_mp, type_mp) == ("/", str(mp), "fuse.imafs")
    assert (dev_dst, root_dst, point_dst, type_dst) == (dev_mp, "/.imafs-measured-0", str(dst), "fuse.imafs")
