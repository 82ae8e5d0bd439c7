"""Template descriptors, field encoders and record rendering (ima_template*.c).

Byte layouts follow kernel-abi.md §2–§4; all integers are little-endian.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from functools import lru_cache


class TemplateError(ValueError):
    """A bad template name or format, or a malformed record."""


class UnknownHashError(ValueError):
    """A hash algorithm the kernel does not know, or this machine cannot compute."""


# kernel hash_info names -> (HASH_ALGO_* id, digest size)
HASH_ALGOS: dict[str, tuple[int, int]] = {
    "md4": (0, 16), "md5": (1, 16), "sha1": (2, 20), "rmd160": (3, 20), "sha256": (4, 32),
    "sha384": (5, 48), "sha512": (6, 64), "sha224": (7, 28), "rmd128": (8, 16),
    "rmd256": (9, 32), "rmd320": (10, 40), "wp256": (11, 32), "wp384": (12, 48),
    "wp512": (13, 64), "tgr128": (14, 16), "tgr160": (15, 20), "tgr192": (16, 24),
    "sm3": (17, 32), "streebog256": (18, 32), "streebog512": (19, 64),
    "sha3-256": (20, 32), "sha3-384": (21, 48), "sha3-512": (22, 64),
}
_HASHLIB_NAMES = {"sha3-256": "sha3_256", "sha3-384": "sha3_384", "sha3-512": "sha3_512",
                  "rmd160": "ripemd160", "wp512": "whirlpool"}


def digest_size(alg: str) -> int:
    try:
        return HASH_ALGOS[alg][1]
    except KeyError:
        raise UnknownHashError(f"unknown hash algorithm {alg!r}") from None


@lru_cache(maxsize=None)
def _constructor(alg: str):
    if alg not in HASH_ALGOS:
        raise UnknownHashError(f"unknown hash algorithm {alg!r}")
    name = _HASHLIB_NAMES.get(alg, alg)
    try:
        ctor = getattr(hashlib, name, None)
        if ctor is not None:
            ctor()
            return ctor
        hashlib.new(name)
        return lambda data=b"": hashlib.new(name, data)
    except (ValueError, TypeError):
        raise UnknownHashError(f"hash algorithm {alg!r} is not available on this machine") from None


def new_hash(alg: str):
    return _constructor(alg)()


def hasher(alg: str):
    """The constructor of ``alg``: hasher(alg)(data).digest()."""
    return _constructor(alg)


def hash_bytes(alg: str, data: bytes) -> bytes:
    return _constructor(alg)(data).digest()


# -- templates ---------------------------------------------------------------------
FIELD_IDS = frozenset({"d", "n", "d-ng", "n-ng", "d-ngv2", "sig", "buf", "d-modsig", "modsig",
                       "evmsig", "iuid", "igid", "imode", "xattrnames", "xattrlengths",
                       "xattrvalues"})
MAX_FIELDS = 15
MAX_FIELD_ID = 16
IMA_EVENT_NAME_LEN_MAX = 255


@dataclass(frozen=True)
class Template:
    name: str
    fmt: str
    fields: tuple[str, ...] = field(compare=False)

    @property
    def display_name(self) -> str:
        return self.name or self.fmt


def _builtin(name: str, fmt: str) -> Template:
    return Template(name, fmt, tuple(fmt.split("|")))


BUILTIN_TEMPLATES: dict[str, Template] = {t.name: t for t in (
    _builtin("ima", "d|n"),
    _builtin("ima-ng", "d-ng|n-ng"),
    _builtin("ima-ngv2", "d-ngv2|n-ng"),
    _builtin("ima-sig", "d-ng|n-ng|sig"),
    _builtin("ima-sigv2", "d-ngv2|n-ng|sig"),
    _builtin("ima-buf", "d-ng|n-ng|buf"),
    _builtin("ima-modsig", "d-ng|n-ng|sig|d-modsig|modsig"),
    _builtin("evm-sig", "d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode"),
)}
_BY_FMT = {t.fmt: t for t in BUILTIN_TEMPLATES.values()}


@lru_cache(maxsize=256)
def lookup_template(name_or_fmt: str) -> Template:
    """A builtin by name or by format string, else a custom format (name "")."""
    t = BUILTIN_TEMPLATES.get(name_or_fmt) or _BY_FMT.get(name_or_fmt)
    if t is not None:
        return t
    fields = tuple(name_or_fmt.split("|"))
    if len(fields) > MAX_FIELDS:
        raise TemplateError(f"template {name_or_fmt!r}: more than {MAX_FIELDS} fields")
    for f in fields:
        if f not in FIELD_IDS or len(f) > MAX_FIELD_ID:
            raise TemplateError(f"unknown template or field {f!r} in {name_or_fmt!r}; templates: "
                                + ", ".join(BUILTIN_TEMPLATES) + "; fields: " + ", ".join(sorted(FIELD_IDS)))
    return Template("", name_or_fmt, fields)


# -- events and field encoders --------------------------------------------------------
@dataclass
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


def _digest_ng(ev: Event) -> bytes:
    if ev.violation:
        return ev.ima_hash.encode() + b":\0" + bytes(digest_size(ev.ima_hash))
    return ev.file_algo.encode() + b":\0" + ev.file_digest


def _f_d(ev):
    if ev.violation:
        return bytes(16 if ev.ima_hash == "md5" else 20)
    if ev.d_digest is not None:
        return ev.d_digest
    if ev.file_algo in ("sha1", "md5"):
        return ev.file_digest
    raise TemplateError("the 'd' field needs a sha1 or md5 digest of the content")


def _f_n(ev):
    name = ev.name
    if len(name) > IMA_EVENT_NAME_LEN_MAX:
        base = name.rsplit(b"/", 1)[-1]
        name = base if 0 < len(base) <= IMA_EVENT_NAME_LEN_MAX else name[:IMA_EVENT_NAME_LEN_MAX]
    return name.replace(b" ", b"_") + b"\0"


def _f_n_ng(ev):
    return ev.name.replace(b" ", b"_") + b"\0"


def _f_d_ngv2(ev):
    algo = ev.ima_hash if ev.violation else ev.file_algo
    digest = bytes(digest_size(algo)) if ev.violation else ev.file_digest
    return ev.digest_type.encode() + b":" + algo.encode() + b":\0" + digest


def _f_evmsig(ev):
    x = ev.evm_xattr
    return x if x and x[0] == 0x05 else b""


def _f_sig(ev):
    x = ev.ima_xattr
    return x if x and x[0] in (0x03, 0x06) else _f_evmsig(ev)


def _f_d_modsig(ev):
    if not ev.modsig or ev.modsig_digest is None:
        return b""
    return ev.file_algo.encode() + b":\0" + ev.modsig_digest


def _u(fmt):
    def enc(value):
        return b"" if value is None else struct.pack(fmt, value)
    return enc


_u32, _u16 = _u("<I"), _u("<H")

ENCODERS = {
    "d": _f_d,
    "n": _f_n,
    "d-ng": _digest_ng,
    "n-ng": _f_n_ng,
    "d-ngv2": _f_d_ngv2,
    "sig": _f_sig,
    "evmsig": _f_evmsig,
    "buf": lambda ev: ev.buf or b"",
    "d-modsig": _f_d_modsig,
    "modsig": lambda ev: ev.modsig or b"",
    "iuid": lambda ev: _u32(ev.uid),
    "igid": lambda ev: _u32(ev.gid),
    "imode": lambda ev: _u16(ev.mode),
    "xattrnames": lambda ev: ("|".join(n for n, _ in ev.evm_xattrs).encode() + b"\0") if ev.evm_xattrs else b"",
    "xattrlengths": lambda ev: b"".join(struct.pack("<I", len(v)) for _, v in ev.evm_xattrs),
    "xattrvalues": lambda ev: b"".join(v for _, v in ev.evm_xattrs),
}


def encode_fields(template: Template, ev: Event) -> tuple[bytes, ...]:
    """The stored bytes of each field of ``template`` for ``ev`` (kernel-abi.md §3.2)."""
    return tuple(ENCODERS[f](ev) for f in template.fields)


def template_data(fields) -> bytes:
    """u32 length + bytes, for every field: the bytes hashed into the template digest."""
    return b"".join([struct.pack("<I", len(f)) + f for f in fields])


def template_digest(alg: str, template: Template, fields) -> bytes:
    if template.name == "ima":
        d, n = fields
        return hash_bytes(alg, d + n.ljust(IMA_EVENT_NAME_LEN_MAX + 1, b"\0"))
    return hash_bytes(alg, template_data(fields))


# -- rendering ----------------------------------------------------------------------
def binary_record(pcr: int, digest: bytes, template: Template, fields, data: bytes | None = None) -> bytes:
    """One record of binary_runtime_measurements (kernel-abi.md §2.2);
    ``data`` is template_data(fields) when the caller has it already."""
    if template.name == "ima":
        d, n = fields
        name = n[:-1] if n.endswith(b"\0") else n
        return b"".join((struct.pack("<I", pcr), digest, b"\3\0\0\0ima", d,
                         struct.pack("<I", len(name)), name))
    tname = template.display_name.encode()
    if data is None:
        data = template_data(fields)
    return b"".join((struct.pack("<I", pcr), digest, struct.pack("<I", len(tname)), tname,
                     struct.pack("<I", len(data)), data))


def _a_hex(v: bytes) -> bytes:
    return v.hex().encode()


def _a_str(v: bytes) -> bytes:
    i = v.find(b"\0")
    return v if i < 0 else v[:i]


def _a_algo(v: bytes) -> bytes:
    if not v:
        return b""
    i = v.find(b"\0")
    return v[:i] + v[i + 1:].hex().encode()


def _a_uint(v: bytes) -> bytes:
    return b"%d" % int.from_bytes(v, "little") if v else b""


ASCII = {"d": _a_hex, "n": _a_str, "n-ng": _a_str, "xattrnames": _a_str,
         "d-ng": _a_algo, "d-modsig": _a_algo, "d-ngv2": _a_algo,
         "sig": _a_hex, "buf": _a_hex, "modsig": _a_hex, "evmsig": _a_hex,
         "xattrlengths": _a_hex, "xattrvalues": _a_hex,
         "iuid": _a_uint, "igid": _a_uint, "imode": _a_uint}


def ascii_fields(template: Template, fields) -> bytes:
    """The ASCII line after the template name: b" " + field, for every field."""
    return b"".join([b" " + ASCII[f](v) for f, v in zip(template.fields, fields)])


def _l_algo(v: bytes) -> int:
    return v.find(b"\0") + 2 * (len(v) - v.find(b"\0") - 1) if v else 0


def _l_str(v: bytes) -> int:
    i = v.find(b"\0")
    return len(v) if i < 0 else i


ASCII_LEN = {f: (lambda v: 2 * len(v)) for f, r in ASCII.items() if r is _a_hex}
ASCII_LEN.update({"n": _l_str, "n-ng": _l_str, "xattrnames": _l_str, "d-ng": _l_algo,
                  "d-modsig": _l_algo, "d-ngv2": _l_algo,
                  "iuid": lambda v: len(_a_uint(v)), "igid": lambda v: len(_a_uint(v)),
                  "imode": lambda v: len(_a_uint(v))})


def ascii_fields_len(template: Template, fields) -> int:
    """len(ascii_fields(template, fields)), without rendering."""
    return len(fields) + sum([ASCII_LEN[f](v) for f, v in zip(template.fields, fields)])


def ascii_record(pcr: int, digest: bytes, template: Template, fields) -> bytes:
    """One line of ascii_runtime_measurements (kernel-abi.md §2.1)."""
    return b"%2d %s %s%s\n" % (pcr, digest.hex().encode(), template.display_name.encode(),
                               ascii_fields(template, fields))


# -- parsing ------------------------------------------------------------------------
_U32 = struct.Struct("<I")
# the longest name a template can have: a format of 15 fields of 16 characters
MAX_TEMPLATE_NAME = MAX_FIELDS * (MAX_FIELD_ID + 1) - 1


def parse_binary_record(buf, offset: int, digest_len: int, ima_d_len: int = 20):
    """(pcr, digest, template, fields, next offset) of the record at ``offset``."""
    try:
        pcr, = _U32.unpack_from(buf, offset)
        o = offset + 4
        digest = bytes(buf[o:o + digest_len])
        o += digest_len
        nlen, = _U32.unpack_from(buf, o)
        o += 4
        if nlen == 0 or nlen > MAX_TEMPLATE_NAME:
            raise TemplateError(f"record at {offset}: bad template name length {nlen}")
        tname = bytes(buf[o:o + nlen]).decode("ascii")
        o += nlen
        template = lookup_template(tname)
        if template.name == "ima":
            d = bytes(buf[o:o + ima_d_len])
            o += ima_d_len
            ln, = _U32.unpack_from(buf, o)
            o += 4
            name = bytes(buf[o:o + ln])
            o += ln
            if len(d) != ima_d_len or len(name) != ln:
                raise TemplateError(f"record at {offset}: truncated")
            return pcr, digest, template, (d, name + b"\0"), o
        dlen, = _U32.unpack_from(buf, o)
        o += 4
        end = o + dlen
        if end > len(buf):
            raise TemplateError(f"record at {offset}: truncated template data")
        fields = []
        while o < end:
            flen, = _U32.unpack_from(buf, o)
            o += 4
            if o + flen > end:
                raise TemplateError(f"record at {offset}: field overruns the template data")
            fields.append(bytes(buf[o:o + flen]))
            o += flen
        if len(fields) != len(template.fields):
            raise TemplateError(f"record at {offset}: {len(fields)} fields for template {tname!r}")
        return pcr, digest, template, tuple(fields), o
    except struct.error:
        raise TemplateError(f"record at {offset}: truncated") from None
    except UnicodeDecodeError:
        raise TemplateError(f"record at {offset}: template name is not ASCII") from None


def parse_binary_list(buf, digest_len: int, ima_d_len: int = 20) -> list:
    out = []
    o = 0
    while o < len(buf):
        pcr, digest, template, fields, o = parse_binary_record(buf, o, digest_len, ima_d_len)
        out.append((pcr, digest, template, fields))
    return out


