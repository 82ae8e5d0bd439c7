"""Appraisal (the kernel's ima_appraise.c and the appraise part of
process_measurement in ima_main.c): whether a file's ``security.ima``
vouches for the content just hashed, and what happens when it does not.

:class:`Appraiser` holds the ``ima_appraise=`` mode and the signature
verifier; :meth:`Appraiser.appraise` is ima_appraise_measurement over plain
values (the rule's flags, the xattr, the collected digest) and returns a
:class:`Verdict`.  The caller — :class:`imafs.measure.Measurer` — reads the
xattr, collects the digest, writes a fixed hash back (``fix`` mode) in its
blocking steps and caches the verdict in the iint, as the kernel does under
iint->mutex.

Decision: imafs emulates no EVM (``evm_verifyxattr`` answers
INTEGRITY_UNKNOWN, as on a kernel whose EVM has no key loaded) and no
SB_I_IMA_UNVERIFIABLE_SIGNATURE: a measured mount stands for the source
directory's own filesystem, not for FUSE (docs/appraisal.md).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from . import digsig as D
from .iint import IMA_APPRAISED
from .policy import HookEvent, Rule

# ima_appraise (the boot parameter's values)
APPRAISE_ENFORCE, APPRAISE_FIX, APPRAISE_LOG = 0x01, 0x02, 0x04
MODES = {"enforce": APPRAISE_ENFORCE, "fix": APPRAISE_FIX, "log": APPRAISE_LOG, "off": 0}
# enum integrity_status
PASS, PASS_IMMUTABLE, FAIL, FAIL_IMMUTABLE, NOLABEL, NOXATTRS, UNKNOWN = range(7)
# rule flags kept in iint->flags (the kernel's IMA_NONACTION_FLAGS)
DIGSIG_REQUIRED = 0x01000000
PERMIT_DIRECTIO = 0x02000000
NEW_FILE = 0x04000000
SIGV3_REQUIRED = 0x08000000
MODSIG_ALLOWED = 0x20000000
CHECK_BLACKLIST = 0x40000000
VERITY_REQUIRED = 0x80000000
# get_subaction: the appraise sub-action of each hook kind
_SUBACTION = {"MMAP_CHECK": 0x4000, "MMAP_CHECK_REQPROT": 0x4000, "BPRM_CHECK": 0x10000,
              "CREDS_CHECK": 0x100000, "FILE_CHECK": 0x1000}
READ_APPRAISE = 0x40000
FILE_APPRAISE = 0x1000


def appraised_flags(func: str) -> int:
    """ima_cache_flags: what a passed appraisal of ``func``'s kind marks done."""
    return IMA_APPRAISED | _SUBACTION.get(func, READ_APPRAISE) << 1


def appraise_decision(rules: list[Rule], ev: HookEvent) -> Rule | None:
    """The first matching appraise/dont_appraise rule, if any (the appraise
    category of ima_match_policy)."""
    for r in rules:
        if r.action in ("appraise", "dont_appraise") and r.matches(ev):
            return r
    return None


def rule_flags(rule: Rule, kernel_version: tuple[int, int]) -> int:
    """The non-action flags a rule contributes (ima_parse_rule)."""
    flags = 0
    if rule.appraise_type:
        flags |= DIGSIG_REQUIRED | CHECK_BLACKLIST
        if rule.appraise_type == "imasig|modsig":
            flags |= MODSIG_ALLOWED
        if rule.appraise_type == "sigv3" and kernel_version >= (7, 1):
            flags |= SIGV3_REQUIRED
    if rule.digest_type == "verity":
        flags |= VERITY_REQUIRED
    if rule.permit_directio:
        flags |= PERMIT_DIRECTIO
    return flags


def subaction(rule: Rule, func: str) -> int:
    """get_subaction: a rule without func= appraises as FILE_CHECK for every hook."""
    if rule.func is None:
        return FILE_APPRAISE
    return _SUBACTION.get(func, READ_APPRAISE)


@dataclass
class Verdict:
    """What ima_appraise_measurement decided."""

    status: int
    cause: str = ""
    rc: int = 0  # the integrity_audit_msg result (res= is its negation)
    audit: bool = False  # an appraise_data record is due
    fix: bytes | None = None  # the hash to write to security.ima (fix mode)
    digsig: bool | None = None  # the new state of the IMA_DIGSIG atomic flag, if it changes

    @property
    def passed(self) -> bool:
        return self.status == PASS


