"""hsmscep's PostgreSQL store for the bench: one throwaway cluster per run (fsync on, as in
production), one database per series, optionally pre-filled (bench/prefill.py).

The cluster is tests/pgcluster.py's (initdb/pg_ctl in a temp dir, 127.0.0.1 with a password,
run as the `postgres` OS user when root), so the bench and the suite start it the same way.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

from bench import prefill
from tests import pgcluster


class BenchPostgres:
    """A running cluster; `database(name)` gives a node's store environment."""

    def __init__(self, cluster: pgcluster.Cluster) -> None:
        self._cluster = cluster

    def cpu_seconds(self) -> float:
        """CPU seconds the database server has used so far (see server_cpu_seconds)."""
        return server_cpu_seconds(self._cluster)

    def database(self, name: str, prefill_count: int = 0) -> dict[str, str]:
        """A fresh database `name`, pre-filled with `prefill_count` certificates; the
        environment that points hsmscep at it."""
        self._cluster.fresh_database(name)
        url = self._cluster.tcp_url(name)
        if prefill_count:
            asyncio.run(prefill.prefill_postgresql(url, pgcluster.PASSWORD, prefill_count))
            self._cluster.sql("CHECKPOINT")  # the load's dirty buffers out before measuring
            prefill.settle()
        return {"HSMSCEP_STORE_URL": url, "HSMSCEP_STORE_PASSWORD": pgcluster.PASSWORD}


@contextmanager
def postgres() -> Iterator[BenchPostgres | None]:
    """A cluster for the run, or None (with the reason printed) where none can start."""
    reason = pgcluster.unavailable()
    if reason is not None:
        print(f"PostgreSQL series skipped: {reason}")
        yield None
        return
    with pgcluster.cluster(fsync=True) as cluster:
        yield BenchPostgres(cluster)


def prefill_sqlite(workdir: Path, count: int) -> None:
    """Pre-fill the SQLite store `hsmscep dev --dir workdir` will open."""
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(prefill.prefill_sqlite(workdir / "hsmscep.db", count))


def server_cpu_seconds(cluster: pgcluster.Cluster) -> float:
    """CPU seconds of a PostgreSQL server: the postmaster, its live children and its reaped ones
    (backends of closed connections). It shares the box with hsmscep, so a PostgreSQL series
    costs this CPU too."""
    pid = int((cluster.directory / "data" / "postmaster.pid").read_text().split()[0])
    main = psutil.Process(pid)
    t = main.cpu_times()
    total = t.user + t.system + t.children_user + t.children_system
    for child in main.children():
        try:
            c = child.cpu_times()
            total += c.user + c.system
        except psutil.NoSuchProcess:
            pass  # reaped meanwhile: counted in children_* from now on
    return total
