"""Keys and keyrings: certificates made with openssl, key ids checked against
the headers of `evmctl ima_sign` signatures, the trusted keyring's
restriction, KEY_CHECK records checked by hand and by `evmctl ima_measurement`,
the early-boot key queue, and hostile input on a real mount."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.keyqueue import KeyQueue
from imafs.keys import BUILTIN, IMA, MACHINE, KeyringError, Keyrings, load_certs, parse_cert, tbs_digest

from .test_evmctl import assert_matched, evmctl_replay
from . import test_readme

needs_evmctl = pytest.mark.skipif(shutil.which("evmctl") is None, reason="evmctl not installed")


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def self_signed(d: Path, name: str, subj: str, ec: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate (PEM) and its private key, as a user makes a test key."""
    key, cert = d / f"{name}.key", d / f"{name}.pem"
    newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if ec else ["-newkey", "rsa:2048"]
    openssl("req", "-x509", *newkey, "-nodes", "-keyout", key, "-out", cert, "-subj", subj, "-days", "30", cwd=d)
    return cert, key


def signed_by(d: Path, name: str, subj: str, ca: Path, ca_key: Path) -> tuple[Path, Path]:
    """A leaf certificate signed by ``ca`` (SKID and AKID as the kernel's docs make them)."""
    key, csr, cert, ext = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.pem", d / f"{name}.ext"
    ext.write_text("subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                   "basicConstraints=critical,CA:FALSE\nkeyUsage=digitalSignature\n")
    openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subj, cwd=d)
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
            "-days", "30", "-extfile", ext, cwd=d)
    return cert, key


def der(cert: Path) -> bytes:
    return load_certs(cert.read_bytes())[0]


@pytest.fixture(scope="module")
def certs():
    """RSA 2048 and ECDSA P-256 self-signed keys, a CA, a leaf it signed, and
    a second CA; in a directory every uid can read."""
    d = Path(tempfile.mkdtemp(prefix="imafs-keys-", dir="/tmp"))
    d.chmod(0o755)
    c = {}
    c["rsa"], c["rsa_key"] = self_signed(d, "rsa", "/O=Test Org/CN=RSA signing key")
    c["ec"], c["ec_key"] = self_signed(d, "ec", "/CN=imafs test EC key", ec=True)
    c["ca"], c["ca_key"] = self_signed(d, "ca", "/O=imafs testing/CN=imafs test CA")
    c["leaf"], c["leaf_key"] = signed_by(d, "leaf", "/O=imafs/CN=imafs IMA leaf", c["ca"], c["ca_key"])
    c["ca2"], c["ca2_key"] = self_signed(d, "ca2", "/CN=machine owner CA")
    c["leaf2"], c["leaf2_key"] = signed_by(d, "leaf2", "/CN=signed by the machine CA", c["ca2"], c["ca2_key"])
    (d / "rsa.der").write_bytes(der(c["rsa"]))
    c["rsa_der"] = d / "rsa.der"
    c["dir"] = d
    for p in d.iterdir():
        p.chmod(0o644)
    yield c
    shutil.rmtree(d, ignore_errors=True)


def evmctl_keyid(tmp_path: Path, key: Path) -> bytes:
    """The key id `evmctl ima_sign` writes in a signature_v2_hdr (bytes 3..6)."""
    f = tmp_path / "signed"
    f.write_bytes(b"signed content\n")
    subprocess.run(["evmctl", "ima_sign", "--key", str(key), "-a", "sha256", str(f)], check=True,
                   capture_output=True, timeout=60)
    sig = os.getxattr(f, "security.ima")
    assert sig[0] == 3 and sig[1] == 2  # EVM_IMA_XATTR_DIGSIG, version 2
    return sig[3:7]


# -- the plain objects ---------------------------------------------------------------
@needs_evmctl
@pytest.mark.parametrize("name", ["rsa", "ec", "leaf"])
def test_key_id_is_the_one_evmctl_signs_with(certs, tmp_path, name):
    key = parse_cert(certs[name].read_bytes())
    assert key.id == evmctl_keyid(tmp_path, certs[f"{name}_key"])
    rings = Keyrings()
    rings.add(IMA, certs[name].read_bytes())
    assert rings.find(IMA, key.id) is not None and rings.find(IMA, b"\0\0\0\0") is None


