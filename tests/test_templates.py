"""Templates, field encoders and renderers against the references' golden vectors
(kernel-abi.md §2–§4, kernel-observed.md F-3, F-9 … F-14) and round-trip properties."""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given, settings, strategies as st

from imafs import templates as T

# kernel-abi.md §2.2: TPM-bypass, ima_hash=sha256, ima-ng, first binary record
BOOT_NG_SHA256 = bytes.fromhex(
    "0a000000" "0adefe762c149c7cec19da62f0da1297fcfbffff" "06000000" "696d612d6e67"
    "3f000000" "28000000" "7368613235363a00" + "00" * 32 +
    "0f000000" "626f6f745f616767726567617465" "00")
CUSTOM = "d-ng|n-ng|iuid|igid|imode"
FILE_MODE = 0o100644  # F-9 / F-14: files show "0 0 33188"


def boot_event(ima_hash: str) -> T.Event:
    """boot_aggregate in TPM-bypass: zeros of the IMA hash size; 20 zeros for `d`."""
    return T.Event(name=b"boot_aggregate", file_digest=bytes(T.digest_size(ima_hash)),
                   file_algo=ima_hash, ima_hash=ima_hash, d_digest=bytes(20))


def record(tmpl: T.Template, ev: T.Event, pcr: int = 10, bank: str = "sha1", violation: bool = False):
    """(fields, template digest, binary record, ascii line) as the store makes them."""
    fields = T.encode_fields(tmpl, ev)
    digest = bytes(T.digest_size(bank)) if violation else T.template_digest(bank, tmpl, fields)
    return fields, digest, T.binary_record(pcr, digest, tmpl, fields), T.ascii_record(pcr, digest, tmpl, fields)


def file_event(name: bytes, **kw) -> T.Event:
    kw.setdefault("file_digest", hashlib.sha256(name).digest())
    return T.Event(name=name, **kw)


# -- golden vectors ------------------------------------------------------------------
def test_boot_aggregate_ima_ng_sha256_binary_record_byte_for_byte():
    fields, digest, rec, _ = record(T.BUILTIN_TEMPLATES["ima-ng"], boot_event("sha256"))
    assert len(rec) == 101
    assert rec == BOOT_NG_SHA256
    assert fields == (b"sha256:\0" + bytes(32), b"boot_aggregate\0")


# kernel-abi.md §4.1 and kernel-observed.md F-11: SHA-1 template digests of boot_aggregate, TPM-bypass
@pytest.mark.parametrize("name,ima_hash,digest", [
    ("ima-ng", "sha1", "1d8d532d463c9f8c205d0df7787669a85f93e260"),
    ("ima-ng", "sha256", "0adefe762c149c7cec19da62f0da1297fcfbffff"),
    ("ima", "sha1", "719de8e521439498e9b77f6ed41e230b9821111e"),
    ("ima-sig", "sha256", "4f38ef8f82bbc2a73f2169c57ff5c76e14ce353d"),
    ("ima-ng", "sha512", "45e7e585a82d311e1ee226b4256604c341dbc6b9"),
    ("ima-ngv2", "sha256", "e14034aa902a65ec97eefad1b8594d2eb9056b5e"),
    (CUSTOM, "sha256", "e84ed85ed59ed29ee4677bcd6b25d693cb38cf50"),
])
def test_boot_aggregate_sha1_template_digest(name, ima_hash, digest):
    tmpl = T.lookup_template(name)
    assert T.template_digest("sha1", tmpl, T.encode_fields(tmpl, boot_event(ima_hash))).hex() == digest


def test_boot_aggregate_sha256_bank_digest():
    tmpl = T.BUILTIN_TEMPLATES["ima-ng"]
    h = T.template_digest("sha256", tmpl, T.encode_fields(tmpl, boot_event("sha256"))).hex()
    assert h.startswith("36f1cd67") and h.endswith("9078a0") and len(h) == 64


def test_ima_template_digest_pads_the_name_to_256_bytes():
    tmpl = T.BUILTIN_TEMPLATES["ima"]
    fields = T.encode_fields(tmpl, boot_event("sha1"))
    assert fields == (bytes(20), b"boot_aggregate\0")
    assert T.template_digest("sha1", tmpl, fields) == \
        hashlib.sha1(bytes(20) + b"boot_aggregate".ljust(256, b"\0")).digest()


