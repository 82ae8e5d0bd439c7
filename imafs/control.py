"""The control socket: JSON lines over a Unix socket, one per mount.

Each request is one JSON object on one line, ``{"cmd": NAME, ...args}``; each
answer is one line, ``{"ok": true, ...}`` or ``{"ok": false, "error": MSG}``.
A bad request never changes the list and never stops the daemon: whatever a
client sends, and however it behaves (a line that never ends, bytes that are
not JSON, a disconnect mid-answer, hundreds of connections), the worst it gets
is an error answer and a closed connection.  Connections are bounded: each
must send a whole request line within ``IDLE_TIMEOUT`` of connecting or of its
previous answer, and when ``MAX_CONNECTIONS`` are open the one that has waited
longest for a request is closed to make room, so a new client always gets in.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import inspect
import json
import logging
import os
import socket
import stat
import time
import types
import typing
import zlib
from pathlib import Path

import trio
import trio.testing

from .blocking import Runner
from .ima import Ima, RequestError
from .keys import IMA_UNTRUSTED, KeyringError, read_cert_file
from .measure import Task
from .policy import BUFFER_FUNCS, FUNCS

log = logging.getLogger(__name__)

MAX_LINE = 1 << 20
MAX_CONNECTIONS = 128  # well below the default limit of 1024 open files
IDLE_TIMEOUT = 60.0  # seconds a connection may take to send a whole request line
SEND_TIMEOUT = 2.0  # an answer fits the socket buffer: only a client that stopped reading waits
ACCEPT_RETRY = 0.5  # seconds between accept() attempts that fail (EMFILE, ENOMEM, ...)
RECEIVE_SIZE = 65536
MAX_ERROR = 1000  # characters of an error message
GENERATE_BATCH = 250  # ~2 ms of ingest between checkpoints
GENERATE_YIELD = 0.01  # seconds at most a generate batch gives way to other tasks


def runtime_dir() -> Path:
    return Path(os.environ.get("IMAFS_RUNTIME_DIR", "/run/imafs"))


def mount_path(mountpoint: str) -> str:
    """The absolute, symlink-free path of ``mountpoint``, found without
    stat'ing it: stat on a FUSE mount whose daemon is stopped blocks, and on
    one whose daemon is gone fails with ENOTCONN.  The parent is resolved by
    realpath(); the last component by readlink(2), which fails with EINVAL on
    a mount's root directory without asking its filesystem."""
    path = os.path.abspath(mountpoint)
    for _ in range(40):  # the kernel's MAXSYMLINKS
        parent, name = os.path.split(path)
        path = os.path.join(os.path.realpath(parent), name)
        try:
            target = os.readlink(path)
        except OSError:
            return path
        path = os.path.normpath(os.path.join(os.path.dirname(path), target))
    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), mountpoint)


def socket_path(mountpoint: str) -> Path:
    """Where the control socket of the mount at ``mountpoint`` lives."""
    return runtime_dir() / (hashlib.sha256(os.fsencode(mount_path(mountpoint))).hexdigest()[:16] + ".sock")


class ControlError(Exception):
    """The daemon answered with an error, or could not be reached."""


class NoAnswer(ControlError):
    """No answer came.  ``listening`` tells whether a daemon took the
    connection (and then did not answer in time, or closed it) or nothing
    listens at the socket (no socket, or one a dead daemon left)."""

    def __init__(self, message: str, listening: bool):
        super().__init__(message)
        self.listening = listening


