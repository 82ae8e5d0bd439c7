"""Software PCR banks, boot_aggregate and PCR files."""

from __future__ import annotations

import hashlib

import pytest

from imafs.tpm import PcrBanks, boot_aggregate, format_pcr_file, parse_pcr_file


def test_extend_and_violation():
    b = PcrBanks(("sha1", "sha256"))
    b.extend(10, {"sha1": b"\1" * 20, "sha256": b"\2" * 32})
    assert b.read("sha1", 10) == hashlib.sha1(bytes(20) + b"\1" * 20).digest()
    assert b.read("sha256", 10) == hashlib.sha256(bytes(32) + b"\2" * 32).digest()
    b.extend_violation(9)
    assert b.read("sha256", 9) == hashlib.sha256(bytes(32) + b"\xff" * 32).digest()
    b.extend(40, {"sha1": b"\1" * 20, "sha256": b"\2" * 32})  # no such PCR on a TPM
    b.reset()
    assert b.read("sha1", 10) == bytes(20)


def test_boot_aggregate_fresh_swtpm():
    """clients.md: a fresh swtpm (PCR 0-9 zero) gives these values."""
    algo, digest, sha1 = boot_aggregate(PcrBanks(("sha1", "sha256", "sha384", "sha512")), "sha256")
    assert algo == "sha256"
    assert digest.hex() == "7b6436b0c98f62380866d9432c2af0ee08ce16a171bda6951aecd95ee1307d61"
    assert sha1.hex() == "9797edf8d0eed36b1cf92547816051c8af4e45ee"


def test_boot_aggregate_bank_choice():
    assert boot_aggregate(PcrBanks(("sha1", "sha512")), "sha512")[0] == "sha512"
    algo, digest, _ = boot_aggregate(PcrBanks(("sha1",)), "sha256")
    assert algo == "sha1" and digest == hashlib.sha1(bytes(20) * 8).digest()
    # kernel-abi.md §4.3: neither the IMA hash, sha256 nor sha1 -> zeros
    assert boot_aggregate(PcrBanks(("sha384",)), "sha256") == ("sha256", bytes(32), bytes(20))
    assert boot_aggregate(None, "sha256") == ("sha256", bytes(32), bytes(20))


def test_pcr_file_roundtrip():
    values = [bytes([i]) * 32 for i in range(24)]
    text = format_pcr_file(values)
    assert text.splitlines()[10] == "PCR-10: " + "0a" * 32
    assert parse_pcr_file(text) == values
    assert parse_pcr_file("\nPCR-01: " + "ab" * 20 + "\n") == [bytes(20), b"\xab" * 20]
    for bad in ("PCR-00 00", "PCR-99: 00", "PCR-00: 0", "", "PCR-00: 00\nPCR-01: 0000"):
        with pytest.raises(ValueError):
            parse_pcr_file(bad)
