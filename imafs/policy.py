"""IMA policy rules (the kernel's ima_policy.c): parse, validate, print,
match, and the built-in policies.

Facts: kernel-abi.md §1.5–1.6 and §5.2, kernel-observed.md F-7 and R-1/R-2.
Behaviour that changed between kernels follows the profile's version.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import uuid
from dataclasses import dataclass, field

from . import templates as T
from .blocking import Blocking, Exclusive, Steps, no_steps
from .errors import FsError
from .klog import KernelLog, Subject

ACTIONS = ("measure", "dont_measure", "appraise", "dont_appraise", "audit", "dont_audit",
           "hash", "dont_hash")
FUNCS = {
    "FILE_CHECK": "FILE_CHECK", "PATH_CHECK": "FILE_CHECK", "MODULE_CHECK": "MODULE_CHECK",
    "FIRMWARE_CHECK": "FIRMWARE_CHECK", "FILE_MMAP": "MMAP_CHECK", "MMAP_CHECK": "MMAP_CHECK",
    "MMAP_CHECK_REQPROT": "MMAP_CHECK_REQPROT", "BPRM_CHECK": "BPRM_CHECK",
    "CREDS_CHECK": "CREDS_CHECK", "KEXEC_KERNEL_CHECK": "KEXEC_KERNEL_CHECK",
    "KEXEC_INITRAMFS_CHECK": "KEXEC_INITRAMFS_CHECK", "POLICY_CHECK": "POLICY_CHECK",
    "KEXEC_CMDLINE": "KEXEC_CMDLINE", "KEY_CHECK": "KEY_CHECK", "CRITICAL_DATA": "CRITICAL_DATA",
    "SETXATTR_CHECK": "SETXATTR_CHECK",
}
BUFFER_FUNCS = ("KEXEC_CMDLINE", "KEY_CHECK", "CRITICAL_DATA")
MASKS = {"MAY_EXEC": 0x1, "MAY_WRITE": 0x2, "MAY_READ": 0x4, "MAY_APPEND": 0x8}
ID_KEYS = ("uid", "euid", "gid", "egid", "fowner", "fgroup")
LSM_KEYS = ("obj_user", "obj_role", "obj_type", "subj_user", "subj_role", "subj_type")
# hashes a Debian kernel has built in; sha512 is a module on 6.1 (F-7)
BUILTIN_HASHES_61 = ("md5", "sha1", "sha256", "sha224")


@dataclass(frozen=True)
class Rule:
    action: str
    func: str | None = None
    mask: str | None = None  # "MAY_READ" or "^MAY_READ"
    fsmagic: int | None = None
    fsname: str | None = None
    fs_subtype: str | None = None
    keyrings: tuple[str, ...] | None = None
    label: tuple[str, ...] | None = None
    pcr: int | None = None
    fsuuid: str | None = None
    ids: tuple[tuple[str, str, int], ...] = ()  # (key, op, value), e.g. ("euid", "=", 0)
    appraise_algos: tuple[str, ...] | None = None
    lsm: tuple[tuple[str, str], ...] = ()
    template: T.Template | None = None
    appraise_type: str | None = None
    digest_type: str | None = None
    permit_directio: bool = False
    text: str = field(default="", compare=False)

    @property
    def inert(self) -> bool:
        """A rule with an LSM label: there is no LSM here, so it never matches
        and is not printed (R-2)."""
        return bool(self.lsm)

    def render(self) -> str:
        """The rule as the kernel prints it when the policy is read (§1.6)."""
        out = [self.action + " "]
        if self.func:
            out.append(f"func={self.func} ")
        if self.mask:
            out.append(f"mask={self.mask} ")
        if self.fsmagic is not None:
            out.append(f"fsmagic={self.fsmagic:#x} ")
        if self.fsname:
            out.append(f"fsname={self.fsname} ")
        if self.fs_subtype:
            out.append(f"fs_subtype={self.fs_subtype} ")
        if self.keyrings:
            out.append(f"keyrings={'|'.join(self.keyrings)} ")
        if self.label:
            out.append(f"label={'|'.join(self.label)} ")
        if self.pcr is not None:
            out.append(f"pcr={self.pcr} ")
        if self.fsuuid:
            out.append(f"fsuuid={self.fsuuid} ")
        ids = {k: (op, v) for k, op, v in self.ids}
        for k in ID_KEYS:
            if k in ids:
                out.append(f"{k}{ids[k][0]}{ids[k][1]} ")
        if self.appraise_algos:
            order = list(T.HASH_ALGOS)
            out.append(f"appraise_algos={','.join(sorted(self.appraise_algos, key=order.index))} ")
        if self.template:
            out.append(f"template={self.template.name or self.template.fmt} ")
        if self.appraise_type:
            out.append(f"appraise_type={self.appraise_type} ")
        if self.digest_type:
            out.append(f"digest_type={self.digest_type} ")
        if self.permit_directio:
            out.append("permit_directio ")
        return "".join(out) + "\n"

    # -- matching (ima_match_rules) ------------------------------------------------
    def matches(self, ev: "HookEvent") -> bool:
        if self.inert:
            return False
        if self.func:
            if self.func != ev.func:
                return False
        elif ev.func in BUFFER_FUNCS:
            return False  # buffer hooks need an explicit func=
        if self.mask:
            bits = MASKS[self.mask.lstrip("^")]
            if self.mask.startswith("^"):
                if not ev.mask & bits:
                    return False
            elif ev.mask != bits:
                return False
        if self.fsmagic is not None and self.fsmagic != ev.fsmagic:
            return False
        if self.fsname is not None and self.fsname != ev.fsname:
            return False
        if self.fs_subtype is not None and self.fs_subtype != ev.fs_subtype:
            return False
        if self.fsuuid is not None and self.fsuuid != ev.fsuuid:
            return False
        if self.keyrings is not None and (ev.keyring is None or ev.keyring not in self.keyrings):
            return False
        if self.label is not None and (ev.label is None or ev.label not in self.label):
            return False
        for key, op, value in self.ids:
            if not _id_matches(key, op, value, ev):
                return False
        return True


def _cmp(op: str, have: int | None, want: int) -> bool:
    if have is None:
        return False
    return have == want if op == "=" else have > want if op == ">" else have < want


def _id_matches(key: str, op: str, value: int, ev: "HookEvent") -> bool:
    if key in ("euid", "egid"):
        # with CAP_SETUID/CAP_SETGID the real and saved ids count too (§5.2)
        real, eff, saved, cap = ((ev.uid, ev.euid, ev.suid, ev.cap_setuid) if key == "euid"
                                 else (ev.gid, ev.egid, ev.sgid, ev.cap_setgid))
        if cap:
            return any(_cmp(op, x, value) for x in (eff, saved, real))
        return _cmp(op, eff, value)
    return _cmp(op, getattr(ev, key), value)


@dataclass
class HookEvent:
    """One hook call as the policy sees it."""

    func: str
    mask: int = 0
    uid: int | None = None
    euid: int | None = None
    suid: int | None = None
    gid: int | None = None
    egid: int | None = None
    sgid: int | None = None
    cap_setuid: bool = False
    cap_setgid: bool = False
    fowner: int | None = None
    fgroup: int | None = None
    fsmagic: int | None = None
    fsname: str | None = None
    fs_subtype: str | None = None
    fsuuid: str | None = None
    keyring: str | None = None
    label: str | None = None


# -- parsing (ima_parse_rule) ---------------------------------------------------------
_TOKEN = re.compile(r"([a-z_]+)(=|<|>)(.*)", re.S)
_DEC = re.compile(r"\+?[0-9]+")
# the kernel's "key=%s" tokens; ID_KEYS also take < and >
OPTION_KEYS = ("func", "mask", "fsmagic", "fsname", "fsuuid", *ID_KEYS, "keyrings", "label", "pcr", "template",
               "appraise_type", "appraise_flag", "appraise_algos", "digest_type", *LSM_KEYS)


@dataclass
class RuleLog:
    """What ima_parse_rule logs for one rule, in the kernel's order: the
    messages it prints as it goes (``ima: …``), then the fields of its
    AUDIT_INTEGRITY_POLICY_RULE record: every token as it was parsed, up to
    and including the one that failed (``permit_directio`` is never logged,
    a token the kernel does not know is ``UNKNOWN=<token>``)."""

    messages: list[str] = field(default_factory=list)
    fields: list[str] = field(default_factory=list)


class Parser:
    """Parses rule lines the way the kernel of ``profile`` does.

    ``template`` is the boot template, which rules without ``template=`` use.
    One parser lives as long as one boot: notices the kernel prints once per
    boot are printed once per parser.
    """

    def __init__(self, kernel_version: tuple[int, int], modsig: bool = False,
                 template: T.Template = T.BUILTIN_TEMPLATES["ima-ng"]):
        self.kv = kernel_version
        self.modsig = modsig
        self.template = template
        self.actions = ACTIONS if kernel_version >= (6, 19) else tuple(a for a in ACTIONS if a != "dont_audit")
        self.keys = OPTION_KEYS + (("fs_subtype",) if kernel_version >= (6, 19) else ())
        self._modsig_checked = False
        self._verity_noted = False

    def parse(self, line: str, lsm_rejected: bool, log: RuleLog | None = None) -> Rule | None:
        """One line (without its newline). None for blank and comment lines,
        which the kernel skips before it starts a rule (and its record).

        ``lsm_rejected``: the boot policy is still active, so a rule with an
        undefined LSM label is refused (R-2).  ``log`` receives what the
        kernel logs while parsing, whether the rule is accepted or not."""
        log = RuleLog() if log is None else log
        line = line.lstrip(" \t")
        if not line or line.startswith("#"):
            return None
        fields: dict = {"ids": [], "lsm": []}
        action = None
        seen: set[str] = set()
        for tok in re.split(r"[ \t]+", line):
            if not tok:
                continue
            if tok.startswith("#") and self.kv >= (6, 14):
                break  # a suffix comment; before 6.14 an unknown token
            if tok in self.actions:
                log.fields.append(f"action={tok}")
                if action is not None:
                    raise FsError(errno.EINVAL, f"a second action {tok}")
                action = tok
                continue
            if tok == "permit_directio":
                fields["permit_directio"] = True
                continue
            m = _TOKEN.fullmatch(tok)
            if not m or not m[3] or m[1] not in (self.keys if m[2] == "=" else ID_KEYS):
                log.fields.append(f"UNKNOWN={tok}")
                raise FsError(errno.EINVAL, f"unknown token {tok!r}")
            log.fields.append(tok)
            self._option(*m.groups(), action, fields, seen, lsm_rejected, log)
        if action is None:
            raise FsError(errno.EINVAL, "no action")
        rule = Rule(action=action, **{k: (tuple(v) if isinstance(v, list) else v)
                                      for k, v in fields.items()}, text=line)
        self._validate(rule)
        self._notices(rule, log)
        return rule

    def _option(self, key, op, value, action, fields, seen, lsm_rejected, log) -> None:
        def once(name=key):
            if name in seen:
                raise FsError(errno.EINVAL, f"{name} given twice")
            seen.add(name)

        def bad(why=""):
            raise FsError(errno.EINVAL, why or f"bad {key}{op}{value}")

        if key == "func":
            once()
            func = FUNCS.get(value)
            if func is None or (func == "MMAP_CHECK_REQPROT" and self.kv < (6, 4)):
                bad()
            fields["func"] = func
        elif key == "mask":
            once()
            if value.lstrip("^") not in MASKS:
                bad()
            fields["mask"] = value
        elif key == "fsmagic":
            once()
            if not re.fullmatch(r"(0[xX])?[0-9a-fA-F]+", value):
                bad()
            fields["fsmagic"] = int(value, 16)
        elif key == "fsname":
            fields[key] = value  # a repeated fsname= is accepted: the last wins
        elif key == "fs_subtype":
            once()
            fields[key] = value
        elif key == "fsuuid":
            once()
            if not re.fullmatch(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}", value):
                bad()
            fields["fsuuid"] = str(uuid.UUID(value))
        elif key in ID_KEYS:
            once(key.removeprefix("e"))  # uid and euid share one slot of the rule, gid and egid another
            if not _DEC.fullmatch(value) or int(value) >= 0xFFFFFFFF:
                bad()  # not a valid kuid/kgid
            fields["ids"].append((key, op, int(value)))
        elif key in ("keyrings", "label"):
            once()
            items = value.split("|")
            if not all(items):
                bad("empty item")
            fields[key] = items
        elif key == "pcr":
            if not _DEC.fullmatch(value) or int(value) > 63:
                bad()
            fields["pcr"] = int(value)  # a repeated pcr= is accepted: the last wins
        elif key == "template":
            once()
            if action != "measure":
                bad()
            try:
                fields["template"] = T.lookup_template(value)
            except T.TemplateError:
                bad(f"unknown template {value}")
        elif key == "appraise_type":
            once()
            allowed = ["imasig", "sigv3"] + (["imasig|modsig"] if self.modsig else [])
            if value not in allowed:
                bad()
            if self.kv < (7, 1) and (value == "sigv3") != ("digest_type" in fields):
                bad("before 7.1, sigv3 needs digest_type=verity before it, and the other types refuse it")
            fields["appraise_type"] = value
        elif key == "appraise_flag":
            if self.kv < (6, 12):
                bad()  # 6.1 refused the deprecated check_blacklist (F-7)
        elif key == "appraise_algos":
            once()
            algos = value.split(",")
            for a in algos:
                if a not in T.HASH_ALGOS:
                    log.messages.append(f'ima: unknown hash algorithm "{a}"')
                    bad()
                if not (_available(a) and (self.kv >= (6, 12) or a in BUILTIN_HASHES_61)):
                    log.messages.append(f'ima: unavailable hash algorithm "{a}", check your kernel configuration')
                    bad()
            fields["appraise_algos"] = algos
        elif key == "digest_type":
            once()
            if value != "verity" or (self.kv < (7, 1) and "appraise_type" in fields):
                bad()
            fields["digest_type"] = value
        else:  # LSM_KEYS
            log.messages.append(f"ima: rule for LSM '{value}' is undefined")
            if lsm_rejected:
                bad(f"rule for LSM '{value}' is undefined")
            fields["lsm"].append((key, value))

    def _validate(self, r: Rule) -> None:
        """ima_validate_rule: which options go with which action and func."""
        def bad(why):
            raise FsError(errno.EINVAL, why)
        appraise = r.action in ("appraise", "dont_appraise")
        if r.pcr is not None and r.action != "measure":
            bad("pcr= on a rule that does not measure")
        if (r.appraise_type or r.appraise_algos) and not appraise:
            bad("appraise options on a non-appraise rule")
        if r.keyrings is not None and r.func != "KEY_CHECK":
            bad("keyrings= needs func=KEY_CHECK")
        if r.label is not None and r.func != "CRITICAL_DATA":
            bad("label= needs func=CRITICAL_DATA")
        if r.func in BUFFER_FUNCS and r.action not in ("measure", "dont_measure"):
            bad(f"{r.func} only with measure or dont_measure")
        if r.func == "SETXATTR_CHECK" and (r.action != "appraise" or not r.appraise_algos):
            bad("SETXATTR_CHECK only as appraise ... appraise_algos=")

    def _notices(self, r: Rule, log: RuleLog) -> None:
        """What the kernel notes once per boot about an accepted rule's template."""
        if r.appraise_type == "imasig|modsig" and not self._modsig_checked:
            self._modsig_checked = True  # check_template_modsig looks at the first such rule only
            fields = self.template.fields
            if "modsig" in fields and "d-modsig" not in fields:
                log.messages.append("ima: template with 'modsig' field also needs 'd-modsig' field")
        if r.action == "measure" and r.digest_type == "verity" and not self._verity_noted \
                and "d-ngv2" not in (r.template or self.template).fields:
            self._verity_noted = True  # pr_notice_once
            log.messages.append("ima: verity rules should include d-ngv2")


