"""Template descriptors, field encoders and record rendering (ima_template*.c).

Byte layouts follow kernel-abi.md §2–§4; all integers are little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from binascii import hexlify
from dataclasses import dataclass, field
from functools import lru_cache, partial


class TemplateError(ValueError):
    """A bad template name, format or field id, an event that cannot be encoded, or a malformed record."""


class UnknownHashError(ValueError):
    """A hash algorithm the kernel does not know, or this machine cannot compute."""


# -- hash algorithms ------------------------------------------------------------
# kernel hash_info names -> (HASH_ALGO_* id, digest size)
HASH_ALGOS: dict[str, tuple[int, int]] = {
    "md4": (0, 16), "md5": (1, 16), "sha1": (2, 20), "rmd160": (3, 20), "sha256": (4, 32),
    "sha384": (5, 48), "sha512": (6, 64), "sha224": (7, 28), "rmd128": (8, 16),
    "rmd256": (9, 32), "rmd320": (10, 40), "wp256": (11, 32), "wp384": (12, 48),
    "wp512": (13, 64), "tgr128": (14, 16), "tgr160": (15, 20), "tgr192": (16, 24),
    "sm3": (17, 32), "streebog256": (18, 32), "streebog512": (19, 64),
    "sha3-256": (20, 32), "sha3-384": (21, 48), "sha3-512": (22, 64),
}
# kernel name -> hashlib/OpenSSL name, for the algorithms OpenSSL may provide
_OPENSSL_NAMES = {
    "md4": "md4", "md5": "md5", "sha1": "sha1", "rmd160": "ripemd160", "sha256": "sha256",
    "sha384": "sha384", "sha512": "sha512", "sha224": "sha224", "wp512": "whirlpool",
    "sm3": "sm3", "sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512",
}
_CONSTRUCTORS: dict = {}


def digest_size(alg: str) -> int:
    try:
        return HASH_ALGOS[alg][1]
    except KeyError:
        raise UnknownHashError(f"unknown hash algorithm {alg!r}; known: {', '.join(HASH_ALGOS)}") from None


def hasher(alg: str):
    """The constructor of ``alg``: ``hasher(alg)(data).digest()``."""
    ctor = _CONSTRUCTORS.get(alg)
    if ctor is None:
        digest_size(alg)
        name = _OPENSSL_NAMES.get(alg)
        try:
            if name is None:
                raise ValueError(alg)
            ctor = getattr(hashlib, name, None) or partial(hashlib.new, name)
            ctor()
        except ValueError:
            raise UnknownHashError(f"hash algorithm {alg!r} is not available on this machine") from None
        _CONSTRUCTORS[alg] = ctor
    return ctor


def new_hash(alg: str):
    return hasher(alg)()


def hash_bytes(alg: str, data: bytes) -> bytes:
    return hasher(alg)(data).digest()


# -- field encoders (ima_template_lib.c *_init) --------------------------------------
IMA_EVENT_NAME_LEN_MAX = 255
IMA_DIGEST_SIZE = 20  # the `d` field of a violation, whatever the IMA hash
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_pack32 = _U32.pack
# "<algo>:\0", digest size; "<type>:<algo>:\0"
_NG = {a: (a.encode() + b":\0", size) for a, (_, size) in HASH_ALGOS.items()}
_NGV2 = {(t, a): b"%s:%s:\0" % (t.encode(), a.encode()) for t in ("ima", "verity") for a in HASH_ALGOS}
_ZERO_NG = {a: p + bytes(size) for a, (p, size) in _NG.items()}
_ZERO_NGV2 = {a: _NGV2["ima", a] + bytes(size) for a, (_, size) in _NG.items()}
_ZERO_D = bytes(IMA_DIGEST_SIZE)


def _algo(table, alg):
    try:
        return table[alg]
    except KeyError:
        raise UnknownHashError(f"unknown hash algorithm {alg!r}") from None


def _digest(ev, size):
    """The event's file digest, checked against ``size``."""
    d = ev.file_digest
    if d is None or len(d) != size:
        raise TemplateError(f"event {ev.name!r}: a {ev.file_algo} file digest has {size} bytes, got "
                            + ("none" if d is None else str(len(d))))
    return d


