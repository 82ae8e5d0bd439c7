"""evmctl ima_measurement replays the mounted binary list against `imafs pcrs`."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from imafs import templates as T

pytestmark = pytest.mark.skipif(shutil.which("evmctl") is None, reason="evmctl not installed")


def evmctl_replay(m, tmp_path, *extra) -> subprocess.CompletedProcess:
    banks = [b for b in ("sha1", "sha256") if b in m.client.call("status")["pcrs"]]
    args = ["evmctl", "-v", "ima_measurement", *extra]
    for bank in banks:
        args += ["--pcrs", f"{bank},{m.pcr_file(bank, tmp_path)}"]
    args.append(str(m.ima / "binary_runtime_measurements"))
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def assert_matched(r):
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "Matched per TPM bank calculated digest(s)." in out, out[-3000:]


@pytest.mark.parametrize("template", ["ima-ng", "ima-sig", "ima-ngv2", "ima-sigv2", "ima-buf",
                                      "ima-modsig", "evm-sig", "d-ng|n-ng|iuid|igid|imode", "ima"])
def test_every_template_matches(mount_imafs, tmp_path, template):
    m = mount_imafs(f"ima_template={template}" if "|" not in template else f"ima_template_fmt={template}")
    f = tmp_path / "file with space"
    f.write_bytes(b"content\n")
    m.cli("generate", "--count", "200")
    m.cli("record", "--name", str(f), "--file", f)
    m.cli("record", "--name", "/etc/pcr9", "--file", f, "--pcr", "9")
    m.cli("record", "--name", "/etc/pcr11", "--file", f, "--pcr", "11")
    if template != "ima":
        m.cli("record", "--name", "kexec-cmdline", "--buffer-hex", b"root=/dev/vda".hex(),
              "--template", template if "|" not in template else "ima-buf")
    r = evmctl_replay(m, tmp_path)
    assert_matched(r)
    # -v prints every record like its ASCII line (without the trailing space of empty fields)
    ascii_lines = m.read("ascii_runtime_measurements").decode().splitlines()
    assert len(ascii_lines) == int(m.read("runtime_measurements_count"))


def test_violations_need_ignore(mnt, tmp_path):
    mnt.cli("generate", "--count", "20")
    mnt.cli("record", "--name", "/var/log/x", "--violation")
    mnt.cli("generate", "--count", "20")
    assert_matched(evmctl_replay(mnt, tmp_path, "--ignore-violations"))
    r = evmctl_replay(mnt, tmp_path)
    assert "Matched per TPM bank calculated digest(s)." not in r.stdout + r.stderr


def test_boot_pcrs_from_file(mount_imafs, tmp_path):
    """A profile's boot PCRs give the boot_aggregate evmctl computes from the TPM."""
    pcr_file = tmp_path / "boot-sha256.txt"
    values = [T.hash_bytes("sha256", b"pcr%d" % i) for i in range(10)] + [bytes(32)] * 14
    pcr_file.write_text("".join(f"PCR-{i:02d}: {v.hex()}\n" for i, v in enumerate(values)))
    m = mount_imafs(f"boot_pcrs.sha256={pcr_file}")
    expect = T.hash_bytes("sha256", b"".join(values[:10]))
    first = m.read("ascii_runtime_measurements").splitlines()[0]
    assert first.split()[3] == b"sha256:" + expect.hex().encode()
    assert_matched(evmctl_replay(m, tmp_path))
