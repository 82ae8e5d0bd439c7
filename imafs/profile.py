"""The emulated kernel: Kconfig switches and boot parameters, as one profile.

A profile comes from a TOML file and ``KEY=VALUE`` overrides. Keys are named
after the kernel's. The kernel's boot-time rules are applied when the
profile is loaded, so a profile always describes what the kernel would use.

Every value is checked for its type before its meaning: a TOML value must be
the key's own type (a string, a boolean, an integer, never a float; for
``tpm_banks`` an array of strings or a comma-separated string; for
``boot_pcrs`` a table of path strings), and an override, always a string, must
spell one. A bad value is a ProfileError naming the key.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

from . import templates as T
from .keys import BOOT_KEYS, KeyringError, blacklist_entry, load_certs, parse_cert
from .tpm import parse_pcr_file

KERNELS = ("6.1", "6.12", "7.2")


class ProfileError(ValueError):
    """A bad profile key or value; the message names the key and what is allowed."""


def _str(key: str, v: Any) -> str:
    if not isinstance(v, str):
        raise ProfileError(f"{key}: {v!r} is not a string")
    return v


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    s = v.strip().lower() if isinstance(v, str) else None
    if s in ("1", "true", "yes", "on", "y"):
        return True
    if s in ("0", "false", "no", "off", "n"):
        return False
    raise ProfileError(f"{key}: {v!r} is not a boolean; allowed: true, false")


def _choice(allowed):
    def check(key: str, v: Any) -> str:
        s = _str(key, v)
        if s not in allowed:
            raise ProfileError(f"{key}: {v!r} is not allowed; allowed: {', '.join(allowed)}")
        return s
    return check


def _hash(key: str, v: Any) -> str:
    s = _str(key, v)
    try:
        T.new_hash(s)
    except T.UnknownHashError as e:
        raise ProfileError(f"{key}: {e}; allowed: {', '.join(_available(T.HASH_ALGOS))}") from None
    return s


def _available(names) -> list[str]:
    """The hash algorithms of ``names`` that this machine can compute."""
    out = []
    for name in names:
        try:
            T.new_hash(name)
            out.append(name)
        except T.UnknownHashError:
            pass
    return out


# The algorithms the kernel uses as TPM 2.0 PCR banks (tpm2_hash_map), by their
# kernel crypto names, which name the per-bank files: TPM_ALG_SM3_256 is "sm3".
TPM_BANKS = ("sha1", "sha256", "sha384", "sha512", "sm3")


def _banks(key: str, v: Any) -> tuple[str, ...]:
    if isinstance(v, str):
        items = [x.strip() for x in v.split(",")]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        items = v
    else:
        raise ProfileError(f"{key}: {v!r} is neither a list of bank names nor a comma-separated string")
    available = _available(TPM_BANKS)
    if items in ([], [""]):
        raise ProfileError(f"{key}: empty; name the PCR banks ({', '.join(available)}) "
                           "or use none for TPM-bypass")
    if items == ["none"]:
        return ()
    for b in items:
        if b not in available:
            why = "is not available on this machine" if b in TPM_BANKS else "is not a TPM 2.0 PCR bank"
            raise ProfileError(f"{key}: {b!r} {why}; allowed: {', '.join(available)}, "
                               "or none alone (TPM-bypass)")
    if len(set(items)) != len(items):
        raise ProfileError(f"{key}: a bank is listed twice in {','.join(items)}")
    return tuple(items)


def _template(key: str, v: Any) -> str:
    s = _str(key, v)
    if s not in T.BUILTIN_TEMPLATES:
        raise ProfileError(f"{key}: unknown template {s!r}; allowed: {', '.join(T.BUILTIN_TEMPLATES)}")
    return s


def _fmt(key: str, v: Any) -> str | None:
    s = _str(key, v)
    if not s:
        return None
    try:
        T.lookup_template(s)
    except T.TemplateError as e:
        raise ProfileError(f"{key}: {e}") from None
    return s


_DECIMAL = re.compile(r"[+-]?[0-9]+")


def _int_range(lo: int, hi: int):
    """An integer in lo..hi: a TOML integer, or a decimal string (``--set``).
    A bool is not an integer here, nor is a float, even 2.0."""
    def check(key: str, v: Any) -> int:
        if isinstance(v, str) and _DECIMAL.fullmatch(v.strip()):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ProfileError(f"{key}: {v!r} is not an integer; allowed: {lo}..{hi}")
        if not lo <= v <= hi:
            raise ProfileError(f"{key}: {v} out of range; allowed: {lo}..{hi}")
        return v
    return check


def _tpm(key: str, v: Any) -> str:
    """soft, swtpm, or tcti:<conf> with <conf> as tpm2-tss's TCTI loader reads it."""
    s = _str(key, v).strip()
    if s in ("soft", "swtpm"):
        return s
    if s.startswith("tcti:"):
        conf = s[5:]
        name = conf.partition(":")[0]
        if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ProfileError(f"{key}: {v!r}: expected tcti:<name>[:<config>], e.g. "
                               "tcti:swtpm:host=127.0.0.1,port=2321 or tcti:mssim:port=2321")
        return s
    raise ProfileError(f"{key}: {v!r} is not allowed; allowed: soft, swtpm, tcti:<name>[:<config>]")


