"""The pytest plugin (imafs/pytest_plugin.py), used as an agent's project
uses it: inner pytest sessions in a subprocess run the example of
docs/pytest.md and small hostile test files, under plain pytest and under
``pytest -n 2``; after each, nothing of theirs is left (mounts, daemons,
swtpm, directories).  The fixture is also used directly here."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import re
import shutil
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from imafs import pytest_plugin
from imafs.pytest_plugin import ImaKernel, _settings

from .conftest import fuse_unavailable

ROOT = Path(__file__).resolve().parents[1]
SETPRIV_1000 = ["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups"]


def example() -> str:
    """The complete example test file of docs/pytest.md."""
    m = re.search(r"^## A complete example\n.*?^```python\n(.*?)^```$", (ROOT / "docs/pytest.md").read_text(),
                  re.M | re.S)
    assert m, "docs/pytest.md: no ```python block under '## A complete example'"
    return m.group(1)


def plugin_args() -> list[str]:
    """Load the plugin by its module when the installed imafs has no entry
    point yet (an editable install made before it was added); with the entry
    point it is loaded already, and ``-p`` would register it twice."""
    eps = importlib.metadata.entry_points(group="pytest11")
    return [] if any(ep.value == "imafs.pytest_plugin" for ep in eps) else ["-p", "imafs.pytest_plugin"]


@pytest.fixture
def session_dir():
    """A directory for an inner session's test files and, as its TMPDIR, the
    emulators it mounts; short, so that control socket paths fit sun_path,
    and reachable by uid 1000."""
    d = Path(tempfile.mkdtemp(prefix="ipt-", dir="/tmp"))
    d.chmod(0o755)
    (d / "tmp").mkdir(mode=0o755)
    yield d
    left_behind(d / "tmp", clear=True)
    shutil.rmtree(d, ignore_errors=True)


def inner_pytest(d: Path, source: str, *args, user=None, env=None, wait=True, **kw):
    """pytest on ``source`` (a test file) in ``d``, in a subprocess."""
    (d / "test_agent.py").write_text(source)
    (d / "test_agent.py").chmod(0o644)
    cmd = [*(SETPRIV_1000 if user else []), sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider",
           "-v", "-rs", "--tb=short", "test_agent.py", *args]
    full_env = {**os.environ, "TMPDIR": str(d / "tmp"), "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("IMAFS_RUNTIME_DIR", None)
    full_env.pop("PYTEST_XDIST_WORKER", None)
    if not wait:
        return subprocess.Popen(cmd, cwd=d, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, **kw)
    return subprocess.run(cmd, cwd=d, env=full_env, capture_output=True, text=True, timeout=600, **kw)


def _processes_naming(text: str) -> list[str]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def left_behind(tmp: Path, clear: bool = False) -> list[str]:
    """Mounts, processes (daemons, swtpm: their command lines name their
    directory) and directories of emulators under ``tmp``."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if str(tmp) + "/" in line.split()[4]]
    procs = _processes_naming(str(tmp) + "/")
    dirs = [str(p) for p in tmp.glob("imafs-pytest-*")]
    if clear:  # a failed test's leftovers: only ever ours, named by our directory
        for mp in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mp], check=False)
        for line in procs:
            try:
                os.kill(int(line.split(":")[0]), signal.SIGKILL)
            except ProcessLookupError:
                pass
    return mounts + procs + dirs


def outcome(r: subprocess.CompletedProcess) -> dict[str, int]:
    """The counts of pytest's summary line: {"passed": 9, "failed": 1, ...}."""
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def workers(r: subprocess.CompletedProcess) -> set[str]:
    """The xdist workers that passed a test, from ``-v`` lines such as
    ``[gw1] [ 50%] PASSED test_agent.py::test_x``."""
    return set(re.findall(r"^\[(gw\d+)\] \[ *\d+%\] PASSED ", r.stdout, re.M))


def needs_fuse():
    why = fuse_unavailable()
    if why:
        if os.environ.get("IMAFS_REQUIRE_FUSE") == "1":
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)