def _available(alg: str) -> bool:
    try:
        T.new_hash(alg)
        return True
    except T.UnknownHashError:
        return False


# -- built-in policies (ima_policy=) ---------------------------------------------------
PROC, SYSFS, DEBUGFS, TMPFS, RAMFS = 0x9FA0, 0x62656572, 0x64626720, 0x01021994, 0x858458F6
DEVPTS, BINFMT, SECURITYFS, SELINUX, SMACK = 0x1CD1, 0x42494E4D, 0x73636673, 0xF97CFF8C, 0x43415D53
CGROUP, CGROUP2, NSFS, EFIVARFS = 0x27E0EB, 0x63677270, 0x6E736673, 0xDE5E81E4


def builtin_rules(names: str, kernel_version: tuple[int, int]) -> list[Rule]:
    """The rules of ``ima_policy=names``, in the kernel's fixed order (R-1)."""
    wanted = set(n for n in names.split("|") if n)
    rules: list[Rule] = []
    if "tcb" in wanted:
        for magic in (PROC, SYSFS, DEBUGFS, TMPFS, DEVPTS, BINFMT, SECURITYFS, SELINUX, SMACK,
                      CGROUP, CGROUP2, NSFS, EFIVARFS):
            tmpfs_file_only = magic == TMPFS and kernel_version >= (6, 14)
            rules.append(Rule("dont_measure", fsmagic=magic, func="FILE_CHECK" if tmpfs_file_only else None))
        rules += [Rule("measure", func="MMAP_CHECK", mask="MAY_EXEC"),
                  Rule("measure", func="BPRM_CHECK", mask="MAY_EXEC"),
                  Rule("measure", func="FILE_CHECK", mask="^MAY_READ", ids=(("euid", "=", 0),)),
                  Rule("measure", func="FILE_CHECK", mask="^MAY_READ", ids=(("uid", "=", 0),)),
                  Rule("measure", func="MODULE_CHECK"),
                  Rule("measure", func="FIRMWARE_CHECK"),
                  Rule("measure", func="POLICY_CHECK")]
    if "secure_boot" in wanted:
        rules += [Rule("appraise", func=f, appraise_type="imasig")
                  for f in ("MODULE_CHECK", "FIRMWARE_CHECK", "KEXEC_KERNEL_CHECK", "POLICY_CHECK")]
    if "appraise_tcb" in wanted:
        rules += [Rule("dont_appraise", fsmagic=m) for m in (
            PROC, SYSFS, DEBUGFS, TMPFS, RAMFS, DEVPTS, BINFMT, SECURITYFS, SELINUX, SMACK,
            NSFS, EFIVARFS, CGROUP, CGROUP2)]
        rules += [Rule("appraise", func="POLICY_CHECK", appraise_type="imasig"),
                  Rule("appraise", ids=(("fowner", "=", 0),))]
    if "critical_data" in wanted:
        rules.append(Rule("measure", func="CRITICAL_DATA"))
    return rules


