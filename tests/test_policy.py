"""The policy grammar (F-7, R-2) and the `policy` file (F-5, F-6, F-8, R-1..R-5)."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from hypothesis import given, settings, strategies as st

from imafs.blocking import run_inline
from imafs.errors import FsError
from imafs.klog import KernelLog, Subject
from imafs.policy import Parser, PolicyFile, builtin_rules

from .test_klog import session_lines

V612, V61, V72 = (6, 12), (6, 1), (7, 2)

# kernel-observed.md F-7, accepted on 6.12
ACCEPTED = [
    "measure func=BPRM_CHECK mask=MAY_EXEC pcr=9 template=ima-ng",
    "measure template=ima-ng func=BPRM_CHECK mask=MAY_EXEC pcr=9",
    "measure func=MMAP_CHECK_REQPROT",
    "measure func=FILE_CHECK mask=^MAY_READ euid=0",
    "measure gid=0", "measure fowner>1000", "measure uid<1000", "measure fgroup=0 egid=0",
    "measure func=KEY_CHECK keyrings=.ima|.evm",
    "measure func=CRITICAL_DATA", "measure func=CRITICAL_DATA label=selinux",
    "measure template=ima", "measure template=d-ng|n-ng",
    "measure pcr=63", "measure pcr=10 pcr=11",
    "measure mask=MAY_APPEND", "measure fsmagic=0x01021994", "measure fsname=ext4",
    "measure fsuuid=0e8e1c2b-3b3a-4a4e-9a1e-5c6d7e8f9a0b",
    "hash", "dont_hash", "audit", "measure",
    "measure  func=BPRM_CHECK", "\tmeasure func=BPRM_CHECK", "measure func=BPRM_CHECK\t",
    "measure func=BPRM_CHECK ",
    "appraise func=BPRM_CHECK appraise_type=imasig", "appraise digest_type=verity appraise_type=sigv3",
    "appraise func=BPRM_CHECK appraise_algos=sha256,sha512",
    "appraise func=BPRM_CHECK appraise_flag=check_blacklist",
    "measure func=BPRM_CHECK digest_type=verity", "appraise func=BPRM_CHECK permit_directio",
    "measure func=KEXEC_KERNEL_CHECK", "measure func=KEXEC_INITRAMFS_CHECK", "measure func=KEXEC_CMDLINE",
    "measure func=POLICY_CHECK", "measure func=PATH_CHECK", "measure func=FILE_MMAP",
    "measure func=CREDS_CHECK", "measure func=MODULE_CHECK", "measure func=FIRMWARE_CHECK",
    "appraise func=SETXATTR_CHECK appraise_algos=sha256", "appraise fowner=0",
    "dont_appraise fsmagic=0x858458f6",
]
REFUSED = [
    "measure func=KEY_CHECK keyrings=.ima||.evm", "measure template=nope",
    "measure template=ima-ng template=ima-ng", "measure pcr=64", "dont_measure pcr=9",
    "appraise func=BPRM_CHECK pcr=9", "measure func=BPRM_CHECK func=FILE_CHECK",
    "measure dont_measure", "func=BPRM_CHECK", "measure func=NOPE", "measure mask=MAY_NOPE",
    "measure fsmagic=zz", "measure fsuuid=bad", "measure keyrings=.ima", "dont_audit",
    "measure fs_subtype=foo", "measure func=BPRM_CHECK # x", "measure func=BPRM_CHECK\r",
    "MEASURE", "measure FUNC=BPRM_CHECK", "measure func=bprm_check",
    "measure uid=abc", "measure uid=4294967295", "measure uid=-1",
    "measure subj_role=foo", "measure subj_type=foo", "measure obj_user=foo",
    "appraise func=BPRM_CHECK appraise_type=imasig|modsig", "appraise func=BPRM_CHECK appraise_type=sigv3",
    "appraise func=BPRM_CHECK appraise_algos=sha256,bogus", "measure func=BPRM_CHECK appraise_type=imasig",
    "measure func=SETXATTR_CHECK",
]


@pytest.mark.parametrize("rule", ACCEPTED)
def test_f7_accepted_612(rule):
    assert Parser(V612).parse(rule, lsm_rejected=True) is not None


@pytest.mark.parametrize("rule", REFUSED)
def test_f7_refused_612(rule):
    with pytest.raises(FsError) as e:
        Parser(V612).parse(rule, lsm_rejected=True)
    assert e.value.errno == errno.EINVAL


@pytest.mark.parametrize("rule", ["measure func=MMAP_CHECK_REQPROT",
                                  "appraise func=BPRM_CHECK appraise_algos=sha256,sha512",
                                  "appraise func=BPRM_CHECK appraise_flag=check_blacklist"])
def test_f7_61_differs_in_three_rules(rule):
    with pytest.raises(FsError):
        Parser(V61).parse(rule, lsm_rejected=True)


def test_later_kernels():
    p = Parser(V72)
    assert p.parse("measure func=BPRM_CHECK # a comment", True).func == "BPRM_CHECK"
    assert p.parse("appraise func=BPRM_CHECK appraise_type=sigv3", True).appraise_type == "sigv3"
    assert p.parse("dont_audit", True).action == "dont_audit"  # 6.19+
    assert p.parse("measure fs_subtype=imafs", True).render() == "measure fs_subtype=imafs \n"


def test_comments_and_blank_lines():
    for line in ("", "   ", "\t", "# comment", "   # indented comment"):
        assert Parser(V612).parse(line, True) is None


def test_lsm_rules_inert_after_first_load():
    r = Parser(V612).parse("measure subj_type=foo", lsm_rejected=False)
    assert r.inert


@pytest.mark.parametrize("written,printed", [
    ("measure template=ima-ng func=BPRM_CHECK", "measure func=BPRM_CHECK template=ima-ng \n"),
    ("measure fgroup=0 egid=0", "measure egid=0 fgroup=0 \n"),
    ("appraise digest_type=verity appraise_type=sigv3", "appraise appraise_type=sigv3 digest_type=verity \n"),
    ("measure fsmagic=0x01021994", "measure fsmagic=0x1021994 \n"),
    ("measure pcr=10 pcr=11", "measure pcr=11 \n"),
    ("measure func=PATH_CHECK", "measure func=FILE_CHECK \n"),
    ("measure func=FILE_MMAP", "measure func=MMAP_CHECK \n"),
    ("measure template=d-ng|n-ng", "measure template=ima-ng \n"),
    ("appraise func=FILE_CHECK appraise_flag=check_blacklist", "appraise func=FILE_CHECK \n"),
    ("measure", "measure \n"),
    ("measure pcr=9 template=ima func=BPRM_CHECK", "measure func=BPRM_CHECK pcr=9 template=ima \n"),
    ("measure fsuuid=0E8E1C2B-3B3A-4A4E-9A1E-5C6D7E8F9A0B", "measure fsuuid=0e8e1c2b-3b3a-4a4e-9a1e-5c6d7e8f9a0b \n"),
    ("\tmeasure  mask=^MAY_READ\t uid<1000 ", "measure mask=^MAY_READ uid<1000 \n"),
    ("appraise appraise_algos=sha512,sha256", "appraise appraise_algos=sha256,sha512 \n"),
])
def test_r2_print_format(written, printed):
    assert Parser(V612).parse(written, True).render() == printed


def test_r1_builtin_tcb_612():
    text = "".join(r.render() for r in builtin_rules("tcb", V612))
    assert text.count("\n") == 20 and len(text) == 672
    assert "dont_measure fsmagic=0x1021994 \n" in text
    assert text.endswith("measure func=MODULE_CHECK \nmeasure func=FIRMWARE_CHECK \nmeasure func=POLICY_CHECK \n")


def test_builtin_tcb_714_and_combinations():
    tcb = "".join(r.render() for r in builtin_rules("tcb", V72))
    assert "dont_measure func=FILE_CHECK fsmagic=0x1021994 \n" in tcb
    combo = builtin_rules("critical_data|appraise_tcb|secure_boot|tcb", V612)
    actions = [r.render() for r in combo]
    assert actions[19] == "measure func=POLICY_CHECK \n"
    assert actions[20] == "appraise func=MODULE_CHECK appraise_type=imasig \n"
    assert actions[24].startswith("dont_appraise fsmagic=0x9fa0")
    assert actions[28] == "dont_appraise fsmagic=0x858458f6 \n"
    assert actions[-3:] == ["appraise func=POLICY_CHECK appraise_type=imasig \n", "appraise fowner=0 \n",
                            "measure func=CRITICAL_DATA \n"]


names = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=500, deadline=None)
@given(names)
def test_fuzz_parser_never_crashes(line):
    try:
        rule = Parser(V72).parse(line, lsm_rejected=True)
    except FsError as e:
        assert e.errno == errno.EINVAL
    else:
        if rule is not None:  # what prints parses back to the same rule
            assert Parser(V72).parse(rule.render().rstrip("\n"), True) == rule


# -- through the mount --------------------------------------------------------------------
def opn(path, flags):
    try:
        return os.open(path, flags)
    except OSError as e:
        return -e.errno


def test_f5_open_rules_and_removal(mnt):
    pol = mnt.ima / "policy"
    assert opn(pol, os.O_RDONLY) == -errno.EACCES and opn(pol, os.O_RDWR) == -errno.EACCES
    fd = os.open(pol, os.O_WRONLY | os.O_TRUNC)
    assert opn(pol, os.O_WRONLY | os.O_APPEND) == -errno.EBUSY
    os.write(fd, b"measure func=BPRM_CHECK\n")
    os.close(fd)
    assert opn(pol, os.O_WRONLY) == -errno.ENOENT
    assert not os.path.exists(pol) and "policy" not in os.listdir(mnt.ima)


@pytest.mark.parametrize("data,ret", [
    (b"measure func=BPRM_CHECK\n", 24),
    (b"measure func=BPRM_CHECK\nmeasure func=FILE_CHECK\n", 24),
    (b"\nmeasure func=BPRM_CHECK\n", 1),
    (b"measure func=BPRM_CHECK\0junk\n", 24),
    (b"measure func=BPRM_CHECK", 23),                  # the kernel says 24 (docs/deviations.md)
    (b"measure func=BPRM_CHECK " + b" " * 4975, 4095),  # capped; the kernel says 4096
    (b"measure" + b" " * 20 + b"\n" + b"x" * 4972, 28),
])
def test_f6_write_returns(mnt, data, ret):
    fd = os.open(mnt.ima / "policy", os.O_WRONLY)
    try:
        assert os.write(fd, data) == ret
    finally:
        os.close(fd)


# One descriptor on `policy` of a real 6.12 kernel (F-6), call by call: write()
# or pwrite() at an offset, or lseek() then write(); what imafs returns
# (negative: an errno), and where the kernel differs (docs/deviations.md).
ONE_DESCRIPTOR = [
    ("write", None, b"measure func=BPRM_CHECK\nmeasure func=FILE_CHECK\n", 24),
    ("write", None, b"measure func=MODULE_CHECK", 25),  # the kernel: 26
    ("pwrite", 5, b"measure\n", -errno.EINVAL),
    ("pwrite", 0, b"measure\n", 8),
    ("write", None, b"measure func=FIRMWARE_CHECK".ljust(5000), 4095),  # the kernel: 4096
    ("write", None, b"measure func=FILE_CHECK\n\n", 24),
    ("write", None, b"\nmeasure func=FILE_CHECK\n", 1),
    ("write", None, b"measure func=FILE_CHECK\0junk\n", 24),
    ("write", None, b"/nonexistent/policy\n", -errno.ENOENT),
    ("lseek", 10, b"measure\n", -errno.EINVAL),
    ("lseek", 0, b"measure\n", 8),
]
# what the kernel logs for it: every rule parsed, then the failed session's close
ONE_DESCRIPTOR_LOG = [f"audit: type=1807 audit(…): action=measure{r} res=1" for r in (
    " func=BPRM_CHECK", " func=MODULE_CHECK", "", " func=FIRMWARE_CHECK", " func=FILE_CHECK", " func=FILE_CHECK")] + [
    "ima: Unable to open file: /nonexistent/policy (-2)",
    "audit: type=1807 audit(…): action=measure res=1",
    "ima: policy update failed",
]


def test_f6_one_descriptor(mount_imafs):
    """A pwrite never moves the position: plain writes after pwrite(0) are still at 0."""
    m = mount_imafs("kernel=6.12", "read_policy=true", "write_policy=true")
    pol = m.ima / "policy"
    fd = os.open(pol, os.O_WRONLY)
    got = []
    try:
        for call, where, data, _ in ONE_DESCRIPTOR:
            try:
                if call == "pwrite":
                    got.append(os.pwrite(fd, data, where))
                    continue
                if call == "lseek":
                    os.lseek(fd, where, os.SEEK_SET)
                got.append(os.write(fd, data))
            except OSError as e:
                got.append(-e.errno)
    finally:
        os.close(fd)
    assert got == [ret for *_, ret in ONE_DESCRIPTOR]
    # the session saw errors: the kernel discards all its rules at close
    log = session_lines(m)
    assert log[:-1] == ONE_DESCRIPTOR_LOG
    assert "op=policy_update cause=failed" in log[-1]
    assert m.read("policy") == b""
    os.close(os.open(pol, os.O_WRONLY))  # and the file is free again


def test_f6_one_descriptor_unit():
    """The same calls as FUSE sends them: a write at the descriptor's
    position, which only plain writes move, by what they returned."""
    pf = PolicyFile([], Parser(V612), read_policy=True, write_policy=True, log=KernelLog(None))
    s = pf.open(os.O_WRONLY, True, Subject(1, 0, b"imat"))
    position, got = 0, []
    for call, where, data, _ in ONE_DESCRIPTOR:
        if call == "lseek":
            position = where
        try:
            n = run_inline(pf.write(s, where if call == "pwrite" else position, data))
        except FsError as e:
            n = -e.errno
        else:
            position += n if call != "pwrite" else 0
        got.append(n)
    assert got == [ret for *_, ret in ONE_DESCRIPTOR]
    assert len(s.rules) == 7 and s.failed
    pf.release(s)
    assert pf.rules == [] and not pf.busy


def test_f6_path_writes(mnt, tmp_path):
    pol = mnt.ima / "policy"
    d = tmp_path / "d"
    d.mkdir()
    nonl = tmp_path / "nonl"
    nonl.write_text("measure func=BPRM_CHECK\nmeasure")
    badrule = tmp_path / "bad"
    badrule.write_text("measure\nbogus rule\n")
    for path, err in ((tmp_path / "nonexistent", errno.ENOENT), (d, errno.EINVAL),
                      (nonl, errno.EINVAL), (badrule, errno.EINVAL)):
        fd = os.open(pol, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, os.fsencode(path) + b"\n")
            assert e.value.errno == err, path
        finally:
            os.close(fd)
    assert f"Unable to open file: {d} (-22)" in mnt.cli("dmesg").stdout
    good = tmp_path / "pol.txt"
    good.write_text("# mine\nmeasure func=BPRM_CHECK\n\nmeasure func=MODULE_CHECK\n")
    fd = os.open(pol, os.O_WRONLY)
    data = os.fsencode(good) + b"\n"
    assert os.write(fd, data) == len(data)
    os.close(fd)
    assert mnt.client.call("status")["policy"] == ["measure func=BPRM_CHECK", "measure func=MODULE_CHECK"]


@pytest.mark.parametrize("content, logged", [
    # the last line is parsed, then its missing newline fails the write
    (b"measure func=BPRM_CHECK\nmeasure", ["action=measure func=BPRM_CHECK res=1", "action=measure res=1"]),
    # the kernel splits the file as a C string: nothing after a NUL is read
    (b"measure func=BPRM_CHECK\0x\nmeasure func=FILE_CHECK\n", ["action=measure func=BPRM_CHECK res=1"]),
])
def test_path_load_accounts_for_every_byte(tmp_path, content, logged):
    """ima_read_policy: the rules' lengths must add up to the file's size."""
    f = tmp_path / "pol"
    f.write_bytes(content)
    kmsg = tmp_path / "kmsg"
    pf = PolicyFile([], Parser(V612), read_policy=False, write_policy=False, log=KernelLog(kmsg))
    s = pf.open(os.O_WRONLY, True, Subject(1, 0, b"imat"))
    with pytest.raises(FsError) as e:
        run_inline(pf.write(s, 0, os.fsencode(f) + b"\n"))
    assert e.value.errno == errno.EINVAL
    assert [line.split("): ", 1)[1] for line in kmsg.read_text().splitlines()] == logged


def test_path_load_of_a_fifo(mnt, tmp_path):
    """Not a regular file: EINVAL, as the kernel answers once a writer lets its
    open return; the daemon does not wait for one."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = subprocess.run(["bash", "-c", f"printf '%s\\n' {fifo} > policy"], cwd=mnt.ima, capture_output=True,
                       text=True, timeout=30)
    assert "write error: Invalid argument" in r.stderr
    assert f"ima: Unable to open file: {fifo} (-22)" in mnt.cli("dmesg").stdout


