"""The store edge: issued certificates, revocations and CRLs, held requests and one-time
challenges. `records` holds the values and `schema` the schema history and column spellings
(both pure, shared by every backend). `sqlite` is the embedded backend: its CertStore composes
one module per table (`certificates` with its group-commit thread `groupcommit`,
`revocations`, `pending`, `challenges`) over the connections of `database`. `postgres` is
the shared backend for several nodes (asyncpg): PgStore over `pgcertificates` (the same group
commit), `pgtables`, `pgdatabase` and the PostgreSQL spelling of the history, `pgschema`.
Both stores' table methods are `facade`'s. `backends.open_store` picks one by the location:
a postgresql:// URL or an SQLite path. `stats` holds the statements behind `hsmscep status`
(pure, both dialects); `readonly` reads them from either backend without writing, migrating
or starting a commit thread.

Backends implement hsmscep.service.ports.Store; they may import only hsmscep.errors, the
store's own modules, and service.ports for a type-only proof that they conform.
"""