def test_ima_binary_record_layout():
    tmpl = T.BUILTIN_TEMPLATES["ima"]
    fields, digest, rec, _ = record(tmpl, boot_event("sha1"))
    assert digest.hex() == "719de8e521439498e9b77f6ed41e230b9821111e"
    assert rec == (struct.pack("<I", 10) + digest + b"\3\0\0\0ima" + bytes(20)
                   + struct.pack("<I", 14) + b"boot_aggregate")
    assert T.parse_binary_record(rec, 0, 20) == (10, digest, tmpl, fields, len(rec))


def test_boot_lists_ima_sig_106_and_ima_ng_101_bytes():  # F-3, F-11
    _, d_sig, sig, _ = record(T.BUILTIN_TEMPLATES["ima-sig"], boot_event("sha256"))
    assert len(sig) == 106 and d_sig.hex() == "4f38ef8f82bbc2a73f2169c57ff5c76e14ce353d"
    assert sig == (struct.pack("<I", 10) + d_sig + b"\7\0\0\0ima-sig" + struct.pack("<I", 67)
                   + BOOT_NG_SHA256[38:] + bytes(4))
    assert len(record(T.BUILTIN_TEMPLATES["ima-ng"], boot_event("sha256"))[2]) == 101


def test_ima_sig_line_without_signature_ends_in_a_space():  # F-9
    _, digest, _, line = record(T.BUILTIN_TEMPLATES["ima-sig"], boot_event("sha256"))
    assert line == b"10 " + digest.hex().encode() + b" ima-sig sha256:" + b"0" * 64 + b" boot_aggregate \n"


@pytest.mark.parametrize("name,text", [("ima-ng", b" ima-ng sha256:"), ("ima-ngv2", b" ima-ngv2 ima:sha256:")])
def test_ima_ng_and_ngv2_lines_have_no_trailing_space(name, text):  # F-9
    _, digest, _, line = record(T.lookup_template(name), boot_event("sha256"))
    assert line == b"10 " + digest.hex().encode() + text + b"0" * 64 + b" boot_aggregate\n"


def test_ngv2_verity_digest_type():
    ev = file_event(b"/m/v", digest_type="verity")
    assert T.ascii_fields(T.BUILTIN_TEMPLATES["ima-ngv2"], T.encode_fields(T.BUILTIN_TEMPLATES["ima-ngv2"], ev)) \
        == b" verity:sha256:" + ev.file_digest.hex().encode() + b" /m/v"
    with pytest.raises(T.TemplateError):
        T.encode_fields(T.BUILTIN_TEMPLATES["ima-ngv2"], file_event(b"/m/v", digest_type="fsverity"))


def test_pcr_below_10_is_printed_with_a_leading_space():  # F-9
    _, digest, _, line = record(T.BUILTIN_TEMPLATES["ima-ng"], file_event(b"/m/f"), pcr=9)
    assert line.startswith(b" 9 " + digest.hex().encode() + b" ima-ng ")
    assert record(T.BUILTIN_TEMPLATES["ima-ng"], file_event(b"/m/f"), pcr=63)[3].startswith(b"63 ")


def test_spaces_become_underscores_tabs_and_newlines_stay_raw():  # F-9, kernel-abi §3.2
    tmpl = T.BUILTIN_TEMPLATES["ima-ng"]
    fields, _, rec, line = record(tmpl, file_event(b"/m/with space\tand\nnl (deleted)"))
    assert fields[1] == b"/m/with_space\tand\nnl_(deleted)\0"
    assert line.endswith(b" /m/with_space\tand\nnl_(deleted)\n")  # the entry spans two lines
    assert line.count(b"\n") == 2
    assert b"/m/with_space" in rec


def test_names_stop_at_nul_like_strlen():
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima-ng"], file_event(b"/m/a b\0c d"))[1] == b"/m/a_b\0"


def test_custom_format_prints_its_format_and_separators_of_empty_fields():  # F-9, F-11
    tmpl = T.lookup_template(CUSTOM)
    assert tmpl.name == "" and tmpl.fmt == CUSTOM and tmpl.display_name == CUSTOM
    fields, digest, rec, line = record(tmpl, boot_event("sha256"))
    assert fields[2:] == (b"", b"", b"")
    assert line == b"10 " + digest.hex().encode() + b" " + CUSTOM.encode() + b" sha256:" + b"0" * 64 \
        + b" boot_aggregate   \n"
    assert rec[24:28] == struct.pack("<I", len(CUSTOM)) and rec[28:28 + len(CUSTOM)] == CUSTOM.encode()
    ev = file_event(b"/m/f", uid=0, gid=0, mode=FILE_MODE)
    assert record(tmpl, ev)[3].endswith(b" /m/f 0 0 33188\n")