def _e_d(ev):
    if ev.violation:
        return _ZERO_D
    if ev.file_algo in ("sha1", "md5"):
        return _digest(ev, 20 if ev.file_algo == "sha1" else 16)
    d = ev.d_digest
    if d is None or len(d) not in (16, 20):
        raise TemplateError(f"event {ev.name!r}: the 'd' field needs a sha1 or md5 digest (d_digest)")
    return d


def _e_d_ng(ev):
    if ev.violation:
        return _algo(_ZERO_NG, ev.ima_hash)
    prefix, size = _algo(_NG, ev.file_algo)
    d = ev.file_digest
    return prefix + (d if d is not None and len(d) == size else _digest(ev, size))


def _e_d_ngv2(ev):
    if ev.violation:  # the kernel records violations as type "ima"
        return _algo(_ZERO_NGV2, ev.ima_hash)
    size = _algo(_NG, ev.file_algo)[1]
    prefix = _NGV2.get((ev.digest_type, ev.file_algo))
    if prefix is None:
        raise TemplateError(f"event {ev.name!r}: digest type {ev.digest_type!r} is not 'ima' or 'verity'")
    return prefix + _digest(ev, size)


def _e_d_modsig(ev):
    if not ev.modsig:
        return b""
    if ev.violation:
        return _ZERO_NG["sha1"]
    if not ev.modsig_digest:
        raise TemplateError(f"event {ev.name!r} has a modsig but no modsig_digest")
    return _algo(_NG, ev.file_algo)[0] + ev.modsig_digest


def _strlen(name):
    """The name as the kernel's strlen() sees it."""
    return name[:name.index(b"\0")] if b"\0" in name else name


def _e_n(ev):
    name = _strlen(ev.name)
    if len(name) > IMA_EVENT_NAME_LEN_MAX:  # a file's dentry (base) name, else truncated
        i = name.rfind(b"/")
        name = name[i + 1:] if i >= 0 else name[:IMA_EVENT_NAME_LEN_MAX]
    return name.replace(b" ", b"_") + b"\0"


def _e_n_ng(ev):
    name = ev.name
    return (_strlen(name) if b"\0" in name else name).replace(b" ", b"_") + b"\0"


def _e_evmsig(ev):
    x = ev.evm_xattr
    return x if x and x[0] == 0x05 else b""


def _e_sig(ev):
    x = ev.ima_xattr  # a violation carries no security.ima: only the EVM fallback
    if x and x[0] in (0x03, 0x06) and not ev.violation:
        return x
    return _e_evmsig(ev)


def _e_xattrnames(ev):
    return "|".join([n for n, _ in ev.evm_xattrs]).encode() + b"\0" if ev.evm_xattrs else b""


def _e_xattrlengths(ev):
    return b"".join([_pack32(len(v)) for _, v in ev.evm_xattrs])


def _e_xattrvalues(ev):
    return b"".join([v for _, v in ev.evm_xattrs])


def _e_iuid(ev):
    return b"" if ev.uid is None else _pack32(ev.uid)


def _e_igid(ev):
    return b"" if ev.gid is None else _pack32(ev.gid)


def _e_imode(ev):
    return b"" if ev.mode is None else _U16.pack(ev.mode)


def _e_buf(ev):
    return ev.buf or b""


def _e_modsig(ev):
    return ev.modsig or b""


# -- ASCII renderers (ima_show_template_*) ----------------------------------------
def _a_str(v):
    return v.partition(b"\0")[0]


def _a_algo(v):
    i = v.find(b"\0")
    return v[:i] + hexlify(v[i + 1:]) if i >= 0 else hexlify(v)


