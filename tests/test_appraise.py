"""Appraisal: files signed with `evmctl ima_sign` and hashed with `evmctl
ima_hash` (RSA 2048 and ECDSA P-256 keys made by `openssl`), verity
signatures over the digest `fsverity digest` prints, the kernel's causes and
audit records, fix and log modes, signed policies — through explicit events
and through a real measured mount.

Files live under /tmp (ext4 here): appraise_tcb does not appraise tmpfs.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import struct
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs import digsig as D
from imafs import templates as T
from imafs.appraise import (DIGSIG_REQUIRED, PASS, SIGV3_REQUIRED, VERITY_REQUIRED, Appraiser)
from imafs.blocking import run_inline
from imafs.ima import Ima
from imafs.klog import KernelLog
from imafs.profile import load_profile

SETPRIV_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]
MAY_READ, MAY_EXEC, MAY_WRITE = 4, 1, 2
AUDIT = re.compile(r"^\[ *\d+\.\d{6}\] audit: type=(\d+) audit\(\d+\.\d{3}:\d+\): (.*)$")


def run(*cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, check=True, timeout=60, **kw)


@pytest.fixture(scope="module")
def keys():
    """RSA 2048 and ECDSA P-256 keys with self-signed certificates (PEM and DER)."""
    d = Path(tempfile.mkdtemp(prefix="imafs-keys-", dir="/tmp"))
    made = {}
    for name, args in (("rsa", ["-newkey", "rsa:2048"]),
                       ("ec", ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
                       ("other", ["-newkey", "rsa:2048"])):
        key, crt, der = d / f"{name}.pem", d / f"{name}.crt", d / f"{name}.der"
        run("openssl", "req", "-x509", *args, "-nodes", "-keyout", key, "-out", crt,
            "-subj", f"/CN=imafs appraise {name}", "-days", "30", "-addext", "subjectKeyIdentifier=hash")
        run("openssl", "x509", "-in", crt, "-outform", "DER", "-out", der)
        made[name] = (key, crt, der)
    yield made
    for p in d.iterdir():
        p.unlink()
    d.rmdir()


@pytest.fixture
def tree():
    """An empty directory on /tmp's filesystem, where any uid can reach it."""
    d = Path(tempfile.mkdtemp(prefix="imafs-appraise-", dir="/tmp"))
    d.chmod(0o755)
    yield d  # requested before mount_imafs: removed after the mounts are gone
    shutil.rmtree(d, ignore_errors=True)


def ima_sign(path: Path, key: Path, algo: str = "sha256") -> bytes:
    run("evmctl", "ima_sign", "--key", key, "-a", algo, path)
    return os.getxattr(path, "security.ima")


def ima_hash(path: Path, algo: str = "sha256") -> bytes:
    run("evmctl", "ima_hash", "-a", algo, path)
    return os.getxattr(path, "security.ima")


def make(path: Path, content: bytes, mode: int = 0o755) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def audits(log: Path) -> list[str]:
    """The bodies of the integrity records (type 1800) in a kernel log."""
    out = []
    for line in log.read_text().splitlines():
        m = AUDIT.match(line)
        if m and m[1] == "1800":
            out.append(m[2])
    return out


def appraise_record(cause: str, name: Path, *, pid: int = 0, comm: str = "imafs", op: str = "appraise_data",
                    uid: int = 0) -> str:
    st_ = os.stat(name)
    dev = subprocess.run(["findmnt", "-no", "SOURCE", "--target", str(name)], capture_output=True,
                         text=True).stdout.strip().rsplit("/", 1)[-1]
    return (f"pid={pid} uid={uid} auid=4294967295 ses=4294967295 subj=unconfined op={op} cause={cause} "
            f'comm="{comm}" name="{name}" dev="{dev}" ino={st_.st_ino} res=0 errno=0')


# -- plain objects: an emulated kernel driven by explicit events ---------------------------
def kernel(tmp_path, *settings_: str) -> tuple[Ima, Path]:
    log = tmp_path / "kmsg"
    return Ima(load_profile(None, list(settings_)), KernelLog(log)), log


def event(ima: Ima, path: Path, func: str = "FILE_CHECK", mask: int = MAY_READ, uid: int = 0) -> dict:
    return run_inline(ima.measure_file(str(path), func, mask, uid=uid))


def test_signed_and_hashed_files_pass_appraise_tcb(tmp_path, tree, keys):
    ima, log = kernel(tmp_path, "ima_policy=appraise_tcb")
    ima.add_key(".ima", keys["rsa"][2].read_bytes())
    ima.add_key(".ima", keys["ec"][1].read_bytes())
    rsa = make(tree / "rsa.sh", b"#!/bin/sh\necho rsa\n")
    ec = make(tree / "ec.sh", b"#!/bin/sh\necho ec\n")
    hashed = make(tree / "hashed.txt", b"hashed\n", 0o644)
    ima_sign(rsa, keys["rsa"][0])
    ima_sign(ec, keys["ec"][0])
    ima_hash(hashed)
    for f, func, mask in ((rsa, "BPRM_CHECK", MAY_EXEC), (ec, "BPRM_CHECK", MAY_EXEC), (hashed, "FILE_CHECK", MAY_READ)):
        for uid in (0, 1000):
            e = event(ima, f, func, mask, uid)
            assert "denied" not in e and e["appraise"].startswith("appraise: "), e
    assert audits(log) == []