class Appraiser:
    """``mode``: the ``ima_appraise=`` value; ``verifier``: a
    :class:`imafs.digsig.Verifier` over the emulated keyrings."""

    def __init__(self, mode: str, verifier: D.Verifier, kernel_version: tuple[int, int]):
        self.mode = MODES[mode]
        self.verifier = verifier
        self.kv = kernel_version

    @property
    def enforcing(self) -> bool:
        return bool(self.mode & APPRAISE_ENFORCE)

    def appraise(self, func: str, flags: int, xattr: bytes | None, algo: str, digest: bytes, *,
                 size: int, created: bool = False) -> Verdict:
        """ima_appraise_measurement: ``flags`` are the iint's (rule flags
        included), ``xattr`` the security.ima read (None: none), ``algo`` and
        ``digest`` the collected hash, ``size`` the file's size."""
        if not xattr:
            cause = ("verity-signature-required" if flags & VERITY_REQUIRED else "IMA-signature-required") \
                if flags & DIGSIG_REQUIRED else "missing-hash"
            v = Verdict(NOLABEL, cause, -errno.ENODATA)
            new_file = created or flags & NEW_FILE
            if new_file and (not flags & DIGSIG_REQUIRED or size == 0):
                v.status = PASS
        else:
            v = self._xattr_verify(func, flags, xattr, algo, digest)
        if v.status != PASS:
            if self.mode & APPRAISE_FIX and (not xattr or xattr[0] != D.EVM_IMA_XATTR_DIGSIG):
                v.fix = D.hash_xattr(algo, digest)  # the caller writes it; PASS if that works
            v.audit = True
        return v

    def _xattr_verify(self, func: str, flags: int, xattr: bytes, algo: str, digest: bytes) -> Verdict:
        kind = xattr[0]
        required = "verity-signature-required" if flags & VERITY_REQUIRED else "IMA-signature-required"
        if kind in (D.IMA_XATTR_DIGEST_NG, D.IMA_XATTR_DIGEST):
            if flags & DIGSIG_REQUIRED:
                return Verdict(FAIL, required, -errno.EINVAL)
            start = 2 if kind == D.IMA_XATTR_DIGEST_NG else 1
            stored = xattr[start:start + len(digest)]
            if len(xattr) - start < len(digest):
                return Verdict(FAIL, "invalid-hash", -errno.EINVAL, digsig=False)
            if stored != digest:
                return Verdict(FAIL, "invalid-hash", 1, digsig=False)
            return Verdict(PASS, digsig=False)
        if kind == D.EVM_IMA_XATTR_DIGSIG:
            if flags & (DIGSIG_REQUIRED | VERITY_REQUIRED) == DIGSIG_REQUIRED | VERITY_REQUIRED:
                return Verdict(FAIL, "verity-signature-required", -errno.EINVAL, digsig=True)
            version = xattr[1] if len(xattr) > 1 else 0
            if version >= (4 if self.kv >= (7, 1) else 3):
                return Verdict(FAIL, "invalid-signature-version", -errno.EINVAL, digsig=True)
            if flags & SIGV3_REQUIRED and version != 3:
                return Verdict(FAIL, "IMA-sigv3-required", -errno.EINVAL, digsig=True)
            signed = D.file_id_hash(kind, algo, digest) if version == 3 else digest
            rc = self.verifier.verify(".ima", xattr, signed)
            if rc == -errno.EOPNOTSUPP:
                return Verdict(UNKNOWN, "unknown", rc, digsig=True)
            if rc and func == "KEXEC_KERNEL_CHECK":  # CONFIG_INTEGRITY_PLATFORM_KEYRING: the firmware's keys too
                rc = self.verifier.verify(".platform", xattr, signed)
            return Verdict(FAIL, "invalid-signature", rc, digsig=True) if rc else Verdict(PASS, digsig=True)
        if kind == D.IMA_VERITY_DIGSIG:
            if flags & DIGSIG_REQUIRED and not flags & VERITY_REQUIRED:
                return Verdict(FAIL, "IMA-signature-required", -errno.EINVAL, digsig=True)
            if len(xattr) < 2 or xattr[1] != 3:
                return Verdict(FAIL, "invalid-signature-version", -errno.EINVAL, digsig=True)
            rc = self.verifier.verify(".ima", xattr, D.file_id_hash(kind, algo, digest))
            return Verdict(FAIL, "invalid-verity-signature", rc, digsig=True) if rc else Verdict(PASS, digsig=True)
        return Verdict(UNKNOWN, "unknown-ima-data", -errno.EINVAL)