# -- plain objects ----------------------------------------------------------------------
def test_marker_arguments_become_profile_settings():
    assert _settings(("boot_pcrs.sha256=/x",), {"kernel": "6.12", "staging": False, "tpm_banks": ("sha1", "sha256"),
                                               "pcr_idx": 11}) == \
        ["boot_pcrs.sha256=/x", "kernel=6.12", "staging=false", "tpm_banks=sha1,sha256", "pcr_idx=11"]


def test_the_list_paths_are_the_kernels_file_names():
    k = ImaKernel.__new__(ImaKernel)
    k.ima = Path("/s/ima")
    assert k.list_path() == Path("/s/ima/ascii_runtime_measurements")
    assert k.list_path("binary", "sha256", staged=True) == Path("/s/ima/binary_runtime_measurements_sha256_staged")
    with pytest.raises(ValueError, match="ascii"):
        k.list_path("json")


def test_the_entry_point_names_the_plugin_module():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["pytest11"] == {"imafs": "imafs.pytest_plugin"}
    assert "pytest-xdist>=3" in project["optional-dependencies"]["test"]
    assert callable(pytest_plugin.imafs_kernel) and callable(pytest_plugin.imafs_factory)


# -- the fixture, used here directly ----------------------------------------------------
@pytest.mark.imafs(kernel="6.12", ima_policy="tcb", tpm_banks=("sha1", "sha256"))
def test_the_marker_sets_the_profile(imafs_kernel):
    st = imafs_kernel.status()
    assert st["profile"]["kernel"] == "6.12" and st["policy"][0].startswith("dont_measure fsmagic=0x9fa0")
    assert not imafs_kernel.list_path(staged=True).exists()  # no staging before 7.2
    with pytest.raises(OSError) as e:
        imafs_kernel.stage()
    assert e.value.errno == 2  # no _staged file to write A on


@pytest.mark.parametrize("imafs_kernel", [{"ima_template": "ima"}, "ima_template=ima-sig"], indirect=True)
@pytest.mark.imafs(ima_hash="sha1")
def test_an_indirect_parameter_adds_to_the_marker(imafs_kernel):
    st = imafs_kernel.status()
    assert st["ima_hash"] == "sha1" and st["template"] in ("ima", "ima-sig")


def test_two_kernels_at_once_and_a_buffer_hook(imafs_factory, tmp_path):
    a = imafs_factory()
    b = imafs_factory(kernel="6.1", ima_policy="critical_data")
    assert a.securityfs != b.securityfs and a.runtime_dir != b.runtime_dir
    assert a.record("/a", buffer=b"root") and not a.record("/a", buffer=b"root")  # the duplicate table
    assert "/a" not in b.measurements()
    b.measure(func="CRITICAL_DATA", name="selinux", data=b"state", label="selinux")
    line = b.measurements().splitlines()[-1].split()
    assert line[2:] == ["ima-buf", "sha256:" + hashlib.sha256(b"state").hexdigest(), "selinux", b"state".hex()]


def test_the_cli_and_dmesg_reach_this_emulator(imafs_kernel):
    r = imafs_kernel.cli("pcrs", "--bank", "sha1", "--format", "evmctl")
    assert r.stdout.startswith("PCR-00: ") and len(r.stdout.splitlines()) == 24
    with pytest.raises(OSError):
        with open(imafs_kernel.ima / "policy", "w") as f:  # a rule the kernel refuses, and logs
            f.write("measure func=NO_SUCH_HOOK\n")
    assert "NO_SUCH_HOOK" in imafs_kernel.dmesg()


def test_a_bad_profile_key_fails_with_its_name_and_leaves_nothing(imafs_factory):
    ours = f"imafs-pytest-{os.getpid()}-*"  # this process's: xdist workers mount beside it
    before = set(Path(tempfile.gettempdir()).glob(ours))
    with pytest.raises(RuntimeError, match="no_such_key"):
        imafs_factory(no_such_key="1")
    assert set(Path(tempfile.gettempdir()).glob(ours)) == before


