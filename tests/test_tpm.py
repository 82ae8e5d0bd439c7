"""Software PCR banks, boot_aggregate and PCR files."""

from __future__ import annotations

import hashlib
import re
import struct

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


# -- the TPM backend's queue, with a fake device (no swtpm, no mount) ---------------------
import threading

import trio

from imafs import tpm as tpm_mod
from imafs.klog import KernelLog
from imafs.profile import ProfileError, load_profile
from imafs.tpmdev import TpmError


class FakeDevice:
    """Records the extends it is sent; can fail after ``fail_after`` or hang."""

    banks = ("sha1", "sha256")

    def __init__(self, fail_after=None, hang_after=None):
        self.sent = []
        self.fail_after, self.hang_after = fail_after, hang_after
        self.release = threading.Event()
        self.thread_ids = set()

    def read(self):
        return {b: [bytes(20 if b == "sha1" else 32)] * 24 for b in self.banks}

    def extend(self, items):
        self.thread_ids.add(threading.get_ident())
        done = 0
        for item in items:
            if self.hang_after is not None and len(self.sent) >= self.hang_after:
                self.release.wait(30)
                return done, None
            if self.fail_after is not None and len(self.sent) >= self.fail_after:
                return done, TpmError("TPM2_PCR_Extend(PCR 10): tcti:IO failure", -5)
            self.sent.append(item)
            done += 1
        return done, None


def _pcrs(dev, tmp_path):
    return tpm_mod.TpmPcrs("tcti", dev, KernelLog(tmp_path / "kmsg"), conf="swtpm:port=1")


def test_queue_sends_in_order_off_the_loop_and_settles(tmp_path):
    dev = FakeDevice()
    pcrs = _pcrs(dev, tmp_path)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(pcrs.run)
            await trio.sleep(0)
            for i in range(1000):
                pcrs.extend(10 + i % 2, {"sha1": i.to_bytes(20, "big"), "sha256": i.to_bytes(32, "big")})
            pcrs.extend_violation(10)
            pcrs.extend(30, {"sha1": bytes(20), "sha256": bytes(32)})  # not a TPM PCR
            assert pcrs.unsettled
            await pcrs.settle()
            assert not pcrs.unsettled
            n.cancel_scope.cancel()
    trio.run(main)
    assert [p for p, _ in dev.sent] == [10 + i % 2 for i in range(1000)] + [10]
    assert dev.sent[5][1] == ((5).to_bytes(20, "big"), (5).to_bytes(32, "big"))
    assert dev.sent[-1][1] == (b"\xff" * 20, b"\xff" * 32)
    assert threading.main_thread().ident not in dev.thread_ids
    assert pcrs.describe()["extended"] == 1001 and pcrs.describe()["state"] == "ok"


def test_a_failing_tpm_counts_what_it_did_not_extend(tmp_path):
    dev = FakeDevice(fail_after=300)
    pcrs = _pcrs(dev, tmp_path)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(pcrs.run)
            for i in range(1000):
                pcrs.extend(10, {"sha1": bytes(20), "sha256": bytes(32)})
            await pcrs.settle()
            pcrs.extend(10, {"sha1": bytes(20), "sha256": bytes(32)})  # after the failure
            assert not pcrs.unsettled
            n.cancel_scope.cancel()
    trio.run(main)
    d = pcrs.describe()
    assert d["state"] == "failed" and d["extended"] == 300 and d["not_extended"] == 701
    log = (tmp_path / "kmsg").read_text()
    assert "ima: Error Communicating to TPM chip, result: -5" in log
    assert log.count("cause=TPM_error(-5)") == tpm_mod.FAILURE_LOG_LIMIT


def test_a_tpm_that_hangs_fails_after_the_timeout(tmp_path, monkeypatch):
    monkeypatch.setattr(tpm_mod, "COMMAND_TIMEOUT", 0.5)
    dev = FakeDevice(hang_after=10)
    pcrs = _pcrs(dev, tmp_path)

    async def main():
        async with trio.open_nursery() as n:
            n.start_soon(pcrs.run)
            for i in range(50):
                pcrs.extend(10, {"sha1": bytes(20), "sha256": bytes(32)})
            with trio.fail_after(5):  # nothing waits on a silent TPM for ever
                await pcrs.settle()
            n.cancel_scope.cancel()
    try:
        trio.run(main)
    finally:
        dev.release.set()
    d = pcrs.describe()
    assert d["state"] == "failed" and "did not answer" in d["error"]
    assert d["extended"] + d["not_extended"] == 50 and d["not_extended"] >= 40


@pytest.mark.parametrize("settings, message", [
    (["tpm=hardware"], "allowed: soft, swtpm, tcti:"),
    (["tpm=tcti:"], "expected tcti:<name>"),
    (["tpm=tcti:device:/dev/tpmrm0"], "allow_hardware_tpm = true"),
    (["tpm=tcti:tabrmd"], "allow_hardware_tpm = true"),
    (["tpm=swtpm", "tpm_banks=none"], "TPM-bypass"),
])
def test_tpm_profile_key_refused(settings, message):
    with pytest.raises(ProfileError, match=re.escape(message)):
        load_profile(None, settings)


def test_tpm_profile_key_accepted(tmp_path):
    assert load_profile(None, []).tpm == "soft"
    assert load_profile(None, ["tpm=swtpm"]).tpm == "swtpm"
    p = load_profile(None, ["tpm=tcti:device:/dev/tpmrm0", "allow_hardware_tpm=true"])
    assert p.tpm == "tcti:device:/dev/tpmrm0" and p.allow_hardware_tpm
    f = tmp_path / "pcrs"
    f.write_text("PCR-00: " + "11" * 32 + "\n")
    with pytest.raises(ProfileError, match="boot_pcrs needs tpm = soft"):
        load_profile(None, ["tpm=swtpm", f"boot_pcrs.sha256={f}"])


def test_kernel_61_extends_sha384_and_sha512_with_the_padded_sha1_digest():
    """kernel-observed.md F-19: sha256 gets real sha256 digests, sha384/sha512
    the SHA-1 template digest zero-padded; violations full-size 0xFF."""
    from imafs.ima import Ima
    banks = "sha1,sha256,sha384,sha512"
    for kernel in ("6.1", "6.12"):
        ima = Ima(load_profile(None, [f"kernel={kernel}", f"tpm_banks={banks}"]))
        from imafs.blocking import run_inline
        run_inline(ima.record(name="/x", digest="sha256:" + "ab" * 32))
        run_inline(ima.record(name="/v", violation=True))
        data = ima.store.current.sha1_bytes()
        expect = {b: bytes(hashlib.new(b).digest_size) for b in banks.split(",")}
        off = 0
        while off < len(data):  # replay the legacy list: sha1 template digests
            sha1 = data[off + 4:off + 24]
            n, = struct.unpack_from("<I", data, off + 24)
            dlen, = struct.unpack_from("<I", data, off + 28 + n)
            tdata = data[off + 32 + n:off + 32 + n + dlen]
            off += 32 + n + dlen
            for b in expect:
                size = len(expect[b])
                if sha1 == bytes(20):
                    d = b"\xff" * size
                elif kernel == "6.1" and b in ("sha384", "sha512"):
                    d = sha1 + bytes(size - 20)
                else:
                    d = hashlib.new(b, tdata).digest()
                expect[b] = hashlib.new(b, expect[b] + d).digest()
        for b in expect:
            assert ima.pcrs.read(b, 10) == expect[b], (kernel, b)