@pytest.mark.parametrize("case", ["changed-byte", "missing", "unknown-key", "hash-where-imasig", "changed-hash"])
def test_failures_deny_with_the_kernels_cause(tmp_path, tree, keys, case):
    ima, log = kernel(tmp_path, "ima_policy=appraise_tcb")
    ima.add_key(".ima", keys["rsa"][2].read_bytes())
    f = make(tree / "prog", b"#!/bin/sh\necho prog\n")
    func, mask = "BPRM_CHECK", MAY_EXEC
    if case == "changed-byte":
        ima_sign(f, keys["rsa"][0])
        with open(f, "r+b") as fh:
            fh.seek(3)
            fh.write(b"X")
        cause = "invalid-signature"
    elif case == "missing":
        cause = "missing-hash"
    elif case == "unknown-key":
        sig = ima_sign(f, keys["other"][0])
        cause = "invalid-signature"
    elif case == "hash-where-imasig":  # appraise_tcb's POLICY_CHECK rule wants a signature
        ima_hash(f)
        func, mask, cause = "POLICY_CHECK", MAY_READ, "IMA-signature-required"
    else:
        ima_hash(f)
        f.write_bytes(b"#!/bin/sh\necho changed\n")
        os.setxattr(f, "security.ima", os.getxattr(f, "security.ima"))
        cause = "invalid-hash"
    e = event(ima, f, func, mask)
    assert e["denied"] == errno.EACCES, e
    assert audits(log) == [appraise_record(cause, f)]
    if case == "unknown-key":
        keyid = sig[3:7].hex()
        assert f"integrity: Request for unknown key 'id:{keyid}' in '_ima' keyring. err -126" in log.read_text()
    # not cached as passed: the next access is appraised (and denied) again
    assert event(ima, f, func, mask)["denied"] == errno.EACCES
    assert len(audits(log)) == 2


def test_log_mode_allows_and_logs(tmp_path, tree):
    ima, log = kernel(tmp_path, "ima_policy=appraise_tcb", "ima_appraise=log")
    f = make(tree / "unsigned", b"data\n", 0o644)
    e = event(ima, f)
    assert "denied" not in e and e["appraise"] == "appraise: missing-hash (allowed)"
    assert audits(log) == [appraise_record("missing-hash", f)]
    with pytest.raises(OSError):
        os.getxattr(f, "security.ima")


def test_fix_mode_writes_the_hash_evmctl_makes(tmp_path, tree, keys):
    ima, log = kernel(tmp_path, "ima_policy=appraise_tcb", "ima_appraise=fix", "ima_hash=sha512")
    ima.add_key(".ima", keys["rsa"][2].read_bytes())
    missing = make(tree / "missing", b"one\n", 0o644)
    stale = make(tree / "stale", b"two\n", 0o644)
    ima_hash(stale, "sha256")
    stale.write_bytes(b"two, changed\n")
    signed = make(tree / "signed", b"three\n", 0o644)
    sig = ima_sign(signed, keys["other"][0])  # a signature is never replaced
    for f in (missing, stale, signed):
        assert "denied" not in event(ima, f)
    expected_missing = bytes.fromhex(run("evmctl", "ima_hash", "-n", "-a", "sha512", missing).stdout.split()[-1].decode())
    expected_stale = bytes.fromhex(run("evmctl", "ima_hash", "-n", "-a", "sha256", stale).stdout.split()[-1].decode())
    assert os.getxattr(missing, "security.ima") == expected_missing  # the IMA hash: sha512
    assert os.getxattr(stale, "security.ima") == expected_stale  # the xattr's algorithm: sha256
    assert os.getxattr(signed, "security.ima") == sig
    assert audits(log) == [appraise_record("missing-hash", missing), appraise_record("invalid-hash", stale),
                           appraise_record("invalid-signature", signed)]
    # the fixed files now pass in enforce mode
    (tmp_path / "enforce").mkdir()
    ima2, _ = kernel(tmp_path / "enforce", "ima_policy=appraise_tcb")
    for f in (missing, stale):
        assert "denied" not in event(ima2, f)


def records(ima: Ima) -> list:
    """(pcr, digest, template, fields) of the list after boot_aggregate."""
    return T.parse_binary_list(ima.store.current.sha1_bytes(), 20)[1:]


