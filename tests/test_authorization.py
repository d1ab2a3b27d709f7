"""The authorization chain: each policy alone and chained, with real requests and a real store.

Requests are real pkiMessages built by hsmscep.testing.client and decrypted with a software
RA key; the one-time and renewal policies run against a SQLite store in tmp_path.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from hsmscep.errors import Rejected
from hsmscep.policy.csr import load_csr
from hsmscep.policy.issuance import IssuancePolicy, check_csr, describe_sans
from hsmscep.policy.profiles import Profile
from hsmscep.policy.renewal import RenewalPolicy
from hsmscep.protocol import cms
from hsmscep.protocol.codes import FailInfo, MessageType
from hsmscep.protocol.message import PkiRequest, decode_pki_message
from hsmscep.service.authorization import (
    ALLOW,
    HOLD,
    Allow,
    Candidate,
    Chain,
    ManualApproval,
    NoChallenge,
    OneTimeChallenge,
    StaticChallenge,
    Verdict,
    WebhookAuthorization,
    chain_for,
)
from hsmscep.service.refusal import Refusal, Refused, rejection
from hsmscep.service.renewal import SignerRenewal
from hsmscep.store.records import IssuedCert
from hsmscep.store.records import OneTimeChallenge as StoredChallenge
from hsmscep.store.sqlite import CertStore
from hsmscep.testing import client
from tests.conftest import software_root

T0 = datetime.now(UTC).replace(microsecond=0)
CA_KEY = rsa.generate_private_key(65537, 2048)
CA = software_root(CA_KEY, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Authz CA")]), T0)
CLIENT_KEY = rsa.generate_private_key(65537, 2048)


def subject(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def pki_request(
    challenge: str | None = "pw", cn: str = "device", signer: x509.Certificate | None = None
) -> tuple[PkiRequest, x509.CertificateSigningRequest, cms.Envelope]:
    """A real PKCSReq, verified and decrypted (the RA key is the CA's software key here)."""
    built = client.build_pkcs_req(
        key=CLIENT_KEY, ca_certs=[CA], challenge=challenge, subject=subject(cn), signer_cert=signer
    )
    request = decode_pki_message(built.der)
    envelope = cms.decode_envelope(request.content)
    cek = CA_KEY.decrypt(envelope.recipients[0].encrypted_key, padding.PKCS1v15())
    return request, load_csr(envelope.open(cek)), envelope


def candidate(profile: Profile, challenge: str | None = "pw", cn: str = "device") -> Candidate:
    request, csr, envelope = pki_request(challenge, cn)
    return Candidate(
        request=request,
        client="127.0.0.1",
        profile=profile,
        cert_request=check_csr(csr, IssuancePolicy(challenge=None)),
        csr_der=csr.public_bytes(Encoding.DER),
        envelope=envelope,
        oaep=None,
        transaction_id=request.transaction_id,
        challenge=challenge.encode() if challenge is not None else None,
    )


def refusal_of(verdict: object) -> tuple[FailInfo, str]:
    assert isinstance(verdict, Rejected), verdict
    return verdict.fail_info, verdict.reason


def with_store(tmp_path: Path, scenario: Callable[[CertStore], Awaitable[None]]) -> None:
    async def run() -> None:
        store = await CertStore.open(tmp_path / "authz.sqlite3")
        try:
            await scenario(store)
        finally:
            await store.close()

    asyncio.run(run())


STATIC = Profile(name="static", caps=(), challenge_mode="static", static_challenge=b"pw")
ONE_TIME = Profile(name="otp", caps=(), challenge_mode="one_time")
NONE = Profile(name="open", caps=(), challenge_mode="none")


# ---- the static challenge, on the signing worker ------------------------------------------


def test_static_challenge() -> None:
    policy = StaticChallenge(b"pw")
    assert policy.authorize(pki_request("pw")[1]) is ALLOW
    wrong = policy.authorize(pki_request("other")[1])
    assert refusal_of(wrong) == (FailInfo.BAD_REQUEST, "challengePassword does not match")
    assert isinstance(wrong, Refused) and wrong.refusal is Refusal.CHALLENGE_MISMATCH
    missing = policy.authorize(pki_request(None)[1])
    assert refusal_of(missing) == (FailInfo.BAD_REQUEST, "challengePassword missing")
    assert NoChallenge().authorize(pki_request(None)[1]) is ALLOW


# ---- the one-time challenge, against the store --------------------------------------------


def test_one_time_challenge_is_consumed_once(tmp_path: Path) -> None:
    async def scenario(store: CertStore) -> None:
        await store.add_challenge(
            StoredChallenge(
                hash=hashlib.sha256(b"otp-1").hexdigest(),
                created_at=T0,
                expires_at=T0 + timedelta(hours=1),
                subject_pattern="CN=device",
                profile="otp",
            )
        )
        policy = OneTimeChallenge(store, lambda: T0)
        first = candidate(ONE_TIME, "otp-1")
        assert await policy.authorize(first) is ALLOW
        # The same request again (a retry): allowed, the challenge is not used twice.
        assert await policy.authorize(first) is ALLOW
        other = candidate(ONE_TIME, "otp-1")
        assert refusal_of(await policy.authorize(other)) == (
            FailInfo.BAD_REQUEST,
            "challenge already used or expired",
        )
        unknown = await policy.authorize(candidate(ONE_TIME, "never-issued"))
        assert refusal_of(unknown) == (FailInfo.BAD_REQUEST, "unknown challenge")
        missing = await policy.authorize(candidate(ONE_TIME, None))
        assert refusal_of(missing) == (FailInfo.BAD_REQUEST, "challengePassword missing")

    with_store(tmp_path, scenario)


def test_one_time_challenge_binding(tmp_path: Path) -> None:
    async def scenario(store: CertStore) -> None:
        await store.add_challenge(
            StoredChallenge(
                hash=hashlib.sha256(b"otp-2").hexdigest(),
                created_at=T0,
                expires_at=T0 + timedelta(hours=1),
                subject_pattern="CN=printer-.*",
                profile="otp",
            )
        )
        policy = OneTimeChallenge(store, lambda: T0)
        verdict = await policy.authorize(candidate(ONE_TIME, "otp-2", cn="laptop"))
        assert refusal_of(verdict) == (
            FailInfo.BAD_REQUEST,
            "subject does not match the challenge's subject pattern",
        )
        # A refused request does not use the challenge up.
        assert await policy.authorize(candidate(ONE_TIME, "otp-2", cn="printer-7")) is ALLOW

    with_store(tmp_path, scenario)


# ---- chaining -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Renaming:
    """A decision that allows and overrides the subject, as a webhook may."""

    cn: str

    async def authorize(self, candidate: Candidate) -> Verdict:
        return Allow(replace(candidate.cert_request, subject=subject(self.cn)))


@dataclass(slots=True)
class Counting:
    """A decision that allows and counts how often it was asked."""

    asked: int = 0

    async def authorize(self, candidate: Candidate) -> Verdict:
        self.asked += 1
        return ALLOW


def test_chain_applies_overrides_and_stops_at_the_first_answer() -> None:
    async def scenario() -> None:
        counting = Counting()
        held = Chain(NoChallenge(), (Renaming("renamed"), ManualApproval(), counting))
        verdict, decided = await held.decide(candidate(NONE))
        assert verdict is HOLD and counting.asked == 0
        assert decided.subject == "CN=renamed"  # the hold keeps the overrides

        refusing = Chain(NoChallenge(), (Renaming("x"), _Refusing(), counting))
        verdict, _ = await refusing.decide(candidate(NONE))
        assert refusal_of(verdict) == (FailInfo.BAD_REQUEST, "webhook denied: no")
        assert counting.asked == 0

        allowing = Chain(NoChallenge(), (counting, Renaming("last")))
        verdict, decided = await allowing.decide(candidate(NONE))
        assert verdict is ALLOW and counting.asked == 1 and decided.subject == "CN=last"
        empty = candidate(NONE)
        assert await Chain(NoChallenge()).decide(empty) == (ALLOW, empty)

    asyncio.run(scenario())


class _Refusing:
    async def authorize(self, candidate: Candidate) -> Verdict:
        return Refusal.WEBHOOK_DENIED(reason="no")


def test_chain_for_each_challenge_mode(tmp_path: Path) -> None:
    async def scenario(store: CertStore) -> None:
        now = lambda: T0  # noqa: E731
        static = chain_for(replace(STATIC, manual_approval=True), store, None, now)
        assert static.check == StaticChallenge(b"pw") and not static.wants_challenge
        assert [type(d) for d in static.decisions] == [ManualApproval]
        assert chain_for(NONE, store, None, now) == Chain(NoChallenge())
        one_time = chain_for(ONE_TIME, store, None, now)
        assert one_time.check == NoChallenge() and one_time.wants_challenge
        assert [type(d) for d in one_time.decisions] == [OneTimeChallenge]
        # A webhook profile without a client is a wiring error, found at construction.
        with pytest.raises(ValueError, match="webhook"):
            chain_for(replace(NONE, challenge_mode="webhook"), store, None, now)
        assert WebhookAuthorization.__name__  # its own behaviour: tests/test_webhook.py

    with_store(tmp_path, scenario)


# ---- renewal by signer, against the store -------------------------------------------------


def issued_signer(serial: int, not_after: datetime) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(subject("renewing"))
        .issuer_name(CA.subject)
        .public_key(CLIENT_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(T0 - timedelta(days=1))
        .not_valid_after(not_after)
        .sign(CA_KEY, hashes.SHA256())
    )


def stored(cert: x509.Certificate) -> IssuedCert:
    return IssuedCert(
        serial=cert.serial_number,
        subject=cert.subject.rfc4514_string(),
        sans=describe_sans(None),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        transaction_id=f"enrolled {cert.serial_number:x}",
        requester_fingerprint="-",
        public_key_sha256="-",
        der=cert.public_bytes(Encoding.DER),
    )


def test_signer_renewal(tmp_path: Path) -> None:
    async def scenario(store: CertStore) -> None:
        policy = SignerRenewal(store, CA, RenewalPolicy(window=timedelta(days=7)), lambda: T0)
        due = issued_signer(0x71, T0 + timedelta(days=3))
        await store.put(stored(due))
        assert await policy.authorize(pki_request(signer=due)[0]) is ALLOW

        early = issued_signer(0x72, T0 + timedelta(days=30))
        await store.put(stored(early))
        verdict = await policy.authorize(pki_request(signer=early)[0])
        assert refusal_of(verdict)[0] == FailInfo.BAD_REQUEST
        assert verdict.reason.startswith("renewal only within 7 days of expiry")  # type: ignore[union-attr]

        never_stored = issued_signer(0x73, T0 + timedelta(days=3))
        assert refusal_of(await policy.authorize(pki_request(signer=never_stored)[0])) == (
            FailInfo.BAD_CERT_ID,
            "signer certificate was not issued here",
        )

        await store.revoke(0x71, "keyCompromise", T0)
        assert refusal_of(await policy.authorize(pki_request(signer=due)[0])) == (
            FailInfo.BAD_REQUEST,
            "signer certificate is revoked",
        )

    with_store(tmp_path, scenario)


# ---- the one map from errors to failInfo --------------------------------------------------


def test_rejection_maps_every_error_to_a_fail_info() -> None:
    from hsmscep.errors import MessageError, UnsupportedAlgorithm

    refused = Refusal.UNKNOWN_SERIAL(serial=0xAB)
    assert rejection(refused, "t") is refused
    assert (refused.fail_info, refused.reason) == (FailInfo.BAD_CERT_ID, "unknown serial ab")
    assert refusal_of(rejection(UnsupportedAlgorithm("rc2"), "t")) == (FailInfo.BAD_ALG, "rc2")
    assert refusal_of(rejection(MessageError("bad"), "t")) == (FailInfo.BAD_MESSAGE_CHECK, "bad")
    assert refusal_of(rejection(KeyError("bug"), "t")) == (FailInfo.BAD_REQUEST, "internal error")
    assert Refusal.UNSUPPORTED_MESSAGE_TYPE().reason == "unsupported messageType"
    assert MessageType.PKCS_REQ == "19"
