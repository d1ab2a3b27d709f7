"""What a SoftHSM2 private-key operation does to the Python that runs right after it.

The part of an enrollment outside the HSM calls costs about twice in the server what a hot
loop of the same code costs (bench/PROFILE.md). This isolates one cause on one thread: the
pkiMessage decode (with its RSA verify), timed in thread CPU:
- hot: decodes back to back, no private-key call between them;
- after a sign: each decode follows one C_Sign on the token, as each stage of a signing job
  follows a private-key call;
- batched: `--batch` decodes, then as many signs, as a worker running the same stage of
  several queued jobs back to back would.

  python -m bench.after_hsm --pin 1            # five rounds of 320 decodes per mode

Run it pinned to one CPU, as each `--workers auto` server process is (web/affinity.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pkcs11 import KeyType, Mechanism

from hsmscep.hsm import devtoken
from hsmscep.hsm.library import close_library, open_library
from hsmscep.protocol.message import decode_pki_message
from hsmscep.testing.requests import build_pkcs_req, self_signed_signer

DISTINCT_REQUESTS = 50  # decoded in turn, so no answer is served from a cache


def _requests() -> list[bytes]:
    # Any certificate will do to encrypt to: the decode under test never opens the envelope.
    ca_key = rsa.generate_private_key(65537, 2048)
    ca = self_signed_signer(ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench")]))
    key = rsa.generate_private_key(65537, 2048)
    return [
        build_pkcs_req(
            key=key,
            ca_certs=[ca],
            challenge="bench",
            subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"after-hsm-{i}")]),
        ).der
        for i in range(DISTINCT_REQUESTS)
    ]


def _round(requests: list[bytes], sign: Callable[[], object], n: int, batch: int) -> list[float]:
    """Microseconds per decode: hot, after a sign, batched. The three modes take turns every
    `batch` decodes, so the box's drift (other tenants, frequency) falls on all three alike."""

    def decode(i: int) -> float:
        start = time.thread_time()
        decode_pki_message(requests[i % len(requests)])
        return time.thread_time() - start

    hot = after = batched = 0.0
    for first in range(0, n, batch):
        block = range(first, first + batch)
        decode(first)  # not counted: it follows the previous block's signs
        hot += sum(decode(i) for i in block)
        for i in block:
            after += decode(i)
            sign()
        batched += sum(decode(i) for i in block)
        for _ in block:
            sign()
    return [1e6 * t / n for t in (hot, after, batched)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decodes", type=int, default=320, help="per mode and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="decodes per batch of signs")
    parser.add_argument("--pin", type=int, metavar="CPU", help="run on this CPU only")
    args = parser.parse_args(argv)
    if args.decodes % args.batch:
        parser.error("--decodes must be a multiple of --batch")
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    requests = _requests()
    with tempfile.TemporaryDirectory(prefix="hsmscep-after-hsm-") as tmp:
        token = devtoken.ensure_token(Path(tmp))
        try:
            lib = open_library(token.module)
            pin = token.pin_file.read_text().strip()
            with lib.get_token(token_label=token.label).open(user_pin=pin) as session:
                _, private = session.generate_keypair(KeyType.RSA, 2048, store=False)

                def sign() -> object:
                    return private.sign(b"\x00" * 51, mechanism=Mechanism.SHA256_RSA_PKCS)

                rows = []
                for number in range(1, args.rounds + 1):
                    hot, after, batched = _round(requests, sign, args.decodes, args.batch)
                    rows.append((hot, after, batched))
                    print(
                        f"round {number}: hot {hot:.0f} us, after a sign {after:.0f} us "
                        f"(x{after / hot:.2f}), {args.batch} per {args.batch} signs "
                        f"{batched:.0f} us (x{batched / hot:.2f})"
                    )
        finally:
            close_library(token.module)
    after_ratio = statistics.median(a / h for h, a, _ in rows)
    batched_ratio = statistics.median(b / h for h, _, b in rows)
    print(f"median: after a sign x{after_ratio:.2f}, batched x{batched_ratio:.2f} of hot")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
