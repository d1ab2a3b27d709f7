"""Digest and content-encryption algorithms SCEP clients use, keyed by OID. No I/O.

RFC 8894 §3.5.2: SHA-1/SHA-256/SHA-512 and AES/DES3 are what GetCACaps advertises; SHA-224 and
SHA-384 are accepted because iOS and some routers send them. Single DES is read (micromdm's
scepclient and old devices send nothing else) but answered with DES3; RC2 is refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from hsmscep.errors import MessageError


@dataclass(frozen=True, slots=True)
class Digest:
    name: str
    oid: str
    digest_info_prefix: bytes  # DER DigestInfo up to the hash value (RFC 8017 §9.2 note 1)

    def hash(self) -> hashes.HashAlgorithm:
        return _HASH_CLASSES[self.name]()

    def compute(self, data: bytes) -> bytes:
        """The digest of `data` (hashlib's named constructor: hashlib.new looks it up anew)."""
        return _HASH_FUNCTIONS[self.name](data).digest()


# hashlib's constructors by name; every name of _HASH_CLASSES, each a fixed-output hash.
_HASH_FUNCTIONS: dict[str, Callable[[bytes], hashlib._Hash]] = {
    "sha1": hashlib.sha1,
    "sha224": hashlib.sha224,
    "sha256": hashlib.sha256,
    "sha384": hashlib.sha384,
    "sha512": hashlib.sha512,
}


_HASH_CLASSES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

DIGESTS: dict[str, Digest] = {
    d.oid: d
    for d in (
        Digest("sha1", "1.3.14.3.2.26", bytes.fromhex("3021300906052b0e03021a05000414")),
        Digest(
            "sha224",
            "2.16.840.1.101.3.4.2.4",
            bytes.fromhex("302d300d06096086480165030402040500041c"),
        ),
        Digest(
            "sha256",
            "2.16.840.1.101.3.4.2.1",
            bytes.fromhex("3031300d060960864801650304020105000420"),
        ),
        Digest(
            "sha384",
            "2.16.840.1.101.3.4.2.2",
            bytes.fromhex("3041300d060960864801650304020205000430"),
        ),
        Digest(
            "sha512",
            "2.16.840.1.101.3.4.2.3",
            bytes.fromhex("3051300d060960864801650304020305000440"),
        ),
    )
}
DIGESTS_BY_NAME: dict[str, Digest] = {d.name: d for d in DIGESTS.values()}

# Signature OIDs that carry their digest; clients put either these or rsaEncryption in SignerInfo.
RSA_SIGNATURE_DIGESTS: dict[str, str] = {
    "1.2.840.113549.1.1.5": "sha1",
    "1.2.840.113549.1.1.14": "sha224",
    "1.2.840.113549.1.1.11": "sha256",
    "1.2.840.113549.1.1.12": "sha384",
    "1.2.840.113549.1.1.13": "sha512",
}
ECDSA_SIGNATURE_DIGESTS: dict[str, str] = {
    "1.2.840.10045.4.1": "sha1",
    "1.2.840.10045.4.3.1": "sha224",
    "1.2.840.10045.4.3.2": "sha256",
    "1.2.840.10045.4.3.3": "sha384",
    "1.2.840.10045.4.3.4": "sha512",
}


def digest_by_oid(dotted: str) -> Digest:
    try:
        return DIGESTS[dotted]
    except KeyError:
        raise MessageError(f"unsupported digest algorithm {dotted}") from None


@dataclass(frozen=True, slots=True)
class ContentCipher:
    """A CBC block cipher for the pkcsPKIEnvelope content (RFC 8894 §3.2.2)."""

    name: str
    oid: str
    key_size: int  # bytes
    reply_with: str | None = None  # legacy ciphers we read but never write

    @property
    def block_size(self) -> int:
        return 16 if self.name.startswith("aes") else 8

    def _cipher(self, key: bytes, iv: bytes) -> Cipher[modes.CBC]:
        if len(key) != self.key_size:
            raise MessageError(f"{self.name} key must be {self.key_size} bytes, got {len(key)}")
        if len(iv) != self.block_size:
            raise MessageError(f"{self.name} IV must be {self.block_size} bytes, got {len(iv)}")
        if self.name == "des":
            # Single DES is TripleDES with K1 = K2 = K3; micromdm's scepclient still sends it.
            algorithm: algorithms.AES | TripleDES = TripleDES(key * 3)
        elif self.name == "des3":
            algorithm = TripleDES(key)
        else:
            algorithm = algorithms.AES(key)
        return Cipher(algorithm, modes.CBC(iv))

    def decrypt(self, key: bytes, iv: bytes, ciphertext: bytes) -> bytes:
        """Decrypt and strip PKCS#7 padding; any inconsistency is a MessageError."""
        if not ciphertext or len(ciphertext) % self.block_size:
            raise MessageError("ciphertext is not a whole number of blocks")
        decryptor = self._cipher(key, iv).decryptor()
        padded = decryptor.update(ciphertext) + decryptor.finalize()
        unpadder = padding.PKCS7(self.block_size * 8).unpadder()
        try:
            return unpadder.update(padded) + unpadder.finalize()
        except ValueError:
            raise MessageError("bad content padding") from None

    def encrypt(self, content: bytes) -> tuple[bytes, bytes, bytes]:
        """Encrypt under a fresh key and IV; return (key, iv, ciphertext)."""
        key, iv = os.urandom(self.key_size), os.urandom(self.block_size)
        # PKCS#7 padding of our own content (nothing secret depends on it), without
        # cryptography's padder objects: this runs for every CertRep.
        pad = self.block_size - len(content) % self.block_size
        padded = content + bytes((pad,)) * pad
        encryptor = self._cipher(key, iv).encryptor()
        return key, iv, encryptor.update(padded) + encryptor.finalize()


CIPHERS: dict[str, ContentCipher] = {
    c.oid: c
    for c in (
        ContentCipher("des", "1.3.14.3.2.7", 8, reply_with="des3"),
        ContentCipher("des3", "1.2.840.113549.3.7", 24),
        ContentCipher("aes128", "2.16.840.1.101.3.4.1.2", 16),
        ContentCipher("aes192", "2.16.840.1.101.3.4.1.22", 24),
        ContentCipher("aes256", "2.16.840.1.101.3.4.1.42", 32),
    )
}
CIPHERS_BY_NAME: dict[str, ContentCipher] = {c.name: c for c in CIPHERS.values()}