@pytest.mark.parametrize("rule, accepted", [
    ("pcr=9 measure", True),  # the action is checked against pcr= after the whole rule
    ("measure uid=0 euid=0", False),  # uid and euid fill one slot of the rule
    ("measure egid=0 gid<5", False),
    ("measure fowner=0 uid=0 fgroup=0 gid=0", True),
    ("measure fsname=ext4 fsname=xfs", True),  # no check for a second fsname=
    # before 7.1: digest_type=verity must come first, and only sigv3 goes with it
    ("appraise digest_type=verity appraise_type=sigv3", True),
    ("appraise appraise_type=sigv3 digest_type=verity", False),
    ("appraise digest_type=verity appraise_type=imasig", False),
    ("appraise appraise_type=imasig digest_type=verity", False),
])
def test_kernel_parse_order_612(rule, accepted):
    try:
        Parser(V612).parse(rule, lsm_rejected=True)
    except FsError:
        assert not accepted
    else:
        assert accepted


def test_options_the_kernel_takes_twice():
    assert Parser(V612).parse("measure fsname=ext4 fsname=xfs", True).render() == "measure fsname=xfs \n"
    r = Parser(V612).parse("measure subj_type=a subj_type=b", lsm_rejected=False)
    assert r.inert and r.lsm == (("subj_type", "a"), ("subj_type", "b"))


