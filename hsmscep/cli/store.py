"""`hsmscep store migrate --from <sqlite path> --to <postgresql url>`: move a CA's store into
the shared PostgreSQL database, verify the copy (row counts and checksums), safe to rerun.

The target's password comes from --password-file or HSMSCEP_STORE_PASSWORD, never argv.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from hsmscep.errors import ConfigError


def migrate(args: argparse.Namespace) -> int:
    """`hsmscep store migrate`."""
    from urllib.parse import urlsplit

    from hsmscep.store.transfer import migrate_store

    url: str = args.to
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError("--to must be a postgresql:// URL")
    if parts.password is not None:
        raise ConfigError("--to must not carry the password: use --password-file")
    password = os.environ.get("HSMSCEP_STORE_PASSWORD")
    if args.password_file is not None:
        try:
            password = Path(args.password_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--password-file: {exc}") from None
    checked = asyncio.run(migrate_store(Path(args.source), url, password))
    for table in checked:
        print(f"{table.table}: {table.copied} rows, sha256 {table.source_digest[:16]}, verified")
    print("store migrated; start the nodes with [store] url", file=sys.stderr)
    return 0
