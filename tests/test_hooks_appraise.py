"""The seccomp hooks meet appraisal (issues 11 and 13): in enforce mode a
denied mmap(PROT_EXEC), finit_module or the loader's mapping of a library
fails with EACCES, an mprotect adding PROT_EXEC to a file mapping fails with
EPERM, each with the kernel's audit record.  Real programs under the filter,
files signed with `evmctl ima_sign`, keys added with `imafs keys add`."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from imafs import supervise
from imafs.control import Client, ControlError

from .test_appraise import add_key, denied_record, dmesg_audits, ima_sign, keys, make, tree  # noqa: F401
from .test_keys import certs, der, ima_buf_records  # noqa: F401
from .test_measured_mount import SETPRIV_1000
from .test_supervise import _bzimage, hookcalls, run, write_policy  # noqa: F401

ELF = Path("/usr/bin/true").read_bytes()


def mprotect_record(name: Path, src: Path, comm: str, uid: int, res: int) -> re.Pattern:
    """ima_file_mprotect's record (integrity_audit_msg, collect_data)."""
    return re.compile(rf"pid=\d+ uid={uid} auid=\d+ ses=\d+ subj=unconfined op=collect_data "
                      rf'cause=failed-mprotect comm="{comm}" name="{re.escape(str(name))}" dev="[^"]+" '
                      rf"ino={src.stat().st_ino} res={res} errno=0")


def signed_pair(tree, keys):  # noqa: F811
    src, dst = tree / "src", tree / "dst"
    for d in (src, dst):
        d.mkdir()
        d.chmod(0o755)
    make(src / "unsigned.bin", ELF)
    ima_sign(make(src / "signed.bin", ELF + b"\0"), keys["rsa"][0])
    return src, dst


def second_dst(tree) -> Path:  # noqa: F811
    (tree / "dst2").mkdir(mode=0o755)
    return tree / "dst2"