def test_f8_shell_writes_and_sessions(mnt, tmp_path):
    ima = mnt.ima
    r = subprocess.run(["sh", "-c", 'echo "" > policy'], cwd=ima, capture_output=True, text=True)
    assert r.returncode == 0 and "policy" in os.listdir(ima)
    r = subprocess.run(["bash", "-c", 'echo "bogus rule" > policy'], cwd=ima, capture_output=True, text=True)
    assert r.returncode != 0 and "write error: Invalid argument" in r.stderr  # dash says "I/O error"
    bad = tmp_path / "bad.policy"
    bad.write_text("dnt_measure func=BPRM_CHECK\nmeasure func=FILE_CHECK\n")
    r = subprocess.run(["sh", "-c", f"cat {bad} > policy"], cwd=ima, capture_output=True, text=True)
    assert r.returncode != 0 and "policy" in os.listdir(ima)
    # good, bad, good in one session: nothing is applied
    fd = os.open(ima / "policy", os.O_WRONLY)
    os.write(fd, b"measure func=BPRM_CHECK\n")
    with pytest.raises(OSError):
        os.write(fd, b"bogus\n")
    os.write(fd, b"measure func=FILE_CHECK\n")
    os.close(fd)
    assert mnt.client.call("status")["policy"] == []
    good = tmp_path / "good.policy"
    good.write_text("".join(f"measure func={f}\n" for f in
                            ("BPRM_CHECK", "FILE_CHECK", "MODULE_CHECK", "FIRMWARE_CHECK", "POLICY_CHECK")))
    r = subprocess.run(["sh", "-c", f"cat {good} > policy"], cwd=ima, capture_output=True, text=True)
    assert r.returncode == 0 and "policy" not in os.listdir(ima)
    log = mnt.cli("dmesg").stdout
    assert log.count("ima: policy update failed") == 4 and "ima: policy update completed" in log
    assert "type=1807" in log and "action=measure func=BPRM_CHECK" in log
    assert "op=policy_update cause=failed" in log


