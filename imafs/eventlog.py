"""The TCG2 boot event log (the kernel's drivers/char/tpm/eventlog): parse,
synthesize, and the extends that replay it into a TPM.

The log is the crypto-agile format of the TCG PC Client Platform Firmware
Profile: a first event in the SHA-1 ``TCG_PCR_EVENT`` layout carrying the
``Spec ID Event03`` header (which algorithms, which digest sizes), then
``TCG_PCR_EVENT2`` events, each with one digest per algorithm.  The kernel
exports it unchanged as ``tpm0/binary_bios_measurements``; the firmware has
extended every event but EV_NO_ACTION into its PCR, which is what
:func:`replay_extends` gives the TPM at boot.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from .tpmdev import ALG_IDS, ALG_NAMES

EV_POST_CODE = 0x1
EV_NO_ACTION = 0x3
EV_SEPARATOR = 0x4
EV_S_CRTM_VERSION = 0x8
EV_IPL = 0xD
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
SPEC_ID = b"Spec ID Event03\0"
MAX_LOG = 16 << 20  # a real log is tens of KiB


class EventLogError(ValueError):
    """A log that is not a TCG2 crypto-agile event log; the message says where."""


@dataclass
class Event:
    pcr: int
    type: int
    digests: dict[str, bytes]  # by imafs bank name; unknown algorithms are kept by id
    data: bytes


def _hash(bank: str, data: bytes) -> bytes:
    return hashlib.new("sm3" if bank == "sm3" else bank, data).digest()


def _event2(pcr: int, etype: int, banks, data: bytes, digests: dict | None = None) -> bytes:
    out = [struct.pack("<III", pcr, etype, len(banks))]
    for b in banks:
        out.append(struct.pack("<H", ALG_IDS[b]) + (digests[b] if digests else _hash(b, data)))
    out.append(struct.pack("<I", len(data)) + data)
    return b"".join(out)


def _utf16(s: str) -> bytes:
    return s.encode("utf-16-le")


# EFI_GLOBAL_VARIABLE, as the UEFI spec writes it (mixed-endian GUID layout)
_EFI_GLOBAL = bytes.fromhex("61dfe48bca93d211aa0d00e098032b8c")


def synthesize(banks: tuple[str, ...]) -> bytes:
    """A small well-formed log: the Spec ID event, EV_S_CRTM_VERSION, a POST
    code, SecureBoot as EV_EFI_VARIABLE_DRIVER_CONFIG, EV_SEPARATOR in PCR
    0-7, boot applications (shim, grub) in PCR 4, and grub's EV_IPL events:
    commands in PCR 8, the kernel and initrd in PCR 9 (so that verifiers that
    replay PCR 0-9, as keylime does for the sha256 boot_aggregate, find all ten)."""
    sizes = [(ALG_IDS[b], hashlib.new("sm3" if b == "sm3" else b).digest_size) for b in banks]
    spec = (SPEC_ID + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(sizes))
            + b"".join(struct.pack("<HH", a, n) for a, n in sizes) + b"\0")
    out = [struct.pack("<II", 0, EV_NO_ACTION) + bytes(20) + struct.pack("<I", len(spec)) + spec]
    out.append(_event2(0, EV_S_CRTM_VERSION, banks, _utf16("imafs synthetic firmware 1.0\0")))
    out.append(_event2(0, EV_POST_CODE, banks, b"POST CODE"))
    name = _utf16("SecureBoot")
    var = _EFI_GLOBAL + struct.pack("<QQ", len(name) // 2, 1) + name + b"\x01"
    out.append(_event2(7, EV_EFI_VARIABLE_DRIVER_CONFIG, banks, var))
    for pcr in range(8):
        out.append(_event2(pcr, EV_SEPARATOR, banks, bytes(4)))
    for image in (b"shimx64.efi", b"grubx64.efi"):
        path = b"\x04\x04" + struct.pack("<H", 4 + 2 * (len(image) + 1)) + _utf16(image.decode() + "\0") \
            + b"\x7f\xff\x04\x00"
        load = struct.pack("<QQQQ", 0x7d000000, 0x100000, 0, len(path)) + path
        digests = {b: _hash(b, b"imafs synthetic " + image) for b in banks}  # an Authenticode hash
        out.append(_event2(4, EV_EFI_BOOT_SERVICES_APPLICATION, banks, load, digests))
    # grub: its commands and the kernel command line in PCR 8, the files it loads in PCR 9
    for text in (b"grub_cmd: linux /boot/vmlinuz-imafs root=/dev/vda1 ro ima_policy=tcb",
                 b"kernel_cmdline: /boot/vmlinuz-imafs root=/dev/vda1 ro ima_policy=tcb"):
        out.append(_event2(8, EV_IPL, banks, text + b"\0"))
    for path in (b"/boot/vmlinuz-imafs", b"/boot/initrd.img-imafs"):
        digests = {b: _hash(b, b"imafs synthetic " + path) for b in banks}  # the file's digest
        out.append(_event2(9, EV_IPL, banks, path + b"\0", digests))
    return b"".join(out)


def parse(log: bytes) -> tuple[dict[str, int], list[Event]]:
    """(digest size by bank, events) of a crypto-agile log."""
    def need(off, n, what):
        if off + n > len(log):
            raise EventLogError(f"truncated {what} at offset {off}")

    need(0, 32, "first event")
    pcr, etype = struct.unpack_from("<II", log, 0)
    size, = struct.unpack_from("<I", log, 28)
    need(32, size, "Spec ID event")
    spec = log[32:32 + size]
    if etype != EV_NO_ACTION or not spec.startswith(SPEC_ID):
        raise EventLogError("not a crypto-agile (TCG2) log: the first event is not 'Spec ID Event03' "
                            "(a TPM 1.2 SHA-1 log?)")
    n, = struct.unpack_from("<I", spec, 24)
    sizes_by_id = {}
    for i in range(n):
        alg, dsize = struct.unpack_from("<HH", spec, 28 + 4 * i)
        sizes_by_id[alg] = dsize
    sizes = {ALG_NAMES.get(a, f"alg_{a:04x}"): s for a, s in sizes_by_id.items()}
    off = 32 + size
    events = []
    while off < len(log):
        need(off, 12, "event header")
        pcr, etype, count = struct.unpack_from("<III", log, off)
        off += 12
        digests = {}
        for _ in range(count):
            need(off, 2, "digest algorithm")
            alg, = struct.unpack_from("<H", log, off)
            if alg not in sizes_by_id:
                raise EventLogError(f"event at offset {off}: algorithm 0x{alg:04x} not in the Spec ID event")
            dsize = sizes_by_id[alg]
            need(off + 2, dsize, "digest")
            digests[ALG_NAMES.get(alg, f"alg_{alg:04x}")] = log[off + 2:off + 2 + dsize]
            off += 2 + dsize
        need(off, 4, "event size")
        esize, = struct.unpack_from("<I", log, off)
        need(off + 4, esize, "event data")
        events.append(Event(pcr, etype, digests, log[off + 4:off + 4 + esize]))
        off += 4 + esize
    return sizes, events


def replay_extends(log: bytes, banks: tuple[str, ...]) -> list[tuple[int, tuple[bytes, ...]]]:
    """The (pcr, digests in bank order) the firmware extended; a bank the log
    does not carry is an error (its PCRs could not match the log)."""
    sizes, events = parse(log)
    missing = [b for b in banks if b not in sizes]
    if missing:
        raise EventLogError(f"the log has no {', '.join(missing)} digests (it has {', '.join(sizes)}); "
                            "allocate the log's banks (tpm_banks)")
    return [(e.pcr, tuple(e.digests[b] for b in banks)) for e in events
            if e.type != EV_NO_ACTION and e.pcr < 24]
