"""`hsmscep rollover prepare|import-ca|activate`: the next CA generation, then the switch.

Keys are generated in the token next to the current ones (labels end in -g<N>); the steps
are recorded in the rollover state file through hsmscep.config.rollover, which the servers
read at start.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.cli.certificates import (
    ca_certificate,
    check_certifies,
    cross_certificate,
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
from hsmscep.config.rollover import Generation, record_activated, record_awaiting, record_next
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.refs import KEY_SPECS, KeyRef, KeySpec
from hsmscep.hsm.tokenkeys import public_key_of


@dataclass(frozen=True, slots=True)
class RolloverOptions:
    ca_key: KeySpec | None = None  # None: the same kind of key as the current CA's
    ra_key_bits: int | None = None  # None: the current RA key's size
    subject: str | None = None  # None: the current CA's subject
    validity_days: int = 3650
    ra_validity_days: int = 730
    force: bool = False  # replace leftover keys with the next generation's labels
    csr_out: Path | None = None  # external root: write the next CA's CSR instead of self-signing
    confirm: Confirm = refuse  # asked before --force destroys leftover keys, with their labels
    resume: bool = False  # keep leftover next keys (a failed prepare made them)


def rollover_prepare(
    settings: Settings, options: RolloverOptions, progress: Callable[[str], None] | None = None
) -> list[str]:
    """Generate the next CA and RA keys in the token, a new self-signed root, its RA
    certificate and the NewWithOld cross certificate (the new root certified by the current
    one, signed by the current CA key), and record them as `next` in the rollover state file.
    Each step also goes to `progress` as soon as it is done."""
    done: list[str] = []

    def step(line: str) -> None:
        done.append(line)
        if progress is not None:
            progress(line)

    state_path = settings.rollover.path
    if settings.rollover.next is not None:
        raise ConfigError(
            f"a next CA is already prepared in {state_path}; run `hsmscep rollover activate`"
        )
    if settings.rollover.awaiting_cert is not None and not (options.force or options.resume):
        raise ConfigError(
            f"a next CA key awaits its certificate ({state_path}); run `hsmscep rollover "
            "import-ca`, or prepare again with --force"
        )
    if settings.ra_split:
        raise ConfigError("CA rollover does not support a separate [ra_decrypt] key yet")
    current = x509.load_pem_x509_certificate(settings.ca.cert.read_bytes())
    external = settings.ca.chain is not None or current.issuer != current.subject
    if external and options.csr_out is None:
        raise ConfigError(
            "the CA is signed by an external root: pass --csr FILE, have the root sign it, "
            "then run `hsmscep rollover import-ca`"
        )
    generation = settings.rollover.generation + 1
    base = settings.config_path.parent
    next_ca = KeyRef(settings.ca.key.token, _next_label(settings.ca.key, "ca", generation))
    next_ra = KeyRef(settings.ra.key.token, _next_label(settings.ra.key, "ra", generation))
    ca_path, ra_path = base / f"ca-g{generation}.pem", base / f"ra-g{generation}.pem"
    ca_spec = options.ca_key or _spec_of(current.public_key())
    ra_current = x509.load_pem_x509_certificate(settings.ra.cert.read_bytes())
    ra_bits = options.ra_key_bits or ra_current.public_key().key_size  # type: ignore[union-attr]
    if ra_bits < 2048:
        raise ConfigError("--ra-key-size must be at least 2048")
    try:
        subject = (
            x509.Name.from_rfc4514_string(options.subject) if options.subject else current.subject
        )
    except ValueError as exc:
        raise ConfigError(f"--subject {options.subject!r}: {exc}") from None
    logins = TokenLogin()
    try:
        ra_spec: KeySpec = f"rsa{ra_bits}"  # type: ignore[assignment]
        generate_missing(
            logins,
            [
                WantedKey(next_ca, ca_spec, "sign", "next CA key"),
                WantedKey(next_ra, ra_spec, "both", "next RA key"),
            ],
            resume=options.resume,
            force=options.force,
            confirm=options.confirm,
            step=step,
            adjective="leftover",
        )
        ca_key = signing_key(logins, next_ca)
        entry = Generation(next_ca, ca_path, next_ra, ra_path)
        if options.csr_out is not None:
            write_ca_csr(subject, ca_key, options.csr_out)
            step(f"wrote the next CA's CSR to {options.csr_out}")
            record_awaiting(settings.rollover, entry)
            step(
                f"recorded generation {generation} as awaiting its certificate in {state_path};"
                " have the root sign the CSR, then run"
                " `hsmscep rollover import-ca --cert FILE [--chain FILE]`"
            )
            return done
        ca_cert = ca_certificate(subject, ca_key, datetime.now(UTC), options.validity_days)
        ra_public = public_key_of(open_rw(logins, next_ra), next_ra)
        ra_cert = ra_certificate(ca_key, ca_cert, ra_public, "both", options.ra_validity_days)
        # NewWithOld: the next CA certified by the current one, signed by the current CA key.
        cross = cross_certificate(ca_cert, current, signing_key(logins, settings.ca.key))
    finally:
        logins.close()
    try:
        cross.verify_directly_issued_by(current)
    except (InvalidSignature, ValueError, TypeError):
        raise ConfigError(
            f"the CA key {settings.ca.key.describe()} does not match {settings.ca.cert}"
        ) from None
    cross_path = base / f"cross-g{generation}.pem"
    write_file(ca_path, ca_cert.public_bytes(Encoding.PEM))
    write_file(ra_path, ra_cert.public_bytes(Encoding.PEM))
    step(f"wrote next CA certificate to {ca_path} and next RA certificate to {ra_path}")
    write_file(cross_path, cross.public_bytes(Encoding.PEM))
    step(f"wrote the next CA certified by the current CA (NewWithOld) to {cross_path}")
    record_next(settings.rollover, replace(entry, cross_cert=cross_path))
    step(_prepared(state_path, generation))
    return done


def rollover_import_ca(
    settings: Settings,
    cert_path: Path,
    chain_path: Path | None,
    ra_days: int,
    progress: Callable[[str], None] = lambda line: None,
) -> list[str]:
    """Install the externally signed next CA certificate (checked against the next CA key in
    the token) and its chain, issue the next RA certificate, and record the generation as
    `next`: like `import-ca`, for the generation `rollover prepare --csr` made."""
    done: list[str] = []

    def step(line: str) -> None:
        done.append(line)
        progress(line)

    state_path = settings.rollover.path
    awaiting = settings.rollover.awaiting_cert
    if awaiting is None:
        raise ConfigError(f"no next CA awaits a certificate in {state_path}")
    cert, chain = read_ca_files(cert_path, chain_path)
    generation = settings.rollover.generation + 1
    base = settings.config_path.parent
    logins = TokenLogin()
    try:
        check_certifies(logins, awaiting.ca_key, cert, cert_path, chain, chain_path)
        step(f"checked: {cert_path} certifies the next CA key {awaiting.ca_key.describe()}")
        ca_key = signing_key(logins, awaiting.ca_key)
        ra_public = public_key_of(open_rw(logins, awaiting.ra_key), awaiting.ra_key)
        ra_cert = ra_certificate(ca_key, cert, ra_public, "both", ra_days)
    finally:
        logins.close()
    write_file(awaiting.ca_cert, cert.public_bytes(Encoding.PEM))
    step(f"installed next CA certificate {cert.subject.rfc4514_string()} to {awaiting.ca_cert}")
    write_file(awaiting.ra_cert, ra_cert.public_bytes(Encoding.PEM))
    step(f"wrote next RA certificate to {awaiting.ra_cert}")
    if chain:
        chain_file = base / f"chain-g{generation}.pem"
        write_file(chain_file, b"".join(c.public_bytes(Encoding.PEM) for c in chain))
        awaiting = replace(awaiting, ca_chain=chain_file)
        step(f"installed a chain of {len(chain)} certificate(s) to {chain_file}")
    record_next(settings.rollover, awaiting)
    step(_prepared(state_path, generation))
    return done


def _prepared(state_path: Path | None, generation: int) -> str:
    return (
        f"recorded generation {generation} as next in {state_path}; restart the servers to "
        "serve GetNextCACert, then run `hsmscep rollover activate`"
    )


def rollover_activate(settings: Settings) -> list[str]:
    """Make the prepared generation current; the old RA key keeps decrypting."""
    state_path = settings.rollover.path
    upcoming = settings.rollover.next
    if upcoming is None:
        raise ConfigError(f"no next CA is prepared in {state_path}; run `hsmscep rollover prepare`")
    for path in (upcoming.ca_cert, upcoming.ra_cert, upcoming.cross_cert):
        if path is not None and not path.exists():
            raise ConfigError(f"{state_path}: next certificate {path} does not exist")
    old = settings.ra_decrypt.key
    current = record_activated(settings.rollover, (old, settings.ra_decrypt.cert))
    return [
        f"generation {current} is current: CA {upcoming.ca_cert.name}, "
        f"RA {upcoming.ra_cert.name}; the previous RA key {old.describe()} still decrypts",
        "restart the servers to switch over",
    ]


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


def prepare_command(args: argparse.Namespace) -> int:
    """`hsmscep rollover prepare`."""
    options = RolloverOptions(
        ca_key=args.ca_key,
        ra_key_bits=args.ra_key_size,
        subject=args.subject,
        validity_days=args.validity_days,
        ra_validity_days=args.ra_validity_days,
        force=args.force,
        csr_out=args.csr,
        confirm=confirm_destroy(args.yes),
        resume=args.resume,
    )
    resume = [
        *("hsmscep", "rollover", "prepare", "--config", args.config),
        *key_flags(args),
        "--resume",
    ]
    steps = Steps()
    with steps.resumable(resume):
        rollover_prepare(load_settings(args.config), options, steps)
    return 0


def import_ca_command(args: argparse.Namespace) -> int:
    """`hsmscep rollover import-ca`."""
    settings = load_settings(args.config)
    command = [
        *("hsmscep", "rollover", "import-ca", "--config", args.config),
        *flag("--cert", args.cert),
        *flag("--chain", args.chain),
        *flag("--ra-validity-days", args.ra_validity_days),
    ]
    steps = Steps()
    with steps.resumable(command):  # the same command resumes: the state is written last
        rollover_import_ca(settings, args.cert, args.chain, args.ra_validity_days, steps)
    return 0


def activate_command(args: argparse.Namespace) -> int:
    """`hsmscep rollover activate`."""
    for line in rollover_activate(load_settings(args.config)):
        print(line)
    return 0
