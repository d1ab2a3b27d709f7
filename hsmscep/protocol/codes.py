"""SCEP's wire codes (RFC 8894 §3.2.1): messageType, pkiStatus and failInfo.

Enum values are the printable strings sent on the wire. Imported by errors.py (a refusal
carries its failInfo), so this module imports nothing of hsmscep.
"""

from __future__ import annotations

from enum import StrEnum


class MessageType(StrEnum):
    CERT_REP = "3"
    RENEWAL_REQ = "17"
    PKCS_REQ = "19"
    CERT_POLL = "20"
    GET_CERT = "21"
    GET_CRL = "22"


class PkiStatus(StrEnum):
    SUCCESS = "0"
    FAILURE = "2"
    PENDING = "3"


class FailInfo(StrEnum):
    BAD_ALG = "0"
    BAD_MESSAGE_CHECK = "1"
    BAD_REQUEST = "2"
    BAD_TIME = "3"
    BAD_CERT_ID = "4"
