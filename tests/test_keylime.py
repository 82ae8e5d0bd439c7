"""keylime's verifier accepts the mounted list against `imafs pcrs`."""

from __future__ import annotations

import pytest

from .keylime_check import keylime_verify


def pcr10(m, bank: str) -> str:
    return m.client.call("pcrs", bank=bank)["pcrs"][bank][10]


def fill(m, tmp_path):
    f = tmp_path / "agent.conf"
    f.write_text("mode = pull\n")
    m.cli("generate", "--count", "500")
    m.cli("record", "--name", str(f), "--file", f)
    if "ima-buf" not in m.read("ascii_runtime_measurements").decode().split(" ", 3)[2]:
        m.cli("record", "--name", "kexec-cmdline", "--buffer-hex", b"root=/dev/vda ro".hex())
    m.cli("generate", "--count", "20")


@pytest.mark.parametrize("settings", [(), ("ima_template=ima-sig",), ("ima_template=ima",)])
def test_keylime_accepts(mount_imafs, tmp_path, settings):
    m = mount_imafs(*settings)
    if "ima_template=ima" in settings:
        m.cli("generate", "--count", "500")
    else:
        fill(m, tmp_path)
    text = m.read("ascii_runtime_measurements").decode()
    for bank in ("sha1", "sha256"):
        assert keylime_verify(text, pcr10(m, bank), bank) == [], bank
    text256 = m.read("ascii_runtime_measurements_sha256").decode()
    assert keylime_verify(text256, pcr10(m, "sha256"), "sha256", log_hash_alg="sha256") == []


def test_keylime_rejects_tampering(mnt, tmp_path):
    fill(mnt, tmp_path)
    text = mnt.read("ascii_runtime_measurements").decode()
    lines = text.splitlines(keepends=True)
    victim = lines[100]
    flipped = victim[:60] + ("0" if victim[60] != "0" else "1") + victim[61:]  # inside the file digest
    tampered = "".join(lines[:100] + [flipped] + lines[101:])
    failures = keylime_verify(tampered, pcr10(mnt, "sha1"), trusted_list=text)
    assert any("runtime_policy_hash" in f or "pcr_mismatch" in f or "template" in f for f in failures), failures
    assert keylime_verify(text, "ab" * 20)  # a PCR no prefix of the list reaches