def test_long_names_ima_records_the_basename_ima_ng_the_path():  # F-10
    long = b"/m/" + b"d" * 200 + b"/" + b"f" * 100
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima"], file_event(long, file_algo="sha1",
                                                                  file_digest=bytes(20)))[1] == b"f" * 100 + b"\0"
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima-ng"], file_event(long))[1] == long + b"\0"


@pytest.mark.parametrize("name,stored", [
    (b"/" + b"x" * 254, b"/" + b"x" * 254 + b"\0"),  # 255 characters: kept
    (b"/a/" + b"x b" * 100, b"x_b" * 100 + b"\0"),  # 303: the base name, spaces replaced
    (b"k" * 300, b"k" * 255 + b"\0"),  # no file (no path): truncated to 255
])
def test_n_field_length_limit(name, stored):
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima"], file_event(name, file_algo="sha1",
                                                                  file_digest=bytes(20)))[1] == stored


# F-14: violations show zeros of the IMA hash size with its prefix; `ima` shows 40 zeros
@pytest.mark.parametrize("name,ima_hash,text", [
    ("ima-ng", "sha256", b"sha256:" + b"0" * 64),
    ("ima-ng", "sha1", b"sha1:" + b"0" * 40),
    ("ima-ng", "sha512", b"sha512:" + b"0" * 128),
    ("ima-ngv2", "sha256", b"ima:sha256:" + b"0" * 64),
    ("ima", "sha1", b"0" * 40),
])
def test_violation_digest_fields(name, ima_hash, text):
    tmpl = T.lookup_template(name)
    ev = file_event(b"/m/v", violation=True, ima_hash=ima_hash, file_algo="sha384",
                    file_digest=b"\1" * 48, digest_type="verity")
    _, _, rec, line = record(tmpl, ev, violation=True)
    assert line == b"10 " + b"0" * 40 + b" " + name.encode() + b" " + text + b" /m/v\n"
    assert T.parse_binary_record(rec, 0, 20)[3] == T.encode_fields(tmpl, ev)


def test_violation_d_is_20_zeros_even_with_md5():
    tmpl = T.BUILTIN_TEMPLATES["ima"]
    fields, _, rec, _ = record(tmpl, T.Event(name=b"/m/v", violation=True, ima_hash="md5"), violation=True)
    assert fields[0] == bytes(20)
    # an md5 list: `d` has 16 bytes, but a violation (zero digest) has 20
    ok = record(tmpl, T.Event(name=b"/m/f", file_digest=b"\1" * 16, file_algo="md5", ima_hash="md5"))
    assert ok[0][0] == b"\1" * 16
    parsed = T.parse_binary_list(rec + ok[2], 20, ima_d_len=16)
    assert [f for _, _, _, f in parsed] == [fields, ok[0]]


def test_violation_other_fields_are_filled_and_sig_falls_back_to_evm():  # kernel-abi §4.4, F-14
    ev = file_event(b"/m/v", violation=True, uid=0, gid=0, mode=FILE_MODE,
                    ima_xattr=b"\3\2sig", evm_xattr=b"\5evm")
    assert record(T.lookup_template(CUSTOM), ev, violation=True)[3].endswith(b" /m/v 0 0 33188\n")
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima-sig"], ev)[2] == b"\5evm"
    ev.evm_xattr = None
    assert T.encode_fields(T.BUILTIN_TEMPLATES["ima-sig"], ev)[2] == b""


# -- field encodings -------------------------------------------------------------------
@pytest.mark.parametrize("ima,evm,want", [
    (b"\3\2sig", None, b"\3\2sig"),  # EVM_IMA_XATTR_DIGSIG
    (b"\6v", b"\5evm", b"\6v"),  # IMA_VERITY_DIGSIG wins over EVM
    (b"\4\4digest", b"\5evm", b"\5evm"),  # digest: EVM portable signature instead
    (b"\4xx", b"\2hmac", b""),  # EVM HMAC is not a signature
    (None, b"\3x", b""),  # security.evm must be type 5
    (None, None, b""),
])
def test_sig_field_sources(ima, evm, want):
    fields = T.encode_fields(T.BUILTIN_TEMPLATES["ima-sig"], file_event(b"/f", ima_xattr=ima, evm_xattr=evm))
    assert fields[2] == want
    assert T.ascii_fields(T.BUILTIN_TEMPLATES["ima-sig"], fields).endswith(b" /f " + want.hex().encode())


