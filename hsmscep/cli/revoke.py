"""`hsmscep revoke`: mark an issued certificate revoked in the store of its CA.

Only the store changes: running servers see the new revision and sign the next CRL with the
CA key on their own workers. The decision goes to the audit log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING

from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import ConfigError, MessageError

if TYPE_CHECKING:
    from hsmscep.store.records import Revocation


def run(args: argparse.Namespace) -> int:
    """`hsmscep revoke`."""
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
    except MessageError as exc:
        raise ConfigError(f"{what}: {exc}") from None


async def _record_revocation(
    settings: Settings, serial: int, reason: str
) -> tuple[Revocation, bool]:
    from datetime import UTC, datetime

    from hsmscep.store.backends import open_store

    store = await open_store(
        settings.store.location,
        password=settings.store.password,
        synchronous=settings.store.synchronous,
    )
    try:
        return await store.revoke(serial, reason, datetime.now(UTC))
    finally:
        await store.close()
