"""What a user reads: a help text for every option of the CLI; ``imafs
dmesg`` on a log that is still empty."""

from __future__ import annotations

import argparse
import subprocess

from imafs.cli import _parser


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
    assert (r.stdout, r.stderr) == ("", "imafs: the emulated kernel has logged nothing yet\n")
    subprocess.run(["bash", "-c", "echo bogus > policy"], cwd=mnt.ima, capture_output=True, check=False)
    r = mnt.cli("dmesg")
    assert "ima: policy update failed" in r.stdout and r.stderr == ""
