"""What a user reads: the README's examples, run as written and in order
against a real mount and the real evmctl; a help text for every option of
the CLI; ``imafs dmesg`` on a log that is still empty."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from imafs.cli import _parser
from imafs.daemon import mounted_at

from .conftest import REQUIRE_FUSE, fuse_unavailable, imafs

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(heading: str) -> str:
    """The first ```sh block of the README section ``heading``."""
    m = re.search(rf"^#+ {re.escape(heading)}\n(?:(?!^#+ ).)*?^```sh\n(.*?)^```$",
                  README.read_text(), re.M | re.S)
    assert m, f"README.md: no ```sh block in the section {heading!r}"
    return m.group(1)


def substitute(script: str, paths: dict[str, Path]) -> str:
    """``script`` with every README path of ``paths`` (a whole path, not a
    prefix of a longer one) replaced in one pass, so a replacement is never
    replaced again."""
    pattern = "|".join(rf"(?<![\w.-]){re.escape(p)}(?![\w.-])" for p in paths)
    return re.sub(pattern, lambda m: str(paths[m.group()]), script)


@pytest.fixture
def readme_paths(tmp_path, runtime_dir):
    """Temporary directories for the README's paths; whatever is still
    mounted on them at teardown is unmounted, even after a failure."""
    why = fuse_unavailable()
    if why:
        if REQUIRE_FUSE:
            pytest.fail(f"IMAFS_REQUIRE_FUSE=1 but {why}")
        pytest.skip(why)
    paths = {"/mnt/imafs": tmp_path / "mnt", "/srv/app": tmp_path / "srv-app", "/m": tmp_path / "m"}
    yield paths
    mp = paths["/mnt/imafs"]
    if mounted_at(mp):
        imafs("umount", mp, check=False)
    for p in (paths["/m"], mp):
        if mounted_at(p):
            subprocess.run(["umount", "-l", str(p)], check=False)


def run_readme_block(heading: str, paths: dict[str, Path], cwd: Path) -> subprocess.CompletedProcess:
    """The block's lines in order under ``set -e``, ``imafs`` being this
    Python's imafs; the commands are traced on stderr."""
    prelude = f'set -euxo pipefail\nimafs() {{ {shlex.quote(sys.executable)} -m imafs "$@"; }}\n'
    cwd.mkdir()
    r = subprocess.run(["bash", "-c", prelude + substitute(readme_block(heading), paths)], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.skipif(shutil.which("evmctl") is None, reason="evmctl not installed")
def test_using_it(readme_paths, tmp_path):
    r = run_readme_block("Using it", readme_paths, tmp_path / "work")
    # the measure example measures, and evmctl verifies the list against the PCRs
    assert '"decision": "measure"' in r.stdout and '"added": true' in r.stdout
    assert "Matched per TPM bank calculated digest(s)." in r.stdout + r.stderr
    assert mounted_at(readme_paths["/mnt/imafs"]) is None


def test_measuring_real_file_activity(readme_paths, tmp_path):
    r = run_readme_block("Measuring real file activity", readme_paths, tmp_path / "work")
    dst = readme_paths["/m"]
    assert "\nran\n" in r.stdout
    assert f" {dst}/a.txt\n" in r.stdout and f" {dst}/run.sh\n" in r.stdout
    assert mounted_at(readme_paths["/mnt/imafs"]) is None and mounted_at(dst) is None


def test_running_programs_inside_the_emulated_kernel(readme_paths, tmp_path):
    r = run_readme_block("Running programs inside the emulated kernel", readme_paths, tmp_path / "work")
    lines = r.stdout.splitlines()
    assert lines[:2] == ["hello", "1"]
    assert lines[2].endswith(" ima_policy=tcb") and lines[2].startswith("BOOT_IMAGE=")
    sysfs, pcrread = lines[3], lines[-1]
    assert pcrread.strip() == f"10: 0x{sysfs}"
    assert mounted_at(readme_paths["/m"]) is None


def _parsers(parser: argparse.ArgumentParser, prog: str = "imafs"):
    """(command line, parser) of ``parser`` and of every subcommand under it."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, f"{prog} {name}")


def test_every_option_has_help():
    """Every option and positional of every subcommand, and every subcommand,
    says what it is (``--ready-fd``, internal, is hidden with SUPPRESS)."""
    missing = []
    for prog, parser in _parsers(_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{prog} {a.dest}" for a in action._choices_actions if not (a.help or "").strip()]
            elif not (action.help or "").strip():
                missing.append(f"{prog} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_dmesg_on_an_empty_log(mnt):
    r = mnt.cli("dmesg")
    assert r.stdout.endswith("] ima: No architecture policies found\n") and r.stderr == ""  # the boot lines
    os.unlink(mnt.client.call("status")["kernel_log"])  # e.g. removed by hand
    r = mnt.cli("dmesg")
    assert (r.stdout, r.stderr) == ("", "imafs: the emulated kernel has logged nothing yet\n")
    subprocess.run(["bash", "-c", "echo bogus > policy"], cwd=mnt.ima, capture_output=True, check=False)
    r = mnt.cli("dmesg")
    assert "ima: policy update failed" in r.stdout and r.stderr == ""
