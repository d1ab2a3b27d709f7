"""The `hsmscep` command: its parser, and dispatch to the command modules of hsmscep.cli.

Commands: init, import-ca (bootstrap), serve, dev, status, revoke, pending, challenge,
rollover, store, config check. A command's module is imported only when it runs. Secrets
never come from argv. A user's mistake is one line `hsmscep: ...` and the exit code of its
class (EXIT_CODES, docs/operations.md); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from hsmscep import __version__, logs
from hsmscep.errors import (
    ConfigError,
    HsmError,
    ListenError,
    RequestConflict,
    StoreError,
    UnknownCertificate,
    UnknownProfile,
    UnknownRequest,
    WorkerStartFailed,
)
from hsmscep.hsm.refs import KEY_SPECS
from hsmscep.policy.profiles import DEFAULT_CA

DEFAULT_CONFIG = "hsmscep.toml"

# Exit codes by class of mistake; the first matching class wins. 1 is a file the command
# could not read or write (OSError); anything else unexpected is a traceback (a bug).
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (ConfigError, 2),  # the config file, a file it names, a flag, a command's argument
    (UnknownCertificate, 2),
    (UnknownRequest, 2),
    (UnknownProfile, 2),
    (RequestConflict, 2),
    (HsmError, 3),  # PKCS#11 module, token, PIN, key
    (StoreError, 4),  # the database or its directory
    (ListenError, 5),  # network: address not resolvable, port in use
    (WorkerStartFailed, 6),  # a worker failed after pre-flight passed
    (OSError, 1),
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code of a user's mistake; None for a bug (shown with its traceback)."""
    return next((code for kind, code in EXIT_CODES if isinstance(exc, kind)), None)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logs.configure()
    try:
        return _dispatch(args)
    except Exception as exc:
        code = exit_code(exc)
        if code is None or args.debug:
            raise
        print(f"hsmscep: {exc}", file=sys.stderr)
        for note in getattr(exc, "__notes__", ()):
            print(f"hsmscep: {note}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("hsmscep: interrupted", file=sys.stderr)
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    """Run the command's handler, importing its module only now (init needs no uvicorn)."""
    module_name, _, function = str(args.command).partition(":")
    handler = getattr(importlib.import_module(f"hsmscep.cli.{module_name}"), function)
    return int(handler(args) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsmscep", description="HSM-backed SCEP server")
    parser.add_argument("--version", action="version", version=__version__)
    parser.add_argument("--debug", action="store_true", help="tracebacks instead of one line")
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
        debug_flag(p)

    def debug_flag(p: argparse.ArgumentParser) -> None:
        # SUPPRESS: a subcommand's default must not overwrite `hsmscep --debug CMD`.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="tracebacks")

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
    init.add_argument(
        "--force", action="store_true", help="destroy and replace existing keys (asks first)"
    )
    init.add_argument("--yes", action="store_true", help="confirm --force without asking")
    init.add_argument(
        "--resume",
        action="store_true",
        help="after a failed init: keep the keys and certificates made, finish the rest",
    )
    init.set_defaults(command="bootstrap:init_command")

    imp = sub.add_parser("import-ca", help="install an externally signed CA certificate")
    with_config(imp)
    with_ca(imp)
    imp.add_argument("--cert", type=Path, required=True, help="signed CA certificate (PEM)")
    imp.add_argument("--chain", type=Path, help="issuer chain (PEM), nearest issuer first")
    imp.add_argument("--ra-validity-days", type=int, default=730)
    imp.set_defaults(command="bootstrap:import_ca_command")

    serve = sub.add_parser("serve", help="run the SCEP server")
    with_config(serve)
    _server_flags(serve)
    serve.set_defaults(command="serve:run")

    status = sub.add_parser(
        "status", help="the server's facts, counts from the store, a plot of issuance per hour"
    )
    with_config(status)
    status.add_argument("--days", type=int, default=7, help="issuance per hour over N days (7)")
    status.add_argument("--plot", type=Path, help="draw it into out.png or out.svg (matplotlib)")
    status.add_argument("--json", action="store_true", help="one JSON object instead of text")
    status.set_defaults(command="status:run")

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
    revoke.set_defaults(command="revoke:run")

    pending = sub.add_parser(
        "pending", help='requests waiting for approval ([enroll] approval = "manual")'
    )
    pending_sub = pending.add_subparsers(required=True, metavar="ACTION")
    listing = pending_sub.add_parser("list", help="list requests waiting for a decision")
    with_config(listing)
    with_ca(listing)
    listing.add_argument("--json", action="store_true", help="one JSON array instead of a table")
    listing.set_defaults(command="pending:list_requests")
    for action, text in (("approve", "approve"), ("reject", "reject")):
        decide = pending_sub.add_parser(action, help=f"{text} a pending request by its id")
        with_config(decide)
        with_ca(decide)
        decide.add_argument("id", type=int, help="request id (from `hsmscep pending list`)")
        decide.set_defaults(command="pending:decide", approve=action == "approve")

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
    issue.set_defaults(command="challenge:issue")

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
        "--force", action="store_true", help="replace leftover keys with the next labels (asks)"
    )
    prepare.add_argument("--yes", action="store_true", help="confirm --force without asking")
    prepare.add_argument(
        "--resume", action="store_true", help="after a failed prepare: keep the next keys made"
    )
    prepare.add_argument(
        "--csr", type=Path, help="external root: write the next CA's CSR instead of self-signing"
    )
    prepare.set_defaults(command="rollover:prepare_command")
    rimp = rollover_sub.add_parser(
        "import-ca", help="install the externally signed next CA certificate (after --csr)"
    )
    with_config(rimp)
    rimp.add_argument("--cert", type=Path, required=True, help="signed next CA certificate (PEM)")
    rimp.add_argument("--chain", type=Path, help="issuer chain (PEM), nearest issuer first")
    rimp.add_argument("--ra-validity-days", type=int, default=730)
    rimp.set_defaults(command="rollover:import_ca_command")
    activate = rollover_sub.add_parser(
        "activate", help="make the prepared CA current (the old RA key keeps decrypting)"
    )
    with_config(activate)
    activate.set_defaults(command="rollover:activate_command")

    store = sub.add_parser("store", help="the certificate store: move it to PostgreSQL")
    store_sub = store.add_subparsers(required=True, metavar="ACTION")
    move = store_sub.add_parser("migrate", help="copy an SQLite store into PostgreSQL, verified")
    move.add_argument("--from", dest="source", required=True, help="the SQLite store file")
    move.add_argument("--to", required=True, help="postgresql://user@host:port/database")
    move.add_argument("--password-file", help="the database password (else HSMSCEP_STORE_PASSWORD)")
    move.set_defaults(command="store:migrate")

    config = sub.add_parser("config", help="check the configuration")
    config_sub = config.add_subparsers(required=True, metavar="ACTION")
    check = config_sub.add_parser(
        "check",
        help="validate everything serve needs (files, store, token, keys) and print the"
        " effective configuration without secrets",
    )
    with_config(check)
    check.set_defaults(command="configcheck:run")

    dev = sub.add_parser("dev", help="SoftHSM2 dev CA in a local directory, then serve")
    debug_flag(dev)
    dev.add_argument("--dir", type=Path, default=Path(".dev"), help="state directory (.dev)")
    dev.add_argument("--ca-key", choices=KEY_SPECS, default="rsa2048")
    _server_flags(dev)
    dev.set_defaults(command="dev:run")
    return parser


def _server_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default from config: 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default from config: 8080)")
    p.add_argument("--workers", help="processes: a number or 'auto' (one per core)")
    p.add_argument("--pool-size", type=int, help="signing threads (HSM sessions) per process")


def _serial(text: str) -> int:
    from hsmscep.policy.crl import parse_serial

    serial = parse_serial(text)
    if serial is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal serial (positive)")
    return serial


if __name__ == "__main__":
    sys.exit(main())
