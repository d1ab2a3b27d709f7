"""The store's schema: its history as numbered migrations, and how values are spelled in it.

Migration N+1 is MIGRATIONS[N], in SQLite's dialect; a second backend keeps the same numbering
(its own statements per step), so a schema version names one set of tables everywhere. Pure:
database.py applies the history, the table modules use the spellings.
"""

from __future__ import annotations

from datetime import UTC, datetime

# Statements are run one by one rather than with executescript, which would COMMIT the
# migration transaction before running.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE certificates (
            serial TEXT PRIMARY KEY,
            subject TEXT NOT NULL,
            sans_json TEXT NOT NULL,
            not_before TEXT NOT NULL,
            not_after TEXT NOT NULL,
            transaction_id TEXT UNIQUE NOT NULL,
            requester_fingerprint TEXT NOT NULL,
            public_key_sha256 TEXT NOT NULL,
            der BLOB NOT NULL,
            status TEXT NOT NULL,
            issued_at TEXT NOT NULL
        )""",
        "CREATE INDEX certificates_subject ON certificates (subject)",
        "CREATE INDEX certificates_requester ON certificates (requester_fingerprint)",
        "CREATE INDEX certificates_public_key ON certificates (public_key_sha256)",
        "CREATE INDEX certificates_not_after ON certificates (not_after)",
    ),
    (
        # Revocation: the certificate row carries it; `revision` counts revocations so that
        # every server process can tell, with one read, whether its CRL is out of date.
        "ALTER TABLE certificates ADD COLUMN revoked_at TEXT",
        "ALTER TABLE certificates ADD COLUMN revocation_reason TEXT",
        "CREATE INDEX certificates_revoked ON certificates (serial) WHERE revoked_at IS NOT NULL",
        """CREATE TABLE revocation_state (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            revision INTEGER NOT NULL
        )""",
        "INSERT INTO revocation_state (id, revision) VALUES (1, 0)",
        # Published CRLs; the number is the CRLNumber, so two processes cannot publish the same.
        """CREATE TABLE crls (
            number INTEGER PRIMARY KEY,
            revision INTEGER NOT NULL,
            this_update TEXT NOT NULL,
            next_update TEXT NOT NULL,
            der BLOB NOT NULL
        )""",
    ),
    (
        # Requests waiting for an operator ([enroll] approval = "manual"). The CSR was checked
        # when it arrived; the certificate is issued at the first poll after approval.
        """CREATE TABLE pending_requests (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            transaction_id TEXT UNIQUE NOT NULL,
            csr_der BLOB NOT NULL,
            requester_fingerprint TEXT NOT NULL,
            requester_key_sha256 TEXT NOT NULL,
            requester_ip TEXT NOT NULL,
            subject TEXT NOT NULL,
            sans_json TEXT NOT NULL,
            key_description TEXT NOT NULL,
            created_at TEXT NOT NULL,
            status TEXT NOT NULL,
            decided_at TEXT
        )""",
        "CREATE INDEX pending_requests_status ON pending_requests (status)",
    ),
    (
        # One-time enrollment challenges ([enroll] challenge_mode = "one_time"). Only the
        # SHA-256 of the challenge is stored. `profile` is '' for the server-wide pool (named
        # profiles come later). A challenge is consumed by one conditional UPDATE.
        """CREATE TABLE challenges (
            hash TEXT PRIMARY KEY,
            profile TEXT NOT NULL,
            subject_pattern TEXT,
            san_pattern TEXT,
            created_at TEXT NOT NULL,
            expires_at TEXT NOT NULL,
            used_at TEXT,
            used_by TEXT
        )""",
        "CREATE INDEX challenges_expires ON challenges (expires_at)",
    ),
    (
        # The enrollment profile a held request came in through: its template applies when
        # the request is issued after approval.
        "ALTER TABLE pending_requests ADD COLUMN profile TEXT NOT NULL DEFAULT 'default'",
    ),
    (
        # No query reads these: each was one more random-key B-tree insert (and WAL page) per
        # issued certificate, on the commit that every response waits for. not_after stays:
        # it grows in time order, so its inserts append, and expiry reports want it.
        "DROP INDEX certificates_subject",
        "DROP INDEX certificates_requester",
        "DROP INDEX certificates_public_key",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


def iso(value: datetime) -> str:
    """A timestamp as stored: ISO 8601 in UTC."""
    return value.astimezone(UTC).isoformat()


def iso_fixed(value: datetime) -> str:
    """A timestamp as stored where SQL compares it: fixed width, so text order is time order
    (expires_at > ?)."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def serial_key(serial: int) -> str:
    """A serial number as stored: zero-padded hex, so that text order is numeric order and each
    serial has one spelling."""
    return format(serial, "040x")


def serial_from_key(key: str) -> int:
    """The serial number a stored key spells."""
    return int(key, 16)
