"""The SCEP workload: cached client keys, pre-built PKCSReq messages, response verification.

Everything here runs outside the timed phase. Building and verifying are CPU-bound, so the
driver fans them out over a process pool (`build_batch`, `verify_batch` are its tasks); the
locust process only replays bytes.

Files exchanged with the locust process (pickle streams: one `pickle.dump` per record, so
neither side has to hold a whole run in memory):

* requests: `(transaction_id: str, der: bytes)`
* responses: `(transaction_id, status, start_time, latency_ms, retry_after, body, error)`
"""

from __future__ import annotations

import datetime
import os
import pickle
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from hsmscep.errors import MessageError
from hsmscep.testing.replies import open_cert_rep
from hsmscep.testing.requests import ClientRequest, build_pkcs_req

BENCH_DIR = Path(__file__).resolve().parent
KEY_DIR = BENCH_DIR / ".cache" / "keys"
RSA_BITS = 2048

# What a timed request and its later verification need. The key is an index into the on-disk
# pool so that records stay small and picklable.
BuiltRequest = tuple[str, bytes, bytes, int]  # transaction_id, der, sender_nonce, key_index
Response = tuple[str, int, float, float, str | None, bytes, str | None]


@dataclass(frozen=True, slots=True)
class Outcome:
    """The verdict on one response body."""

    transaction_id: str
    kind: str  # "ok", "failure", "pending" or "invalid"
    detail: str | None = None  # failInfo for "failure", reason for "invalid"
    serial: int | None = None  # serial number of the issued certificate for "ok"


# ---------------------------------------------------------------------------- key pool


def _key_paths(index: int) -> tuple[Path, Path]:
    stem = KEY_DIR / f"rsa{RSA_BITS}-{index:05d}"
    return stem.with_suffix(".key.pem"), stem.with_suffix(".crt.pem")


def missing_keys(count: int) -> list[int]:
    """Indexes below `count` that have no cached key yet."""
    return [i for i in range(count) if not all(p.exists() for p in _key_paths(i))]


def generate_key(index: int) -> int:
    """Create and cache key `index` with its self-signed signer certificate (~50-100 ms)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmscep-bench"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"bench-signer-{index}"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    # The signer certificate is cached with the key: making it per request would add an RSA
    # signature to every build for nothing (SCEP only needs it to carry the key).
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = _key_paths(index)
    KEY_DIR.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a killed run never leaves a half-written key behind.
    for path, data in (
        (
            key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        (cert_path, cert.public_bytes(serialization.Encoding.PEM)),
    ):
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(data)
        tmp.replace(path)
    return index


def load_key(index: int) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key_path, cert_path = _key_paths(index)
    # Our own freshly generated keys: skipping the RSA consistency check saves ~10 ms a key.
    key = serialization.load_pem_private_key(
        key_path.read_bytes(), password=None, unsafe_skip_rsa_key_validation=True
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return key, x509.load_pem_x509_certificate(cert_path.read_bytes())


# Per worker process: the key pool, loaded once by `init_worker`.
_KEYS: list[tuple[rsa.RSAPrivateKey, x509.Certificate]] = []


def init_worker(key_count: int) -> None:
    """Process-pool initializer: load the cached key pool once per worker."""
    _KEYS.clear()
    _KEYS.extend(load_key(i) for i in range(key_count))


# ---------------------------------------------------------------------------- building


def build_batch(
    ca_ders: Sequence[bytes], challenge: str, run_tag: str, first: int, count: int
) -> list[BuiltRequest]:
    """Build `count` PKCSReq messages for the server whose GetCACert gave `ca_ders`.

    Request `first + i` uses key `(first + i) % len(pool)`: keys are reused across requests,
    but every request gets a fresh transactionID, nonce and a unique CN (scepserver refuses a
    second certificate for a CN it already holds).
    """
    ca_certs = [x509.load_der_x509_certificate(d) for d in ca_ders]
    out: list[BuiltRequest] = []
    for seq in range(first, first + count):
        index = seq % len(_KEYS)
        key, signer = _KEYS[index]
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hsmscep-bench"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{run_tag}-{seq}"),
            ]
        )
        req = build_pkcs_req(
            key=key,
            ca_certs=ca_certs,
            challenge=challenge,
            subject=subject,
            signer_cert=signer,
            transaction_id=secrets.token_hex(16),
        )
        out.append((req.transaction_id, req.der, req.sender_nonce, index))
    return out


# ---------------------------------------------------------------------------- verification


def verify_batch(
    ca_ders: Sequence[bytes],
    anchor_ders: Sequence[bytes],
    items: Sequence[tuple[str, bytes, int, bytes]],
) -> list[Outcome]:
    """Verify CertRep bodies: `items` are (transaction_id, sender_nonce, key_index, body).

    `ca_ders` is what GetCACert returned (the CertRep signer must be among them or embedded);
    `anchor_ders` are the CA certificates taken out of band (the scepserver depot, the hsmscep
    init output): the issued certificate must be signed by one of them, be valid now, and carry
    the CSR key.
    """
    ca_certs = [x509.load_der_x509_certificate(d) for d in ca_ders]
    anchors = [x509.load_der_x509_certificate(d) for d in anchor_ders]
    now = datetime.datetime.now(datetime.UTC)
    out: list[Outcome] = []
    for txid, nonce, index, body in items:
        key, signer = _KEYS[index]
        request = ClientRequest(
            der=b"", transaction_id=txid, sender_nonce=nonce, key=key, signer_cert=signer
        )
        out.append(_verify_one(body, request, ca_certs, anchors, now))
    return out


def _verify_one(
    body: bytes,
    request: ClientRequest,
    ca_certs: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    now: datetime.datetime,
) -> Outcome:
    txid = request.transaction_id
    try:
        result = open_cert_rep(body, request, ca_certs)
    except MessageError as exc:
        return Outcome(txid, "invalid", f"CertRep: {exc}")
    except Exception as exc:  # a verifier crash is a failed response, not a failed run
        return Outcome(txid, "invalid", f"CertRep: {type(exc).__name__}: {exc}")
    if result.pki_status == "2":
        return Outcome(txid, "failure", result.fail_info)
    if result.pki_status == "3":
        return Outcome(txid, "pending")
    if result.pki_status != "0":
        return Outcome(txid, "invalid", f"pkiStatus {result.pki_status!r}")
    want = request.key.public_key()
    issued = [c for c in result.certificates if c.public_key() == want]
    if not issued:
        return Outcome(txid, "invalid", "no certificate carries the CSR key")
    cert = issued[0]
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return Outcome(txid, "invalid", "certificate not valid now")
    for anchor in anchors:
        try:
            cert.verify_directly_issued_by(anchor)
        except (InvalidSignature, ValueError, TypeError):  # wrong key, name or key type
            continue
        return Outcome(txid, "ok", serial=cert.serial_number)
    return Outcome(txid, "invalid", "certificate does not chain to the CA")


# ---------------------------------------------------------------------------- record files


def write_requests(path: Path, requests: Sequence[BuiltRequest]) -> None:
    """Write the (transaction_id, der) stream the locust user replays."""
    with path.open("wb") as fh:
        for txid, der, _nonce, _index in requests:
            pickle.dump((txid, der), fh, protocol=pickle.HIGHEST_PROTOCOL)


def read_stream(path: Path, limit: int = 50_000_000) -> Iterator[Any]:
    """Records of a pickle stream, in order (bounded by `limit`)."""
    with path.open("rb") as fh:
        for _ in range(limit):
            try:
                yield pickle.load(fh)
            except EOFError:
                return