def test_ima_sig_record_carries_the_signature(tmp_path, tree, keys):
    """ima_store_measurement gets the xattr the appraisal read."""
    ima, log = kernel(tmp_path, "ima_policy=tcb|appraise_tcb", "ima_template=ima-sig")
    ima.add_key(".ima", keys["ec"][2].read_bytes())
    f = make(tree / "prog", b"#!/bin/sh\n")
    sig = ima_sign(f, keys["ec"][0])
    assert "denied" not in event(ima, f, "BPRM_CHECK", MAY_EXEC)
    (pcr, _, template, fields), = records(ima)
    assert (template.name, fields[1], fields[2]) == ("ima-sig", os.fsencode(f) + b"\0", sig)
    assert fields[0] == b"sha256:\0" + hashlib.sha256(b"#!/bin/sh\n").digest()


# -- verity signatures (v3 over the fs-verity digest) ----------------------------------------
def verity_sig(path: Path, key: Path, keyid: bytes, algo: str = "sha256") -> bytes:
    """A v3 IMA_VERITY_DIGSIG built by hand: `fsverity digest` gives the
    digest, `openssl pkeyutl` signs the ima_file_id hash."""
    out = run("fsverity", "digest", path).stdout.decode().split()[0]
    valgo, hexd = out.split(":")
    file_id = bytes([D.IMA_VERITY_DIGSIG, T.HASH_ALGOS[valgo][0]]) + bytes.fromhex(hexd)
    to_sign = hashlib.new(algo, file_id).digest()
    sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-pkeyopt", f"digest:{algo}"],
                         input=to_sign, capture_output=True, check=True).stdout
    return struct.pack(">BBBIH", D.IMA_VERITY_DIGSIG, 3, T.HASH_ALGOS[algo][0],
                       int.from_bytes(keyid, "big"), len(sig)) + sig


def skid_tail(crt: Path) -> bytes:
    out = run("openssl", "x509", "-in", crt, "-noout", "-ext", "subjectKeyIdentifier").stdout.decode()
    return bytes.fromhex(out.splitlines()[-1].strip().replace(":", ""))[-4:]


@pytest.mark.parametrize("size", [0, 5, 4096, 4097, 4096 * 129 + 3])
def test_verity_digest_matches_fsverity(tree, size):
    f = make(tree / "v", os.urandom(size), 0o644)
    fd = os.open(f, os.O_RDONLY)
    try:
        algo, digest = D.verity_digest(fd)
    finally:
        os.close(fd)
    assert f"{algo}:{digest.hex()}" == run("fsverity", "digest", f).stdout.decode().split()[0]


def test_verity_rule_with_v3_signature(tmp_path, tree, keys):
    ima, log = kernel(tmp_path, "ima_template=ima-ngv2")
    ima.add_key(".ima", keys["rsa"][2].read_bytes())
    rules = ["appraise func=BPRM_CHECK digest_type=verity appraise_type=sigv3",
             "measure func=BPRM_CHECK digest_type=verity"]
    ima.policy.rules = [ima.policy.parser.parse(r, lsm_rejected=False) for r in rules]
    good = make(tree / "good", os.urandom(10000))
    os.setxattr(good, "security.ima", verity_sig(good, keys["rsa"][0], skid_tail(keys["rsa"][1])))
    assert "denied" not in event(ima, good, "BPRM_CHECK", MAY_EXEC)
    vdigest = run("fsverity", "digest", good).stdout.decode().split()[0].split(":")[1]
    (_, _, template, fields), = records(ima)
    assert (template.name, fields[0]) == ("ima-ngv2", b"verity:sha256:\0" + bytes.fromhex(vdigest))
    bad = make(tree / "bad", os.urandom(10000))
    os.setxattr(bad, "security.ima", verity_sig(bad, keys["rsa"][0], skid_tail(keys["rsa"][1])))
    with open(bad, "r+b") as fh:
        fh.write(b"\0")
    v2 = make(tree / "v2", b"v2 signed\n")
    ima_sign(v2, keys["rsa"][0])
    for f, cause in ((bad, "invalid-verity-signature"), (v2, "verity-signature-required")):
        assert event(ima, f, "BPRM_CHECK", MAY_EXEC)["denied"] == errno.EACCES
        assert audits(log)[-1] == appraise_record(cause, f)


# -- the parser and the verifier never grant what they should not ------------------------------
class _NoKeys:
    def name(self, keyring):
        return keyring

    def find(self, keyring, key_id):
        return None


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(xattr=st.binary(max_size=300), flags=st.sampled_from([0, DIGSIG_REQUIRED, DIGSIG_REQUIRED | VERITY_REQUIRED,
                                                               DIGSIG_REQUIRED | SIGV3_REQUIRED]),
       algo=st.sampled_from(["sha1", "sha256", "sha512"]), content=st.binary(max_size=64))
