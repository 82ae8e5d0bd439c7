"""`imafs keep` and its verbs: run (the default), export, verify, status."""

from __future__ import annotations

import json
import logging
import os
import sys

from .abi import Busy, Ima, KeeperFatal
from .archive import ArchiveError, is_postgresql
from .trim import CHUNK

ARCHIVE_HELP = "the archive: a SQLite file (created if missing) or a postgresql:// URL"
HOST_HELP = ("this host's id in a postgresql:// archive shared by many hosts "
             "(default: /etc/machine-id, else the host name)")

DEFAULT_BOOT_ID = "/proc/sys/kernel/random/boot_id"


def add_parser(sub) -> None:
    k = sub.add_parser("keep", help="the keeper: trim the list into a durable archive, serve the whole log",
                       description="Without a verb: trim the list into the archive (foreground; SIGTERM "
                                   "stops, SIGUSR1 trims now). Verbs: export, verify, status.")
    k.add_argument("--securityfs", metavar="DIR", help="the securityfs (or its ima/) directory")
    k.add_argument("--archive", metavar="PATH|URL", help=ARCHIVE_HELP)
    k.add_argument("--host-id", metavar="ID", help=HOST_HELP)
    k.add_argument("--mode", choices=("stage", "count"), default="stage",
                   help="stage: A, save the staged list, D (default); count: save the oldest records, write N")
    k.add_argument("--chunk", type=int, default=CHUNK, metavar="N",
                   help=f"count mode: a cycle takes at most the oldest N records (default {CHUNK}); "
                        "over a threshold, cycles follow each other until the list is under it")
    k.add_argument("--abi", choices=("auto", "v7", "v5"), default="auto",
                   help="where A goes: v7 the _staged file, v5 the original; auto: learn it from the kernel")
    k.add_argument("--once", action="store_true", help="one trim cycle, then exit (cron, tests)")
    k.add_argument("--max-records", type=int, metavar="N", help="trim when the list holds more than N records")
    k.add_argument("--max-bytes", type=int, metavar="N",
                   help="trim when binary_runtime_size (the list in the kexec format, 24-byte header "
                        "included) passes N bytes")
    k.add_argument("--control", metavar="PATH",
                   help="a control socket (JSON lines, root only): trim, status")
    k.add_argument("--interval", type=float, metavar="S", help="trim at least every S seconds")
    k.add_argument("--poll", type=float, default=1.0, metavar="S", help="check the thresholds every S seconds")
    k.add_argument("--boot-id-file", default=DEFAULT_BOOT_ID, metavar="FILE",
                   help=f"the kernel's boot id, recorded with each boot (default {DEFAULT_BOOT_ID})")
    k.add_argument("-v", "--verbose", action="store_true", help="log every cycle")
    k.set_defaults(fn=cmd_keep)
    verbs = k.add_subparsers(dest="keep_verb", metavar="VERB")

    e = verbs.add_parser("export", help="a boot's whole log (archive, then the live list) to stdout")
    e.add_argument("--archive", required=True, metavar="PATH|URL", help=ARCHIVE_HELP)
    e.add_argument("--host-id", metavar="ID", help=HOST_HELP)
    e.add_argument("--securityfs", metavar="DIR", help="append the live records of this securityfs")
    e.add_argument("--boot", type=int, metavar="N", help="the archive's boot N (default: the latest)")
    e.add_argument("--format", choices=("binary", "ascii"), default="binary", help="the kernel's list format")
    e.add_argument("--bank", default="sha1", metavar="ALG", help="digests of this bank (default sha1)")
    e.set_defaults(fn=cmd_export)

    v = verbs.add_parser("verify", help="replay the whole log against PCR values; 0 only if they match")
    v.add_argument("--archive", required=True, metavar="PATH|URL", help=ARCHIVE_HELP)
    v.add_argument("--host-id", metavar="ID", help=HOST_HELP)
    v.add_argument("--securityfs", metavar="DIR", help="the live list to append")
    v.add_argument("--boot", type=int, metavar="N", help="the archive's boot N (default: the latest)")
    v.add_argument("--pcrs", action="append", required=True, metavar="[BANK,]FILE",
                   help="'PCR-NN: hex' lines, as evmctl --pcrs reads (repeatable, one per bank)")
    v.set_defaults(fn=cmd_verify)

    sv = verbs.add_parser("serve", help="mount the whole log read-only, with the kernel's file names")
    sv.add_argument("--archive", required=True, metavar="PATH|URL", help=ARCHIVE_HELP)
    sv.add_argument("--host-id", metavar="ID", help=HOST_HELP)
    sv.add_argument("--securityfs", metavar="DIR", help="the live list to append")
    sv.add_argument("--boot", type=int, metavar="N",
                    help="serve the archive's boot N alone (default: the latest boot, then the live list)")
    sv.add_argument("mountpoint", help="where to mount the whole-log tree")
    sv.set_defaults(fn=cmd_serve)

    r = verbs.add_parser("request", help="ask a running keeper through its control socket (JSON answer)")
    r.add_argument("--control", required=True, metavar="PATH", help="the keeper's --control socket")
    r.add_argument("what", choices=("trim", "status"),
                   help="trim: a cycle now, answered when it ends; status: the service's state")
    r.add_argument("--timeout", type=float, default=600.0, metavar="S", help="give up after S seconds")
    r.set_defaults(fn=cmd_request)

    s = verbs.add_parser("status", help="the archive as JSON: boots, records, bytes, last trim")
    s.add_argument("--archive", required=True, metavar="PATH|URL", help=ARCHIVE_HELP)
    s.add_argument("--host-id", metavar="ID", help=HOST_HELP)
    s.set_defaults(fn=cmd_status)


