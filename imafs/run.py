"""``imafs run``: a command inside the emulated kernel.

Three processes, all plain ``os.fork`` (no new interpreter, so a run starts
in a fraction of a second):

- **the runner** (``imafs run`` itself, in the host's namespaces) unshares a
  new PID namespace for its children, forks the init, and then only waits:
  signals sent to it (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1/2) go on to
  the command; CMD's end is its end, with CMD's exit status (128+N for a
  signal N, as shells report it).
- **the init** (PID 1 of the new PID namespace, in a new private mount
  namespace) makes the kernel's views (:func:`_setup`), starts the daemon or
  joins the one at ``--mount``, launches the command (:func:`launch`), reaps
  orphans and exits with the command's status.  It dies with the runner
  (``PR_SET_PDEATHSIG``), and when it exits the kernel kills every process
  of the PID namespace — the daemon, swtpm, whatever CMD left — and the mount
  namespace, with every mount of the run, goes with its last process.  So
  nothing is left on the host however the run ends, SIGKILL included: the
  run creates nothing in the host's namespace (its runtime state is a tmpfs
  over ``/run/imafs`` inside the namespace).
- **the daemon** (forked by the init, in its own session so that the
  terminal's signals never reach it) serves the emulator at
  ``/sys/kernel/security``, as ``imafs mount --foreground`` would.

The command's launch is one function, :func:`launch`, which takes a
``prepare`` callable run in the child just before ``execve`` and an
``started`` callable run in the init with the child's pid: the place for a
seccomp filter and its supervisor (:mod:`imafs.supervise`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .control import Client, ControlError, socket_path
from .daemon import _detach, _libc, _mounts, _unescape
from .views import HIDDEN_NAME

SECURITYFS = "/sys/kernel/security"
RUNTIME = "/run/imafs"  # a private tmpfs in the run's mount namespace
READY_TIMEOUT = 60.0  # seconds the daemon has to say it is mounted

# exit statuses of `imafs run` itself, as env(1), docker and podman use them
EXIT_RUN_FAILED = 125  # imafs run failed before CMD started
EXIT_CANNOT_EXEC = 126  # CMD was found but could not be executed
EXIT_NOT_FOUND = 127  # CMD was not found

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
PR_SET_PDEATHSIG = 1
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGWINCH, signal.SIGCONT)
SI_KERNEL = 0x80  # si_code of a signal the kernel sent (the terminal's ^C)


class RunError(Exception):
    """The run cannot be set up; the message is for a human."""


@dataclass
class RunSpec:
    argv: list[str]
    attach: str | None = None  # mount point of a running emulator to join
    profile: object = None  # the Profile of a new emulator
    measure: list[str] = field(default_factory=list)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None):
    enc = (lambda s: None if s is None else os.fsencode(s))
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target}")


def _bind(source: str, target: str) -> None:
    _mount(source, target, None, MS_BIND)


# -- the runner --------------------------------------------------------------------------------
def run(spec: RunSpec, prepare=None, started=None) -> int:
    """Run ``spec.argv`` inside the emulated kernel; CMD's exit status."""
    blocked = set(FORWARDED) | {signal.SIGCHLD}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")
    except OSError as e:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        print(f"imafs run: {e} (imafs run needs root)", file=sys.stderr)
        return EXIT_RUN_FAILED
    alive_r, alive_w = os.pipe()  # the init sees EOF on it once the runner is gone
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        code = EXIT_RUN_FAILED
        try:
            code = _init(spec, alive_r, old_mask, prepare, started)
        except BaseException as e:  # noqa: BLE001 -- the init must exit, never return
            print(f"imafs run: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(alive_r)
    return _wait(pid, blocked, forward_to=pid)


def _wait(child: int, blocked: set, forward_to: int, reap_all: bool = False) -> int:
    """Wait for ``child``; forward the signals someone sends (not those the
    terminal sends to the whole foreground group, which CMD gets itself)."""
    while True:
        info = signal.sigwaitinfo(blocked)
        if info.si_signo != signal.SIGCHLD:
            if info.si_code != SI_KERNEL:
                try:
                    os.kill(forward_to, info.si_signo)
                except ProcessLookupError:
                    pass
            continue
        while True:
            try:
                pid, status = os.waitpid(-1 if reap_all else child, os.WNOHANG)
            except ChildProcessError:
                return EXIT_RUN_FAILED
            if pid == 0:
                break
            if pid == child:
                if os.WIFSIGNALED(status):
                    return 128 + os.WTERMSIG(status)
                return os.WEXITSTATUS(status)


# -- the init ----------------------------------------------------------------------------------
def _init(spec: RunSpec, alive_r: int, old_mask, prepare, started) -> int:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([alive_r], [], [], 0)[0]:  # the runner died before prctl
        return EXIT_RUN_FAILED
    try:
        env = _setup(spec)
    except (RunError, OSError, ControlError) as e:
        print(f"imafs run: {e}", file=sys.stderr)
        return EXIT_RUN_FAILED
    blocked = set(FORWARDED) | {signal.SIGCHLD}
    child = launch(spec.argv, env, old_mask, prepare)
    if child is None:
        return launch.failed
    if started is not None:
        started(child)
    return _wait(child, blocked, forward_to=child, reap_all=True)


def launch(argv: list[str], env: dict[str, str], mask, prepare=None) -> int | None:
    """Fork and exec CMD with the signal mask ``mask`` and default signal
    dispositions; ``prepare()`` runs in the child just before execve.
    Returns the child's pid, or None (``launch.failed`` = 126 or 127) when
    exec failed, which is reported as a shell reports it."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT):  # Python's own dispositions
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            if prepare is not None:
                prepare()
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(w, str(e.errno).encode())
        finally:
            os._exit(EXIT_CANNOT_EXEC)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read()
    if not err:
        return pid
    os.waitpid(pid, 0)
    e = int(err)
    launch.failed = EXIT_NOT_FOUND if e == errno.ENOENT else EXIT_CANNOT_EXEC
    what = "command not found" if e == errno.ENOENT else os.strerror(e)
    print(f"imafs run: {argv[0]}: {what}", file=sys.stderr)
    return None


launch.failed = EXIT_CANNOT_EXEC


def _setup(spec: RunSpec) -> dict[str, str]:
    """The run's mount namespace: the emulator at /sys/kernel/security, the
    only securityfs; the kernel's views; a private runtime directory.
    Returns CMD's environment."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing of the run reaches the host
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's
    sock_fd = None
    if spec.attach:
        sock_fd = _join(spec.attach)
    os.makedirs(RUNTIME, exist_ok=True)
    _mount("tmpfs", RUNTIME, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755")
    os.environ["IMAFS_RUNTIME_DIR"] = RUNTIME
    sock = socket_path(SECURITYFS)
    if spec.attach:
        sock.touch()
        _bind(f"/proc/self/fd/{sock_fd}", str(sock))
        os.close(sock_fd)
    else:
        _hide_securityfs(keep=None)
        _start_daemon(spec)
    env = dict(os.environ)
    client = Client(SECURITYFS)
    status = client.call("status")
    try:
        env.update(client.call("tpm_env")["env"])
        tpm = True
    except ControlError:
        tpm = False
    _views(tpm)
    env["IMAFS_RUNTIME_DIR"] = RUNTIME
    env["IMAFS_MOUNT"] = SECURITYFS
    env["IMAFS_UTS_RELEASE"] = status["profile"]["uts_release"] or _release()
    return env


def _release() -> str:
    """The emulated release, as the daemon's osrelease view has it (uname's -r)."""
    with open(f"{SECURITYFS}/{HIDDEN_NAME}/osrelease") as f:
        return f.read().strip()


def _securityfs_mounts() -> list[tuple[str, str, str]]:
    """(device, root, mount point) of every mount whose source is securityfs."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            sep = parts.index(b"-")
            if parts[sep + 2] == b"securityfs":
                out.append((parts[2].decode(), _unescape(parts[3]), _unescape(parts[4])))
    return out


def _hide_securityfs(keep: str | None) -> None:
    """Detach every mount whose source is securityfs except those of device
    ``keep`` (tools take the first such line of /proc/mounts), topmost first."""
    for dev, _, point in reversed(_securityfs_mounts()):
        if dev != keep:
            try:
                _detach(point)
            except OSError as e:
                if e.errno != errno.EINVAL:  # already gone with a parent
                    raise


def _join(mountpoint: str) -> int:
    """Bind the emulator at ``mountpoint`` at /sys/kernel/security, with its
    measured mounts bound again after it so that /sys/kernel/security is the
    first securityfs line; the others go.  Returns an O_PATH descriptor of
    its control socket, bound into the private runtime directory later."""
    from .control import mount_path
    mp = mount_path(mountpoint)
    top = [(dev, root) for dev, root, point, fstype in _mounts() if point == mp]
    if not top or _mounts_fstype(mp) != "fuse.imafs":
        raise RunError(f"--mount {mountpoint}: no imafs mount there")
    dev = top[-1][0]
    try:
        Client(mountpoint, timeout=5).call("status")
    except ControlError as e:
        raise RunError(f"--mount {mountpoint}: its daemon does not answer ({e})") from None
    sock_fd = os.open(socket_path(mountpoint), os.O_PATH | os.O_CLOEXEC)
    measured = [(root, point) for d, root, point in _securityfs_mounts() if d == dev and point != mp]
    _detach_ignoring(point for _, point in measured)
    _bind(mp, SECURITYFS)
    for root, point in measured:
        _bind(SECURITYFS + root, point)
    _detach(mp)
    keep_points = {SECURITYFS, *(p for _, p in measured)}
    for d, _, point in reversed(_securityfs_mounts()):
        if point not in keep_points:
            _detach_ignoring([point])
    return sock_fd


def _mounts_fstype(point: str) -> str | None:
    found = None
    for _, _, p, fstype in _mounts():
        if p == point:
            found = fstype
    return found


def _detach_ignoring(points) -> None:
    for point in points:
        try:
            _detach(point)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise


def _start_daemon(spec: RunSpec) -> None:
    """Fork the daemon (its own session: the terminal's ^C is CMD's, not
    its) and wait until it has mounted and answers."""
    from .daemon import run as serve
    log_file = str(socket_path(SECURITYFS).with_suffix(".log"))
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setsid()
            signal.pthread_sigmask(signal.SIG_SETMASK, set())
            fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            import logging
            logging.basicConfig(level=logging.INFO, format="imafs[%(process)d]: %(message)s")

            def ready(error):
                os.write(w, (error or "ok").encode() + b"\n")

            serve(SECURITYFS, spec.profile, ready, spec.measure, log_file)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as pipe:
        answer = pipe.readline().strip() if select.select([pipe], [], [], READY_TIMEOUT)[0] else None
    if answer != "ok":
        try:
            log = Path(log_file).read_text(errors="replace").strip()
        except OSError:
            log = ""
        raise RunError((answer or f"the daemon did not say it was mounted within {READY_TIMEOUT:g} s")
                       + (f"\n{log}" if log else ""))


def _views(tpm: bool) -> None:
    """Bind the daemon's views (:mod:`imafs.views`) over the kernel's files."""
    views = f"{SECURITYFS}/{HIDDEN_NAME}"
    _bind(f"{views}/cmdline", "/proc/cmdline")
    _bind(f"{views}/osrelease", "/proc/sys/kernel/osrelease")
    _bind(f"{views}/kmsg", "/dev/kmsg")
    if os.path.isdir("/var/log/audit"):  # the host's audit records are not the run's kernel's
        _mount("tmpfs", "/var/log/audit", "tmpfs", MS_NOSUID | MS_NODEV, "mode=700")
    else:
        _make_dir("/var/log", "audit", "log")
    Path("/var/log/audit/audit.log").touch(0o600)
    _bind(f"{views}/audit.log", "/var/log/audit/audit.log")
    if tpm:
        if not os.path.isdir("/sys/class/tpm"):
            _make_dir("/sys/class", "tpm", "class")
        _bind(f"{views}/tpm", "/sys/class/tpm")  # hides a host TPM


def _make_dir(parent: str, name: str, tag: str) -> None:
    """Make the missing directory ``parent/name`` in the run only: an
    overlay over ``parent`` whose upper layer is in the runtime tmpfs, so
    the host's tree is never written."""
    target = os.path.join(parent, name)
    upper, work = f"{RUNTIME}/.{tag}-upper", f"{RUNTIME}/.{tag}-work"
    os.mkdir(upper)
    os.mkdir(work)
    _mount("overlay", parent, "overlay", 0, f"lowerdir={parent},upperdir={upper},workdir={work}")
    os.mkdir(target, 0o755)