def _blacklist(key: str, v: Any) -> tuple[str, ...]:
    """CONFIG_SYSTEM_BLACKLIST_HASH_LIST: bin:<hex>/tbs:<hex> entries, as a
    list of strings or one comma-separated string."""
    if isinstance(v, str):
        items = [x for x in (x.strip() for x in v.split(",")) if x]
    elif isinstance(v, list) and all(isinstance(x, str) for x in v):
        items = v
    else:
        raise ProfileError(f"{key}: {v!r} is neither a list of bin:/tbs: entries nor a comma-separated string")
    try:
        return tuple(blacklist_entry(x) for x in items)
    except KeyringError as e:
        raise ProfileError(f"{key}: {e}") from None


BUILTIN_POLICIES = ("tcb", "appraise_tcb", "secure_boot", "critical_data", "fail_securely")


def _policy(key: str, v: Any) -> str:
    names = [n for n in _str(key, v).split("|") if n]
    for n in names:
        if n not in BUILTIN_POLICIES:
            raise ProfileError(f"{key}: unknown built-in policy {n!r}; allowed: {', '.join(BUILTIN_POLICIES)}")
    return "|".join(names)


# key -> parser; one line per key
KEYS = {
    "kernel": _choice(KERNELS),
    "ima_hash": _hash,
    "ima_template": _template,
    "ima_template_fmt": _fmt,
    "ima_canonical_fmt": _bool,
    "tpm_banks": _banks,
    "pcr_idx": _int_range(8, 14),
    "disable_htable": _bool,
    "staging": _bool,
    "abi": _choice(("v7", "v5")),
    "ima_flush_htable": _bool,
    "kexec": _bool,
    "ima_policy": _policy,
    "ima_appraise": _choice(("enforce", "fix", "log", "off")),
    "uts_release": _str,
    "read_policy": _bool,
    "write_policy": _bool,
    "appraise_modsig": _bool,
    "kernel_log": _str,
    "violation_limits": _bool,
    "iint_cache_size": _int_range(1, 1 << 40),
    "tpm": _tpm,
    "allow_hardware_tpm": _bool,
    "event_log": _str,
    "integrity_trusted_keyring": _bool,
    "ima_keyrings_permit_signed_by_builtin_or_secondary": _bool,
    "builtin_trusted_keys": _str,
    "machine_keys": _str,
    "platform_keys": _str,
    "blacklist_hashes": _blacklist,
    "key_queue_timeout": _int_range(0, 1 << 31),
}


