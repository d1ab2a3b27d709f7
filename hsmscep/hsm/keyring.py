"""One signing worker's keys: its own PKCS#11 sessions and key handles, opened once.

Each worker thread calls `Keyring.open` on itself; the CA key, the RA signing key and the RA
decryption key(s) may sit on different tokens or modules (FIPS splits, architecture.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.errors import ConfigError, HsmError, MessageError
from hsmscep.hsm.keyops import decryption_key, signing_key
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.protocol.certrep import ResponseSigner
from hsmscep.protocol.cms import CertId
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey, SigningKey


@dataclass(frozen=True, slots=True)
class KeySource:
    """Which token key goes with which certificate."""

    ca_key: KeyRef
    ca_cert: x509.Certificate
    ra_sign_key: KeyRef
    ra_sign_cert: x509.Certificate
    decrypt: Sequence[tuple[KeyRef, x509.Certificate]]
    # Earlier generations' RA keys (also in `decrypt`): they sign answers to requests
    # encrypted to their certificate, which the client expects to verify the reply with.
    previous_signers: Sequence[tuple[KeyRef, x509.Certificate]] = ()


@dataclass(slots=True)
class Keyring:
    ca_key: SigningKey
    response_signer: ResponseSigner
    decrypt_keys: list[tuple[CertId, ExternalRsaKey]]
    sessions: list[Any] = field(default_factory=list)
    previous_signers: list[tuple[CertId, ResponseSigner]] = field(default_factory=list)

    @classmethod
    def open(cls, source: KeySource, logins: TokenLogin) -> Keyring:
        sessions: dict[TokenRef, Any] = {}

        def session_for(ref: KeyRef) -> Any:
            if ref.token not in sessions:
                sessions[ref.token] = logins.open_session(ref.token)
            return sessions[ref.token]

        try:
            ca_key = signing_key(
                session_for(source.ca_key), source.ca_key, source.ca_cert.public_key()
            )
            ra_public = _rsa_public(source.ra_sign_cert, "RA signing")
            ra_sign = signing_key(session_for(source.ra_sign_key), source.ra_sign_key, ra_public)
            assert isinstance(ra_sign, ExternalRsaKey)
            decrypt_keys = [
                (
                    CertId.of(cert.public_bytes(Encoding.DER)),
                    decryption_key(session_for(ref), ref, _rsa_public(cert, "RA decryption")),
                )
                for ref, cert in source.decrypt
            ]
            previous_signers = [
                (
                    CertId.of(cert.public_bytes(Encoding.DER)),
                    _ra_signer(session_for(ref), ref, cert),
                )
                for ref, cert in source.previous_signers
            ]
        except BaseException:
            close_sessions(list(sessions.values()))
            raise
        return cls(
            ca_key,
            ResponseSigner.of(source.ra_sign_cert, ra_sign),
            decrypt_keys,
            list(sessions.values()),
            previous_signers,
        )

    def check_certificates(self) -> None:
        """Refuse to start when a certificate does not belong to its HSM key."""
        probe = os.urandom(32)
        try:
            if isinstance(self.ca_key, ExternalEcKey):
                signature = self.ca_key.sign(probe, ec.ECDSA(SHA256()))
                self.ca_key.public_key().verify(signature, probe, ec.ECDSA(SHA256()))
            else:
                _check_rsa_signature(self.ca_key, probe)
            _check_rsa_signature(self.response_signer.key, probe)
            for _, signer in self.previous_signers:
                _check_rsa_signature(signer.key, probe)
            for _, key in self.decrypt_keys:
                sealed = key.public_key().encrypt(probe, padding.PKCS1v15())
                if key.decrypt(sealed, padding.PKCS1v15()) != probe:
                    raise ValueError("RA decryption key does not match its certificate")
        except (InvalidSignature, ValueError, MessageError) as exc:
            raise ConfigError(f"a certificate does not match its HSM key: {exc}") from None

    def close(self) -> None:
        close_sessions(self.sessions)
        self.sessions.clear()


def _rsa_public(cert: x509.Certificate, what: str) -> rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise HsmError(f"the {what} certificate must carry an RSA key")
    return key


def _check_rsa_signature(key: ExternalRsaKey, probe: bytes) -> None:
    signature = key.sign(probe, padding.PKCS1v15(), SHA256())
    key.public_key().verify(signature, probe, padding.PKCS1v15(), SHA256())


def close_sessions(sessions: list[Any]) -> None:
    for session in sessions:
        try:
            session.close()
        except Exception:  # a dead session has nothing left to close
            pass


def _ra_signer(session: Any, ref: KeyRef, cert: x509.Certificate) -> ResponseSigner:
    key = signing_key(session, ref, _rsa_public(cert, "previous RA"))
    assert isinstance(key, ExternalRsaKey)
    return ResponseSigner.of(cert, key)