def _fail(msg: str, code: int = 1) -> int:
    print(f"imafs keep: {msg}", file=sys.stderr)
    return code


def cmd_keep(args) -> int:
    if not args.securityfs or not args.archive:
        return _fail("--securityfs and --archive are required", 2)
    logging.basicConfig(level=logging.INFO if args.verbose or not args.once else logging.WARNING,
                        format="imafs-keep[%(process)d]: %(message)s", stream=sys.stderr)
    from .service import Service, open_keeper
    try:
        keeper = open_keeper(args.securityfs, args.archive, args.mode, args.abi, args.boot_id_file, args.host_id,
                             args.chunk)
        svc = Service(keeper, max_records=args.max_records, max_bytes=args.max_bytes,
                      interval=args.interval, poll=args.poll, control=args.control)
        if args.once:
            return 0 if svc.once() else 1
        return svc.run()
    except KeeperFatal as e:
        return _fail(str(e), 3)
    except ArchiveError as e:
        return _fail(f"{e}; nothing is deleted", 1)
    except ValueError as e:
        return _fail(str(e), 2)


def _archive(args):
    """The archive a verb reads; it must exist (only `keep` creates one)."""
    from .archive import open_archive
    if not is_postgresql(args.archive) and not os.path.exists(args.archive):
        raise KeeperFatal(f"{args.archive}: no such archive")
    return open_archive(args.archive, host_id=args.host_id)


def _whole(args):
    from .whole import whole_log
    archive = _archive(args)
    ima = Ima(args.securityfs) if args.securityfs else None
    return whole_log(archive, ima, args.boot)


OUT_BUFFER = 256 << 10  # bytes written to stdout at a time


class ExportStopped(Exception):
    """Writing to stdout failed: the reader went away (EPIPE), a full disk…"""


class _Stdout:
    """stdout's file descriptor, buffered. After a failed write, what is still
    buffered goes to /dev/null (its flush at exit must not fail again)."""

    def __init__(self):
        self.fd = sys.stdout.fileno()
        self.out = open(self.fd, "wb", buffering=OUT_BUFFER, closefd=False)

    def _do(self, fn, *args):
        try:
            fn(*args)
        except OSError as e:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.fd)
            raise ExportStopped(e.strerror) from None

    def write(self, data: bytes) -> None:
        self._do(self.out.write, data)

    def flush(self) -> None:
        self._do(self.out.flush)


def cmd_export(args) -> int:
    from .. import templates as T
    from .trim import BadRecord
    from .whole import render
    if sys.stdout is None:  # fd 1 was closed at start: a file opened since may hold that number
        return _fail("stdout is closed")
    try:
        T.hasher(args.bank)
        log = _whole(args)
        out = _Stdout()
        for recs in log.batches():
            out.write(render(recs, args.format, args.bank))
        out.flush()
    except ExportStopped as e:
        return _fail(f"writing to stdout: {e}: the export is incomplete")
    except (KeeperFatal, Busy, BadRecord, ArchiveError, OSError, ValueError) as e:
        return _fail(str(e))
    return 0


def cmd_verify(args) -> int:
    from itertools import chain

    from .trim import BadRecord
    from .whole import read_pcr_file, replay, whole_log
    try:
        pcr_files = [read_pcr_file(spec) for spec in args.pcrs]
        log = _whole(args)
        n, verdicts = replay(log.batches(), pcr_files)
        if not n:
            return _fail("no records")
        bad = [why for why in verdicts if why]
        for why in bad:
            print(f"imafs keep verify: {why}", file=sys.stderr)
        if bad and log.boot is not None and log.boot > 1:
            # the ambiguous case of docs/keeper.md: a kexec after a complete trim looks like a reboot
            before = whole_log(log.archive, None, log.boot - 1)
            if not any(replay(chain(before.batches(), log.batches()), pcr_files)[1]):
                print(f"imafs keep verify: boot {log.boot} replays as the continuation of boot {log.boot - 1}: "
                      f"it began with a kexec after a complete trim, not a reboot (docs/keeper.md, the ambiguous "
                      f"case); the whole log is boot {log.boot - 1} followed by boot {log.boot}", file=sys.stderr)
    except (KeeperFatal, Busy, BadRecord, ArchiveError, OSError, ValueError) as e:
        return _fail(str(e))
    if not bad:
        print(f"boot {log.boot}: {n} records replay to the PCRs of "
              f"{', '.join(b for b, _ in pcr_files)}")
    return 1 if bad else 0


def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="imafs-keep[%(process)d]: %(message)s", stream=sys.stderr)
    from .serve import serve
    try:
        archive = _archive(args)  # exists, opens: say so now rather than at the first read
        if args.boot is not None and args.boot not in [b[0] for b in archive.boots()]:
            raise KeeperFatal(f"{args.archive}: the archive has no boot {args.boot}")
        archive.close()
        return serve(lambda: _archive(args), args.securityfs, args.mountpoint, args.boot)
    except (KeeperFatal, ArchiveError, ValueError) as e:
        return _fail(str(e), 3 if isinstance(e, KeeperFatal) else 1)


def cmd_status(args) -> int:
    try:
        print(json.dumps(_archive(args).status(), indent=2))
    except (KeeperFatal, ArchiveError, ValueError) as e:
        return _fail(str(e))
    return 0


def cmd_request(args) -> int:
    from ..control import Client, ControlError
    try:
        answer = Client(path=args.control, timeout=args.timeout).call(args.what)
    except ControlError as e:
        return _fail(f"{args.control}: {e}")
    answer.pop("ok")
    print(json.dumps(answer, indent=2))
    return 0 if not answer.get("error") else 1
