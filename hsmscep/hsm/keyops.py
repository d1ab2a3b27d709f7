"""Raw private-key operations bound into cryptography key objects: sign with CKM_RSA_PKCS over
a local DigestInfo or CKM_ECDSA over a local hash, decrypt with CKM_RSA_PKCS or OAEP.

Every decrypt failure the client can cause is one MessageError (no padding oracle).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pkcs11
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from pkcs11 import Mechanism

from hsmscep.errors import HsmError, MessageError, UnsupportedAlgorithm
from hsmscep.hsm.pkcs11errors import hsm_error, hsm_errors
from hsmscep.hsm.refs import KeyRef
from hsmscep.hsm.tokenkeys import find_private_key
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey, SigningKey

# SoftHSM answers bad PKCS#1 padding with CKR_GENERAL_ERROR, others with
# CKR_ENCRYPTED_DATA_INVALID: all of them are one answer to the client (no padding oracle).
_CLIENT_DECRYPT_ERRORS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.EncryptedDataInvalid,
    pkcs11.exceptions.EncryptedDataLenRange,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.DataInvalid,
    pkcs11.exceptions.DataLenRange,
)


# Runs one HSM call: the keyring's guard holds the module (Module.in_use) and reports a lost
# session or device to TokenLogin; the CLI calls directly.
Guard = Callable[[Callable[[], bytes]], bytes]


def _direct(call: Callable[[], bytes]) -> bytes:
    return call()


_OAEP_REFUSALS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.ArgumentsBad,
    pkcs11.exceptions.MechanismInvalid,
    pkcs11.exceptions.MechanismParamInvalid,
)

_OAEP_HASH = {
    "sha1": (Mechanism.SHA_1, pkcs11.MGF.SHA1),
    "sha224": (Mechanism.SHA224, pkcs11.MGF.SHA224),
    "sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, pkcs11.MGF.SHA512),
}


def signing_key(session: Any, ref: KeyRef, public_key: Any, guard: Guard = _direct) -> SigningKey:
    """A cryptography key object whose sign() runs in this session (CKM_RSA_PKCS/CKM_ECDSA)."""
    handle = find_private_key(session, ref)
    mechanism = Mechanism.RSA_PKCS if isinstance(public_key, rsa.RSAPublicKey) else Mechanism.ECDSA

    def sign(data: bytes) -> bytes:
        def call() -> bytes:
            with hsm_errors("signing"):
                return bytes(handle.sign(data, mechanism=mechanism))

        return guard(call)

    if isinstance(public_key, rsa.RSAPublicKey):
        return ExternalRsaKey(public_key, raw_sign=sign)
    return ExternalEcKey(public_key, sign)


def decryption_key(
    session: Any, ref: KeyRef, public_key: rsa.RSAPublicKey, guard: Guard = _direct
) -> ExternalRsaKey:
    """A cryptography RSA key object whose decrypt() runs in this session."""
    handle = find_private_key(session, ref)

    def rsa_decrypt(ciphertext: bytes, oaep: padding.OAEP | None) -> bytes:
        return guard(lambda: _decrypt(handle, ciphertext, oaep))

    return ExternalRsaKey(public_key, raw_decrypt=rsa_decrypt)


def _decrypt(handle: Any, ciphertext: bytes, oaep: padding.OAEP | None) -> bytes:
    if oaep is None:
        mechanism, param = Mechanism.RSA_PKCS, None
    else:
        hash_mech, mgf = _OAEP_HASH[oaep._algorithm.name]
        mgf_hash = oaep._mgf._algorithm.name
        if mgf_hash != oaep._algorithm.name:
            mgf = _OAEP_HASH[mgf_hash][1]
        mechanism, param = Mechanism.RSA_PKCS_OAEP, (hash_mech, mgf, oaep._label or None)
    try:
        return bytes(handle.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param))
    except _OAEP_REFUSALS:
        if oaep is None:
            raise HsmError("the HSM refused CKM_RSA_PKCS decryption") from None
        # SoftHSM2 only does OAEP with SHA-1; others refuse some parameter sets.
        raise UnsupportedAlgorithm("the HSM does not support these OAEP parameters") from None
    except _CLIENT_DECRYPT_ERRORS:
        raise MessageError("content-encryption key does not decrypt") from None
    except pkcs11.PKCS11Error as exc:
        raise hsm_error(exc, "decrypting") from exc
