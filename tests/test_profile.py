"""The profile: defaults, TOML, overrides, boot rules and clear errors."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from imafs.profile import Profile, ProfileError, load_profile, profile_to_dict


def test_defaults():
    p = load_profile()
    assert p == Profile(staging=True, violation_limits=True)
    assert load_profile(None, ["kernel=6.12"]).staging is False
    # Debian's 6.12.117 limits violations already (F-15); 6.1 does not
    assert load_profile(None, ["kernel=6.12"]).violation_limits is True
    assert load_profile(None, ["kernel=6.1"]).violation_limits is False
    assert load_profile(None, ["kernel=6.1", "violation_limits=true"]).violation_limits is True
    assert (p.kernel, p.ima_hash, p.template.name, p.tpm_banks, p.pcr_idx) == \
        ("7.2", "sha256", "ima-ng", ("sha1", "sha256"), 10)
    assert p.kernel_version == (7, 2)
    assert profile_to_dict(p)["tpm_banks"] == "sha1,sha256"


def test_toml_then_overrides(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('kernel = "6.12"\nima_template = "ima-sig"\ntpm_banks = ["sha256"]\ndisable_htable = true\n')
    p = load_profile(str(f), ["tpm_banks=none", "pcr_idx=11"])
    assert (p.kernel, p.template.name, p.tpm_banks, p.pcr_idx, p.disable_htable) == \
        ("6.12", "ima-sig", (), 11, True)


def test_custom_format_wins():
    p = load_profile(None, ["ima_template=ima-sig", "ima_template_fmt=d-ng|n-ng|iuid"])
    assert p.template.name == "" and p.template.fmt == "d-ng|n-ng|iuid"


def test_ima_template_boot_rules():
    """kernel-observed.md F-12."""
    p = load_profile(None, ["ima_template=ima"])
    assert (p.template.name, p.ima_hash) == ("ima", "sha1")
    p = load_profile(None, ["ima_hash=sha256", "ima_template=ima"])
    assert (p.template.name, p.ima_hash) == ("ima-ng", "sha256")
    p = load_profile(None, ["ima_hash=md5", "ima_template=ima"])
    assert (p.template.name, p.ima_hash) == ("ima", "md5")


@pytest.mark.parametrize("setting,words", [
    ("kernel=5.4", ["kernel", "6.1, 6.12, 7.2"]),
    ("ima_hash=sha7", ["ima_hash", "sha256"]),
    ("ima_template=ima-ng2", ["ima_template", "ima-sig"]),
    ("ima_template_fmt=d-ng|bogus", ["ima_template_fmt", "bogus"]),
    ("tpm_banks=sha1,sha1", ["tpm_banks", "twice"]),
    ("pcr_idx=15", ["pcr_idx", "8..14"]),
    ("pcr_idx=x", ["pcr_idx", "integer"]),
    ("disable_htable=maybe", ["disable_htable", "true, false"]),
    ("no_such_key=1", ["no_such_key", "known keys"]),
    ("kernel", ["KEY=VALUE"]),
    ("abi=v6", ["abi", "v7, v5"]),
    ("ima_policy=bogus", ["ima_policy", "critical_data"]),
    ("boot_pcrs.sha384=/dev/null", ["boot_pcrs.sha384", "not a TPM bank"]),
    ("boot_pcrs.sha256=/nonexistent", ["boot_pcrs.sha256", "cannot read"]),
    ("boot_pcrs.sha256=", ["boot_pcrs.sha256", "not a file path"]),
    ("boot_pcrs.sha256=/", ["boot_pcrs.sha256", "not a regular file"]),
    ("boot_pcrs.sha256=/dev/null", ["boot_pcrs.sha256", "not a regular file"]),
    ("tpm_banks=md5", ["tpm_banks", "'md5' is not a TPM 2.0 PCR bank", "sha384"]),
    ("tpm_banks=sha3-256", ["tpm_banks", "not a TPM 2.0 PCR bank"]),
    ("tpm_banks=sha1,none", ["tpm_banks", "'none' is not a TPM 2.0 PCR bank", "none alone"]),
    ("tpm_banks=sha1,", ["tpm_banks", "'' is not a TPM 2.0 PCR bank"]),
    ("tpm_banks=", ["tpm_banks", "empty", "none"]),
    ("iint_cache_size=1.7", ["iint_cache_size", "not an integer"]),
    ("iint_cache_size=0", ["iint_cache_size", "out of range", "1.."]),
    ("iint_cache_size=", ["iint_cache_size", "not an integer"]),
    ("pcr_idx=0x0b", ["pcr_idx", "not an integer"]),
    ("pcr_idx=true", ["pcr_idx", "not an integer"]),
    ("pcr_idx=7", ["pcr_idx", "8..14"]),
    ("staging=2", ["staging", "true, false"]),
])
def test_errors_name_the_key(setting, words):
    with pytest.raises(ProfileError) as e:
        load_profile(None, [setting])
    for w in words:
        assert w in str(e.value)


def test_integers_and_banks():
    p = load_profile(None, ["pcr_idx= 11 ", "iint_cache_size=1", "tpm_banks=sha384, sha512,sm3"])
    assert (p.pcr_idx, p.iint_cache_size, p.tpm_banks) == (11, 1, ("sha384", "sha512", "sm3"))
    assert load_profile(None, ["tpm_banks=none"]).tpm_banks == ()


def test_bad_toml(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("kernel = \n")
    with pytest.raises(ProfileError, match="p.toml"):
        load_profile(str(f))
    with pytest.raises(ProfileError, match="missing"):
        load_profile(str(tmp_path / "missing.toml"))
    f.write_bytes('uts_release = "caf\u00e9"\n'.encode("latin-1"))
    with pytest.raises(ProfileError, match=r"p\.toml: not UTF-8 text.*0xe9 at offset 18"):
        load_profile(str(f))


@pytest.mark.parametrize("toml,words", [
    ("iint_cache_size = 1.7", ["iint_cache_size", "1.7 is not an integer"]),
    ("iint_cache_size = 2.0", ["iint_cache_size", "2.0 is not an integer"]),
    ("pcr_idx = true", ["pcr_idx", "True is not an integer"]),
    ("pcr_idx = 15", ["pcr_idx", "8..14"]),
    ("staging = 1", ["staging", "1 is not a boolean", "true, false"]),
    ("kexec = [true]", ["kexec", "[True] is not a boolean"]),
    ("kernel = 7.2", ["kernel", "7.2 is not a string"]),
    ("ima_hash = [\"sha256\"]", ["ima_hash", "['sha256'] is not a string"]),
    ("ima_template = 1", ["ima_template", "not a string"]),
    ("ima_template_fmt = false", ["ima_template_fmt", "not a string"]),
    ("abi = {v = 7}", ["abi", "not a string"]),
    ("ima_policy = [\"tcb\"]", ["ima_policy", "not a string"]),
    ("uts_release = 6", ["uts_release", "not a string"]),
    ("kernel_log = 1979-05-27", ["kernel_log", "not a string"]),
    ("tpm_banks = []", ["tpm_banks", "empty", "none"]),
    ("tpm_banks = [\"sha1\", 256]", ["tpm_banks", "neither a list of bank names"]),
    ("tpm_banks = 256", ["tpm_banks", "neither a list of bank names"]),
    ("tpm_banks = [\"md5\"]", ["tpm_banks", "'md5' is not a TPM 2.0 PCR bank"]),
    ("boot_pcrs = \"x\"", ["boot_pcrs", "not a table"]),
    ("[boot_pcrs.sha256]\nfile = \"x\"", ["boot_pcrs.sha256", "not a file path"]),
])
def test_toml_errors_name_the_key(tmp_path, toml, words):
    f = tmp_path / "p.toml"
    f.write_text(toml + "\n")
    with pytest.raises(ProfileError) as e:
        load_profile(str(f))
    for w in words:
        assert w in str(e.value)


def test_toml_types(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text('pcr_idx = 12\niint_cache_size = 50\nstaging = false\nkernel = "6.12"\n'
                 'tpm_banks = "sha256"\nima_template_fmt = ""\n')
    p = load_profile(str(f))
    assert (p.pcr_idx, p.iint_cache_size, p.staging, p.kernel, p.tpm_banks, p.ima_template_fmt) == \
        (12, 50, False, "6.12", ("sha256",), None)


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _profile_error_in_child(profile: str | None, *overrides: str) -> str:
    """The ProfileError of load_profile, run in a child process with its stdin
    a pipe that stays open, 1 GiB of memory and a deadline, so that a regression
    that reads stdin, opens a FIFO or reads a device fails instead of hanging
    the suite."""
    code = ("import sys\n"
            "from imafs.profile import ProfileError, load_profile\n"
            "try:\n"
            "    load_profile(sys.argv[1] or None, sys.argv[2:])\n"
            "except ProfileError as e:\n"
            "    sys.exit(str(e))\n")
    r, w = os.pipe()
    try:
        out = subprocess.run([sys.executable, "-c", code, profile or "", *overrides], stdin=r,
                             capture_output=True, text=True, timeout=30, preexec_fn=_limit_memory)
    finally:
        os.close(r)
        os.close(w)
    assert out.returncode == 1, out
    return out.stderr


@pytest.mark.parametrize("value,shown", [("0", "0"), ("5", "5"), ("true", "True")])
def test_boot_pcrs_fd_number_is_not_read(tmp_path, value, shown):
    """An integer (or a bool) was once taken as a file descriptor: fd 0 read
    stdin and hung; in process, the test would close pytest's own descriptors."""
    f = tmp_path / "p.toml"
    f.write_text(f"[boot_pcrs]\nsha256 = {value}\n")
    assert f"boot_pcrs.sha256: {shown} is not a file path" in _profile_error_in_child(str(f))


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_boot_pcrs_special_files_are_not_read(tmp_path, special):
    """A FIFO would block the start, /dev/zero never ends."""
    if special == "fifo":
        special = tmp_path / "fifo"
        os.mkfifo(special)
    err = _profile_error_in_child(None, f"boot_pcrs.sha256={special}")
    assert f"boot_pcrs.sha256: {special} is not a regular file" in err