def test_subject_and_description_as_the_kernel_makes_them(certs):
    rsa = parse_cert(certs["rsa"].read_bytes())
    assert rsa.subject == "Test Org: RSA signing key"
    # O is not a prefix of CN but their first 7 bytes agree: the kernel keeps CN alone
    assert parse_cert(certs["ca"].read_bytes()).subject == "imafs test CA"
    assert parse_cert(certs["leaf"].read_bytes()).subject == "imafs IMA leaf"  # O is a prefix of CN
    assert parse_cert(certs["ec"].read_bytes()).subject == "imafs test EC key"
    assert rsa.description == f"{rsa.subject}: {rsa.skid.hex()}"
    assert rsa.skid[-4:] == rsa.id and parse_cert(der(certs["rsa"])) == rsa


def test_o_and_cn_that_differ(tmp_path):
    cert, _ = self_signed(tmp_path, "x", "/O=Example Corp/CN=Signing key")
    assert parse_cert(cert.read_bytes()).subject == "Example Corp: Signing key"
    cert, _ = self_signed(tmp_path, "y", "/emailAddress=root@example.org")
    assert parse_cert(cert.read_bytes()).subject == "root@example.org"


def test_trusted_ima_takes_only_keys_a_builtin_key_signed(certs):
    rings = Keyrings(trusted=True)
    assert rings.name(".ima") == ".ima" and Keyrings().name(".ima") == "_ima"
    rings.add(BUILTIN, certs["ca"].read_bytes(), boot=True)
    with pytest.raises(KeyringError) as e:
        rings.add(IMA, certs["rsa"].read_bytes())  # self-signed
    assert e.value.errno == errno.ENOKEY
    leaf = rings.add(IMA, certs["leaf"].read_bytes())
    assert rings.find(".ima", leaf.id) == leaf
    # a signature that does not verify: one bit of the leaf's signature flipped
    bad = bytearray(der(certs["leaf"]))
    bad[-5] ^= 1
    with pytest.raises(KeyringError) as e:
        rings.add(IMA, bytes(bad))
    assert e.value.errno == errno.EKEYREJECTED
    # a key signed by a CA on .machine: only with the secondary keyring permitted
    rings.add(MACHINE, certs["ca2"].read_bytes(), boot=True)
    with pytest.raises(KeyringError) as e:
        rings.add(IMA, certs["leaf2"].read_bytes())
    assert e.value.errno == errno.ENOKEY
    secondary = Keyrings(trusted=True, permit_secondary=True)
    secondary.add(MACHINE, certs["ca2"].read_bytes(), boot=True)
    assert secondary.add(IMA, certs["leaf2"].read_bytes()).keyring == ".ima"


def test_untrusted_ima_takes_any_key_but_not_from_other_users(certs):
    rings = Keyrings()
    assert rings.add(".ima", certs["rsa"].read_bytes()).keyring == "_ima"
    with pytest.raises(KeyringError) as e:
        rings.add(".ima", certs["ec"].read_bytes(), uid=1000)
    assert e.value.errno == errno.EACCES
    for ring in (BUILTIN, MACHINE, ".platform"):  # filled at boot; no write for root
        with pytest.raises(KeyringError) as e:
            rings.add(ring, certs["ec"].read_bytes())
        assert e.value.errno == errno.EACCES
    assert [k.subject for k in rings] == ["Test Org: RSA signing key"]


def test_blacklist(certs):
    rings = Keyrings()
    digest = hashlib.sha256(b"bad file").digest()
    assert not rings.blacklisted(digest)
    rings.add_blacklist(f"bin:{digest.hex()}")
    assert rings.blacklisted(digest) and rings.blacklist() == [f"bin:{digest.hex()}"]
    ec = parse_cert(certs["ec"].read_bytes())
    tbs = hashlib.sha256(ec.cert.tbs_certificate_bytes).digest()  # 7.0+: SHA-256, whatever signed it
    assert tbs_digest(ec.cert) == tbs
    rings.add_blacklist(f"tbs:{tbs.hex()}")
    with pytest.raises(KeyringError) as e:
        rings.add(IMA, certs["ec"].read_bytes())
    assert e.value.errno == errno.EKEYREJECTED


