"""The one exception tree of hsmscep; HTTP and SCEP mapping happens at the edges only.

* ScepError
  + MessageError          malformed or unverifiable input: HTTP 400 before the client's
  |  |                    signature has verified, signed CertRep badMessageCheck after
  |  - UnsupportedAlgorithm  an algorithm we or the HSM refuse: signed CertRep badAlg
  + Rejected              policy said no: signed CertRep FAILURE with its fail_info
  + PayloadTooLarge       request body over the cap: HTTP 413
  + UnknownCertificate    no certificate with that serial: CLI exit 2 (admin API: 404)
  + UnknownRequest        no pending request with that id: CLI exit 2, admin API 404
  + UnknownProfile        no enrollment profile of that name: CLI exit 2, admin API 404
  + RequestConflict       the pending request was already decided or expired: exit 2, 409
  + HsmError              the PKCS#11 module failed: HTTP 503 (we may not be able to sign)
  |  + HsmBusy            signing queue full: HTTP 503 with Retry-After
  |  + HsmUnavailable     the token is gone for now (device, link or session lost): 503
  |  - PinRefused         the token refused the PIN: final, never retried (lockout)
  + StoreError            the database failed: HTTP 503
  |  - DuplicateSerial    serial already taken (retry with a new one)
  |  - DuplicateTransaction  transactionID already has a certificate
  + WebhookError          the authorization webhook failed or answered nonsense: its
  |                       on_error setting decides (deny by default)
  + ListenError           the server cannot listen: address not resolvable, port in use
  + WorkerStartFailed     a server worker process failed to start after pre-flight
* ConfigError(ValueError) bad settings; the message names the key
"""

from __future__ import annotations

from hsmscep.protocol.codes import FailInfo


class ScepError(Exception):
    """Base of every error hsmscep raises on purpose."""


class MessageError(ScepError):
    """The request is malformed or does not verify; the text is safe to show the client."""


class UnsupportedAlgorithm(MessageError):
    """The request uses an algorithm we (or the HSM) do not support."""


class Rejected(ScepError):
    """A verified request that policy refuses; answered with a signed FAILURE."""

    def __init__(self, fail_info: FailInfo, reason: str) -> None:
        super().__init__(reason)
        self.fail_info = fail_info
        self.reason = reason


class PayloadTooLarge(ScepError):
    """The request body exceeds the configured cap."""


class UnknownCertificate(ScepError):
    """No certificate with the given serial number was issued here."""


class UnknownRequest(ScepError):
    """No pending request with the given id."""


class UnknownProfile(ScepError):
    """No enrollment profile with the given name."""


class RequestConflict(ScepError):
    """The pending request cannot take this decision (decided otherwise, or expired)."""


class HsmError(ScepError):
    """The PKCS#11 module failed or is unreachable."""


class HsmBusy(HsmError):
    """The signing queue is full; the client should retry later."""


class HsmUnavailable(HsmError):
    """The token is unreachable for now (device, link or session lost); retried later."""


class PinRefused(HsmError):
    """The token refused the PIN (incorrect, expired, locked): never tried again."""


class StoreError(ScepError):
    """The certificate store failed."""


class DuplicateSerial(StoreError):
    """A certificate with this serial number is already stored."""


class DuplicateTransaction(StoreError):
    """A certificate for this transactionID is already stored."""


class WebhookError(ScepError):
    """The authorization webhook was unreachable, too slow, or gave an invalid answer."""


class ListenError(ScepError):
    """The server cannot listen where configured (CLI exit code: network)."""


class WorkerStartFailed(ScepError):
    """A server worker process exited before it started serving (its log says why)."""


class ConfigError(ValueError):
    """Invalid configuration; the message names the offending key."""