def _a_uint(v):
    return b"%d" % int.from_bytes(v, "little") if len(v) in (1, 2, 4, 8) else b""


def _l_hex(v):
    return 2 * len(v)


def _l_str(v):
    i = v.find(b"\0")
    return len(v) if i < 0 else i


def _l_algo(v):
    i = v.find(b"\0")
    return 2 * len(v) if i < 0 else 2 * len(v) - i - 2


def _l_uint(v):
    return len(_a_uint(v))


# field id -> (encoder, ASCII renderer, ASCII length); the data formats of kernel-abi.md §2.1
_HEX = (hexlify, _l_hex)
_STR = (_a_str, _l_str)
_ALGO = (_a_algo, _l_algo)
_UINT = (_a_uint, _l_uint)
_FIELDS = {
    "d": (_e_d, *_HEX),
    "n": (_e_n, *_STR),
    "d-ng": (_e_d_ng, *_ALGO),
    "d-ngv2": (_e_d_ngv2, *_ALGO),
    "n-ng": (_e_n_ng, *_STR),
    "sig": (_e_sig, *_HEX),
    "buf": (_e_buf, *_HEX),
    "d-modsig": (_e_d_modsig, *_ALGO),
    "modsig": (_e_modsig, *_HEX),
    "evmsig": (_e_evmsig, *_HEX),
    "iuid": (_e_iuid, *_UINT),
    "igid": (_e_igid, *_UINT),
    "imode": (_e_imode, *_UINT),
    "xattrnames": (_e_xattrnames, *_STR),
    "xattrlengths": (_e_xattrlengths, *_HEX),
    "xattrvalues": (_e_xattrvalues, *_HEX),
}
FIELD_IDS = frozenset(_FIELDS)
MAX_FIELDS = 15  # IMA_TEMPLATE_NUM_FIELDS_MAX
MAX_FIELD_ID = 16  # IMA_TEMPLATE_FIELD_ID_MAX_LEN
# template names of this length or more are refused on restore (the length of evm-sig's format + 1)
MAX_TEMPLATE_NAME_LEN = 69
# the longest name a list can hold: a custom format of 15 fields of 16 characters
MAX_LIST_TEMPLATE_NAME_LEN = 15 * 17


# -- templates --------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Template:
    """A template descriptor; name "" for an ima_template_fmt= format."""

    name: str
    fmt: str
    fields: tuple[str, ...] = field(compare=False)
    _enc: tuple = field(init=False, repr=False, compare=False)
    _asc: tuple = field(init=False, repr=False, compare=False)
    _alen: tuple = field(init=False, repr=False, compare=False)
    _bname: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if "|".join(self.fields) != self.fmt:
            raise TemplateError(f"template {self.display_name!r}: fields {self.fields} do not match {self.fmt!r}")
        try:
            specs = [_FIELDS[f] for f in self.fields]
        except KeyError as e:
            raise TemplateError(f"template {self.display_name!r}: unknown field {e.args[0]!r}") from None
        object.__setattr__(self, "_enc", tuple(s[0] for s in specs))
        object.__setattr__(self, "_asc", tuple(s[1] for s in specs))
        object.__setattr__(self, "_alen", tuple(s[2] for s in specs))
        object.__setattr__(self, "_bname", self.display_name.encode())

    @property
    def display_name(self) -> str:
        """What the lists print and write as the template name."""
        return self.name or self.fmt


BUILTIN_TEMPLATES: dict[str, Template] = {n: Template(n, f, tuple(f.split("|"))) for n, f in (
    ("ima", "d|n"),
    ("ima-ng", "d-ng|n-ng"),
    ("ima-sig", "d-ng|n-ng|sig"),
    ("ima-ngv2", "d-ngv2|n-ng"),
    ("ima-sigv2", "d-ngv2|n-ng|sig"),
    ("ima-buf", "d-ng|n-ng|buf"),
    ("ima-modsig", "d-ng|n-ng|sig|d-modsig|modsig"),
    ("evm-sig", "d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode"),
)}
_BY_FMT = {t.fmt: t for t in BUILTIN_TEMPLATES.values()}