def test_fuzzed_xattrs_never_crash_or_grant(xattr, flags, algo, content):
    digest = hashlib.new(algo, content).digest()
    a = Appraiser("enforce", D.Verifier(lambda: _NoKeys()), (7, 2))
    v = a.appraise("FILE_CHECK", flags, xattr, algo, digest, size=len(content))
    assert D.hash_algo(xattr, "sha256") in T.HASH_ALGOS
    if v.status == PASS:  # only a matching hash passes without a key
        assert not flags & DIGSIG_REQUIRED and xattr[0] in (D.IMA_XATTR_DIGEST, D.IMA_XATTR_DIGEST_NG)
        start = 2 if xattr[0] == D.IMA_XATTR_DIGEST_NG else 1
        assert xattr[start:start + len(digest)] == digest
    else:
        assert v.cause and v.audit


@settings(max_examples=200)
@given(kind=st.sampled_from([D.EVM_IMA_XATTR_DIGSIG, D.IMA_VERITY_DIGSIG]), version=st.integers(0, 255),
       algo_id=st.integers(0, 255), size=st.integers(0, 0xFFFF), body=st.binary(max_size=600))
def test_fuzzed_signature_headers_are_refused(kind, version, algo_id, size, body):
    """A header naming a key that is on the keyring, with garbage after it."""
    from cryptography.hazmat.primitives.asymmetric import ec

    class OneKey(_NoKeys):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()

        def find(self, keyring, key_id):
            return type("K", (), {"public_key": self.key})()
    xattr = struct.pack(">BBBIH", kind, version, algo_id, 0x01020304, size) + body
    v = Appraiser("enforce", D.Verifier(lambda: OneKey()), (7, 2)).appraise(
        "FILE_CHECK", DIGSIG_REQUIRED, xattr, "sha256", hashlib.sha256(body).digest(), size=1)
    assert v.status != PASS and v.cause


def test_hash_algo_of_xattrs():
    assert D.hash_algo(b"\x04\x06" + bytes(64), "sha1") == "sha512"
    assert D.hash_algo(b"\x03\x02\x04" + bytes(10), "sha1") == "sha256"
    assert D.hash_algo(b"\x06\x03\x05" + bytes(10), "sha1") == "sha384"  # verity sigv3
    assert D.hash_algo(b"\x03\x03\x06" + bytes(10), "sha1") == "sha512"  # 7.1: sigv3 of a file
    assert D.hash_algo(b"\x03\x03\x06" + bytes(10), "sha1", (6, 12)) == "sha1"
    assert D.hash_algo(b"\x03\x02\x04" + bytes(6), "sha1") == "sha1"  # no signature after the header
    assert D.hash_algo(b"\x01" + bytes(20), "sha256") == "md5"  # legacy: zero tail
    assert D.hash_algo(b"\x01" + b"\x01" * 20, "sha256") == "sha1"
    assert D.hash_algo(b"\x04\xff", "sha256") == "sha256"


# -- a real measured mount: opens and execs by real processes ------------------------------------
def add_key(m, cert: Path) -> None:
    m.cli("keys", "add", "--keyring", ".ima", cert)


def dmesg_audits(m) -> list[str]:
    out = []
    for line in m.cli("dmesg").stdout.splitlines():
        a = AUDIT.match(line)
        if a and a[1] == "1800":
            out.append(a[2])
    return out


def denied_record(cause: str, name: Path, src: Path, comm: str, uid: int = 0) -> re.Pattern:
    """The appraise_data record of a real process: its pid varies."""
    st_ = os.stat(src)
    return re.compile(rf"pid=\d+ uid={uid} auid=\d+ ses=\d+ subj=unconfined op=appraise_data cause={cause} "
                      rf'comm="{comm}" name="{re.escape(str(name))}" dev="[^"]+" ino={st_.st_ino} res=0 errno=0')


def wait_xattr(path: Path, value: bytes) -> bool:
    """Whether security.ima becomes ``value`` within 5 s: FUSE sends the
    release that writes it after close() has returned."""
    for _ in range(100):
        try:
            if os.getxattr(path, "security.ima") == value:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


@pytest.fixture
def signed_tree(tree, keys):
    """SRC with files signed, hashed, unsigned, tampered, signed by a foreign
    key; DST beside it for the measured mount."""
    src, dst = tree / "src", tree / "dst"
    src.mkdir()
    dst.mkdir()
    src.chmod(0o755)
    dst.chmod(0o755)
    files = {
        "rsa.sh": (b"#!/bin/sh\necho rsa ok\n", "rsa"),
        "ec.sh": (b"#!/bin/sh\necho ec ok\n", "ec"),
        "hashed.txt": (b"hashed content\n", "hash"),
        "unsigned.txt": (b"no xattr\n", None),
        "tampered.sh": (b"#!/bin/sh\necho tampered\n", "rsa"),
        "foreign.sh": (b"#!/bin/sh\necho foreign\n", "other"),
    }
    for name, (content, how) in files.items():
        f = make(src / name, content)
        if how == "hash":
            ima_hash(f)
        elif how:
            ima_sign(f, keys[how][0])
    with open(src / "tampered.sh", "r+b") as fh:
        fh.seek(12)
        fh.write(b"T")
    return src, dst


