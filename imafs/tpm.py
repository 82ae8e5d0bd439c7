"""PCR banks behind one interface, boot_aggregate, and PCR files.

Two kinds of banks answer the same calls (the kernel's ``ima_crypto.c`` and
``tpm_pcr_extend``):

* :class:`PcrBanks` — software PCRs (``tpm = "soft"``), the fast default:
  an extend is a hash in the caller's thread.
* :class:`TpmPcrs` — a TPM 2.0 through tpm2-tss (``tpm = "swtpm"``, imafs's
  own swtpm, or ``tpm = "tcti:<conf>"``, one the user runs).

The store calls ``extend``/``extend_violation`` synchronously, on the event
loop, right after it appended the record (the kernel's order: list, then
PCR).  A TPM command blocks, so :class:`TpmPcrs` does not send it there: it
queues the extend and one worker task (:meth:`TpmPcrs.run`) sends the queue,
in order, from a worker thread.  A request that queued extends (the control
socket and the FUSE front compare ``queued`` before and after it) awaits
:meth:`TpmPcrs.settle` before answering, so the PCR is extended before the
request that caused the record returns, and the list is never ahead of the
TPM for longer than one request.  A TPM that fails or does not answer within
``COMMAND_TIMEOUT`` is marked failed as the kernel handles it: the records
stay on the list, the kernel log says ``Error Communicating to TPM chip``,
and the records not extended are counted; nothing waits on it any more.
"""

from __future__ import annotations

import logging
import re
from collections import deque
from pathlib import Path
from typing import Mapping, Sequence

import time

from .templates import digest_size, hash_bytes, hasher

NUM_PCRS = 24
COMMAND_TIMEOUT = 10.0  # seconds a TPM command (or a batch of extends) may take
EXTEND_BATCH = 256  # extends sent per worker-thread call
FAILURE_LOG_LIMIT = 16  # "Error Communicating" lines per failure; status counts the rest
log = logging.getLogger(__name__)


class PcrBanks:
    """A software TPM: 24 PCRs per bank, PCR 0–9 starting at the boot values."""

    backend = "soft"
    unsettled = False  # an extend is done when extend() returns
    queued = 0  # nothing is ever queued

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

    # -- the calls the daemon makes on any banks ------------------------------------
    async def settle(self, lag: int = 0) -> None:
        pass

    async def snapshot(self) -> dict[str, list[bytes]]:
        return {b: self.values(b) for b in self.banks}

    async def power_cycle(self) -> None:
        """The reset itself is :meth:`reset`, called by the reboot."""

    async def refresh(self) -> None:
        pass

    def describe(self) -> dict:
        return {"backend": "soft", "banks": list(self.banks), "state": "ok"}

    def env(self) -> dict[str, str] | None:
        return None

    def close(self) -> None:
        pass


