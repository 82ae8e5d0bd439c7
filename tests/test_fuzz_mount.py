"""Issue 9, part 1, at random: one live mount takes random calls on random
nodes, as root and as uid 1000, random reads at random offsets, staging
commands (good and bad) and `imafs record`s, in random order.  After every
step the daemon answers, every list parses, every record's template digest
is its data's, and the records a keeper saved plus the staged and current
lists replay to the PCRs the daemon reports.

Every call on the mount is made by one of two long-lived helper processes
(``walker.py --serve``: one as root, one as uid 1000), each answer waited
for with a timeout, so that a hung call fails the test instead of hanging
it.  The expected answers: :func:`tests.test_walk.kernel` for the
securityfs tree, a ramfs twin for the measured mount (as in test_walk.py),
and the kernel's staging rules for the commands (staging.md §1.4-1.6 and
the v7 patches' ``_ima_measurements_write``), written here again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, Phase, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from imafs import templates as T
from imafs.control import Client

from . import walker
from .test_walk import SETPRIV_1000, WALKER, Node, fuse_forced, kernel, measured_forced, tree_nodes

TIMEOUT = 30  # seconds any one answer may take
ULONG_MAX = 2**64 - 1
BANKS = ("sha1", "sha256")


class Helper:
    """``walker.py --serve``, as root or as uid 1000."""

    def __init__(self, uid: int):
        self.proc = subprocess.Popen([*(SETPRIV_1000 if uid else []), sys.executable, str(WALKER), "--serve"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT)
        assert ready, f"no answer in {TIMEOUT} s to {req}"
        line = self.proc.stdout.readline()
        assert line, f"the helper died on {req}"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@dataclass
class Live:
    """One mount, its helpers and what a keeper knows, for every example."""
    m: object
    dst: str
    twin: str
    tree: list[Node]
    root: Helper
    user: Helper
    client: Client
    saved: int = 0  # records in the keeper's archive
    saved_pcrs: dict = field(default_factory=lambda: {b: bytes(hashlib.new(b).digest_size) for b in BANKS})
    added: int = 1  # records ever appended (boot_aggregate)
    current: int = 1
    staged: int = 0
    violations: int = 0
    steps: int = 0


LIVE: Live | None = None


@pytest.fixture
def live(ramfs, mount_imafs):
    src, dst = ramfs()
    twin, _ = ramfs()
    # the measured mount is a FUSE mount: nodev, nosuid, as the twin then
    subprocess.run(["mount", "-o", "remount,nodev,nosuid", str(twin)], check=True)
    walker.build(str(src))
    walker.build(str(twin))
    m = mount_imafs(measure=[(src, dst)], reachable=True)
    root, user = Helper(0), Helper(1000)
    try:
        yield Live(m, str(dst), str(twin), tree_nodes(m.path), root, user, Client(str(m.path), timeout=TIMEOUT))
    finally:
        root.close()
        user.close()


def kernel_command(data: bytes, staged_file: bool) -> tuple:
    """The kernel's parse of one write to a list (v7): ("A",), ("D",),
    ("N", n) or ("errno", e)."""
    if not 2 <= len(data) <= 21 or data[-1:] != b"\n":
        return ("errno", errno.EINVAL)
    req = data[:-1] + b"\0"  # the newline becomes the C string's end
    if req[:1] in (b"A", b"D"):
        return (req[:1].decode(),) if len(data) == 2 and staged_file else ("errno", errno.EINVAL)
    if staged_file:
        return ("errno", errno.EINVAL)
    s = req.split(b"\0", 1)[0]  # kstrtoul(req, 10, ...)
    if s[:1] == b"+":
        s = s[1:]
    digits = len(s) - len(s.lstrip(b"0123456789"))
    if not digits:
        return ("errno", errno.EINVAL)
    if int(s[:digits]) > ULONG_MAX:
        return ("errno", errno.ERANGE)
    if s[digits:] not in (b"", b"\n") or not int(s[:digits]):
        return ("errno", errno.EINVAL)
    return ("N", int(s[:digits]))


LIST_NAMES = [f"{fmt}_runtime_measurements_{bank}{suffix}" for fmt in ("ascii", "binary") for bank in BANKS
              for suffix in ("", "_staged")] + [f"{fmt}_runtime_measurements{suffix}" for fmt in ("ascii", "binary")
                                                for suffix in ("", "_staged")]
CALL_NAMES = list(walker.PATH_CALLS) + [f"{g}:{c}" for g in "rw" for c in walker.FD_CALLS]
MEASURED_NAMES = ("", "f", "d", "l", "u", "u/uf", "d/inner", walker.NEW, "u/" + walker.NEW)
SIBLINGS = {"f": "d", "d": "f", "l": "f", "u": "d", walker.NEW: "f"}
BAD_COMMANDS = [b"A", b"A\r\n", b"AA\n", b"D", b"0\n", b"-1\n", b" 5\n", b"5 \n", b"0x5\n", b"+\n", b"\n",
                b"18446744073709551616\n", b"99999999999999999999\n", b"1" * 21 + b"\n", b"\0\n", b"9999999\n",
                b"1\0x\n", b"99999999\0x\n"]


def replay(pcrs: dict, records: list) -> dict:
    """PCR 10 of each bank after ``records``, checking each one's template
    digest against its data (hashlib and struct, not imafs)."""
    pcrs = dict(pcrs)
    for pcr, digest, template, fields in records:
        assert template.name == "ima-ng" and pcr == 10
        data = b"".join(struct.pack("<I", len(f)) + f for f in fields)
        violation = not any(digest)
        assert violation or digest == hashlib.sha1(data).digest()
        for bank in BANKS:
            d = b"\xff" * len(pcrs[bank]) if violation else hashlib.new(bank, data).digest()
            pcrs[bank] = hashlib.new(bank, pcrs[bank] + d).digest()
    return pcrs


def _what(path: str, uid: int) -> tuple[str, bool]:
    """dir, file or link, and whether ``uid`` owns it, before a call."""
    try:
        st_ = os.lstat(path)
    except OSError:
        return "file", False
    what = "dir" if stat.S_ISDIR(st_.st_mode) else "link" if stat.S_ISLNK(st_.st_mode) else "file"
    return what, uid != 0 and st_.st_uid == uid


class FuzzMount(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.live = LIVE

    def _path(self, name: str) -> str:
        return str(self.live.m.ima / name)

    def _write(self, name: str, data: bytes) -> int:
        """What a root write of ``data`` to list ``name`` returns: its length or an errno."""
        out = self.live.root.ask({"write": self._path(name), "data": data.hex()})
        return out.get("written", out.get("errno"))

    def _read(self, name: str, offset: int = 0, size: int = -1) -> bytes:
        out = self.live.root.ask({"read": self._path(name), "offset": offset, "size": size})
        assert "data" in out, (name, out)
        return bytes.fromhex(out["data"])

    def _save(self, records: list) -> None:
        """The keeper archives ``records`` (it keeps their replay, not their bytes)."""
        self.live.saved_pcrs = replay(self.live.saved_pcrs, records)
        self.live.saved += len(records)

    def _appended(self, n: int) -> None:
        self.live.added += n
        self.live.current += n

    # -- records --------------------------------------------------------------------------------
    @rule(violation=st.booleans())
    def record(self, violation):
        live = self.live
        name = f"/fuzz/{live.added}"
        if violation:
            live.client.call("record", name=name, violation=True)
            live.violations += 1
        else:
            live.client.call("record", name=name, digest="sha256:" + hashlib.sha256(name.encode()).hexdigest())
        self._appended(1)

    @rule(n=st.integers(1, 40))
    def generate(self, n):
        assert self.live.client.call("generate", count=n)["added"] == n
        self._appended(n)

    # -- staging --------------------------------------------------------------------------------
    @rule(bank=st.sampled_from(BANKS), fmt=st.sampled_from(("ascii", "binary")), legacy=st.booleans())
    def stage(self, bank, fmt, legacy):
        live = self.live
        name = f"{fmt}_runtime_measurements_staged" if legacy else f"{fmt}_runtime_measurements_{bank}_staged"
        want = errno.EEXIST if live.staged else errno.ENOENT if not live.current else 2
        assert self._write(name, b"A\n") == want
        if want == 2:
            live.staged, live.current = live.current, 0

    @rule(bank=st.sampled_from(BANKS))
    def save_and_delete(self, bank):
        live = self.live
        if live.staged:
            records = T.parse_binary_list(self._read("binary_runtime_measurements_sha1_staged"), 20)
            assert len(records) == live.staged
            self._save(records)
        assert self._write(f"ascii_runtime_measurements_{bank}_staged", b"D\n") == \
            (2 if live.staged else errno.ENOENT)
        live.staged = 0

    @rule(n=st.integers(1, 200), bank=st.sampled_from(BANKS))
    def trim(self, n, bank):
        """N on an original: a careful keeper saves the N oldest first, and
        trims only with nothing staged (staging.md §6 item 3)."""
        live = self.live
        if live.staged:
            return
        head = T.parse_binary_list(self._read("binary_runtime_measurements_sha1"), 20)[:n]
        cmd = b"%d\n" % n
        ok = n <= live.current
        assert self._write(f"binary_runtime_measurements_{bank}", cmd) == (len(cmd) if ok else errno.ENOENT)
        if ok:
            self._save(head)
            live.current -= n

    def _command(self, data: bytes, staged_file: bool, fmt: str) -> None:
        parsed = kernel_command(data, staged_file)
        if parsed[0] in ("A", "D") or parsed[0] == "N" and parsed[1] <= self.live.current:
            return  # left to the rules above, which save first
        want = parsed[1] if parsed[0] == "errno" else errno.ENOENT  # N beyond the list
        if not data:
            want = 0  # FUSE answers an empty write itself (docs/deviations.md)
        name = f"{fmt}_runtime_measurements_sha256" + ("_staged" if staged_file else "")
        assert self._write(name, data) == want, data

    @rule(data=st.binary(max_size=24), staged_file=st.booleans(), fmt=st.sampled_from(("ascii", "binary")))
    def command(self, data, staged_file, fmt):
        """Any bytes written to a list: the kernel's errno."""
        self._command(data, staged_file, fmt)

    @rule(data=st.sampled_from(BAD_COMMANDS), staged_file=st.booleans(), fmt=st.sampled_from(("ascii", "binary")))
    def bad_command(self, data, staged_file, fmt):
        """The commands the kernel's parser refuses, one check at a time."""
        self._command(data, staged_file, fmt)

    # -- reads ----------------------------------------------------------------------------------
    @rule(name=st.sampled_from(LIST_NAMES), offset=st.integers(0, 60000), size=st.integers(1, 70000))
    def read_somewhere(self, name, offset, size):
        whole = self._read(name)
        assert self._read(name, offset, size) == whole[offset:offset + size]

    # -- calls on nodes -------------------------------------------------------------------------
    @rule(i=st.integers(0, 18), call=st.sampled_from(CALL_NAMES), uid=st.sampled_from((0, 1000)))
    def tree_call(self, i, call, uid):
        live = self.live
        n = live.tree[i % len(live.tree)]
        got = (live.user if uid else live.root).ask({"walk": {"targets": [n.spec()], "only": [call]}})[n.label]
        want = kernel(call, n, uid)
        if want is not None and fuse_forced(call, n, uid) is not None:
            want = fuse_forced(call, n, uid)
        assert got.get(call) == want, (n.label, call, uid, got)

    @rule(name=st.sampled_from(MEASURED_NAMES), call=st.sampled_from(CALL_NAMES), uid=st.sampled_from((0, 1000)))
    def measured_call(self, name, call, uid):
        """The same call on DST and on the twin: the same answers but for
        what FUSE forces, and both change alike."""
        live = self.live
        what, owner = _what(os.path.join(live.twin, name), uid)
        answers = {}
        for side, root in (("dst", live.dst), ("twin", live.twin)):
            spec = {"label": side, "path": os.path.join(root, name) if name else root,
                    "sibling": SIBLINGS.get(name), "cross": str(live.m.ima), "victim": bool(name)}
            answers[side] = (live.user if uid else live.root).ask(
                {"walk": {"targets": [spec], "only": [call]}})[side]
        for op, theirs in answers["twin"].items():
            forced = measured_forced(op, theirs, what, uid, owner)
            assert answers["dst"].get(op) == (theirs if forced is None else forced), (name, op, uid, answers)

    @rule()
    def rebuild_measured(self):
        for root in (self.live.dst, self.live.twin):
            assert self.live.root.ask({"build": [root, None]}) == {}

    # -- after every step -----------------------------------------------------------------------
    @invariant()
    def alive(self):
        live = self.live
        live.steps += 1
        status = live.client.call("status")  # within TIMEOUT
        assert status["count"] == live.current
        assert self._read("runtime_measurements_count") == b"%d\n" % live.current
        assert self._read("violations") == b"%d\n" % live.violations

    @invariant()
    def whole_log_replays(self):
        live = self.live
        staged = T.parse_binary_list(self._read("binary_runtime_measurements_sha1_staged"), 20)
        current = T.parse_binary_list(self._read("binary_runtime_measurements_sha1"), 20)
        assert (len(staged), len(current)) == (live.staged, live.current)
        assert live.saved + len(staged) + len(current) == live.added
        pcrs = replay(live.saved_pcrs, staged + current)
        reported = live.client.call("pcrs")["pcrs"]
        for bank in BANKS:
            assert reported[bank][10] == pcrs[bank].hex(), bank


def test_fuzz_mount(live):
    global LIVE
    LIVE = live
    try:
        # one mount for every example: a failure leaves it where the model is
        # not, so the first failing sequence is reported as it ran, unshrunk
        run_state_machine_as_test(FuzzMount, settings=settings(
            max_examples=60, stateful_step_count=40, deadline=None, phases=[Phase.generate],
            report_multiple_bugs=False, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        LIVE = None
    assert live.steps >= 100 and live.saved  # the machine did run
