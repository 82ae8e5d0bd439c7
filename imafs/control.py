"""The control socket: JSON lines over a Unix socket, one per mount.

Each request is one JSON object on one line, ``{"cmd": NAME, ...args}``; each
answer is one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": MSG}``.
A bad request never changes the list and never stops the daemon.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import stat
from pathlib import Path

import trio

from .blocking import Runner
from .ima import Ima, RequestError
from .policy import BUFFER_FUNCS

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
GENERATE_BATCH = 500  # ~5 ms of ingest between checkpoints


def runtime_dir() -> Path:
    return Path(os.environ.get("IMAFS_RUNTIME_DIR", "/run/imafs"))


def socket_path(mountpoint: str) -> Path:
    """Where the control socket of the mount at ``mountpoint`` lives."""
    real = os.path.realpath(mountpoint)
    return runtime_dir() / (hashlib.sha256(os.fsencode(real)).hexdigest()[:16] + ".sock")


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


class Client:
    """A blocking client, for the CLI and for tests."""

    def __init__(self, mountpoint: str | None = None, path: str | os.PathLike | None = None,
                 timeout: float = 600.0):
        self.path = Path(path) if path else socket_path(mountpoint)
        self.timeout = timeout

    def call(self, cmd: str, **args) -> dict:
        req = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(self.timeout)
                s.connect(str(self.path))
                s.sendall(req)
                buf = b""
                while not buf.endswith(b"\n"):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
        except (FileNotFoundError, ConnectionRefusedError):
            raise ControlError(f"no imafs daemon answers at {self.path} (is it mounted?)") from None
        except OSError as e:
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        if not buf:
            raise ControlError("the daemon closed the connection without an answer")
        answer = json.loads(buf)
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "unknown error"))
        return answer


def _write_file(path: str, data: bytes) -> None:
    """A blocking step: ``path`` may be slow, or a FIFO that waits for a reader."""
    try:
        with open(path, "wb") as f:
            f.write(data)
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None


MAX_KEXEC_BUFFER = 1 << 30


def _read_regular(path: str, limit: int) -> bytes:
    """A blocking step: the content of a regular file of at most ``limit`` bytes."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise RequestError(f"{path}: not a regular file")
            if st.st_size > limit:
                raise RequestError(f"{path}: {st.st_size} bytes, more than {limit}")
            return f.read(limit + 1)[:limit]
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None