def _left(deadline: float) -> float:
    """Seconds left until ``deadline``; raises TimeoutError once it has passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class Client:
    """A blocking client, for the CLI and for tests.  ``timeout`` bounds a
    whole call: connecting, sending and waiting for the answer."""

    def __init__(self, mountpoint: str | None = None, path: str | os.PathLike | None = None,
                 timeout: float = 600.0):
        self.path = Path(path) if path else socket_path(mountpoint)
        self.timeout = timeout

    def call(self, cmd: str, **args) -> dict:
        req = json.dumps({"cmd": cmd, **args}).encode() + b"\n"
        deadline = time.monotonic() + self.timeout
        buf = bytearray()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                while True:
                    s.settimeout(_left(deadline))
                    try:
                        s.connect(str(self.path))
                        break
                    except (FileNotFoundError, ConnectionRefusedError):
                        raise NoAnswer(f"no imafs daemon listens at {self.path}", listening=False) from None
                    except BlockingIOError:  # a full backlog: Unix sockets say EAGAIN, never wait
                        time.sleep(0.01)
                s.settimeout(_left(deadline))
                s.sendall(req)
                while not buf.endswith(b"\n"):
                    s.settimeout(_left(deadline))
                    chunk = s.recv(65536)
                    if not chunk:
                        raise NoAnswer("the daemon closed the connection without an answer", listening=True)
                    buf += chunk
        except TimeoutError:
            raise NoAnswer(f"no answer from the daemon at {self.path} within {self.timeout:g} s",
                           listening=True) from None
        except ConnectionError as e:
            raise NoAnswer(f"the daemon closed the connection without an answer ({e.strerror})",
                           listening=True) from None
        except OSError as e:
            raise ControlError(f"control socket {self.path}: {e.strerror or e}") from None
        try:
            answer = json.loads(buf)
        except ValueError:
            raise ControlError(f"the daemon at {self.path} answered something that is not JSON") from None
        if not answer.get("ok"):
            raise ControlError(answer.get("error", "unknown error"))
        return answer


class FilePath(str):
    """A request argument naming a file the daemon opens itself: an absolute
    path (a number would be taken for one of the daemon's descriptors)."""


@functools.cache
def _shape(fn) -> tuple[inspect.Signature, dict, frozenset, frozenset]:
    """A request handler's signature, argument types, argument names and
    required argument names, worked out once."""
    signature = inspect.signature(fn)
    params = list(signature.parameters.values())[1:]  # after self
    return (signature, typing.get_type_hints(fn), frozenset(p.name for p in params),
            frozenset(p.name for p in params if p.default is p.empty))


def _conforms(value, hint) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is FilePath:
        return isinstance(value, str) and value.startswith("/") and "\0" not in value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    return {type(None): "null", FilePath: "an absolute path", int: "an integer", str: "a string",
            bool: "true or false"}.get(hint, getattr(hint, "__name__", str(hint)))


def _shown(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:40] + "..."


def _create_file(path: str):
    """A blocking step: open ``path`` for writing, or say why not."""
    try:
        return open(path, "wb")
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None


def _write_file(f, path: str, data: bytes) -> None:
    """A blocking step: ``path`` may be slow, or a FIFO that waits for a reader."""
    try:
        with f:
            f.write(data)
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None


MAX_KEXEC_BUFFER = 1 << 30
KEY_SERIALS = 0x10000000  # the top nibble of the serials of the emulated kernel's keys and keyrings
HOOK_FUNCS = ("MMAP_CHECK", "MMAP_CHECK_REQPROT", "MODULE_CHECK", "KEXEC_KERNEL_CHECK", "KEXEC_INITRAMFS_CHECK")
EPOCH_FUNCS = {"MMAP_CHECK", "MMAP_CHECK_REQPROT"}  # hooks whose quiet answers the supervisor may keep (epoch.py)


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


def keyring_serial(name: str) -> int:
    """The serial number ``imafs run`` shows for a key or keyring of the
    emulated kernel: fixed per name, in a range of its own."""
    return KEY_SERIALS | zlib.crc32(name.encode()) & 0x0FFFFFFF


def _key_info(key) -> dict:
    return {"keyring": key.keyring, "id": key.id.hex(), "subject": key.subject,
            "description": key.description}


def _error(message: str) -> dict:
    """An error answer; a message that quotes a client's input at length is cut."""
    return {"ok": False, "error": message if len(message) <= MAX_ERROR else message[:MAX_ERROR] + "..."}


def _encode(answer: dict) -> bytes:
    return json.dumps(answer).encode() + b"\n"


class _BadLine(Exception):
    """The connection cannot carry a request line; the message is the answer."""


async def _next_line(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """The next request line from ``buf``, then from ``stream``, without its
    newline; None when the client closed the connection between requests."""
    too_long = f"request line longer than {MAX_LINE} bytes: not run; closing"
    start = 0
    while (end := buf.find(b"\n", start)) < 0:
        if len(buf) > MAX_LINE:
            raise _BadLine(too_long)
        start = len(buf)
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            if buf:
                raise _BadLine("request line not terminated by a newline: not run")
            return None
        buf += data
    if end > MAX_LINE:
        raise _BadLine(too_long)
    line = bytes(buf[:end])
    del buf[:end + 1]
    return line


async def _after_others() -> None:
    """Let every other task of the loop run first -- a FUSE request, a
    control request, a hook -- for at most GENERATE_YIELD: the kernel
    measures and serves readers on different CPUs at once; one loop that
    took turns would make each request wait for a batch at each of its
    checkpoints."""
    with trio.move_on_after(GENERATE_YIELD):
        await trio.testing.wait_all_tasks_blocked()


class LineServer:
    """JSON lines over a Unix socket: bounded connections, request lines
    checked against the ``cmd_NAME`` methods' signatures and type hints.
    Subclasses add the commands (the daemon's :class:`Server`, the keeper's)."""

    def __init__(self, *, idle_timeout: float = IDLE_TIMEOUT, max_connections: int = MAX_CONNECTIONS):
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.connections = 0
        self._waiting: dict[trio.CancelScope, None] = {}  # connections waiting for a request, oldest first

    async def serve(self, path: Path, *, mode: int = 0o600, task_status=trio.TASK_STATUS_IGNORED) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        # Bound, given its mode and listening under a private name, then
        # renamed into place: whoever sees the socket can connect to it.
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        try:
            await sock.bind(str(tmp))
            os.chmod(tmp, mode)
            sock.listen(self.max_connections)
            os.replace(tmp, path)
        except BaseException:
            sock.close()
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
        try:
            task_status.started()
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await sock.accept()
                    except OSError as e:  # EMFILE, ENOMEM, ...: wait and accept again
                        log.warning("control socket %s: accept: %s", path, e.strerror or e)
                        await trio.sleep(ACCEPT_RETRY)
                        continue
                    nursery.start_soon(self._handle, trio.SocketStream(conn))
        finally:
            sock.close()
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        """One connection; nothing its client does escapes as an exception."""
        try:
            async with stream:
                if self.connections >= self.max_connections and not self._evict():
                    await self._send(stream, _encode(_error(
                        f"{self.connections} control requests are in progress; try again")))
                    return
                self.connections += 1
                try:
                    await self._converse(stream)
                finally:
                    self.connections -= 1
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception:
            log.exception("control connection failed")

    def _evict(self) -> bool:
        """Close the connection that has waited longest for a request, if any."""
        if not self._waiting:
            return False
        scope = next(iter(self._waiting))
        del self._waiting[scope]
        scope.cancel()
        return True

    async def _converse(self, stream: trio.SocketStream) -> None:
        """Answer request lines in order until the client closes, errs or idles."""
        buf = bytearray()
        while True:
            with trio.CancelScope(deadline=trio.current_time() + self.idle_timeout) as wait:
                self._waiting[wait] = None
                try:
                    line = await _next_line(stream, buf)
                except _BadLine as e:
                    await self._send(stream, _encode(_error(str(e))))
                    return
                finally:
                    self._waiting.pop(wait, None)
            if wait.cancelled_caught:  # an eviction cancels before the deadline
                await self._send(stream, _encode(_error(
                    f"no whole request line within {self.idle_timeout:g} s: closed"
                    if trio.current_time() >= wait.deadline else
                    f"closed to make room: {self.max_connections} control connections were open")))
                return
            if line is None or not await self._send(stream, await self.answer(line)):
                return
            if b"\n" in buf:  # requests sent ahead: the others' turn first, as a receive would give it
                await trio.lowlevel.checkpoint()

    @staticmethod
    async def _send(stream: trio.SocketStream, data: bytes) -> bool:
        """Send one answer line, even while the daemon shuts down (the answer
        to ``shutdown`` is sent after the daemon's nursery is cancelled); False
        if the client did not take it within ``SEND_TIMEOUT`` or is gone.

        An answer that fits the socket's buffer (nearly all) is written at
        once: trio's send_all takes a turn of the event loop after every send,
        about 20 µs of each request (a stopped system call waits on it).  The
        socket is non-blocking; Python ignores SIGPIPE, so a gone client is
        EPIPE."""
        try:
            sent = os.write(stream.socket.fileno(), data)
        except BlockingIOError:
            sent = 0
        except OSError:  # EPIPE, ECONNRESET; EBADF once closed
            return False
        if sent == len(data):
            return True
        data = data[sent:]
        with trio.CancelScope(shield=True, deadline=trio.current_time() + SEND_TIMEOUT) as scope:
            await stream.send_all(data)
        return not scope.cancelled_caught

    async def answer(self, line: bytes) -> bytes:
        """The answer line to one request line.  Never raises: a request that
        fails in an unforeseen way is logged and answered as an internal error."""
        try:
            return _encode(await self._dispatch(line))
        except Exception as e:
            log.exception("control request failed: %.200r", line)
            return _encode(_error(f"internal error: {type(e).__name__}: {e}"))

    async def _dispatch(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except RecursionError:
            return _error("malformed JSON request: nested too deeply")
        except ValueError as e:
            return _error(f"malformed JSON request: {e}")
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return _error('a request is a JSON object with a "cmd" string')
        cmd = req.pop("cmd")
        handler = getattr(self, "cmd_" + cmd, None)
        if handler is None:
            return _error(f"unknown command {cmd!r}")
        signature, hints, names, required = _shape(handler.__func__)
        if not required <= req.keys() <= names:  # binding is slow: only for the error's words
            try:
                signature.bind(None, **req)
            except TypeError as e:
                return _error(f"{cmd}: bad arguments ({e})")
        for arg, value in req.items():
            if not _conforms(value, hints[arg]):
                return _error(f"{cmd}: {arg} must be {_describe(hints[arg])}, not {_shown(value)}")
        try:
            return {"ok": True, **await self.run(handler, req)}
        except (RequestError, ValueError) as e:
            return _error(str(e))

    async def run(self, handler, req: dict) -> dict:
        return await handler(**req)


class Server(LineServer):
    """Answers control requests against one :class:`Ima` inside the daemon's nursery."""

    def __init__(self, ima: Ima, runner: Runner, on_shutdown, *, measured=None, **limits):
        super().__init__(**limits)
        self.ima = ima
        self.measured = measured  # the measured mounts (passthrough.MeasuredFs), if any
        self.runner = runner  # file I/O off the loop
        self.on_shutdown = on_shutdown

    async def run(self, handler, req: dict) -> dict:
        pcrs = self.ima.pcrs
        queued = pcrs.queued if pcrs is not None else 0
        result = await handler(**req)
        if pcrs is not None and pcrs.queued != queued:
            await pcrs.settle()  # the request's records are in the TPM before it returns
        return result

    async def cmd_record(self, name: str, file: FilePath | None = None, digest: str | None = None,
                         buffer_hex: str | None = None, violation: bool = False, pcr: int | None = None,
                         template: str | None = None):
        return await self.runner.run(self.ima.record(
            name=name, file=file, digest=digest, buffer_hex=buffer_hex, violation=bool(violation),
            pcr=pcr, template=template))

    async def cmd_generate(self, count: int):
        if not isinstance(count, int) or count < 0:
            raise RequestError("generate: count must be a non-negative integer")
        added = 0
        for first in range(0, count, GENERATE_BATCH):
            added += self.ima.generate(min(GENERATE_BATCH, count - first))
            await _after_others()
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

    async def cmd_pcrs(self, bank: str | None = None):
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

    async def cmd_measure(self, func: str, path: FilePath | None = None, mask: int = 0, uid: int = 0,
                          euid: int | None = None, gid: int = 0, egid: int | None = None, name: str | None = None,
                          data_hex: str | None = None, keyring: str | None = None, label: str | None = None):
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

    async def cmd_hook(self, node: int, funcs: list, mask: int, task: dict, flags: int = 0):
        """A hook of a task's system call on a file of a measured mount (the
        seccomp supervisor, imafs/supervise.py): ``funcs`` in order, with the
        credentials of ``task`` as the supervisor read them (Task.reported)."""
        if self.measured is None:
            raise RequestError("hook: this mount has no measured mount")
        for func in funcs:
            if not isinstance(func, str) or FUNCS.get(func) not in HOOK_FUNCS:
                raise RequestError(f"hook: func must be one of {', '.join(HOOK_FUNCS)}, not {_shown(func)}")
        ima = self.ima
        before = (ima.epoch.value, ima.klog.lines)
        events, steady = await self.measured.hook(node, [FUNCS[f] for f in funcs], mask, Task.reported(task),
                                                  flags)
        answer = {"events": events}
        if steady and set(funcs) <= EPOCH_FUNCS and (ima.epoch.value, ima.klog.lines) == before and \
                not any(e.get("added") or "violations" in e or "denied" in e for e in events):
            answer["epoch"] = before[0]  # nothing changed, nothing was said: the same call, the same answer
        return answer

    async def cmd_mprotect(self, node: int, task: dict):
        """ima_file_mprotect of a task making a mapping of a file of a measured
        mount executable (the seccomp supervisor): the errno the call fails
        with, 0 to let it run."""
        if self.measured is None:
            raise RequestError("mprotect: this mount has no measured mount")
        return {"errno": await self.measured.mprotect(node, Task.reported(task))}

    async def cmd_keys_add(self, keyring: str, cert: FilePath, uid: int = 0):
        """Add a certificate file (DER or PEM) to a keyring, as ``uid``."""
        data = await self.runner.io(read_cert_file, cert)
        try:
            key, decided = self.ima.add_key(keyring, data, uid=uid)
        except RequestError as e:
            shown = keyring if len(keyring) <= 60 else keyring[:60] + "..."
            raise RequestError(f"cannot add {cert} to {shown}: {e}") from None
        return {**_key_info(key), **{k: decided[k] for k in ("queued", "added", "decision")}}

    async def cmd_keyring(self, name: str | None = None, serial: int | None = None):
        """One of the kernel's keyrings by name or serial, for the keyctl calls
        of ``imafs run`` (request_key, KEYCTL_DESCRIBE): its serial and
        permissions."""
        for ring in self.ima.keyrings.system():
            if ring == name or keyring_serial(ring) == serial:
                perm = 0x1F0F0000 if ring == IMA_UNTRUSTED else 0x1F0B0000  # integrity_init_keyring's
                return {"name": ring, "serial": keyring_serial(ring), "perm": f"{perm:08x}"}
        raise RequestError(f"keyring: no keyring {_shown(name if serial is None else serial)} of the kernel's")

    async def cmd_keyring_add(self, serial: int, data_hex: str, uid: int = 0):
        """add_key of an asymmetric key into one of the kernel's keyrings by a
        task of ``imafs run``: as ``keys add`` (the restrictions, then IMA's
        hook), with the kernel's errno when refused."""
        ring = (await self.cmd_keyring(serial=serial))["name"]
        try:
            data = bytes.fromhex(data_hex)
        except ValueError:
            raise RequestError("--data-hex: not a hexadecimal string") from None
        if data.lstrip()[:5] == b"-----":  # the kernel's x509 parser takes DER only
            return {"errno": errno.EBADMSG}
        try:
            key, decided = self.ima.add_key(ring, data, uid=uid)
        except KeyringError as e:
            return {"errno": e.errno, "why": str(e)}
        return {"errno": 0, "serial": keyring_serial(key.description), **_key_info(key), **decided}

    async def cmd_key_check(self, keyring: str, data_hex: str, uid: int = 0):
        """IMA's hook for a key added to a keyring imafs does not hold (the
        add_key calls of ``imafs run``): queued before the first custom
        policy, else measured; ``imafs measure --func KEY_CHECK`` is the
        measurement alone."""
        try:
            payload = bytes.fromhex(data_hex)
        except ValueError:
            raise RequestError("key_check: data_hex is not a hexadecimal string") from None
        return self.ima.key_check(keyring, payload, uid=uid)

    async def cmd_keys_list(self):
        return {"keys": [_key_info(k) for k in self.ima.keyrings],
                "blacklist": self.ima.keyrings.blacklist()}

    async def cmd_keys_blacklist(self, entry: str):
        """Add a bin:<hex> or tbs:<hex> entry to .blacklist."""
        return {"entry": self.ima.keyrings.add_blacklist(entry)}

    async def cmd_suspend(self):
        self.ima.suspend()
        return {}

    async def cmd_kexec(self, load_only: bool = False, dump: FilePath | None = None):
        out = await self.runner.io(_create_file, dump) if dump else None  # before anything changes
        if load_only:
            self.ima.kexec_load()
            buf = self.ima.kexec_buffer()
        else:
            if self.ima.pcrs is not None:
                await self.ima.pcrs.refresh()  # the next kernel reads PCR 0-9 from the TPM
            buf = self.ima.kexec()
        if out is not None:
            await self.runner.io(_write_file, out, dump, buf)
        return {"buffer_bytes": len(buf), "count": self.ima.store.current.count}

    async def cmd_boot(self, kexec_buffer: FilePath):
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
