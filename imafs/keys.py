"""The emulated keyrings: X.509 keys on ``.ima``, ``.builtin_trusted_keys``,
``.machine``, ``.platform`` and the digests on ``.blacklist``.

Kernel counterparts: the X.509 parser (crypto/asymmetric_keys/
x509_cert_parser.c, x509_public_key.c), the link restrictions (restrict.c,
certs/system_keyring.c), the blacklist (certs/blacklist.c) and the integrity
keyrings (security/integrity/digsig.c).

The one decision to know: a key is found the way ``request_asymmetric_key``
finds it for a signature, by ``id:<8 hex>`` — a *partial* match against the
tail of each of the key's two ids, ``id[0]`` = raw serial || raw issuer and
``id[1]`` = the subject key identifier (SKID).  ``Key.id`` is the 4-byte tail
the signer puts in ``signature_v2_hdr.keyid``: the SKID's, which openssl makes
(by default) the SHA-1 of the public key bits, the same bytes ``evmctl``
hashes when it signs with a private key alone.

A keyring is a plain ordered map, description -> key, as the kernel links
keys by (type, description): adding a certificate whose description is
already there replaces that key.  The caller's checks (the restriction of the
keyring, the permission of the caller) run before anything changes; a
refusal is a :class:`KeyringError` carrying the kernel's errno.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field
from typing import Iterator

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from .errors import RequestError

IMA = ".ima"
BUILTIN = ".builtin_trusted_keys"
MACHINE = ".machine"
PLATFORM = ".platform"
BLACKLIST = ".blacklist"
# The IMA keyring's name without CONFIG_INTEGRITY_TRUSTED_KEYRING (digsig.c);
# user space makes it (`keyctl newring _ima @u`) and it has no restriction.
IMA_UNTRUSTED = "_ima"

# the keyrings filled at boot only, and the profile key that fills each
BOOT_KEYS = {BUILTIN: "builtin_trusted_keys", MACHINE: "machine_keys", PLATFORM: "platform_keys"}

# the NIST curves of crypto/ecdsa.c (P-521 since 6.10; imafs takes it for every version)
EC_CURVES = ("secp192r1", "secp256r1", "secp384r1", "secp521r1")

MAX_DESCRIPTION = 4095  # a key's (and so a keyring's) description, at most

MAX_CERT = 64 * 1024  # larger than any certificate the kernel loads in practice

_HEX = re.compile(r"(?:[0-9a-f]{2})+")


class KeyringError(RequestError):
    """``add_key`` refused: ``errno`` is the kernel's answer; the message says why."""

    def __init__(self, err: int, why: str, log: tuple[str, ...] = ()):
        super().__init__(f"{os.strerror(err)} ({errno.errorcode[err]}): {why}")
        self.errno = err
        self.log = log  # what the kernel logs on the way


@dataclass(frozen=True)
class Key:
    """One asymmetric key made from an X.509 certificate."""

    id: bytes  # the 4 bytes a signature_v2_hdr names it by
    subject: str  # the kernel's fabricated name (CN, "O: CN", O or email)
    public_key: object = field(repr=False, compare=False)  # a cryptography public key
    der: bytes = field(repr=False)  # the certificate as the kernel got it (the KEY_CHECK buffer)
    keyring: str = ""
    # the kernel's asymmetric_key_ids: raw serial || raw issuer, SKID (if any)
    ids: tuple[bytes, ...] = field(default=(), repr=False)
    skid: bytes | None = field(default=None, repr=False)
    # the AKID: raw serial || raw issuer, keyIdentifier (restrict_link_by_signature's auth_ids)
    auth_ids: tuple[bytes | None, bytes | None] = field(default=(None, None), repr=False)
    cert: x509.Certificate | None = field(default=None, repr=False, compare=False)

    @property
    def description(self) -> str:
        """As /proc/keys shows it: "<subject>: <SKID hex, or serial hex>"."""
        return f"{self.subject}: {(self.skid if self.skid is not None else _raw_serial(self.cert)).hex()}"

    def matches(self, key_id: bytes) -> bool:
        """``id:<hex>`` as asymmetric_key_cmp_partial: the tail of either id."""
        return bool(key_id) and any(len(i) >= len(key_id) and i.endswith(key_id) for i in self.ids)


