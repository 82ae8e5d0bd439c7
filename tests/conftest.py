"""Fixtures: a real imafs mount driven through the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imafs.control import Client
from imafs.pytest_plugin import fuse_unavailable

REQUIRE_FUSE = os.environ.get("IMAFS_REQUIRE_FUSE") == "1"


def imafs(*args, check=True, **kw) -> subprocess.CompletedProcess:
    """Run the real ``imafs`` command."""
    return subprocess.run([sys.executable, "-m", "imafs", *map(str, args)], capture_output=True,
                          text=True, check=check, timeout=120, **kw)


class Mount:
    def __init__(self, path: Path):
        self.path = path
        self.ima = path / "ima"
        self.client = Client(str(path))

    def cli(self, *args, check=True):
        return imafs(*args, "--mount", self.path, check=check)

    def read(self, name: str, mode="rb"):
        with open(self.ima / name, mode) as f:
            return f.read()

    def count(self) -> int:
        """runtime_measurements_count in one read(2): the kernel prints the
        number at each read, so while records arrive a read to EOF can join
        the head of one number to the tail of a newer one ("1\n" + "1\n")."""
        fd = os.open(self.ima / "runtime_measurements_count", os.O_RDONLY)
        try:
            return int(os.read(fd, 64))
        finally:
            os.close(fd)

    def pcr_file(self, bank: str, tmp: Path) -> Path:
        out = tmp / f"pcrs-{bank}.txt"
        out.write_text(self.cli("pcrs", "--bank", bank, "--format", "evmctl").stdout)
        return out


@pytest.fixture
def runtime_dir(tmp_path, monkeypatch):
    d = tmp_path / "run"
    monkeypatch.setenv("IMAFS_RUNTIME_DIR", str(d))
    return d


@pytest.fixture
def mount_imafs(tmp_path, runtime_dir):
    """Factory: mount_imafs(*--set KEY=VALUE) -> Mount; unmounted at teardown.

    ``reachable=True`` mounts where any uid can reach the mount point (pytest's
    own temporary directories are 0700 to everyone but root)."""
    why = fuse_unavailable()
    if why:
        if REQUIRE_FUSE:
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    mounts = []
    made = []

    def mount(*settings, profile: str | None = None, measure=(), reachable=False) -> Mount:
        if reachable:
            base = Path(tempfile.mkdtemp(prefix="imafs-mnt-", dir="/tmp"))
            base.chmod(0o755)
            made.append(base)
            mp = base / "mnt"
        else:
            mp = tmp_path / f"mnt{len(mounts)}"
        mp.mkdir()
        args = ["mount", mp]
        for s in settings:
            args += ["--set", s]
        for src, dst in measure:
            args += ["--measure", f"{src}:{dst}"]
        if profile:
            args += ["--profile", profile]
        imafs(*args)
        m = Mount(mp)
        mounts.append(m)
        return m

    yield mount
    for m in mounts:
        if imafs("umount", m.path, check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(m.path)], check=False)
    for base in made:  # empty once unmounted; never recurse into a mount
        for d in (base / "mnt", base):
            try:
                d.rmdir()
            except OSError:
                pass


@pytest.fixture
def ramfs():
    """Factory: a fresh ramfs (the filesystem of kernel-observed.md F-13; or
    another ``fstype``) and an empty directory beside it, both where any uid
    can reach them."""
    made = []

    def make(fstype: str = "ramfs") -> tuple[Path, Path]:
        base = Path(tempfile.mkdtemp(prefix="imafs-test-", dir="/tmp"))
        base.chmod(0o755)
        src, dst = base / "src", base / "m"
        src.mkdir()
        dst.mkdir()
        subprocess.run(["mount", "-t", fstype, "-o", "mode=755", fstype, str(src)], check=True)
        made.append(base)
        return src, dst

    yield make
    for base in made:
        subprocess.run(["umount", "-l", str(base / "src")], check=False)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mnt(mount_imafs):
    """The default profile, mounted."""
    return mount_imafs()


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server (tests/postgres.py) for the whole session; skipped
    only where PostgreSQL is not installed, and then a failure under IMAFS_REQUIRE_FUSE=1."""
    from .postgres import Server, binaries
    if binaries() is None:
        if REQUIRE_FUSE:
            pytest.fail("IMAFS_REQUIRE_FUSE=1 but PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)")
        pytest.skip("PostgreSQL is not installed (/usr/lib/postgresql/*/bin/initdb)")
    server = Server()
    yield server
    server.stop()
