"""`hsmscep pending list|approve|reject`: requests waiting for an operator (approval = "manual").

Only the store changes: the certificate is issued by the server that answers the client's
next poll.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
from typing import TYPE_CHECKING

from hsmscep.config.settings import Settings, load_settings

if TYPE_CHECKING:
    from hsmscep.store.records import PendingRequest


def list_requests(args: argparse.Namespace) -> int:
    """`hsmscep pending list`."""
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
    from hsmscep.store.backends import open_store

    store = await open_store(
        settings.store.location,
        password=settings.store.password,
        synchronous=settings.store.synchronous,
    )
    try:
        return await store.pending_requests()
    finally:
        await store.close()


def decide(args: argparse.Namespace) -> int:
    """`hsmscep pending approve|reject`."""
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

    from hsmscep.store.backends import open_store

    store = await open_store(
        settings.store.location,
        password=settings.store.password,
        synchronous=settings.store.synchronous,
    )
    try:
        return await store.decide_pending(
            request_id,
            "approved" if approve else "rejected",
            datetime.now(UTC),
            settings.profiles.pending_ttl,
        )
    finally:
        await store.close()
