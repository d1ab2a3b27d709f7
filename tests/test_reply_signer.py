"""Which RA signs a CertRep: the one the request was encrypted to while its certificate is valid
(a client that cached GetCACert before a rollover), else the current one. Software keys, real
pkiMessages and CMS; the end-to-end case with SoftHSM2 is in test_rollover.py."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from hsmscep.policy.issuance import IssuancePolicy, Issuer
from hsmscep.protocol.message import PkiRequest, decode_pki_message
from hsmscep.service.replies import Replies
from hsmscep.testing import client
from hsmscep.testing.replies import verify_signed_message
from hsmscep.testing.softkeys import SoftKeyring, SoftKeys
from tests.inprocess import ca_certificate, ra_certificate


@dataclass(frozen=True)
class Source:
    ca_cert: x509.Certificate
    ra_sign_cert: x509.Certificate
    decrypt: Sequence[tuple[object, x509.Certificate]]
    previous_signers: Sequence[tuple[object, x509.Certificate]]


def setup() -> tuple[x509.Certificate, x509.Certificate, x509.Certificate, SoftKeyring]:
    ca_key, ra_key, old_key = (rsa.generate_private_key(65537, 2048) for _ in range(3))
    ca = ca_certificate(ca_key, x509.Name.from_rfc4514_string("CN=signer test CA"))
    ra = ra_certificate(ca_key, ca, ra_key.public_key())
    old_ra = ra_certificate(ca_key, ca, old_key.public_key())
    keys = SoftKeys([ca_key, ra_key, old_key])
    source = Source(ca, ra, [(None, ra), (None, old_ra)], [(None, old_ra)])
    return ca, ra, old_ra, keys.keyring(source)


def request_to(ca: x509.Certificate, ra: x509.Certificate) -> PkiRequest:
    built = client.build_pkcs_req(
        key=rsa.generate_private_key(65537, 2048),
        ca_certs=[ca, ra],
        challenge="x",
        subject=x509.Name.from_rfc4514_string("CN=cached"),
    )
    return decode_pki_message(built.der)


def replies(ca: x509.Certificate, now: datetime) -> Replies:
    return Replies(
        issuer=Issuer.of(ca),
        policy=IssuancePolicy(challenge=None),
        clock=lambda: now,
        new_serial=lambda now: x509.random_serial_number(),
        nonce=lambda: b"n" * 16,
    )


def test_previous_ra_signs_while_valid_then_the_current_one() -> None:
    ca, ra, old_ra, keys = setup()
    now = datetime.now(UTC)
    cached = request_to(ca, old_ra)
    old_signer = keys.previous_signers[0][1]
    assert replies(ca, now).signer(cached, keys) is old_signer
    assert replies(ca, now).signer(request_to(ca, ra), keys) is keys.response_signer
    # Once the previous RA certificate has expired, the current RA answers.
    later = old_ra.not_valid_after_utc + timedelta(seconds=1)
    assert replies(ca, later).signer(cached, keys) is keys.response_signer
    # The FAILURE and PENDING answers are signed by the same RA as a SUCCESS would be.
    pending = replies(ca, now).pending(cached, keys).response
    assert verify_signed_message(pending, [ca, old_ra]).signer_cert == old_ra


def test_without_previous_signers_the_current_ra_signs() -> None:
    ca, _, old_ra, keys = setup()
    keys.previous_signers.clear()  # e.g. a separate [ra_decrypt] key: it never signs
    cached = request_to(ca, old_ra)
    assert replies(ca, datetime.now(UTC)).signer(cached, keys) is keys.response_signer
