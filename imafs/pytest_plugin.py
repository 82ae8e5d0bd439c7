"""The pytest plugin: a fresh emulated IMA kernel per test, for people who
test agents.

Registered as the ``imafs`` entry point of ``pytest11``: a project that
installs imafs gets the fixtures ``imafs_kernel`` (one emulator, its profile
from the ``imafs`` marker or an indirect parameter) and ``imafs_factory``
(as many emulators as a test asks for).  See docs/pytest.md.

The plugin is a thin client: it mounts and unmounts through the ``imafs``
command, talks to the daemon through :class:`imafs.control.Client`, reads and
writes the securityfs files as an agent would, and runs commands inside the
emulated kernel through ``imafs run --mount``.  Each emulator gets its own
directory under the temporary directory (``imafs-pytest-<pid>-*``, named by
the pytest process, so that ``pytest -n`` workers never share one) holding
its mount point and its runtime directory (``IMAFS_RUNTIME_DIR``: control
socket, logs, swtpm state).  Teardown unmounts, makes sure the daemon and its
swtpm are gone and removes the directory, after a passing, failing or
interrupted test alike; directories whose pytest process was killed outright
are cleared by the next session that uses the plugin.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .control import Client, ControlError, socket_path
from .policy import MASKS

REQUIRE_FUSE_VAR = "IMAFS_REQUIRE_FUSE"
PREFIX = "imafs-pytest-"
CLI_TIMEOUT = 120.0  # seconds an `imafs` command (mount, umount, ...) may take
GONE_TIMEOUT = 5.0  # seconds the daemon and its swtpm have to end after the unmount


def fuse_unavailable() -> str | None:
    """Why this process cannot mount the emulator, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "imafs mounts with allow_other and needs root"
    return None


def _settings(args, kwargs) -> list[str]:
    """``--set`` values from a marker's or a parameter's KEY=VALUE strings and keywords."""
    out = [str(a) for a in args]
    for key, value in kwargs.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        out.append(f"{key}={value}")
    return out


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, IndexError):
        return None


def _mounted_under(base: Path) -> list[str]:
    """Mount points of this namespace at or below ``base``, deepest first."""
    from .binds import mounts as _mounts
    top = os.fspath(base)
    return sorted({mp for _, _, mp, _ in _mounts() if mp == top or mp.startswith(top + "/")},
                  key=len, reverse=True)


