"""The emulated kernel's log, line for line: policy records (types 1807 and
1802), violation records (1804), the store step's refusal while suspended,
and the boot lines.

The expected lines are the kernel's texts (ima_parse_rule, ima_parse_add_rule,
ima_release_policy, ima_read_policy, integrity_audit_message, ima_init) with
the printk timestamp dropped and the audit time and serial written ``…``.
The writing and reading processes are real: a shell that names itself
``imat`` (/proc/self/comm) and sets its login uid (/proc/self/loginuid), so
that pid, comm, auid and ses are known to the test, not read by imafs alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from imafs.errors import FsError
from imafs.klog import untrusted
from imafs.policy import Parser, RuleLog

AUDIT = re.compile(r"audit: type=(\d+) audit\((\d+)\.\d{3}:\d+\): ")


def klog(m) -> list[str]:
    """The kernel log, each line checked for the kernel's prefixes, with the
    printk timestamp dropped and every audit time and serial written ``…``."""
    lines = []
    for line in m.cli("dmesg").stdout.splitlines():
        stamp = re.match(r"\[ *\d+\.\d{6}\] ", line)
        assert stamp, line
        text = line[stamp.end():]
        audit = AUDIT.match(text)
        if audit:
            assert abs(int(audit[2]) - time.time()) < 600, line
            text = f"audit: type={audit[1]} audit(…): " + text[audit.end():]
        lines.append(text)
    return lines


def session_lines(m) -> list[str]:
    """The log after the boot lines."""
    lines = klog(m)
    return lines[lines.index("ima: No architecture policies found") + 1:]


IMAT = """
echo imat > /proc/$$/comm
echo 1000 > /proc/$$/loginuid 2>/dev/null || exit 77
echo $$ $(cat /proc/$$/sessionid)
"""


def as_imat(script: str, *args) -> tuple[int, int]:
    """Run ``script`` in a dash named imat with login uid 1000; its pid and session."""
    r = subprocess.run(["sh", "-c", IMAT + script, "imat", *map(str, args)], capture_output=True, text=True,
                       timeout=60)
    if r.returncode == 77:
        pytest.skip("cannot set a login uid here (needs CAP_AUDIT_CONTROL and a mutable loginuid)")
    pid, ses = map(int, r.stdout.split()[:2])
    assert ses != 0xFFFFFFFF  # setting the login uid opened a session
    return pid, ses


def status(pid: int, ses: int, uid: int = 0) -> str:
    """integrity_audit_message up to the op, for the writer imat."""
    return f"pid={pid} uid={uid} auid=1000 ses={ses} subj=unconfined"


def test_policy_records_name_the_writer(mount_imafs):
    """The texts of a real 6.12 kernel for a failed and a completed session."""
    m = mount_imafs("kernel=6.12", "write_policy=true", "read_policy=true")
    pid, ses = as_imat("""