def test_boot_pcrs_file_size_and_text(tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n" * (64 * 1024 + 1))
    with pytest.raises(ProfileError, match="boot_pcrs.sha256: .*big.txt is larger than a PCR file"):
        load_profile(None, [f"boot_pcrs.sha256={big}"])
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"PCR-00: \xff\n")
    with pytest.raises(ProfileError, match=r"boot_pcrs.sha256: .*bin.txt is not a 'PCR-NN: hex' file "
                       r"\(byte 0xff at offset 8\)"):
        load_profile(None, [f"boot_pcrs.sha256={binary}"])


def test_boot_pcrs(tmp_path):
    f = tmp_path / "sha1.txt"
    f.write_text("".join(f"PCR-{i:02d}: {'%02x' % i * 20}\n" for i in range(24)))
    p = load_profile(None, [f"boot_pcrs.sha1={f}"])
    values = p.boot_pcr_values("sha1")
    assert len(values) == 10 and values[3] == bytes([3]) * 20
    bad = tmp_path / "bad.txt"
    bad.write_text("PCR-00: " + "00" * 32 + "\n")
    with pytest.raises(ProfileError, match="not sha1 digests"):
        load_profile(None, [f"boot_pcrs.sha1={bad}"])


def test_staging_needs_per_bank_files():
    with pytest.raises(ProfileError, match="staging"):
        load_profile(None, ["kernel=6.1", "staging=true"])
    assert load_profile(None, ["kernel=6.12", "staging=true"]).staging is True