def needs_signed_policy(rules: list[Rule]) -> bool:
    """An `appraise func=POLICY_CHECK` rule is in effect: rules can only be
    loaded from a signed file (§1.5 step 4)."""
    return any(r.action == "appraise" and r.func == "POLICY_CHECK" for r in rules)


def measure_decision(rules: list[Rule], ev: HookEvent) -> Rule | None:
    """The first matching measure/dont_measure rule, if any (§5.2)."""
    for r in rules:
        if r.action in ("measure", "dont_measure") and r.matches(ev):
            return r
    return None



# -- the policy file (ima_fs.c open/write/release, ima_update_policy) -----------------
MAX_WRITE = 4095  # PAGE_SIZE - 1


def _read_regular_file(path: str) -> bytes:
    """kernel_read_file_from_path, a blocking step: the content of a regular
    file; anything else is EINVAL.  O_NONBLOCK: a FIFO must not wait for a
    writer (the kernel's would)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        with open(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


class Session:
    """One open...close of the policy file for writing.

    ``writer`` is the task that opened the file: FUSE names the task of an
    open but not of a write or a release, so the kernel's records about the
    session's writes and its close name the opener (docs/deviations.md).
    """

    def __init__(self, writer: Subject):
        self.writer = writer
        self.rules: list[Rule] = []
        self.failed = False
        # Where FUSE believes the descriptor's position is if every write was a
        # plain write(): the sum of what the writes taken there returned.
        self.position = 0


class PolicyFile:
    """The active policy and the `policy` file's state machine.

    ``read_policy``/``write_policy`` are CONFIG_IMA_READ_POLICY and
    CONFIG_IMA_WRITE_POLICY; ``log`` is the :class:`~imafs.klog.KernelLog`.
    """

    def __init__(self, rules: list[Rule], parser: Parser, *, read_policy: bool, write_policy: bool,
                 log: KernelLog, measure_policy_file=None, real_path=None, on_update=None):
        self.rules = rules
        self.parser = parser
        self.read_policy = read_policy
        self.write_policy = write_policy
        self.log = log
        self.measure_policy_file = measure_policy_file or no_steps(lambda path, writer: None)
        self.real_path = real_path or (lambda path: path)  # where the daemon itself finds a file
        self.on_update = on_update or (lambda: None)  # ima_update_policy's tail: queued keys
        self.custom = False  # a custom policy replaced the boot policy
        self.busy = False
        self.present = True  # the file is removed after a load on distribution kernels
        self.writable = True  # the write bit; lost after a load with READ_POLICY alone

    @property
    def mode(self) -> int:
        return (0o400 if self.read_policy else 0) | (0o200 if self.writable else 0)

    def open(self, flags: int, cap_sys_admin: bool, task: Subject) -> Session | None:
        """A Session for a writer, None for a reader."""
        acc = flags & os.O_ACCMODE
        if acc == os.O_WRONLY:
            if self.busy:
                raise FsError(errno.EBUSY)
            self.busy = True
            return Session(task)
        if acc != os.O_RDONLY or not self.read_policy:
            raise FsError(errno.EACCES)
        if not cap_sys_admin:
            raise FsError(errno.EPERM)
        return None

    def read(self, offset: int, size: int) -> bytes:
        text = "".join(r.render() for r in self.rules if not r.inert).encode()
        return text[offset:offset + size]

    def write(self, s: Session, offset: int, data: bytes) -> Steps[int]:
        """One write(): what it returns, or FsError (the session then fails).

        The kernel never moves the file position, so only a write at a
        non-zero position (a pwrite, or after an lseek) is refused.  FUSE
        moves it by what each plain write returned and sends it as the
        offset, and a pwrite's offset as given: a write at ``s.position`` is
        taken as a plain write at 0 and moves it on; a write at 0 anywhere
        else is taken as a pwrite at 0 and leaves it (docs/deviations.md).
        """
        yield Exclusive(self)  # ima_write_mutex: one write at a time, a path load included
        plain = offset == s.position
        try:
            if not plain and offset != 0:
                raise FsError(errno.EINVAL, "no partial writes")
            n = yield from self._write(s, data[:MAX_WRITE])
        except FsError:
            s.failed = True
            raise
        if plain:
            s.position += n
        return n

    def _write(self, s: Session, data: bytes) -> Steps[int]:
        if data.startswith(b"/"):
            text = data.split(b"\0", 1)[0]  # the kernel reads a C string
            yield from self._load_file(s, text.split(b"\n", 1)[0])
            return len(text)
        if needs_signed_policy(self.rules):
            self.log.kernel("ima: signed policy file (specified as an absolute pathname) required")
            self.log.integrity(1802, s.writer, "policy_update", "signed policy required", 0)
            raise FsError(errno.EACCES)
        line, newline, _ = data.partition(b"\n")
        nul = line.find(b"\0")
        if nul >= 0:
            line, newline = line[:nul], b"\0"
        self._parse_line(s, line)
        # the kernel consumes the line and its terminator; with neither it
        # returns count + 1, more than FUSE allows (docs/deviations.md)
        return len(line) + 1 if newline else len(data)

    def _parse_line(self, s: Session, raw: bytes) -> None:
        """ima_parse_add_rule: one rule, its messages and records."""
        log = RuleLog()
        try:
            rule = self.parser.parse(raw.decode("utf-8", "surrogateescape"), lsm_rejected=not self.custom, log=log)
        except FsError:
            self._logged(log, res=0)
            self.log.integrity(1802, s.writer, "update_policy", "invalid-policy", 0)
            raise
        if rule is not None:
            self._logged(log, res=1)
            s.rules.append(rule)

    def _logged(self, log: RuleLog, res: int) -> None:
        for message in log.messages:
            self.log.kernel(message)
        self.log.audit(1807, " ".join(log.fields + [f"res={res}"]))

    def _load_file(self, s: Session, path: bytes) -> Steps[None]:
        """ima_read_policy: every line of the file is a rule; the lengths
        the rules account for must add up to the file's size."""
        name = os.fsdecode(path)
        try:
            content = yield Blocking(_read_regular_file, self.real_path(name))
        except OSError as e:
            self.log.kernel(f"ima: Unable to open file: {name} (-{e.errno})")
            raise FsError(e.errno) from None
        decided = yield from self.measure_policy_file(name, s.writer)  # measured and appraised (POLICY_CHECK)
        if decided and "denied" in decided:  # e.g. an unsigned file under secure_boot
            self.log.kernel(f"ima: Unable to open file: {name} (-{decided['denied']})")
            raise FsError(decided["denied"])
        size = len(content)
        for raw in content.split(b"\n"):
            if size <= 0:
                break
            line, nul, _ = raw.partition(b"\0")
            self._parse_line(s, line)
            size -= len(line) + 1
            if nul:
                break  # the kernel splits the file as a C string: it ends here
        if size:  # a last line without a newline, or a NUL
            raise FsError(errno.EINVAL, "the rules do not account for the whole file")

    def release(self, s: Session | None) -> None:
        if s is None:
            return
        ok = not s.failed and bool(s.rules)
        cause = "completed" if ok else "failed"
        self.log.kernel(f"ima: policy update {cause}")
        self.log.integrity(1802, s.writer, "policy_update", cause, int(ok))
        if not ok:
            self.busy = False
            return
        self.rules = s.rules if not self.custom else self.rules + s.rules
        self.custom = True
        self.on_update()
        if self.write_policy:
            self.busy = False
        elif self.read_policy:
            self.writable = False  # busy stays set: later write opens get EBUSY
        else:
            self.present = False
            self.busy = False
