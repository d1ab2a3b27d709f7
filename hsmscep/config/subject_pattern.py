r"""Parsing a template's `subject_pattern` (RFC 4514 with {ATTR} placeholders) and names of
subject attributes and OIDs in the config. The pattern's meaning: hsmscep.policy.template.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cryptography import x509

from hsmscep.errors import ConfigError
from hsmscep.policy.names import ATTRIBUTE_OIDS
from hsmscep.policy.template import PatternPart, SubjectPattern

_DOTTED_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-2](\.(0|[1-9][0-9]*))+")
_HEX = "0123456789abcdefABCDEF"


def parse_oid(text: str, key: str) -> x509.ObjectIdentifier:
    if not _DOTTED_OID.fullmatch(text):
        raise ConfigError(f"{key}: {text!r} is neither a known name nor a dotted OID")
    try:
        return x509.ObjectIdentifier(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: bad OID {text!r}: {exc}") from None


def attribute_oid(name: str, key: str) -> x509.ObjectIdentifier:
    oid = ATTRIBUTE_OIDS.get(name.casefold())
    if oid is not None:
        return oid
    if not _DOTTED_OID.fullmatch(name):
        raise ConfigError(f"{key}: unknown subject attribute {name!r}")
    return parse_oid(name, key)


def attribute_set(names: Sequence[str], key: str) -> frozenset[x509.ObjectIdentifier]:
    return frozenset(attribute_oid(name, key) for name in names)


def parse_subject_pattern(text: str, key: str) -> SubjectPattern:
    """Parse an RFC 4514 pattern with {ATTR} placeholders; ConfigError naming `key`."""
    if not text.strip():
        raise ConfigError(f"{key} is empty")
    rdns: list[tuple[tuple[x509.ObjectIdentifier, tuple[PatternPart, ...]], ...]] = []
    for rdn_text in _split_unescaped(text, ",", key):
        avas: list[tuple[x509.ObjectIdentifier, tuple[PatternPart, ...]]] = []
        for ava_text in _split_unescaped(rdn_text, "+", key):
            type_text, equals, value_text = ava_text.partition("=")
            if not equals or not type_text.strip():
                raise ConfigError(f"{key}: {ava_text.strip()!r} is not TYPE=value")
            oid = attribute_oid(type_text.strip(), key)
            parts = _parse_value(value_text.strip(), key)
            if all(isinstance(part, str) for part in parts):
                literal = "".join(str(part) for part in parts)
                try:
                    x509.NameAttribute(oid, literal)
                except ValueError as exc:
                    raise ConfigError(f"{key}: {type_text.strip()}={literal!r}: {exc}") from None
            avas.append((oid, parts))
        rdns.append(tuple(avas))
    # RFC 4514 writes the most specific RDN first; DER order is the reverse.
    return SubjectPattern(text, tuple(reversed(rdns)))


def _split_unescaped(text: str, separator: str, key: str) -> list[str]:
    pieces: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ConfigError(f"{key}: ends in a lone backslash")
            current.append(char + escaped)
        elif char == separator:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return pieces


def _parse_value(text: str, key: str) -> tuple[PatternPart, ...]:
    parts: list[PatternPart] = []
    literal = bytearray()  # UTF-8, so \XX hex escapes of multi-byte characters join up
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            pair = text[i + 1 : i + 3]
            if len(pair) == 2 and all(c in _HEX for c in pair):
                literal.append(int(pair, 16))
                i += 3
                continue
            if i + 1 == len(text):
                raise ConfigError(f"{key}: a value ends in a lone backslash")
            literal += text[i + 1].encode()
            i += 2
        elif char == "{":
            end = text.find("}", i)
            name = text[i + 1 : end] if end != -1 else ""
            if end == -1 or not _PLACEHOLDER_NAME.fullmatch(name):
                raise ConfigError(f"{key}: bad placeholder at {text[i:]!r}")
            if literal:
                parts.append(_decode_literal(literal, key))
                literal = bytearray()
            parts.append(attribute_oid(name, key))
            i = end + 1
        elif char == "}":
            raise ConfigError(f"{key}: unmatched '}}' in {text!r}")
        else:
            literal += char.encode()
            i += 1
    if literal:
        parts.append(_decode_literal(literal, key))
    if not parts:
        raise ConfigError(f"{key}: an attribute has an empty value")
    return tuple(parts)


def _decode_literal(raw: bytearray, key: str) -> str:
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: hex escapes are not UTF-8") from None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        raise ConfigError(f"{key}: control characters in a value")
    return text


def placeholders(pattern: SubjectPattern) -> set[x509.ObjectIdentifier]:
    return {
        part
        for rdn in pattern.rdns
        for _, parts in rdn
        for part in parts
        if isinstance(part, x509.ObjectIdentifier)
    }
