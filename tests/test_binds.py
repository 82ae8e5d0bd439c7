"""imafs/binds.py: the descriptors and connections it refuses (the binds it
makes are tested on real mounts in test_measured_mount.py and test_run.py)."""

from __future__ import annotations

import os

import pytest

from imafs import binds


def test_a_process_without_dev_fuse_and_a_descriptor_that_is_not_it_are_refused():
    with pytest.raises(OSError, match=f"process {os.getpid()} has no descriptor of /dev/fuse"):
        binds.fuse_descriptor(os.getpid())
    r, w = os.pipe()
    daemon = binds.FuseDaemon(os.pidfd_open(os.getpid()), r)
    try:
        with pytest.raises(OSError, match=f"the daemon's descriptor {r} is not /dev/fuse"):
            daemon.copy()
    finally:
        daemon.close()
        os.close(r)
        os.close(w)


def test_dev_fuse_of_another_connection_is_refused_before_any_lookup(mnt):
    """A fresh /dev/fuse makes a new connection that nobody serves: the
    device check refuses it before a lookup could wait on it, and closing
    the descriptor aborts it."""
    before = set(os.listdir("/proc/self/fd"))
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    with pytest.raises(OSError, match=f"the daemon's /dev/fuse is not the connection mounted at {mnt.path}"):
        binds.clone(fd, str(mnt.path), [".imafs-kernel/cmdline"])
    assert set(os.listdir("/proc/self/fd")) == before  # the descriptor is closed either way
    mnt.cli("status")
