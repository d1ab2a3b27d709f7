"""protocol.keys: ExternalRsaKey/ExternalEcKey over software raw operations.

The raw callables stand in for the HSM's CKM_RSA_PKCS and CKM_ECDSA (DigestInfo in, PKCS#1
v1.5 signature out; hash in, r||s out). cryptography's own public keys check the results, so
the local hashing and DigestInfo/DER assembly are checked against another implementation.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from functools import cache

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID

from hsmscep.protocol.algorithms import DIGESTS_BY_NAME
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey

DIGESTS = sorted(DIGESTS_BY_NAME)  # every digest a client may ask us to sign with
CURVES = {"p256": ec.SECP256R1(), "p384": ec.SECP384R1()}  # the curves a token key may use
DATA = b"the TBSCertificate, or a CertRep's signed attributes"


@cache
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@cache
def ec_key(curve: str) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[curve])


def software_rsa(
    soft: rsa.RSAPrivateKey, *, sign: bool = True, decrypt: bool = True
) -> ExternalRsaKey:
    """An ExternalRsaKey whose raw operations a software key performs (also for other tests)."""

    def raw_sign(digest_info: bytes) -> bytes:  # CKM_RSA_PKCS: pad and sign, no hashing
        return soft.sign(digest_info, padding.PKCS1v15(), utils.NoDigestInfo())

    def raw_decrypt(ciphertext: bytes, oaep: padding.OAEP | None) -> bytes:
        return soft.decrypt(ciphertext, oaep or padding.PKCS1v15())

    return ExternalRsaKey(
        soft.public_key(),
        raw_sign=raw_sign if sign else None,
        raw_decrypt=raw_decrypt if decrypt else None,
    )


def software_ec(soft: ec.EllipticCurvePrivateKey) -> ExternalEcKey:
    """An ExternalEcKey whose raw ECDSA a software key performs (also for other tests)."""
    size = (soft.curve.key_size + 7) // 8

    def raw_sign(digest: bytes) -> bytes:  # CKM_ECDSA: a hash in, fixed-width r||s out
        der = soft.sign(digest, ec.ECDSA(utils.Prehashed(_hash_for(len(digest)))))
        r, s = utils.decode_dss_signature(der)
        return r.to_bytes(size, "big") + s.to_bytes(size, "big")

    return ExternalEcKey(soft.public_key(), raw_sign)


def external_rsa(*, sign: bool = True, decrypt: bool = True) -> ExternalRsaKey:
    return software_rsa(rsa_key(), sign=sign, decrypt=decrypt)


def external_ec(curve: str) -> ExternalEcKey:
    return software_ec(ec_key(curve))


def _hash_for(length: int) -> hashes.HashAlgorithm:
    return next(d.hash() for d in DIGESTS_BY_NAME.values() if d.hash().digest_size == length)


# ---- RSA signatures ---------------------------------------------------------------------


@pytest.mark.parametrize("digest", DIGESTS)
def test_rsa_signature_verifies(digest: str) -> None:
    algorithm = DIGESTS_BY_NAME[digest].hash()
    signature = external_rsa().sign(DATA, padding.PKCS1v15(), algorithm)
    rsa_key().public_key().verify(signature, DATA, padding.PKCS1v15(), algorithm)
    # PKCS#1 v1.5 is deterministic: the same bytes as the software key signing directly.
    assert signature == rsa_key().sign(DATA, padding.PKCS1v15(), algorithm)


@pytest.mark.parametrize("digest", DIGESTS)
def test_rsa_prehashed_signature_verifies(digest: str) -> None:
    algorithm = DIGESTS_BY_NAME[digest].hash()
    hasher = hashes.Hash(algorithm)
    hasher.update(DATA)
    signature = external_rsa().sign(
        hasher.finalize(), padding.PKCS1v15(), utils.Prehashed(algorithm)
    )
    rsa_key().public_key().verify(signature, DATA, padding.PKCS1v15(), algorithm)


@pytest.mark.parametrize("digest", DIGESTS)
def test_rsa_sign_digest_info_verifies(digest: str) -> None:
    spec = DIGESTS_BY_NAME[digest]
    hasher = hashes.Hash(spec.hash())
    hasher.update(DATA)
    signature = external_rsa().sign_digest_info(spec.digest_info_prefix + hasher.finalize())
    rsa_key().public_key().verify(signature, DATA, padding.PKCS1v15(), spec.hash())


def test_rsa_refuses_pss_and_a_missing_operation() -> None:
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    with pytest.raises(TypeError, match="PKCS#1 v1.5"):
        external_rsa().sign(DATA, pss, hashes.SHA256())
    with pytest.raises(TypeError, match="not allowed to sign"):
        external_rsa(sign=False).sign(DATA, padding.PKCS1v15(), hashes.SHA256())
    with pytest.raises(TypeError, match="not allowed to sign"):
        external_rsa(sign=False).sign_digest_info(b"\x00" * 51)
    with pytest.raises(TypeError, match="not allowed to decrypt"):
        external_rsa(decrypt=False).decrypt(b"\x00" * 256, padding.PKCS1v15())


# ---- EC signatures ----------------------------------------------------------------------


@pytest.mark.parametrize("curve", sorted(CURVES))
@pytest.mark.parametrize("digest", DIGESTS)
def test_ecdsa_signature_verifies(curve: str, digest: str) -> None:
    algorithm = DIGESTS_BY_NAME[digest].hash()
    signature = external_ec(curve).sign(DATA, ec.ECDSA(algorithm))
    ec_key(curve).public_key().verify(signature, DATA, ec.ECDSA(algorithm))
    r, s = utils.decode_dss_signature(signature)  # DER, as X.509 and CMS carry it
    assert r > 0 and s > 0


@pytest.mark.parametrize("digest", DIGESTS)
def test_ecdsa_prehashed_signature_verifies(digest: str) -> None:
    algorithm = DIGESTS_BY_NAME[digest].hash()
    hasher = hashes.Hash(algorithm)
    hasher.update(DATA)
    signature = external_ec("p256").sign(hasher.finalize(), ec.ECDSA(utils.Prehashed(algorithm)))
    ec_key("p256").public_key().verify(signature, DATA, ec.ECDSA(algorithm))


def test_ec_refuses_key_agreement() -> None:
    key = external_ec("p256")
    with pytest.raises(TypeError, match="key agreement"):
        key.exchange(ec.ECDH(), ec_key("p384").public_key())
    assert key.curve.name == "secp256r1" and key.key_size == 256


# ---- as cryptography's builders use them ------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_certificate_builder_signs_with_the_external_key(kind: str) -> None:
    key: ExternalRsaKey | ExternalEcKey = external_rsa() if kind == "rsa" else external_ec(kind)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"external {kind}")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    cert.verify_directly_issued_by(cert)
    assert cert.signature_hash_algorithm is not None
    assert cert.signature_hash_algorithm.name == "sha384"


# ---- the private half stays inside --------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256"])
def test_private_half_refuses_export(kind: str) -> None:
    key: ExternalRsaKey | ExternalEcKey = external_rsa() if kind == "rsa" else external_ec(kind)
    with pytest.raises(TypeError, match="cannot be exported"):
        key.private_numbers()
    for encoding, fmt in (
        (serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8),
        (serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL),
    ):
        with pytest.raises(TypeError, match="cannot be exported"):
            key.private_bytes(encoding, fmt, serialization.NoEncryption())
    # Builders deep-copy keys on some paths: a copy must still be the external key.
    assert copy.copy(key) is key and copy.deepcopy(key) is key


# ---- RSA decryption (key transport) -------------------------------------------------------


def test_decrypt_pkcs1v15() -> None:
    cek = bytes(range(32))
    ciphertext = rsa_key().public_key().encrypt(cek, padding.PKCS1v15())
    assert external_rsa().decrypt(ciphertext, padding.PKCS1v15()) == cek


@pytest.mark.parametrize(
    ("digest", "mgf_digest", "label"),
    [
        ("sha1", "sha1", None),  # what Windows sends
        ("sha256", "sha256", None),
        ("sha256", "sha1", None),
        ("sha512", "sha512", b"a label"),
    ],
)
def test_decrypt_oaep(digest: str, mgf_digest: str, label: bytes | None) -> None:
    oaep = padding.OAEP(
        mgf=padding.MGF1(DIGESTS_BY_NAME[mgf_digest].hash()),
        algorithm=DIGESTS_BY_NAME[digest].hash(),
        label=label,
    )
    cek = bytes(range(24))
    ciphertext = rsa_key().public_key().encrypt(cek, oaep)
    seen: list[padding.OAEP | None] = []
    soft = rsa_key()

    def raw_decrypt(data: bytes, params: padding.OAEP | None) -> bytes:
        seen.append(params)
        return soft.decrypt(data, params or padding.PKCS1v15())

    key = ExternalRsaKey(soft.public_key(), raw_decrypt=raw_decrypt)
    assert key.decrypt(ciphertext, oaep) == cek
    assert seen == [oaep]  # the OAEP parameters reach the raw operation unchanged


def test_decrypt_hands_pkcs1v15_as_none_and_refuses_other_paddings() -> None:
    seen: list[padding.OAEP | None] = []
    soft = rsa_key()

    def raw_decrypt(data: bytes, params: padding.OAEP | None) -> bytes:
        seen.append(params)
        return soft.decrypt(data, params or padding.PKCS1v15())

    key = ExternalRsaKey(soft.public_key(), raw_decrypt=raw_decrypt)
    ciphertext = soft.public_key().encrypt(b"cek", padding.PKCS1v15())
    assert key.decrypt(ciphertext, padding.PKCS1v15()) == b"cek"
    assert seen == [None]
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    with pytest.raises(TypeError, match="PKCS#1 v1.5 and OAEP"):
        key.decrypt(ciphertext, pss)
    assert key.key_size == 2048
