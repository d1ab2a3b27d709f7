"""The `hsmscep` command: init, import-ca, serve, dev, revoke, pending, challenge, rollover.

Flags override the config file by setting the matching HSMSCEP_* variables, so uvicorn's
spawned worker processes see the same settings. Secrets never come from argv.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hsmscep import __version__, logs
from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import (
    ConfigError,
    HsmError,
    RequestConflict,
    StoreError,
    UnknownCertificate,
    UnknownProfile,
    UnknownRequest,
)
from hsmscep.hsm.refs import KEY_SPECS
from hsmscep.policy.profiles import DEFAULT_CA

if TYPE_CHECKING:
    from hsmscep.store.records import OneTimeChallenge, PendingRequest, Revocation

DEFAULT_CONFIG = "hsmscep.toml"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure()
    try:
        return int(args.func(args) or 0)
    except (
        ConfigError,
        HsmError,
        StoreError,
        UnknownCertificate,
        UnknownRequest,
        UnknownProfile,
        RequestConflict,
    ) as exc:
        print(f"hsmscep: {exc}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsmscep", description="HSM-backed SCEP server")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    def with_ca(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--ca",
            default=DEFAULT_CA,
            help="which CA: default ([ca]/[ra]) or a [cas.<name>] of the config file",
        )

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            default=os.environ.get("HSMSCEP_CONFIG", DEFAULT_CONFIG),
            help="TOML config file (default: $HSMSCEP_CONFIG or ./hsmscep.toml)",
        )

    init = sub.add_parser("init", help="generate CA and RA keys in the HSM and their certificates")
    with_config(init)
    with_ca(init)
    init.add_argument("--ca-key", choices=KEY_SPECS, default="rsa2048")
    init.add_argument("--ra-key-size", type=int, default=2048, choices=(2048, 3072, 4096))
    init.add_argument("--subject", default="CN=hsmscep CA", help="CA subject, RFC 4514")
    init.add_argument("--validity-days", type=int, default=3650, help="CA validity")
    init.add_argument("--ra-validity-days", type=int, default=730)
    init.add_argument(
        "--csr", type=Path, help="write a CA CSR for an external root instead of self-signing"
    )
    init.add_argument("--force", action="store_true", help="destroy and replace existing keys")
    init.set_defaults(func=_init)

    imp = sub.add_parser("import-ca", help="install an externally signed CA certificate")
    with_config(imp)
    with_ca(imp)
    imp.add_argument("--cert", type=Path, required=True, help="signed CA certificate (PEM)")
    imp.add_argument("--chain", type=Path, help="issuer chain (PEM), nearest issuer first")
    imp.add_argument("--ra-validity-days", type=int, default=730)
    imp.set_defaults(func=_import_ca)

    serve = sub.add_parser("serve", help="run the SCEP server")
    with_config(serve)
    _server_flags(serve)
    serve.set_defaults(func=_serve)

    revoke = sub.add_parser("revoke", help="revoke an issued certificate (RFC 5280 reason)")
    with_config(revoke)
    with_ca(revoke)
    revoke.add_argument("--serial", type=_serial, required=True, help="serial number in hex")
    revoke.add_argument(
        "--reason",
        default="unspecified",
        metavar="REASON",
        help="unspecified (default), keyCompromise, cACompromise, affiliationChanged, "
        "superseded, cessationOfOperation, certificateHold, privilegeWithdrawn, aACompromise",
    )
    revoke.set_defaults(func=_revoke)

    pending = sub.add_parser(
        "pending", help='requests waiting for approval ([enroll] approval = "manual")'
    )
    pending_sub = pending.add_subparsers(required=True, metavar="ACTION")
    listing = pending_sub.add_parser("list", help="list requests waiting for a decision")
    with_config(listing)
    with_ca(listing)
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(func=_pending_list)
    for action, text in (("approve", "approve"), ("reject", "reject")):
        decide = pending_sub.add_parser(action, help=f"{text} a pending request by its id")
        with_config(decide)
        with_ca(decide)
        decide.add_argument("id", type=int, help="request id (from `hsmscep pending list`)")
        decide.set_defaults(func=_pending_decide, approve=action == "approve")

    challenge = sub.add_parser(
        "challenge", help='one-time enrollment challenges (challenge_mode = "one_time")'
    )
    challenge_sub = challenge.add_subparsers(required=True, metavar="ACTION")
    issue = challenge_sub.add_parser(
        "issue", help="print a fresh one-time challenge (shown once, stored only as a hash)"
    )
    with_config(issue)
    issue.add_argument("--profile", default="default", help="enrollment profile (default: default)")
    issue.add_argument(
        "--ttl", type=int, default=None, help="seconds until it expires (default: the profile's)"
    )
    issue.add_argument("--subject-pattern", help="regex the CSR subject (RFC 4514) must match")
    issue.add_argument("--san-pattern", help='regex every SAN ("DNS:host.example") must match')
    issue.add_argument("--json", action="store_true", help="one JSON object with the expiry")
    issue.set_defaults(func=_challenge_issue)

    rollover = sub.add_parser("rollover", help="CA rollover: prepare the next CA, then activate it")
    rollover_sub = rollover.add_subparsers(required=True, metavar="ACTION")
    prepare = rollover_sub.add_parser(
        "prepare", help="next CA and RA keys in the HSM, a new root and RA certificate"
    )
    with_config(prepare)
    prepare.add_argument("--ca-key", choices=KEY_SPECS, help="default: like the current CA key")
    prepare.add_argument("--ra-key-size", type=int, choices=(2048, 3072, 4096))
    prepare.add_argument("--subject", help="next CA subject, RFC 4514 (default: the current one)")
    prepare.add_argument("--validity-days", type=int, default=3650, help="next CA validity")
    prepare.add_argument("--ra-validity-days", type=int, default=730)
    prepare.add_argument(
        "--force", action="store_true", help="replace leftover keys with the next labels"
    )
    prepare.add_argument(
        "--csr", type=Path, help="external root: write the next CA's CSR instead of self-signing"
    )
    prepare.set_defaults(func=_rollover_prepare)
    rimp = rollover_sub.add_parser(
        "import-ca", help="install the externally signed next CA certificate (after --csr)"
    )
    with_config(rimp)
    rimp.add_argument("--cert", type=Path, required=True, help="signed next CA certificate (PEM)")
    rimp.add_argument("--chain", type=Path, help="issuer chain (PEM), nearest issuer first")
    rimp.add_argument("--ra-validity-days", type=int, default=730)
    rimp.set_defaults(func=_rollover_import_ca)
    activate = rollover_sub.add_parser(
        "activate", help="make the prepared CA current (the old RA key keeps decrypting)"
    )
    with_config(activate)
    activate.set_defaults(func=_rollover_activate)

    dev = sub.add_parser("dev", help="SoftHSM2 dev CA in a local directory, then serve")
    dev.add_argument("--dir", type=Path, default=Path(".dev"), help="state directory (.dev)")
    dev.add_argument("--ca-key", choices=KEY_SPECS, default="rsa2048")
    _server_flags(dev)
    dev.set_defaults(func=_dev)
    return parser


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from config: 8080)")
    p.add_argument("--workers", help="processes: a number or 'auto' (one per core)")
    p.add_argument("--pool-size", type=int, help="signing threads (HSM sessions) per process")


def _apply_overrides(args: argparse.Namespace) -> None:
    for flag, key in (
        ("host", "HOST"),
        ("port", "PORT"),
        ("workers", "WORKERS"),
        ("pool_size", "POOL_SIZE"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            os.environ[f"HSMSCEP_SERVER_{key}"] = str(value)


def _init(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import InitOptions, init

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


def _import_ca(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import import_ca

    settings = load_settings(args.config).for_ca(args.ca)
    for line in import_ca(settings, args.cert, args.chain, args.ra_validity_days):
        print(line)
    return 0


def _rollover_prepare(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import RolloverOptions, rollover_prepare

    options = RolloverOptions(
        ca_key=args.ca_key,
        ra_key_bits=args.ra_key_size,
        subject=args.subject,
        validity_days=args.validity_days,
        ra_validity_days=args.ra_validity_days,
        force=args.force,
        csr_out=args.csr,
    )
    for line in rollover_prepare(load_settings(args.config), options):
        print(line)
    return 0


def _rollover_import_ca(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import rollover_import_ca

    settings = load_settings(args.config)
    for line in rollover_import_ca(settings, args.cert, args.chain, args.ra_validity_days):
        print(line)
    return 0


def _rollover_activate(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import rollover_activate

    for line in rollover_activate(load_settings(args.config)):
        print(line)
    return 0


def _serial(text: str) -> int:
    from hsmscep.policy.crl import parse_serial

    serial = parse_serial(text)
    if serial is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal serial (positive)")
    return serial


def _revoke(args: argparse.Namespace) -> int:
    from hsmscep.policy.crl import revocation_record

    settings = load_settings(args.config).for_ca(args.ca)
    reason = revocation_reason(args.reason, "--reason")
    revocation, changed = asyncio.run(_record_revocation(settings, args.serial, reason))
    when = revocation.revoked_at.isoformat(timespec="seconds")
    entry = revocation_record(
        revocation.serial,
        revocation.reason,
        revocation.revoked_at,
        changed,
        f"cli:{os.environ.get('USER', '-')}",
    )
    logging.getLogger("hsmscep.audit").info(json.dumps(entry))
    if changed:
        # Only the store changes here: running servers see the new revision on the next CRL
        # request (or their 30 s check) and sign the CRL with the CA key on their own workers.
        print(f"revoked {revocation.serial:x} ({revocation.reason}) at {when}")
    else:
        print(f"{revocation.serial:x} was already revoked ({revocation.reason}) at {when}")
    return 0


def revocation_reason(name: str, what: str) -> str:
    """The stored form of an RFC 5280 reason name; ConfigError naming `what` otherwise."""
    from hsmscep.policy.crl import parse_reason

    try:
        return parse_reason(name).value
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from None


async def _record_revocation(
    settings: Settings, serial: int, reason: str
) -> tuple[Revocation, bool]:
    from datetime import UTC, datetime

    from hsmscep.store.sqlite import CertStore

    store = await CertStore.open(settings.db_path, synchronous=settings.db_synchronous)
    try:
        return await store.revoke(serial, reason, datetime.now(UTC))
    finally:
        await store.close()


def _pending_list(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    settings = load_settings(args.config).for_ca(args.ca)
    requests = asyncio.run(_read_pending(settings))
    now = datetime.now(UTC)
    rows = [
        {
            "id": p.id,
            "profile": p.profile,
            "transaction_id": p.transaction_id,
            "subject": p.subject,
            "sans": list(p.sans),
            "key": p.key_description,
            "requester_ip": p.requester_ip,
            "age_seconds": max(0, int((now - p.created_at).total_seconds())),
            "expired": p.expired(now, settings.profiles.pending_ttl(p.profile)),
        }
        for p in requests
    ]
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    if not rows:
        print("no pending requests")
        return 0
    print("ID\tPROFILE\tAGE\tKEY\tREQUESTER\tSUBJECT\tSANS")
    for p in requests:
        age = f"{max(0, int((now - p.created_at).total_seconds()))}s"
        if p.expired(now, settings.profiles.pending_ttl(p.profile)):
            age += " (expired)"
        sans = ", ".join(p.sans) or "-"
        print(
            f"{p.id}\t{p.profile}\t{age}\t{p.key_description}\t{p.requester_ip}"
            f"\t{p.subject}\t{sans}"
        )
    return 0


async def _read_pending(settings: Settings) -> list[PendingRequest]:
    from hsmscep.store.sqlite import CertStore

    store = await CertStore.open(settings.db_path, synchronous=settings.db_synchronous)
    try:
        return await store.pending_requests()
    finally:
        await store.close()


def _pending_decide(args: argparse.Namespace) -> int:
    settings = load_settings(args.config).for_ca(args.ca)
    pending, changed = asyncio.run(_record_decision(settings, args.id, args.approve))
    entry = {
        "event": "approve" if args.approve else "reject",
        "request": pending.id,
        "transaction_id": pending.transaction_id,
        "subject": pending.subject,
        "outcome": pending.status if changed else f"already {pending.status}",
        "user": os.environ.get("USER", "-"),
    }
    logging.getLogger("hsmscep.audit").info(json.dumps(entry, ensure_ascii=False))
    # Only the store changes: the certificate is issued, with the CA key in the HSM, by the
    # server that answers the client's next poll.
    verb = "approved" if args.approve else "rejected"
    prefix = "" if changed else "already "
    print(f"{prefix}{verb} request {pending.id} ({pending.subject})")
    return 0


async def _record_decision(
    settings: Settings, request_id: int, approve: bool
) -> tuple[PendingRequest, bool]:
    from datetime import UTC, datetime

    from hsmscep.store.sqlite import CertStore

    store = await CertStore.open(settings.db_path, synchronous=settings.db_synchronous)
    try:
        return await store.decide_pending(
            request_id,
            "approved" if approve else "rejected",
            datetime.now(UTC),
            settings.profiles.pending_ttl,
        )
    finally:
        await store.close()


def _challenge_issue(args: argparse.Namespace) -> int:
    from hsmscep.service.onetime import challenge_json, challenge_record

    settings = load_settings(args.config)
    try:
        value, issued = asyncio.run(_issue_challenge(settings, args))
    except ValueError as exc:
        print(f"hsmscep: {exc}", file=sys.stderr)
        return 2
    record = challenge_record(issued, f"cli:{os.environ.get('USER', '-')}")
    logging.getLogger("hsmscep.audit").info(json.dumps(record))
    if args.json:
        print(json.dumps({"challenge": value} | challenge_json(issued)))
    else:
        print(value)
        print(f"profile {issued.profile}, expires {issued.expires_at.isoformat()}", file=sys.stderr)
    return 0


async def _issue_challenge(
    settings: Settings, args: argparse.Namespace
) -> tuple[str, OneTimeChallenge]:
    from hsmscep.service.onetime import issue_challenge
    from hsmscep.store.sqlite import CertStore

    profile = settings.profiles.get(args.profile)
    # The challenge lives in the store of the CA that issues for the profile.
    ca_settings = settings.for_ca(profile.ca) if profile is not None else settings
    store = await CertStore.open(ca_settings.db_path, synchronous=settings.db_synchronous)
    try:
        return await issue_challenge(
            store,
            settings.profiles,
            args.profile,
            ttl_seconds=args.ttl,
            subject_pattern=args.subject_pattern,
            san_pattern=args.san_pattern,
        )
    finally:
        await store.close()


def _serve(args: argparse.Namespace) -> int:
    _apply_overrides(args)
    config = str(Path(args.config).resolve())
    settings = load_settings(config)
    return run_server(config, settings)


_APP = "hsmscep.web.app:app_from_env"


def run_server(config: str, settings: Settings) -> int:
    """Run uvicorn with `settings.workers` processes, each opening its own HSM pool."""
    import uvicorn

    from hsmscep.web import affinity, balance
    from hsmscep.web.httpproto import (
        BoundedHttpToolsProtocol,
        connection_cap,
        raise_open_files_limit,
    )

    for path, key in ((settings.ca_cert, "ca.cert"), (settings.ra_sign_cert, "ra.cert")):
        if not path.exists():
            raise ConfigError(f"{key}: {path} does not exist (run `hsmscep init` first)")
    os.environ["HSMSCEP_CONFIG"] = config
    cpus = affinity.usable_cpus()
    workers = affinity.worker_processes(settings.workers)
    logs.configure(settings.log_level)
    # Before the workers start: they inherit the limit, and each derives its cap from it.
    before, after = raise_open_files_limit()
    logging.getLogger("hsmscep.web").info(
        "open files limit %d (soft limit was %d): at most %d connections per worker process",
        after,
        before,
        connection_cap(),
    )
    options: dict[str, Any] = {
        "factory": True,
        "host": settings.host,
        "port": settings.port,
        "loop": "uvloop",
        "http": BoundedHttpToolsProtocol,
        "access_log": False,
        "log_level": settings.log_level.lower(),
        "backlog": 4096,
        "timeout_keep_alive": 15,
        "timeout_graceful_shutdown": 30,
    }
    if affinity.should_pin(settings.pin_cpus, workers, len(cpus)):
        os.environ[affinity.ENV] = ",".join(map(str, cpus))
    if workers > 1:
        # One HSM session per process: connections must be spread by load, which uvicorn's
        # shared accept does not do (hsmscep/balance.py).
        balance.serve(uvicorn.Config(_APP, workers=workers, **options))
    else:
        uvicorn.run(_APP, **options)
    return 0


def _dev(args: argparse.Namespace) -> int:
    from hsmscep.cli.bootstrap import InitOptions, init
    from hsmscep.hsm import devtoken

    directory: Path = args.dir.resolve()
    token = devtoken.ensure_token(directory)
    challenge_file = directory / "challenge"
    if not challenge_file.exists():
        challenge_file.write_text(secrets.token_urlsafe(12) + "\n")
        challenge_file.chmod(0o600)
    config = directory / "hsmscep.toml"
    if not config.exists():
        config.write_text(dev_config(token.module, token.label, "pin", "challenge"))
    _apply_overrides(args)
    settings = load_settings(config)
    if not settings.ca_cert.exists():
        for line in init(settings, InitOptions(ca_key=args.ca_key, subject="CN=hsmscep dev CA")):
            print(line)
    host = "[::1]" if ":" in settings.host else settings.host
    print(f"SCEP URL:  http://{host}:{settings.port}/scep")
    print(f"challenge: {challenge_file.read_text().strip()}")
    print(f"config:    {config}  (SOFTHSM2_CONF={token.conf})", flush=True)
    return run_server(str(config), settings)


def dev_config(module: str, label: str, pin_file: str, challenge_file: str) -> str:
    """A config file for a SoftHSM2 dev token (also used by the tests)."""
    return f"""\
# hsmscep development CA: keys in a project-local SoftHSM2 token.
[server]
host = "127.0.0.1"
port = 8080

[pkcs11]
module = "{module}"
token_label = "{label}"
pin_file = "{pin_file}"

[ca]
key_label = "hsmscep-ca"
cert = "ca.pem"

[ra]
key_label = "hsmscep-ra"
cert = "ra.pem"

[enroll]
challenge_file = "{challenge_file}"
validity_days = 365

[store]
path = "hsmscep.db"
"""


if __name__ == "__main__":
    sys.exit(main())
