"""The PKCS#11 side against a real SoftHSM2 token: key protection and the threaded pool."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.hashes import SHA256

from hsmscep.errors import HsmBusy
from hsmscep.hsm.keyring import Keyring
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.pool import SigningPool
from hsmscep.hsm.tokenkeys import key_protection
from tests.conftest import DevCa, key_source

pytestmark = pytest.mark.hsm


def test_ca_and_ra_keys_are_sensitive_and_not_extractable(dev_ca: DevCa) -> None:
    logins = TokenLogin()
    try:
        session = logins.open_session(dev_ca.settings.ca.key.token)
        for ref in (dev_ca.settings.ca.key, dev_ca.settings.ra.key):
            assert key_protection(session, ref) == (True, False), ref.describe()
    finally:
        logins.close()


def test_no_private_key_on_disk_outside_the_token(dev_ca: DevCa, softhsm_dir: Path) -> None:
    tokens = softhsm_dir / "tokens"
    scanned = 0
    for root in (dev_ca.directory, softhsm_dir):
        for path in root.rglob("*"):
            if not path.is_file() or tokens in path.parents:
                continue
            scanned += 1
            data = path.read_bytes()
            assert b"PRIVATE KEY" not in data, path
            # a DER PKCS#8/PKCS#1 RSA key starts with SEQUENCE, INTEGER 0
            assert not data.startswith(b"\x30\x82") or b"\x02\x01\x00\x02\x82" not in data[:12]
    assert scanned >= 3  # the config, certificates and database were looked at


def test_pool_runs_many_threads_against_softhsm(dev_ca: DevCa) -> None:
    """CKF_OS_LOCKING_OK: several sessions in parallel must neither crash nor corrupt."""
    source = key_source(dev_ca)
    logins = TokenLogin()
    ca_public = source.ca_cert.public_key()

    def sign(data: bytes, keys: Keyring) -> bytes:
        return keys.ca_key.sign(data, padding.PKCS1v15(), SHA256())

    def decrypt(ciphertext: bytes, keys: Keyring) -> bytes:
        return keys.decrypt_keys[0][1].decrypt(ciphertext, padding.PKCS1v15())

    async def run() -> None:
        pool: SigningPool[Keyring] = SigningPool(
            lambda: Keyring.open(source, logins),
            size=6,
            max_pending=1000,
            close_context=Keyring.close,
        )
        await pool.start()
        try:
            messages = [os.urandom(32) for _ in range(600)]
            signatures = await asyncio.gather(
                *(pool.run(lambda k, m=m: sign(m, k)) for m in messages)
            )
            for message, signature in zip(messages, signatures, strict=True):
                ca_public.verify(signature, message, padding.PKCS1v15(), SHA256())
            ra_public = source.ra_sign_cert.public_key()
            secrets_ = [os.urandom(24) for _ in range(300)]
            sealed = [ra_public.encrypt(s, padding.PKCS1v15()) for s in secrets_]
            opened = await asyncio.gather(*(pool.run(lambda k, c=c: decrypt(c, k)) for c in sealed))
            assert opened == secrets_
        finally:
            await pool.aclose()

    try:
        asyncio.run(run())
    finally:
        logins.close()


def test_pool_refuses_beyond_max_pending(dev_ca: DevCa) -> None:
    source = key_source(dev_ca)
    logins = TokenLogin()

    async def run() -> tuple[int, int]:
        pool: SigningPool[Keyring] = SigningPool(
            lambda: Keyring.open(source, logins), size=1, max_pending=4, close_context=Keyring.close
        )
        await pool.start()
        try:
            slow = [
                pool.run(lambda k: k.ca_key.sign(b"x", padding.PKCS1v15(), SHA256()))
                for _ in range(10)
            ]
            results = await asyncio.gather(*slow, return_exceptions=True)
            busy = sum(isinstance(r, HsmBusy) for r in results)
            done = sum(isinstance(r, bytes) for r in results)
            return busy, done
        finally:
            await pool.aclose()

    try:
        busy, done = asyncio.run(run())
    finally:
        logins.close()
    assert (busy, done) == (6, 4)