def test_r3_write_policy_rw(mount_imafs):
    m = mount_imafs("ima_policy=tcb", "read_policy=true", "write_policy=true", "kernel=6.12")
    pol = m.ima / "policy"
    assert os.stat(pol).st_mode == 0o100600
    text = m.read("policy")
    assert text.count(b"\n") == 20 and len(text) == 672
    fd = os.open(pol, os.O_RDONLY)
    assert os.read(fd, 20) == text[:20] and os.lseek(fd, 0, os.SEEK_CUR) == 20
    assert os.read(fd, 30) == text[20:50]
    os.close(fd)
    w = os.open(pol, os.O_WRONLY)
    assert opn(pol, os.O_WRONLY) == -errno.EBUSY
    os.write(w, b"measure func=FILE_CHECK mask=MAY_READ uid=0\n")
    assert m.read("policy") == text  # readers see the active policy only
    with pytest.raises(OSError) as e:  # refused while the boot policy is active
        os.write(w, b"measure subj_type=foo\n")
    assert e.value.errno == errno.EINVAL
    os.close(w)
    assert m.read("policy") == text
    for rules in ([b"measure func=FILE_CHECK mask=MAY_READ uid=0\n", b"measure func=BPRM_CHECK\n"],
                  [b"measure func=BPRM_CHECK\n", b"measure subj_type=foo\n"]):
        w = os.open(pol, os.O_WRONLY)
        for r in rules:
            os.write(w, r)
        os.close(w)
    assert m.read("policy") == (b"measure func=FILE_CHECK mask=MAY_READ uid=0 \nmeasure func=BPRM_CHECK \n"
                                b"measure func=BPRM_CHECK \n")
    assert os.stat(pol).st_mode == 0o100600


