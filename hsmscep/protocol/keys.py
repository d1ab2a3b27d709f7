"""Private keys that live elsewhere, as `cryptography` key objects. No I/O of their own.

cryptography's certificate and CRL builders accept any subclass of RSAPrivateKey or
EllipticCurvePrivateKey and call its `sign()`; these classes hash locally and hand only the
digest to a raw operation supplied by the caller (an HSM session, or a software key in tests).
The private half is never available: private_bytes() and private_numbers() refuse.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import NoReturn

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.asymmetric.padding import AsymmetricPadding
from cryptography.utils import Buffer

from hsmscep.protocol.algorithms import DIGESTS_BY_NAME

RawSign = Callable[[bytes], bytes]
"""RSA: DigestInfo -> PKCS#1 v1.5 signature (CKM_RSA_PKCS). EC: hash -> raw r||s (CKM_ECDSA)."""

RawDecrypt = Callable[[bytes, padding.OAEP | None], bytes]
"""RSA key transport: ciphertext, OAEP parameters or None for PKCS#1 v1.5 -> plaintext."""


def _digest(data: bytes, algorithm: hashes.HashAlgorithm | utils.Prehashed) -> tuple[str, bytes]:
    if isinstance(algorithm, utils.Prehashed):
        return algorithm._algorithm.name, data
    known = DIGESTS_BY_NAME.get(algorithm.name)  # a certificate's TBS and every CertRep
    if known is not None:
        return algorithm.name, known.compute(data)
    return algorithm.name, hashlib.new(algorithm.name, data).digest()


def _no_export() -> NoReturn:
    raise TypeError("this private key lives in the HSM and cannot be exported")


class ExternalRsaKey(rsa.RSAPrivateKey):
    """An RSA private key whose operations run through callables (PKCS#1 v1.5 signing)."""

    def __init__(
        self,
        public_key: rsa.RSAPublicKey,
        raw_sign: RawSign | None = None,
        raw_decrypt: RawDecrypt | None = None,
    ) -> None:
        self._public_key = public_key
        self._raw_sign = raw_sign
        self._raw_decrypt = raw_decrypt

    def sign(
        self,
        data: bytes,
        padding: AsymmetricPadding,
        algorithm: hashes.HashAlgorithm | utils.Prehashed | utils.NoDigestInfo,
    ) -> bytes:
        if self._raw_sign is None:
            raise TypeError("this key is not allowed to sign")
        if padding.name != "EMSA-PKCS1-v1_5":
            raise TypeError("only PKCS#1 v1.5 signatures are supported")
        if isinstance(algorithm, utils.NoDigestInfo):
            return self._raw_sign(bytes(data))
        name, digest = _digest(bytes(data), algorithm)
        return self._raw_sign(DIGESTS_BY_NAME[name].digest_info_prefix + digest)

    def sign_digest_info(self, digest_info: bytes) -> bytes:
        if self._raw_sign is None:
            raise TypeError("this key is not allowed to sign")
        return self._raw_sign(digest_info)

    def decrypt(self, ciphertext: bytes, padding: AsymmetricPadding) -> bytes:
        if self._raw_decrypt is None:
            raise TypeError("this key is not allowed to decrypt")
        oaep = padding if isinstance(padding, _OAEP) else None
        if oaep is None and padding.name != "EMSA-PKCS1-v1_5":
            raise TypeError("only PKCS#1 v1.5 and OAEP decryption are supported")
        return self._raw_decrypt(ciphertext, oaep)

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._public_key

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _no_export()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _no_export()

    def __copy__(self) -> ExternalRsaKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ExternalRsaKey:
        return self


_OAEP = padding.OAEP


class ExternalEcKey(ec.EllipticCurvePrivateKey):
    """An EC private key whose ECDSA signatures come from a raw r||s callable."""

    def __init__(self, public_key: ec.EllipticCurvePublicKey, raw_sign: RawSign) -> None:
        self._public_key = public_key
        self._raw_sign = raw_sign

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise TypeError("only ECDSA is supported")
        _, digest = _digest(bytes(data), signature_algorithm.algorithm)
        raw = self._raw_sign(digest)
        half = len(raw) // 2
        r, s = int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        return utils.encode_dss_signature(r, s)

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise TypeError("key agreement is not supported")

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _no_export()

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _no_export()

    def __copy__(self) -> ExternalEcKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> ExternalEcKey:
        return self


SigningKey = ExternalRsaKey | ExternalEcKey
