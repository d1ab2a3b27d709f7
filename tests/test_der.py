"""protocol.der against asn1crypto's parser: the same verdict and the same tree on every input.

Inputs: the shared golden vectors, seeded random BER/DER (nested SEQUENCE/SET, INTEGER, OCTET
STRING, OID, BOOLEAN, NULL, strings, context-tagged explicit and implicit, long-form and
non-minimal lengths, indefinite lengths, constructed strings), and corruptions of both
(truncation, a length off by one, a bad tag, an indefinite length). Where both parsers accept,
every element must have the same header, content and end-of-contents trailer. Counts are fixed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import NamedTuple

import pytest
from asn1crypto import core, parser

from hsmscep.errors import MessageError
from hsmscep.protocol import asn1, der

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "smallstep-scep"
VECTOR_FILES = sorted(VECTORS.rglob("*.der")) if VECTORS.is_dir() else []
SEEDS = range(40)  # documents per seed below; a failure names its seed and corruption
DOCUMENTS_PER_SEED = 10
CORRUPTIONS_PER_DOCUMENT = 12
CORRUPTIONS_PER_VECTOR = 150
WALK_LIMIT = 200  # deeper than any input here; both walkers stop alike beyond it


class Node(NamedTuple):
    """One element as a parser saw it."""

    header: bytes  # identifier and length octets
    content: bytes  # without the end-of-contents octets of an indefinite length
    trailer: bytes  # b"\0\0" for an indefinite length, else b""
    children: tuple[Node, ...] | None  # None for a primitive element


class TooDeep(Exception):
    pass


# ---- the two parsers, walked to the leaves ------------------------------------------------------


def ours(data: bytes) -> Node | None:
    """der.read on the whole input (trailing bytes refused), der.children below; None if refused."""
    try:
        top = der.read(data)
        if top.end != len(data):
            return None
        return _our_node(data, top, 0)
    except MessageError:
        return None


def _our_node(data: bytes, tlv: der.Tlv, depth: int) -> Node:
    if depth > WALK_LIMIT:
        raise TooDeep
    children = None
    if tlv.constructed:
        children = tuple(_our_node(data, c, depth + 1) for c in der.children(data, tlv))
    return Node(
        data[tlv.start : tlv.body],
        data[tlv.body : tlv.body_end],
        data[tlv.body_end : tlv.end],
        children,
    )


def theirs(data: bytes) -> Node | None:
    """asn1crypto.parser.parse(strict=True), recursing into every constructed element."""
    try:
        return _their_node(parser.parse(data, strict=True), 0)
    except ValueError:
        return None


def _their_node(info: tuple[int, int, int, bytes, bytes, bytes], depth: int) -> Node:
    if depth > WALK_LIMIT:
        raise TooDeep
    _, constructed, _, header, content, trailer = info
    children = None
    if constructed:
        found = []
        rest = content
        while rest:
            size = parser.peek(rest)
            found.append(_their_node(parser.parse(rest[:size], strict=True), depth + 1))
            rest = rest[size:]
        children = tuple(found)
    return Node(header, content, trailer, children)


def _headers(node: Node) -> Iterator[bytes]:
    yield node.header
    for child in node.children or ():
        yield from _headers(child)


def _outside_our_subset(node: Node) -> bool:
    # Deliberate limits of der.py, which only reads what SCEP messages contain: no high tag
    # numbers, at most four length octets. asn1crypto accepts both.
    return any(h[0] & 0x1F == 0x1F or (h[1] & 0x80 and h[1] & 0x7F > 4) for h in _headers(node))


def assert_same(data: bytes, what: str) -> Node | None:
    """Both accept with identical trees, or both refuse; returns the accepted tree."""
    try:
        mine, reference = ours(data), theirs(data)
    except TooDeep:
        pytest.fail(f"{what}: nests deeper than {WALK_LIMIT}; make the input smaller")
    if reference is not None and _outside_our_subset(reference):
        assert mine is None, f"{what}: der.py accepted a high tag or a >4-octet length"
        return None
    assert (mine is None) == (reference is None), (
        f"{what}: der.py {'accepts' if mine else 'refuses'}, "
        f"asn1crypto {'accepts' if reference else 'refuses'}: {data.hex()}"
    )
    assert mine == reference, f"{what}: the parsers disagree on {data.hex()}"
    return mine


# ---- random BER/DER -----------------------------------------------------------------------------


class Encoded(NamedTuple):
    der: bytes
    kind: str  # what the generator meant, for the value checks
    value: object


def _length(rng: random.Random, size: int) -> bytes:
    """Minimal most of the time; otherwise long form with up to four octets (non-minimal BER)."""
    minimal = bytes((size,)) if size < 0x80 else _long(size, (size.bit_length() + 7) // 8)
    if rng.random() < 0.8:
        return minimal
    octets = rng.randint(max(1, (size.bit_length() + 7) // 8), 4)
    return _long(size, octets)


def _long(size: int, octets: int) -> bytes:
    return bytes((0x80 | octets,)) + size.to_bytes(octets, "big")


def _tlv(rng: random.Random, tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + _length(rng, len(content)) + content


def _constructed(rng: random.Random, tag: int, parts: list[bytes], indefinite: bool) -> bytes:
    if indefinite:  # BER, as Apple's clients send it
        return bytes((tag, 0x80)) + b"".join(parts) + b"\x00\x00"
    return _tlv(rng, tag, b"".join(parts))


def _oid(rng: random.Random) -> tuple[bytes, str]:
    first = rng.choice((0, 1, 2))
    arcs = [first, rng.randint(0, 39) if first < 2 else rng.randint(0, 200)]
    arcs += [rng.choice((rng.randint(0, 127), rng.randint(0, 2**32), rng.randint(0, 2**70)))
             for _ in range(rng.randint(0, 6))]  # fmt: skip
    dotted = ".".join(map(str, arcs))
    return asn1.oid_content(dotted), dotted  # asn1crypto checks what our encoder wrote


def generate(rng: random.Random, depth: int = 0, indefinite_depth: int = 0) -> Encoded:
    """One random element; constructed ones nest up to six levels."""
    leaf = depth >= 6 or rng.random() < 0.45
    if leaf:
        kind = rng.choice(("integer", "octets", "oid", "boolean", "null", "string", "implicit"))
        if kind == "integer":
            n = rng.choice((0, -1, 127, 128, -129, rng.randint(-(2**300), 2**300)))
            return Encoded(
                _tlv(rng, 0x02, n.to_bytes(n.bit_length() // 8 + 1, "big", signed=True)), kind, n
            )
        if kind == "octets":
            payload = rng.randbytes(rng.choice((0, 1, 5, 127, 128, 200, 256, 300, 700)))
            if indefinite_depth < 6 and rng.random() < 0.2:  # constructed, segmented (BER)
                cuts = sorted(rng.sample(range(len(payload) + 1), k=min(3, len(payload) + 1)))
                bounds = [0, *cuts, len(payload)]
                parts = [_tlv(rng, 0x04, payload[a:b]) for a, b in pairwise(bounds)]
                return Encoded(_constructed(rng, 0x24, parts, rng.random() < 0.6), kind, payload)
            return Encoded(_tlv(rng, 0x04, payload), kind, payload)
        if kind == "oid":
            body, dotted = _oid(rng)
            return Encoded(_tlv(rng, 0x06, body), kind, dotted)
        if kind == "boolean":
            flag = rng.random() < 0.5
            return Encoded(_tlv(rng, 0x01, b"\xff" if flag else b"\x00"), kind, flag)
        if kind == "null":
            return Encoded(_tlv(rng, 0x05, b""), kind, None)
        if kind == "string":
            text = "".join(
                rng.choice("SCEP test 0123 '()+,-./:=?") for _ in range(rng.randint(0, 40))
            )
            return Encoded(_tlv(rng, rng.choice((0x13, 0x0C, 0x16)), text.encode()), kind, text)
        payload = rng.randbytes(rng.randint(0, 150))  # [n] IMPLICIT, primitive
        return Encoded(_tlv(rng, 0x80 | rng.randint(0, 30), payload), kind, payload)
    kind = rng.choice(("sequence", "set", "explicit", "implicit-constructed"))
    indefinite = indefinite_depth < 6 and rng.random() < 0.25
    inner = indefinite_depth + indefinite
    if kind == "explicit":  # [n] EXPLICIT: exactly one element inside
        parts = [generate(rng, depth + 1, inner).der]
        tag = 0xA0 | rng.randint(0, 30)
    else:
        parts = [generate(rng, depth + 1, inner).der for _ in range(rng.randint(0, 5))]
        tag = {"sequence": 0x30, "set": 0x31}.get(kind, 0xA0 | rng.randint(0, 30))
    return Encoded(_constructed(rng, tag, parts, indefinite), kind, None)


def generate_document(rng: random.Random) -> bytes:
    # A SEQUENCE at the top, like every message we parse, with a few of everything inside.
    parts = [generate(rng, 1).der for _ in range(rng.randint(1, 6))]
    return _constructed(rng, 0x30, parts, rng.random() < 0.2)


# ---- corruptions --------------------------------------------------------------------------------


def _elements(data: bytes) -> list[der.Tlv]:
    """Every element of an input der.py accepts, in document order."""
    found: list[der.Tlv] = []
    todo = [der.read(data)]
    while todo:
        tlv = todo.pop()
        found.append(tlv)
        if tlv.constructed:
            todo.extend(reversed(der.children(data, tlv)))
    return found


def corruptions(rng: random.Random, data: bytes, count: int) -> Iterator[tuple[str, bytes]]:
    """`count` damaged copies of `data` (which both parsers accept), each named."""
    elements = _elements(data)
    for _ in range(count):
        tlv = rng.choice(elements)
        head, length_at = tlv.start, tlv.start + 1
        length_octets = data[length_at : tlv.body]
        how = rng.choice(("truncate", "length", "tag", "indefinite", "drop-eoc"))
        if how == "truncate":
            cut = rng.choice((rng.randrange(len(data)), tlv.body, tlv.end - 1, len(data) - 1))
            yield f"truncated at {cut}", data[:cut]
        elif how == "length":
            if length_octets == b"\x80":
                continue
            delta = rng.choice((-1, 1))
            if len(length_octets) == 1:
                new = length_octets[0] + delta
                if not 0 <= new < 0x80:
                    continue
                changed = bytes((new,))
            else:
                size = int.from_bytes(length_octets[1:], "big") + delta
                if size < 0:
                    continue
                changed = length_octets[:1] + size.to_bytes(len(length_octets) - 1, "big")
            yield f"length {delta:+d} at {head}", data[:length_at] + changed + data[tlv.body :]
        elif how == "tag":
            tag = data[head]
            new_tag = rng.choice((tag ^ 0x20, tag | 0x1F, 0x00, rng.randrange(256)))
            yield (
                f"tag 0x{tag:02x}->0x{new_tag:02x} at {head}",
                (data[:head] + bytes((new_tag,)) + data[head + 1 :]),
            )
        elif how == "indefinite":
            # The length octets become 0x80 with nothing else changed: a primitive element is
            # then invalid, a constructed one loses its end (or finds a stray one).
            yield f"indefinite at {head}", data[:length_at] + b"\x80" + data[tlv.body :]
        elif tlv.end - tlv.body_end == 2:
            yield (
                f"end-of-contents dropped at {tlv.body_end}",
                (data[: tlv.body_end] + data[tlv.end :]),
            )


# ---- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_random_der_agrees(seed: int) -> None:
    rng = random.Random(seed)
    for n in range(DOCUMENTS_PER_SEED):
        data = generate_document(rng)
        assert assert_same(data, f"seed {seed} document {n}") is not None, data.hex()
        for what, damaged in corruptions(rng, data, CORRUPTIONS_PER_DOCUMENT):
            assert_same(damaged, f"seed {seed} document {n}, {what}")


@pytest.mark.parametrize("seed", range(10))
def test_random_values_agree(seed: int) -> None:
    # Beyond the tree: der.value (strings, segmented in BER) and der.dotted (OIDs) read the
    # same values asn1crypto's typed classes do.
    rng = random.Random(1000 + seed)
    checked = 0
    while checked < 200:
        item = generate(rng, depth=6)  # a leaf
        tlv = der.read(item.der)
        if item.kind == "octets":
            assert der.value(item.der, tlv) == item.value
            # asn1crypto joins segments only under an indefinite length; with a definite one
            # it refuses the constructed form, so the generator's payload is the reference.
            if item.der[0] == 0x04 or item.der[1] == 0x80:
                assert core.OctetString.load(item.der, strict=True).native == item.value
        elif item.kind == "oid":
            assert der.dotted(der.oid_bytes(item.der, tlv, "oid")) == item.value
            assert core.ObjectIdentifier.load(item.der, strict=True).dotted == item.value
        elif item.kind == "string":
            assert der.text(item.der, tlv, "string") == item.value
            assert core.load(item.der, strict=True).native == item.value
        elif item.kind == "integer":
            assert core.Integer.load(item.der, strict=True).native == item.value
            assert int.from_bytes(der.value(item.der, tlv), "big", signed=True) == item.value
        checked += 1


@pytest.mark.skipif(not VECTOR_FILES, reason=f"shared test vectors not found at {VECTORS} "
                    "(clone ../shared beside the repo)")  # fmt: skip
@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_shared_vectors_agree(path: Path) -> None:
    data = path.read_bytes()
    tree = assert_same(data, path.name)
    assert tree is not None and tree.children, f"{path.name} should parse"
    rng = random.Random(path.name)
    for what, damaged in corruptions(rng, data, CORRUPTIONS_PER_VECTOR):
        assert_same(damaged, f"{path.name}, {what}")


def test_hand_picked_edges_agree() -> None:
    cases = {
        "empty": b"",
        "one byte": b"\x30",
        "primitive indefinite": b"\x04\x80\x00\x00",
        "indefinite without end": b"\x30\x80\x05\x00",
        "nested indefinite": b"\x30\x80\x31\x80\x05\x00\x00\x00\x00\x00",
        "non-minimal length": b"\x30\x84\x00\x00\x00\x02\x05\x00",
        "zero-length long form": b"\x04\x81\x00",
        "length past end": b"\x30\x03\x05\x00",
        "trailing byte": b"\x05\x00\x00",
        "end-of-contents inside definite": b"\x30\x02\x00\x00",
        "child runs past parent": b"\x30\x03\x04\x05\x00",
    }
    for what, data in cases.items():
        assert_same(data, what)
    # The deliberate limits: der.py refuses, asn1crypto would read them.
    assert ours(b"\x1f\x81\x00\x00") is None and theirs(b"\x1f\x81\x00\x00") is not None
    five = b"\x04\x85\x00\x00\x00\x00\x01\xaa"
    assert ours(five) is None and theirs(five) is not None


@pytest.mark.parametrize("size", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000])
def test_tlv_lengths_at_every_form_boundary(size: int) -> None:
    # tlv writes short lengths inline; every form must equal der_length's encoding.
    content = b"\x00" * size
    assert asn1.tlv(0x04, content) == b"\x04" + asn1.der_length(size) + content
    assert parser.parse(asn1.tlv(0x04, content))[4] == content
