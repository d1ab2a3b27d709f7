"""The SCEP client for tests and the benchmark, as one namespace: `client.build_pkcs_req(...)`.

The parts live in cacerts (GetCACert replies), requests (pkiMessages), replies (verifying and
opening CertReps) and pkcs7 (degenerate PKCS#7); this module only gathers their public names.
"""

from __future__ import annotations

from hsmscep.testing.cacerts import parse_ca_certs, select_recipient
from hsmscep.testing.replies import (
    CertRepResult,
    SignedMessage,
    open_cert_rep,
    parse_next_ca_certs,
    verify_signed_message,
)
from hsmscep.testing.requests import (
    ClientRequest,
    build_cert_poll,
    build_cert_query,
    build_csr,
    build_pkcs_req,
    build_signed_attributes,
    self_signed_signer,
    sign_pki_message,
)

__all__ = [
    "CertRepResult",
    "ClientRequest",
    "SignedMessage",
    "build_cert_poll",
    "build_cert_query",
    "build_csr",
    "build_pkcs_req",
    "build_signed_attributes",
    "open_cert_rep",
    "parse_ca_certs",
    "parse_next_ca_certs",
    "select_recipient",
    "self_signed_signer",
    "sign_pki_message",
    "verify_signed_message",
]