@lru_cache(maxsize=256)
def lookup_template(name_or_fmt: str) -> Template:
    """A builtin by name, else the builtin with that format, else a custom format (name "")."""
    t = BUILTIN_TEMPLATES.get(name_or_fmt) or _BY_FMT.get(name_or_fmt)
    if t is not None:
        return t
    fields = tuple(name_or_fmt.split("|"))
    if len(fields) > MAX_FIELDS:
        raise TemplateError(f"template format {name_or_fmt!r} has {len(fields)} fields, at most {MAX_FIELDS}")
    for f in fields:
        if not f or len(f) > MAX_FIELD_ID:
            raise TemplateError(f"template format {name_or_fmt!r}: invalid field id {f!r} "
                                f"(1 to {MAX_FIELD_ID} characters)")
        if f not in FIELD_IDS:
            what = "unknown field" if len(fields) > 1 else "unknown template or field"
            raise TemplateError(f"{what} {f!r} in {name_or_fmt!r}; templates: {', '.join(BUILTIN_TEMPLATES)}; "
                                f"fields: {', '.join(sorted(FIELD_IDS))}")
    return Template("", name_or_fmt, fields)


# -- events -----------------------------------------------------------------------
@dataclass(slots=True)
class Event:
    """What the kernel's measurement step knows (struct ima_event_data)."""

    name: bytes
    file_digest: bytes | None = None
    file_algo: str = "sha256"
    ima_hash: str = "sha256"
    d_digest: bytes | None = None
    violation: bool = False
    buf: bytes | None = None
    ima_xattr: bytes | None = None
    evm_xattr: bytes | None = None
    evm_xattrs: tuple[tuple[str, bytes], ...] = ()
    uid: int | None = None
    gid: int | None = None
    mode: int | None = None
    digest_type: str = "ima"
    modsig: bytes | None = None
    modsig_digest: bytes | None = None


def encode_fields(template: Template, ev: Event) -> tuple[bytes, ...]:
    """The stored bytes of each field of ``template`` for ``ev`` (kernel-abi.md §3.2)."""
    return tuple([enc(ev) for enc in template._enc])


def template_data(fields) -> bytes:
    """u32 length + bytes of every field: what non-ima template digests hash."""
    out = []
    for f in fields:
        out.append(_pack32(len(f)))
        out.append(f)
    return b"".join(out)


def template_digest(alg: str, template: Template, fields) -> bytes:
    """H(template data); for `ima`, H(d || name zero-padded to 256 bytes) (kernel-abi.md §4.1)."""
    if template.name == "ima":
        d, n = fields
        data = d + n.ljust(IMA_EVENT_NAME_LEN_MAX + 1, b"\0")
    else:
        data = template_data(fields)
    return (_CONSTRUCTORS.get(alg) or hasher(alg))(data).digest()


# -- rendering --------------------------------------------------------------------
def binary_record(pcr: int, digest: bytes, template: Template, fields, data: bytes | None = None) -> bytes:
    """One record of binary_runtime_measurements (kernel-abi.md §2.2); ``data`` is
    template_data(fields) when the caller has it already."""
    if template.name == "ima":  # d without length, strlen(name) + name without NUL, no data length
        d, n = fields
        name = n.partition(b"\0")[0]
        return b"".join((_pack32(pcr), digest, b"\3\0\0\0ima", d, _pack32(len(name)), name))
    if data is None:
        data = template_data(fields)
    bname = template._bname
    return b"".join((_pack32(pcr), digest, _pack32(len(bname)), bname, _pack32(len(data)), data))


def ascii_fields(template: Template, fields) -> bytes:
    """The ASCII line after the template name: a space, then the field's text, per field."""
    return b" " + b" ".join([show(v) for show, v in zip(template._asc, fields)])


