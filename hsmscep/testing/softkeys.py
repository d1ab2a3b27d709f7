"""The key port in software, for in-process tests: no PKCS#11 module, no token.

SoftKeys is a KeyBackend for hsmscep.web.create_app(settings, keys=...): each signing worker
gets a SoftKeyring whose keys are the same ExternalRsaKey/ExternalEcKey classes the HSM path
uses, with the raw sign/decrypt done by cryptography private keys. Keys are found by the
public key of the certificate the server loads, so the wiring is the production one.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import MessageError
from hsmscep.protocol.certrep import ResponseSigner
from hsmscep.protocol.cms import CertId
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey, SigningKey

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# CKM_ECDSA signs a bare hash: its length says which one it was.
_HASH_BY_SIZE: dict[int, hashes.HashAlgorithm] = {
    20: hashes.SHA1(),
    28: hashes.SHA224(),
    32: hashes.SHA256(),
    48: hashes.SHA384(),
    64: hashes.SHA512(),
}


class CertSource(Protocol):
    """The certificates a CA's workers need keys for (hsmscep.hsm.keyring.KeySource)."""

    @property
    def ca_cert(self) -> x509.Certificate: ...

    @property
    def ra_sign_cert(self) -> x509.Certificate: ...

    @property
    def decrypt(self) -> Sequence[tuple[object, x509.Certificate]]: ...

    @property
    def previous_signers(self) -> Sequence[tuple[object, x509.Certificate]]: ...


@dataclass(slots=True)
class SoftKeyring:
    """One worker's keys (the KeySet port), backed by software private keys."""

    ca_key: SigningKey
    response_signer: ResponseSigner
    decrypt_keys: list[tuple[CertId, ExternalRsaKey]]
    previous_signers: list[tuple[CertId, ResponseSigner]]

    @property
    def crl_key(self) -> SigningKey:
        return self.ca_key

    def check_certificates(self) -> None:
        """Nothing to check: every key was looked up by its certificate's public key."""

    def stale(self) -> bool:
        return False

    def latency(self) -> tuple[float, float]:
        return 0.001, 0.0  # software keys: all CPU, no round trip

    def close(self) -> None:
        """Nothing to close: no sessions."""


class SoftKeys:
    """Software private keys by public key; opens a SoftKeyring for each signing worker."""

    def __init__(self, keys: Iterable[PrivateKey] = ()) -> None:
        self._keys: dict[bytes, PrivateKey] = {}
        self.ca_signatures = 0  # made with the CA key, by any worker: what an outage costs
        self._count_lock = threading.Lock()
        for key in keys:
            self.add(key)

    def add(self, key: PrivateKey) -> None:
        """Make `key` available to every certificate that carries its public key."""
        self._keys[_spki(key.public_key())] = key

    @asynccontextmanager
    async def open(self, source: CertSource) -> AsyncIterator[Callable[[], SoftKeyring]]:
        """The KeyBackend method: while open, each worker calls the factory on its thread."""
        yield lambda: self.keyring(source)

    def readiness(self) -> list[dict[str, object]]:
        """The KeyBackend method: software keys have no token that could go away."""
        return []

    def keyring(self, source: CertSource) -> SoftKeyring:
        """The keys for `source`; KeyError names a certificate we hold no key for."""
        ra_key = self._rsa(source.ra_sign_cert)
        return SoftKeyring(
            ca_key=self._signing(source.ca_cert),
            response_signer=ResponseSigner.of(source.ra_sign_cert, ra_key),
            decrypt_keys=[
                (CertId.of(cert.public_bytes(Encoding.DER)), self._rsa(cert))
                for _, cert in source.decrypt
            ],
            previous_signers=[
                (
                    CertId.of(cert.public_bytes(Encoding.DER)),
                    ResponseSigner.of(cert, self._rsa(cert)),
                )
                for _, cert in source.previous_signers
            ],
        )

    def _private(self, cert: x509.Certificate) -> PrivateKey:
        try:
            return self._keys[_spki(cert.public_key())]
        except KeyError:
            raise KeyError(f"no software key for {cert.subject.rfc4514_string()}") from None

    def _signing(self, cert: x509.Certificate) -> SigningKey:
        key = self._private(cert)
        if isinstance(key, rsa.RSAPrivateKey):
            public = key.public_key()
            sign = self._counted(rsa_sign(key))
            return ExternalRsaKey(public, raw_sign=sign, raw_decrypt=rsa_decrypt(key))
        return ExternalEcKey(key.public_key(), self._counted(ecdsa_sign(key)))

    def _counted(self, sign: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        def counted(data: bytes) -> bytes:
            with self._count_lock:
                self.ca_signatures += 1
            return sign(data)

        return counted

    def _rsa(self, cert: x509.Certificate) -> ExternalRsaKey:
        key = self._private(cert)
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TypeError(f"{cert.subject.rfc4514_string()} needs an RSA key")
        public = key.public_key()
        return ExternalRsaKey(public, raw_sign=rsa_sign(key), raw_decrypt=rsa_decrypt(key))


def rsa_sign(key: rsa.RSAPrivateKey) -> Callable[[bytes], bytes]:
    """CKM_RSA_PKCS signing in software: PKCS#1 v1.5 over a ready DigestInfo."""

    def sign(digest_info: bytes) -> bytes:
        return key.sign(digest_info, padding.PKCS1v15(), utils.NoDigestInfo())

    return sign


def rsa_decrypt(key: rsa.RSAPrivateKey) -> Callable[[bytes, padding.OAEP | None], bytes]:
    """RSA key transport in software; like the HSM path, any failure is one MessageError."""

    def decrypt(ciphertext: bytes, oaep: padding.OAEP | None) -> bytes:
        try:
            return key.decrypt(ciphertext, oaep or padding.PKCS1v15())
        except ValueError:
            raise MessageError("content-encryption key does not decrypt") from None

    return decrypt


def ecdsa_sign(key: ec.EllipticCurvePrivateKey) -> Callable[[bytes], bytes]:
    """CKM_ECDSA in software: a bare hash in, raw r||s out."""
    size = (key.curve.key_size + 7) // 8

    def sign(digest: bytes) -> bytes:
        algorithm = utils.Prehashed(_HASH_BY_SIZE[len(digest)])
        r, s = utils.decode_dss_signature(key.sign(digest, ec.ECDSA(algorithm)))
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return sign


def _spki(public_key: object) -> bytes:
    assert isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey)
    return public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