def test_evm_sig_fields():
    tmpl = T.BUILTIN_TEMPLATES["evm-sig"]
    ev = file_event(b"/f", evm_xattr=b"\5s", uid=1000, gid=2, mode=0o100755,
                    evm_xattrs=(("security.ima", b"\4ab"), ("security.capability", b"cap")))
    f = T.encode_fields(tmpl, ev)
    assert f[2:] == (b"\5s", b"security.ima|security.capability\0", struct.pack("<II", 3, 3),
                     b"\4abcap", struct.pack("<I", 1000), struct.pack("<I", 2), struct.pack("<H", 0o100755))
    assert T.ascii_fields(tmpl, f).endswith(
        b" 0573 security.ima|security.capability 0300000003000000 046162636170 1000 2 33261")
    no_file = T.encode_fields(tmpl, T.Event(name=b"kexec-cmdline", file_digest=bytes(32)))
    assert no_file[2:] == (b"",) * 7
    assert T.ascii_fields(tmpl, no_file).endswith(b" kexec-cmdline" + b" " * 7)


def test_d_field_sources():
    d = T.BUILTIN_TEMPLATES["ima"]
    assert T.encode_fields(d, file_event(b"/f", file_algo="sha1", file_digest=b"\1" * 20,
                                         d_digest=b"\2" * 20))[0] == b"\1" * 20
    assert T.encode_fields(d, file_event(b"/f", d_digest=b"\2" * 20))[0] == b"\2" * 20
    with pytest.raises(T.TemplateError):
        T.encode_fields(d, file_event(b"/f"))  # sha256 content digest and no sha1 one


def test_ima_buf_kernel_version():  # F-12
    release = b"6.12.117+deb12-amd64"
    tmpl = T.BUILTIN_TEMPLATES["ima-buf"]
    ev = T.Event(name=b"kernel_version", buf=release, file_digest=hashlib.sha256(release).digest())
    assert T.ascii_fields(tmpl, T.encode_fields(tmpl, ev)) == (
        b" sha256:" + hashlib.sha256(release).hexdigest().encode()
        + b" kernel_version 362e31322e3131372b64656231322d616d643634")


def test_modsig_fields():
    tmpl = T.BUILTIN_TEMPLATES["ima-modsig"]
    assert T.encode_fields(tmpl, file_event(b"/f"))[3:] == (b"", b"")
    ev = file_event(b"/f", modsig=b"\x30\x82pkcs7", modsig_digest=b"\7" * 32)
    f = T.encode_fields(tmpl, ev)
    assert f[3:] == (b"sha256:\0" + b"\7" * 32, b"\x30\x82pkcs7")
    assert T.ascii_fields(tmpl, f).endswith(b" sha256:" + b"07" * 32 + b" 3082706b637337")


def test_uint_rendering_by_length():
    tmpl = T.lookup_template("iuid")
    for v, text in [(b"\xff", b"255"), (b"\1\2", b"513"), (b"\xff" * 4, b"4294967295"),
                    (b"\xff" * 8, b"18446744073709551615"), (b"\1\2\3", b""), (b"", b"")]:
        assert T.ascii_fields(tmpl, (v,)) == b" " + text
        assert T.ascii_fields_len(tmpl, (v,)) == 1 + len(text)


def test_bad_events():
    with pytest.raises(T.TemplateError):
        T.encode_fields(T.BUILTIN_TEMPLATES["ima-ng"], T.Event(name=b"/f"))  # no digest
    with pytest.raises(T.TemplateError):
        T.encode_fields(T.BUILTIN_TEMPLATES["ima-ng"], T.Event(name=b"/f", file_digest=bytes(20)))
    with pytest.raises(T.UnknownHashError):
        T.encode_fields(T.BUILTIN_TEMPLATES["ima-ng"], T.Event(name=b"/f", file_digest=bytes(32), file_algo="x"))