exec 3> "$1"
printf 'measure func=FILE_CHECK mask=MAY_READ uid=0\\n' >&3
printf 'measure mask=MAY_BOGUS\\n' >&3
printf 'bogus\\n' >&3
printf 'measure subj_type=foo\\n' >&3
printf '/nonexistent/policy\\n' >&3
exec 3>&-
exec 3> "$1"
printf 'measure func=FILE_CHECK mask=MAY_READ uid=0\\n' >&3
exec 3>&-
""", m.ima / "policy")
    s = status(pid, ses)
    invalid = f'audit: type=1802 audit(…): {s} op=update_policy cause=invalid-policy comm="imat" res=0 errno=0'
    assert session_lines(m) == [
        "audit: type=1807 audit(…): action=measure func=FILE_CHECK mask=MAY_READ uid=0 res=1",
        "audit: type=1807 audit(…): action=measure mask=MAY_BOGUS res=0",
        invalid,
        "audit: type=1807 audit(…): UNKNOWN=bogus res=0",
        invalid,
        "ima: rule for LSM 'foo' is undefined",
        "audit: type=1807 audit(…): action=measure subj_type=foo res=0",
        invalid,
        "ima: Unable to open file: /nonexistent/policy (-2)",
        "ima: policy update failed",
        f'audit: type=1802 audit(…): {s} op=policy_update cause=failed comm="imat" res=0 errno=0',
        "audit: type=1807 audit(…): action=measure func=FILE_CHECK mask=MAY_READ uid=0 res=1",
        "ima: policy update completed",
        f'audit: type=1802 audit(…): {s} op=policy_update cause=completed comm="imat" res=1 errno=0',
    ]
    assert m.read("policy") == b"measure func=FILE_CHECK mask=MAY_READ uid=0 \n"


def test_signed_policy_required_record(mount_imafs):
    m = mount_imafs("ima_policy=secure_boot")
    pid, ses = as_imat("""exec 3> "$1"; printf 'measure\\n' >&3; exec 3>&-""", m.ima / "policy")
    s = status(pid, ses)
    assert session_lines(m) == [
        "ima: signed policy file (specified as an absolute pathname) required",
        f'audit: type=1802 audit(…): {s} op=policy_update cause=signed policy required comm="imat" res=0 errno=0',
        "ima: policy update failed",
        f'audit: type=1802 audit(…): {s} op=policy_update cause=failed comm="imat" res=0 errno=0',
    ]


def test_records_name_the_real_uid(mount_imafs):
    """current_uid() is the real uid: a writer with real uid 1000 and
    effective uid 0 (allowed to write) is uid=1000."""
    m = mount_imafs()
    writer = ("import os, sys; open('/proc/self/comm', 'w').write('imat'); "
              "os.close(os.open(sys.argv[1], os.O_WRONLY)); print(os.getpid())")
    r = subprocess.run(["setpriv", "--ruid", "1000", sys.executable, "-c", writer, str(m.ima / "policy")],
                       capture_output=True, text=True, check=True)
    with open("/proc/self/loginuid") as a, open("/proc/self/sessionid") as b:
        auid, ses = int(a.read()), int(b.read())  # what the writer inherited
    assert session_lines(m) == [
        "ima: policy update failed",
        f"audit: type=1802 audit(…): pid={int(r.stdout)} uid=1000 auid={auid} ses={ses} subj=unconfined "
        'op=policy_update cause=failed comm="imat" res=0 errno=0',
    ]


@pytest.fixture
def measured(ramfs, mount_imafs):
    src, dst = ramfs()
    return mount_imafs("ima_policy=tcb", measure=[(src, dst)]), src, dst


READ_IT = 'exec 4< "$1"; exec 4<&-'


def test_violation_record(measured):
    """An open_writers violation names the reader and the file; a name with a
    space is logged in hex (audit_log_untrustedstring)."""
    m, src, dst = measured
    f = dst / "with space.txt"
    f.write_bytes(b"x\n")
    w = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        pid, ses = as_imat(READ_IT, f)
    finally:
        os.close(w)
    name = f"{dst}/with space.txt".encode().hex().upper()
    assert session_lines(m) == [
        f"audit: type=1804 audit(…): {status(pid, ses)} op=invalid_pcr cause=open_writers comm=\"imat\" "
        f"name={name} dev=\"ramfs\" ino={os.stat(src / 'with space.txt').st_ino} res=1 errno=0",
    ]


def test_suspended_store_step_records(measured):
    """While measurements are suspended the store step refuses (and audits)
    both the measurement and the violation record, and the hook goes on."""
    m, src, dst = measured
    f = dst / "late.txt"
    f.write_bytes(b"late\n")
    m.cli("suspend")
    w = os.open(f, os.O_WRONLY | os.O_APPEND)
    try:
        pid, ses = as_imat(READ_IT, f)
    finally:
        os.close(w)
    file = f'name="{dst}/late.txt" dev="ramfs" ino={os.stat(src / "late.txt").st_ino}'
    refused = (f'audit: type=1804 audit(…): {status(pid, ses)} op=add_template_measure cause=measurements_suspended '
               f'comm="imat" {file} res=0 errno=0')
    assert session_lines(m) == [
        refused,
        f'audit: type=1804 audit(…): {status(pid, ses)} op=invalid_pcr cause=open_writers comm="imat" {file} '
        f'res=0 errno=0',
        refused,
    ]
    assert m.read("runtime_measurements_count") == b"1\n"  # boot_aggregate alone
    assert m.read("violations") == b"1\n"  # counted first, stored or not (kernel-abi.md §4.4)


def test_suspended_buffer_hook_records(mount_imafs):
    """A buffer hook while measurements are suspended: the store step refuses
    (-ENODEV) and audits it, then process_buffer_measurement audits its failed
    store under func_measure_str(); nothing is recorded. The event has no
    process (docs/deviations.md, Credentials of hook events)."""
    m = mount_imafs()
    with open(m.ima / "policy", "w") as f:
        f.write("measure func=CRITICAL_DATA label=demo\n")
    count = m.read("runtime_measurements_count")
    m.cli("suspend")
    r = m.cli("measure", "--func", "CRITICAL_DATA", "--name", "demo data", "--data-hex", "00ff", "--label", "demo")
    assert "not stored, measurements are suspended" in r.stdout
    who = 'pid=0 uid=0 auid=4294967295 ses=4294967295 subj=unconfined'
    assert session_lines(m)[-2:] == [
        f'audit: type=1804 audit(…): {who} op=add_template_measure cause=measurements_suspended comm="imafs" '
        f'name=64656D6F2064617461 res=0 errno=0',
        f'audit: type=1804 audit(…): {who} op=measuring_critical_data cause=store_entry comm="imafs" '
        f'name=64656D6F2064617461 res=0 errno=-19',
    ]
    assert m.read("runtime_measurements_count") == count


def test_boot_lines(mount_imafs):
    """ima_init: no TPM → TPM-bypass; the IMA hash; no arch policy. Each boot logs them."""
    m = mount_imafs("tpm_banks=none")
    boot = ["ima: No TPM chip found, activating TPM-bypass!", "ima: Allocated hash algorithm: sha256",
            "ima: No architecture policies found"]
    assert klog(m) == boot
    m.cli("reboot")
    assert klog(m) == boot + boot
    m2 = mount_imafs("ima_hash=sha512")
    assert klog(m2) == ["ima: Allocated hash algorithm: sha512", "ima: No architecture policies found"]


def test_boot_lines_of_a_template_without_the_hash(mount_imafs):
    """kernel-observed.md F-12: ima_template=ima with the default hash: hash_setup()
    refuses sha256 for it (the hash becomes sha1); with ima_hash=sha256 given,
    ima_template_setup() refuses the template (the default stays). Every boot."""
    m = mount_imafs("ima_template=ima")
    lines = klog(m)
    assert lines[:2] == ['ima: invalid hash algorithm "sha256" for template "ima"',
                         "ima: Allocated hash algorithm: sha1"]
    assert b" ima " in m.read("ascii_runtime_measurements")
    m.cli("reboot")
    assert klog(m).count('ima: invalid hash algorithm "sha256" for template "ima"') == 2
    m2 = mount_imafs("ima_hash=sha256", "ima_template=ima")
    assert klog(m2)[:2] == ["ima: template does not support hash alg", "ima: Allocated hash algorithm: sha256"]
    from imafs.profile import Profile
    assert f" {Profile.ima_template} ".encode() in m2.read("ascii_runtime_measurements")


# -- what ima_parse_rule logs, rule by rule (unit) ------------------------------------
V61, V612, V72 = (6, 1), (6, 12), (7, 2)


@pytest.mark.parametrize("kernel, rule, fields, messages", [
    (V612, "measure func=FILE_CHECK mask=MAY_READ uid=0", "action=measure func=FILE_CHECK mask=MAY_READ uid=0 res=1",
     []),
    (V612, "measure mask=MAY_BOGUS", "action=measure mask=MAY_BOGUS res=0", []),
    (V612, "bogus", "UNKNOWN=bogus res=0", []),
    # every token as written, in order, whitespace dropped; permit_directio is never logged
    (V612, "\tappraise  func=PATH_CHECK permit_directio fowner>1000 ",
     "action=appraise func=PATH_CHECK fowner>1000 res=1", []),
    (V612, "measure uid<1000 egid=0 fsmagic=0x01021994",
     "action=measure uid<1000 egid=0 fsmagic=0x01021994 res=1", []),
    # the token that fails is the last one logged
    (V612, "measure func=BPRM_CHECK func=FILE_CHECK mask=MAY_EXEC",
     "action=measure func=BPRM_CHECK func=FILE_CHECK res=0", []),
    (V612, "measure dont_measure func=BPRM_CHECK", "action=measure action=dont_measure res=0", []),
    (V612, "MEASURE func=BPRM_CHECK", "UNKNOWN=MEASURE res=0", []),
    (V612, "measure fsname= func=BPRM_CHECK", "action=measure UNKNOWN=fsname= res=0", []),
    (V612, "measure func>BPRM_CHECK", "action=measure UNKNOWN=func>BPRM_CHECK res=0", []),
    (V612, "measure uid=0 euid=0", "action=measure uid=0 euid=0 res=0", []),  # one slot for both
    # ima_validate_rule fails after every token was logged
    (V612, "dont_measure pcr=9 func=BPRM_CHECK", "action=dont_measure pcr=9 func=BPRM_CHECK res=0", []),
    (V612, "func=BPRM_CHECK", "func=BPRM_CHECK res=0", []),
    (V612, "pcr=9 measure", "pcr=9 action=measure res=1", []),
    # suffix comments: unknown before 6.14, the end of the rule after
    (V612, "measure func=BPRM_CHECK # x", "action=measure func=BPRM_CHECK UNKNOWN=# res=0", []),
    (V72, "measure func=BPRM_CHECK # x", "action=measure func=BPRM_CHECK res=1", []),
    (V612, "dont_audit func=BPRM_CHECK", "UNKNOWN=dont_audit res=0", []),
    (V72, "dont_audit func=BPRM_CHECK", "action=dont_audit func=BPRM_CHECK res=1", []),
    # messages printed while parsing come before the record
    (V612, "measure subj_type=foo func=BPRM_CHECK", "action=measure subj_type=foo res=0",
     ["ima: rule for LSM 'foo' is undefined"]),
    (V612, "appraise func=BPRM_CHECK appraise_algos=sha256,bogus,sha1",
     "action=appraise func=BPRM_CHECK appraise_algos=sha256,bogus,sha1 res=0",
     ['ima: unknown hash algorithm "bogus"']),
    (V61, "appraise func=BPRM_CHECK appraise_algos=sha256,sha512",
     "action=appraise func=BPRM_CHECK appraise_algos=sha256,sha512 res=0",
     ['ima: unavailable hash algorithm "sha512", check your kernel configuration']),
    (V612, "measure func=BPRM_CHECK digest_type=verity", "action=measure func=BPRM_CHECK digest_type=verity res=1",
     ["ima: verity rules should include d-ngv2"]),
    (V612, "measure func=BPRM_CHECK digest_type=verity template=ima-ngv2",
     "action=measure func=BPRM_CHECK digest_type=verity template=ima-ngv2 res=1", []),
])
def test_rule_record(kernel, rule, fields, messages):
    log = RuleLog()
    try:
        accepted = Parser(kernel).parse(rule, lsm_rejected=True, log=log) is not None
    except FsError:
        accepted = False
    assert " ".join(log.fields + [f"res={int(accepted)}"]) == fields
    assert log.messages == messages


def test_notices_once_per_boot():
    """pr_notice_once: the verity notice once per parser (one boot); the LSM
    warning at every rule that names an undefined label."""
    p = Parser(V612)
    logs = [RuleLog() for _ in range(2)]
    for log in logs:
        p.parse("measure func=BPRM_CHECK digest_type=verity", True, log)
    assert [log.messages for log in logs] == [["ima: verity rules should include d-ngv2"], []]
    for log in logs:
        p.parse("measure subj_role=a obj_type=b", False, log)
    assert logs[1].messages == ["ima: rule for LSM 'a' is undefined", "ima: rule for LSM 'b' is undefined"]


def test_modsig_notice():
    import imafs.templates as T
    p = Parser(V612, modsig=True, template=T.lookup_template("d-ng|n-ng|modsig"))
    log = RuleLog()
    p.parse("appraise func=MODULE_CHECK appraise_type=imasig|modsig", True, log)
    assert log.messages == ["ima: template with 'modsig' field also needs 'd-modsig' field"]
    log = RuleLog()
    Parser(V612, modsig=True, template=T.BUILTIN_TEMPLATES["ima-modsig"]).parse(
        "appraise func=MODULE_CHECK appraise_type=imasig|modsig", True, log)
    assert log.messages == []


@pytest.mark.parametrize("value, logged", [
    ("imat", '"imat"'), ("~x!", '"~x!"'), ("a b", "612062"), ('a"b', "612262"), ("tab\t", "74616209"),
    (b"caf\xc3\xa9", "636166C3A9"), (b"\x7f", "7F"),
])
def test_untrusted_strings(value, logged):
    assert untrusted(value) == logged