def test_blacklisted_tbs_before_7_0_uses_the_signature_hash(tmp_path):
    key, cert = tmp_path / "k.key", tmp_path / "k.pem"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-sha384", "-nodes", "-keyout", key, "-out", cert,
            "-subj", "/CN=k", cwd=tmp_path)
    tbs = parse_cert(cert.read_bytes()).cert.tbs_certificate_bytes
    for tbs_sha256, digest in ((False, hashlib.sha384(tbs)), (True, hashlib.sha256(tbs))):
        rings = Keyrings(tbs_sha256=tbs_sha256)
        rings.add_blacklist(f"tbs:{digest.hexdigest()}")
        with pytest.raises(KeyringError) as e:
            rings.add(IMA, cert.read_bytes())
        assert e.value.errno == errno.EKEYREJECTED
        other = Keyrings(tbs_sha256=not tbs_sha256)
        other.add_blacklist(f"tbs:{digest.hexdigest()}")
        assert other.add(IMA, cert.read_bytes()).subject == "k"
    for bad in ("bin:", "bin:abc", "sha256:00", "bin:ABCD", "tbs:zz"):
        with pytest.raises(KeyringError) as e:
            rings.add_blacklist(bad)
        assert e.value.errno == errno.EINVAL


@given(st.text(max_size=80))
def test_blacklist_entries_fuzzed(text):
    """An entry is taken exactly when it is bin:/tbs: and whole bytes of lower-case hex."""
    from imafs.keys import blacklist_entry
    import re
    stripped = text.strip()
    ok = re.fullmatch(r"(bin|tbs):(?:[0-9a-f]{2})+", stripped) is not None
    try:
        assert blacklist_entry(text) == stripped and ok
    except KeyringError as e:
        assert e.errno == errno.EINVAL and not ok