def ascii_fields_len(template: Template, fields) -> int:
    """len(ascii_fields(template, fields)), without rendering."""
    return len(fields) + sum([size(v) for size, v in zip(template._alen, fields)])


def ascii_record(pcr: int, digest: bytes, template: Template, fields) -> bytes:
    """One line of ascii_runtime_measurements (kernel-abi.md §2.1)."""
    return b"%2d %s %s%s\n" % (pcr, hexlify(digest), template._bname, ascii_fields(template, fields))


# -- parsing ----------------------------------------------------------------------
def _u32(buf, o, end, offset, what):
    if o + 4 > end:
        raise TemplateError(f"record at {offset}: truncated {what}")
    return _U32.unpack_from(buf, o)[0]


def _take(buf, o, n, end, offset, what):
    if o + n > end:
        raise TemplateError(f"record at {offset}: truncated {what}")
    return bytes(buf[o:o + n])


def parse_binary_record(buf, offset: int, digest_len: int, ima_d_len: int = 20,
                        max_name: int = MAX_TEMPLATE_NAME_LEN):
    """(pcr, digest, template, fields, offset after the record) of the record at ``offset``.

    Strict like the kernel's restore. ``ima_d_len`` is the `d` length of `ima`
    records (16 when the IMA hash is md5); a violation (zero digest) has 20.
    ``max_name`` bounds the template name (the restore refuses 69 and more; a
    list may hold any custom format up to 15 fields)."""
    end = len(buf)
    pcr = _u32(buf, offset, end, offset, "PCR")
    o = offset + 4
    digest = _take(buf, o, digest_len, end, offset, "template digest")
    o += digest_len
    nlen = _u32(buf, o, end, offset, "template name length")
    o += 4
    if not 0 < nlen < max_name:
        raise TemplateError(f"record at {offset}: template name length {nlen} "
                            f"(1 to {max_name - 1})")
    bname = _take(buf, o, nlen, end, offset, "template name")
    o += nlen
    try:
        template = lookup_template(bname.decode("ascii"))
    except UnicodeDecodeError:
        raise TemplateError(f"record at {offset}: template name {bname!r} is not ASCII") from None
    except TemplateError as e:
        raise TemplateError(f"record at {offset}: {e}") from None
    if bname == b"ima":
        dl = IMA_DIGEST_SIZE if ima_d_len != IMA_DIGEST_SIZE and not any(digest) else ima_d_len
        d = _take(buf, o, dl, end, offset, "'d' field")
        o += dl
        ln = _u32(buf, o, end, offset, "name length")
        o += 4
        name = _take(buf, o, ln, end, offset, "name")
        if b"\0" in name:
            raise TemplateError(f"record at {offset}: NUL in the 'ima' event name")
        return pcr, digest, template, (d, name + b"\0"), o + ln
    dlen = _u32(buf, o, end, offset, "template data length")
    o += 4
    dend = o + dlen
    if dend > end:
        raise TemplateError(f"record at {offset}: template data of {dlen} bytes overruns the buffer")
    fields = []
    for _ in template.fields:
        flen = _u32(buf, o, dend, offset, f"template data ({len(template.fields)} fields expected)")
        o += 4
        fields.append(_take(buf, o, flen, dend, offset, "field"))
        o += flen
    if o != dend:
        raise TemplateError(f"record at {offset}: {dend - o} bytes after the {len(fields)} fields "
                            f"of {template.display_name!r}")
    return pcr, digest, template, tuple(fields), dend


def parse_binary_list(buf, digest_len: int, ima_d_len: int = 20, max_name: int = MAX_TEMPLATE_NAME_LEN) -> list:
    """[(pcr, digest, template, fields)] of every record in ``buf``."""
    out = []
    o = 0
    while o < len(buf):
        pcr, digest, template, fields, o = parse_binary_record(buf, o, digest_len, ima_d_len, max_name)
        out.append((pcr, digest, template, fields))
    return out
