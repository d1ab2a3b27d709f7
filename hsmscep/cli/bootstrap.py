"""`hsmscep init` and `hsmscep import-ca`: keys generated in the token, certificates on disk.

Private keys are created inside the HSM (CKA_SENSITIVE, not CKA_EXTRACTABLE) and signing
happens there; only certificates and CSRs are written to disk. Existing keys are never
replaced unless the caller says so and confirms; `resume` keeps what a failed run made.
Each step is reported as it completes.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
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
from hsmscep.cli.steps import (
    Confirm,
    Steps,
    WantedKey,
    confirm_destroy,
    flag,
    generate_missing,
    key_flags,
    refuse,
)
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KeyRef, KeySpec
from hsmscep.hsm.tokenkeys import public_key_of


@dataclass(frozen=True, slots=True)
class InitOptions:
    ca_key: KeySpec = "rsa2048"
    ra_key_bits: int = 2048
    subject: str = "CN=hsmscep dev CA"
    validity_days: int = 3650
    ra_validity_days: int = 730
    csr_out: Path | None = None
    force: bool = False
    confirm: Confirm = refuse  # asked before --force destroys keys, with their labels
    resume: bool = False  # keep existing keys and certificates, make what is missing


def init(
    settings: Settings, options: InitOptions, progress: Callable[[str], None] | None = None
) -> list[str]:
    """Create the CA and RA keys and certificates; return what was done, line by line
    (each line also goes to `progress` as soon as the step is done)."""
    done: list[str] = []

    def step(line: str) -> None:
        done.append(line)
        if progress is not None:
            progress(line)

    if options.ra_key_bits < 2048:
        raise ConfigError("--ra-key-size must be at least 2048")
    try:
        subject = x509.Name.from_rfc4514_string(options.subject)
    except ValueError as exc:
        raise ConfigError(f"--subject {options.subject!r}: {exc}") from None
    logins = TokenLogin()
    try:
        ra_spec: KeySpec = f"rsa{options.ra_key_bits}"  # type: ignore[assignment]
        generate_missing(
            logins,
            [
                WantedKey(settings.ca.key, options.ca_key, "sign", "CA key"),
                *(WantedKey(ref, ra_spec, u, f"RA {u} key") for ref, u in _ra_keys(settings)),
            ],
            resume=options.resume,
            force=options.force,
            confirm=options.confirm,
            step=step,
            adjective="old",
        )
        ca_key = signing_key(logins, settings.ca.key)
        if options.csr_out is not None:
            write_ca_csr(subject, ca_key, options.csr_out)
            step(f"wrote CA CSR to {options.csr_out}; sign it, then run import-ca")
            return done
        if options.resume and settings.ca.cert.exists():
            ca_cert = x509.load_pem_x509_certificate(settings.ca.cert.read_bytes())
            step(f"kept CA certificate {settings.ca.cert}")
        else:
            now = datetime.now(UTC)
            ca_cert = ca_certificate(subject, ca_key, now, options.validity_days)
            write_file(settings.ca.cert, ca_cert.public_bytes(Encoding.PEM))
            step(f"wrote self-signed CA certificate to {settings.ca.cert}")
        _issue_ra_certificates(
            settings, logins, ca_cert, options.ra_validity_days, step, keep=options.resume
        )
        return done
    finally:
        logins.close()


def import_ca(
    settings: Settings,
    cert_path: Path,
    chain_path: Path | None,
    ra_days: int,
    progress: Callable[[str], None] = lambda line: None,
) -> list[str]:
    """Install an externally signed CA certificate (and chain), then issue the RA certificates."""
    done: list[str] = []

    def step(line: str) -> None:
        done.append(line)
        progress(line)

    cert, chain = read_ca_files(cert_path, chain_path)
    if chain and settings.ca.chain is None:
        raise ConfigError("set ca.chain in the config file to install a chain")
    logins = TokenLogin()
    try:
        check_certifies(logins, settings.ca.key, cert, cert_path, chain, chain_path)
        step(f"checked: {cert_path} certifies the CA key {settings.ca.key.describe()}")
        write_file(settings.ca.cert, cert.public_bytes(Encoding.PEM))
        step(f"installed CA certificate {cert.subject.rfc4514_string()} to {settings.ca.cert}")
        if chain and settings.ca.chain is not None:
            write_file(settings.ca.chain, b"".join(c.public_bytes(Encoding.PEM) for c in chain))
            step(f"installed a chain of {len(chain)} certificate(s) to {settings.ca.chain}")
        _issue_ra_certificates(settings, logins, cert, ra_days, step)
        return done
    finally:
        logins.close()


def _ra_keys(settings: Settings) -> list[tuple[KeyRef, str]]:
    if settings.ra_split:
        return [(settings.ra.key, "sign"), (settings.ra_decrypt.key, "decrypt")]
    return [(settings.ra.key, "both")]


def _issue_ra_certificates(
    settings: Settings,
    logins: TokenLogin,
    ca_cert: x509.Certificate,
    days: int,
    step: Callable[[str], None],
    keep: bool = False,
) -> None:
    ca_key = signing_key(logins, settings.ca.key)
    for ref, usage in _ra_keys(settings):
        path = settings.ra_decrypt.cert if usage == "decrypt" else settings.ra.cert
        if keep and path.exists():
            step(f"kept {RA_ROLES[usage]} certificate {path}")
            continue
        public_key = public_key_of(open_rw(logins, ref), ref)
        cert = ra_certificate(ca_key, ca_cert, public_key, usage, days)
        write_file(path, cert.public_bytes(Encoding.PEM))
        step(f"wrote {RA_ROLES[usage]} certificate to {path}")


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
        confirm=confirm_destroy(args.yes),
        resume=args.resume,
    )
    resume = [
        *("hsmscep", "init", "--config", args.config),
        *flag("--ca", args.ca, "default"),
        *key_flags(args),
        "--resume",
    ]
    steps = Steps()
    with steps.resumable(resume):
        init(settings, options, steps)
    return 0


def import_ca_command(args: argparse.Namespace) -> int:
    """`hsmscep import-ca`: re-running the same command resumes it."""
    settings = load_settings(args.config).for_ca(args.ca)
    command = [
        *("hsmscep", "import-ca", "--config", args.config),
        *flag("--ca", args.ca, "default"),
        *flag("--cert", args.cert),
        *flag("--chain", args.chain),
        *flag("--ra-validity-days", args.ra_validity_days),
    ]
    steps = Steps()
    with steps.resumable(command):
        import_ca(settings, args.cert, args.chain, args.ra_validity_days, steps)
    return 0
