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
import socket
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import binds
from .control import Client, ControlError, mount_path, socket_path
from .binds import mounts as _mounts, unescape as _unescape
from .daemon import _detach, _libc, _top_mount
from .passthrough import HIDDEN_PREFIX
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


def _describe(e: Exception) -> str:
    """An error for a human: a system call's own message without "[Errno N]"."""
    if isinstance(e, OSError) and e.filename is None and e.strerror:
        return e.strerror
    return str(e)


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
        print(f"imafs run: {_describe(e)} (imafs run needs root)", file=sys.stderr)
        return EXIT_RUN_FAILED
    daemon = None
    if spec.attach:
        try:
            daemon = _daemon_of(spec.attach)
        except (RunError, OSError, ControlError) as e:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            print(f"imafs run: {_describe(e)}", file=sys.stderr)
            return EXIT_RUN_FAILED
    alive_r, alive_w = os.pipe()  # the init sees EOF on it once the runner is gone
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(alive_w)
        code = EXIT_RUN_FAILED
        try:
            code = _init(spec, daemon, alive_r, old_mask, prepare, started)
        except BaseException as e:  # noqa: BLE001 -- the init must exit, never return
            print(f"imafs run: {e}", file=sys.stderr)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(alive_r)
    if daemon is not None:
        daemon.close()
    return _wait(pid, blocked, forward_to=pid)


def _daemon_of(mountpoint: str) -> binds.FuseDaemon:
    """The daemon serving the imafs mount at ``mountpoint``, reached now, in
    the runner: the run's init is in a new PID namespace where a daemon of
    the host has no pid.  Its control socket names it (SO_PEERCRED: the
    kernel's word for who listens, not the daemon's); the pidfd taken here
    is what the init copies the daemon's /dev/fuse from, at the last moment
    (a pidfd holds no descriptor of the daemon).  The daemon never hands its
    /dev/fuse out itself: a copy serves or hijacks the filesystem, so only
    those allowed to ptrace the daemon get one (pidfd_getfd checks that)."""
    mp = mount_path(mountpoint)
    top = _top_mount(mp)
    if top is None or top[1] != "fuse.imafs":
        raise RunError(f"--mount {mountpoint}: no imafs mount there")
    try:
        Client(mountpoint, timeout=5).call("status")
    except ControlError as e:
        raise RunError(f"--mount {mountpoint}: its daemon does not answer ({e})") from None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(socket_path(mountpoint)))
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    if pid == 0:
        raise RunError(f"--mount {mountpoint}: its daemon runs in a PID namespace this one cannot see")
    return binds.FuseDaemon.of(pid)


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
def _init(spec: RunSpec, daemon: binds.FuseDaemon | None, alive_r: int, old_mask, prepare, started) -> int:
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if select.select([alive_r], [], [], 0)[0]:  # the runner died before prctl
        return EXIT_RUN_FAILED
    try:
        env = _setup(spec, daemon)
    except (RunError, OSError, ControlError) as e:
        print(f"imafs run: {_describe(e)}", file=sys.stderr)
        return EXIT_RUN_FAILED
    blocked = set(FORWARDED) | {signal.SIGCHLD}
    try:
        child = launch(spec.argv, env, old_mask, prepare)
    except ExecFailed as e:
        print(f"imafs run: {e}", file=sys.stderr)
        return e.status
    if started is not None:
        started(child)
    code = _wait(child, blocked, forward_to=child, reap_all=True)
    if not spec.attach:
        _abort_connection()
    return code


def _abort_connection() -> None:
    """Abort the FUSE connection of the run's daemon before the init exits:
    the kernel then kills the namespace's processes, and a daemon thread
    that waits on its own filesystem would hold up that teardown for ever
    (it holds /dev/fuse, whose release is what ends such a wait)."""
    devs = [dev for dev, _, point, fstype in _mounts() if point == SECURITYFS and fstype == "fuse.imafs"]
    if not devs:
        return
    major, minor = map(int, devs[-1].split(":"))
    conns = "/sys/fs/fuse/connections"
    try:
        if not os.listdir(conns):
            _mount("fusectl", conns, "fusectl")
        with open(f"{conns}/{os.makedev(major, minor)}/abort", "w") as f:
            f.write("1")
    except OSError as e:
        print(f"imafs run: cannot abort the daemon's FUSE connection: {e}", file=sys.stderr)


class ExecFailed(Exception):
    """CMD could not be executed; ``status`` is what a shell exits with."""

    def __init__(self, argv0: str, err: int):
        self.status = EXIT_NOT_FOUND if err == errno.ENOENT else EXIT_CANNOT_EXEC
        super().__init__(f"{argv0}: {'command not found' if err == errno.ENOENT else os.strerror(err)}")


