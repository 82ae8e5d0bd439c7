"""The ``imafs`` command."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import subprocess
import sys
import time

from .control import Client, ControlError, NoAnswer, runtime_dir, socket_path
from .profile import ProfileError, load_profile
from .tpm import format_pcr_file


def _fail(msg: str, code: int = 1) -> int:
    print(f"imafs: {msg}", file=sys.stderr)
    return code


# -- mount / umount ------------------------------------------------------------
READY_TIMEOUT = 60.0  # seconds a new daemon has to say it is mounted
UMOUNT_TIMEOUT = 5.0  # seconds a daemon has to answer `shutdown`, then to be unmounted


def cmd_mount(args) -> int:
    try:
        profile = load_profile(args.profile, args.set)
    except ProfileError as e:
        return _fail(f"bad profile: {e}", 2)
    from .daemon import MountError, check_mountpoint, parse_measure, run
    if args.foreground:
        logging.basicConfig(level=logging.INFO, format="imafs[%(process)d]: %(message)s")
        ready_fd = args.ready_fd

        def ready(error):
            if ready_fd is not None:
                try:
                    os.write(ready_fd, (error or "ok").encode() + b"\n")
                    os.close(ready_fd)
                except OSError:
                    pass  # the `imafs mount` that waited is gone: nobody to tell
            elif error:
                print(f"imafs: {error}", file=sys.stderr)
            ready.error = error

        ready.error = None
        run(args.mountpoint, profile, ready, args.measure, args.log_file)
        return 1 if ready.error else 0
    try:
        check_mountpoint(args.mountpoint)
        for spec in args.measure:
            parse_measure(spec, args.mountpoint)
    except MountError as e:
        return _fail(str(e))
    return _spawn_daemon(args)


def _spawn_daemon(args) -> int:
    """Start ``imafs mount --foreground`` in its own session; wait until it is ready."""
    runtime_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    logfile = socket_path(args.mountpoint).with_suffix(".log")
    r, w = os.pipe()
    cmd = [sys.executable, "-m", "imafs", "mount", "--foreground", "--ready-fd", str(w),
           "--log-file", str(logfile), args.mountpoint]
    if args.profile:
        cmd += ["--profile", args.profile]
    for kv in args.set:
        cmd += ["--set", kv]
    for spec in args.measure:
        cmd += ["--measure", spec]
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, pass_fds=(w,), start_new_session=True,
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    os.close(w)
    with os.fdopen(r) as pipe:
        answer = pipe.read().strip() if select.select([pipe], [], [], READY_TIMEOUT)[0] else None
    if answer == "ok":
        return 0
    if answer is None:
        proc.terminate()  # its shutdown unmounts whatever it mounted
        answer = (f"the daemon did not say it was mounted within {READY_TIMEOUT:g} s; stopped it; "
                  f"see {logfile}")
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return _fail(answer or f"the daemon died at start (exit {proc.returncode}); see {logfile}")


def cmd_umount(args) -> int:
    from .daemon import mounted_at
    mp = args.mountpoint
    try:
        Client(mp, timeout=UMOUNT_TIMEOUT).call("shutdown")
    except NoAnswer as e:
        return _umount_unanswered(mp, e)
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while mounted_at(mp) == "fuse.imafs":
        if time.monotonic() > deadline:
            return _clear(mp, f"its daemon answered `shutdown`, but {mp} was still mounted "
                               f"{UMOUNT_TIMEOUT:g} s later", "detached it lazily")
        time.sleep(0.05)
    return 0


def _umount_unanswered(mp: str, no_answer: NoAnswer) -> int:
    """``imafs umount`` of a mount whose daemon did not answer: clear what a
    dead daemon left, detach what a stuck one holds."""
    from .daemon import ELSEWHERE, GONE, diagnose, mounted_at
    sock = socket_path(mp)
    if mounted_at(mp) != "fuse.imafs":
        if not no_answer.listening and sock.exists():
            sock.unlink()
            return _fail(f"nothing is mounted at {mp}; removed {sock}, the control socket a dead "
                         "daemon left")
        return _fail(f"no imafs mount at {mp} ({no_answer})")
    kind, why = diagnose(mp, no_answer)
    if kind == ELSEWHERE:
        return _fail(f"{mp}: {why}; not unmounted")
    if kind == GONE:
        sock.unlink(missing_ok=True)
        return _clear(mp, why, "removed its dead mount")
    return _clear(mp, why, "detached it lazily: the daemon ends when it runs again")


def _clear(mp: str, why: str, done: str) -> int:
    """Detach the mount at ``mp`` and its measured mounts; say why, and where the logs are."""
    from .daemon import detach_mount
    try:
        points = detach_mount(mp)
    except OSError as e:
        return _fail(f"{mp}: {why}; cannot detach it: {e.strerror}")
    sock = socket_path(mp)
    msg = f"{mp}: {why}; {done}"
    if points[1:]:
        msg += f" and its measured mounts at {', '.join(points[1:])}"
    logs = [str(p) for p in (sock.with_suffix(".log"), sock.with_suffix(".kmsg")) if p.exists()]
    if logs:
        msg += f"; its logs: {', '.join(logs)}"
    print(f"imafs: {msg}", file=sys.stderr)
    return 0


# -- run ---------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .run import EXIT_RUN_FAILED, SECURITYFS, RunSpec, run
    from .supervise import RunHooks
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        return _fail("run: no command; usage: imafs run [options] -- CMD [ARGS]", 2)
    if args.mount:
        if args.profile or args.set or args.measure:
            return _fail("run: --mount joins a running emulator as it is; --profile, --set and "
                         "--measure are for a new one", 2)
        hooks = RunHooks(SECURITYFS)  # the system calls FUSE cannot see
        return run(RunSpec(argv, attach=args.mount), hooks.prepare, hooks.started)
    try:
        profile = load_profile(args.profile, args.set)
    except ProfileError as e:
        return _fail(f"bad profile: {e}", EXIT_RUN_FAILED)
    from .daemon import MountError, parse_measure
    try:
        for spec in args.measure:
            parse_measure(spec, SECURITYFS)
    except MountError as e:
        return _fail(str(e), EXIT_RUN_FAILED)
    hooks = RunHooks(SECURITYFS)  # the system calls FUSE cannot see
    return run(RunSpec(argv, profile=profile, measure=args.measure), hooks.prepare, hooks.started)


# -- requests to a running daemon -------------------------------------------------------
def _client(args) -> Client:
    return Client(args.mount)


def cmd_record(args) -> int:
    req = {"name": args.name, "file": args.file and os.path.abspath(args.file),
           "digest": args.digest, "buffer_hex": args.buffer_hex, "violation": args.violation,
           "pcr": args.pcr, "template": args.template}
    answer = _client(args).call("record", **{k: v for k, v in req.items() if v not in (None, False)})
    if not answer["added"]:
        print("duplicate: already in the list (same template digest and PCR), nothing added",
              file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    answer = _client(args).call("generate", count=args.count)
    print(f"added {answer['added']} records; {answer['count']} in the list")
    return 0


def cmd_status(args) -> int:
    answer = _client(args).call("status")
    answer.pop("ok")
    print(json.dumps(answer, indent=2))
    return 0


def cmd_pcrs(args) -> int:
    if args.format == "evmctl" and not args.bank:
        return _fail("--format evmctl needs --bank (evmctl reads one PCR file per bank)", 2)
    answer = _client(args).call("pcrs", **({"bank": args.bank} if args.bank else {}))
    pcrs = answer["pcrs"]
    if args.format == "hex":
        print(f"# PCRs read from the {answer.get('backend', 'soft')} backend", file=sys.stderr)
    for bank, values in pcrs.items():
        if args.format == "evmctl":
            sys.stdout.write(format_pcr_file([bytes.fromhex(v) for v in values]))
        else:
            for i, v in enumerate(values):
                print(f"{bank} {i:2d} {v}")
    return 0


def _mask(text: str) -> int:
    from .policy import MASKS
    bits = 0
    for part in text.split("|"):
        if part in MASKS:
            bits |= MASKS[part]
        elif part.isdigit():
            bits |= int(part)
        else:
            raise ValueError(f"--mask: {part!r}; use {', '.join(MASKS)} joined by |, or a number")
    return bits


def cmd_measure(args) -> int:
    req = {"func": args.func}
    if args.path:
        try:
            req["mask"] = _mask(args.mask) if args.mask else 0
        except ValueError as e:
            return _fail(str(e), 2)
        req.update(path=os.path.realpath(args.path), name=args.as_name,
                   uid=os.getuid() if args.uid is None else args.uid,
                   gid=os.getgid() if args.gid is None else args.gid,
                   euid=os.geteuid() if args.euid is None else args.euid,
                   egid=os.getegid() if args.egid is None else args.egid)
    else:
        req.update(name=args.name, data_hex=args.data_hex, keyring=args.keyring, label=args.label)
    answer = _client(args).call("measure", **{k: v for k, v in req.items() if v is not None})
    answer.pop("ok")
    print(json.dumps(answer))
    if "denied" in answer:  # the access this event stands for fails
        return _fail(f"{answer['name']}: {answer['func']} would fail with "
                     f"{errno.errorcode[answer['denied']]} ({answer['appraise']})", 1)
    return 0


def cmd_dmesg(args) -> int:
    path = _client(args).call("status")["kernel_log"]
    try:
        with open(path, "rb") as f:
            log = f.read()
    except FileNotFoundError:  # created by the first line logged
        log = b""
    if log:
        sys.stdout.buffer.write(log)
    else:
        print("imafs: the emulated kernel has logged nothing yet", file=sys.stderr)
    return 0


def cmd_tpm_env(args) -> int:
    """``export`` lines that point tpm2-tools, tpm2-tss and the IBM TSS (tsspcrread,
    so evmctl) at the mount's TPM."""
    import shlex
    env = _client(args).call("tpm_env")["env"]
    for k, v in env.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


