"""The control socket against clients that misbehave: the server in this
process (timeouts, full connection table, clients that stop reading), and a
live daemon fuzzed with request lines of every shape."""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import time

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from imafs.blocking import Runner
from imafs.control import MAX_LINE, SEND_TIMEOUT, Client, ControlError, Server
from imafs.ima import Ima
from imafs.profile import load_profile


# -- the server in this process ---------------------------------------------------
class _Conn:
    """A client connection that reads answers line by line."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.buf = b""

    @classmethod
    async def open(cls, path) -> _Conn:
        return cls(await trio.open_unix_socket(str(path)))

    async def line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError(self.buf)
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    async def answer(self) -> dict:
        return json.loads(await self.line())

    async def ask(self, line: bytes) -> dict:
        await self.stream.send_all(line)
        return await self.answer()

    async def closed(self) -> bool:
        return not self.buf and await self.stream.receive_some(10) == b""


def _serving(tmp_path, test, **kw) -> None:
    """Run ``await test(path, server)`` against a Server of a fresh Ima
    listening at ``path``, in this process, within 30 s."""
    async def main():
        server = Server(Ima(load_profile(None, [])), Runner(), on_shutdown=None, **kw)
        path = tmp_path / "c.sock"
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, path)
                await test(path, server)
                nursery.cancel_scope.cancel()
    trio.run(main)


def test_idle_connection_closed_with_an_answer(tmp_path):
    async def test(path, server):
        c = await _Conn.open(path)
        await c.stream.send_all(b'{"cmd": "sta')
        t0 = trio.current_time()
        assert await c.answer() == {"ok": False, "error": "no whole request line within 0.5 s: closed"}
        assert 0.4 < trio.current_time() - t0 < 5
        assert await c.closed()
        assert (await (await _Conn.open(path)).ask(b'{"cmd": "status"}\n'))["ok"]
    _serving(tmp_path, test, idle_timeout=0.5)


def test_full_table_closes_the_longest_waiting(tmp_path):
    async def test(path, server):
        conns = []
        for _ in range(4):
            c = await _Conn.open(path)
            assert (await c.ask(b'{"cmd": "status"}\n'))["ok"]  # now waiting for its next request
            conns.append(c)
        newcomer = await _Conn.open(path)
        assert (await newcomer.ask(b'{"cmd": "status"}\n'))["ok"]
        assert await conns[0].answer() == {
            "ok": False, "error": "closed to make room: 4 control connections were open"}
        assert await conns[0].closed()
        for c in conns[1:]:
            assert (await c.ask(b'{"cmd": "pcrs"}\n'))["ok"]
        assert server.connections == 4
    _serving(tmp_path, test, max_connections=4)


def test_line_limits(tmp_path):
    async def test(path, server):
        c = await _Conn.open(path)
        await c.stream.send_all(b"x" * (MAX_LINE + 1))
        assert await c.answer() == {
            "ok": False, "error": f"request line longer than {MAX_LINE} bytes: not run; closing"}
        assert await c.closed()
        c = await _Conn.open(path)
        await c.stream.send_all(b'{"cmd": "status"}')
        await c.stream.send_eof()
        assert await c.answer() == {"ok": False, "error": "request line not terminated by a newline: not run"}
        c = await _Conn.open(path)  # pipelined, answered in order
        await c.stream.send_all(b'{"cmd": "status"}\n\n{"cmd": "nope"}\n')
        answers = [await c.answer() for _ in range(3)]
        assert [a["ok"] for a in answers] == [True, False, False]
        assert answers[1]["error"].startswith("malformed JSON request")
        assert answers[2]["error"] == "unknown command 'nope'"
    _serving(tmp_path, test)


def test_clients_that_stop_reading_or_leave(tmp_path):
    """A client that sends thousands of requests and reads no answer holds
    only its own connection, for SEND_TIMEOUT; one that leaves mid-answer
    costs nothing."""
    async def test(path, server):
        flood = b'{"cmd": "status"}\n' * 3000
        gone = await _Conn.open(path)
        await gone.stream.send_all(flood)
        await gone.stream.aclose()
        stuck = await _Conn.open(path)
        await stuck.stream.send_all(flood)
        t0 = trio.current_time()
        other = await _Conn.open(path)
        assert (await other.ask(b'{"cmd": "status"}\n'))["ok"]
        assert trio.current_time() - t0 < 1
        with trio.fail_after(SEND_TIMEOUT + 5):
            while server.connections > 1:
                await trio.sleep(0.05)
        assert (await other.ask(b'{"cmd": "status"}\n'))["ok"]
    _serving(tmp_path, test)


def test_any_failure_is_an_answer_and_a_log_line(tmp_path, caplog):
    async def test(path, server):
        def broken():
            raise ZeroDivisionError("by design")
        server.ima.status = broken
        c = await _Conn.open(path)
        assert await c.ask(b'{"cmd": "status"}\n') == {
            "ok": False, "error": "internal error: ZeroDivisionError: by design"}
        assert (await c.ask(b'{"cmd": "pcrs"}\n'))["ok"]
    with caplog.at_level(logging.ERROR, logger="imafs.control"):
        _serving(tmp_path, test)
    assert [r.exc_info[0] for r in caplog.records] == [ZeroDivisionError]


# -- a live daemon, fuzzed ------------------------------------------------------
COMMANDS = {name[4:]: list(inspect.signature(fn).parameters)[1:]
            for name, fn in inspect.getmembers(Server, inspect.isfunction) if name.startswith("cmd_")}
READ_ONLY = {"status", "pcrs"}

# Strings never hold "/": every path a request names stays in the daemon's
# working directory, the test's tmp_path (kexec --dump writes files there).
_text = st.one_of(
    st.text(st.characters(blacklist_characters="/"), max_size=12),
    st.sampled_from(["", ".", "..", "\x00", "\ud800", "sha256:" + "00" * 32]),
    st.sampled_from([300, 5000]).map(lambda n: "a" * n))
_number = st.one_of(st.integers(-3, 70), st.sampled_from([-2**63, 2**64, 10**30]), st.floats())
_value = st.recursive(st.one_of(st.none(), st.booleans(), _number, _text),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
                      max_leaves=6)
_count = st.one_of(st.none(), st.booleans(), st.integers(-3, 5), st.floats(), _text)  # never a long generate


def _arg(cmd: str, param: str):
    return _count if (cmd, param) == ("generate", "count") else _value


@st.composite
def _request(draw) -> dict:
    cmd = draw(st.sampled_from(sorted(COMMANDS)))
    params = COMMANDS[cmd]
    given = draw(st.lists(st.sampled_from(params), unique=True)) if params else []
    args = {p: draw(_arg(cmd, p)) for p in given}
    # shutdown is only sent with an argument it does not take, so it is refused
    extra = draw(st.dictionaries(_text, _value, min_size=cmd == "shutdown", max_size=2))
    return {"cmd": cmd, **args, **{k: v for k, v in extra.items() if k not in params}}


def _nested(depth: int, opener: bytes, closer: bytes) -> bytes:
    return b'{"cmd": "status", "x": ' + opener * depth + closer * depth + b"}"


_line = st.one_of(
    _request().map(lambda r: json.dumps(r).encode()),
    st.tuples(_request(), st.sampled_from(["utf-16", "utf-32", "latin-1", "utf-8-sig"])).map(
        lambda t: json.dumps(t[0], ensure_ascii=False).encode(
            t[1], "replace" if t[1] == "latin-1" else "surrogatepass")),
    st.tuples(st.sampled_from([10, 990, 1000, 5000, 100000]),
              st.sampled_from([(b"[", b"]"), (b'{"a":', b"}"), (b"[", b"")])).map(lambda t: _nested(t[0], *t[1])),
    st.sampled_from([100000]).map(lambda d: b"[" * d + b"]" * d),
    st.integers(0, 900_000).map(lambda n: b'{"cmd": "status", "x": "' + b"a" * n + b'"}'),
    _value.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(_text, _value, max_size=3).map(lambda d: json.dumps(d).encode()),
    _text.map(lambda c: json.dumps({"cmd": c}).encode()),
    st.binary(max_size=300),
)


def _connect(path) -> socket.socket:
    """A connection to ``path``, waiting (10 s at most) while the daemon's
    backlog is full: a Unix socket then fails connect() with EAGAIN."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    deadline = time.monotonic() + 10
    while True:
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _answers(path, line: bytes) -> list[dict]:
    """Send ``line`` and a newline on a new connection: one answer per line it holds."""
    with _connect(path) as s:
        s.sendall(line + b"\n")
        f = s.makefile("rb")
        return [json.loads(f.readline()) for _ in range(line.count(b"\n") + 1)]