def test_r4_read_policy_only(mount_imafs):
    m = mount_imafs("read_policy=true")
    pol = m.ima / "policy"
    assert m.read("policy") == b""  # an empty policy reads as 0 bytes
    w = os.open(pol, os.O_WRONLY)
    os.write(w, b"measure func=BPRM_CHECK\n")
    os.write(w, b"measure func=MODULE_CHECK\n")
    os.close(w)
    assert os.stat(pol).st_mode == 0o100400
    assert opn(pol, os.O_WRONLY) == -errno.EBUSY
    assert m.read("policy") == b"measure func=BPRM_CHECK \nmeasure func=MODULE_CHECK \n"
    r = subprocess.run(["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin", "cat", str(pol)],
                       capture_output=True, text=True)
    assert "Operation not permitted" in r.stderr


def test_r5_secure_boot_needs_signed_policy(mount_imafs, tmp_path):
    m = mount_imafs("ima_policy=secure_boot")
    pol = m.ima / "policy"
    f = tmp_path / "pol.txt"
    f.write_text("measure func=BPRM_CHECK\n")
    for data, err in ((b"measure func=FILE_CHECK\n", errno.EACCES), (b"# comment\n", errno.EACCES),
                      (os.fsencode(f) + b"\n", errno.EACCES), (b"/nonexistent\n", errno.ENOENT)):
        fd = os.open(pol, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as e:
                os.write(fd, data)
            assert e.value.errno == err, data
        finally:
            os.close(fd)
    log = m.cli("dmesg").stdout
    assert "signed policy file (specified as an absolute pathname) required" in log
    assert len(m.client.call("status")["policy"]) == 4


def test_f7_through_the_mount(mount_imafs):
    """Both columns of F-7 with real open/write/close on a 6.12 policy file."""
    m = mount_imafs("kernel=6.12", "write_policy=true", "read_policy=true")
    pol = m.ima / "policy"

    def session(rule: str) -> int:
        fd = os.open(pol, os.O_WRONLY)
        try:
            os.write(fd, rule.encode() + b"\n")
            return 0
        except OSError as e:
            return e.errno
        finally:
            os.close(fd)

    for rule in REFUSED:  # first: the LSM rules are refused only while the boot policy is active
        assert session(rule) == errno.EINVAL, rule
    assert m.read("policy") == b""
    for rule in ACCEPTED:
        assert session(rule) == 0, rule
    assert m.read("policy").count(b"\n") == len(ACCEPTED)


writes = st.lists(st.binary(max_size=120) | st.sampled_from(
    [b"measure func=BPRM_CHECK\n", b"dont_measure fsmagic=0x9fa0\n", b"# c\n", b"\n", b"bogus\n"]),
    max_size=6)


@settings(max_examples=300, deadline=None)
@given(st.lists(writes, max_size=4))
def test_fuzz_sessions_change_policy_only_when_valid(sessions):
    pf = PolicyFile([], Parser(V72), read_policy=True, write_policy=True, log=KernelLog(None))
    for chunks in sessions:
        before = list(pf.rules)
        s = pf.open(os.O_WRONLY, True, Subject(0, 0, b"imafs"))
        ok = True
        for data in chunks:
            try:
                n = run_inline(pf.write(s, 0, data))
                assert 0 < n <= max(len(data), 1) or data == b""
            except FsError as e:
                assert e.errno in (errno.EINVAL, errno.ENOENT, errno.EACCES, errno.EISDIR, errno.ENOTDIR)
                ok = False
        queued = list(s.rules)
        pf.release(s)
        if ok and queued:
            assert pf.rules == before + queued
        else:
            assert pf.rules == before
        assert not pf.busy


def test_random_bytes_never_hurt_the_daemon(mount_imafs):
    import random
    m = mount_imafs("write_policy=true")
    rng = random.Random(7)
    for _ in range(100):
        fd = os.open(m.ima / "policy", os.O_WRONLY)
        try:
            os.write(fd, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300))))
        except OSError:
            pass
        finally:
            os.close(fd)
    assert m.client.call("status")["count"] >= 1


def test_policy_session_across_reboot(mount_imafs):
    """A writer that outlives a reboot closes on the policy it opened, and the
    new kernel's policy file is free and whole again."""
    m = mount_imafs("write_policy=true", "read_policy=true")
    fd = os.open(m.ima / "policy", os.O_WRONLY)
    os.write(fd, b"measure func=BPRM_CHECK\n")
    m.cli("reboot")
    os.close(fd)
    assert m.read("policy") == b""
    os.close(os.open(m.ima / "policy", os.O_WRONLY))
