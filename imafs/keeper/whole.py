"""The whole log of a boot: what the archive stored, then what the kernel
still holds (its staged list, then its current list), as the kernel would show
it had nothing been deleted; and its replay against PCR values."""

from __future__ import annotations

from pathlib import Path

from .. import templates as T
from .abi import Busy, Ima
from .archive import Archive
from .trim import Placement, Rec, Records, place, split


PLACE_TRIES = 50


def _archive_state(archive: Archive):
    boot = archive.last_boot()
    return None if boot is None else (boot, archive.count(boot), archive.last_chunk(boot))


def placed_live(archive: Archive, ima: Ima) -> tuple[list[Rec], Placement | None]:
    """The live records (staged, then current) and where they sit in the
    archive (trim.place), read so that the archive did not change while the
    list was read: the list is read before the archive is looked at, and a
    trim that commits a chunk or confirms its delete in between would make the
    later archive state place the earlier list wrong (its head counted twice).
    Then it is read again."""
    for _ in range(PLACE_TRIES):
        before = _archive_state(archive)
        staged, current = ima.read_live()
        live = split(staged, "staged list") + split(current, "current list")
        p = place(archive, Records.of([r.raw for r in live])) if live else None
        if _archive_state(archive) == before:
            return live, p
    raise Busy(f"the archive changed during each of {PLACE_TRIES} reads of the live list")


def whole_log(archive: Archive, ima: Ima | None = None, boot: int | None = None) -> tuple[int | None, list[Rec]]:
    """(boot, records from its first record on). With ``ima``, the live records
    not yet archived follow; a live list that starts a boot the archive has not
    seen is that boot (``boot`` None) when no boot is asked for."""
    live: list[Rec] = []
    p = None
    if ima is not None:
        live, p = placed_live(archive, ima)
        if p is not None and p.boot is None and boot is None:
            return None, live
    if boot is None:
        boot = archive.last_boot()
    if boot is None:
        return None, []
    recs = [split(raw, f"archive boot {boot} record {pos}")[0] for pos, raw in archive.iter_records(boot)]
    if p is not None and p.boot == boot:
        recs += live[len(recs) - p.first:]
    return boot, recs


def render(recs: list[Rec], fmt: str, bank: str = "sha1") -> bytes:
    out = []
    for r in recs:
        if bank == "sha1":
            digest = r.digest
        else:
            digest = bytes(T.digest_size(bank)) if r.violation else r.bank_digest(bank)
        if fmt == "ascii":
            out.append(T.ascii_record(r.pcr, digest, r.template, r.fields))
        elif bank == "sha1":
            out.append(r.raw)
        else:
            out.append(T.binary_record(r.pcr, digest, r.template, r.fields))
    return b"".join(out)


BANK_BY_SIZE = {20: "sha1", 32: "sha256", 48: "sha384", 64: "sha512"}


def read_pcr_file(spec: str) -> tuple[str, dict[int, bytes]]:
    """``[BANK,]FILE`` of 'PCR-NN: hex' lines (evmctl --pcrs, imafs pcrs --format evmctl)."""
    bank, _, path = spec.rpartition(",")
    values = {}
    for line in Path(path).read_text().splitlines():
        if line.startswith("PCR-") and ":" in line:
            idx, _, hexval = line[4:].partition(":")
            values[int(idx)] = bytes.fromhex(hexval.strip())
    if not values:
        raise ValueError(f"{path}: no 'PCR-NN: hex' lines")
    if not bank:
        size = len(next(iter(values.values())))
        bank = BANK_BY_SIZE.get(size)
        if bank is None:
            raise ValueError(f"{path}: {size}-byte PCRs: say the bank as BANK,{path}")
    return bank, values


def describe(i: int, r: Rec) -> str:
    name = next((v.rstrip(b"\0") for f, v in zip(r.template.fields, r.fields) if f in ("n", "n-ng")), b"?")
    return f"record {i} (PCR {r.pcr}, {r.template.display_name}, {name.decode(errors='replace')!r})"


def replay(recs: list[Rec], bank: str, expected: dict[int, bytes]) -> str | None:
    """None if ``recs`` replay to ``expected`` for every PCR they extend; else
    what does not fit, naming the first record after the last point where the
    PCR still matched."""
    size = T.digest_size(bank)
    pcrs: dict[int, bytes] = {}
    last_match: dict[int, int] = {}  # pcr -> index of the last record after which it matched
    for i, r in enumerate(recs):
        pcrs[r.pcr] = T.hash_bytes(bank, pcrs.get(r.pcr, bytes(size)) + r.bank_digest(bank))
        if expected.get(r.pcr) == pcrs[r.pcr]:
            last_match[r.pcr] = i
    for pcr, value in sorted(pcrs.items()):
        want = expected.get(pcr)
        if want is None:
            return f"{bank}: PCR {pcr} is extended by the log but not in the PCR file"
        if value != want:
            on_pcr = [i for i, r in enumerate(recs) if r.pcr == pcr]
            if pcr in last_match:
                nxt = next(i for i in on_pcr if i > last_match[pcr])
                return (f"{bank}: PCR {pcr} matches after {describe(last_match[pcr], recs[last_match[pcr]])}; "
                        f"the first record that does not fit is {describe(nxt, recs[nxt])}")
            return (f"{bank}: PCR {pcr} never matches; the first record that does not fit is "
                    f"{describe(on_pcr[0], recs[on_pcr[0]])} (records missing before it, or another boot)")
    return None