# -- lookup --------------------------------------------------------------------------
def test_builtin_templates():
    assert {n: t.fmt for n, t in T.BUILTIN_TEMPLATES.items()} == {
        "ima": "d|n", "ima-ng": "d-ng|n-ng", "ima-ngv2": "d-ngv2|n-ng", "ima-sig": "d-ng|n-ng|sig",
        "ima-sigv2": "d-ngv2|n-ng|sig", "ima-buf": "d-ng|n-ng|buf", "ima-modsig": "d-ng|n-ng|sig|d-modsig|modsig",
        "evm-sig": "d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode"}
    assert T.FIELD_IDS == {"d", "n", "d-ng", "n-ng", "d-ngv2", "sig", "buf", "d-modsig", "modsig", "evmsig",
                           "iuid", "igid", "imode", "xattrnames", "xattrlengths", "xattrvalues"}
    for name, t in T.BUILTIN_TEMPLATES.items():
        assert t.display_name == name and t.fields == tuple(t.fmt.split("|"))
        assert T.lookup_template(name) is t and T.lookup_template(t.fmt) is t


def test_lookup_by_format_returns_the_builtin():
    assert T.lookup_template("d-ng|n-ng") is T.BUILTIN_TEMPLATES["ima-ng"]
    assert T.lookup_template("d|n").display_name == "ima"


def test_custom_templates():
    t = T.lookup_template("n-ng|d-ng")
    assert (t.name, t.fmt, t.fields, t.display_name) == ("", "n-ng|d-ng", ("n-ng", "d-ng"), "n-ng|d-ng")
    assert t == T.Template("", "n-ng|d-ng", ("n-ng", "d-ng"))
    assert len(T.lookup_template("|".join(["n-ng"] * 15)).fields) == 15


@pytest.mark.parametrize("bad", [
    "|".join(["n-ng"] * 16),  # 16 fields
    "d-ng|n-ng|bogus",  # unknown field
    "no-such-template",
    "d-ng||n-ng", "d-ng|", "",  # empty field ids
    "d-ng|" + "x" * 17,  # field id over 16 characters
])
def test_lookup_errors(bad):
    with pytest.raises(T.TemplateError):
        T.lookup_template(bad)


def test_template_fields_must_match_the_format():
    with pytest.raises(T.TemplateError):
        T.Template("", "d-ng|n-ng", ("d-ng",))
    with pytest.raises(T.TemplateError):
        T.Template("", "d-ng|bogus", ("d-ng", "bogus"))


# -- hashes --------------------------------------------------------------------------
def test_hash_algos_ids_and_sizes():
    assert list(T.HASH_ALGOS) == ["md4", "md5", "sha1", "rmd160", "sha256", "sha384", "sha512", "sha224",
                                  "rmd128", "rmd256", "rmd320", "wp256", "wp384", "wp512", "tgr128", "tgr160",
                                  "tgr192", "sm3", "streebog256", "streebog512", "sha3-256", "sha3-384",
                                  "sha3-512"]
    assert [i for i, _ in T.HASH_ALGOS.values()] == list(range(23))
    assert T.digest_size("sha1") == 20 and T.digest_size("sm3") == 32 and T.digest_size("sha3-384") == 48
    with pytest.raises(T.UnknownHashError):
        T.digest_size("sha7")


@pytest.mark.parametrize("alg,name", [("sha256", "sha256"), ("sha3-256", "sha3_256"), ("sha3-512", "sha3_512"),
                                      ("rmd160", "ripemd160"), ("sm3", "sm3"), ("wp512", "whirlpool")])
def test_hashes_map_to_openssl(alg, name):
    try:
        want = hashlib.new(name, b"imafs").digest()
    except ValueError:
        with pytest.raises(T.UnknownHashError):
            T.new_hash(alg)
        return
    assert T.hash_bytes(alg, b"imafs") == want and len(want) == T.digest_size(alg)
    h = T.new_hash(alg)
    h.update(b"ima")
    h.update(b"fs")
    assert h.digest() == want


@pytest.mark.parametrize("alg", ["tgr192", "streebog256", "sha7"])
def test_unavailable_hashes(alg):
    with pytest.raises(T.UnknownHashError):
        T.hash_bytes(alg, b"")


# -- parsing -----------------------------------------------------------------------------
def test_parse_the_golden_record():
    assert T.parse_binary_record(b"junk" + BOOT_NG_SHA256 + b"next", 4, 20) == (
        10, BOOT_NG_SHA256[4:24], T.BUILTIN_TEMPLATES["ima-ng"],
        (b"sha256:\0" + bytes(32), b"boot_aggregate\0"), 105)


