"""`mount -t fuse.imafs` and fstab lines, through util-linux's mount(8) and
umount(8) and the helper scripts/setup installs as /sbin/mount.fuse.imafs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from imafs.daemon import mounted_at
from imafs.mount_helper import OptionError, main, mount_args, split_options

from .conftest import REQUIRE_FUSE, fuse_unavailable, imafs

HELPER = Path("/sbin/mount.fuse.imafs")
REPO = Path(__file__).resolve().parents[1]


def test_options_become_imafs_mount_arguments():
    opts = split_options('defaults,noauto,kernel=6.12,ima_policy=tcb|critical_data,'
                         'tpm_banks="sha1,sha256",measure=/a:/b,measure=/c:/d,profile=/p.toml,'
                         'boot_pcrs.sha1=/pcrs,x-systemd.automount,nofail')
    assert mount_args(opts) == ["--set", "kernel=6.12", "--set", "ima_policy=tcb|critical_data",
                                "--set", "tpm_banks=sha1,sha256", "--measure", "/a:/b",
                                "--measure", "/c:/d", "--profile", "/p.toml",
                                "--set", "boot_pcrs.sha1=/pcrs"]
    for bad in (["bogus=1"], ["kernel"], ["ro"]):
        with pytest.raises(OptionError, match="unknown option"):
            mount_args(bad)
    with pytest.raises(OptionError, match="unbalanced"):
        split_options('tpm_banks="sha1')


@given(st.lists(st.text(st.characters(blacklist_characters=',"', blacklist_categories=("Cs",)),
                        min_size=1), max_size=6))
def test_split_options_inverts_joining(options):
    assert split_options(",".join(options)) == options
    assert split_options(",".join(f'"{o}"' for o in options)) == options


def test_bad_invocations_exit_1(capsys):
    assert main(["imafs"]) == 1
    assert main(["imafs", "/mnt", "-o"]) == 1
    assert main(["imafs", "/mnt", "-o", "bogus"]) == 1
    assert "unknown option 'bogus'" in capsys.readouterr().err
    assert main(["imafs", "/nonexistent", "-f", "-o", "kernel=6.1"]) == 0  # -f: fake, nothing done


@pytest.fixture
def mount_env(tmp_path, runtime_dir):
    why = fuse_unavailable()
    if why:
        if REQUIRE_FUSE:
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    assert HELPER.exists(), f"{HELPER} is missing: scripts/setup installs it"
    env = dict(os.environ, PYTHONPATH=str(REPO))  # the helper runs this tree's imafs
    mp = tmp_path / "mnt"
    mp.mkdir()
    yield env, mp
    if mounted_at(str(mp)) == "fuse.imafs":
        imafs("umount", mp, check=False)


def status(mp: Path) -> dict:
    return json.loads(imafs("status", "--mount", mp).stdout)


def wait_unmounted(mp: Path, runtime: Path) -> None:
    deadline = time.monotonic() + 10
    while mounted_at(str(mp)) or any(runtime.glob("*.sock")):
        assert time.monotonic() < deadline, "the daemon did not end after umount(8)"
        time.sleep(0.05)


def test_mount_t_fuse_imafs_and_umount(mount_env, runtime_dir):
    env, mp = mount_env
    r = subprocess.run(["mount", "-t", "fuse.imafs", "imafs", str(mp), "-o",
                        'kernel=6.12,ima_policy=tcb,tpm_banks="sha1,sha256"'],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(li for li in open("/proc/self/mounts") if f" {mp} " in li)
    assert line.split()[0::2][:2] == ["securityfs", "fuse.imafs"]
    p = status(mp)["profile"]
    assert (p["kernel"], p["ima_policy"], p["tpm_banks"]) == ("6.12", "tcb", "sha1,sha256")
    assert sorted(os.listdir(mp / "ima"))[:1] == ["ascii_runtime_measurements"]
    r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    wait_unmounted(mp, runtime_dir)


def test_measured_mount_of_the_helper_is_not_securityfs(mount_env, runtime_dir, tmp_path):
    """The helper run as mount(8) runs it (`mount.fuse.imafs SOURCE TARGET -o
    OPTIONS`).  `imafs umount` takes both mounts away (umount(8) of the
    mount point alone leaves the daemon serving DST, the superblock's other
    mount)."""
    env, mp = mount_env
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "f").write_text("f\n")
    r = subprocess.run([sys.executable, "-m", "imafs.mount_helper", "imafs", str(mp), "-o",
                        f"measure={src}:{dst}"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = {li.split()[1]: li.split()[0::2][:2] for li in open("/proc/self/mounts")}
    assert (lines[str(mp)], lines[str(dst)]) == (["securityfs", "fuse.imafs"], ["imafs", "fuse.imafs"])
    assert (dst / "f").read_text() == "f\n"
    imafs("umount", mp)
    wait_unmounted(mp, runtime_dir)
    assert mounted_at(str(dst)) is None


def test_fstab_line_mount_by_mount_point(mount_env, runtime_dir, tmp_path):
    env, mp = mount_env
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\nimafs {mp} fuse.imafs noauto,nofail,kernel=6.1,x-imafs=1 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mp)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    assert status(mp)["profile"]["kernel"] == "6.1"
    assert sorted(os.listdir(mp / "ima")) == ["ascii_runtime_measurements", "binary_runtime_measurements",
                                              "policy", "runtime_measurements_count", "violations"]
    subprocess.run(["umount", str(mp)], check=True, timeout=30)
    wait_unmounted(mp, runtime_dir)


def test_bad_options_fail_mount_and_mount_nothing(mount_env, runtime_dir):
    env, mp = mount_env
    r = subprocess.run(["mount", "-t", "fuse.imafs", "imafs", str(mp), "-o", "kernel=5.4"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 32 and "kernel: '5.4' is not allowed" in r.stderr, r.stderr
    r = subprocess.run(["mount", "-t", "fuse.imafs", "imafs", str(mp), "-o", "nosuchkey=1"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "unknown option 'nosuchkey=1'" in r.stderr
    assert mounted_at(str(mp)) is None and not any(runtime_dir.glob("*.sock"))
    # a uid-1000 user may not mount it (mount(8) refuses before the helper runs)
    r = subprocess.run(["setpriv", "--reuid", "1000", "--regid", "1000", "--clear-groups",
                        "mount", "-t", "fuse.imafs", "imafs", str(mp)], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0 and mounted_at(str(mp)) is None
