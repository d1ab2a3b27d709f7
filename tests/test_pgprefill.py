"""bench/prefill.py fills both backends with rows hsmscep reads like its own."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bench import prefill
from hsmscep.store.postgres import PgStore
from hsmscep.store.sqlite import CertStore
from tests.pgcluster import PASSWORD, Cluster


def test_prefill_both_backends(pg_cluster: Cluster, tmp_path: Path) -> None:
    pg_cluster.fresh_database("prefill")
    url = pg_cluster.tcp_url("prefill")

    async def run() -> None:
        await prefill.prefill_sqlite(tmp_path / "s.db", 1200)
        await prefill.prefill_postgresql(url, PASSWORD, 1200)
        sqlite = await CertStore.open(tmp_path / "s.db")
        pg = await PgStore.open(url, password=PASSWORD)
        try:
            for store in (sqlite, pg):
                assert await store.count() == 1200
                serial = (await store.serials())[600]
                cert = await store.get_by_serial(serial)
                assert cert is not None and len(cert.der) == 1000
                assert await store.get_by_transaction(cert.transaction_id) == cert
        finally:
            await sqlite.close()
            await pg.close()

    asyncio.run(run())