def test_enforce_through_a_measured_mount(signed_tree, keys, mount_imafs):
    src, dst = signed_tree
    m = mount_imafs("ima_policy=tcb|appraise_tcb", "ima_template=ima-sig", measure=[(src, dst)])
    add_key(m, keys["rsa"][1])
    add_key(m, keys["ec"][2])
    # root and uid 1000 run the signed scripts, read the hashed file
    for who in ([], SETPRIV_1000):
        assert run(*who, dst / "rsa.sh").stdout == b"rsa ok\n"
        assert run(*who, dst / "ec.sh").stdout == b"ec ok\n"
    assert run("cat", dst / "hashed.txt").stdout == b"hashed content\n"
    # the failures: EACCES from open and from execve, each with its cause
    with pytest.raises(PermissionError):
        open(dst / "unsigned.txt", "rb").close()
    for name in ("tampered.sh", "foreign.sh"):
        r = subprocess.run([*SETPRIV_1000, str(dst / name)], capture_output=True, text=True)
        assert r.returncode != 0 and "Permission denied" in r.stderr, r
    records = dmesg_audits(m)
    assert len(records) == 3, records
    me = Path("/proc/self/comm").read_text().strip()
    assert denied_record("missing-hash", dst / "unsigned.txt", src / "unsigned.txt", me).fullmatch(records[0]), \
        records[0]
    assert records[0].startswith(f"pid={os.getpid()} ")
    assert denied_record("invalid-signature", dst / "tampered.sh", src / "tampered.sh", "setpriv", 1000) \
        .fullmatch(records[1]), records[1]
    assert denied_record("invalid-signature", dst / "foreign.sh", src / "foreign.sh", "setpriv", 1000) \
        .fullmatch(records[2]), records[2]
    # the measured records of the signed files carry their signatures (ima-sig)
    text = m.read("ascii_runtime_measurements").decode()
    for name in ("rsa.sh", "ec.sh"):
        sig = os.getxattr(src / name, "security.ima").hex()
        assert f" {dst / name} {sig}\n" in text
    # writing to a signed file is refused; a hashed file takes the new hash at its last close
    for mode in ("r+b", "ab"):  # O_APPEND carries MAY_WRITE too
        with pytest.raises(PermissionError):
            open(dst / "rsa.sh", mode).close()
    with open(dst / "hashed.txt", "ab") as f:
        f.write(b"more\n")
    new_hash = bytes.fromhex(run("evmctl", "ima_hash", "-n", "-a", "sha256", src / "hashed.txt").stdout.split()[-1]
                             .decode())
    assert wait_xattr(src / "hashed.txt", new_hash)
    assert run("cat", dst / "hashed.txt").stdout == b"hashed content\nmore\n"
    # a root setxattr through the mount re-appraises: a bad type is refused, a good hash is taken
    with pytest.raises(OSError) as e:
        os.setxattr(dst / "unsigned.txt", "security.ima", b"\x09bogus")
    assert e.value.errno == errno.EINVAL
    good = run("evmctl", "ima_hash", "-n", "-a", "sha256", src / "unsigned.txt").stdout.split()[-1].decode()
    run("setfattr", "-n", "security.ima", "-v", f"0x{good}", dst / "unsigned.txt")
    assert run("cat", dst / "unsigned.txt").stdout == b"no xattr\n"
    # a file root creates through the mount passes as new, and gets its hash at the last close
    (dst / "new.txt").write_bytes(b"created here\n")
    new_hash = run("evmctl", "ima_hash", "-n", "-a", "sha256", src / "new.txt").stdout.split()[-1].decode()
    assert wait_xattr(src / "new.txt", bytes.fromhex(new_hash))
    assert run("cat", dst / "new.txt").stdout == b"created here\n"
    assert len(dmesg_audits(m)) == 3  # nothing failed since


def test_fix_mode_through_a_mount(signed_tree, keys, mount_imafs):
    src, dst = signed_tree
    m = mount_imafs("ima_policy=appraise_tcb", "ima_appraise=fix", measure=[(src, dst)])
    assert run("cat", dst / "unsigned.txt").stdout == b"no xattr\n"
    expected = run("evmctl", "ima_hash", "-n", "-a", "sha256", src / "unsigned.txt").stdout.split()[-1].decode()
    assert os.getxattr(src / "unsigned.txt", "security.ima").hex() == expected
    sig = os.getxattr(src / "foreign.sh", "security.ima")
    assert run(dst / "foreign.sh").stdout == b"foreign\n"  # allowed, but a signature is never replaced
    assert os.getxattr(src / "foreign.sh", "security.ima") == sig
    causes = [re.search(r"cause=(\S+)", r)[1] for r in dmesg_audits(m)]
    # the exec's open, its BPRM_CHECK and the shell's read of the script: a
    # failure is never cached, each is appraised and logged
    assert causes == ["missing-hash"] + ["invalid-signature"] * 3


