"""The swtpm backend against independent witnesses: tpm2-tools reading and
quoting the TPM, evmctl replaying the list through the IBM TSS, and replays
by hand with struct + hashlib."""

from __future__ import annotations

import copy
import hashlib
import os
import re
import shlex
import signal
import struct
import subprocess
import sys
import threading
import time

import pytest

from imafs.control import GENERATE_BATCH

from .conftest import imafs

SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}


def tpm_env(m) -> dict[str, str]:
    """The variables of `imafs tpm env`, parsed from its export lines."""
    env = dict(os.environ)
    for line in m.cli("tpm", "env").stdout.splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = shlex.split(v)[0]
    return env


def tpm2(env, *args, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(list(map(str, args)), env=env, capture_output=True, text=True, timeout=60, **kw)
    if check and r.returncode != 0:
        pytest.fail(f"{args[0]} exit {r.returncode}: {r.stderr.strip()[-1500:]}")
    return r


def make_ak(env, t, *ak_format: str) -> None:
    """An endorsement key, then an RSA attestation key under it (t/ak.ctx;
    its public part in t/ak.pub, or t/ak.pem with ``"-f", "pem"``)."""
    tpm2(env, "tpm2_createek", "-c", t / "ek.ctx", "-G", "rsa", "-u", t / "ek.pub")
    tpm2(env, "tpm2_flushcontext", "-t")
    tpm2(env, "tpm2_createak", "-C", t / "ek.ctx", "-c", t / "ak.ctx", "-G", "rsa", "-g", "sha256",
         "-s", "rsassa", "-u", t / ("ak.pem" if ak_format else "ak.pub"), *ak_format, "-n", t / "ak.name")
    tpm2(env, "tpm2_flushcontext", "-t")
    tpm2(env, "tpm2_flushcontext", "-s")


def quote(env, t, name: str, nonce: str, pcrs: bool = True) -> None:
    """tpm2_quote over sha256 PCR 10 with the AK; transient objects flushed
    (swtpm has no resource manager)."""
    for _ in range(20):
        r = tpm2(env, "tpm2_quote", "-c", t / "ak.ctx", "-l", "sha256:10", "-q", nonce, "-g", "sha256",
                 "-m", t / f"{name}.msg", "-s", t / f"{name}.sig",
                 *(["-o", t / f"{name}.pcrs"] if pcrs else []), check=False)
        tpm2(env, "tpm2_flushcontext", "-t")
        if r.returncode == 0:
            return
        # tpm2_quote reads the PCRs, then quotes: an extend in between fails it
        assert "PCR values failed to match quote's digest" in r.stderr, r.stderr
    pytest.fail("tpm2_quote raced the extends 20 times")


def pcrread(env, banks) -> dict[str, list[str]]:
    """Every PCR of every bank, as tpm2_pcrread prints them (YAML-ish text)."""
    out = tpm2(env, "tpm2_pcrread", "+".join(f"{b}:all" for b in banks)).stdout
    values: dict[str, list[str]] = {}
    bank = None
    for line in out.splitlines():
        if re.fullmatch(r"\s*\w+:", line):
            bank = line.strip()[:-1]
            values[bank] = []
        elif m := re.fullmatch(r"\s*(\d+)\s*:\s*0x([0-9A-Fa-f]+)", line):
            assert int(m.group(1)) == len(values[bank])
            values[bank].append(m.group(2).lower())
    return values


def imafs_pcrs(m) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in m.cli("pcrs").stdout.splitlines():
        bank, _, value = line.split()
        out.setdefault(bank, []).append(value)
    return out


def records(data: bytes, size: int):
    """(pcr, template digest, name) of each record of a binary list whose
    template digests have ``size`` bytes."""
    off = 0
    while off < len(data):
        pcr, = struct.unpack_from("<I", data, off)
        digest = data[off + 4:off + 4 + size]
        off += 4 + size
        n, = struct.unpack_from("<I", data, off)
        name = data[off + 4:off + 4 + n]
        off += 4 + n
        dlen, = struct.unpack_from("<I", data, off)
        off += 4 + dlen
        yield pcr, digest, name


def replay(data: bytes, bank: str, upto: int | None = None) -> dict[int, bytes]:
    """PCR values from zero, as the kernel extends them: violations (zero
    digest) extend 0xff..., PCRs >= 24 are not extended."""
    size = SIZES[bank]
    pcrs: dict[int, bytes] = {}
    for i, (pcr, digest, _) in enumerate(records(data, size)):
        if upto is not None and i >= upto:
            break
        if pcr >= 24:
            continue
        d = b"\xff" * size if digest == bytes(size) else digest
        pcrs[pcr] = hashlib.new(bank, pcrs.get(pcr, bytes(size)) + d).digest()
    return pcrs


def assert_tpm_matches(m, banks, tmp_path=None):
    """tpm2_pcrread == imafs pcrs in every bank, and PCR 10/11 == the hand
    replay of each bank's binary list."""
    env = tpm_env(m)
    tpm = pcrread(env, banks)
    assert sorted(tpm) == sorted(banks)
    assert imafs_pcrs(m) == tpm
    for bank in banks:
        data = m.read(f"binary_runtime_measurements_{bank}")
        mine = replay(data, bank)
        for pcr in (10, 11):
            assert tpm[bank][pcr] == mine.get(pcr, bytes(SIZES[bank])).hex(), (bank, pcr)
    return env


def digest(c: str, n: int = 64) -> str:
    return "sha256:" + c * n


def test_swtpm_pcrs_follow_the_list_through_reboot_and_kexec(mount_imafs):
    banks = ("sha1", "sha256", "sha384")
    m = mount_imafs("tpm=swtpm", "tpm_banks=" + ",".join(banks))
    files = sorted(p.name for p in m.ima.iterdir())
    assert "ascii_runtime_measurements_sha384" in files and "binary_runtime_measurements_sha512" not in files
    st = m.client.call("status")["tpm"]
    assert st["backend"] == "swtpm" and st["banks"] == list(banks) and st["state"] == "ok"
    # boot_aggregate: sha256 over the TPM's sha256 PCR 0-9 (kernel-abi.md §4.3)
    first = m.read("ascii_runtime_measurements", "r").splitlines()[0]
    pcr0_9 = b"".join(bytes.fromhex(v) for v in pcrread(tpm_env(m), ["sha256"])["sha256"][:10])
    assert first.endswith("sha256:" + hashlib.sha256(pcr0_9).hexdigest() + " boot_aggregate")

    m.cli("record", "--name", "/a", "--digest", digest("a"))
    m.cli("record", "--name", "/v", "--violation")
    m.cli("record", "--name", "/b", "--digest", digest("b"), "--pcr", "11")
    m.cli("record", "--name", "/c", "--digest", digest("c"), "--pcr", "40")  # listed, not extended
    ascii_list = m.read("ascii_runtime_measurements", "r")
    assert "\n40 " in ascii_list and " /v\n" in ascii_list
    env = assert_tpm_matches(m, banks)
    pcr10 = pcrread(env, ["sha256"])["sha256"][10]
    assert pcr10 != "0" * 64

    m.cli("kexec")  # the TPM keeps its PCRs; the list is carried, plus a boot_aggregate
    assert m.read("ascii_runtime_measurements", "r").startswith(ascii_list)
    assert_tpm_matches(m, banks)

    m.cli("reboot")  # power cycle: PCRs reset, a new list
    after = m.read("ascii_runtime_measurements", "r").splitlines()
    assert len(after) == 1 and after[0] == first
    env = assert_tpm_matches(m, banks)
    assert pcrread(env, ["sha256"])["sha256"][11] == "0" * 64
    m.cli("record", "--name", "/d", "--digest", digest("d"))
    assert_tpm_matches(m, banks)
    out = m.cli("pcrs")
    assert "swtpm" in out.stderr


def test_quote_over_pcr10_matches_the_list_while_records_arrive(mount_imafs, tmp_path):
    m = mount_imafs("tpm=swtpm")
    env = tpm_env(m)
    t = tmp_path
    make_ak(env, t, "-f", "pem")

    # records keep arriving for as long as the checks run, however fast the
    # machine: generate runs again and again until the sixth check is done
    stop, failures = threading.Event(), []

    def generate():
        while not stop.is_set():
            r = subprocess.run([sys.executable, "-m", "imafs", "generate", "--mount", m.path, "--count", "20000"],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                failures.append(r.stderr)
                return

    gen = threading.Thread(target=generate)
    gen.start()
    during = 0  # checks done while records kept arriving
    quotes = []
    try:
        while len(quotes) < 6 and not failures:
            before = arriving(m)
            nonce = os.urandom(16).hex()
            q = f"q{len(quotes)}"
            quote(env, t, q, nonce, pcrs=False)
            # the TPM's signature and nonce; the quoted PCR digest is checked below
            tpm2(env, "tpm2_checkquote", "-u", t / "ak.pem", "-m", t / f"{q}.msg", "-s", t / f"{q}.sig",
                 "-q", nonce, "-g", "sha256")
            attest = tpm2(env, "tpm2_print", "-t", "TPMS_ATTEST", t / f"{q}.msg").stdout
            pcr_digest = re.search(r"pcrDigest:\s*([0-9a-fA-F]+)", attest).group(1).lower()
            quotes.append((before, pcr_digest))
            # evmctl with the PCRs tpm2_pcrread gives now, against the list read after them
            tpm = pcrread(env, ["sha1", "sha256"])
            args = []
            for bank in ("sha1", "sha256"):
                evmctl_pcr_file(tpm[bank], t / f"pcrs-{bank}")
                args += ["--pcrs", f"{bank},{t / f'pcrs-{bank}'}"]
            (t / "list.bin").write_bytes(m.read("binary_runtime_measurements"))
            r = subprocess.run(["evmctl", "-v", "ima_measurement", "--ignore-violations", *args, str(t / "list.bin")],
                               capture_output=True, text=True, timeout=120)
            assert "Matched per TPM bank" in r.stdout + r.stderr, r.stderr[-2000:]
            during += m.count() > before
    finally:
        stop.set()
        gen.join()
    assert not failures, failures[0]
    assert during >= 3, "records did not keep arriving during the checks"

    data = m.read("binary_runtime_measurements_sha256")
    # each quoted PCR 10 is the replay of a prefix of the list at least as
    # long as the list was when the quote began: the list is never behind
    # the TPM, and the TPM never behind the list by more than a request
    values, pcr = [], bytes(32)
    for p, d, _ in records(data, 32):
        if p == 10:
            pcr = hashlib.sha256(pcr + (b"\xff" * 32 if d == bytes(32) else d)).digest()
        values.append(hashlib.sha256(pcr).hexdigest())  # a quote's digest over PCR 10 alone
    last = 0
    for before, pcr_digest in quotes:
        assert pcr_digest in values, "a quote matches no prefix of the list"
        k = values.index(pcr_digest) + 1
        # a generate request lets the TPM lag its own records by two batches at most
        assert k >= before - 2 * GENERATE_BATCH and k >= last
        last = k

    # quiet now: a full check with the PCR values, and evmctl reading the TPM itself
    nonce = "00112233445566778899aabbccddeeff"
    quote(env, t, "last", nonce)
    tpm2(env, "tpm2_checkquote", "-u", t / "ak.pem", "-m", t / "last.msg", "-s", t / "last.sig",
         "-f", t / "last.pcrs", "-q", nonce, "-g", "sha256")
    data = m.read("binary_runtime_measurements_sha256")
    assert hashlib.sha256(replay(data, "sha256")[10]).hexdigest() == values[-1]
    attest = tpm2(env, "tpm2_print", "-t", "TPMS_ATTEST", t / "last.msg").stdout
    assert re.search(r"pcrDigest:\s*([0-9a-fA-F]+)", attest).group(1).lower() == \
        hashlib.sha256(replay(data, "sha256")[10]).hexdigest()
    r = subprocess.run(["evmctl", "-v", "ima_measurement", "--ignore-violations",
                        str(m.ima / "binary_runtime_measurements")],
                       env=env, capture_output=True, text=True, timeout=120)
    assert "Matched per TPM bank" in r.stdout + r.stderr, r.stderr[-2000:]
    assert r.returncode == 0


def arriving(m, timeout: float = 60) -> int:
    """The count, once it is seen to grow: a check begins inside a generate
    run, not in the gap between two."""
    first, deadline = m.count(), time.monotonic() + timeout
    while (now := m.count()) == first:
        assert time.monotonic() < deadline, "no record arrived"
        time.sleep(0.005)
    return now


def evmctl_pcr_file(values: list[str], path) -> None:
    path.write_text("".join(f"PCR-{i:02d}: {v}\n" for i, v in enumerate(values)))


def test_evmctl_replay_with_pcrs_from_tpm2_pcrread(mount_imafs, tmp_path):
    m = mount_imafs("tpm=swtpm")
    for i in range(50):
        m.cli("record", "--name", f"/f{i}", "--digest", digest("%x" % (i % 16)) if i % 7 else digest("e"))
    m.cli("record", "--name", "/v", "--violation")
    env = tpm_env(m)
    tpm = pcrread(env, ["sha1", "sha256"])
    args = []
    for bank in ("sha1", "sha256"):
        evmctl_pcr_file(tpm[bank], tmp_path / bank)
        args += ["--pcrs", f"{bank},{tmp_path / bank}"]
    r = subprocess.run(["evmctl", "-v", "ima_measurement", "--ignore-violations", *args,
                        str(m.ima / "binary_runtime_measurements")], capture_output=True, text=True, timeout=60)
    assert "Matched per TPM bank" in r.stdout + r.stderr, r.stderr[-2000:]
    # a changed value is refused: the check can fail
    bad = list(tpm["sha256"])
    bad[10] = "00" * 31 + "01"
    evmctl_pcr_file(bad, tmp_path / "bad")
    r = subprocess.run(["evmctl", "-v", "ima_measurement", "--ignore-violations",
                        "--pcrs", f"sha256,{tmp_path / 'bad'}", str(m.ima / "binary_runtime_measurements")],
                       capture_output=True, text=True, timeout=60)
    assert "Matched per TPM bank" not in r.stdout + r.stderr


def test_a_killed_swtpm_loses_no_record_and_the_daemon_serves_on(mount_imafs):
    m = mount_imafs("tpm=swtpm")
    pid = m.client.call("status")["tpm"]["swtpm_pid"]
    gen = subprocess.Popen([sys.executable, "-m", "imafs", "generate", "--mount", m.path, "--count", "30000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # kill it once some records are in
    deadline = time.monotonic() + 30
    while m.count() < 2000 and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    out, err = gen.communicate(timeout=120)
    assert gen.returncode == 0, err  # the request that hit the failure still completes

    st = m.client.call("status")
    tpm = st["tpm"]
    assert tpm["state"] == "failed" and tpm["error"]
    count = int(m.read("runtime_measurements_count"))
    assert count == st["count"] == 1 + 30000  # boot_aggregate + the records
    ascii_lines = m.read("ascii_runtime_measurements", "r").splitlines()
    assert len(ascii_lines) == count
    # every record is either in the TPM or counted as not extended
    assert 0 < tpm["extended"] < count and tpm["not_extended"] > 0
    assert tpm["extended"] + tpm["not_extended"] == count
    dmesg = m.cli("dmesg").stdout
    assert "ima: Error Communicating to TPM chip, result: -5" in dmesg
    assert "op=add_template_measure cause=TPM_error(-5)" in dmesg
    assert m.cli("pcrs", check=False).returncode != 0

    # the daemon keeps serving: records are listed and counted
    m.cli("record", "--name", "/after", "--digest", digest("f"))
    assert m.client.call("status")["tpm"]["not_extended"] == tpm["not_extended"] + 1
    assert m.read("ascii_runtime_measurements", "r").endswith(" /after\n")

    # a reboot starts swtpm again from its state: a working TPM and a new list
    m.cli("reboot")
    st = m.client.call("status")["tpm"]
    assert st["state"] == "ok" and st["swtpm_pid"] != pid
    m.cli("record", "--name", "/fresh", "--digest", digest("1"))
    assert_tpm_matches(m, ("sha1", "sha256"))


def test_tpm_env_and_soft_backend(mnt):
    r = mnt.cli("tpm", "env", check=False)
    assert r.returncode != 0 and "tpm=swtpm" in r.stderr
    assert mnt.client.call("status")["tpm"]["backend"] == "soft"
    assert "soft" in mnt.cli("pcrs").stderr


def test_swtpm_stops_at_umount_and_with_a_killed_daemon(mount_imafs):
    m = mount_imafs("tpm=swtpm")
    st = m.client.call("status")
    pid, daemon = st["tpm"]["swtpm_pid"], st["pid"]
    assert os.path.exists(f"/proc/{pid}")
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.02)
    assert not _alive(pid), "swtpm outlived its killed daemon"
    subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    m2 = mount_imafs("tpm=swtpm")
    pid2 = m2.client.call("status")["tpm"]["swtpm_pid"]
    state = m2.client.path.with_suffix(".tpm")
    assert (state / "swtpm.log").exists()
    assert imafs("umount", m2.path).returncode == 0
    assert not _alive(pid2)
    assert not state.exists()  # a clean unmount leaves nothing in the runtime directory


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def eventlog_pcrs(path, n: int = 8) -> dict[str, list[str]]:
    """The PCR values tpm2_eventlog computes by replaying a log."""
    out = subprocess.run(["tpm2_eventlog", str(path)], capture_output=True, text=True, check=True).stdout
    values: dict[str, dict[int, str]] = {}
    section = bank = None
    for line in out.splitlines():
        if line.startswith("pcrs:"):
            section = True
        elif section and re.fullmatch(r"\s+\w+:", line):
            bank = line.strip()[:-1]
            values[bank] = {}
        elif section and (m := re.fullmatch(r"\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)", line)):
            values[bank][int(m.group(1))] = m.group(2).lower()
    return {b: [v.get(i) for i in range(n)] for b, v in values.items()}


def boot_aggregate_of(m) -> str:
    first = m.read("ascii_runtime_measurements", "r").splitlines()[0].split()
    assert first[-1] == "boot_aggregate"
    return first[3]


def evmctl_boot_aggregate(env) -> list[str]:
    r = subprocess.run(["evmctl", "ima_boot_aggregate"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_boot_event_log_is_replayed_into_pcr_0_to_9(mount_imafs):
    m = mount_imafs("tpm=swtpm")
    log = m.path / "tpm0" / "binary_bios_measurements"
    st = os.stat(log)
    assert (st.st_mode, st.st_uid, st.st_gid) == (0o100440, 0, 0)
    env = tpm_env(m)
    replayed = eventlog_pcrs(log, 10)
    assert set(replayed) == {"sha1", "sha256"}
    tpm = pcrread(env, ["sha1", "sha256"])
    for bank in replayed:
        assert replayed[bank] == tpm[bank][:10], bank
    assert all(v != "0" * 64 for v in tpm["sha256"][:10])
    agg = boot_aggregate_of(m)
    assert agg in evmctl_boot_aggregate(env)  # evmctl reads the TPM through tsspcrread
    assert agg != "sha256:" + hashlib.sha256(bytes(320)).hexdigest()

    m.cli("record", "--name", "/a", "--digest", digest("a"))
    m.cli("reboot")  # power cycle, the log replayed again: the same PCR 0-7, the same boot_aggregate
    env = tpm_env(m)
    assert pcrread(env, ["sha256"])["sha256"][:10] == replayed["sha256"]
    assert boot_aggregate_of(m) == agg
    assert_tpm_matches(m, ("sha1", "sha256"))


def _hand_made_log() -> bytes:
    """A crypto-agile log written field by field: Spec ID (sha1, sha256), a
    CRTM version in PCR 0, a POST code in PCR 2, separators in PCR 0-7."""
    spec = (b"Spec ID Event03\0" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 2)
            + struct.pack("<HHHH", 0x4, 20, 0xB, 32) + b"\0")
    out = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(spec)) + spec

    def event(pcr, etype, data):
        return (struct.pack("<III", pcr, etype, 2) + struct.pack("<H", 0x4) + hashlib.sha1(data).digest()
                + struct.pack("<H", 0xB) + hashlib.sha256(data).digest() + struct.pack("<I", len(data)) + data)
    out += event(0, 0x8, "hand-made 2.0\0".encode("utf-16-le"))
    out += event(2, 0x1, b"option rom")
    for pcr in range(8):
        out += event(pcr, 0x4, bytes(4))
    return out


def test_event_log_from_a_file(mount_imafs, tmp_path):
    path = tmp_path / "bios.bin"
    path.write_bytes(_hand_made_log())
    m = mount_imafs("tpm=swtpm", f"event_log={path}")
    exported = m.path / "tpm0" / "binary_bios_measurements"
    assert exported.read_bytes() == path.read_bytes()
    env = tpm_env(m)
    tpm = pcrread(env, ["sha1", "sha256"])
    expect = {}
    for bank, h in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
        pcr = [bytes(h().digest_size)] * 8
        pcr[0] = h(pcr[0] + h("hand-made 2.0\0".encode("utf-16-le")).digest()).digest()
        pcr[2] = h(pcr[2] + h(b"option rom").digest()).digest()
        pcr = [h(v + h(bytes(4)).digest()).digest().hex() for v in pcr]
        expect[bank] = pcr
        assert tpm[bank][:8] == pcr, bank
    assert eventlog_pcrs(exported) == expect
    assert boot_aggregate_of(m) in evmctl_boot_aggregate(env)


def test_a_log_that_is_not_tcg2_is_refused(mount_imafs, tmp_path, runtime_dir):
    bad = tmp_path / "bad.bin"
    bad.write_bytes(b"\0" * 100)
    mp = tmp_path / "mp"
    mp.mkdir()
    r = imafs("mount", mp, "--set", "tpm=swtpm", "--set", f"event_log={bad}", check=False)
    assert r.returncode != 0 and "not a crypto-agile (TCG2) log" in r.stderr
    r = imafs("mount", mp, "--set", f"event_log={bad}", check=False)
    assert r.returncode != 0 and "event_log" in r.stderr and "tpm = swtpm" in r.stderr


def test_keylime_checks_a_quote_and_the_list_together(mount_imafs, tmp_path):
    """keylime's verifier (Tpm.check_quote): the quote's signature and nonce,
    PCR 10 against the list and the runtime policy; one changed record fails."""
    import base64

    from keylime.common.algorithms import Hash
    from keylime.mba import mba
    from keylime.tpm.tpm_main import Tpm

    mba.load_imports(skip_custom_policies=True)  # as the verifier does at start

    from .keylime_check import runtime_policy  # also: violations tolerated (the option reads inverted)

    m = mount_imafs("tpm=swtpm")
    m.cli("generate", "--count", "300")
    m.cli("record", "--name", "/etc/agent.conf", "--digest", digest("c"))
    m.cli("record", "--name", "/v", "--violation")
    env = tpm_env(m)
    t = tmp_path
    make_ak(env, t)
    nonce = "imafs-keylime-nonce"
    quote(env, t, "k", nonce.encode().hex())
    blob = "r" + ":".join(base64.b64encode((t / f"k.{x}").read_bytes()).decode() for x in ("msg", "sig", "pcrs"))
    ak = base64.b64encode((t / "ak.pub").read_bytes()).decode()
    text = m.read("ascii_runtime_measurements_sha256", "r")
    policy = runtime_policy(text, "sha256")

    def check(ascii_list, nonce=nonce):
        return Tpm().check_quote(None, nonce, None, blob, ak, tpm_policy={}, ima_measurement_list=ascii_list,
                                 runtime_policy=policy, hash_alg=Hash.SHA256, skip_clock_check=True,
                                 skip_data_pcr_check=True)

    failure = check(text)
    assert not failure, [e.event_id for e in failure.events]
    failure = check(text, nonce="another-nonce")
    # keylime spells the component "qoute_validation"
    assert failure and all(e.event_id.endswith(".quote_validation") for e in failure.events)
    lines = text.splitlines(keepends=True)
    victim = lines[150]
    col = victim.index(" ", 3) + 5  # inside the template digest
    changed = victim[:col] + ("0" if victim[col] != "0" else "1") + victim[col + 1:]
    failure = check("".join(lines[:150] + [changed] + lines[151:]))
    assert failure and any("pcr" in e.event_id or "ima" in e.event_id for e in failure.events), \
        [e.event_id for e in failure.events]



def test_keylime_measured_boot_and_ima_with_the_exported_event_log(mount_imafs, tmp_path):
    """keylime parses tpm0/binary_bios_measurements (tpm2_eventlog), replays it
    against the quoted PCR 0-9 and checks the list's boot_aggregate with it."""
    import base64

    from keylime.common.algorithms import Hash
    from keylime.mba import mba
    from keylime.tpm.tpm_main import Tpm

    from .keylime_check import runtime_policy

    mba.load_imports(skip_custom_policies=True)
    m = mount_imafs("tpm=swtpm")
    m.cli("generate", "--count", "100")
    env = tpm_env(m)
    t = tmp_path
    make_ak(env, t)
    nonce = "imafs-mb-nonce"
    tpm2(env, "tpm2_quote", "-c", t / "ak.ctx", "-l", "sha256:0,1,2,3,4,5,6,7,8,9,10", "-q",
         nonce.encode().hex(), "-g", "sha256", "-m", t / "q.msg", "-s", t / "q.sig", "-o", t / "q.pcrs")
    blob = "r" + ":".join(base64.b64encode((t / f"q.{x}").read_bytes()).decode() for x in ("msg", "sig", "pcrs"))
    ak = base64.b64encode((t / "ak.pub").read_bytes()).decode()
    text = m.read("ascii_runtime_measurements_sha256", "r")
    bios = (m.path / "tpm0" / "binary_bios_measurements").read_bytes()

    # the runtime policy does not know boot_aggregate: keylime accepts it only if
    # it is the aggregate of PCR 0-9 it computes by replaying the boot log
    policy = runtime_policy(text, "sha256")
    del policy["digests"]["boot_aggregate"]

    def check(bootlog):
        return Tpm().check_quote(None, nonce, None, blob, ak, tpm_policy={}, ima_measurement_list=text,
                                 runtime_policy=copy.deepcopy(policy), hash_alg=Hash.SHA256,
                                 mb_measurement_list=bootlog, mb_policy_name="accept-all",
                                 skip_clock_check=True, skip_data_pcr_check=True)

    failure = check(bios)
    assert not failure, [(e.event_id, e.context) for e in failure.events]
    # another machine's log: its PCRs are not the quoted ones, its aggregate not the list's
    failure = check(_hand_made_log())
    ids = [e.event_id for e in failure.events]
    assert "ima.validation.ima-ng.runtime_policy_hash" in ids, ids


def test_a_silent_swtpm_fails_after_the_timeout_and_reads_never_wait(mount_imafs):
    """swtpm stopped (SIGSTOP): the request whose extend hangs returns after
    tpm.COMMAND_TIMEOUT, reads meanwhile answer at once, the TPM is failed
    with -ETIME; a reboot replaces the swtpm."""
    from imafs.tpm import COMMAND_TIMEOUT

    m = mount_imafs("tpm=swtpm")
    pid = m.client.call("status")["tpm"]["swtpm_pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        done = {}

        def record():
            t = time.monotonic()
            done["r"] = m.cli("record", "--name", "/stuck", "--digest", digest("5"), check=False)
            done["s"] = time.monotonic() - t
        th = threading.Thread(target=record)
        th.start()
        deadline = time.monotonic() + 30
        while True:  # listed before extended; each read answers at once, not held up by the extend
            t = time.monotonic()
            listed = m.read("ascii_runtime_measurements", "r").endswith(" /stuck\n")
            assert time.monotonic() - t < COMMAND_TIMEOUT / 2
            if listed:
                break
            assert time.monotonic() < deadline, "the record was not listed"
            time.sleep(0.05)
        assert th.is_alive()  # the record request waits for its extend
        th.join(COMMAND_TIMEOUT + 20)
        assert not th.is_alive() and done["r"].returncode == 0
        assert COMMAND_TIMEOUT - 1 < done["s"] < COMMAND_TIMEOUT + 10
        st = m.client.call("status")["tpm"]
        assert st["state"] == "failed" and "did not answer" in st["error"] and st["not_extended"] == 1
        assert "Error Communicating to TPM chip, result: -62" in m.cli("dmesg").stdout
        m.cli("reboot")
        st = m.client.call("status")["tpm"]
        assert st["state"] == "ok" and st["swtpm_pid"] != pid
        assert_tpm_matches(m, ("sha1", "sha256"))
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