@pytest.mark.parametrize("name", ["ima-ng", "ima"])
def test_every_truncation_is_an_error(name):
    rec = record(T.lookup_template(name), boot_event("sha1"))[2]
    for cut in range(1, len(rec)):
        with pytest.raises(T.TemplateError):
            T.parse_binary_list(rec[:cut], 20)


def _ng_record(name: bytes, fields, extra: bytes = b"", dlen_delta: int = 0) -> bytes:
    data = T.template_data(fields) + extra
    return (struct.pack("<I", 10) + bytes(20) + struct.pack("<I", len(name)) + name
            + struct.pack("<I", len(data) + dlen_delta) + data)


@pytest.mark.parametrize("rec", [
    _ng_record(b"ima-ng", (b"sha1:\0" + bytes(20),)),  # a field missing
    _ng_record(b"ima-ng", (b"a", b"b\0", b"c")),  # a field too many
    _ng_record(b"ima-ng", (b"a", b"b\0"), dlen_delta=-1) + b"\0",  # the data length cuts the last field
    _ng_record(b"ima-ng", (b"a", b"b\0"), extra=b"\0\0"),  # bytes after the fields
    _ng_record(b"ima-ng", (b"a", b"b\0"), dlen_delta=1),  # data past the end of the buffer
    _ng_record(b"bogus", (b"a", b"b\0")),  # unknown template
    _ng_record(b"", (b"a", b"b\0")),  # empty name
    _ng_record(b"ima-\xffng", (b"a", b"b\0")),  # not ASCII
    _ng_record(b"|".join([b"n-ng"] * 16), (b"a\0",) * 16),  # too many fields
])
def test_malformed_records(rec):
    with pytest.raises(T.TemplateError):
        T.parse_binary_record(rec, 0, 20)


def test_template_names_of_69_characters_or_more_are_refused():
    evm_sig = T.BUILTIN_TEMPLATES["evm-sig"]
    assert len(evm_sig.fmt) == T.MAX_TEMPLATE_NAME_LEN - 1 == 68
    assert T.parse_binary_record(_ng_record(evm_sig.fmt.encode(), (b"",) * 9), 0, 20)[2] is evm_sig
    long = T.lookup_template("sig|" + evm_sig.fmt)  # a valid boot format, but too long to restore
    rec = T.binary_record(10, bytes(20), long, (b"",) * len(long.fields))
    with pytest.raises(T.TemplateError, match="name length"):
        T.parse_binary_record(rec, 0, 20)


def test_a_record_named_by_the_ima_format_has_the_generic_layout():
    # a kernel booted with ima_template_fmt=d|n writes "d|n" records; restoring finds `ima` by its format
    custom = T.Template("", "d|n", ("d", "n"))
    fields = T.encode_fields(custom, boot_event("sha1"))
    assert T.template_digest("sha1", custom, fields) == hashlib.sha1(T.template_data(fields)).digest()
    rec = T.binary_record(10, bytes(20), custom, fields)
    assert rec[24:31] == b"\3\0\0\0d|n" and rec[31:35] == struct.pack("<I", len(T.template_data(fields)))
    assert T.parse_binary_record(rec, 0, 20) == (10, bytes(20), T.BUILTIN_TEMPLATES["ima"], fields, len(rec))


def test_parse_list_of_wider_digests():
    tmpl = T.BUILTIN_TEMPLATES["ima-sig"]
    recs = [record(tmpl, file_event(b"/f%d" % i), bank="sha512") for i in range(3)]
    parsed = T.parse_binary_list(b"".join(r[2] for r in recs), 64)
    assert [(p, d, t, f) for p, d, t, f in parsed] == [(10, r[1], tmpl, r[0]) for r in recs]


# -- properties --------------------------------------------------------------------------
ALGOS = ["md5", "sha1", "sha256", "sha512", "sm3", "sha3-256"]
names = st.binary(min_size=1, max_size=400).filter(lambda b: b"\0" not in b)
opt_bytes = st.one_of(st.none(), st.binary(max_size=40))
custom_fmts = st.lists(st.sampled_from(sorted(T.FIELD_IDS)), min_size=1, max_size=15).map("|".join)
templates = st.one_of(
    st.sampled_from(sorted(T.BUILTIN_TEMPLATES)).map(T.lookup_template),
    custom_fmts.map(T.lookup_template),
    # ima_template_fmt= at boot: name "" even when the format is a builtin's
    st.one_of(custom_fmts, st.sampled_from([t.fmt for t in T.BUILTIN_TEMPLATES.values()]))
    .map(lambda f: T.Template("", f, tuple(f.split("|")))),
)
xattr_names = st.sampled_from(["security.selinux", "security.SMACK64", "security.apparmor", "security.ima",
                               "security.capability"])