@dataclass(frozen=True)
class Profile:
    kernel: str = "7.2"
    ima_hash: str = "sha256"
    ima_template: str = "ima-ng"
    ima_template_fmt: str | None = None
    ima_canonical_fmt: bool = False
    tpm_banks: tuple[str, ...] = ("sha1", "sha256")
    boot_pcrs: tuple[tuple[str, tuple[bytes, ...]], ...] = ()
    pcr_idx: int = 10
    disable_htable: bool = False
    staging: bool | None = None  # CONFIG_IMA_STAGING; None: on for kernel >= 7.2
    abi: str = "v7"  # the staging ABI: v7 (merged in 7.2) or v5 (as posted 29 Apr 2026)
    ima_flush_htable: bool = False
    kexec: bool = True  # CONFIG_IMA_KEXEC: binary_runtime_size is tracked
    ima_policy: str = ""  # built-in policies, "|"-separated; "" = the empty default policy
    ima_appraise: str = "enforce"  # what failed appraisals do (docs/appraisal.md); no secure boot overrides it
    uts_release: str = ""  # the kernel release string (kernel_version record); "" = "<kernel>.0-imafs"
    read_policy: bool = False  # CONFIG_IMA_READ_POLICY
    write_policy: bool = False  # CONFIG_IMA_WRITE_POLICY
    appraise_modsig: bool = False  # CONFIG_IMA_APPRAISE_MODSIG: appraise_type=imasig|modsig
    kernel_log: str = ""  # file of the kernel's log lines; "" = beside the control socket
    # one open_writers per writers-open period and one ToMToU per measured reader
    # (v6.15, backported to Debian's 6.12.117); None: on for kernel >= 6.12
    violation_limits: bool | None = None
    iint_cache_size: int = 100_000  # inodes with IMA state kept; more evict closed ones
    tpm: str = "soft"  # soft | swtpm | tcti:<conf> (docs/tpm.md)
    allow_hardware_tpm: bool = False  # tcti:device / tcti:tabrmd extend a real PCR 10
    event_log: str = ""  # a TCG2 boot event log replayed at boot; "" = synthetic (swtpm), none (tcti)
    integrity_trusted_keyring: bool = False  # CONFIG_INTEGRITY_TRUSTED_KEYRING: .ima, restricted
    # CONFIG_IMA_KEYRINGS_PERMIT_SIGNED_BY_BUILTIN_OR_SECONDARY: .machine keys may vouch too
    ima_keyrings_permit_signed_by_builtin_or_secondary: bool = False
    builtin_trusted_keys: str = ""  # PEM/DER certificates loaded onto .builtin_trusted_keys at boot
    machine_keys: str = ""  # PEM/DER certificates loaded onto .machine at boot (MOK keys)
    platform_keys: str = ""  # PEM/DER certificates loaded onto .platform at boot (UEFI db)
    blacklist_hashes: tuple[str, ...] = ()  # CONFIG_SYSTEM_BLACKLIST_HASH_LIST: bin:/tbs: entries
    key_queue_timeout: int = 300  # seconds keys wait for a custom policy (ima_queue_keys.c: 5 min)
    boot_certs: tuple[tuple[str, tuple[bytes, ...]], ...] = ()  # (keyring, DER certificates) loaded at boot
    explicit: frozenset[str] = field(default=frozenset(), compare=False)
    boot_log: tuple[str, ...] = field(default=(), compare=False)  # what parsing the boot parameters printed

    @property
    def kernel_version(self) -> tuple[int, int]:
        major, minor = self.kernel.split(".")
        return int(major), int(minor)

    @property
    def template(self) -> T.Template:
        """The boot template: ima_template_fmt wins over ima_template and keeps
        the name "" even when it spells a built-in's format, as in the kernel."""
        if self.ima_template_fmt:
            return T.Template("", self.ima_template_fmt, T.lookup_template(self.ima_template_fmt).fields)
        return T.lookup_template(self.ima_template)

    @property
    def release(self) -> str:
        return self.uts_release or f"{self.kernel}.0-imafs"

    def boot_pcr_values(self, bank: str) -> list[bytes]:
        return list(dict(self.boot_pcrs).get(bank, ()))


