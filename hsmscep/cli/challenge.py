"""`hsmscep challenge issue`: a fresh one-time challenge (challenge_mode = "one_time").

The value is printed once; the store of the profile's CA keeps only its hash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from hsmscep.config.settings import Settings, load_settings
from hsmscep.errors import MessageError

if TYPE_CHECKING:
    from hsmscep.store.records import OneTimeChallenge


def issue(args: argparse.Namespace) -> int:
    """`hsmscep challenge issue`."""
    from hsmscep.service.onetime import challenge_json, challenge_record

    settings = load_settings(args.config)
    try:
        value, issued = asyncio.run(_issue_challenge(settings, args))
    except MessageError as exc:  # the field that is wrong, named
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
    from hsmscep.store.backends import open_store

    profile = settings.profiles.get(args.profile)
    # The challenge lives in the store of the CA that issues for the profile.
    ca_settings = settings.for_ca(profile.ca) if profile is not None else settings
    store = await open_store(
        ca_settings.store.location,
        password=ca_settings.store.password,
        synchronous=settings.store.synchronous,
    )
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