def cmd_suspend(args) -> int:
    _client(args).call("suspend")
    return 0


def cmd_kexec(args) -> int:
    req = {"load_only": args.load_only}
    if args.dump:
        req["dump"] = os.path.abspath(args.dump)
    answer = _client(args).call("kexec", **req)
    if not args.load_only:
        print(f"kexec: carried {answer['buffer_bytes']} bytes; {answer['count']} records in the new list")
    return 0


def cmd_boot(args) -> int:
    answer = _client(args).call("boot", kexec_buffer=os.path.abspath(args.kexec_buffer))
    print(f"booted from the kexec buffer: {answer['count']} records in the list")
    return 0


def cmd_reboot(args) -> int:
    _client(args).call("reboot")
    return 0


def kernel_options(parser: argparse.ArgumentParser, measure_help: str) -> None:
    """The options that choose the emulated kernel (imafs mount, imafs run)."""
    parser.add_argument("--profile", metavar="FILE", help="TOML profile of the emulated kernel")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one profile key (repeatable)")
    parser.add_argument("--measure", action="append", default=[], metavar="SRC:DST", help=measure_help)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="imafs", description="Linux IMA securityfs emulator.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("mount", help="mount the emulated IMA securityfs tree")
    m.add_argument("mountpoint", help="directory to mount the emulated securityfs on")
    kernel_options(m, "re-export directory SRC at DST, measuring every open and exec there (repeatable)")
    m.add_argument("--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    m.add_argument("--log-file", help=argparse.SUPPRESS)
    m.set_defaults(fn=cmd_mount)

    rn = sub.add_parser("run", help="run a command inside the emulated kernel (a private mount "
                        "namespace with the emulator at /sys/kernel/security)",
                        usage="imafs run [--profile FILE] [--set KEY=VALUE] [--measure SRC:DST] "
                              "[--mount MP] -- CMD [ARGS]")
    kernel_options(rn, "re-export directory SRC at DST inside the run, measuring every open "
                       "and exec there (repeatable)")
    rn.add_argument("--mount", metavar="MP", help="join the emulator already mounted at MP "
                    "instead of starting one (it keeps running after the command)")
    rn.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS]",
                    help="the command and its arguments")
    rn.set_defaults(fn=cmd_run)

    u = sub.add_parser("umount", help="stop the daemon and unmount")
    u.add_argument("mountpoint", help="mount point of the emulator")
    u.set_defaults(fn=cmd_umount)

    def with_mount(sp):
        sp.add_argument("--mount", required=True, metavar="MP", help="mount point of the emulator")
        return sp

    r = with_mount(sub.add_parser("record", help="append one record, as the kernel's store step"))
    r.add_argument("--name", required=True, help="event name (file path, or buffer event name)")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", help="hash this file with the profile's hash")
    src.add_argument("--digest", metavar="ALG:HEX", help="a file digest given directly")
    src.add_argument("--buffer-hex", metavar="HEX", help="a buffer event (template ima-buf)")
    src.add_argument("--violation", action="store_true", help="a violation record")
    r.add_argument("--pcr", type=int, help="PCR of the record (default: the profile's pcr_idx)")
    r.add_argument("--template", metavar="NAME|FMT",
                   help="template of the record, a built-in name or a format such as d-ng|n-ng "
                        "(default: the boot template; ima-buf for --buffer-hex)")
    r.set_defaults(fn=cmd_record)

    g = with_mount(sub.add_parser("generate", help="append N synthetic file records"))
    g.add_argument("--count", type=int, required=True, help="number of records to append")
    g.set_defaults(fn=cmd_generate)

    s = with_mount(sub.add_parser("status", help="profile, counters and PCRs as JSON"))
    s.set_defaults(fn=cmd_status)

    c = with_mount(sub.add_parser("pcrs", help="PCR values"))
    c.add_argument("--bank", metavar="ALG", help="only this PCR bank (default: every bank)")
    c.add_argument("--format", choices=("hex", "evmctl"), default="hex",
                   help="hex: 'BANK NN VALUE' lines (default); evmctl: the 'PCR-NN: hex' file "
                        "that evmctl --pcrs reads (needs --bank)")
    c.set_defaults(fn=cmd_pcrs)

    k = with_mount(sub.add_parser("kexec", help="kexec into a new kernel carrying the list"))
    k.add_argument("--load-only", action="store_true",
                   help="only load: nothing is suspended or rebooted (use with --dump)")
    k.add_argument("--dump", metavar="FILE", help="write the kexec buffer to FILE")
    k.set_defaults(fn=cmd_kexec)

    b = with_mount(sub.add_parser("boot", help="boot a new kernel from a captured kexec buffer"))
    b.add_argument("--kexec-buffer", required=True, metavar="FILE",
                   help="a kexec buffer, as written by imafs kexec --dump")
    b.set_defaults(fn=cmd_boot)

    rb = with_mount(sub.add_parser("reboot", help="cold boot: empty list, PCRs reset"))
    rb.set_defaults(fn=cmd_reboot)

    ms = with_mount(sub.add_parser("measure", help="a hook event, decided by the policy"))
    ms.add_argument("path", nargs="?", help="the file of a file hook")
    ms.add_argument("--func", required=True, help="FILE_CHECK, BPRM_CHECK, MMAP_CHECK, ..., or a "
                    "buffer hook: KEXEC_CMDLINE, KEY_CHECK, CRITICAL_DATA")
    ms.add_argument("--mask", help="MAY_READ|MAY_WRITE|MAY_APPEND|MAY_EXEC")
    for cred in ("uid", "euid", "gid", "egid"):
        ms.add_argument(f"--{cred}", type=int, help=f"the task's {cred} (default: yours)")
    ms.add_argument("--as", dest="as_name", metavar="NAME", help="record under this name")
    ms.add_argument("--name", help="event name of a buffer hook")
    ms.add_argument("--data-hex", help="the buffer of a buffer hook")
    grp = ms.add_mutually_exclusive_group()
    grp.add_argument("--keyring", help="keyring of a KEY_CHECK event (the policy's keyrings=)")
    grp.add_argument("--label", help="label of a CRITICAL_DATA event (the policy's label=)")
    ms.set_defaults(fn=cmd_measure)

    dm = with_mount(sub.add_parser("dmesg", help="the emulated kernel's log (audit records included)"))
    dm.set_defaults(fn=cmd_dmesg)

    sp = with_mount(sub.add_parser("suspend", help="run the reboot notifiers: measurements "
                                   "suspended, A -> EACCES, D and N -> ESTALE"))
    sp.set_defaults(fn=cmd_suspend)

    tp = sub.add_parser("tpm", help="the mount's TPM (tpm = swtpm or tcti:...)")
    tsub = tp.add_subparsers(dest="tpm_command", required=True, metavar="TPM_COMMAND")
    te = with_mount(tsub.add_parser("env", help="print export lines for TPM2TOOLS_TCTI, TCTI and the "
                                    "IBM TSS variables (TPM_INTERFACE_TYPE, ...) that reach the TPM"))
    te.set_defaults(fn=cmd_tpm_env)

    from .keyscli import add_parser as add_keys_parser
    add_keys_parser(sub, with_mount)

    from .keeper.cli import add_parser as add_keep_parser
    add_keep_parser(sub)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.fn(args)
    except ControlError as e:
        return _fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