class Server:
    """Answers control requests against one :class:`Ima` inside the daemon's nursery."""

    def __init__(self, ima: Ima, runner: Runner, on_shutdown):
        self.ima = ima
        self.runner = runner  # file I/O off the loop
        self.on_shutdown = on_shutdown

    async def serve(self, path: Path, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        await sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._handle, [listener])
        finally:
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        async with stream:
            while True:
                try:
                    data = await stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return
                if not data:
                    return
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    answer = await self.answer(line)
                    try:
                        await stream.send_all(json.dumps(answer).encode() + b"\n")
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        return
                if len(buf) > MAX_LINE:
                    await stream.send_all(b'{"ok": false, "error": "request line too long"}\n')
                    return

    async def answer(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"ok": False, "error": f"malformed JSON request: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        cmd = req.pop("cmd")
        handler = getattr(self, "cmd_" + cmd, None)
        if handler is None:
            return {"ok": False, "error": f"unknown command {cmd!r}"}
        pcrs = self.ima.pcrs
        queued = pcrs.queued if pcrs is not None else 0
        try:
            result = await handler(**req)
            if pcrs is not None and pcrs.queued != queued:
                await pcrs.settle()  # the request's records are in the TPM before it returns
        except TypeError as e:
            return {"ok": False, "error": f"{cmd}: bad arguments ({e})"}
        except (RequestError, ValueError) as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # the daemon never dies on a request
            log.exception("control request %r failed", cmd)
            return {"ok": False, "error": f"internal error: {type(e).__name__}: {e}"}
        return {"ok": True, **result}

    async def cmd_record(self, name, file=None, digest=None, buffer_hex=None,
                         violation=False, pcr=None, template=None):
        return await self.runner.run(self.ima.record(
            name=name, file=file, digest=digest, buffer_hex=buffer_hex, violation=bool(violation),
            pcr=pcr, template=template))

    async def cmd_generate(self, count):
        if not isinstance(count, int) or count < 0:
            raise RequestError("generate: count must be a non-negative integer")
        added = 0
        for first in range(0, count, GENERATE_BATCH):
            added += self.ima.generate(min(GENERATE_BATCH, count - first))
            await trio.sleep(0)  # let readers in between batches
            if self.ima.pcrs is not None and self.ima.pcrs.unsettled:
                await self.ima.pcrs.settle(lag=GENERATE_BATCH)  # the TPM at most a batch behind
        return {"added": added, "count": self.ima.store.current.count}

    async def cmd_status(self):
        status = self.ima.status()
        pcrs = self.ima.pcrs
        if pcrs is not None and pcrs.backend != "soft":
            try:
                values = await pcrs.snapshot()
                status["pcrs"] = {b: {str(i): v.hex() for i, v in enumerate(vals)} for b, vals in values.items()}
            except RequestError:
                pass  # status["tpm"] says why
            status["tpm"] = pcrs.describe()
        return status

    async def cmd_pcrs(self, bank=None):
        pcrs = self.ima.pcrs
        if pcrs is None:
            raise RequestError("TPM-bypass profile (tpm_banks = none): there are no PCRs")
        banks = [bank] if bank else list(pcrs.banks)
        for b in banks:
            if b not in pcrs.banks:
                raise RequestError(f"no PCR bank {b!r}; banks: {', '.join(pcrs.banks)}")
        values = await pcrs.snapshot()  # read from the TPM, after the extends queued so far
        return {"backend": pcrs.backend, "pcrs": {b: [v.hex() for v in values[b]] for b in banks}}

    async def cmd_tpm_env(self):
        pcrs = self.ima.pcrs
        env = pcrs.env() if pcrs is not None else None
        if env is None:
            raise RequestError(f"tpm = {self.ima.profile.tpm}: no TPM to reach (software PCRs); "
                               "mount with --set tpm=swtpm")
        return {"env": env}

    async def cmd_measure(self, func, path=None, mask=0, uid=0, euid=None, gid=0, egid=None,
                          name=None, data_hex=None, keyring=None, label=None):
        if path is not None:
            return await self.runner.run(self.ima.measure_file(path, func, mask, uid=uid, euid=euid, gid=gid,
                                                               egid=egid, name=name))
        if data_hex is None or not name:
            raise RequestError("measure: give a file, or --name and --data-hex for a buffer hook")
        if func not in BUFFER_FUNCS:
            raise RequestError(f"--func {func}: buffer hooks are {', '.join(BUFFER_FUNCS)}")
        try:
            buf = bytes.fromhex(data_hex)
        except ValueError:
            raise RequestError("--data-hex: not a hexadecimal string") from None
        return self.ima.measure_buffer(func, name, buf, keyring=keyring, label=label)

    async def cmd_suspend(self):
        self.ima.suspend()
        return {}

    async def cmd_kexec(self, load_only=False, dump=None):
        if load_only:
            self.ima.kexec_load()
            buf = self.ima.kexec_buffer()
        else:
            if self.ima.pcrs is not None:
                await self.ima.pcrs.refresh()  # the next kernel reads PCR 0-9 from the TPM
            buf = self.ima.kexec()
        if dump:
            await self.runner.io(_write_file, dump, buf)
        return {"buffer_bytes": len(buf), "count": self.ima.store.current.count}

    async def cmd_boot(self, kexec_buffer):
        self.ima.boot_from_buffer(await self.runner.io(_read_regular, kexec_buffer, MAX_KEXEC_BUFFER))
        return {"count": self.ima.store.current.count}

    async def cmd_reboot(self):
        if self.ima.pcrs is not None and self.ima.pcrs.backend != "soft":
            self.ima.suspend()  # no record gets in between the drain and the power cycle
            await self.ima.pcrs.power_cycle()
        self.ima.reboot()
        return {"count": self.ima.store.current.count}

    async def cmd_shutdown(self):
        await self.on_shutdown()
        return {}
