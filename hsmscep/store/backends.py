"""Which backend a store location names: a postgresql:// URL is PgStore, anything else the
path of an SQLite file (CertStore). The web lifespan and the CLI open stores through here."""

from __future__ import annotations

import os
from typing import Literal

from hsmscep.store.postgres import PgStore
from hsmscep.store.sqlite import CertStore

PG_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(location: str | os.PathLike[str]) -> bool:
    """True if `location` is a PostgreSQL URL rather than an SQLite path."""
    return isinstance(location, str) and location.startswith(PG_SCHEMES)


async def open_store(
    location: str | os.PathLike[str],
    *,
    password: str | None = None,
    synchronous: Literal["FULL", "NORMAL"] = "FULL",
    linger: float = 0.0,
) -> CertStore | PgStore:
    """The store at `location`, migrated and ready; `password` is PostgreSQL's, `synchronous`
    SQLite's."""
    if is_postgres(location):
        return await PgStore.open(str(location), password=password, linger=linger)
    return await CertStore.open(location, synchronous=synchronous, linger=linger)