def _resolve_violation_limits(p: Profile) -> Profile:
    """Debian's 6.12.117 already limits violations (kernel-observed.md F-15)."""
    if p.violation_limits is None:
        return replace(p, violation_limits=p.kernel_version >= (6, 12))
    return p


def _resolve_staging(p: Profile) -> Profile:
    if p.staging is None:
        return replace(p, staging=p.kernel_version >= (7, 2))
    if p.staging and p.kernel_version < (6, 10):
        raise ProfileError("staging: needs the per-bank files of kernel >= 6.10; "
                           f"kernel is {p.kernel}; allowed: false, or kernel 6.12 or 7.2")
    return p


def _apply_boot_rules(p: Profile) -> Profile:
    """ima_template=ima needs a sha1 or md5 IMA hash (kernel-observed.md F-12):
    with the default hash the kernel switches the hash to sha1; with a hash
    given explicitly it keeps that hash and the default template."""
    if p.ima_template_fmt is None and p.ima_template == "ima" and p.ima_hash not in ("sha1", "md5"):
        if "ima_hash" in p.explicit:  # ima_template_setup()
            return replace(p, ima_template=Profile.ima_template,
                           boot_log=("ima: template does not support hash alg",))
        # init_ima()'s hash_setup(CONFIG_IMA_DEFAULT_HASH); its pr_err has no newline
        return replace(p, ima_hash="sha1",
                       boot_log=(f'ima: invalid hash algorithm "{p.ima_hash}" for template "ima"',))
    return p


# A PCR file is 24 lines of at most 137 bytes ("PCR-23: " and a sha512 value).
_PCR_FILE_MAX = 64 * 1024


def _check_regular(key: str, path: str, mode: int) -> None:
    if not stat.S_ISREG(mode):
        raise ProfileError(f"{key}: {path} is not a regular file")