def _int_octets(n: int) -> bytes:
    """The content octets of a DER INTEGER (two's complement, minimal)."""
    return n.to_bytes((n + (n < 0)).bit_length() // 8 + 1, "big", signed=True)


def _raw_serial(cert: x509.Certificate) -> bytes:
    return _int_octets(cert.serial_number)


def _fabricated_name(name: x509.Name) -> str:
    """x509_fabricate_name: the last CN, O and emailAddress of the subject;
    CN alone when O is its prefix (or their first 7 characters agree)."""
    found = {}
    for attr in name:
        if attr.oid in (NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME, NameOID.EMAIL_ADDRESS):
            found[attr.oid] = attr.value if isinstance(attr.value, str) else attr.value.decode("latin-1")
    cn, o = found.get(NameOID.COMMON_NAME), found.get(NameOID.ORGANIZATION_NAME)
    if cn and o:
        cn_raw, o_raw = cn.encode(), o.encode()  # the kernel compares the bytes
        if cn_raw.startswith(o_raw) or (len(cn_raw) >= 7 and len(o_raw) >= 7 and cn_raw[:7] == o_raw[:7]):
            return cn
        return f"{o}: {cn}"
    return cn or o or found.get(NameOID.EMAIL_ADDRESS) or ""


def _der_of(data: bytes) -> bytes:
    """The DER of the one certificate in ``data`` (DER, or a PEM CERTIFICATE block)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        certs = load_certs(data)
        if len(certs) != 1:
            raise KeyringError(errno.EBADMSG, f"{len(certs)} certificates in one PEM input; give one")
        return certs[0]
    return data


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----.*?-----END \1-----", re.S)


def load_certs(data: bytes) -> list[bytes]:
    """DER certificates from a file's content: one DER certificate, or PEM
    with one or more CERTIFICATE blocks.  A PEM block of another kind (a
    private key) is refused by name, never read."""
    if not data.lstrip().startswith(b"-----BEGIN"):
        return [data]
    out = []
    for m in _PEM_BLOCK.finditer(data):
        kind = m.group(1).decode()
        if kind != "CERTIFICATE":
            raise KeyringError(errno.EBADMSG, f"a PEM {kind} block, not a CERTIFICATE "
                               "(give the X.509 certificate, never the private key)")
        try:
            out.append(x509.load_pem_x509_certificate(m.group(0)).public_bytes(Encoding.DER))
        except ValueError as e:
            raise KeyringError(errno.EBADMSG, f"not a PEM X.509 certificate ({_short(e)})") from None
    if not out:
        raise KeyringError(errno.EBADMSG, "no whole CERTIFICATE block in the PEM input")
    return out


def _short(e: Exception) -> str:
    """The first line of a parser's message, at most 100 characters."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text if len(text) <= 100 else text[:100] + "..."


def parse_cert(data: bytes, keyring: str = "") -> Key:
    """A :class:`Key` from one DER (or PEM) certificate, or a KeyringError
    with the kernel's errno: EBADMSG for what is not an X.509 certificate,
    ENOPKG for a key algorithm the kernel has no code for."""
    der = _der_of(data)
    try:
        cert = x509.load_der_x509_certificate(der)
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as e:
        raise KeyringError(errno.EBADMSG, f"not an X.509 certificate, DER or PEM ({_short(e)})") from None
    if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name not in EC_CURVES:
        raise KeyringError(errno.ENOPKG, f"ECDSA key on {pub.curve.name}: the kernel verifies "
                           f"{', '.join(EC_CURVES)} only")
    if not isinstance(pub, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise KeyringError(errno.ENOPKG, f"{type(pub).__name__.lstrip('_')}: the kernel verifies "
                           "RSA and ECDSA keys only")
    try:
        subject = _fabricated_name(cert.subject)
        raw_issuer = cert.issuer.public_bytes()
        skid, auth = _key_identifiers(cert)
    # cryptography parses names and extensions when asked, and a malformed
    # one can surface as any of these
    except (ValueError, KeyError, TypeError, UnicodeError) as e:
        raise KeyringError(errno.EBADMSG, f"bad X.509 certificate ({_short(e)})") from None
    ids = (_raw_serial(cert) + raw_issuer,) + ((skid,) if skid is not None else ())
    key_id = (skid if skid is not None else ids[0])[-4:]
    return Key(key_id, subject, pub, der, keyring, ids, skid, auth, cert)


def _key_identifiers(cert: x509.Certificate) -> tuple[bytes | None, tuple[bytes | None, bytes | None]]:
    """The SKID, and the AKID as the kernel's auth_ids: (raw serial || raw
    issuer of the authority, its key identifier)."""
    skid = None
    auth: tuple[bytes | None, bytes | None] = (None, None)
    for e in cert.extensions:
        if isinstance(e.value, x509.SubjectKeyIdentifier):
            skid = e.value.digest
        elif isinstance(e.value, x509.AuthorityKeyIdentifier):
            a = e.value
            serial_issuer = None
            if a.authority_cert_serial_number is not None and a.authority_cert_issuer:
                dn = next((g.value for g in a.authority_cert_issuer if isinstance(g, x509.DirectoryName)), None)
                if dn is not None:
                    serial_issuer = _int_octets(a.authority_cert_serial_number) + dn.public_bytes()
            auth = (serial_issuer, a.key_identifier)
    return skid, auth


def _verify(signer: Key, cert: x509.Certificate) -> bool:
    """Whether ``signer``'s key made ``cert``'s signature over its TBSCertificate."""
    pub = signer.public_key
    try:
        algo = cert.signature_hash_algorithm
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), algo)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(algo))
        else:
            return False
    except (InvalidSignature, TypeError, ValueError, UnsupportedAlgorithm):
        return False
    return True


