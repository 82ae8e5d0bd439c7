"""``security.ima`` and its signatures (the kernel's ima_appraise.c xattr
helpers, integrity/digsig.c and digsig_asymmetric.c).

The xattr's first byte is its type (enum evm_ima_xattr_type):

* ``IMA_XATTR_DIGEST`` (0x01): a legacy digest, sha1 (or md5, 16 bytes or
  20 with 4 zero bytes);
* ``IMA_XATTR_DIGEST_NG`` (0x04): the hash algorithm's id, then the digest;
* ``EVM_IMA_XATTR_DIGSIG`` (0x03) and ``IMA_VERITY_DIGSIG`` (0x06): a
  ``signature_v2_hdr`` — type, version, hash algorithm, 4-byte key id and
  big-endian signature size, 9 bytes — then the signature.  Version 2 signs
  the file digest itself; version 3 signs the digest of an ``ima_file_id``
  (xattr type, algorithm, file digest), for a verity signature the fs-verity
  digest's.

Nothing here trusts a length or an id of the xattr: every function answers
for any bytes, as the kernel does, with its errno for the bad ones.
Signatures are verified with ``cryptography`` (RSA PKCS#1 v1.5, ECDSA);
a key of another type (SM2, EC-RDSA) is ENOPKG, as in a kernel built
without those.  The fs-verity digest is computed here (sha256 Merkle tree of
4096-byte blocks, no salt: what ``fsverity digest`` prints) unless the real
file has fs-verity enabled, whose own digest then wins.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import struct

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from . import templates as T

IMA_XATTR_DIGEST, EVM_IMA_XATTR_DIGSIG, IMA_XATTR_DIGEST_NG, IMA_VERITY_DIGSIG = 0x01, 0x03, 0x04, 0x06
IMA_XATTR_LAST = 0x07
SIG_HEADER = struct.Struct(">BBBIH")  # type, version, hash_algo, keyid, sig_size
HASH_ALGO_LAST = len(T.HASH_ALGOS)
_ALGO_BY_ID = {ident: name for name, (ident, _) in T.HASH_ALGOS.items()}
_CRYPTO_HASHES = {"md5": hashes.MD5, "sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256,
                  "sha384": hashes.SHA384, "sha512": hashes.SHA512, "sha3-256": hashes.SHA3_256,
                  "sha3-384": hashes.SHA3_384, "sha3-512": hashes.SHA3_512, "sm3": hashes.SM3}
VERITY_BLOCK = 4096
FS_IOC_MEASURE_VERITY = 0xC0046686  # _IOWR('f', 134, struct fsverity_digest)
FS_VERITY_ALGS = {1: "sha256", 2: "sha512"}


def algo_name(ident: int) -> str | None:
    return _ALGO_BY_ID.get(ident)


def hash_algo(xattr: bytes | None, default: str, kernel_version: tuple[int, int] = (7, 2)) -> str:
    """The file hash algorithm ``security.ima`` asks for (ima_get_hash_algo).

    From 7.1 a version 3 signature of type 0x03 names its algorithm too."""
    if not xattr or len(xattr) < 2:
        return default
    kind = xattr[0]
    if kind in (IMA_VERITY_DIGSIG, EVM_IMA_XATTR_DIGSIG):
        versions = (3,) if kind == IMA_VERITY_DIGSIG else (2, 3) if kernel_version >= (7, 1) else (2,)
        if len(xattr) <= SIG_HEADER.size or xattr[1] not in versions or xattr[2] >= HASH_ALGO_LAST:
            return default
        return algo_name(xattr[2])
    if kind == IMA_XATTR_DIGEST_NG:
        return algo_name(xattr[1]) or default
    if kind == IMA_XATTR_DIGEST:
        if len(xattr) == 21:
            return "md5" if xattr[17:21] == b"\0\0\0\0" else "sha1"
        if len(xattr) == 17:
            return "md5"
    return default


def hash_xattr(algo: str, digest: bytes) -> bytes:
    """The value ima_fix_xattr writes: legacy type 0x01 up to sha1, else 0x04 with the algorithm."""
    ident = T.HASH_ALGOS[algo][0]
    if ident <= T.HASH_ALGOS["sha1"][0]:
        return bytes([IMA_XATTR_DIGEST]) + digest
    return bytes([IMA_XATTR_DIGEST_NG, ident]) + digest


def file_id_hash(kind: int, algo: str, digest: bytes) -> bytes:
    """calc_file_id_hash: the digest of the used part of ``struct ima_file_id``."""
    return T.hash_bytes(algo, bytes([kind, T.HASH_ALGOS[algo][0]]) + digest)


class Verifier:
    """asymmetric_verify against the emulated keyrings.

    ``keyrings()`` returns the current kernel's :class:`imafs.keys.Keyrings`
    (a reboot makes new ones); ``log`` takes the printk lines the kernel
    writes on a failed key search."""

    def __init__(self, keyrings, log=None):
        self.keyrings = keyrings
        self.log = log or (lambda text: None)

    def verify(self, keyring: str, sig: bytes, digest: bytes) -> int:
        """integrity_digsig_verify for a v2/v3 header over ``digest``: 0 or -errno."""
        if len(sig) < 2:
            return -errno.EINVAL
        if sig[1] not in (2, 3):
            return -errno.EOPNOTSUPP if sig[1] != 1 else self._v1(keyring)
        if len(sig) <= SIG_HEADER.size:
            return -errno.EBADMSG
        _, _, algo_id, keyid, size = SIG_HEADER.unpack_from(sig)
        body = sig[SIG_HEADER.size:]
        if len(body) != size:
            return -errno.EBADMSG
        if algo_id >= HASH_ALGO_LAST:
            return -errno.ENOPKG
        rings = self.keyrings()
        keyring = rings.name(keyring)
        key = rings.find(keyring, keyid.to_bytes(4, "big"))
        if key is None:
            self.log(f"integrity: Request for unknown key 'id:{keyid:08x}' in '{keyring}' keyring. "
                     f"err {-errno.ENOKEY}")
            return -errno.ENOKEY
        return _verify_signature(key.public_key, algo_name(algo_id), body, digest)

    def _v1(self, keyring: str) -> int:
        """Version 1 (RSA over a bare MPI, evmctl --rsa) needs a "user" key the
        emulated keyrings never hold: the key search fails."""
        return -errno.ENOKEY


def _verify_signature(public_key, algo: str, sig: bytes, digest: bytes) -> int:
    """public_key_verify_signature: -EKEYREJECTED for a bad signature, -EINVAL
    for a digest that is not one of ``algo``, -ENOPKG for what is not built."""
    ctor = _CRYPTO_HASHES.get(algo)
    if ctor is None:
        return -errno.ENOPKG
    if len(digest) != T.HASH_ALGOS[algo][1]:
        return -errno.EINVAL
    try:
        prehashed = Prehashed(ctor())
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(sig, digest, padding.PKCS1v15(), prehashed)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and not _is_sm2(public_key):
            public_key.verify(sig, digest, ec.ECDSA(prehashed))
        else:
            return -errno.ENOPKG
    except InvalidSignature:
        return -errno.EKEYREJECTED
    except (ValueError, UnsupportedAlgorithm, TypeError):
        return -errno.EBADMSG
    return 0


def _is_sm2(public_key) -> bool:
    return public_key.curve.name.lower() in ("sm2", "sm2p256v1")


# -- fs-verity ---------------------------------------------------------------------------
def verity_digest(fd: int) -> tuple[str, bytes]:
    """A blocking step: (algorithm, digest) of the file's fs-verity
    descriptor: the file system's own if fs-verity is enabled on it, else
    computed as ``fsverity digest`` does with its defaults."""
    buf = bytearray(struct.pack("<HH", 0, 64) + bytes(64))
    try:
        fcntl.ioctl(fd, FS_IOC_MEASURE_VERITY, buf)
        alg, size = struct.unpack_from("<HH", buf)
        if alg in FS_VERITY_ALGS:
            return FS_VERITY_ALGS[alg], bytes(buf[4:4 + size])
    except OSError:
        pass
    return "sha256", _merkle_digest(fd)


def _merkle_digest(fd: int) -> bytes:
    size = 0
    level = bytearray()
    offset = 0
    while True:
        block = os.pread(fd, VERITY_BLOCK, offset)
        if not block:
            break
        offset += len(block)
        size += len(block)
        level += hashlib.sha256(block.ljust(VERITY_BLOCK, b"\0")).digest()
    root = bytes(32)
    if size:
        while len(level) > 32:
            nxt = bytearray()
            for i in range(0, len(level), VERITY_BLOCK):
                nxt += hashlib.sha256(bytes(level[i:i + VERITY_BLOCK]).ljust(VERITY_BLOCK, b"\0")).digest()
            level = nxt
        root = bytes(level)
    # struct fsverity_descriptor: version, hash_algorithm, log_blocksize, salt_size,
    # sig_size (0 when digested), data_size, root_hash[64], salt[32], reserved[144]
    desc = struct.pack("<BBBBIQ", 1, 1, 12, 0, 0, size) + root.ljust(64, b"\0") + bytes(32 + 144)
    return hashlib.sha256(desc).digest()