class TpmPcrs:
    """The PCR banks of a TPM 2.0 (swtpm or a TCTI), extended in the kernel's
    order without blocking the event loop (see the module's docstring).

    ``read``/``values`` give the values last read from the TPM (at boot:
    what boot_aggregate is computed from); :meth:`snapshot` reads it now.
    """

    def __init__(self, backend: str, device, klog, swtpm=None, conf: str = "", event_log: bytes | None = None):
        from . import tpmdev
        self._dev = tpmdev
        self.backend = backend  # "swtpm" | "tcti"
        self.device = device
        self.banks = device.banks
        self.klog = klog
        self.swtpm = swtpm
        self.conf = conf
        self.event_log = event_log  # replayed into PCR 0-9 at every boot; tpm0/binary_bios_measurements
        self._ff = tuple(b"\xff" * digest_size(b) for b in self.banks)
        self._pending: deque = deque()  # (pcr, digests in bank order), in list order
        self.queued = 0  # extends handed to the worker in this boot
        self.finished = 0  # of those: extended, or given up on a failure
        self.extended = 0
        self.not_extended = 0  # records on the list not extended (TPM failed)
        self.failed: str | None = None  # why the TPM failed
        self.failure_result = 0
        self._logged = 0
        self._known = device.read()
        import trio
        self._limiter = None
        self._wake = trio.Event()  # set when an extend is queued
        self._progress = trio.Event()  # set (and replaced) when extends are done or given up

    # -- the store's calls (sync, on the loop) -------------------------------------
    @property
    def unsettled(self) -> bool:
        return self.finished < self.queued

    def extend(self, pcr: int, digests: Mapping[str, bytes]) -> None:
        if pcr >= NUM_PCRS:
            return
        self._queue(pcr, tuple(digests[b] for b in self.banks))

    def extend_violation(self, pcr: int) -> None:
        if pcr >= NUM_PCRS:
            return
        self._queue(pcr, self._ff)

    def _queue(self, pcr: int, digests: tuple) -> None:
        if self.failed:
            self.not_extended += 1
            self._log_failure(1)
            return
        self._pending.append((pcr, digests))
        self.queued += 1
        self._wake.set()

    def read(self, bank: str, pcr: int) -> bytes:
        return self._known[bank][pcr]

    def values(self, bank: str) -> list[bytes]:
        return list(self._known[bank])

    def reset(self) -> None:
        """Reboot: the power cycle was :meth:`power_cycle`; a new boot counts anew."""
        self._pending.clear()
        self.extended = self.not_extended = 0

    # -- the worker and the waiters (inside the daemon's nursery) --------------------
    async def run(self) -> None:
        """Send queued extends in order, EXTEND_BATCH per worker-thread call."""
        import trio
        self._limiter = trio.CapacityLimiter(1)
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            n = min(EXTEND_BATCH, len(self._pending))
            batch = [self._pending.popleft() for _ in range(n)]
            try:
                done, error = await self._call(self.device.extend, batch)
            except self._dev.TpmError as e:
                done, error = 0, e
            self.extended += done
            self.finished += done
            if error is not None:
                lost = n - done + len(self._pending)
                self._pending.clear()
                self.finished += lost
                self.not_extended += lost
                self._fail(error, lost)
            self._progress.set()
            self._progress = trio.Event()

    async def _call(self, fn, *args, timeout: float | None = None):
        """``fn(*args)`` in the TPM's worker thread (one at a time); a TPM
        that does not answer in ``timeout`` seconds fails (its thread is
        abandoned, and so is this ESAPI context)."""
        import trio
        timeout = COMMAND_TIMEOUT if timeout is None else timeout
        with trio.move_on_after(timeout):
            return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter, abandon_on_cancel=True)
        self._limiter = trio.CapacityLimiter(1)  # the abandoned thread keeps the old one
        self.device = None
        raise self._dev.TpmError(f"the TPM did not answer within {timeout:.0f} s", -62)

    async def settle(self, lag: int = 0) -> None:
        """Until every extend queued so far (all but ``lag``) is done or given up."""
        target = self.queued - lag
        while self.finished < target:
            await self._progress.wait()

    async def snapshot(self) -> dict[str, list[bytes]]:
        """Every PCR of every bank, read from the TPM after the queue drained."""
        from .errors import RequestError
        await self.settle()
        if self.failed or self.device is None:
            raise RequestError(f"the TPM failed ({self.failed}); {self.not_extended} records "
                               "on the list are not extended")
        try:
            self._known = await self._call(self.device.read)
        except self._dev.TpmError as e:
            self._fail(e, 0)
            raise RequestError(f"the TPM failed ({e})") from None
        return {b: list(v) for b, v in self._known.items()}

    async def refresh(self) -> None:
        """Read the PCRs now (a kexec's boot_aggregate); a failed TPM keeps the last values."""
        try:
            await self.snapshot()
        except Exception as e:
            log.warning("tpm: cannot read the PCRs: %s", e)

    async def power_cycle(self) -> None:
        """A cold boot of the TPM: swtpm is power-cycled (started again if it
        died or hung, from its state), then TPM2_Startup(CLEAR) and a read of
        its PCRs.  A failure leaves the TPM failed; the reboot goes on."""
        await self.settle()
        self._pending.clear()
        try:
            if self.backend == "swtpm":
                await self._cycle_swtpm()
            elif self.conf.partition(":")[0] == "swtpm":
                await self._call(_ioctl_init, self.conf)
            else:
                raise self._dev.TpmError(f"imafs cannot power-cycle the TPM at {self.conf}; "
                                         "its PCRs keep their values")
            dev = self.device
            if dev is None:
                dev = await self._call(self._dev.Device, self.swtpm.tcti if self.swtpm else self.conf)
            dev.banks = self.banks
            dev.use_banks(self.banks)
            await self._call(dev.startup)
            await self._call(replay_event_log, dev, self.event_log)
            self._known = await self._call(dev.read)
            self.device = dev
            self.failed = None
            self._logged = 0
        except self._dev.TpmError as e:
            self._fail(e, 0)

    async def _cycle_swtpm(self) -> None:
        sw = self.swtpm
        if sw.alive() and self.device is not None:
            await self._call(sw.power_cycle)
            return
        if self.device is not None:
            old, self.device = self.device, None
            await self._call(old.close)
        await self._call(sw.stop)  # a stopped (SIGSTOP) swtpm takes the 3 s before SIGKILL
        for _ in range(5):
            sw.spawn()  # fork+exec on the loop's (main) thread: the death signal stays tied to it
            if await self._call(sw.wait_ready, timeout=sw_ready_timeout()):
                return
        raise self._dev.TpmError("swtpm exits at start")

    # -- failures ----------------------------------------------------------------
    def _fail(self, error, lost: int) -> None:
        first = not self.failed
        self.failed = str(error)
        self.failure_result = getattr(error, "result", -5)
        if first:
            log.error("tpm: %s; %d records not extended", error, lost)
        self._log_failure(max(lost, 1) if first or lost else 0)

    def _log_failure(self, records: int) -> None:
        """The kernel's lines for each record it could not extend
        (ima_pcr_extend, ima_add_template_entry), FAILURE_LOG_LIMIT at most."""
        for _ in range(records):
            self._logged += 1
            if self._logged > FAILURE_LOG_LIMIT:
                return
            r = self.failure_result
            self.klog.kernel(f"ima: Error Communicating to TPM chip, result: {r}")
            self.klog.serial += 1
            self.klog.kernel(f"audit: type=1804 audit({time.time():.3f}:{self.klog.serial}): pid=0 uid=0 "
                             f"auid=4294967295 ses=4294967295 op=add_template_measure cause=TPM_error({r}) "
                             "comm=\"imafs\" res=1 errno=0")
            if self._logged == FAILURE_LOG_LIMIT:
                self.klog.kernel("imafs: more records not extended are not logged; "
                                 "imafs status counts them (tpm.not_extended)")

    # -- what the daemon shows ----------------------------------------------------
    def env(self) -> dict[str, str]:
        return self.swtpm.env() if self.swtpm else self._dev.tcti_env(self.conf)

    def describe(self) -> dict:
        return {"backend": self.backend, "tcti": self.env()["TCTI"], "banks": list(self.banks),
                "state": "failed" if self.failed else "ok", "error": self.failed,
                "extended": self.extended, "pending": self.queued - self.finished,
                "not_extended": self.not_extended, "env": self.env(),
                "swtpm_pid": self.swtpm.proc.pid if self.swtpm and self.swtpm.proc else None}

    def close(self) -> None:
        """Stop imafs's swtpm. The ESAPI context is left to the process's end:
        a thread abandoned by a shutdown may still be inside it."""
        if self.swtpm is not None:
            self.swtpm.stop()


