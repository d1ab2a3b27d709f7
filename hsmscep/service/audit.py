"""The audit trail of PKIOperations: one JSON line per decision, and the profile's notification.

The line goes to the `hsmscep.audit` logger and never carries the challenge; a profile with
`notify` set also sends issues and denials to its webhook (in the background).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import datetime

from hsmscep.policy.crl import openssl_serial
from hsmscep.policy.profiles import Profile, Profiles
from hsmscep.protocol.message import PkiRequest
from hsmscep.service.replies import Outcome
from hsmscep.webhook.client import WebhookClient

audit = logging.getLogger("hsmscep.audit")


def record_http_refusal(profile: str, client: str, status: int, reason: str) -> None:
    """A PKIOperation refused before its signature verified (an HTTP 4xx, no CertRep).

    Nothing in such a request is authenticated, so the line names no transaction or subject
    and no webhook is told; the operator still sees that, from where and why.
    """
    if audit.isEnabledFor(logging.INFO):
        entry = {
            "event": "pki_operation",
            "profile": profile,
            "message_type": None,
            "transaction_id": None,
            "client": client,
            "subject": None,
            "decision": "invalid",
            "outcome": f"HTTP {status}: {reason}",
        }
        audit.info(json.dumps(entry, ensure_ascii=False), extra={"data": entry})


class Audit:
    """Records every answered PKIOperation."""

    def __init__(
        self, profiles: Profiles, webhooks: WebhookClient | None, clock: Callable[[], datetime]
    ) -> None:
        self.profiles, self.webhooks, self._clock = profiles, webhooks, clock

    def record(self, request: PkiRequest, client: str, endpoint: Profile, outcome: Outcome) -> None:
        """One JSON line per decision (never the challenge), and the profile's notification."""
        profile = self.profiles.get(outcome.profile or endpoint.name) or endpoint
        record = outcome.record
        if outcome.fail_info is not None:
            decision = "denied"
        elif outcome.pending:
            decision = "pending"
        elif record is not None:
            decision = "issued"
        else:
            decision = "answered"
        entry: dict[str, object] = {
            "event": "pki_operation",
            "profile": profile.name,
            "message_type": request.message_type,
            "transaction_id": request.transaction_id,
            "client": client,
            "subject": record.subject if record is not None else outcome.subject,
            "decision": decision,
            "outcome": outcome.reason,
        }
        if record is not None:
            entry["serial"] = openssl_serial(record.serial)
        if audit.isEnabledFor(logging.INFO):
            audit.info(json.dumps(entry, ensure_ascii=False), extra={"data": entry})
        if profile.notify is not None and decision in ("issued", "denied"):
            assert self.webhooks is not None
            event = entry | {"event": decision, "time": self._clock().isoformat()}
            self.webhooks.notify(profile.notify, event)
