"""The CA and RA certificates `init`, `import-ca` and `rollover` make, and their files.

Certificates are signed by keys in the HSM (opened read-write through TokenLogin); files are
written through a temporary file and a rename.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import ConfigError
from hsmscep.hsm import keyops
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KeyRef
from hsmscep.hsm.tokenkeys import public_key_of


def read_ca_files(
    cert_path: Path, chain_path: Path | None
) -> tuple[x509.Certificate, list[x509.Certificate]]:
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read a PEM certificate from {cert_path}: {exc}") from None
    chain: list[x509.Certificate] = []
    if chain_path is not None:
        try:
            chain = x509.load_pem_x509_certificates(chain_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read PEM certificates from {chain_path}: {exc}") from None
    return cert, chain


def check_certifies(
    logins: TokenLogin,
    ref: KeyRef,
    cert: x509.Certificate,
    cert_path: Path,
    chain: list[x509.Certificate],
    chain_path: Path | None,
) -> None:
    token_key = public_key_of(open_rw(logins, ref), ref)
    if token_key.public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{cert_path} does not certify the CA key {ref.describe()} in the token")
    if chain and cert.issuer != chain[0].subject:
        raise ConfigError(f"the first certificate in {chain_path} did not issue {cert_path}")


def open_rw(logins: TokenLogin, ref: KeyRef) -> Any:
    return logins.open_session(ref.token, rw=True)


def signing_key(logins: TokenLogin, ref: KeyRef) -> Any:
    session = open_rw(logins, ref)
    return keyops.signing_key(session, ref, public_key_of(session, ref))


def ca_certificate(subject: x509.Name, key: Any, now: datetime, days: int) -> x509.Certificate:
    public_key = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True, digital_signature=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .sign(key, hashes.SHA256())
    )


def cross_certificate(
    new: x509.Certificate, old: x509.Certificate, old_key: Any
) -> x509.Certificate:
    """NewWithOld: `new`'s subject and key, issued by the self-signed `old` CA with its key.
    Valid no longer than `old`; SKI of the new key, AKI of the old one, so that path builders
    tell the two same-named roots apart."""
    now = datetime.now(UTC)
    public_key = new.public_key()
    try:
        old_ski = old.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(old_ski)
    except x509.ExtensionNotFound:
        old_public: Any = old.public_key()
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(old_public)
    return (
        x509.CertificateBuilder()
        .subject_name(new.subject)
        .issuer_name(old.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - timedelta(minutes=5), old.not_valid_before_utc))
        .not_valid_after(min(new.not_valid_after_utc, old.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(aki, critical=False)
        .sign(old_key, hashes.SHA256())
    )


RA_ROLES = {"sign": "RA signing", "decrypt": "RA encryption", "both": "RA"}


def ra_certificate(
    ca_key: Any, ca_cert: x509.Certificate, public_key: Any, usage: str, days: int
) -> x509.Certificate:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = datetime.now(UTC)
    ca_cn = ca_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    base = str(ca_cn[0].value) if ca_cn else "hsmscep"
    role = RA_ROLES[usage]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string(f"CN={_escape(base)} SCEP {role}"))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        # Apple checks the RA key usage (interop-quirks #3): signing certs need
        # digitalSignature, encryption certs keyEncipherment.
        .add_extension(
            _key_usage(
                digital_signature=usage in ("sign", "both"),
                key_encipherment=usage in ("decrypt", "both"),
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(ca_key, hashes.SHA256())
    )


def _escape(value: str) -> str:
    return x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, value)]).rfc4514_string()[3:]


def _key_usage(
    *, cert_sign: bool = False, digital_signature: bool = False, key_encipherment: bool = False
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def write_ca_csr(subject: x509.Name, ca_key: Any, path: Path) -> None:
    """A CSR for a CA key in the HSM, for an external root to sign."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write_file(path, csr.public_bytes(Encoding.PEM))


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