def replay_event_log(dev, log: bytes | None) -> None:
    """The firmware's extends of the boot event log, into a TPM just started."""
    if not log:
        return
    from .eventlog import replay_extends
    done, error = dev.extend(replay_extends(log, dev.banks))
    if error is not None:
        raise error


def _load_event_log(path: str) -> bytes:
    from .tpmdev import TpmError
    from .eventlog import MAX_LOG
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_LOG + 1)
    except OSError as e:
        raise TpmError(f"event_log: cannot read {path}: {e.strerror}") from None
    if len(data) > MAX_LOG:
        raise TpmError(f"event_log: {path} is larger than {MAX_LOG} bytes")
    return data


def sw_ready_timeout() -> float:
    from .tpmdev import READY_TIMEOUT
    return READY_TIMEOUT + 1


def _ioctl_init(conf: str) -> None:
    """TPM_Init through the control channel of a swtpm the user runs (port + 1)."""
    import subprocess
    from .tpmdev import TpmError
    kv = dict(p.split("=", 1) for p in conf.partition(":")[2].split(",") if "=" in p)
    ctrl = f"{kv.get('host', 'localhost')}:{int(kv.get('port', 2321)) + 1}"
    r = subprocess.run(["swtpm_ioctl", "--tcp", ctrl, "-i"], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise TpmError(f"swtpm_ioctl --tcp {ctrl} -i failed: {(r.stderr or r.stdout).strip()[-200:]}")


def open_backend(profile, state_dir: Path, klog):
    """The PCR banks the profile asks for, and the profile with the banks
    they really have.  Blocking (a TPM is started and read): for the
    daemon's start, before its event loop runs.  Raises tpmdev.TpmError."""
    from dataclasses import replace
    if profile.tpm == "soft":
        if not profile.tpm_banks:
            return None, profile
        return PcrBanks(profile.tpm_banks, {b: profile.boot_pcr_values(b) for b in profile.tpm_banks}), profile
    from .tpmdev import Device, Swtpm, TpmError
    sw = None
    if profile.tpm == "swtpm":
        sw = Swtpm(state_dir, profile.tpm_banks)
        sw.start()
        conf, backend = sw.tcti, "swtpm"
    else:
        conf, backend = profile.tpm.partition(":")[2], "tcti"
    dev = None
    try:
        dev = Device(conf)
        dev.startup()
        banks, unknown = dev.allocated_banks()
        for alg in unknown:
            klog.kernel(f"imafs: TPM bank 0x{alg:04x} is not one imafs can hash; it is not extended")
        if not banks:
            raise TpmError(f"the TPM at {conf} has no PCR bank allocated that imafs knows")
        for b in banks:
            try:
                hasher(b)
            except Exception:
                raise TpmError(f"the TPM at {conf} has a {b} bank, which this machine cannot hash") from None
        dev.banks = banks
        dev.use_banks(banks)
        from .eventlog import EventLogError, synthesize
        if profile.event_log:
            log_bytes = _load_event_log(profile.event_log)
        else:
            log_bytes = synthesize(banks) if sw is not None else None
        try:
            replay_event_log(dev, log_bytes)
        except EventLogError as e:
            raise TpmError(f"event_log {profile.event_log or '(synthetic)'}: {e}") from None
        pcrs = TpmPcrs(backend, dev, klog, swtpm=sw, conf=conf, event_log=log_bytes)
    except BaseException:
        if dev is not None:
            dev.close()
        if sw is not None:
            sw.stop()
        raise
    klog.kernel(f"imafs: PCR banks {','.join(banks)} of the TPM at {conf} ({backend})")
    return pcrs, replace(profile, tpm_banks=banks)


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
