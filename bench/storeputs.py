"""The store alone: group-committed puts per second and CPU per put, SQLite against PostgreSQL,
in one run (no HSM, no HTTP). A throwaway PostgreSQL cluster (fsync on) is started for it.

    python -m bench.storeputs [--puts 3000] [--levels 1,32] [--rounds 3] [--prefill 1000000]

Rows carry serials as the server makes them (time-ordered, policy/serials.py) and random
transactionIDs, as clients send them (sequential IDs would make every index insert an append
and hide what a large store costs). CPU per put is given for the hsmscep
process and, for PostgreSQL, for the database server's processes too (it shares the box).
With --prefill both stores are filled once (bench/prefill.py) and every round adds to them.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from bench import pgstore, prefill
from hsmscep.policy.serials import ordered_serial
from hsmscep.store.postgres import PgStore
from hsmscep.store.records import IssuedCert
from hsmscep.store.sqlite import CertStore
from tests import pgcluster

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _cert(i: int) -> IssuedCert:
    return IssuedCert(
        serial=ordered_serial(datetime.now(UTC)),
        subject=f"CN=put-{i}",
        sans=(),
        not_before=NOW,
        not_after=NOW + timedelta(days=365),
        transaction_id=secrets.token_hex(20),
        requester_fingerprint="a" * 64,
        public_key_sha256=secrets.token_hex(32),
        der=b"x" * 1000,
        issued_at=NOW,
    )


def _server_cpu(cluster: pgcluster.Cluster | None) -> float:
    return 0.0 if cluster is None else pgstore.server_cpu_seconds(cluster)


async def _puts(
    open_store: Callable[[], Awaitable[CertStore | PgStore]],
    count: int,
    users: int,
    cluster: pgcluster.Cluster | None,
) -> tuple[float, float, float]:
    store = await open_store()
    certs = [_cert(i) for i in range(count)]
    gate = asyncio.Semaphore(users)

    async def one(cert: IssuedCert) -> None:
        async with gate:
            await store.put(cert)

    server, cpu, wall = _server_cpu(cluster), time.process_time(), time.perf_counter()
    try:
        await asyncio.gather(*(one(cert) for cert in certs))
        # Before close: the writer's backend is still alive, so its CPU is counted.
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        server = _server_cpu(cluster) - server
    finally:
        await store.close()
    return count / wall, cpu / count * 1e6, server / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--puts", type=int, default=3000)
    parser.add_argument("--levels", default="1,32")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=0, help="rows in each store beforehand")
    args = parser.parse_args(argv)
    reason = pgcluster.unavailable()
    if reason is not None:
        print(f"no PostgreSQL: {reason}")
        return 1
    with pgcluster.cluster(fsync=True) as cluster, tempfile.TemporaryDirectory() as tmp:
        path, url = Path(tmp) / "puts.db", cluster.tcp_url("puts")
        cluster.fresh_database("puts")
        if args.prefill:
            started = time.monotonic()
            asyncio.run(prefill.prefill_sqlite(path, args.prefill))
            asyncio.run(prefill.prefill_postgresql(url, pgcluster.PASSWORD, args.prefill))
            print(
                f"prefilled {args.prefill} rows in each store: {time.monotonic() - started:.0f} s"
            )
        for n in range(args.rounds):
            for users in (int(level) for level in args.levels.split(",")):
                s_rate, s_cpu, _ = asyncio.run(
                    _puts(partial(CertStore.open, path, max_batch=64), args.puts, users, None)
                )
                p_rate, p_cpu, p_server = asyncio.run(
                    _puts(
                        partial(PgStore.open, url, password=pgcluster.PASSWORD, max_batch=64),
                        args.puts,
                        users,
                        cluster,
                    )
                )
                print(
                    f"round {n} c={users:<3} sqlite {s_rate:6.0f}/s {s_cpu:4.0f} us CPU/put"
                    f"   postgresql {p_rate:6.0f}/s {p_cpu:4.0f} us CPU/put"
                    f" + {p_server:4.0f} us server   ratio {p_rate / s_rate:.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
