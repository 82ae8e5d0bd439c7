"""The profile: defaults, TOML, overrides, boot rules and clear errors."""

from __future__ import annotations

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
])
def test_errors_name_the_key(setting, words):
    with pytest.raises(ProfileError) as e:
        load_profile(None, [setting])
    for w in words:
        assert w in str(e.value)


def test_bad_toml(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text("kernel = \n")
    with pytest.raises(ProfileError, match="p.toml"):
        load_profile(str(f))
    with pytest.raises(ProfileError, match="missing"):
        load_profile(str(tmp_path / "missing.toml"))


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
