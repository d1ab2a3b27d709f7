"""The raw HSM ceiling: private-key operations/s on the token and keys a server instance uses.

One process per core, each with `threads` threads that own a session each (the first one
logged in, the others opened without a PIN, as login is per process and token), all started
together and looping for a fixed time. Operations are exactly the server's: CKM_RSA_PKCS sign
over a 51-byte SHA-256 DigestInfo, CKM_RSA_PKCS decrypt of a 256-byte ciphertext, CKM_ECDSA
over a 32-byte hash.

An enrollment needs an RA decrypt, a CA sign and an RA sign, so the enrollment ceiling is
1 / (1/ra_decrypt + 1/ra_sign + 1/ca_sign): ceiling/3 with an RSA-2048 CA.

  python -m bench.ceiling --softhsm2-conf .dev/softhsm2.conf --token hsmscep-dev \
      --pin "$(cat .dev/pin)" --ra-key hsmscep-ra --ca-key hsmscep-ca --scenario rsa2048
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.servers import HsmInfo
from hsmscep.hsm.devtoken import find_softhsm

SHA256_DIGEST_INFO_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")
MAX_OPS_PER_THREAD = 5_000_000  # a count bound on each loop, far above what time allows
START_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class OpResult:
    role: str  # "ra_decrypt", "ra_sign" or "ca_sign": its place in an enrollment
    op: str  # "rsa_sign", "rsa_decrypt" or "ec_sign"
    key_label: str
    ops_per_s: float
    ops: int
    processes: int
    threads_per_process: int
    seconds: float
    # Thread CPU time per operation (SoftHSM2 runs in-process, so this is the token's CPU):
    # what an enrollment's three calls cost the server's cores, load or not.
    cpu_us_per_op: float = 0.0


def _select_key(session: Any, op: str, label: str | None) -> Any:
    """The private key for `op`: by label, or the first key of the right type and usage."""
    from pkcs11 import Attribute, KeyType, ObjectClass

    attrs: dict[Any, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
    if label is not None:
        attrs[Attribute.LABEL] = label
    want_type = KeyType.EC if op == "ec_sign" else KeyType.RSA
    usage = Attribute.DECRYPT if op == "rsa_decrypt" else Attribute.SIGN
    for key in session.get_objects(attrs):
        if key.key_type == want_type and key[usage]:
            return key
    raise LookupError(f"no private key for {op} (label={label!r}) on the token")


def _payload(key: Any, op: str) -> bytes:
    from pkcs11 import Attribute

    digest = hashlib.sha256(b"hsmscep bench ceiling").digest()
    if op == "rsa_sign":
        return SHA256_DIGEST_INFO_PREFIX + digest
    if op == "ec_sign":
        return digest
    # SoftHSM exposes the modulus and exponent on the private object; build a ciphertext
    # with cryptography so the decrypt loop unwraps a real 32-byte CEK, as in a PKCSReq.
    n = int.from_bytes(key[Attribute.MODULUS], "big")
    e = int.from_bytes(key[Attribute.PUBLIC_EXPONENT], "big")
    public = rsa.RSAPublicNumbers(e, n).public_key()
    return public.encrypt(os.urandom(32), padding.PKCS1v15())


def _process_main(
    hsm: HsmInfo,
    op: str,
    label: str | None,
    threads: int,
    seconds: float,
    setup_lock: Any,
    barrier: Any,
    results: Any,
) -> None:
    """One benchmark process: report (label, ops, ops/s, CPU s), or ("error", message, 0, 0)."""
    try:
        results.put(_run_process(hsm, op, label, threads, seconds, setup_lock, barrier))
    except BaseException as exc:
        barrier.abort()  # release the other processes at once instead of after a timeout
        results.put(("error", f"{type(exc).__name__}: {exc}", 0.0, 0.0))


def _run_process(
    hsm: HsmInfo,
    op: str,
    label: str | None,
    threads: int,
    seconds: float,
    setup_lock: Any,
    barrier: Any,
) -> tuple[str, int, float, float]:
    os.environ["SOFTHSM2_CONF"] = hsm.softhsm2_conf
    from pkcs11 import Attribute, Mechanism

    from hsmscep.hsm.library import open_library  # initialises with CKF_OS_LOCKING_OK

    # One process at a time: SoftHSM2 processes that initialise, look up the token and log in
    # at the same moment intermittently get NoSuchToken or GeneralError (seen 2 in 30 runs).
    with setup_lock:
        lib = open_library(hsm.module)
        token = lib.get_token(token_label=hsm.token_label)
        sessions = [token.open(user_pin=hsm.pin)] + [token.open() for _ in range(threads - 1)]
        keys = [_select_key(s, op, label) for s in sessions]
        data = _payload(keys[0], op)
    mechanism = Mechanism.RSA_PKCS if op.startswith("rsa") else Mechanism.ECDSA
    counts = [0] * threads
    elapsed = [0.0] * threads
    cpu = [0.0] * threads

    def loop(i: int) -> None:
        key = keys[i]
        run = key.decrypt if op == "rsa_decrypt" else key.sign
        start = time.perf_counter()
        cpu_start = time.thread_time()
        deadline = start + seconds
        n = 0
        while n < MAX_OPS_PER_THREAD and time.perf_counter() < deadline:
            run(data, mechanism=mechanism)
            n += 1
        counts[i] = n
        elapsed[i] = time.perf_counter() - start
        cpu[i] = time.thread_time() - cpu_start

    barrier.wait(timeout=START_TIMEOUT)  # every process starts its loops at the same moment
    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=seconds + 60)
    key_label = str(keys[0][Attribute.LABEL])
    for s in reversed(sessions):  # the login session last: closing it logs the others out
        s.close()
    rate = sum(c / e for c, e in zip(counts, elapsed, strict=True) if e)
    return key_label, sum(counts), rate, sum(cpu)


def measure(
    hsm: HsmInfo,
    op: str,
    *,
    role: str = "",
    label: str | None = None,
    seconds: float = 3.0,
    processes: int | None = None,
    threads: int = 1,
) -> OpResult:
    """Total ops/s of `op` over `processes` (default: one per core) running at once."""
    processes = processes or os.cpu_count() or 1
    ctx = mp.get_context("spawn")  # python-pkcs11 state must never cross a fork
    setup_lock = ctx.Lock()
    barrier = ctx.Barrier(processes)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_process_main,
            args=(hsm, op, label, threads, seconds, setup_lock, barrier, results),
        )
        for _ in range(processes)
    ]
    for p in procs:
        p.start()
    got = []
    try:
        for _ in procs:
            got.append(results.get(timeout=START_TIMEOUT + seconds + 60))
        errors = {str(msg) for tag, msg, _, _ in got if tag == "error"}
        if errors:
            raise RuntimeError(f"ceiling {op}: " + "; ".join(sorted(errors)))
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    ops = sum(n for _, n, _, _ in got)
    return OpResult(
        role=role or op,
        op=op,
        key_label=got[0][0],
        ops_per_s=sum(rate for _, _, rate, _ in got),
        ops=ops,
        processes=processes,
        threads_per_process=threads,
        seconds=seconds,
        cpu_us_per_op=1e6 * sum(c for _, _, _, c in got) / ops if ops else 0.0,
    )


def measure_scenario(
    hsm: HsmInfo, scenario: str, *, seconds: float = 3.0, processes: int | None = None
) -> dict[str, Any]:
    """Each private-key operation of an enrollment on its own key, and the resulting ceiling."""
    plan = [
        ("ra_decrypt", "rsa_decrypt", hsm.ra_key_label),
        ("ra_sign", "rsa_sign", hsm.ra_key_label),
        ("ca_sign", "ec_sign" if scenario == "p256" else "rsa_sign", hsm.ca_key_label),
    ]
    results = [
        measure(hsm, op, role=role, label=label, seconds=seconds, processes=processes)
        for role, op, label in plan
    ]
    return {
        "operations": [asdict(r) for r in results],
        # One of each per enrollment, run back to back on all cores.
        "enrollments_per_s": 1.0 / sum(1.0 / r.ops_per_s for r in results),
        # The token's CPU in one enrollment: what the server spends inside the HSM calls.
        "hsm_cpu_ms_per_enrollment": sum(r.cpu_us_per_op for r in results) / 1000,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--softhsm2-conf", required=True)
    parser.add_argument("--module", default=None, help="PKCS#11 module (default: SoftHSM2)")
    parser.add_argument("--token", required=True, help="token label")
    parser.add_argument("--pin", required=True)
    parser.add_argument("--ra-key", default=None, help="RA key label (default: by usage)")
    parser.add_argument("--ca-key", default=None, help="CA key label (default: by type)")
    parser.add_argument("--scenario", choices=["rsa2048", "p256"], default="rsa2048")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--processes", type=int, default=None, help="default: one per core")
    args = parser.parse_args(argv)
    hsm = HsmInfo(
        args.module or find_softhsm(),
        os.path.abspath(args.softhsm2_conf),
        args.token,
        args.pin,
        args.ra_key,
        args.ca_key,
    )
    result = measure_scenario(hsm, args.scenario, seconds=args.seconds, processes=args.processes)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
