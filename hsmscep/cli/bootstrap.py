"""`hsmscep init` and `hsmscep import-ca`: keys generated in the token, certificates on disk.

Private keys are created inside the HSM (CKA_SENSITIVE, not CKA_EXTRACTABLE) and signing
happens there; only certificates and CSRs are written to disk. Existing keys are never
replaced unless the caller says so.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.cli.certificates import (
    RA_ROLES,
    ca_certificate,
    check_certifies,
    open_rw,
    ra_certificate,
    read_ca_files,
    signing_key,
    write_ca_csr,
    write_file,
)
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KeyRef, KeySpec
from hsmscep.hsm.tokenkeys import destroy_key, generate_key, private_key_exists, public_key_of


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
            ref for ref in _all_keys(settings) if private_key_exists(open_rw(logins, ref), ref)
        ]
        if existing and not options.force:
            names = ", ".join(ref.describe() for ref in existing)
            raise ConfigError(
                f"keys already exist in the token ({names}); pass --force to replace them"
            )
        for ref in existing:
            destroy_key(open_rw(logins, ref), ref)
            done.append(f"destroyed old key {ref.describe()}")
        generate_key(
            open_rw(logins, settings.ca.key), settings.ca.key, options.ca_key, usage="sign"
        )
        done.append(f"generated CA key {settings.ca.key.describe()} ({options.ca_key})")
        ra_spec: KeySpec = f"rsa{options.ra_key_bits}"  # type: ignore[assignment]
        for ref, usage in _ra_keys(settings):
            generate_key(open_rw(logins, ref), ref, ra_spec, usage=usage)
            done.append(f"generated RA {usage} key {ref.describe()} (rsa{options.ra_key_bits})")
        ca_key = signing_key(logins, settings.ca.key)
        if options.csr_out is not None:
            write_ca_csr(subject, ca_key, options.csr_out)
            done.append(f"wrote CA CSR to {options.csr_out}; sign it, then run import-ca")
            return done
        now = datetime.now(UTC)
        ca_cert = ca_certificate(subject, ca_key, now, options.validity_days)
        write_file(settings.ca.cert, ca_cert.public_bytes(Encoding.PEM))
        done.append(f"wrote self-signed CA certificate to {settings.ca.cert}")
        done += _issue_ra_certificates(settings, logins, ca_cert, options.ra_validity_days)
        return done
    finally:
        logins.close()


def import_ca(
    settings: Settings, cert_path: Path, chain_path: Path | None, ra_days: int
) -> list[str]:
    """Install an externally signed CA certificate (and chain), then issue the RA certificates."""
    cert, chain = read_ca_files(cert_path, chain_path)
    logins = TokenLogin()
    try:
        check_certifies(logins, settings.ca.key, cert, cert_path, chain, chain_path)
        write_file(settings.ca.cert, cert.public_bytes(Encoding.PEM))
        done = [f"installed CA certificate {cert.subject.rfc4514_string()}"]
        if chain:
            if settings.ca.chain is None:
                raise ConfigError("set ca.chain in the config file to install a chain")
            write_file(settings.ca.chain, b"".join(c.public_bytes(Encoding.PEM) for c in chain))
            done.append(f"installed a chain of {len(chain)} certificate(s)")
        return done + _issue_ra_certificates(settings, logins, cert, ra_days)
    finally:
        logins.close()


def _all_keys(settings: Settings) -> list[KeyRef]:
    return list(dict.fromkeys([settings.ca.key, *(ref for ref, _ in _ra_keys(settings))]))


def _ra_keys(settings: Settings) -> list[tuple[KeyRef, str]]:
    if settings.ra_split:
        return [(settings.ra.key, "sign"), (settings.ra_decrypt.key, "decrypt")]
    return [(settings.ra.key, "both")]


def _issue_ra_certificates(
    settings: Settings, logins: TokenLogin, ca_cert: x509.Certificate, days: int
) -> list[str]:
    ca_key = signing_key(logins, settings.ca.key)
    done = []
    for ref, usage in _ra_keys(settings):
        path = settings.ra_decrypt.cert if usage == "decrypt" else settings.ra.cert
        public_key = public_key_of(open_rw(logins, ref), ref)
        cert = ra_certificate(ca_key, ca_cert, public_key, usage, days)
        write_file(path, cert.public_bytes(Encoding.PEM))
        done.append(f"wrote {RA_ROLES[usage]} certificate to {path}")
    return done


def init_command(args: argparse.Namespace) -> int:
    """`hsmscep init`."""
    settings = load_settings(args.config).for_ca(args.ca)
    options = InitOptions(
        ca_key=args.ca_key,
        ra_key_bits=args.ra_key_size,
        subject=args.subject,
        validity_days=args.validity_days,
        ra_validity_days=args.ra_validity_days,
        csr_out=args.csr,
        force=args.force,
    )
    for line in init(settings, options):
        print(line)
    return 0


def import_ca_command(args: argparse.Namespace) -> int:
    """`hsmscep import-ca`."""
    settings = load_settings(args.config).for_ca(args.ca)
    for line in import_ca(settings, args.cert, args.chain, args.ra_validity_days):
        print(line)
    return 0