def test_log_mode_through_a_mount(signed_tree, mount_imafs):
    src, dst = signed_tree
    m = mount_imafs("ima_policy=appraise_tcb", "ima_appraise=log", measure=[(src, dst)])
    assert run(*SETPRIV_1000, "cat", dst / "unsigned.txt").stdout == b"no xattr\n"
    with pytest.raises(OSError):
        os.getxattr(src / "unsigned.txt", "security.ima")
    assert denied_record("missing-hash", dst / "unsigned.txt", src / "unsigned.txt", "cat", 1000) \
        .fullmatch(dmesg_audits(m)[0])


def test_signed_policy_loads_unsigned_is_refused(tree, keys, mount_imafs):
    m = mount_imafs("ima_policy=secure_boot", "read_policy=true", "write_policy=true")
    add_key(m, keys["rsa"][1])
    signed, unsigned = tree / "signed.policy", tree / "unsigned.policy"
    # a custom policy replaces secure_boot's rules: it keeps policies signed
    signed.write_text("appraise func=POLICY_CHECK appraise_type=imasig\nmeasure func=BPRM_CHECK\n")
    unsigned.write_text("measure func=MODULE_CHECK\n")
    ima_sign(signed, keys["rsa"][0])
    with pytest.raises(PermissionError):
        with open(m.ima / "policy", "w") as p:
            p.write(f"{unsigned}\n")
    log = m.cli("dmesg").stdout
    assert f"ima: Unable to open file: {unsigned} (-13)" in log
    me = Path("/proc/self/comm").read_text().strip()  # the writer reads the file: the record names it
    assert re.search(rf"pid={os.getpid()} uid=0 .* op=appraise_data cause=IMA-signature-required comm=\"{me}\" "
                     rf"name=\"{unsigned}\"", log)
    with open(m.ima / "policy", "w") as p:
        p.write(f"{signed}\n")
    assert "measure func=BPRM_CHECK" in m.read("policy").decode()
    # a tampered signed policy is refused too
    signed.write_text("measure func=FILE_CHECK\n")
    with pytest.raises(PermissionError):
        with open(m.ima / "policy", "w") as p:
            p.write(f"{signed}\n")
    assert re.search(rf"op=appraise_data cause=invalid-signature comm=\"[^\"]+\" name=\"{signed}\"",
                     m.cli("dmesg").stdout)
    assert "measure func=FILE_CHECK" not in m.read("policy").decode()


def test_keylime_checks_the_ima_sig_list(signed_tree, keys, mount_imafs):
    """keylime's verifier, given the same certificates, accepts the list and
    rejects it once a signature is swapped for another file's."""
    from keylime.common.algorithms import Hash
    from keylime.ima import file_signatures, ima as kima

    from .keylime_check import runtime_policy
    src, dst = signed_tree
    m = mount_imafs("ima_policy=tcb|appraise_tcb", "ima_template=ima-sig", measure=[(src, dst)])
    add_key(m, keys["rsa"][1])
    add_key(m, keys["ec"][1])
    run(dst / "rsa.sh")
    run(dst / "ec.sh")
    text = m.read("ascii_runtime_measurements").decode()
    lines = text.splitlines(keepends=True)
    assert len(lines) == 3 and all(len(line.split()) == 6 for line in lines[1:]), lines
    rings = file_signatures.ImaKeyrings()
    for name in ("rsa", "ec"):
        rings.add_to_keyring_from_data(keys[name][2].read_bytes(), "ima")
    policy = runtime_policy(lines[0], "sha1")  # only boot_aggregate by digest: files by signature
    pcr = m.client.call("pcrs", bank="sha1")["pcrs"]["sha1"][10]
    assert pcr == pcr_of(lines)

    def failures(ascii_lines):
        _, failure = kima.process_measurement_list(None, ascii_lines, policy, pcrval=pcr_of(ascii_lines),
                                                   ima_keyrings=rings, hash_alg=Hash.SHA1)
        return [f"{e.event_id}: {e.context}" for e in failure.events]
    assert failures(lines) == []
    # swap the two signatures; the template digests and PCR 10 are made to
    # match the forged list, so that only the signatures are wrong
    a, b = lines[1].split(), lines[2].split()
    a[5], b[5] = b[5], a[5]
    forged = [lines[0]] + [ima_sig_line(*fields) for fields in (a, b)]
    assert failures([lines[0]] + [ima_sig_line(*line.split()) for line in lines[1:]]) == []  # the helpers agree
    # each signature fails, so keylime falls back to the runtime policy, which
    # names no file: both are rejected
    failed = failures(forged)
    assert len(failed) == 2 and all("not_in_allowlist" in e for e in failed), failed
    assert str(dst / "rsa.sh") in failed[0] and str(dst / "ec.sh") in failed[1]


