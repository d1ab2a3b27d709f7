"""Serial numbers: unpredictable, positive, at most 20 octets, and in issuance order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from asn1crypto.core import Integer

from hsmscep.policy.serials import MAX_SERIAL, RANDOM_BITS, ordered_serial

NOW = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)


def test_serial_fits_twenty_octets_and_is_positive() -> None:
    for _ in range(200):
        serial = ordered_serial(NOW)
        assert 0 < serial <= MAX_SERIAL
        assert len(Integer(serial).contents) <= 20  # DER, sign octet included


def test_later_millisecond_gives_larger_serial() -> None:
    earlier = [ordered_serial(NOW) for _ in range(50)]
    later = [ordered_serial(NOW + timedelta(milliseconds=1)) for _ in range(50)]
    assert max(earlier) < min(later)


def test_random_part_carries_at_least_64_unpredictable_bits() -> None:
    serials = {ordered_serial(NOW) for _ in range(1000)}
    assert len(serials) == 1000
    low = [s & ((1 << RANDOM_BITS) - 1) for s in serials]
    # Every one of the top 64 random bits takes both values across 1000 draws.
    for bit in range(RANDOM_BITS - 64, RANDOM_BITS):
        assert {(v >> bit) & 1 for v in low} == {0, 1}


def test_time_part_is_the_millisecond() -> None:
    serial = ordered_serial(NOW, random_bits=lambda n: 0)
    assert serial >> RANDOM_BITS == int(NOW.timestamp() * 1000)


def test_time_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ordered_serial(datetime(1969, 12, 31, tzinfo=UTC))