def test_bad_certificates(certs):
    good = der(certs["rsa"])
    for data, err in [(b"", errno.EBADMSG), (b"\x30\x03\x02\x01", errno.EBADMSG), (good[:200], errno.EBADMSG),
                      (certs["rsa_key"].read_bytes(), errno.EBADMSG),
                      (certs["rsa"].read_bytes() + certs["ec"].read_bytes(), errno.EBADMSG),
                      (b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n", errno.EBADMSG)]:
        with pytest.raises(KeyringError) as e:
            parse_cert(data)
        assert e.value.errno == err


@pytest.mark.parametrize("newkey", [["ed25519"], ["ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"]])
def test_keys_the_kernel_has_no_code_for(tmp_path, newkey):
    key, cert = tmp_path / "k.key", tmp_path / "k.pem"
    openssl("req", "-x509", "-newkey", *newkey, "-nodes", "-keyout", key, "-out", cert, "-subj", "/CN=k",
            cwd=tmp_path)
    with pytest.raises(KeyringError) as e:
        parse_cert(cert.read_bytes())
    assert e.value.errno == errno.ENOPKG


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_certificates_are_refused_cleanly(certs, data):
    """Any byte string, or a real certificate with bytes changed, cut or
    added: a Key or a KeyringError, nothing else."""
    base = der(certs[data.draw(st.sampled_from(["rsa", "ec", "leaf"]))])
    kind = data.draw(st.sampled_from(["random", "flip", "cut", "pem"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=2000))
    elif kind == "flip":
        blob = bytearray(base)
        for _ in range(data.draw(st.integers(1, 8))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    elif kind == "cut":
        blob = base[:data.draw(st.integers(0, len(base)))] + data.draw(st.binary(max_size=20))
    else:
        blob = b"-----BEGIN " + data.draw(st.binary(max_size=200)) + b"-----END CERTIFICATE-----\n"
    rings = Keyrings(trusted=data.draw(st.booleans()))
    rings.add(BUILTIN, der(certs["ca"]), boot=True)
    try:
        key = rings.add(IMA, blob)
    except KeyringError as e:
        assert e.errno in (errno.EBADMSG, errno.ENOPKG, errno.ENOKEY, errno.EKEYREJECTED)
    else:
        assert len(key.id) == 4 and rings.find(IMA, key.id) is not None


def test_key_queue_waits_for_a_policy_or_times_out():
    now = [0.0]
    q = KeyQueue(300, clock=lambda: now[0])
    assert q.queue(".ima", b"a") and q.queue(".builtin_trusted_keys", b"b")
    assert q.process() == [(".ima", b"a"), (".builtin_trusted_keys", b"b")]
    assert not q.queue(".ima", b"c") and q.process() == []  # measured as they come from now on
    q = KeyQueue(300, clock=lambda: now[0])
    q.queue(".ima", b"a")
    now[0] = 300.0
    assert not q.queue(".ima", b"late") and q.process() == [] and q.timer_expired


# -- a real mount ---------------------------------------------------------------------
def write_policy(m, text: str) -> None:
    with open(m.ima / "policy", "w") as f:
        f.write(text)


def ima_buf_records(m) -> list[tuple[str, bytes]]:
    """(name, buffer) of the ima-buf records of the ASCII list."""
    out = []
    for line in m.read("ascii_runtime_measurements").decode().splitlines():
        f = line.split(" ")
        if f[2] == "ima-buf":
            out.append((f[4], bytes.fromhex(f[5])))
    return out


def test_add_and_list(mount_imafs, certs):
    m = mount_imafs(f"machine_keys={certs['rsa_der']}")
    r = m.cli("keys", "add", "--keyring", ".ima", certs["rsa"])
    rsa = parse_cert(certs["rsa"].read_bytes())
    assert r.stdout.startswith(f"_ima {rsa.id.hex()} {rsa.subject}: queued")
    m.cli("keys", "add", certs["ec"])
    lines = m.cli("keys", "list").stdout.splitlines()
    ec = parse_cert(certs["ec"].read_bytes())
    assert lines[0].split() == ["KEYRING", "ID", "SUBJECT"]
    assert [ln.split(None, 2) for ln in lines[1:]] == [
        [".machine", rsa.id.hex(), rsa.subject], ["_ima", rsa.id.hex(), rsa.subject], ["_ima", ec.id.hex(), ec.subject]]
    import json
    listed = json.loads(m.cli("keys", "list", "--json").stdout)
    assert {"keyring": "_ima", "id": ec.id.hex(), "subject": ec.subject, "description": ec.description} \
        in listed["keys"]
    # the same certificate again replaces the key of the same description
    m.cli("keys", "add", certs["ec"])
    assert len(json.loads(m.cli("keys", "list", "--json").stdout)["keys"]) == 3
    # keyrings are the running kernel's: a reboot leaves only what the boot loads
    m.cli("reboot")
    assert [ln.split()[0] for ln in m.cli("keys", "list").stdout.splitlines()[1:]] == [".machine"]


def kernel_ima_buf_digest(name: str, buf: bytes) -> tuple[bytes, bytes]:
    """The file digest and the sha1 template digest of an ima-buf record, by hand:
    d-ng = "sha256:" NUL digest, n-ng = name NUL, buf; each field u32-length-prefixed."""
    digest = hashlib.sha256(buf).digest()
    d_ng = b"sha256:\0" + digest
    n_ng = name.encode() + b"\0"
    data = b"".join(struct.pack("<I", len(x)) + x for x in (d_ng, n_ng, buf))
    return digest, hashlib.sha1(data).digest()


@needs_evmctl
def test_key_check_record_is_the_kernels(mount_imafs, certs, tmp_path):
    m = mount_imafs("integrity_trusted_keyring=true", f"builtin_trusted_keys={certs['ca']}")
    write_policy(m, "measure func=KEY_CHECK keyrings=.ima template=ima-buf\n")
    leaf_der = der(certs["leaf"])
    r = m.cli("keys", "add", certs["leaf"])  # PEM in, the DER is what the kernel gets
    assert r.stdout.rstrip().endswith(": measure")
    digest, template_digest = kernel_ima_buf_digest(".ima", leaf_der)
    line = m.read("ascii_runtime_measurements").decode().splitlines()[-1]
    assert line == f"10 {template_digest.hex()} ima-buf sha256:{digest.hex()} .ima {leaf_der.hex()}"
    assert ima_buf_records(m) == [(".ima", leaf_der)]  # the CA on .builtin_trusted_keys: not named
    assert_matched(evmctl_replay(m, tmp_path))


def test_trusted_keyring_refuses_a_self_signed_key(mount_imafs, certs):
    m = mount_imafs("integrity_trusted_keyring=true", f"builtin_trusted_keys={certs['ca']}")
    r = m.cli("keys", "add", "--keyring", ".ima", certs["rsa"], check=False)
    assert r.returncode == 1
    assert r.stderr.startswith(f"imafs: cannot add {certs['rsa']} to .ima: Required key not available (ENOKEY): ")
    assert "self-signed" in r.stderr
    r = m.cli("keys", "add", "--keyring", ".builtin_trusted_keys", certs["rsa"], check=False)
    assert "Permission denied (EACCES): .builtin_trusted_keys takes keys only at boot" in r.stderr
    m.cli("keys", "add", "--keyring", ".ima", certs["leaf"])
    ca, leaf = parse_cert(certs["ca"].read_bytes()), parse_cert(certs["leaf"].read_bytes())
    assert [ln.split(None, 2) for ln in m.cli("keys", "list").stdout.splitlines()[1:]] == [
        [".builtin_trusted_keys", ca.id.hex(), ca.subject], [".ima", leaf.id.hex(), leaf.subject]]
    log = [line.split("] ", 1)[1] for line in m.cli("dmesg").stdout.splitlines()]
    # certs/ loads the builtin keys before IMA starts
    assert log[:3] == ["Loading compiled-in X.509 certificates", f"Loaded X.509 cert '{ca.description}'",
                       "ima: Allocated hash algorithm: sha256"]


def test_keys_queued_until_the_policy_loads(mount_imafs, certs):
    """Builtin keys (loaded before IMA's init) and keys added before the first
    custom policy wait; that policy measures those its KEY_CHECK rule names."""
    m = mount_imafs(f"builtin_trusted_keys={certs['ca']}", f"machine_keys={certs['ec']}")
    log = [line.split("] ", 1)[1] for line in m.cli("dmesg").stdout.splitlines()]
    ec = parse_cert(certs["ec"].read_bytes())
    assert log[-2:] == ["integrity: Loading X.509 certificate: UEFI:MokListRT (MOKvar table)",
                        f"integrity: Loaded X.509 cert '{ec.description}'"]  # after IMA's init
    m.cli("keys", "add", certs["rsa"])
    assert ima_buf_records(m) == []
    write_policy(m, "measure func=KEY_CHECK keyrings=.builtin_trusted_keys|_ima\n")
    assert ima_buf_records(m) == [(".builtin_trusted_keys", der(certs["ca"])), ("_ima", der(certs["rsa"]))]
    # from now on keys are measured as they come, by the policy of the moment
    m.cli("keys", "add", certs["leaf"])
    assert ima_buf_records(m)[2:] == [("_ima", der(certs["leaf"]))]


def test_queued_keys_are_dropped_when_the_timer_ran_out(mount_imafs, certs):
    m = mount_imafs(f"builtin_trusted_keys={certs['ca']}", "key_queue_timeout=0",
                    "ima_policy=tcb")
    m.cli("keys", "add", certs["rsa"])  # the built-in tcb policy has no KEY_CHECK rule
    write_policy(m, "measure func=KEY_CHECK\n")
    assert ima_buf_records(m) == []
    m.cli("keys", "add", certs["ec"])
    assert ima_buf_records(m) == [("_ima", der(certs["ec"]))]


def test_a_keyring_of_ones_own(mount_imafs, certs):
    """LTP's ima_keys.sh: a key imported into a new keyring that a KEY_CHECK
    rule names is measured; the record's buffer is the certificate's DER."""
    m = mount_imafs()
    write_policy(m, "measure func=KEY_CHECK keyrings=key_import_test template=ima-buf\n")
    m.cli("keys", "add", "--keyring", "key_import_test", certs["rsa_der"])
    m.cli("keys", "add", certs["ec"])  # _ima: not named
    assert ima_buf_records(m) == [("key_import_test", der(certs["rsa"]))]
    for line in m.read("ascii_runtime_measurements").decode().splitlines()[1:]:
        f = line.split(" ")  # LTP: the digest is the hash of the hex-decoded buffer
        assert f[3] == "sha256:" + hashlib.sha256(bytes.fromhex(f[5])).hexdigest()
    rsa = parse_cert(certs["rsa"].read_bytes())
    assert ["key_import_test", rsa.id.hex(), rsa.subject] in [
        ln.split(None, 2) for ln in m.cli("keys", "list").stdout.splitlines()]
    r = m.cli("keys", "add", "--keyring", "x" * 4096, certs["rsa"], check=False)
    assert "Invalid argument (EINVAL)" in r.stderr


def test_the_hook_for_keys_on_other_keyrings(mount_imafs, certs):
    """key_check: IMA's hook for a key imafs does not hold (imafs run's
    add_key): the same queue, then the policy."""
    m = mount_imafs()
    payload = der(certs["ec"])
    assert m.client.call("key_check", keyring="_uid.0", data_hex=payload.hex())["queued"]
    write_policy(m, "measure func=KEY_CHECK keyrings=_uid.0|.ima\n")
    assert ima_buf_records(m) == [("_uid.0", payload)]
    answer = m.client.call("key_check", keyring=".ima", data_hex=der(certs["rsa"]).hex())
    assert (answer["queued"], answer["added"], answer["decision"]) == (False, True, "measure")
    assert not m.client.call("key_check", keyring=".ima", data_hex="")["added"]  # no payload: not measured
    from imafs.control import ControlError
    with pytest.raises(ControlError, match="not a hexadecimal string"):
        m.client.call("key_check", keyring=".ima", data_hex="zz")
    assert ima_buf_records(m) == [("_uid.0", payload), (".ima", der(certs["rsa"]))]


def test_key_check_rule_with_uid(mount_imafs, certs):
    m = mount_imafs("write_policy=true")
    write_policy(m, "measure func=KEY_CHECK uid=1000\n")
    m.cli("keys", "add", certs["rsa"])  # root adds it: no rule matches
    write_policy(m, "measure func=KEY_CHECK keyrings=_ima uid=0\n")
    m.cli("keys", "add", certs["ec"])
    assert ima_buf_records(m) == [("_ima", der(certs["ec"]))]


def test_hostile_input_never_hurts_the_daemon(mount_imafs, certs, tmp_path):
    m = mount_imafs()
    d = Path(tempfile.mkdtemp(prefix="imafs-keys-bad-", dir="/tmp"))
    try:
        (d / "garbage").write_bytes(os.urandom(3000))
        (d / "truncated.der").write_bytes(der(certs["rsa"])[:500])
        (d / "huge").write_bytes(b"\x30\x84" + b"\0" * (4 << 20))
        os.mkfifo(d / "fifo")
        cases = {d / "garbage": "Bad message (EBADMSG)", d / "truncated.der": "Bad message (EBADMSG)",
                 certs["rsa_key"]: "a PEM PRIVATE KEY block", d / "huge": "larger than",
                 d / "fifo": "not a regular file", d: "not a regular file", d / "missing": "No such file",
                 Path("/dev/zero"): "not a regular file"}
        for path, message in cases.items():
            r = m.cli("keys", "add", path, check=False)
            assert r.returncode == 1 and message in r.stderr, (path, r.stderr)
        for keyring, message in [(".blacklist", "not certificates"), (".nope", "no keyring '.nope'"),
                                 (".platform", "only at boot"), (".machine", "only at boot")]:
            r = m.cli("keys", "add", "--keyring", keyring, certs["rsa"], check=False)
            assert r.returncode == 1 and message in r.stderr, r.stderr
        # an emulated caller other than root: the keyrings grant nothing to others
        from imafs.control import ControlError
        with pytest.raises(ControlError, match=r"Permission denied \(EACCES\)"):
            m.client.call("keys_add", keyring=".ima", cert=str(certs["rsa"]), uid=1000)
        with pytest.raises(ControlError, match="cert must be an absolute path"):
            m.client.call("keys_add", keyring=".ima", cert="rsa.pem")
        # a real uid-1000 process cannot reach the control socket at all
        r = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups", sys.executable,
                            "-m", "imafs", "keys", "add", "--mount", str(m.path), str(certs["rsa"])],
                           capture_output=True, text=True, timeout=60, env={**os.environ})
        assert r.returncode == 1 and "Permission denied" in r.stderr, r.stderr
        r = m.cli("keys", "blacklist", "bin:xyz", check=False)
        assert r.returncode == 1 and "Invalid argument (EINVAL)" in r.stderr
        # a client killed halfway through its request line
        import socket
        from imafs.control import socket_path
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(socket_path(str(m.path))))
            s.sendall(b'{"cmd": "keys_add", "keyring": ".ima", "cert": "/tm')
        assert m.cli("keys", "list").stdout.splitlines()[1:] == []
        m.cli("keys", "add", certs["ec"])
        assert len(m.cli("keys", "list").stdout.splitlines()) == 2
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_blacklist_from_the_profile_and_the_cli(mount_imafs, certs):
    bad = hashlib.sha256(b"x").hexdigest()
    m = mount_imafs(f"blacklist_hashes=bin:{bad}")
    tbs = tbs_digest(parse_cert(certs["ec"].read_bytes()).cert).hex()
    assert m.cli("keys", "blacklist", f"tbs:{tbs}").stdout == f"tbs:{tbs}\n"
    r = m.cli("keys", "add", certs["ec"], check=False)
    assert "Key was rejected by service (EKEYREJECTED)" in r.stderr
    rows = [ln.split() for ln in m.cli("keys", "list").stdout.splitlines()[1:]]
    assert rows == [[".blacklist", "-", f"bin:{bad}"], [".blacklist", "-", f"tbs:{tbs}"]]


def test_a_blacklisted_boot_certificate_is_left_out(mount_imafs, certs):
    tbs = tbs_digest(parse_cert(certs["ca"].read_bytes()).cert).hex()
    m = mount_imafs(f"builtin_trusted_keys={certs['ca']}", f"blacklist_hashes=tbs:{tbs}",
                    f"platform_keys={certs['ca']}")
    log = [line.split("] ", 1)[1] for line in m.cli("dmesg").stdout.splitlines()]
    assert log[:3] == ["Loading compiled-in X.509 certificates", f"X.509: Cert {tbs} is blacklisted",
                       f"Problem loading in-kernel X.509 certificate (-{errno.EKEYREJECTED})"]
    assert log[-3:] == ["integrity: Loading X.509 certificate: UEFI:db", f"X.509: Cert {tbs} is blacklisted",
                        f"integrity: Problem loading X.509 certificate -{errno.EKEYREJECTED}"]
    assert [ln.split()[0] for ln in m.cli("keys", "list").stdout.splitlines()[1:]] == [".blacklist"]
    m.cli("reboot")  # the same at every boot, and the daemon lives on
    assert [ln.split()[0] for ln in m.cli("keys", "list").stdout.splitlines()[1:]] == [".blacklist"]


def test_profile_errors_name_the_key(certs, tmp_path):
    from imafs.profile import ProfileError, load_profile
    with pytest.raises(ProfileError, match=r"builtin_trusted_keys: .*: Bad message"):
        load_profile(None, [f"builtin_trusted_keys={certs['rsa_key']}"])
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(ProfileError, match="not a regular file"):
        load_profile(None, [f"machine_keys={tmp_path / 'fifo'}"])
    with pytest.raises(ProfileError, match="blacklist_hashes: .*bin:<hex>"):
        load_profile(None, ["blacklist_hashes=bin:0"])
    p = load_profile(None, [f"builtin_trusted_keys={certs['ca']}", "integrity_trusted_keyring=yes"])
    assert p.boot_certs == ((BUILTIN, (der(certs["ca"]),)),) and p.integrity_trusted_keyring


readme_paths = test_readme.readme_paths  # the fixture of the README's paths


def test_readme_keys_block(readme_paths, tmp_path):
    """The README's Keys section runs as written; its key id is evmctl's."""
    r = test_readme.run_readme_block("Keys and keyrings", readme_paths, tmp_path / "work")
    key = parse_cert((tmp_path / "work" / "ima.pem").read_bytes())
    assert ["_ima", key.id.hex(), "my IMA key"] in [ln.split(None, 2) for ln in r.stdout.splitlines()]
    assert f" ima-buf sha256:{hashlib.sha256(key.der).hexdigest()} _ima {key.der.hex()}\n" in r.stdout