class ImaKernel:
    """One emulated kernel, mounted for one test.

    ``securityfs`` is where the tree is mounted (the ``ima`` directory is
    ``ima``); ``env`` is the environment under which the ``imafs`` command
    (and ``imafs.control.Client``) find this emulator; ``tpm`` the
    environment that reaches its TPM (tpm = swtpm or tcti:...), else None.
    """

    def __init__(self, base: Path, settings: list[str], profile: str | None = None, measure=()):
        self.base = base
        self.securityfs = base / "mnt"
        self.ima = self.securityfs / "ima"
        self.runtime_dir = base / "run"
        self.env = {**os.environ, "IMAFS_RUNTIME_DIR": os.fspath(self.runtime_dir)}
        self.client = Client(path=self.runtime_dir / socket_path(os.fspath(self.securityfs)).name)
        self.securityfs.mkdir()
        args = ["mount", self.securityfs]
        for s in settings:
            args += ["--set", s]
        for src, dst in (m.split(":", 1) if isinstance(m, str) else m for m in measure):
            args += ["--measure", f"{os.path.abspath(src)}:{os.path.abspath(dst)}"]
        if profile:
            args += ["--profile", profile]
        r = self.cli(*args, mount=False, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"imafs {shlex.join(map(os.fspath, args))} failed: {r.stderr.strip()}")
        st = self.status()
        self.pids = [st["pid"], st["tpm"].get("swtpm_pid")]
        self.tpm = st["tpm"].get("env")

    # -- the imafs command and the control socket ---------------------------------
    def cli(self, *args, mount: bool = True, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
        """Run ``imafs ARGS [--mount MP]`` against this emulator; text output captured."""
        extra = ["--mount", self.securityfs] if mount else []
        return subprocess.run([sys.executable, "-m", "imafs", *map(os.fspath, (*args, *extra))],
                              env=self.env, capture_output=True, text=True, check=check,
                              timeout=CLI_TIMEOUT, **kwargs)

    def status(self) -> dict:
        """``imafs status``: profile, counters, policy, PCRs, TPM."""
        answer = self.client.call("status")
        answer.pop("ok")
        return answer

    def record(self, name: str, *, file=None, digest: str | None = None, buffer: bytes | None = None,
               violation: bool = False, pcr: int | None = None, template: str | None = None) -> bool:
        """Append one record as the kernel's store step (``imafs record``);
        False when the duplicate table suppressed it."""
        req = {"name": name, "file": file and os.path.abspath(file), "digest": digest,
               "buffer_hex": buffer.hex() if buffer is not None else None, "violation": violation,
               "pcr": pcr, "template": template}
        return self.client.call("record", **{k: v for k, v in req.items() if v not in (None, False)})["added"]

    def measure(self, path=None, *, func: str = "FILE_CHECK", mask: int | str = 0, uid: int | None = None,
                euid: int | None = None, gid: int | None = None, egid: int | None = None,
                name: str | None = None, data: bytes | None = None, keyring: str | None = None,
                label: str | None = None) -> dict:
        """A hook event decided by the policy (``imafs measure``): a file
        (``path``, with the task's ``mask`` and credentials, yours by default)
        or a buffer hook (``name`` and ``data``: KEXEC_CMDLINE, KEY_CHECK with
        ``keyring``, CRITICAL_DATA with ``label``)."""
        if path is not None:
            if isinstance(mask, str):
                bits = 0
                for part in mask.split("|"):
                    if part not in MASKS:
                        raise ValueError(f"mask: {part!r}; use {', '.join(MASKS)} joined by |")
                    bits |= MASKS[part]
                mask = bits
            req = {"path": os.path.realpath(path), "mask": mask, "name": name,
                   "uid": os.getuid() if uid is None else uid, "euid": os.geteuid() if euid is None else euid,
                   "gid": os.getgid() if gid is None else gid, "egid": os.getegid() if egid is None else egid}
        else:
            req = {"name": name, "data_hex": data.hex() if data is not None else None,
                   "keyring": keyring, "label": label}
        answer = self.client.call("measure", func=func, **{k: v for k, v in req.items() if v is not None})
        answer.pop("ok")
        return answer

    def pcrs(self, bank: str | None = None):
        """PCR values as bytes, read now (from the TPM with tpm = swtpm): a
        list for ``bank``, else a dict of lists by bank."""
        answer = self.client.call("pcrs", **({"bank": bank} if bank else {}))
        values = {b: [bytes.fromhex(v) for v in vals] for b, vals in answer["pcrs"].items()}
        return values[bank] if bank else values

    def dmesg(self) -> str:
        """The emulated kernel's log so far (audit records included)."""
        try:
            with open(self.status()["kernel_log"], "rb") as f:
                return f.read().decode(errors="replace")
        except FileNotFoundError:  # created by the first line logged
            return ""

    # -- the securityfs files, as an agent uses them -------------------------------
    def list_path(self, fmt: str = "ascii", bank: str | None = None, staged: bool = False) -> Path:
        """Path of a measurement list: ``fmt`` ascii or binary, ``bank`` for
        the per-bank files (sha256, ...), ``staged`` for the ``_staged`` twin."""
        if fmt not in ("ascii", "binary"):
            raise ValueError(f"fmt must be 'ascii' or 'binary', not {fmt!r}")
        return self.ima / (f"{fmt}_runtime_measurements" + (f"_{bank}" if bank else "")
                           + ("_staged" if staged else ""))

    def measurements(self, bank: str | None = None, staged: bool = False) -> str:
        """The ASCII list (``bank``: its per-bank file), read as an agent reads it."""
        return self.list_path("ascii", bank, staged).read_text()

    def _abi_v5(self) -> bool:
        return self.status()["profile"].get("abi") == "v5"

    def _write(self, path: Path, command: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, command)
        finally:
            os.close(fd)

    def stage(self) -> str:
        """Write ``A`` (on the ``_staged`` file; on the list itself with abi =
        v5) and return the staged records as ASCII.  A refusal raises the
        kernel's OSError (ENOENT on an empty list, EBUSY, EACCES, ...)."""
        self._write(self.list_path(staged=not self._abi_v5()), b"A\n")
        return self.measurements(staged=True)

    def delete(self, n: int | None = None) -> None:
        """Without ``n``: write ``D`` on the ``_staged`` file, deleting what
        was staged; with ``n``: write N on the list, deleting its ``n`` oldest
        records.  A refusal raises the kernel's OSError."""
        if n is None:
            self._write(self.list_path(staged=True), b"D\n")
        else:
            self._write(self.list_path(), b"%d\n" % n)

    # -- commands inside the emulated kernel ---------------------------------------
    def run(self, cmd, **kwargs) -> subprocess.CompletedProcess:
        """``subprocess.run(cmd, **kwargs)`` inside the emulated kernel
        (``imafs run --mount``): a private mount namespace where this emulator
        is /sys/kernel/security.  ``shell=True`` runs ``cmd`` with /bin/sh
        inside it."""
        env = kwargs.pop("env", None)
        env = {**(self.env if env is None else env), "IMAFS_RUNTIME_DIR": os.fspath(self.runtime_dir)}
        if kwargs.pop("shell", False):
            cmd = ["/bin/sh", "-c", cmd if isinstance(cmd, str) else shlex.join(map(os.fspath, cmd))]
        elif isinstance(cmd, (str, os.PathLike)):
            cmd = [cmd]
        return subprocess.run([sys.executable, "-m", "imafs", "run", "--mount", os.fspath(self.securityfs),
                               "--", *map(os.fspath, cmd)], env=env, **kwargs)

    # -- teardown ------------------------------------------------------------------
    def close(self) -> list[str]:
        """Unmount; make sure the daemon and its swtpm are gone; remove the
        directory.  Returns what had to be forced (empty when all went well)."""
        forced = []
        if _mounted_under(self.base):
            r = self.cli("umount", self.securityfs, mount=False, check=False)
            if r.returncode != 0:
                forced.append(f"imafs umount: {r.stderr.strip()}")
        forced += _clear(self.base, self.pids)
        return forced


def _clear(base: Path, pids) -> list[str]:
    """Force away whatever is left of the emulator in ``base``: its mounts,
    its daemon and swtpm (``pids``), the directory."""
    forced = []
    for mp in _mounted_under(base):
        subprocess.run(["umount", "-l", mp], capture_output=True)
        forced.append(f"detached {mp}")
    deadline = time.monotonic() + GONE_TIMEOUT
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
            forced.append(f"killed {pid}")
    if not _mounted_under(base):  # never recurse into a mount
        shutil.rmtree(base, ignore_errors=True)
    return forced


def _sweep(tmp: Path) -> None:
    """Clear what the plugin left in ``tmp`` for a pytest process that was
    killed outright (no teardown ran): a directory whose owner is gone."""
    for base in tmp.glob(PREFIX + "*"):
        try:
            pid, start = (base / "owner").read_text().split()
        except (OSError, ValueError):
            continue
        if _start_time(int(pid)) == start:
            continue  # its pytest still runs
        env = {**os.environ, "IMAFS_RUNTIME_DIR": os.fspath(base / "run")}
        pids = []
        try:
            st = Client(path=base / "run" / socket_path(os.fspath(base / "mnt")).name, timeout=2).call("status")
            pids = [st["pid"], st["tpm"].get("swtpm_pid")]
        except (ControlError, OSError):
            pass
        if _mounted_under(base):
            subprocess.run([sys.executable, "-m", "imafs", "umount", base / "mnt"], env=env,
                           capture_output=True, timeout=CLI_TIMEOUT)
        _clear(base, pids)


def _new_base() -> Path:
    tmp = Path(tempfile.gettempdir())
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    base = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{worker}-", dir=tmp))
    base.chmod(0o755)  # any uid reaches the mount point, as /sys/kernel/security
    (base / "owner").write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    return base


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "imafs(*settings, profile=None, measure=(), **keys): the emulated kernel of the "
        "imafs_kernel fixture: profile keys as KEY=VALUE strings or keywords "
        "(kernel='6.12', ima_policy='tcb', tpm='swtpm'), a TOML profile file, SRC:DST measured mounts")


