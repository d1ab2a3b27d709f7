"""Certificate serial numbers: unpredictable, and in issuance order.

A serial is the issuance time in milliseconds followed by 112 random bits. The random part is
what makes it unguessable (the CA/Browser Forum asks for at least 64 bits from a CSPRNG); the
time in front makes the stores' serial index grow at one end instead of at a random leaf, so an
insert touches the same few B-tree pages whether the store holds a thousand certificates or
millions (bench/PROFILE.md, "A million certificates"). The time it reveals is already in the
certificate's notBefore.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from datetime import UTC, datetime

RANDOM_BITS = 112
TIME_BITS = 44  # milliseconds since 1970 fit until the year 2527
# 156 bits: positive and at most 20 octets in DER (RFC 5280 4.1.2.2), sign octet included.
MAX_SERIAL = (1 << (TIME_BITS + RANDOM_BITS)) - 1


def ordered_serial(now: datetime, random_bits: Callable[[int], int] = secrets.randbits) -> int:
    """A serial number for a certificate issued at `now`: its millisecond, then 112 random
    bits (never zero, so no serial is 0 even at the epoch)."""
    millis = int(now.astimezone(UTC).timestamp() * 1000)
    if not 0 <= millis < 1 << TIME_BITS:
        raise ValueError(f"issuance time out of range for a serial number: {now.isoformat()}")
    return (millis << RANDOM_BITS) | random_bits(RANDOM_BITS) | 1