# -- inner sessions, as an agent's project runs them ---------------------------------------
@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_the_documented_example_passes(session_dir, xdist):
    needs_fuse()
    r = inner_pytest(session_dir, example(), *xdist)
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcome(r) == {"passed": 10}, r.stdout
    if xdist:
        assert workers(r) == {"gw0", "gw1"}  # both workers mounted emulators
    assert left_behind(session_dir / "tmp") == []


FAILING = """
import os, signal, pytest

@pytest.mark.imafs(tpm="swtpm")
def test_fails_holding_a_tpm(imafs_kernel):
    open("pids", "a").write(" ".join(map(str, imafs_kernel.pids)) + "\\n")
    assert imafs_kernel.record("/x", digest="sha256:" + "00" * 32)
    assert False, "the agent failed"

def test_errors_with_two_kernels(imafs_factory):
    a, b = imafs_factory(), imafs_factory(kernel="6.1")
    open("pids", "a").write(" ".join(map(str, a.pids + b.pids)) + "\\n")
    raise RuntimeError("boom")
"""


@pytest.mark.parametrize("xdist", [[], ["-n", "2"]], ids=["plain", "xdist"])
def test_a_failing_test_leaves_nothing_behind(session_dir, xdist):
    needs_fuse()
    r = inner_pytest(session_dir, FAILING, *xdist)
    assert outcome(r) == {"failed": 2}, r.stdout + r.stderr
    assert "the agent failed" in r.stdout and "boom" in r.stdout
    assert "imafs teardown had to force" not in r.stdout
    pids = [int(p) for p in (session_dir / "pids").read_text().split() if p != "None"]
    assert len(pids) == 4  # three daemons and one swtpm
    assert not any(pytest_plugin._alive(p) for p in pids)
    assert left_behind(session_dir / "tmp") == []


INTERRUPTED = """
import os, signal

def test_interrupted(imafs_kernel):
    open("pids", "w").write(" ".join(map(str, imafs_kernel.pids)))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's, whatever this run inherited
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the test
"""


def test_an_interrupted_session_leaves_nothing_behind(session_dir):
    needs_fuse()
    r = inner_pytest(session_dir, INTERRUPTED)
    assert r.returncode == 2 and "KeyboardInterrupt" in r.stdout, r.stdout + r.stderr
    assert not any(pytest_plugin._alive(int(p)) for p in (session_dir / "pids").read_text().split() if p != "None")
    assert left_behind(session_dir / "tmp") == []


KILLED = """
import time

def test_killed(imafs_kernel):
    open("pids", "w").write(" ".join(map(str, imafs_kernel.pids)))
    time.sleep(600)
"""

NEXT = """
def test_next(imafs_kernel):
    assert imafs_kernel.status()["count"] == 1
"""


def test_a_killed_session_is_cleared_by_the_next(session_dir):
    """SIGKILL leaves the emulator mounted (no teardown runs); the next
    session that uses the fixture finds its owner gone and clears it."""
    needs_fuse()
    p = inner_pytest(session_dir, KILLED, wait=False)
    pids_file = session_dir / "pids"
    deadline = time.monotonic() + 120
    while not (pids_file.exists() and pids_file.read_text()) and time.monotonic() < deadline:
        assert p.poll() is None, p.stdout.read()
        time.sleep(0.05)
    p.kill()
    p.communicate()
    daemon = int(pids_file.read_text().split()[0])
    assert pytest_plugin._alive(daemon) and left_behind(session_dir / "tmp") != []
    r = inner_pytest(session_dir, NEXT)
    assert outcome(r) == {"passed": 1}, r.stdout + r.stderr
    assert not pytest_plugin._alive(daemon)
    assert left_behind(session_dir / "tmp") == []


SKIPPED = """
def test_needs_the_emulator(imafs_kernel):
    raise AssertionError("ran without the emulator")
"""