def test_mmap_exec_of_an_unsigned_file_is_denied(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    src, dst = signed_pair(tree, keys)
    m = mount_imafs("ima_appraise=enforce", "ima_template=ima-sig", measure=[(src, dst)], reachable=True)
    add_key(m, keys["rsa"][1])
    write_policy(m, "measure func=MMAP_CHECK", "appraise func=MMAP_CHECK")
    r = run(m, [*SETPRIV_1000, hookcalls, "mmap", dst / "unsigned.bin"])
    assert r.stdout == "errno=13\n", r
    r = run(m, [*SETPRIV_1000, hookcalls, "mmap", dst / "signed.bin"])
    assert r.stdout == "ok\n", r
    records = dmesg_audits(m)
    assert len(records) == 1, records
    assert denied_record("missing-hash", dst / "unsigned.bin", src / "unsigned.bin", "hookcalls", 1000) \
        .fullmatch(records[0]), records[0]
    text = m.read("ascii_runtime_measurements").decode()
    assert f" {dst / 'signed.bin'} 0302" in text  # measured with its signature (ima-sig)
    assert f"{dst / 'unsigned.bin'}" in text  # measured, then denied: as the kernel does
    # log mode: the same failure is recorded, the call runs
    m2 = mount_imafs("ima_appraise=log", measure=[(src, second_dst(tree))], reachable=True)
    write_policy(m2, "appraise func=MMAP_CHECK")
    r = run(m2, [*SETPRIV_1000, hookcalls, "mmap", tree / "dst2" / "unsigned.bin"])
    assert r.stdout == "ok\n", r
    assert [a for a in dmesg_audits(m2) if "cause=missing-hash" in a]


def test_reqprot_denial_stops_before_mmap_check(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    """ima_file_mmap returns MMAP_CHECK_REQPROT's error: MMAP_CHECK never runs."""
    src, dst = signed_pair(tree, keys)
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    write_policy(m, "appraise func=MMAP_CHECK_REQPROT", "appraise func=MMAP_CHECK")
    r = run(m, [hookcalls, "mmap", dst / "unsigned.bin"])
    assert r.stdout == "errno=13\n", r
    assert len(dmesg_audits(m)) == 1


def test_mprotect_exec_of_a_file_mapping(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    src, dst = signed_pair(tree, keys)
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    add_key(m, keys["rsa"][1])
    # a measure rule only, with an appraise rule for another hook: audited, allowed
    write_policy(m, "measure func=MMAP_CHECK", "appraise func=MODULE_CHECK")
    r = run(m, [*SETPRIV_1000, hookcalls, "mprotect", dst / "signed.bin"])
    assert r.stdout == "ok\n", r
    records = dmesg_audits(m)
    assert len(records) == 1 and mprotect_record(dst / "signed.bin", src / "signed.bin", "hookcalls", 1000, 1) \
        .fullmatch(records[0]), records
    # an mmap appraise rule: EPERM, signed or not (the kernel cannot appraise under the mmap lock)
    m2 = mount_imafs("ima_appraise=enforce", measure=[(src, second_dst(tree))], reachable=True)
    write_policy(m2, "appraise func=MMAP_CHECK")
    for name in ("signed.bin", "unsigned.bin"):
        r = run(m2, [*SETPRIV_1000, hookcalls, "mprotect", tree / "dst2" / name])
        assert r.stdout == "errno=1\n", r
    records = dmesg_audits(m2)
    assert len(records) == 2
    assert mprotect_record(tree / "dst2" / "signed.bin", src / "signed.bin", "hookcalls", 1000, 0) \
        .fullmatch(records[0]), records
    # a file outside the measured mounts, anonymous memory: the host decides
    r = run(m2, [*SETPRIV_1000, hookcalls, "mprotect", src / "unsigned.bin"])
    assert r.stdout == "ok\n", r
    assert len(dmesg_audits(m2)) == 2


def test_finit_module_of_an_unsigned_module_is_denied(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    src, dst = signed_pair(tree, keys)
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    add_key(m, keys["rsa"][1])
    write_policy(m, "measure func=MODULE_CHECK", "appraise func=MODULE_CHECK")
    r = run(m, [hookcalls, "finit_module", dst / "unsigned.bin"])
    assert r.stdout == "errno=13\n", r
    records = dmesg_audits(m)
    assert len(records) == 1 and denied_record("missing-hash", dst / "unsigned.bin", src / "unsigned.bin",
                                               "hookcalls").fullmatch(records[0]), records
    # signed: the host's own finit_module runs (and fails as the host has it, never EACCES)
    r = run(m, [hookcalls, "finit_module", dst / "signed.bin"])
    assert r.stdout.startswith("errno=") and r.stdout != "errno=13\n", r
    assert len(dmesg_audits(m)) == 1
    # without CAP_SYS_MODULE the kernel fails first (EPERM; ENOSYS on a host without modules): no hook
    r = run(m, [*SETPRIV_1000, hookcalls, "finit_module", dst / "unsigned.bin"])
    assert r.stdout in ("errno=1\n", "errno=38\n"), r
    assert len(dmesg_audits(m)) == 1


def test_loader_mapping_a_denied_library_fails_the_exec(tree, keys, mount_imafs, tmp_path):  # noqa: F811
    src, dst = tree / "src", tree / "dst"
    for d in (src, dst):
        d.mkdir()
        d.chmod(0o755)
    (tmp_path / "lib.c").write_text("int imafs_answer(void) { return 42; }\n")
    (tmp_path / "main.c").write_text('#include <stdio.h>\nint imafs_answer(void);\n'
                                     'int main(void) { printf("%d\\n", imafs_answer()); return 0; }\n')
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", src / "libanswer.so", tmp_path / "lib.c"], check=True)
    prog = tree / "answer"
    subprocess.run(["gcc", "-o", prog, tmp_path / "main.c", f"-L{src}", "-lanswer", f"-Wl,-rpath,{dst}"],
                   check=True)
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    add_key(m, keys["rsa"][1])
    write_policy(m, "appraise func=MMAP_CHECK")
    r = run(m, [*SETPRIV_1000, prog])
    assert r.returncode == 127 and "libanswer.so" in r.stderr and "failed to map segment" in r.stderr, r
    ima_sign(src / "libanswer.so", keys["rsa"][0])
    m.cli("status")
    r = run(m, [*SETPRIV_1000, prog])
    assert (r.returncode, r.stdout) == (0, "42\n"), r


def test_mprotect_hostile(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    """What the kernel refuses before its hook stays the host's answer, with
    no record; anonymous memory is never the emulated kernel's; a task
    killed while stopped in mprotect leaves the daemon serving."""
    src, dst = signed_pair(tree, keys)
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    write_policy(m, "appraise func=MMAP_CHECK")
    for verb, expected in (("mprotect-anon", "ok"), ("mprotect-unaligned", "errno=22"), ("mprotect-hole", "errno=12")):
        r = run(m, [*SETPRIV_1000, hookcalls, verb, dst / "unsigned.bin"])
        assert r.stdout == expected + "\n", (verb, r)
    assert dmesg_audits(m) == []
    # killed while stopped: the daemon answers the next task
    for _ in range(3):
        s = supervise.spawn([hookcalls, "mprotect", str(dst / "unsigned.bin")], str(m.path),
                            stdout=subprocess.DEVNULL)
        time.sleep(0.01)
        s.process.kill()
        s.wait(30)
    r = run(m, [*SETPRIV_1000, hookcalls, "mprotect", dst / "signed.bin"])
    assert r.stdout == "errno=1\n", r
    # bad control requests are refused with a message, not a crash
    for bad in ({"node": 1, "task": {}}, {"node": "x", "task": {}}, {"node": 2**70, "task": {"pid": 1}}):
        with pytest.raises(ControlError):
            Client(str(m.path), timeout=10).call("mprotect", **bad)
    r = run(m, [*SETPRIV_1000, hookcalls, "mprotect", dst / "unsigned.bin"])
    assert r.stdout == "errno=1\n", r


# -- the emulated kernel's keyrings through imafs run's keyctl -------------------------------------
def test_ltp_style_keys_into_the_trusted_ima_keyring(mount_imafs, certs, tmp_path):  # noqa: F811
    """ima_keys.sh's flow: `keyctl describe %keyring:.ima` gives the id,
    `evmctl import` adds a certificate to it; `keyctl padd ... %keyring:.ima`
    too.  The restriction of the trusted .ima (a key signed by a builtin key)
    answers ENOKEY for a self-signed one; uid 1000 sees no such keyring."""
    m = mount_imafs("integrity_trusted_keyring=true", f"builtin_trusted_keys={certs['ca']}", reachable=True)
    write_policy(m, "measure func=KEY_CHECK keyrings=.ima template=ima-buf")
    leaf, rsa = tmp_path / "leaf.der", tmp_path / "rsa.der"
    leaf.write_bytes(der(certs["leaf"]))
    rsa.write_bytes(der(certs["rsa"]))
    script = ('set -e; desc=$(keyctl describe %keyring:.ima); echo "$desc"; '
              'id=$(echo "$desc" | cut -d" " -f1 | tr -d ":"); evmctl import "$1" "$id" >/dev/null; '
              'keyctl padd asymmetric "" %keyring:.ima < "$2" || echo "padd failed"')
    r = run(m, ["sh", "-c", script, "sh", leaf, rsa])
    desc, *rest = r.stdout.splitlines()
    assert re.fullmatch(r"\d{9,10}: -lswrv--s-rv------------ +0 +0 keyring: \.ima", desc), r
    assert rest == ["padd failed"] and "Required key not available" in r.stderr, r
    assert ima_buf_records(m) == [(".ima", leaf.read_bytes())]
    keys_listed = [ln.split(None, 2)[0] for ln in m.cli("keys", "list").stdout.splitlines()[1:]]
    assert keys_listed == [".builtin_trusted_keys", ".ima"]
    # uid 1000: the keyring is root's, invisible; the host's own answer
    r = run(m, [*SETPRIV_1000, "keyctl", "describe", "%keyring:.ima"])
    assert r.returncode != 0 and "Can't find" in r.stderr, r


def test_untrusted_ima_keyring_by_keyctl_padd(mount_imafs, certs, tmp_path):  # noqa: F811
    m = mount_imafs(reachable=True)
    write_policy(m, "measure func=KEY_CHECK template=ima-buf")
    rsa = tmp_path / "rsa.der"
    rsa.write_bytes(der(certs["rsa"]))
    r = run(m, ["sh", "-c", 'keyctl padd asymmetric "" %keyring:_ima < "$1"', "sh", rsa])
    assert r.returncode == 0 and re.fullmatch(r"\d{9,10}\n", r.stdout), r
    assert ima_buf_records(m) == [("_ima", rsa.read_bytes())]
    # .ima names no keyring on this kernel for keyctl (it is _ima); PEM is refused as the kernel's parser does
    r = run(m, ["keyctl", "describe", "%keyring:.ima"])
    assert r.returncode != 0, r
    r = run(m, ["sh", "-c", 'keyctl padd asymmetric "" %keyring:_ima < "$1"', "sh", certs["rsa"]])
    assert r.returncode != 0 and "Bad message" in r.stderr, r
    assert len(ima_buf_records(m)) == 1


def test_kexec_file_load_of_an_unsigned_kernel_or_initramfs_is_denied(tree, keys, mount_imafs, hookcalls):  # noqa: F811
    """kimage_file_prepare_segments: the kernel image's appraisal fails the
    call before the image probe, the initramfs's after it; the command line
    is then never measured."""
    src, dst = tree / "src", tree / "dst"
    for d in (src, dst):
        d.mkdir()
        d.chmod(0o755)
    ima_sign(make(src / "vmlinuz", _bzimage()), keys["rsa"][0])
    make(src / "initrd", b"initrd image\n")
    make(src / "unsigned-vmlinuz", _bzimage() + b"\0")
    m = mount_imafs("ima_appraise=enforce", measure=[(src, dst)], reachable=True)
    add_key(m, keys["rsa"][1])
    write_policy(m, "appraise func=KEXEC_KERNEL_CHECK", "appraise func=KEXEC_INITRAMFS_CHECK",
                 "measure func=KEXEC_CMDLINE")
    host = subprocess.run([hookcalls, "kexec_file_load", dst / "vmlinuz", dst / "initrd", "x"],
                          capture_output=True, text=True).stdout
    assert host != "errno=13\n"
    for kernel, cause_file in (("unsigned-vmlinuz", "unsigned-vmlinuz"), ("vmlinuz", "initrd")):
        r = run(m, [hookcalls, "kexec_file_load", dst / kernel, dst / "initrd", "root=/dev/vda"])
        assert r.stdout == "errno=13\n", r
        assert denied_record("missing-hash", dst / cause_file, src / cause_file, "hookcalls") \
            .fullmatch(dmesg_audits(m)[-1]), dmesg_audits(m)
    assert "kexec-cmdline" not in m.read("ascii_runtime_measurements").decode()
    # both signed: the host's call runs, the command line is measured
    ima_sign(src / "initrd", keys["rsa"][0])
    r = run(m, [hookcalls, "kexec_file_load", dst / "vmlinuz", dst / "initrd", "root=/dev/vda"])
    assert r.stdout == host, r
    assert "kexec-cmdline" in m.read("ascii_runtime_measurements").decode()


def test_keyring_calls_hostile(mount_imafs, hookcalls, certs, tmp_path):  # noqa: F811
    """Bad pointers get EFAULT as the kernel's copies do; a user other than
    root cannot describe or fill the kernel's keyrings; a serial of no
    keyring is the host's."""
    m = mount_imafs("integrity_trusted_keyring=true", reachable=True)
    serial = int(run(m, ["keyctl", "describe", "%keyring:.ima"]).stdout.split(":")[0])
    assert run(m, [hookcalls, "add_key-badpayload", serial]).stdout == "errno=14\n"
    assert run(m, [hookcalls, "describe-bad", serial]).stdout == "errno=14\n"
    assert run(m, [hookcalls, "request_key-bad"]).stdout == "errno=14\n"
    assert run(m, [*SETPRIV_1000, hookcalls, "describe-bad", serial]).stdout == "errno=13\n"
    rsa = tmp_path / "rsa.der"
    rsa.write_bytes(der(certs["rsa"]))
    r = run(m, [*SETPRIV_1000, "evmctl", "import", rsa, serial])
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    host = subprocess.run(["keyctl", "describe", str(serial + 1)], capture_output=True, text=True)
    assert run(m, ["keyctl", "describe", serial + 1]).stderr == host.stderr
    assert m.cli("keys", "list").stdout.splitlines()[1:] == []
