"""Hook events through the policy, and the sample policies."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from imafs import templates as T
from imafs.fsinfo import fs_info

from .test_evmctl import evmctl_replay, assert_matched

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def measure(m, *args):
    return json.loads(m.cli("measure", *args).stdout)


def ng_line(pcr: int, name: str, content: bytes, template="ima-ng") -> bytes:
    """The sha256-file ASCII line, computed by hand."""
    tmpl = T.lookup_template(template)
    ev = T.Event(name=name.encode(), file_digest=hashlib.sha256(content).digest(), file_algo="sha256",
                 d_digest=hashlib.sha1(content).digest(), ima_hash="sha256")
    fields = T.encode_fields(tmpl, ev)
    return T.ascii_record(pcr, T.template_digest("sha256", tmpl, fields), tmpl, fields)


def test_tcb_scenario(mount_imafs, tmp_path):
    assert fs_info(str(tmp_path)).name != "tmpfs", "this scenario needs a disk filesystem under the test dir"
    m = mount_imafs("ima_policy=tcb")
    a = tmp_path / "a.txt"
    a.write_bytes(b"first\n")
    r = measure(m, a, "--func", "FILE_CHECK", "--mask", "MAY_READ")
    assert r["added"] and r["rule"] == "measure func=FILE_CHECK mask=^MAY_READ euid=0"
    assert not measure(m, a, "--func", "FILE_CHECK", "--mask", "MAY_READ")["added"]  # same content
    a.write_bytes(b"second\n")
    assert measure(m, a, "--func", "FILE_CHECK", "--mask", "MAY_READ")["added"]
    script = tmp_path / "run.sh"
    script.write_bytes(b"#!/bin/sh\necho hi\n")
    assert measure(m, script, "--func", "BPRM_CHECK", "--mask", "MAY_EXEC")["added"]
    b = tmp_path / "user.txt"
    b.write_bytes(b"user data\n")
    r = measure(m, b, "--func", "FILE_CHECK", "--mask", "MAY_READ", "--uid", "1000", "--euid", "1000",
                "--gid", "1000", "--egid", "1000")
    assert not r["added"] and r["rule"] is None and "not measured" in r["decision"]
    assert measure(m, b, "--func", "MMAP_CHECK", "--mask", "MAY_EXEC", "--uid", "1000", "--euid", "1000")["added"]
    r = measure(m, "/proc/self/status", "--func", "FILE_CHECK", "--mask", "MAY_READ")
    assert r["decision"] == "dont_measure" and r["rule"] == "dont_measure fsmagic=0x9fa0"
    lines = m.read("ascii_runtime_measurements_sha256").splitlines(keepends=True)
    assert lines[1:] == [ng_line(10, str(a), b"first\n"), ng_line(10, str(a), b"second\n"),
                         ng_line(10, str(script), b"#!/bin/sh\necho hi\n"), ng_line(10, str(b), b"user data\n")]
    last = m.client.call("status")["last_events"][-1]["name"]  # the path resolved by the CLI
    assert last.startswith("/proc/") and last.endswith("/status") and last != "/proc/self/status"
    assert_matched(evmctl_replay(m, tmp_path))


def test_custom_rules_pcr_and_template(mount_imafs, tmp_path):
    m = mount_imafs("write_policy=true")
    pol = tmp_path / "p.policy"
    pol.write_text("measure func=BPRM_CHECK pcr=9\nmeasure func=FILE_CHECK template=ima\nmeasure func=POLICY_CHECK\n")
    fd = os.open(m.ima / "policy", os.O_WRONLY)
    os.write(fd, os.fsencode(pol) + b"\n")
    os.close(fd)
    f = tmp_path / "f"
    f.write_bytes(b"data\n")
    measure(m, f, "--func", "BPRM_CHECK", "--mask", "MAY_EXEC")
    measure(m, f, "--func", "FILE_CHECK", "--mask", "MAY_READ")  # another PCR/template: a new record
    lines = m.read("ascii_runtime_measurements_sha256").splitlines(keepends=True)
    assert lines[-2] == ng_line(9, str(f), b"data\n")
    sha1 = hashlib.sha1(b"data\n").digest()
    tmpl = T.BUILTIN_TEMPLATES["ima"]
    fields = (sha1, str(f).encode() + b"\0")
    assert lines[-1] == T.ascii_record(10, T.template_digest("sha256", tmpl, fields), tmpl, fields)
    # a policy file loaded by path is measured through POLICY_CHECK once the policy says so
    fd = os.open(m.ima / "policy", os.O_WRONLY)
    os.write(fd, os.fsencode(pol) + b"\n")
    os.close(fd)
    assert m.read("ascii_runtime_measurements").splitlines()[-1].endswith(str(pol).encode())


def test_buffer_hooks(mount_imafs, tmp_path):
    m = mount_imafs("write_policy=true")
    subprocess.run(["sh", "-c", f"cat {POLICIES / 'keys-critical-data.policy'} > {m.ima / 'policy'}"], check=True)
    r = measure(m, "--func", "KEY_CHECK", "--name", ".ima", "--keyring", ".ima", "--data-hex", "3082")
    assert r["added"]
    r = measure(m, "--func", "KEY_CHECK", "--name", ".other", "--keyring", ".other", "--data-hex", "3082")
    assert not r["added"] and r["rule"] is None
    assert measure(m, "--func", "KEXEC_CMDLINE", "--name", "kexec-cmdline",
                   "--data-hex", b"root=/dev/vda".hex())["added"]
    lines = m.read("ascii_runtime_measurements").decode().splitlines()
    assert lines[-2].split(" ")[2:] == ["ima-buf", "sha256:" + hashlib.sha256(b"\x30\x82").hexdigest(), ".ima", "3082"]
    assert lines[-1].endswith(" kexec-cmdline " + b"root=/dev/vda".hex())
    bad = m.cli("measure", "--func", "KEY_CHECK", "--name", "x", "--data-hex", "zz", check=False)
    assert bad.returncode == 1 and "hexadecimal" in bad.stderr


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.policy")))
def test_sample_policies_load(mount_imafs, name):
    m = mount_imafs("write_policy=true", "read_policy=true")
    r = subprocess.run(["sh", "-c", f"cat {POLICIES / name} > {m.ima / 'policy'}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rules = [line for line in (POLICIES / name).read_text().splitlines() if line and not line.startswith("#")]
    assert m.read("policy").decode().count("\n") == len(rules)


def test_tcb_sample_is_the_builtin(mount_imafs):
    m = mount_imafs("write_policy=true", "read_policy=true")
    builtin = mount_imafs("ima_policy=tcb", "read_policy=true").read("policy")
    subprocess.run(["sh", "-c", f"cat {POLICIES / 'tcb.policy'} > {m.ima / 'policy'}"], check=True)
    assert m.read("policy") == builtin
