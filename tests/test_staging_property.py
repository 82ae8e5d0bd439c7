"""Random interleavings of appends, A, D, N, kexec and reads, on the plain
objects: what a keeper saves plus the current list always replays to the PCRs,
nothing is lost or duplicated, counters match and no read is torn."""

from __future__ import annotations

import os

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from imafs import templates as T
from imafs.blocking import run_inline
from imafs.errors import FsError
from imafs.ima import Ima
from imafs.profile import load_profile
from imafs.securityfs import Tree

PID = os.getpid()  # root in the test run: has CAP_SYS_ADMIN


class Keeper(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.ima = Ima(load_profile(None, ["tpm_banks=sha1,sha256,sha384"]))
        self.ima.store.cache.budget = 20000  # make the render cache evict
        self.tree = Tree(self.ima)
        self.saved: list[bytes] = []   # the keeper's archive, binary sha1 records
        self.added = 1                 # records ever appended (boot_aggregate)
        self.names = {n.name: n for n in self.tree.dir.children.values()}

    def _file(self, name):
        return self.names[name]

    def _write(self, name, data) -> int:
        node = self._file(name)
        f = node.open(os.O_WRONLY, PID)
        try:
            return run_inline(node.write(f, 0, data))
        except FsError as e:
            return -e.errno
        finally:
            node.release(f)

    def _read(self, name, offset=0, size=1 << 30) -> bytes:
        node = self._file(name)
        f = node.open(os.O_RDONLY, PID)
        try:
            return node.read(f, offset, size)
        finally:
            node.release(f)

    @rule(n=st.integers(1, 1500))
    def append(self, n):
        self.added += self.ima.generate(n)

    @rule()
    def violation(self):
        run_inline(self.ima.record(name="/var/log/v", violation=True))
        self.added += 1

    @rule()
    def stage_save_delete(self):
        if self._write("ascii_runtime_measurements_sha1_staged", b"A\n") == 2:
            self.saved.append(self._read("binary_runtime_measurements_sha1_staged"))
            assert self._write("binary_runtime_measurements_sha256_staged", b"D\n") == 2

    @rule()
    def stage_only(self):
        self._write("ascii_runtime_measurements_sha384_staged", b"A\n")

    @rule(n=st.integers(1, 3000))
    def trim(self, n):
        # The kernel accepts N while records are staged, but those records
        # come after the staged chunk in the log: this keeper, like a careful
        # one, trims only with nothing staged (staging.md §6 item 3).
        if self.ima.store.staged.count:
            return
        head = T.parse_binary_list(self._read("binary_runtime_measurements_sha1"), 20)[:n]
        cmd = b"%d\n" % n
        if self._write("ascii_runtime_measurements_sha256", cmd) != len(cmd):
            assert len(head) < n  # ENOENT
            return
        self.saved.append(b"".join(T.binary_record(p, d, t, f) for p, d, t, f in head))

    @rule()
    def kexec(self):
        # the staged and current lists are carried; a keeper keeps only its archive
        self.ima.kexec()
        self.added += 1  # the new boot_aggregate

    @rule(offset=st.integers(0, 400000), size=st.integers(1, 70000),
          name=st.sampled_from(["ascii_runtime_measurements_sha256", "binary_runtime_measurements_sha384",
                                "ascii_runtime_measurements_sha1_staged"]))
    def read_somewhere(self, offset, size, name):
        whole = self._read(name)
        assert self._read(name, offset, size) == whole[offset:offset + size]

    @invariant()
    def whole_log_replays(self):
        store = self.ima.store
        whole = b"".join(self.saved) + self._read("binary_runtime_measurements_sha1_staged") \
            + self._read("binary_runtime_measurements_sha1")
        recs = T.parse_binary_list(whole, 20)
        assert len(recs) == self.added
        for bank in self.ima.pcrs.banks:
            pcr10 = bytes(T.digest_size(bank))
            for pcr, digest, tmpl, fields in recs:
                d = b"\xff" * T.digest_size(bank) if not any(digest) else T.template_digest(bank, tmpl, fields)
                pcr10 = T.hash_bytes(bank, pcr10 + d)
            assert pcr10 == self.ima.pcrs.read(bank, 10), bank
        assert self._read("runtime_measurements_count") == b"%d\n" % store.current.count
        c = self.ima.counters()
        assert c["BINARY"]["records"] == store.current.count
        assert c["BINARY_STAGED"]["records"] == store.staged.count
        for lst, key in ((store.current, "BINARY"), (store.staged, "BINARY_STAGED")):
            assert c[key]["binary_runtime_size"] == 24 + len(lst.sha1_bytes())
        for name in ("ascii_runtime_measurements_sha256", "ascii_runtime_measurements_sha1_staged"):
            text = self._read(name)
            assert not text or text.endswith(b"\n")


Keeper.TestCase.settings = settings(max_examples=25, stateful_step_count=25, deadline=None)
TestKeeper = Keeper.TestCase