def test_fuzzed_requests_leave_the_daemon_and_the_list(mount_imafs, tmp_path, monkeypatch):
    """Whatever the line, the daemon answers {"ok": bool, ...} (an error with
    a message when not ok), still answers `status`, and a refused request (or
    any read-only one) leaves the list as it was."""
    monkeypatch.chdir(tmp_path)  # the daemon's working directory
    mnt = mount_imafs()
    client = Client(str(mnt.path), timeout=30)
    pid = client.call("status")["pid"]
    state = {"list": mnt.read("ascii_runtime_measurements")}

    @settings(max_examples=1000, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(line=_line)
    def check(line):
        for answer in _answers(client.path, line):
            assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool), answer
            assert answer["ok"] or (isinstance(answer.get("error"), str) and answer["error"]), answer
        assert client.call("status")["pid"] == pid
        after = mnt.read("ascii_runtime_measurements")
        try:
            req = json.loads(line)
        except (ValueError, RecursionError):
            req = None
        if not (answer["ok"] and isinstance(req, dict) and req.get("cmd") not in READ_ONLY):
            assert after == state["list"], line[:200]
        state["list"] = after

    check()


def test_hundreds_of_connections(mnt):
    before = mnt.read("ascii_runtime_measurements")
    conns = []
    try:
        for i in range(300):
            s = _connect(mnt.client.path)
            s.sendall(b'{"cmd": "sta' if i % 2 else b"")
            conns.append(s)
        assert Client(str(mnt.path), timeout=10).call("status")["count"] == 1
    finally:
        for s in conns:
            s.close()
    assert Client(str(mnt.path), timeout=10).call("status")["count"] == 1
    assert mnt.read("ascii_runtime_measurements") == before


def test_kexec_with_a_dump_it_cannot_write_changes_nothing(mnt, tmp_path):
    before = mnt.read("ascii_runtime_measurements")
    with pytest.raises(ControlError):
        mnt.client.call("kexec", dump=str(tmp_path / "no-such-dir" / "kexec.bin"))
    assert mnt.read("ascii_runtime_measurements") == before


@pytest.mark.parametrize("cmd,args", [("record", {"name": "x", "file": 0}),
                                      ("boot", {"kexec_buffer": 0}),
                                      ("kexec", {"load_only": True, "dump": 0})])
def test_a_file_argument_is_never_a_descriptor(mnt, cmd, args):
    """The daemon's stdin is /dev/null; a request naming descriptor 0 must not touch it."""
    pid = mnt.client.call("status")["pid"]
    with pytest.raises(ControlError):
        Client(str(mnt.path), timeout=10).call(cmd, **args)
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
