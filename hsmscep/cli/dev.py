"""`hsmscep dev`: a SoftHSM2 dev CA in a local directory, then serve it."""

from __future__ import annotations

import argparse
import secrets
from pathlib import Path

from hsmscep.cli.bootstrap import InitOptions, init
from hsmscep.cli.serve import apply_overrides, run_server
from hsmscep.config.settings import load_settings
from hsmscep.hsm import devtoken


def run(args: argparse.Namespace) -> int:
    """`hsmscep dev`: a token, a config and a CA in `--dir` (made once), then serve."""
    directory: Path = args.dir.resolve()
    token = devtoken.ensure_token(directory)
    challenge_file = directory / "challenge"
    if not challenge_file.exists():
        challenge_file.write_text(secrets.token_urlsafe(12) + "\n")
        challenge_file.chmod(0o600)
    config = directory / "hsmscep.toml"
    if not config.exists():
        config.write_text(dev_config(token.module, token.label, "pin", "challenge"))
    apply_overrides(args)
    settings = load_settings(config)
    if not settings.ca.cert.exists():
        # resume: keys an interrupted earlier run made are kept, never destroyed.
        options = InitOptions(ca_key=args.ca_key, subject="CN=hsmscep dev CA", resume=True)
        init(settings, options, lambda line: print(line, flush=True))
    host = "[::1]" if ":" in settings.server.host else settings.server.host
    print(f"SCEP URL:  http://{host}:{settings.server.port}/scep")
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
