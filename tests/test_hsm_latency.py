"""The default signing pool hides HSM round trips: its size follows the measured latency of
a private-key operation (Little's law); pool_size overrides it."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.hashes import SHA256

from hsmscep.hsm.autosize import keep_sized, next_size
from hsmscep.hsm.keyring import Keyring
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.pool import SigningPool, latency_hiding_size
from hsmscep.hsm.refs import KeyRef
from hsmscep.web import affinity
from tests.conftest import DevCa, Server, key_source, start_server
from tests.hsmfaults import build_shim, copy_ca, private_module

pytestmark = pytest.mark.hsm


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory)


def test_a_local_token_keeps_the_core_sized_pool() -> None:
    assert latency_hiding_size(1, cpu_op=0.0004, wait_op=0.00002, cap=64) == 1
    assert latency_hiding_size(2, cpu_op=0.0004, wait_op=0.00006, cap=64) == 2


def test_a_round_trip_shorter_than_the_cpu_still_grows_the_pool() -> None:
    # Measured on a slow box with 1 ms added: 2.2 ms CPU and 1.06 ms waiting per operation.
    # The job waits ~30 % of its time; one thread per process left that share of the CPU idle.
    assert latency_hiding_size(1, cpu_op=0.0022, wait_op=0.00106, cap=64) >= 3
    # Under a tenth of the job waiting (about 7 %): the GIL hand-offs would cost more.
    assert latency_hiding_size(1, cpu_op=0.0022, wait_op=0.0002, cap=64) == 1


def test_round_trips_grow_the_pool_by_littles_law_up_to_the_cap() -> None:
    two_ms = latency_hiding_size(1, cpu_op=0.0004, wait_op=0.002, cap=64)
    five_ms = latency_hiding_size(1, cpu_op=0.0004, wait_op=0.005, cap=64)
    assert 6 <= two_ms < five_ms <= 64
    # A network HSM: almost no CPU per operation, the cap bounds sessions and memory.
    assert latency_hiding_size(1, cpu_op=0.00002, wait_op=0.05, cap=40) == 40
    assert latency_hiding_size(8, cpu_op=0.0004, wait_op=0.002, cap=4) == 8  # never below base


def test_the_controller_grows_only_when_threads_not_the_cpu_are_the_limit() -> None:
    def grow(size: int, queued: float, cpu: float, demand: int = 100, cap: int = 64) -> int:
        return next_size(size, cap, queued_share=queued, cpu_share=cpu, demand=demand)

    assert grow(8, queued=0.9, cpu=0.6) == 12  # 8 threads at 60 %: 12 fill 85 % of a core
    assert grow(8, queued=0.9, cpu=0.8) == 9  # at least one more
    assert grow(4, queued=0.9, cpu=0.1) == 8  # at most twice per step
    assert grow(4, queued=0.9, cpu=0.1, demand=6) == 6  # never more than jobs in flight
    assert grow(40, queued=1.0, cpu=0.1) == 64  # never past the cap
    assert grow(64, queued=1.0, cpu=0.1) == 64
    assert grow(4, queued=0.2, cpu=0.1) == 4  # threads were free
    assert grow(4, queued=1.0, cpu=0.95) == 4  # the CPU is the limit


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_jobs_that_wait_on_the_hsm_grow_the_pool_at_run_time(anyio_backend: str) -> None:
    """Jobs that sleep (a round trip, no CPU) queue behind two threads: the pool grows."""
    pool: SigningPool[object] = SigningPool(object, size=2, max_pending=64)
    await pool.start()
    sizer = asyncio.create_task(keep_sized(pool, cap=6, window=0.2))
    stop = time.monotonic() + 10

    async def client() -> None:
        while pool.size < 6 and time.monotonic() < stop:
            await pool.run(lambda _: time.sleep(0.005))

    try:
        await asyncio.gather(*(client() for _ in range(16)))
        assert pool.size == 6  # grown to the cap, not past it
        await asyncio.wait_for(sizer, 5)  # at the cap the controller ends
    finally:
        sizer.cancel()
        await pool.aclose()


def test_signing_threads_waiting_on_a_slow_token_grow_the_pool_at_run_time(
    dev_ca: DevCa, shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real SoftHSM2 behind the pass-through module, 3 ms per signature: one thread cannot
    keep up with 12 callers and leaves the CPU idle, so the controller adds threads."""
    monkeypatch.setenv("P11SHIM_MODULE", private_module(dev_ca.token.module, tmp_path, "s.so"))
    monkeypatch.setenv("P11SHIM_DELAY_US", "3000")
    source = key_source(dev_ca)
    ref = source.ca_key.token
    token = type(ref)(private_module(shim, tmp_path, "shim-slow.so"), ref.label, pin=ref.pin)
    moved = [KeyRef(token, k.label, k.id) for k in (source.ca_key, source.ra_sign_key)]
    source = type(source)(
        moved[0], source.ca_cert, moved[1], source.ra_sign_cert, [(moved[1], source.ra_sign_cert)]
    )
    ca_public = source.ca_cert.public_key()

    def sign(keys: Keyring) -> bytes:
        return keys.ca_key.sign(b"probe", padding.PKCS1v15(), SHA256())  # type: ignore[call-arg, arg-type]

    async def run() -> tuple[int, list[bytes]]:
        logins = TokenLogin()
        pool: SigningPool[Keyring] = SigningPool(
            lambda: Keyring.open(source, logins),
            size=1,
            max_pending=64,
            close_context=Keyring.close,
        )
        await pool.start()
        sizer = asyncio.create_task(keep_sized(pool, cap=4, window=0.3))
        stop = time.monotonic() + 20
        signatures: list[bytes] = []

        async def caller() -> None:
            while not sizer.done() and time.monotonic() < stop:
                signatures.append(await pool.run(sign))

        try:
            await asyncio.gather(*(caller() for _ in range(12)))
            return pool.size, signatures
        finally:
            sizer.cancel()
            await pool.aclose()
            logins.close()

    size, signatures = asyncio.run(run())
    # Grown, within the cap; how far depends on the CPU this (shared) box leaves the process:
    # the controller stops where the threads' CPU nears a core.
    assert 1 < size <= 4
    for signature in signatures[-4:]:  # the threads added sign with the token's key
        ca_public.verify(signature, b"probe", padding.PKCS1v15(), SHA256())  # type: ignore[union-attr, call-arg, arg-type]


def test_a_server_on_a_slow_hsm_starts_more_signing_threads(
    dev_ca: DevCa, shim: Path, tmp_path: Path
) -> None:
    ca = copy_ca(dev_ca, tmp_path / "ca", str(shim))
    env = {"P11SHIM_MODULE": dev_ca.token.module, "P11SHIM_DELAY_US": "3000"}
    server = start_server(ca, env, args=("--workers", "1"))
    try:
        assert httpx.get(f"{server.url}/readyz", timeout=10).json()["ready"] is True
    finally:
        server.stop()
    found = re.search(r"ms waiting; (\d+) signing threads", server.output())
    assert found, server.output()
    base = len(affinity.usable_cpus())  # the core-sized pool of one process
    assert int(found.group(1)) >= 2 * base, server.output()


def test_softhsm_keeps_the_core_sized_pool(server: Server) -> None:
    """Nothing changes for SoftHSM2 users: all CPU, no round trip, no extra threads."""
    found = re.search(r"ms waiting; (\d+) signing threads", server.output())
    assert found, server.output()
    assert int(found.group(1)) == len(affinity.usable_cpus())  # one process: cores threads
