"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, one postgres serving a
unix socket there and 127.0.0.1 (password auth over TCP), stopped and removed at the end.

PostgreSQL refuses to run as root: as root its programs run as the `postgres` OS user
(runuser); without that user or the server binaries the tests that need it skip, saying why.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

PASSWORD = "pg-test-secret"  # the `hsmscep` role's, used over TCP only


def _bindir() -> Path | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    return versions[-1] if versions else None


def unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if _bindir() is None:
        return "PostgreSQL server binaries not installed (tests/run.sh installs postgresql)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no `postgres` OS user to run PostgreSQL as"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    directory: Path
    port: int
    bindir: Path
    fsync: bool = False  # the tests check hsmscep's durability, not PostgreSQL's; bench: on

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        """Over the unix socket, trusted (no password)."""
        return f"postgresql://{user}@/{database}?host={self.directory}&port={self.port}"

    def tcp_url(self, database: str) -> str:
        """Over 127.0.0.1 as `hsmscep`, which needs PASSWORD."""
        return f"postgresql://hsmscep@127.0.0.1:{self.port}/{database}"

    def run(self, program: str, *args: str, timeout: float = 120) -> None:
        command = [str(self.bindir / program), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=timeout)

    def pg_ctl(self, *args: str) -> None:
        self.run("pg_ctl", "-D", str(self.directory / "data"), "-w", "-t", "60", *args)

    def start(self) -> None:
        options = (
            f"-k {self.directory} -p {self.port} -c listen_addresses=127.0.0.1"
            f" -c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        self.pg_ctl("-l", str(self.directory / "log"), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        self.pg_ctl("-m", mode, "stop")

    def sql(self, statement: str, database: str = "postgres") -> None:
        async def run() -> None:
            conn = await asyncpg.connect(self.url(database))
            try:
                await conn.execute(statement)
            finally:
                await conn.close()

        asyncio.run(run())

    def fresh_database(self, name: str) -> str:
        """An empty database `name` (dropped first if it exists); its unix-socket URL."""
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.sql(f'CREATE DATABASE "{name}" OWNER hsmscep')
        return self.url(name)


@contextmanager
def cluster(fsync: bool = False) -> Iterator[Cluster]:
    """A running cluster for the duration of the block; removed afterwards."""
    bindir = _bindir()
    assert bindir is not None
    # Not under pytest's tmp dir: its 0700 parents would keep the postgres user out.
    directory = Path(tempfile.mkdtemp(prefix="hsmscep-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(directory, "postgres")
        c = Cluster(directory, _free_port(), bindir, fsync)
        (directory / "pw").write_text("postgres\n")
        if os.geteuid() == 0:
            shutil.chown(directory / "pw", "postgres")
        c.run(
            "initdb", "-D", str(directory / "data"), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--pwfile", str(directory / "pw"), "--no-sync",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        c.start()
        try:
            c.sql(f"CREATE ROLE hsmscep LOGIN PASSWORD '{PASSWORD}'")
            yield c
        finally:
            try:
                c.stop("immediate")
            except subprocess.SubprocessError:
                pass
            deadline = time.monotonic() + 10
            while (directory / "data" / "postmaster.pid").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