def _read_regular(key: str, path: str, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of a regular file named by the profile. Only a
    regular file is opened: a FIFO would block the daemon's start, a device
    like /dev/zero never ends, and opening some devices does something; so
    stat first, and check the opened file again."""
    try:
        _check_regular(key, path, os.stat(path).st_mode)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            _check_regular(key, path, os.fstat(fd).st_mode)
            return f.read(limit + 1)
    except OSError as e:
        raise ProfileError(f"{key}: cannot read {path}: {e.strerror}") from None


def _read_pcr_file(key: str, path: Any) -> str:
    """The text of a PCR file (a regular file: see _read_regular)."""
    if not isinstance(path, str) or not path:
        raise ProfileError(f"{key}: {path!r} is not a file path; expected the path of a "
                           "'PCR-NN: hex' file")
    data = _read_regular(key, path, _PCR_FILE_MAX)
    if len(data) > _PCR_FILE_MAX:
        raise ProfileError(f"{key}: {path} is larger than a PCR file can be ({_PCR_FILE_MAX} bytes)")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        raise ProfileError(f"{key}: {path} is not a 'PCR-NN: hex' file "
                           f"(byte 0x{data[e.start]:02x} at offset {e.start})") from None


# A certificate file holds a few certificates of a few kilobytes each.
_CERT_FILE_MAX = 1 << 20


def _load_certs(key: str, path: str) -> tuple[bytes, ...]:
    """The DER certificates of a PEM (one or more) or DER file, each checked
    as the kernel's X.509 parser would take it."""
    data = _read_regular(key, path, _CERT_FILE_MAX)
    if len(data) > _CERT_FILE_MAX:
        raise ProfileError(f"{key}: {path} is larger than {_CERT_FILE_MAX} bytes; expected X.509 certificates")
    try:
        certs = load_certs(data)
        for der in certs:
            parse_cert(der)
    except KeyringError as e:
        raise ProfileError(f"{key}: {path}: {e}") from None
    return tuple(certs)


def _load_boot_pcrs(key: str, bank: str, path: Any, banks: tuple[str, ...]):
    if bank not in banks:
        raise ProfileError(f"{key}: {bank!r} is not a TPM bank of this profile ({','.join(banks) or 'none'})")
    text = _read_pcr_file(key, path)
    try:
        values = parse_pcr_file(text)
    except ValueError as e:
        raise ProfileError(f"{key}: {path}: {e}") from None
    size = T.digest_size(bank)
    if any(len(v) != size for v in values):
        raise ProfileError(f"{key}: {path} holds values that are not {bank} digests ({size} bytes)")
    return tuple(values[:10])


def load_profile(path: str | None = None, overrides: Sequence[str] = ()) -> Profile:
    raw: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except OSError as e:
            raise ProfileError(f"profile {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise ProfileError(f"profile {path}: not UTF-8 text, as TOML must be "
                               f"(byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except tomllib.TOMLDecodeError as e:
            raise ProfileError(f"profile {path}: {e}") from None
    pcr_files = raw.pop("boot_pcrs", {})
    if not isinstance(pcr_files, dict):
        raise ProfileError(f"boot_pcrs: {pcr_files!r} is not a table; expected a [boot_pcrs] "
                           'table of <bank> = "FILE" lines')
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ProfileError(f"{item!r}: expected KEY=VALUE")
        if key.startswith("boot_pcrs."):
            pcr_files[key.split(".", 1)[1]] = value
        else:
            raw[key] = value
    values = {}
    for key, value in raw.items():
        if key not in KEYS:
            raise ProfileError(f"unknown profile key {key!r}; known keys: "
                               f"{', '.join(KEYS)}, boot_pcrs.<bank>")
        values[key] = KEYS[key](key, value)
    p = Profile(**values, explicit=frozenset(values))
    boot = tuple((bank, _load_boot_pcrs(f"boot_pcrs.{bank}", bank, file, p.tpm_banks))
                 for bank, file in pcr_files.items())
    _check_tpm(p, boot)
    p = replace(p, boot_certs=tuple((ring, _load_certs(key, getattr(p, key)))
                                    for ring, key in BOOT_KEYS.items() if getattr(p, key)))
    return _resolve_violation_limits(_resolve_staging(_apply_boot_rules(replace(p, boot_pcrs=boot))))


HARDWARE_TCTIS = ("device", "tabrmd")  # TCTIs that reach a real TPM


def _check_tpm(p: Profile, boot) -> None:
    """A TPM backend needs banks and takes PCR 0-9 from the TPM; a hardware
    TPM only when allowed (extending its PCR 10 cannot be undone)."""
    if p.tpm == "soft":
        if p.event_log:
            raise ProfileError("event_log: a boot event log is replayed into a TPM; it needs "
                               "tpm = swtpm or tcti:<conf>")
        return
    if not p.tpm_banks:
        raise ProfileError(f"tpm: {p.tpm!r} with tpm_banks = none (TPM-bypass); "
                           "name the banks, or use tpm = soft")
    if boot:
        raise ProfileError(f"boot_pcrs: PCR 0-9 come from the TPM with tpm = {p.tpm!r}; "
                           "boot_pcrs needs tpm = soft")
    name = p.tpm[5:].partition(":")[0] if p.tpm.startswith("tcti:") else ""
    if name in HARDWARE_TCTIS and not p.allow_hardware_tpm:
        raise ProfileError(f"tpm: {p.tpm!r} reaches a hardware TPM, whose PCR 10 imafs would "
                           "extend for good; set allow_hardware_tpm = true to allow it")


def profile_to_dict(p: Profile) -> dict:
    out = {f.name: getattr(p, f.name) for f in fields(p) if f.name not in ("explicit", "boot_log", "boot_pcrs",
                                                                            "boot_certs")}
    out["blacklist_hashes"] = list(p.blacklist_hashes)
    out["tpm_banks"] = ",".join(p.tpm_banks) or "none"
    out["boot_pcrs"] = {b: [v.hex() for v in vals] for b, vals in p.boot_pcrs}
    return out