def ima_sig_line(pcr: str, _old: str, template: str, digest: str, name: str, sig: str) -> str:
    """An ima-sig ASCII line with its template digest computed by hand."""
    algo, hexd = digest.split(":")
    fields = [algo.encode() + b":\0" + bytes.fromhex(hexd), name.encode() + b"\0", bytes.fromhex(sig)]
    data = b"".join(struct.pack("<I", len(f)) + f for f in fields)
    return f"{pcr} {hashlib.sha1(data).hexdigest()} {template} {digest} {name} {sig}\n"


def pcr_of(lines: list[str]) -> str:
    value = bytes(20)
    for line in lines:
        value = hashlib.sha1(value + bytes.fromhex(line.split()[1])).digest()
    return value.hex()


def test_hostile_accesses_leave_the_daemon_serving(signed_tree, keys, mount_imafs):
    """A reader killed while its file is hashed, uid 1000 setting
    security.ima, an explicit event on a file that fails: the daemon goes on
    and appraises the next access as before."""
    src, dst = signed_tree
    m = mount_imafs("ima_policy=appraise_tcb", measure=[(src, dst)])
    add_key(m, keys["rsa"][1])
    big = src / "big.img"
    with open(big, "wb") as f:
        f.truncate(1 << 30)  # sparse: hashing it takes a second or more
    p = subprocess.Popen(["cat", str(dst / "big.img")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)
    p.kill()
    p.wait()
    assert run(dst / "rsa.sh").stdout == b"rsa ok\n"  # not held up by the hashing
    r = subprocess.run([*SETPRIV_1000, "setfattr", "-n", "security.ima", "-v", "0x0404" + "00" * 32,
                        str(dst / "unsigned.txt")], capture_output=True, text=True)
    assert r.returncode != 0 and "not permitted" in r.stderr, r
    with pytest.raises(OSError):
        os.getxattr(src / "unsigned.txt", "security.ima")
    r = m.cli("measure", "--func", "FILE_CHECK", "--mask", "MAY_READ", src / "unsigned.txt", check=False)
    assert r.returncode == 1 and "would fail with EACCES" in r.stderr, r
    assert '"denied": 13' in r.stdout
    with pytest.raises(PermissionError):
        open(dst / "unsigned.txt", "rb").close()
    assert m.client.call("status")["ok"]


def test_kexec_kernel_also_takes_platform_keys(tmp_path, tree, keys):
    """xattr_verify: a KEXEC_KERNEL_CHECK signature unknown to .ima is tried
    against .platform (the firmware's keys), nothing else is."""
    ima, log = kernel(tmp_path, "ima_policy=secure_boot", f"platform_keys={keys['rsa'][1]}")
    kernel_image = make(tree / "vmlinuz", os.urandom(4096), 0o644)
    ima_sign(kernel_image, keys["rsa"][0])
    module = make(tree / "mod.ko", os.urandom(4096), 0o644)
    ima_sign(module, keys["rsa"][0])
    assert "denied" not in event(ima, kernel_image, "KEXEC_KERNEL_CHECK", MAY_READ)
    # (on kernel_image a MODULE_CHECK would now take the cached result: the
    # kernel-read hooks share one, as in the kernel)
    assert event(ima, module, "MODULE_CHECK", MAY_READ)["denied"] == errno.EACCES
    assert audits(log) == [appraise_record("invalid-signature", module)]


def test_fuzzed_xattrs_through_a_mount_never_grant(signed_tree, keys, mount_imafs):
    """Hypothesis writes security.ima values (random, and headers naming a
    key that is on .ima) on the real file; every open through the mount
    fails with EACCES and the daemon keeps serving."""
    src, dst = signed_tree
    m = mount_imafs("ima_policy=appraise_tcb", measure=[(src, dst)])
    add_key(m, keys["rsa"][1])
    keyid = skid_tail(keys["rsa"][1])
    target = src / "unsigned.txt"
    header = st.builds(lambda kind, version, algo, body: struct.pack(">BBBIH", kind, version, algo,
                                                                     int.from_bytes(keyid, "big"), len(body)) + body,
                       st.sampled_from([D.EVM_IMA_XATTR_DIGSIG, D.IMA_VERITY_DIGSIG]), st.integers(0, 4),
                       st.integers(0, 30), st.binary(min_size=0, max_size=300))

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(value=st.one_of(st.binary(min_size=1, max_size=200), header))
    def check(value):
        os.setxattr(target, "security.ima", value)  # on SRC: a failure is never cached, each open reads it
        with pytest.raises(PermissionError):
            open(dst / "unsigned.txt", "rb").close()
    check()
    assert run(dst / "rsa.sh").stdout == b"rsa ok\n"
    assert m.client.call("status")["ok"]


def v3_file_sig(path: Path, key: Path, keyid: bytes, algo: str = "sha256") -> bytes:
    """A 7.1 v3 signature of a regular file (type 0x03, version 3) built by
    hand: `openssl pkeyutl` signs the hash of the ima_file_id (type, algo,
    file digest from `sha256sum`)."""
    digest = bytes.fromhex(run(f"{algo}sum", path).stdout.split()[0].decode())
    to_sign = hashlib.new(algo, bytes([D.EVM_IMA_XATTR_DIGSIG, T.HASH_ALGOS[algo][0]]) + digest).digest()
    sig = subprocess.run(["openssl", "pkeyutl", "-sign", "-inkey", str(key), "-pkeyopt", f"digest:{algo}"],
                         input=to_sign, capture_output=True, check=True).stdout
    return struct.pack(">BBBIH", D.EVM_IMA_XATTR_DIGSIG, 3, T.HASH_ALGOS[algo][0],
                       int.from_bytes(keyid, "big"), len(sig)) + sig


@pytest.mark.parametrize("kernel_version", ["7.2", "6.12"])
def test_sigv3_of_a_regular_file(tmp_path, tree, keys, kernel_version):
    """7.1 takes v3 signatures of regular files, and appraise_type=sigv3
    wants one; before, a v3 signature of type 0x03 is a bad version."""
    ima, log = kernel(tmp_path, f"kernel={kernel_version}")
    ima.add_key(".ima", keys["ec"][1].read_bytes())
    rule = "appraise func=BPRM_CHECK appraise_type=sigv3" if kernel_version == "7.2" else \
        "appraise func=BPRM_CHECK appraise_type=imasig"
    ima.policy.rules = [ima.policy.parser.parse(rule, lsm_rejected=False)]
    v3 = make(tree / "v3", b"#!/bin/sh\necho v3\n")
    os.setxattr(v3, "security.ima", v3_file_sig(v3, keys["ec"][0], skid_tail(keys["ec"][1])))
    v2 = make(tree / "v2", b"#!/bin/sh\necho v2\n")
    ima_sign(v2, keys["ec"][0])
    if kernel_version == "7.2":
        assert "denied" not in event(ima, v3, "BPRM_CHECK", MAY_EXEC)
        assert event(ima, v2, "BPRM_CHECK", MAY_EXEC)["denied"] == errno.EACCES
        assert audits(log) == [appraise_record("IMA-sigv3-required", v2)]
    else:
        assert event(ima, v3, "BPRM_CHECK", MAY_EXEC)["denied"] == errno.EACCES
        assert "denied" not in event(ima, v2, "BPRM_CHECK", MAY_EXEC)
        assert audits(log) == [appraise_record("invalid-signature-version", v3)]


def test_appraise_algos_denies_other_algorithms(tmp_path, tree):
    ima, log = kernel(tmp_path)
    ima.policy.rules = [ima.policy.parser.parse("appraise func=FILE_CHECK appraise_algos=sha512",
                                                lsm_rejected=False)]
    ok, other = make(tree / "ok", b"ok\n", 0o644), make(tree / "other", b"other\n", 0o644)
    ima_hash(ok, "sha512")
    ima_hash(other, "sha256")
    assert "denied" not in event(ima, ok)
    assert event(ima, other)["denied"] == errno.EACCES
    assert audits(log) == [appraise_record("denied-hash-algorithm", other, op="collect_data")]


def test_setxattr_hash_algorithms(signed_tree, mount_imafs):
    """validate_hash_algo: without a SETXATTR_CHECK rule a security.ima naming
    an algorithm the kernel lacks is refused; with one, any algorithm it
    does not list.  Each refusal is EACCES and a set_data record."""
    src, dst = signed_tree
    m = mount_imafs(measure=[(src, dst)])
    target = dst / "unsigned.txt"
    tgr128 = "0x040e" + "00" * 16  # the Tiger hashes left the kernel: unavailable
    r = subprocess.run(["setfattr", "-n", "security.ima", "-v", tgr128, str(target)], capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    run("setfattr", "-n", "security.ima", "-v", "0x0406" + "00" * 64, target)  # sha512: built in
    with open(m.ima / "policy", "w") as p:
        p.write("appraise func=SETXATTR_CHECK appraise_algos=sha256\n")
    r = subprocess.run(["setfattr", "-n", "security.ima", "-v", "0x0406" + "11" * 64, str(target)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r
    assert os.getxattr(src / "unsigned.txt", "security.ima") == b"\x04\x06" + bytes(64)
    run("setfattr", "-n", "security.ima", "-v", "0x0404" + "00" * 32, target)
    st_ = os.stat(src / "unsigned.txt")
    records = dmesg_audits(m)
    for record, cause in zip(records, ["unavailable-hash-algorithm", "denied-hash-algorithm"]):
        assert re.fullmatch(rf'pid=\d+ uid=0 auid=\d+ ses=\d+ subj=unconfined op=set_data cause={cause} '
                            rf'comm="setfattr" name="{re.escape(str(src / "unsigned.txt"))}" dev="[^"]+" '
                            rf'ino={st_.st_ino} res=0 errno=0', record), record
    assert len(records) == 2