def test_without_root_the_fixture_skips_or_fails_when_fuse_is_required(session_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to uid 1000")
    r = inner_pytest(session_dir, SKIPPED, user=1000, env={"IMAFS_REQUIRE_FUSE": "0"})
    assert outcome(r) == {"skipped": 1}, r.stdout + r.stderr
    assert "imafs: imafs mounts with allow_other and needs root" in r.stdout
    r = inner_pytest(session_dir, SKIPPED, user=1000, env={"IMAFS_REQUIRE_FUSE": "1"})
    assert outcome(r) == {"error": 1}, r.stdout + r.stderr
    assert "IMAFS_REQUIRE_FUSE=1 but imafs mounts with allow_other and needs root" in r.stdout
    assert left_behind(session_dir / "tmp") == []


def test_the_readme_example_runs_as_written(session_dir):
    """The README's block, with ``python`` this Python (the plugin given by
    ``-p`` where the installed imafs has no entry point yet)."""
    from .test_readme import readme_block
    needs_fuse()
    prelude = f'set -euxo pipefail\npython() {{ {shlex.quote(sys.executable)} "$@"; }}\n'
    env = {**os.environ, "TMPDIR": str(session_dir / "tmp"), "PYTHONPATH": str(ROOT),
           "PYTEST_ADDOPTS": " ".join(plugin_args() + ["-p", "no:cacheprovider", "-v"])}
    env.pop("IMAFS_RUNTIME_DIR", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    r = subprocess.run(["bash", "-c", prelude + readme_block("Testing an agent with pytest")], cwd=session_dir,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcome(r) == {"passed": 1} and len(workers(r)) == 1, r.stdout
    assert left_behind(session_dir / "tmp") == []


def test_bad_requests_get_the_daemons_error_and_the_kernel_serves_on(imafs_kernel, tmp_path):
    from imafs.control import ControlError
    with pytest.raises(ControlError, match="digest"):
        imafs_kernel.record("/x", digest="sha256:zz")
    with pytest.raises(ValueError, match="'MAY_FLY'; use MAY_EXEC, MAY_WRITE, MAY_READ, MAY_APPEND joined by |"):
        imafs_kernel.measure(tmp_path, mask="MAY_READ|MAY_FLY")
    with pytest.raises(ControlError, match="no PCR bank 'md5'"):
        imafs_kernel.pcrs("md5")
    assert imafs_kernel.tpm is None  # tpm = soft: no TPM to reach
    r = imafs_kernel.run(["sh", "-c", "exit 7"])
    assert r.returncode == 7  # the command's exit status
    r = imafs_kernel.run("cut -d' ' -f5 /sys/kernel/security/ima/ascii_runtime_measurements", shell=True,
                         capture_output=True, text=True)
    assert (r.returncode, r.stdout) == (0, "boot_aggregate\n")
    assert imafs_kernel.record("/y", digest="sha256:" + "11" * 32)
    assert imafs_kernel.status()["count"] == 2


def test_a_daemon_killed_by_the_test_is_cleared_at_teardown(imafs_factory):
    k = imafs_factory(tpm="swtpm")
    daemon, swtpm = k.pids
    os.kill(daemon, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pytest_plugin._alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert k.close() == []  # `imafs umount` clears the dead mount: nothing had to be forced
    assert not k.base.exists() and not pytest_plugin._mounted_under(k.base)
    assert not pytest_plugin._alive(swtpm)


def test_a_measured_mount_from_the_factory(imafs_factory):
    """``measure=`` re-exports SRC at DST: a real read there is measured (tcb:
    files root reads), and the mount goes with the emulator at teardown."""
    base = Path(tempfile.mkdtemp(prefix="ipt-m-", dir="/tmp"))
    try:
        (base / "src").mkdir()
        (base / "dst").mkdir()
        (base / "src" / "agent.conf").write_bytes(b"interval = 5\n")
        k = imafs_factory(ima_policy="tcb", measure=[f"{base}/src:{base}/dst"])
        assert (base / "dst" / "agent.conf").read_bytes() == b"interval = 5\n"
        digest = hashlib.sha256(b"interval = 5\n").hexdigest()
        assert f"sha256:{digest} {base}/dst/agent.conf\n" in k.measurements()
        assert k.close() == [] and not pytest_plugin._mounted_under(base)
    finally:
        if not pytest_plugin._mounted_under(base):
            shutil.rmtree(base)
