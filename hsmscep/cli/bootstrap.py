"""`hsmscep init` and `hsmscep import-ca`: keys generated in the token, certificates on disk.

Private keys are created inside the HSM (CKA_SENSITIVE, not CKA_EXTRACTABLE) and signing
happens there; only certificates and CSRs are written to disk. Existing keys are never
replaced unless the caller says so.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.config.settings import Settings
from hsmscep.errors import ConfigError
from hsmscep.hsm import cryptoki
from hsmscep.hsm.cryptoki import TokenLogin
from hsmscep.hsm.refs import KEY_SPECS, KeyRef, KeySpec

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InitOptions:
    ca_key: KeySpec = "rsa2048"
    ra_key_bits: int = 2048
    subject: str = "CN=hsmscep dev CA"
    validity_days: int = 3650
    ra_validity_days: int = 730
    csr_out: Path | None = None
    force: bool = False


def init(settings: Settings, options: InitOptions) -> list[str]:
    """Create the CA and RA keys and certificates; return what was done, line by line."""
    if options.ra_key_bits < 2048:
        raise ConfigError("--ra-key-size must be at least 2048")
    try:
        subject = x509.Name.from_rfc4514_string(options.subject)
    except ValueError as exc:
        raise ConfigError(f"--subject {options.subject!r}: {exc}") from None
    done: list[str] = []
    logins = TokenLogin()
    try:
        existing = [
            ref for ref in _all_keys(settings) if cryptoki.private_key_exists(_rw(logins, ref), ref)
        ]
        if existing and not options.force:
            names = ", ".join(ref.describe() for ref in existing)
            raise ConfigError(
                f"keys already exist in the token ({names}); pass --force to replace them"
            )
        for ref in existing:
            cryptoki.destroy_key(_rw(logins, ref), ref)
            done.append(f"destroyed old key {ref.describe()}")
        cryptoki.generate_key(
            _rw(logins, settings.ca_key), settings.ca_key, options.ca_key, usage="sign"
        )
        done.append(f"generated CA key {settings.ca_key.describe()} ({options.ca_key})")
        ra_spec: KeySpec = f"rsa{options.ra_key_bits}"  # type: ignore[assignment]
        for ref, usage in _ra_keys(settings):
            cryptoki.generate_key(_rw(logins, ref), ref, ra_spec, usage=usage)
            done.append(f"generated RA {usage} key {ref.describe()} (rsa{options.ra_key_bits})")
        ca_key = _signing_key(logins, settings.ca_key)
        if options.csr_out is not None:
            _write_ca_csr(subject, ca_key, options.csr_out)
            done.append(f"wrote CA CSR to {options.csr_out}; sign it, then run import-ca")
            return done
        now = datetime.now(UTC)
        ca_cert = _ca_certificate(subject, ca_key, now, options.validity_days)
        _write(settings.ca_cert, ca_cert.public_bytes(Encoding.PEM))
        done.append(f"wrote self-signed CA certificate to {settings.ca_cert}")
        done += _issue_ra_certificates(settings, logins, ca_cert, options.ra_validity_days)
        return done
    finally:
        logins.close()


def import_ca(
    settings: Settings, cert_path: Path, chain_path: Path | None, ra_days: int
) -> list[str]:
    """Install an externally signed CA certificate (and chain), then issue the RA certificates."""
    cert, chain = _read_ca_files(cert_path, chain_path)
    logins = TokenLogin()
    try:
        _check_certifies(logins, settings.ca_key, cert, cert_path, chain, chain_path)
        _write(settings.ca_cert, cert.public_bytes(Encoding.PEM))
        done = [f"installed CA certificate {cert.subject.rfc4514_string()}"]
        if chain:
            if settings.ca_chain is None:
                raise ConfigError("set ca.chain in the config file to install a chain")
            _write(settings.ca_chain, b"".join(c.public_bytes(Encoding.PEM) for c in chain))
            done.append(f"installed a chain of {len(chain)} certificate(s)")
        return done + _issue_ra_certificates(settings, logins, cert, ra_days)
    finally:
        logins.close()


def _read_ca_files(
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


def _check_certifies(
    logins: TokenLogin,
    ref: KeyRef,
    cert: x509.Certificate,
    cert_path: Path,
    chain: list[x509.Certificate],
    chain_path: Path | None,
) -> None:
    token_key = cryptoki.public_key_of(_rw(logins, ref), ref)
    if token_key.public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"{cert_path} does not certify the CA key {ref.describe()} in the token")
    if chain and cert.issuer != chain[0].subject:
        raise ConfigError(f"the first certificate in {chain_path} did not issue {cert_path}")


def _all_keys(settings: Settings) -> list[KeyRef]:
    return list(dict.fromkeys([settings.ca_key, *(ref for ref, _ in _ra_keys(settings))]))


def _ra_keys(settings: Settings) -> list[tuple[KeyRef, str]]:
    if settings.ra_split:
        return [(settings.ra_sign_key, "sign"), (settings.ra_decrypt_key, "decrypt")]
    return [(settings.ra_sign_key, "both")]


def _rw(logins: TokenLogin, ref: KeyRef) -> Any:
    return logins.open_session(ref.token, rw=True)


def _signing_key(logins: TokenLogin, ref: KeyRef) -> Any:
    session = _rw(logins, ref)
    return cryptoki.signing_key(session, ref, cryptoki.public_key_of(session, ref))


def _ca_certificate(subject: x509.Name, key: Any, now: datetime, days: int) -> x509.Certificate:
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


def _cross_certificate(
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


def _issue_ra_certificates(
    settings: Settings, logins: TokenLogin, ca_cert: x509.Certificate, days: int
) -> list[str]:
    ca_key = _signing_key(logins, settings.ca_key)
    done = []
    for ref, usage in _ra_keys(settings):
        path = settings.ra_decrypt_cert if usage == "decrypt" else settings.ra_sign_cert
        public_key = cryptoki.public_key_of(_rw(logins, ref), ref)
        cert = _ra_certificate(ca_key, ca_cert, public_key, usage, days)
        _write(path, cert.public_bytes(Encoding.PEM))
        done.append(f"wrote {_RA_ROLES[usage]} certificate to {path}")
    return done


_RA_ROLES = {"sign": "RA signing", "decrypt": "RA encryption", "both": "RA"}


def _ra_certificate(
    ca_key: Any, ca_cert: x509.Certificate, public_key: Any, usage: str, days: int
) -> x509.Certificate:
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    now = datetime.now(UTC)
    ca_cn = ca_cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    base = str(ca_cn[0].value) if ca_cn else "hsmscep"
    role = _RA_ROLES[usage]
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


# ---- CA rollover: `hsmscep rollover prepare|activate` ---------------------------------------


@dataclass(frozen=True, slots=True)
class RolloverOptions:
    ca_key: KeySpec | None = None  # None: the same kind of key as the current CA's
    ra_key_bits: int | None = None  # None: the current RA key's size
    subject: str | None = None  # None: the current CA's subject
    validity_days: int = 3650
    ra_validity_days: int = 730
    force: bool = False  # replace leftover keys with the next generation's labels
    csr_out: Path | None = None  # external root: write the next CA's CSR instead of self-signing


def rollover_prepare(settings: Settings, options: RolloverOptions) -> list[str]:
    """Generate the next CA and RA keys in the token, a new self-signed root, its RA
    certificate and the NewWithOld cross certificate (the new root certified by the current
    one, signed by the current CA key), and record them as `next` in the rollover state file."""
    state_path = _state_path(settings)
    if settings.next_generation is not None:
        raise ConfigError(
            f"a next CA is already prepared in {state_path}; run `hsmscep rollover activate`"
        )
    if settings.awaiting_generation is not None and not options.force:
        raise ConfigError(
            f"a next CA key awaits its certificate ({state_path}); run `hsmscep rollover "
            "import-ca`, or prepare again with --force"
        )
    if settings.ra_split:
        raise ConfigError("CA rollover does not support a separate [ra_decrypt] key yet")
    current = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    external = settings.ca_chain is not None or current.issuer != current.subject
    if external and options.csr_out is None:
        raise ConfigError(
            "the CA is signed by an external root: pass --csr FILE, have the root sign it, "
            "then run `hsmscep rollover import-ca`"
        )
    generation = settings.rollover_generation + 1
    base = settings.config_path.parent
    next_ca = KeyRef(settings.ca_key.token, _next_label(settings.ca_key, "ca", generation))
    next_ra = KeyRef(
        settings.ra_sign_key.token, _next_label(settings.ra_sign_key, "ra", generation)
    )
    ca_path, ra_path = base / f"ca-g{generation}.pem", base / f"ra-g{generation}.pem"
    ca_spec = options.ca_key or _spec_of(current.public_key())
    ra_current = x509.load_pem_x509_certificate(settings.ra_sign_cert.read_bytes())
    ra_bits = options.ra_key_bits or ra_current.public_key().key_size  # type: ignore[union-attr]
    if ra_bits < 2048:
        raise ConfigError("--ra-key-size must be at least 2048")
    try:
        subject = (
            x509.Name.from_rfc4514_string(options.subject) if options.subject else current.subject
        )
    except ValueError as exc:
        raise ConfigError(f"--subject {options.subject!r}: {exc}") from None
    done: list[str] = []
    logins = TokenLogin()
    try:
        existing = [
            ref for ref in (next_ca, next_ra) if cryptoki.private_key_exists(_rw(logins, ref), ref)
        ]
        if existing and not options.force:
            names = ", ".join(ref.describe() for ref in existing)
            raise ConfigError(f"keys already exist in the token ({names}); pass --force")
        for ref in existing:
            cryptoki.destroy_key(_rw(logins, ref), ref)
            done.append(f"destroyed leftover key {ref.describe()}")
        cryptoki.generate_key(_rw(logins, next_ca), next_ca, ca_spec, usage="sign")
        done.append(f"generated next CA key {next_ca.describe()} ({ca_spec})")
        ra_spec: KeySpec = f"rsa{ra_bits}"  # type: ignore[assignment]
        cryptoki.generate_key(_rw(logins, next_ra), next_ra, ra_spec, usage="both")
        done.append(f"generated next RA key {next_ra.describe()} ({ra_spec})")
        ca_key = _signing_key(logins, next_ca)
        entry = {
            "ca_key_label": next_ca.label,
            "ca_cert": ca_path.name,
            "ra_key_label": next_ra.label,
            "ra_cert": ra_path.name,
        }
        state = _read_state(state_path)
        state["generation"] = settings.rollover_generation
        if options.csr_out is not None:
            _write_ca_csr(subject, ca_key, options.csr_out)
            state["awaiting_cert"] = entry
            _write(state_path, json.dumps(state, indent=2).encode() + b"\n")
            done.append(
                f"wrote the next CA's CSR to {options.csr_out}; have the root sign it, then run "
                "`hsmscep rollover import-ca --cert FILE [--chain FILE]`"
            )
            return done
        ca_cert = _ca_certificate(subject, ca_key, datetime.now(UTC), options.validity_days)
        ra_public = cryptoki.public_key_of(_rw(logins, next_ra), next_ra)
        ra_cert = _ra_certificate(ca_key, ca_cert, ra_public, "both", options.ra_validity_days)
        # NewWithOld: the next CA certified by the current one, signed by the current CA key.
        cross = _cross_certificate(ca_cert, current, _signing_key(logins, settings.ca_key))
    finally:
        logins.close()
    try:
        cross.verify_directly_issued_by(current)
    except (InvalidSignature, ValueError, TypeError):
        raise ConfigError(
            f"the CA key {settings.ca_key.describe()} does not match {settings.ca_cert}"
        ) from None
    cross_path = base / f"cross-g{generation}.pem"
    _write(ca_path, ca_cert.public_bytes(Encoding.PEM))
    _write(ra_path, ra_cert.public_bytes(Encoding.PEM))
    _write(cross_path, cross.public_bytes(Encoding.PEM))
    entry["cross_cert"] = cross_path.name
    done.append(f"wrote next CA certificate to {ca_path} and next RA certificate to {ra_path}")
    done.append(f"wrote the next CA certified by the current CA (NewWithOld) to {cross_path}")
    state["next"], state["awaiting_cert"] = entry, None
    _write(state_path, json.dumps(state, indent=2).encode() + b"\n")
    done.append(_prepared(state_path, generation))
    return done


def rollover_import_ca(
    settings: Settings, cert_path: Path, chain_path: Path | None, ra_days: int
) -> list[str]:
    """Install the externally signed next CA certificate (checked against the next CA key in
    the token) and its chain, issue the next RA certificate, and record the generation as
    `next`: like `import-ca`, for the generation `rollover prepare --csr` made."""
    state_path = _state_path(settings)
    awaiting = settings.awaiting_generation
    if awaiting is None:
        raise ConfigError(f"no next CA awaits a certificate in {state_path}")
    cert, chain = _read_ca_files(cert_path, chain_path)
    generation = settings.rollover_generation + 1
    base = settings.config_path.parent
    logins = TokenLogin()
    try:
        _check_certifies(logins, awaiting.ca_key, cert, cert_path, chain, chain_path)
        ca_key = _signing_key(logins, awaiting.ca_key)
        ra_public = cryptoki.public_key_of(_rw(logins, awaiting.ra_key), awaiting.ra_key)
        ra_cert = _ra_certificate(ca_key, cert, ra_public, "both", ra_days)
    finally:
        logins.close()
    _write(awaiting.ca_cert, cert.public_bytes(Encoding.PEM))
    _write(awaiting.ra_cert, ra_cert.public_bytes(Encoding.PEM))
    done = [f"installed next CA certificate {cert.subject.rfc4514_string()} to {awaiting.ca_cert}"]
    state = _read_state(state_path)
    entry = dict(state["awaiting_cert"])
    if chain:
        chain_file = base / f"chain-g{generation}.pem"
        _write(chain_file, b"".join(c.public_bytes(Encoding.PEM) for c in chain))
        entry["ca_chain"] = chain_file.name
        done.append(f"installed a chain of {len(chain)} certificate(s) to {chain_file}")
    done.append(f"wrote next RA certificate to {awaiting.ra_cert}")
    state["next"], state["awaiting_cert"] = entry, None
    _write(state_path, json.dumps(state, indent=2).encode() + b"\n")
    done.append(_prepared(state_path, generation))
    return done


def _prepared(state_path: Path, generation: int) -> str:
    return (
        f"recorded generation {generation} as next in {state_path}; restart the servers to "
        "serve GetNextCACert, then run `hsmscep rollover activate`"
    )


def rollover_activate(settings: Settings) -> list[str]:
    """Make the prepared generation current; the old RA key keeps decrypting."""
    state_path = _state_path(settings)
    upcoming = settings.next_generation
    if upcoming is None:
        raise ConfigError(f"no next CA is prepared in {state_path}; run `hsmscep rollover prepare`")
    for path in (upcoming.ca_cert, upcoming.ra_cert, upcoming.cross_cert):
        if path is not None and not path.exists():
            raise ConfigError(f"{state_path}: next certificate {path} does not exist")
    base = settings.config_path.parent
    state = _read_state(state_path)
    old = settings.ra_decrypt_key
    previous = [
        {
            "key_label": old.label,
            "key_id": old.id.hex() if old.id is not None else None,
            "cert": os.path.relpath(settings.ra_decrypt_cert, base),
        }
    ]
    state["previous_ra"] = previous + list(state.get("previous_ra", []))
    state["current"], state["next"] = state["next"], None
    state["generation"] = settings.rollover_generation + 1
    _write(state_path, json.dumps(state, indent=2).encode() + b"\n")
    return [
        f"generation {state['generation']} is current: CA {upcoming.ca_cert.name}, "
        f"RA {upcoming.ra_cert.name}; the previous RA key {old.describe()} still decrypts",
        "restart the servers to switch over",
    ]


def _state_path(settings: Settings) -> Path:
    assert settings.rollover_state is not None
    return settings.rollover_state


def _read_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return {"generation": 1, "current": None, "next": None, "previous_ra": []}
    assert isinstance(state, dict)  # config.load_settings has validated it
    return state


def _next_label(ref: KeyRef, role: str, generation: int) -> str:
    if ref.label is None:
        raise ConfigError(f"{role}.key_label is required for rollover (keys are found by label)")
    return f"{re.sub(r'-g[0-9]+$', '', ref.label)}-g{generation}"


def _spec_of(public_key: Any) -> KeySpec:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        spec = {"secp256r1": "p256", "secp384r1": "p384"}.get(public_key.curve.name)
    else:
        spec = f"rsa{public_key.key_size}"
    if spec not in KEY_SPECS:
        raise ConfigError("the current CA key has no matching --ca-key; pass one")
    return spec


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


def _write_ca_csr(subject: x509.Name, ca_key: Any, path: Path) -> None:
    """A CSR for a CA key in the HSM, for an external root to sign."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    _write(path, csr.public_bytes(Encoding.PEM))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
