"""One signing worker's keys: its own PKCS#11 sessions and key handles, opened once.

Each worker thread calls `Keyring.open` on itself; the CA key, the RA signing key and the RA
decryption key(s) may sit on different tokens or modules (FIPS splits, architecture.md). A
token may have replicas holding the same keys (HA partitions): each keyring uses one healthy
member, worker `n` preferring member `n mod size`, so the load spreads over the healthy ones.
Every HSM call runs under its module's gate; a lost session or device is reported to
TokenLogin, which takes the token out until it answers again.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.serialization import Encoding

from hsmscep.errors import ConfigError, HsmError, HsmUnavailable, MessageError
from hsmscep.hsm.keyops import Guard, decryption_key, signing_key
from hsmscep.hsm.login import Guarded, TokenLogin, describe
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.protocol.certrep import ResponseSigner
from hsmscep.protocol.cms import CertId
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey, SigningKey


@dataclass(frozen=True, slots=True)
class KeySource:
    """Which token key goes with which certificate."""

    ca_key: KeyRef
    ca_cert: x509.Certificate
    ra_sign_key: KeyRef
    ra_sign_cert: x509.Certificate
    decrypt: Sequence[tuple[KeyRef, x509.Certificate]]
    # Earlier generations' RA keys (also in `decrypt`): they sign answers to requests
    # encrypted to their certificate, which the client expects to verify the reply with.
    previous_signers: Sequence[tuple[KeyRef, x509.Certificate]] = ()
    # Tokens holding the same keys as a configured token (same labels/ids), tried in turn.
    replicas: Mapping[TokenRef, Sequence[TokenRef]] = field(default_factory=dict)
    # The metrics: (operation, token) -> what gets each such operation's seconds.
    observe: Callable[[str, str], Callable[[float], None]] | None = None

    def members(self, token: TokenRef) -> list[TokenRef]:
        return [token, *self.replicas.get(token, ())]


_worker_numbers = itertools.count()


@dataclass(slots=True)
class Keyring:
    ca_key: SigningKey
    response_signer: ResponseSigner
    decrypt_keys: list[tuple[CertId, ExternalRsaKey]]
    sessions: list[Guarded] = field(default_factory=list)
    logins: TokenLogin | None = None
    epoch: int = 0
    previous_signers: list[tuple[CertId, ResponseSigner]] = field(default_factory=list)
    crl_signer: SigningKey | None = None  # the CA key again, timed as sign_crl (metrics)

    @property
    def crl_key(self) -> SigningKey:
        return self.crl_signer or self.ca_key

    @classmethod
    def open(cls, source: KeySource, logins: TokenLogin, worker: int | None = None) -> Keyring:
        number = next(_worker_numbers) if worker is None else worker
        epoch = logins.epoch
        sessions: dict[TokenRef, tuple[TokenRef, Guarded]] = {}

        def session_for(ref: KeyRef, operation: str) -> tuple[KeyRef, Guarded, Guard]:
            if ref.token not in sessions:
                sessions[ref.token] = _open_member(source.members(ref.token), logins, number)
            member, guarded = sessions[ref.token]
            guard = _guard(logins, member, guarded)
            if source.observe is not None:
                guard = _timed(guard, source.observe(operation, describe(member)))
            return replace(ref, token=member), guarded, guard

        # Key lookups run under the module's gate too: never inside a re-initialisation.
        try:
            ca_ref, g, guard = session_for(source.ca_key, "sign_certificate")
            with g.in_use():
                ca_key = signing_key(g.session, ca_ref, source.ca_cert.public_key(), guard)
            crl_key = None
            if source.observe is not None:  # a key object of its own, timed apart
                _, g, guard = session_for(source.ca_key, "sign_crl")
                with g.in_use():
                    crl_key = signing_key(g.session, ca_ref, source.ca_cert.public_key(), guard)
            ra_public = _rsa_public(source.ra_sign_cert, "RA signing")
            ra_ref, g, guard = session_for(source.ra_sign_key, "sign_reply")
            with g.in_use():
                ra_sign = signing_key(g.session, ra_ref, ra_public, guard)
            assert isinstance(ra_sign, ExternalRsaKey)
            decrypt_keys = []
            for ref, cert in source.decrypt:
                member_ref, g, guard = session_for(ref, "decrypt")
                with g.in_use():
                    public = _rsa_public(cert, "RA decryption")
                    key = decryption_key(g.session, member_ref, public, guard)
                decrypt_keys.append((CertId.of(cert.public_bytes(Encoding.DER)), key))
            previous_signers = []
            for ref, cert in source.previous_signers:
                member_ref, g, guard = session_for(ref, "sign_reply")
                with g.in_use():
                    signer = _ra_signer(g.session, member_ref, cert, guard)
                previous_signers.append((CertId.of(cert.public_bytes(Encoding.DER)), signer))
        except BaseException:
            close_sessions([g for _, g in sessions.values()])
            raise
        return cls(
            ca_key,
            ResponseSigner.of(source.ra_sign_cert, ra_sign),
            decrypt_keys,
            [g for _, g in sessions.values()],
            logins,
            epoch,
            previous_signers,
            crl_key,
        )

    def stale(self) -> bool:
        """A token went away or came back since this keyring opened: reopen to rebalance."""
        return self.logins is not None and self.logins.epoch != self.epoch

    def check_certificates(self) -> None:
        """Refuse to start when a certificate does not belong to its HSM key."""
        probe = os.urandom(32)
        try:
            if isinstance(self.ca_key, ExternalEcKey):
                signature = self.ca_key.sign(probe, ec.ECDSA(SHA256()))
                self.ca_key.public_key().verify(signature, probe, ec.ECDSA(SHA256()))
            else:
                _check_rsa_signature(self.ca_key, probe)
            _check_rsa_signature(self.response_signer.key, probe)
            for _, signer in self.previous_signers:
                _check_rsa_signature(signer.key, probe)
            for _, key in self.decrypt_keys:
                sealed = key.public_key().encrypt(probe, padding.PKCS1v15())
                if key.decrypt(sealed, padding.PKCS1v15()) != probe:
                    raise ValueError("RA decryption key does not match its certificate")
        except (InvalidSignature, ValueError, MessageError) as exc:
            raise ConfigError(f"a certificate does not match its HSM key: {exc}") from None

    def latency(self, samples: int = 16) -> tuple[float, float]:
        """(CPU seconds, seconds waited) of one private-key operation in this thread: the
        median CPU, and the least wait (the one least disturbed by other threads)."""
        probe = os.urandom(32)
        cpu: list[float] = []
        wait: list[float] = []
        for _ in range(samples):
            wall0, cpu0 = time.perf_counter(), time.thread_time()
            self.response_signer.key.sign(probe, padding.PKCS1v15(), SHA256())
            spent = time.thread_time() - cpu0
            cpu.append(spent)
            wait.append(max(0.0, time.perf_counter() - wall0 - spent))
        return sorted(cpu)[len(cpu) // 2], min(wait)

    def close(self) -> None:
        close_sessions(self.sessions)
        self.sessions.clear()


def _rsa_public(cert: x509.Certificate, what: str) -> rsa.RSAPublicKey:
    key = cert.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise HsmError(f"the {what} certificate must carry an RSA key")
    return key


def _check_rsa_signature(key: ExternalRsaKey, probe: bytes) -> None:
    signature = key.sign(probe, padding.PKCS1v15(), SHA256())
    key.public_key().verify(signature, probe, padding.PKCS1v15(), SHA256())


def _open_member(
    members: list[TokenRef], logins: TokenLogin, number: int
) -> tuple[TokenRef, Guarded]:
    """A session on the first healthy member, starting at `number mod len(members)`."""
    start = number % len(members)
    order = members[start:] + members[:start]
    # Members known to be down go last: their probe is left to TokenLogin's own timing.
    order.sort(key=logins.is_down)
    error: HsmError | None = None
    for member in order:
        try:
            return member, logins.open_guarded(member)
        except HsmUnavailable as exc:
            error = exc
    assert error is not None
    raise error


def _guard(logins: TokenLogin, token: TokenRef, guarded: Guarded) -> Guard:
    module, generation = guarded.module, guarded.generation

    def guard(call: Callable[[], bytes]) -> bytes:
        try:
            module.enter(generation)  # not a context manager: three of these per enrollment
            try:
                return call()
            finally:
                module.leave()
        except HsmUnavailable as exc:
            # Outside the gate: recovery may re-initialise the module, which waits for it.
            logins.lost(token, guarded.generation, exc)
            raise

    return guard


def _timed(guard: Guard, observe: Callable[[float], None]) -> Guard:
    def timed(call: Callable[[], bytes]) -> bytes:
        started = time.perf_counter()
        result = guard(call)
        observe(time.perf_counter() - started)  # failures are not latencies
        return result

    return timed


def close_sessions(sessions: list[Guarded]) -> None:
    for guarded in sessions:
        try:
            # Only sessions of the current generation: after a re-initialisation the old
            # handle may name another thread's new session.
            with guarded.in_use():
                guarded.session.close()
        except Exception:  # a dead session has nothing left to close
            pass


def _ra_signer(session: Any, ref: KeyRef, cert: x509.Certificate, guard: Guard) -> ResponseSigner:
    key = signing_key(session, ref, _rsa_public(cert, "previous RA"), guard)
    assert isinstance(key, ExternalRsaKey)
    return ResponseSigner.of(cert, key)