def tbs_digest(cert: x509.Certificate, sha256: bool = True) -> bytes | None:
    """The digest of the TBSCertificate that ``tbs:<hex>`` blacklist entries
    name: SHA-256 since the ML-DSA series (7.0), before it the certificate's
    own signature hash (None if it has none)."""
    try:
        algo = hashes.SHA256() if sha256 else cert.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return None
    if algo is None:
        return None
    h = hashes.Hash(algo)
    h.update(cert.tbs_certificate_bytes)
    return h.finalize()


def blacklist_entry(text: str) -> str:
    """A ``.blacklist`` description as certs/blacklist.c accepts it:
    ``bin:<hex>`` or ``tbs:<hex>``, lower-case hex of whole bytes."""
    kind, sep, hexpart = text.strip().partition(":")
    if not sep or kind not in ("bin", "tbs") or not _HEX.fullmatch(hexpart):
        raise KeyringError(errno.EINVAL, f"{text.strip()[:80]!r}: a blacklist entry is bin:<hex> "
                           "or tbs:<hex>, lower-case hex digits, two per byte")
    return f"{kind}:{hexpart}"


class Keyrings:
    """The keyrings of one emulated kernel.

    ``trusted``: CONFIG_INTEGRITY_TRUSTED_KEYRING; the IMA keyring is then
    ``.ima``, restricted to keys signed by a key on ``.builtin_trusted_keys``
    (or, with ``permit_secondary`` =
    CONFIG_IMA_KEYRINGS_PERMIT_SIGNED_BY_BUILTIN_OR_SECONDARY, also by one on
    the secondary keyring, which links ``.machine``).  Without it the IMA
    keyring is ``_ima``, unrestricted; ``.ima`` names it too.  Any other
    name without a leading dot is a keyring of root's own, made when its
    first key comes (``keyctl newring NAME @u``, then ``evmctl import``).
    ``tbs_sha256``: how ``tbs:`` blacklist entries are hashed (tbs_digest).
    """

    def __init__(self, trusted: bool = False, permit_secondary: bool = False, tbs_sha256: bool = True):
        self.trusted = trusted
        self.permit_secondary = permit_secondary
        self.tbs_sha256 = tbs_sha256  # tbs: entries are SHA-256 (kernel >= 7.0), else the signature's hash
        self.ima_name = IMA if trusted else IMA_UNTRUSTED
        self._rings: dict[str, dict[str, Key]] = {name: {} for name in
                                                  (BUILTIN, MACHINE, self.ima_name, PLATFORM)}
        self._blacklist: set[str] = set()

    # -- names -------------------------------------------------------------------
    def name(self, keyring: str) -> str:
        """The kernel's name of ``keyring``; ``.ima`` and ``_ima`` both name the IMA keyring."""
        if keyring in (IMA, IMA_UNTRUSTED):
            return self.ima_name
        if keyring in self._rings or keyring == BLACKLIST:
            return keyring
        if keyring.startswith("."):  # the kernel's own; user space cannot make one
            raise KeyringError(errno.ENOKEY, f"no keyring {keyring!r}; keyrings: "
                               f"{', '.join((*self._rings, BLACKLIST))}, or a name of your own "
                               "without a leading dot")
        if not keyring or "\0" in keyring or len(keyring.encode()) > MAX_DESCRIPTION:
            raise KeyringError(errno.EINVAL, f"a keyring name is 1 to {MAX_DESCRIPTION} bytes, without NUL")
        return keyring

    def system(self) -> tuple[str, ...]:
        """The kernel's own keyrings (not root's own): those ``keyctl`` finds by name."""
        return (BUILTIN, MACHINE, self.ima_name, PLATFORM)

    # -- lookup --------------------------------------------------------------------
    def find(self, keyring: str, key_id: bytes) -> Key | None:
        """The key a signature naming ``key_id`` finds on ``keyring``
        (request_asymmetric_key's ``id:<hex>`` search), or None."""
        try:
            ring = self._rings.get(self.name(keyring), {})
        except KeyringError:
            return None
        return next((k for k in ring.values() if k.matches(key_id)), None)

    def __iter__(self) -> Iterator[Key]:
        for ring in self._rings.values():
            yield from ring.values()

    def blacklist(self) -> list[str]:
        return sorted(self._blacklist)

    def blacklisted(self, digest: bytes) -> bool:
        """is_binary_blacklisted: ``bin:<hex of digest>`` is on ``.blacklist``."""
        return f"bin:{digest.hex()}" in self._blacklist

    # -- changes -------------------------------------------------------------------
    def add(self, keyring: str, data: bytes, *, uid: int = 0, boot: bool = False) -> Key:
        """Add the certificate ``data`` (DER or PEM) to ``keyring`` as
        ``key_create_or_update`` would; ``uid`` is the caller's.  ``boot``:
        the kernel itself loads it (builtin keys), past every restriction."""
        name = self.name(keyring)
        if name == BLACKLIST:
            raise KeyringError(errno.EOPNOTSUPP, ".blacklist holds bin:/tbs: digests, not certificates; "
                               "use the blacklist command")
        if uid != 0 and not boot:
            # The integrity and system keyrings are owned by root and grant
            # nothing to other users: the lookup or the write is refused.
            raise KeyringError(errno.EACCES, f"uid {uid} may not add keys to {name} (owned by root, "
                               "no permissions for others)")
        if not boot and name in (BUILTIN, MACHINE, PLATFORM):
            # The kernel fills them at boot; their permissions give root
            # (not possessing them) no write: key_create_or_update says EACCES.
            raise KeyringError(errno.EACCES, f"{name} takes keys only at boot (set the profile's "
                               f"{BOOT_KEYS[name]})")
        key = parse_cert(data, name)
        tbs = tbs_digest(key.cert, self.tbs_sha256)
        if tbs is not None and f"tbs:{tbs.hex()}" in self._blacklist:
            raise KeyringError(errno.EKEYREJECTED, f"certificate {key.description!r} is blacklisted "
                               f"(tbs:{tbs.hex()})", log=(f"X.509: Cert {tbs.hex()} is blacklisted",))
        if not boot:
            self._restrict(name, key)
        self._rings.setdefault(name, {})[key.description] = key
        return key

    def _restrict(self, name: str, key: Key) -> None:
        """The keyring's restrict_link check: restrict_link_by_signature
        against the trusted keyrings, with its errnos."""
        if name != self.ima_name or not self.trusted:
            return
        trust = [BUILTIN, MACHINE] if self.permit_secondary else [BUILTIN]
        if key.auth_ids == (None, None):
            raise KeyringError(errno.ENOKEY, f"{key.description!r} has no authority key identifier, "
                               f"so no key on {' or '.join(trust)} can vouch for it")
        signer = self._authority(trust, key.auth_ids)
        if signer is None:
            raise KeyringError(errno.ENOKEY, f"{key.description!r} is not signed by a key on "
                               f"{' or '.join(trust)} (a self-signed key is refused on {name} with "
                               "integrity_trusted_keyring = true)")
        if not _verify(signer, key.cert):
            raise KeyringError(errno.EKEYREJECTED, f"the signature of {key.description!r} by "
                               f"{signer.description!r} does not verify")

    def _authority(self, rings: list[str], auth_ids) -> Key | None:
        """find_asymmetric_key with partial = false: an exact match on one id
        of the AKID, and the other must agree when both are given."""
        by_serial, by_keyid = auth_ids
        for ring in rings:
            for k in self._rings[ring].values():
                if by_serial is not None and k.ids[0] != by_serial:
                    continue
                if by_keyid is not None and k.skid != by_keyid:
                    continue
                return k
        return None

    def add_blacklist(self, entry: str) -> str:
        """Add a ``bin:``/``tbs:`` description to ``.blacklist``; returns it."""
        entry = blacklist_entry(entry)
        self._blacklist.add(entry)
        return entry


def read_cert_file(path: str, limit: int = MAX_CERT) -> bytes:
    """A blocking step: the content of a certificate file, a regular file of
    at most ``limit`` bytes (a FIFO would never end, a device is no certificate)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RequestError(f"{path}: not a regular file; give an X.509 certificate file")
        data = b""
        while len(data) <= limit and (chunk := os.read(fd, limit + 1 - len(data))):
            data += chunk
    except OSError as e:
        raise RequestError(f"{path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise RequestError(f"{path}: larger than {limit} bytes; not an X.509 certificate")
    return data