def launch(argv: list[str], env: dict[str, str], mask, prepare=None) -> int:
    """Fork and exec CMD with the signal mask ``mask`` and default signal
    dispositions; ``prepare()`` runs in the child just before execve.
    Returns the child's pid once it has exec'd; ExecFailed if it could not."""
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
        err = f.read()  # EOF at the exec (the pipe is close-on-exec), or the errno
    if err:
        os.waitpid(pid, 0)
        raise ExecFailed(argv[0], int(err))
    return pid


def _setup(spec: RunSpec, daemon: binds.FuseDaemon | None) -> dict[str, str]:
    """The run's mount namespace: the emulator at /sys/kernel/security, the
    only securityfs; the kernel's views; a private runtime directory.
    ``daemon`` is the daemon of ``--mount``.  Returns CMD's environment."""
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
        _hide_emulators()
        daemon = binds.FuseDaemon.of(_start_daemon(spec))
    env = dict(os.environ)
    client = Client(SECURITYFS)
    status = client.call("status")
    try:
        env.update(client.call("tpm_env")["env"])
        tpm = True
    except ControlError:
        tpm = False
    try:
        _views(tpm, daemon)
    finally:
        daemon.close()
    env["IMAFS_RUNTIME_DIR"] = RUNTIME
    env["IMAFS_MOUNT"] = SECURITYFS
    env["IMAFS_UTS_RELEASE"] = status["profile"]["uts_release"] or _release()
    return env


def _release() -> str:
    """The emulated release, as the daemon's osrelease view has it (uname's -r)."""
    with open(f"{SECURITYFS}/{HIDDEN_NAME}/osrelease") as f:
        return f.read().strip()


def _emulator_mounts() -> list[tuple[str, str, str]]:
    """(device, root, mount point) of every mount whose source is securityfs
    (the kernel's, an imafs mount) or whose type is fuse.imafs (also the
    measured mounts and views of imafs mounts, whose source is imafs)."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            parts = line.split()
            sep = parts.index(b"-")
            if parts[sep + 2] == b"securityfs" or parts[sep + 1] == b"fuse.imafs":
                out.append((parts[2].decode(), _unescape(parts[3]), _unescape(parts[4])))
    return out


def _hide_emulators(keep=lambda dev, root, point: False) -> None:
    """Detach every securityfs and imafs mount except those ``keep`` names,
    topmost first (tools take the first securityfs line of /proc/mounts)."""
    for dev, root, point in reversed(_emulator_mounts()):
        if not keep(dev, root, point):
            try:
                _detach(point)
            except OSError as e:
                if e.errno != errno.EINVAL:  # already gone with a parent
                    raise


def _join(mountpoint: str) -> int:
    """Move the emulator at ``mountpoint`` to /sys/kernel/security; its
    measured mounts stay, every other securityfs or imafs mount goes.
    Returns an O_PATH descriptor of its control socket, bound into the
    private runtime directory later."""
    mp = mount_path(mountpoint)
    dev = _top_mount(mp)[0]  # checked by the runner (_daemon_of)
    sock_fd = os.open(socket_path(mountpoint), os.O_PATH | os.O_CLOEXEC)
    tree = binds.clone_mount(mp)
    try:
        _hide_emulators(keep=lambda d, root, point: d == dev and root.startswith("/" + HIDDEN_PREFIX))
        binds.attach(tree, SECURITYFS)
    finally:
        os.close(tree)
    return sock_fd


def _start_daemon(spec: RunSpec) -> int:
    """Fork the daemon (its own session: the terminal's ^C is CMD's, not
    its) and wait until it has mounted and answers; its pid."""
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
        if answer is None:
            answer = f"the daemon did not say it was mounted within {READY_TIMEOUT:g} s"
        raise RunError((answer or "the daemon died before it was mounted") + (f"\n{log}" if log else ""))
    return pid


def _views(tpm: bool, daemon: binds.FuseDaemon) -> None:
    """Bind the daemon's views (:mod:`imafs.views`) over the kernel's files,
    from a mount of its connection whose source is imafs (:mod:`imafs.binds`):
    /sys/kernel/security stays the only securityfs."""
    views = {"cmdline": "/proc/cmdline", "osrelease": "/proc/sys/kernel/osrelease", "kmsg": "/dev/kmsg",
             "audit.log": "/var/log/audit/audit.log"}
    if os.path.isdir("/var/log/audit"):  # the host's audit records are not the run's kernel's
        _mount("tmpfs", "/var/log/audit", "tmpfs", MS_NOSUID | MS_NODEV, "mode=700")
    else:
        _make_dir("/var/log", "audit", "log")
    Path("/var/log/audit/audit.log").touch(0o600)
    if tpm:
        if not os.path.isdir("/sys/class/tpm"):
            _make_dir("/sys/class", "tpm", "class")
        views["tpm"] = "/sys/class/tpm"  # hides a host TPM
    trees = binds.clone(daemon.copy(), SECURITYFS, [f"{HIDDEN_NAME}/{name}" for name in views])
    try:
        for tree, target in zip(trees, views.values()):
            binds.attach(tree, target)
    finally:
        for tree in trees:
            os.close(tree)


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
