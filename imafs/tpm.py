"""PCR banks of the emulated TPM, boot_aggregate, and PCR files."""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from .templates import digest_size, hash_bytes, hasher

NUM_PCRS = 24


class PcrBanks:
    """A software TPM: 24 PCRs per bank, PCR 0–9 starting at the boot values."""

    def __init__(self, banks: Sequence[str], boot_pcrs: Mapping[str, Sequence[bytes]] | None = None):
        self.banks = tuple(banks)
        self._hashers = {b: hasher(b) for b in self.banks}
        self._boot = {}
        for b in self.banks:
            size = digest_size(b)
            boot = list((boot_pcrs or {}).get(b) or ())[:10]
            boot += [bytes(size)] * (NUM_PCRS - len(boot))
            self._boot[b] = boot
        self.reset()

    def reset(self) -> None:
        self._pcrs = {b: list(v) for b, v in self._boot.items()}

    def extend(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        """PCR_b ← H_b(PCR_b ‖ digest_b) in every bank; PCRs ≥ 24 do not exist
        on a TPM, so such extends are dropped (the record is still listed)."""
        if pcr >= NUM_PCRS:
            return
        for b, values in self._pcrs.items():
            values[pcr] = self._hashers[b](values[pcr] + digests[b]).digest()

    def extend_violation(self, pcr: int) -> None:
        """Violations extend all-0xFF of each bank's size (kernel-abi.md §4.2)."""
        if pcr >= NUM_PCRS:
            return
        for b, values in self._pcrs.items():
            values[pcr] = hash_bytes(b, values[pcr] + b"\xff" * digest_size(b))

    def read(self, bank: str, pcr: int) -> bytes:
        return self._pcrs[bank][pcr]

    def values(self, bank: str) -> list[bytes]:
        return list(self._pcrs[bank])


def boot_aggregate(banks: PcrBanks | None, ima_hash: str) -> tuple[str, bytes, bytes]:
    """(algorithm, digest) of the d-ng field and the sha1 value of the `d`
    field of boot_aggregate (kernel-abi.md §4.3)."""
    if not banks or not banks.banks:
        return ima_hash, bytes(digest_size(ima_hash)), bytes(20)
    for bank in (ima_hash, "sha256", "sha1"):
        if bank in banks.banks:
            break
    else:
        return ima_hash, bytes(digest_size(ima_hash)), bytes(20)
    last = 8 if bank == "sha1" else 10
    digest = hash_bytes(bank, b"".join(banks.read(bank, i) for i in range(last)))
    sha1 = (hash_bytes("sha1", b"".join(banks.read("sha1", i) for i in range(8)))
            if "sha1" in banks.banks else bytes(20))
    return bank, digest, sha1


_LINE = re.compile(r"^PCR-(\d{1,2}):\s*([0-9a-fA-F]+)\s*$")


def parse_pcr_file(text: str) -> list[bytes]:
    """PCR values from ``PCR-NN: hex`` lines (the file evmctl --pcrs reads)."""
    values: dict[int, bytes] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _LINE.match(line.strip())
        if not m or len(m.group(2)) % 2:
            raise ValueError(f"line {lineno}: expected 'PCR-NN: <hex>', got {line.strip()[:60]!r}")
        idx = int(m.group(1))
        if idx >= NUM_PCRS:
            raise ValueError(f"line {lineno}: PCR {idx} out of range 0..23")
        values[idx] = bytes.fromhex(m.group(2))
    if not values:
        raise ValueError("no 'PCR-NN: <hex>' line")
    sizes = {len(v) for v in values.values()}
    if len(sizes) != 1:
        raise ValueError("PCR values of different sizes in one file")
    size = sizes.pop()
    return [values.get(i, bytes(size)) for i in range(max(values) + 1)]


def format_pcr_file(values: Sequence[bytes]) -> str:
    return "".join(f"PCR-{i:02d}: {v.hex()}\n" for i, v in enumerate(values))
