"""Why the service refuses a verified request, and the one map from an error to its failInfo.

Every signed FAILURE is built from a Rejected: the service's own refusals are the members of
`Refusal` (failInfo and text in one table), the policy's come as Rejected from hsmscep.policy,
and `rejection` turns anything else raised while handling a verified request into one.
"""

from __future__ import annotations

import logging
from enum import Enum

from hsmscep.errors import MessageError, Rejected, UnsupportedAlgorithm
from hsmscep.protocol.codes import FailInfo

log = logging.getLogger(__name__)


class Refusal(Enum):
    """The service's refusals: each carries its failInfo and its text (a format string)."""

    UNSUPPORTED_MESSAGE_TYPE = (FailInfo.BAD_REQUEST, "unsupported messageType")
    RENEWAL_DISABLED = (FailInfo.BAD_REQUEST, "renewal is disabled")
    RENEWAL_NOT_SIGNED_HERE = (
        FailInfo.BAD_REQUEST,
        "RenewalReq must be signed by a certificate issued here",
    )
    SIGNER_KEY_MISMATCH = (
        FailInfo.BAD_MESSAGE_CHECK,
        "the request is not signed with the CSR's key (RFC 8894 section 2.3)",
    )
    SIGNER_NOT_SELF_SIGNED = (
        FailInfo.BAD_MESSAGE_CHECK,
        "the signer certificate of an initial enrollment must be self-signed",
    )
    REPLY_KEY_NOT_RSA = (FailInfo.BAD_ALG, "the reply can only be encrypted to an RSA key")
    CHALLENGE_MISSING = (FailInfo.BAD_REQUEST, "challengePassword missing")
    CHALLENGE_MISMATCH = (FailInfo.BAD_REQUEST, "challengePassword does not match")
    UNKNOWN_CHALLENGE = (FailInfo.BAD_REQUEST, "unknown challenge")
    CHALLENGE_BINDING = (FailInfo.BAD_REQUEST, "{mismatch}")
    CHALLENGE_USED = (FailInfo.BAD_REQUEST, "challenge already used or expired")
    WEBHOOK_DENIED = (FailInfo.BAD_REQUEST, "webhook denied: {reason}")
    UNKNOWN_TRANSACTION = (FailInfo.BAD_REQUEST, "unknown transactionID")
    OTHER_REQUESTER = (FailInfo.BAD_REQUEST, "transactionID belongs to another requester")
    REQUEST_REJECTED = (FailInfo.BAD_REQUEST, "request {id} was rejected")
    REQUEST_EXPIRED = (FailInfo.BAD_REQUEST, "request {id} expired before approval")
    TRANSACTION_USED = (FailInfo.BAD_REQUEST, "transactionID already used")
    UNKNOWN_SERIAL = (FailInfo.BAD_CERT_ID, "unknown serial {serial:x}")
    ISSUER_NOT_THIS_CA = (FailInfo.BAD_CERT_ID, "issuer is not this CA")
    # A bug must still be answered the way clients understand (interop-quirks #9).
    INTERNAL_ERROR = (FailInfo.BAD_REQUEST, "internal error")

    def __init__(self, fail_info: FailInfo, text: str) -> None:
        self.fail_info = fail_info
        self.text = text

    def __call__(self, **details: object) -> Refused:
        """This refusal as a Rejected, its text filled in with `details`."""
        return Refused(self, self.text.format(**details) if details else self.text)


class Refused(Rejected):
    """A Rejected that says which of the service's refusals it is."""

    def __init__(self, refusal: Refusal, reason: str) -> None:
        super().__init__(refusal.fail_info, reason)
        self.refusal = refusal


def rejection(error: Exception, transaction_id: str) -> Rejected:
    """The refusal answering `error`, raised while handling a verified request."""
    if isinstance(error, Rejected):
        return error
    if isinstance(error, UnsupportedAlgorithm):
        return Rejected(FailInfo.BAD_ALG, str(error))
    if isinstance(error, MessageError):
        return Rejected(FailInfo.BAD_MESSAGE_CHECK, str(error))
    log.error("unexpected error for transaction %r", transaction_id, exc_info=error)
    return Refusal.INTERNAL_ERROR()
