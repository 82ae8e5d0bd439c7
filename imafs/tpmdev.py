"""A TPM 2.0 reached through tpm2-tss: the swtpm process imafs owns, and the
ESAPI context every TPM command goes through.

Everything here blocks (sockets to the TPM, child processes) and is called
either before the event loop starts (the daemon's start) or from one worker
thread at a time (:class:`imafs.tpm.TpmPcrs` serializes them): an ESAPI
context is not thread-safe, and a TPM executes one command at a time anyway.

swtpm's lifetime: it is a child of the daemon, started with
``PR_SET_PDEATHSIG = SIGTERM`` from the daemon's main thread, so it ends
when the daemon ends, however the daemon ends (umount, signal, SIGKILL); it
is never daemonized (``-d`` would drop the death signal).  Its state is made
fresh at every mount (a new machine with a new TPM) in a directory under the
mount's runtime directory: libtpms manufactures a TPM on an empty state, and
the profile's banks are allocated as ``swtpm_setup --pcr-banks`` allocates
them (TPM2_PCR_Allocate, TPM2_Shutdown, a reset), without swtpm_setup's own
half-second wait for the swtpm it ran; a reboot power-cycles the same
process (``swtpm_ioctl -i``, then TPM2_Startup(CLEAR)).

tpm2-tss's swtpm TCTI reaches the control channel at the command port + 1,
so the two ports are a pair; they are picked free on 127.0.0.1 and, if
another process takes one before swtpm binds it, swtpm is started again on
another pair.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

NUM_PCRS = 24
READY_TIMEOUT = 10.0  # seconds swtpm gets to listen
TOOL_TIMEOUT = 30.0  # swtpm_ioctl

# TPM_ALG_ID of the banks the kernel knows (tpm2_hash_map), by the kernel's names
ALG_IDS = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D, "sm3": 0x0012}
ALG_NAMES = {v: k for k, v in ALG_IDS.items()}
_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3": 32}


class TpmError(Exception):
    """The TPM cannot be started, reached or used; the message is for a human."""

    def __init__(self, msg: str, result: int = -5):
        super().__init__(msg)
        self.result = result  # what the kernel's tpm_pcr_extend would return


def _tools_missing(*tools: str) -> str | None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not found: install Debian's swtpm and swtpm-tools "
                "(scripts/setup does)")
    return None


def _free_port_pair() -> tuple[int, int]:
    """Two consecutive free TCP ports on 127.0.0.1 (command, control), below
    the kernel's ephemeral range (whose bind(0) ports rarely have a free
    neighbour)."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(10000, 32000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
        except OSError:
            continue
        return port, port + 1
    raise TpmError("no two consecutive free TCP ports on 127.0.0.1 for swtpm")


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Swtpm:
    """One swtpm process with its state directory."""

    def __init__(self, state_dir: Path, banks: tuple[str, ...]):
        self.state_dir = Path(state_dir)
        self.banks = banks
        self.host = "127.0.0.1"
        self.port = self.ctrl_port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host={self.host},port={self.port}"

    def setup(self) -> None:
        """An empty state directory: the next swtpm manufactures a new TPM (blocking)."""
        why = _tools_missing("swtpm", "swtpm_ioctl")
        if why:
            raise TpmError(why)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        self.state_dir.mkdir(parents=True, mode=0o700)

    def allocate(self) -> None:
        """The profile's banks and no other, active from the next reset on;
        then the reset (blocking)."""
        dev = Device(self.tcti)
        try:
            dev.startup()
            if not dev.allocate(self.banks):
                return
        finally:
            dev.close()
        self.power_cycle()

    def spawn(self) -> None:
        """Start swtpm (quick: fork and exec); :meth:`wait_ready` waits for it."""
        self.port, self.ctrl_port = _free_port_pair()
        log = open(self.state_dir / "swtpm.log", "ab")
        with log:
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
                 "--server", f"type=tcp,port={self.port},bindaddr={self.host}",
                 "--ctrl", f"type=tcp,port={self.ctrl_port},bindaddr={self.host}",
                 "--flags", "not-need-init,startup-clear",
                 "--pid", f"file={self.state_dir / 'swtpm.pid'}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=_die_with_parent,
                start_new_session=True)

    def wait_ready(self) -> bool:
        """True once both ports answer; False if swtpm ended (a port was taken)."""
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                for port in (self.port, self.ctrl_port):
                    socket.create_connection((self.host, port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.005)
        self.stop()
        raise TpmError(f"swtpm did not listen on {self.host}:{self.port} within {READY_TIMEOUT:.0f} s; "
                       f"see {self.state_dir / 'swtpm.log'}")

    def start(self) -> None:
        """setup + spawn + wait_ready + allocate, all blocking: for the daemon's start,
        before its event loop runs (spawned from the main thread)."""
        self.setup()
        for _ in range(5):
            self.spawn()
            if self.wait_ready():
                self.allocate()
                return
        raise TpmError(f"swtpm exits at start; see {self.state_dir / 'swtpm.log'}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def power_cycle(self) -> None:
        """TPM_Init through the control channel: PCRs back to their reset values."""
        r = subprocess.run(["swtpm_ioctl", "--tcp", f"{self.host}:{self.ctrl_port}", "-i"],
                           capture_output=True, text=True, timeout=TOOL_TIMEOUT)
        if r.returncode != 0:
            raise TpmError(f"swtpm_ioctl -i failed: {(r.stderr or r.stdout).strip()[-200:]}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None or p.poll() is not None:
            return
        p.terminate()
        try:
            p.wait(timeout=3)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()

    def env(self) -> dict[str, str]:
        return {"TPM2TOOLS_TCTI": self.tcti, "TCTI": self.tcti, "TPM_INTERFACE_TYPE": "socsim",
                "TPM_SERVER_TYPE": "raw", "TPM_SERVER_NAME": self.host,
                "TPM_COMMAND_PORT": str(self.port), "TPM_PLATFORM_PORT": str(self.ctrl_port)}


def tcti_env(conf: str) -> dict[str, str]:
    """The variables that point tpm2-tools and the IBM TSS at a TCTI; the IBM
    TSS ones only for swtpm/mssim TCTIs with host and port."""
    env = {"TPM2TOOLS_TCTI": conf, "TCTI": conf}
    name, _, args = conf.partition(":")
    if name in ("swtpm", "mssim"):
        kv = dict(p.split("=", 1) for p in args.split(",") if "=" in p)
        host, port = kv.get("host", "localhost"), int(kv.get("port", 2321))
        env.update(TPM_INTERFACE_TYPE="socsim", TPM_SERVER_TYPE="raw" if name == "swtpm" else "mssim",
                   TPM_SERVER_NAME=host, TPM_COMMAND_PORT=str(port), TPM_PLATFORM_PORT=str(port + 1))
    return env


def _rc(e: Exception) -> int:
    """The kernel's view of a failed command: a TPM response code as is, any
    transport failure as -EIO."""
    rc = getattr(e, "rc", None)
    if isinstance(rc, int) and rc >> 16 == 0:  # TPM layer: the TPM answered with an error
        return rc
    return -5


class Device:
    """One ESAPI context on a TCTI. Every method blocks; one thread at a time."""

    def __init__(self, conf: str):
        try:
            from tpm2_pytss import ESAPI
            from tpm2_pytss.TCTILdr import TCTILdr
        except ImportError as e:
            raise TpmError(f"tpm2-pytss is not importable ({e}): install Debian's python3-tpm2-pytss "
                           "(scripts/setup does)") from None
        name, _, args = conf.partition(":")
        self.conf = conf
        try:
            self.tcti = TCTILdr(name, args or None)
            self.esapi = ESAPI(self.tcti)
        except Exception as e:
            raise TpmError(f"cannot open TCTI {conf}: {e}", _rc(e)) from None
        self.banks: tuple[str, ...] = ()
        self._tpml = None

    def startup(self) -> None:
        """TPM2_Startup(CLEAR); a TPM already started answers TPM_RC_INITIALIZE."""
        from tpm2_pytss import TPM2_SU, TPM2_RC
        try:
            self.esapi.startup(TPM2_SU.CLEAR)
        except Exception as e:
            if getattr(e, "rc", None) != TPM2_RC.INITIALIZE:
                raise TpmError(f"TPM2_Startup(CLEAR) on {self.conf}: {e}", _rc(e)) from None

    def allocated_banks(self) -> tuple[tuple[str, ...], tuple[int, ...]]:
        """(banks the kernel knows, unknown TPM_ALG_IDs) among the allocated
        PCR banks (TPM2_GetCapability(TPM_CAP_PCRS)): a bank is allocated
        when at least one PCR is selected in it."""
        from tpm2_pytss import TPM2_CAP
        try:
            _, data = self.esapi.get_capability(TPM2_CAP.PCRS, 0, 1)
        except Exception as e:
            raise TpmError(f"TPM2_GetCapability(PCRS) on {self.conf}: {e}", _rc(e)) from None
        known, unknown = [], []
        for sel in data.data.assignedPCR:
            if not any(bytes(sel.pcrSelect)[:sel.sizeofSelect]):
                continue
            alg = int(sel.hash)
            (known.append(ALG_NAMES[alg]) if alg in ALG_NAMES else unknown.append(alg))
        return tuple(known), tuple(unknown)

    def allocate(self, banks: tuple[str, ...]) -> bool:
        """TPM2_PCR_Allocate (platform hierarchy) of every PCR of ``banks``
        and none of the TPM's other banks, then TPM2_Shutdown(CLEAR): it takes
        effect at the next reset.  False when that is already the allocation."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_SU, TPML_PCR_SELECTION, TPMS_PCR_SELECTION
        try:
            _, data = self.esapi.get_capability(TPM2_CAP.PCRS, 0, 1)
            implemented = {int(sel.hash): sel.sizeofSelect for sel in data.data.assignedPCR}
            for b in banks:
                if ALG_IDS[b] not in implemented:
                    have = ",".join(ALG_NAMES.get(a, f"0x{a:04x}") for a in implemented)
                    raise TpmError(f"the TPM at {self.conf} has no {b} PCR bank (it has {have})")
            active, unknown = self.allocated_banks()
            if set(active) == set(banks) and not unknown:
                return False
            self.esapi.pcr_allocate(TPML_PCR_SELECTION([
                TPMS_PCR_SELECTION(hash=TPM2_ALG(alg), sizeofSelect=size,
                                   pcrSelect=(b"\xff" if ALG_NAMES.get(alg) in banks else b"\0") * size)
                for alg, size in implemented.items()]), ESYS_TR.PLATFORM)
            self.esapi.shutdown(TPM2_SU.CLEAR)
        except TpmError:
            raise
        except Exception as e:
            raise TpmError(f"TPM2_PCR_Allocate({','.join(banks)}) on {self.conf}: {e}", _rc(e)) from None
        return True

    def use_banks(self, banks: tuple[str, ...]) -> None:
        """Prepare the extend: one TPML_DIGEST_VALUES with a slot per bank,
        refilled in place for each record (building one per record costs
        as much as the TPM command itself)."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPMT_HA, TPMU_HA, TPML_DIGEST_VALUES
        from tpm2_pytss._libtpm2_pytss import ffi, lib
        self.banks = banks
        field = {"sha1": "sha1", "sha256": "sha256", "sha384": "sha384", "sha512": "sha512", "sm3": "sm3_256"}
        tpml = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG(ALG_IDS[b]), digest=TPMU_HA(**{field[b]: bytes(
            _SIZES[b])})) for b in banks])
        cdata = tpml._cdata
        # the digest buffer of each slot, in bank order
        self._slots = [ffi.cast("uint8_t *", ffi.addressof(cdata.digests[i].digest)) for i in range(len(banks))]
        self._tpml_keep, self._tpml_cdata = tpml, cdata
        self._ffi, self._lib = ffi, lib
        self._handles = [int(ESYS_TR.PCR0) + i for i in range(NUM_PCRS)]
        self._sessions = (int(ESYS_TR.PASSWORD), int(ESYS_TR.NONE), int(ESYS_TR.NONE))

    def extend(self, items) -> tuple[int, Exception | None]:
        """TPM2_PCR_Extend for each (pcr, digests-in-bank-order), in order, one
        command per record covering every bank. Returns how many were done
        and the error that stopped the rest."""
        from tpm2_pytss.TSS2_Exception import TSS2_Exception
        memmove, call, ctx = self._ffi.memmove, self._lib.Esys_PCR_Extend, self.esapi._ctx
        slots, handles, cdata = self._slots, self._handles, self._tpml_cdata
        s1, s2, s3 = self._sessions
        done = 0
        for pcr, digests in items:
            for slot, d in zip(slots, digests):
                memmove(slot, d, len(d))
            rc = call(ctx, handles[pcr], s1, s2, s3, cdata)
            if rc:
                e = TSS2_Exception(rc)
                return done, TpmError(f"TPM2_PCR_Extend(PCR {pcr}): {e}", _rc(e))
            done += 1
        return done, None

    def read(self, pcrs=range(NUM_PCRS)) -> dict[str, list[bytes]]:
        """PCR values of every bank (TPM2_PCR_Read answers at most 8 digests)."""
        from tpm2_pytss import TPML_PCR_SELECTION
        out = {}
        pcrs = list(pcrs)
        try:
            for b in self.banks:
                values = []
                for i in range(0, len(pcrs), 8):
                    chunk = pcrs[i:i + 8]
                    sel = TPML_PCR_SELECTION.parse(f"{'sm3_256' if b == 'sm3' else b}:" + ",".join(map(str, chunk)))
                    _, _, digests = self.esapi.pcr_read(sel)
                    got = [bytes(d) for d in digests]
                    if len(got) != len(chunk):
                        raise TpmError(f"TPM2_PCR_Read({b}) answered {len(got)} of {len(chunk)} PCRs")
                    values += got
                out[b] = values
        except TpmError:
            raise
        except Exception as e:
            raise TpmError(f"TPM2_PCR_Read on {self.conf}: {e}", _rc(e)) from None
        return out

    def close(self) -> None:
        for obj in (getattr(self, "esapi", None), getattr(self, "tcti", None)):
            try:
                if obj is not None:
                    obj.close()
            except Exception:
                pass