@pytest.fixture(scope="session")
def _imafs_swept():
    """Once per session (per xdist worker): clear what killed sessions left."""
    _sweep(Path(tempfile.gettempdir()))


@pytest.fixture
def imafs_factory(_imafs_swept):
    """Factory: ``imafs_factory(*settings, profile=None, measure=(), **keys)``
    mounts a fresh emulator and returns its :class:`ImaKernel`; every one is
    unmounted and removed at teardown.  Skips without root or /dev/fuse
    (fails instead with IMAFS_REQUIRE_FUSE=1)."""
    why = fuse_unavailable()
    if why:
        if os.environ.get(REQUIRE_FUSE_VAR) == "1":
            pytest.fail(f"{REQUIRE_FUSE_VAR}=1 but {why}")
        pytest.skip(f"imafs: {why}")
    kernels: list[ImaKernel] = []

    def make(*settings, profile=None, measure=(), **keys) -> ImaKernel:
        base = _new_base()
        try:
            kernel = ImaKernel(base, _settings(settings, keys), profile, measure)
        except BaseException:
            _clear(base, [])
            raise
        kernels.append(kernel)
        return kernel

    yield make
    forced = []
    for kernel in reversed(kernels):
        forced += kernel.close()
    if forced:
        pytest.fail("imafs teardown had to force: " + "; ".join(forced))


@pytest.fixture
def imafs_kernel(request, imafs_factory) -> ImaKernel:
    """A fresh emulated kernel for this test.  Its profile: the closest
    ``@pytest.mark.imafs(...)`` marker, then an indirect parameter (a dict of
    keys, or a KEY=VALUE string) on top."""
    args, keys = [], {}
    marker = request.node.get_closest_marker("imafs")
    if marker is not None:
        args, keys = list(marker.args), dict(marker.kwargs)
    param = getattr(request, "param", None)
    if isinstance(param, dict):
        keys.update(param)
    elif isinstance(param, str):
        args.append(param)
    elif param is not None:
        raise TypeError(f"imafs_kernel parameter: a dict of profile keys or a KEY=VALUE string, not {param!r}")
    return imafs_factory(*args, **keys)
