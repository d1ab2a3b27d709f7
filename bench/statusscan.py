"""What `hsmscep status` costs on a large store: its read-only statistics read, timed.

    python -m bench.prefill --count 1000000 --sqlite work/hsmscep.db
    python -m bench.statusscan --sqlite work/hsmscep.db
    python -m bench.statusscan --postgresql postgresql://u@host/db  (password:
        HSMSCEP_STORE_PASSWORD)

Reads the store as `hsmscep status` does (store/readonly.py) a few times and prints wall and
process CPU seconds per read; the first read is the cold one (page cache permitting).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from datetime import UTC, datetime

from hsmscep.store.readonly import read_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--sqlite", help="the SQLite store file")
    target.add_argument("--postgresql", help="postgresql://user@host/db")
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    location = args.sqlite or args.postgresql
    password = os.environ.get("HSMSCEP_STORE_PASSWORD")
    for round_ in range(1, min(args.rounds, 20) + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        stats = asyncio.run(
            read_stats(location, password=password, now=datetime.now(UTC), days=args.days)
        )
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        print(
            f"read {round_}: {wall:.2f} s wall, {cpu:.2f} s CPU (this process);"
            f" {stats.total} certificates, {stats.revoked} revoked"
        )


if __name__ == "__main__":
    main()