@st.composite
def events(draw):
    algo = draw(st.sampled_from(ALGOS))
    ima_hash = draw(st.sampled_from(ALGOS))
    size = T.digest_size(algo)
    modsig = draw(opt_bytes)
    return T.Event(
        name=draw(names), file_digest=draw(st.binary(min_size=size, max_size=size)), file_algo=algo,
        ima_hash=ima_hash, d_digest=draw(st.binary(min_size=20, max_size=20)), violation=draw(st.booleans()),
        buf=draw(opt_bytes), ima_xattr=draw(opt_bytes), evm_xattr=draw(opt_bytes),
        evm_xattrs=tuple(draw(st.lists(st.tuples(xattr_names, st.binary(max_size=20)), max_size=4))),
        uid=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
        gid=draw(st.one_of(st.none(), st.integers(0, 2**32 - 1))),
        mode=draw(st.one_of(st.none(), st.integers(0, 2**16 - 1))),
        digest_type=draw(st.sampled_from(["ima", "verity"])),
        modsig=modsig, modsig_digest=draw(st.binary(min_size=1, max_size=64)) if modsig else None)


@settings(max_examples=400, deadline=None)
@given(templates, events(), st.integers(0, 63), st.sampled_from(["sha1", "sha256", "sha512"]))
def test_binary_round_trip(tmpl, ev, pcr, bank):
    fields = T.encode_fields(tmpl, ev)
    assert len(fields) == len(tmpl.fields)
    digest = bytes(T.digest_size(bank)) if ev.violation else T.template_digest(bank, tmpl, fields)
    rec = T.binary_record(pcr, digest, tmpl, fields)
    assert rec == T.binary_record(pcr, digest, tmpl, fields, T.template_data(fields))
    ima_d_len = len(fields[0]) if tmpl.name == "ima" else 20
    if len(tmpl.display_name) >= T.MAX_TEMPLATE_NAME_LEN:
        with pytest.raises(T.TemplateError):
            T.parse_binary_record(rec, 0, len(digest), ima_d_len)
        return
    parsed = T.parse_binary_record(b"head" + rec + b"tail", 4, len(digest), ima_d_len)
    assert parsed == (pcr, digest, T.lookup_template(tmpl.display_name), fields, 4 + len(rec))
    assert T.parse_binary_list(rec * 3, len(digest), ima_d_len) == [parsed[:4]] * 3


@settings(max_examples=400, deadline=None)
@given(templates, events(), st.integers(0, 63), st.binary(min_size=20, max_size=64))
def test_ascii_line_and_lengths(tmpl, ev, pcr, digest):
    fields = T.encode_fields(tmpl, ev)
    text = T.ascii_fields(tmpl, fields)
    line = T.ascii_record(pcr, digest, tmpl, fields)
    assert line == b"%2d %s %s" % (pcr, digest.hex().encode(), tmpl.display_name.encode()) + text + b"\n"
    assert len(text) == T.ascii_fields_len(tmpl, fields)
    assert text.startswith(b" ") and text.count(b" ") >= len(fields)
    data = T.template_data(fields)
    assert len(data) == sum(4 + len(f) for f in fields)
    o = 0
    for f in fields:
        assert struct.unpack_from("<I", data, o)[0] == len(f) and data[o + 4:o + 4 + len(f)] == f
        o += 4 + len(f)
    if tmpl.name != "ima":
        assert T.template_digest("sha256", tmpl, fields) == hashlib.sha256(data).digest()


@settings(max_examples=300, deadline=None)
@given(names, st.sampled_from(["ima-ng", "ima-sig", "ima-buf", "ima-ngv2"]))
def test_names_never_add_spaces_to_the_line(name, tname):
    tmpl = T.BUILTIN_TEMPLATES[tname]
    ev = file_event(name)
    fields = T.encode_fields(tmpl, ev)
    assert b" " not in fields[1] and fields[1].endswith(b"\0")
    assert T.ascii_fields(tmpl, fields).split(b" ")[2] == name.replace(b" ", b"_")
