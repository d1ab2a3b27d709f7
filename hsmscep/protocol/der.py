"""A small, bounded BER/DER reader for the request hot path. No I/O.

asn1crypto builds an object per node and costs most of a millisecond per pkiMessage; the
request decoders only need to walk a fixed shape and slice out bytes. This reader does
that with offsets into the original buffer, accepts BER (indefinite lengths, constructed
strings, non-minimal lengths, as Apple sends), bounds nesting without recursion, and raises
MessageError on anything malformed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple

from hsmscep.errors import MessageError

SEQUENCE = 0x30
SET = 0x31
INTEGER = 0x02
OCTET_STRING = 0x04
OID = 0x06
UTF8_STRING = 0x0C
PRINTABLE_STRING = 0x13
IA5_STRING = 0x16
MAX_DEPTH = 64


class Tlv(NamedTuple):
    """One element: its identifier octet and where its parts sit in the buffer."""

    tag: int
    start: int  # first header byte
    body: int  # first content byte
    body_end: int  # end of content (before an end-of-contents marker)
    end: int  # end of the element

    @property
    def constructed(self) -> bool:
        return bool(self.tag & 0x20)


def _header(data: bytes, pos: int, limit: int) -> tuple[int, int, int | None]:
    """Read identifier and length at pos: (tag, content start, length or None if indefinite)."""
    if pos + 2 > limit:
        raise MessageError("truncated DER header")
    tag = data[pos]
    if tag & 0x1F == 0x1F:
        raise MessageError("high tag numbers are not used in SCEP messages")
    first = data[pos + 1]
    pos += 2
    if first < 0x80:
        return tag, pos, first
    if first == 0x80:
        if not tag & 0x20:
            raise MessageError("indefinite length on a primitive element")
        return tag, pos, None
    count = first & 0x7F
    if count > 4 or pos + count > limit:
        raise MessageError("DER length out of range")
    length = int.from_bytes(data[pos : pos + count], "big")
    return tag, pos + count, length


def read(data: bytes, pos: int = 0, limit: int | None = None) -> Tlv:
    """Read the element starting at `pos`, which must end by `limit`."""
    limit = len(data) if limit is None else limit
    tag, body, length = _header(data, pos, limit)
    if length is not None:
        end = body + length
        if end > limit:
            raise MessageError("DER element runs past its container")
        return Tlv(tag, pos, body, end, end)
    # Indefinite length: walk nested elements with an explicit stack to find the EOC.
    cursor = body
    depth = 1
    while True:
        if cursor + 2 > limit:
            raise MessageError("unterminated indefinite-length element")
        if data[cursor] == 0 and data[cursor + 1] == 0:
            depth -= 1
            cursor += 2
            if depth == 0:
                return Tlv(tag, pos, body, cursor - 2, cursor)
            continue
        _, inner_body, inner_length = _header(data, cursor, limit)
        if inner_length is None:
            depth += 1
            if depth > MAX_DEPTH:
                raise MessageError("message nests too deeply")
            cursor = inner_body
        else:
            cursor = inner_body + inner_length
            if cursor > limit:
                raise MessageError("DER element runs past its container")


def children(data: bytes, tlv: Tlv) -> list[Tlv]:
    """The elements inside a constructed element."""
    if not tlv.tag & 0x20:
        raise MessageError("expected a constructed element")
    out: list[Tlv] = []
    append = out.append
    pos, limit = tlv.body, tlv.body_end
    new = tuple.__new__  # NamedTuple's own __new__ is a Python function: too slow here
    # This loop runs about a hundred times per request (a third of the pkiMessage decode):
    # definite lengths of low-tag elements are read inline, anything else goes through read().
    while pos < limit:
        tag = data[pos]
        if pos + 2 <= limit and tag & 0x1F != 0x1F:
            first = data[pos + 1]
            if first < 0x80:
                body = pos + 2
                end = body + first
            elif first == 0x81 and pos + 3 <= limit:
                body = pos + 3
                end = body + data[pos + 2]
            elif first == 0x82 and pos + 4 <= limit:
                body = pos + 4
                end = body + (data[pos + 2] << 8 | data[pos + 3])
            else:
                end = -1
            if end > limit:
                raise MessageError("DER element runs past its container")
            if end >= 0:
                append(new(Tlv, (tag, pos, body, end, end)))
                pos = end
                continue
        child = read(data, pos, limit)
        append(child)
        pos = child.end
    # Every element takes two bytes or more, so the loop is bounded by the buffer.
    if len(out) > 10_000:
        raise MessageError("too many elements")
    return out


def expect(data: bytes, tlv: Tlv, tag: int, what: str) -> Tlv:
    if tlv.tag != tag:
        raise MessageError(f"{what}: unexpected tag 0x{tlv.tag:02x}")
    return tlv


def value(data: bytes, tlv: Tlv) -> bytes:
    """Content octets; a constructed string (BER) is the concatenation of its segments."""
    if not tlv.constructed:
        return data[tlv.body : tlv.body_end]
    out = bytearray()
    stack = [tlv]
    while stack:
        node = stack.pop()
        if not node.constructed:
            out += data[node.body : node.body_end]
            continue
        if len(stack) > MAX_DEPTH:
            raise MessageError("string segments nest too deeply")
        stack.extend(reversed(children(data, node)))
    return bytes(out)


def raw(data: bytes, tlv: Tlv) -> bytes:
    return data[tlv.start : tlv.end]


def text(data: bytes, tlv: Tlv, what: str) -> str:
    """A PrintableString/UTF8String/IA5String value."""
    if tlv.tag & ~0x20 not in (PRINTABLE_STRING, UTF8_STRING, IA5_STRING):
        raise MessageError(f"{what} is not a string")
    try:
        return value(data, tlv).decode("utf-8")
    except UnicodeDecodeError:
        raise MessageError(f"{what} is not valid UTF-8") from None


def oid_bytes(data: bytes, tlv: Tlv, what: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER (compare against asn1.oid(...)[2:])."""
    return value(data, expect(data, tlv, OID, what))


@lru_cache(maxsize=256)  # four per request, nearly always the same few; bounded for strangers
def dotted(oid_content: bytes) -> str:
    """OID content octets to dotted form."""
    arcs: list[int] = []
    current = 0
    for byte in oid_content:
        current = (current << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(current)
            current = 0
    if not arcs:
        return ""
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in [first, arcs[0] - first * 40, *arcs[1:]])


def content_info(data: bytes, content_type: bytes, what: str) -> Tlv:
    """The content of a ContentInfo (RFC 5652 §3) that fills all of `data`."""
    if not data:
        raise MessageError(f"empty {what}")
    info = expect(data, read(data), SEQUENCE, "ContentInfo")
    if info.end != len(data):
        raise MessageError(f"trailing data after the {what}")
    parts = children(data, info)
    if len(parts) != 2 or oid_bytes(data, parts[0], "contentType") != content_type:
        raise MessageError(f"{what} has the wrong content type")
    wrapper = children(data, expect(data, parts[1], 0xA0, "content"))
    if len(wrapper) != 1:
        raise MessageError(f"malformed {what}")
    return wrapper[0]


@contextmanager
def malformed(what: str) -> Iterator[None]:
    """Turn any parsing accident into a MessageError that names `what`, never a 500."""
    try:
        yield
    except MessageError:
        raise
    except RecursionError:
        raise MessageError(f"{what} nests too deeply") from None
    except Exception:  # ValueError/IndexError/... from a shape we did not expect
        # The client gets what failed to parse, never a Python class name (robustness.md).
        raise MessageError(f"malformed {what}") from None
