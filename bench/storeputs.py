"""The store alone: group-committed puts per second and CPU per put, SQLite against PostgreSQL,
in one run (no HSM, no HTTP). A throwaway PostgreSQL cluster (fsync on) is started for it.

    python -m bench.storeputs [--puts 3000] [--levels 1,32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from hsmscep.store.postgres import PgStore
from hsmscep.store.records import IssuedCert
from hsmscep.store.sqlite import CertStore
from tests import pgcluster

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _cert(i: int) -> IssuedCert:
    return IssuedCert(
        serial=i + 1,
        subject=f"CN=put-{i}",
        sans=(),
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        transaction_id=f"put-{i}",
        requester_fingerprint="a" * 64,
        public_key_sha256="b" * 64,
        der=b"x" * 1000,
        issued_at=NOW,
    )


async def _puts(
    open_store: Callable[[], Awaitable[CertStore | PgStore]], count: int, users: int
) -> tuple[float, float]:
    store = await open_store()
    gate = asyncio.Semaphore(users)

    async def one(i: int) -> None:
        async with gate:
            await store.put(_cert(i))

    cpu, wall = time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await store.close()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return count / wall, cpu / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=3000)
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    reason = pgcluster.unavailable()
    if reason is not None:
        print(f"no PostgreSQL: {reason}")
        return 1
    with pgcluster.cluster(fsync=True) as cluster, tempfile.TemporaryDirectory() as tmp:
        for n in range(args.rounds):
            for users in (int(level) for level in args.levels.split(",")):
                name = f"puts_{n}_{users}"
                path, url = Path(tmp) / f"{name}.db", cluster.tcp_url(name)
                cluster.fresh_database(name)
                s_rate, s_cpu = asyncio.run(
                    _puts(partial(CertStore.open, path, max_batch=64), args.puts, users)
                )
                p_rate, p_cpu = asyncio.run(
                    _puts(
                        partial(PgStore.open, url, password=pgcluster.PASSWORD, max_batch=64),
                        args.puts,
                        users,
                    )
                )
                print(
                    f"c={users:<3} sqlite {s_rate:6.0f}/s {s_cpu:4.0f} us CPU/put"
                    f"   postgresql {p_rate:6.0f}/s {p_cpu:4.0f} us CPU/put"
                    f"   ratio {p_rate / s_rate:.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
