r"""Reading a certificate template from its TOML table (what it means: hsmscep.policy.template).

A template only narrows what `issuance.check_csr` accepts (RSA >= 2048 bits, EC P-256/P-384,
no CA, at most MAX_SANS SANs, a sane subject): `apply_template` runs on a request that
already passed those baseline checks, so no template can let an RSA 1024 key through.

A profile's template is the TOML table `[profiles.<name>.template]`; every key is optional
and a missing key keeps the value of the defaults (DEFAULT_TEMPLATE, or the server-wide
template built from `[enroll] validity_days`). DEFAULT_TEMPLATE issues what hsmscep always
issued: 365 days, clientAuth, the CSR's subject and SANs, sha256.

Keys (type; default): meaning

validity_days        integer 1..36500; 365
                     certificate lifetime in days (never past the CA's notAfter)
key_usage            list of names; by key type
                     digitalSignature, nonRepudiation (= contentCommitment),
                     keyEncipherment, dataEncipherment, keyAgreement, encipherOnly and
                     decipherOnly (these two need keyAgreement), set as given whatever the
                     key type. Unset: digitalSignature + keyEncipherment for RSA keys,
                     digitalSignature for EC keys
extended_key_usage   list of names or dotted OIDs; ["clientAuth"]
                     clientAuth, serverAuth, codeSigning, emailProtection, timeStamping,
                     OCSPSigning, ipsecIKE, smartcardLogon, anyExtendedKeyUsage, or an OID
                     such as "1.3.6.1.5.5.7.3.21". A renewal keeps the replaced
                     certificate's EKU
subject_mode         "keep" or "rewrite"; "keep"
                     keep the CSR's subject, or build it from subject_pattern
subject_pattern      string; none (required with "rewrite", refused with "keep")
                     an RFC 4514 name, most specific first: "CN={CN},OU={OU},O=Example
                     Corp". {ATTR} takes the value of that attribute in the CSR's subject,
                     which must carry it exactly once (else badRequest). Escapes: \, \+ \=
                     \\ \{ \} and \XX (hex, UTF-8)
subject_required     list of attribute names; []
                     the CSR's subject must carry each
subject_forbidden    list of attribute names; []
                     the CSR's subject must carry none
subject_patterns     table attribute name -> regex; {}
                     every value of that attribute in the CSR's subject must match
san_types            list of SAN types; any type
                     the SAN types allowed: dns, ip, email, uri, upn, othername (other than
                     UPN), dirname, rid; a SAN of another type is refused
san_patterns         table SAN type -> regex; {}
                     for dns, ip, email, uri, upn: every SAN of that type must match
max_sans             integer 0..64; 64
                     at most this many SANs
san_required         boolean; false
                     at least one SAN
key_types            list; ["rsa", "p256", "p384"]
                     client key types accepted: rsa, p256, p384
min_rsa_bits         integer 2048..16384; 2048
                     smallest RSA key accepted
signature_hash       "sha256", "sha384" or "sha512"; "sha256"
                     hash of the CA's signature on the certificate

Attribute names (case-insensitive): CN, C, L, ST, O, OU, STREET, DC, UID, emailAddress,
serialNumber, SN (surname), GN (givenName), title, initials, pseudonym, dnQualifier,
postalCode, businessCategory, generationQualifier, or a dotted OID. Regexes are Python `re`
syntax, matched against the whole value and case-sensitively (use `(?i)` to ignore case);
IP addresses are matched in their usual text form (`10.1.2.3`, `2001:db8::1`).

Subject rules (`subject_required`, `subject_forbidden`, `subject_patterns`) look at the
subject the client asked for, before any rewrite. The SAN rules check the CSR's SANs; SANs an
authorization webhook sets (`with_overrides`) are trusted and only held to MAX_SANS.

(Past 300 lines by this reference only: the operator's documentation of the table.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsmscep.config.reader import TableReader, did_you_mean
from hsmscep.config.subject_pattern import (
    attribute_oid,
    attribute_set,
    parse_oid,
    parse_subject_pattern,
    placeholders,
)
from hsmscep.errors import ConfigError
from hsmscep.policy.names import PATTERN_SAN_TYPES, SAN_TYPES, attribute_name
from hsmscep.policy.template import (
    DEFAULT_TEMPLATE,
    KEY_TYPES,
    MAX_RSA_BITS,
    MAX_SANS,
    MAX_VALIDITY_DAYS,
    CertTemplate,
    SignatureHash,
    SubjectPattern,
)

_SIGNATURE_HASHES: dict[str, SignatureHash] = {
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}
_EKU_NAMES = {
    name.casefold(): oid
    for name, oid in (
        ("clientAuth", ExtendedKeyUsageOID.CLIENT_AUTH),
        ("serverAuth", ExtendedKeyUsageOID.SERVER_AUTH),
        ("codeSigning", ExtendedKeyUsageOID.CODE_SIGNING),
        ("emailProtection", ExtendedKeyUsageOID.EMAIL_PROTECTION),
        ("timeStamping", ExtendedKeyUsageOID.TIME_STAMPING),
        ("OCSPSigning", ExtendedKeyUsageOID.OCSP_SIGNING),
        ("ipsecIKE", ExtendedKeyUsageOID.IPSEC_IKE),
        ("smartcardLogon", ExtendedKeyUsageOID.SMARTCARD_LOGON),
        ("anyExtendedKeyUsage", ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE),
    )
}
# TOML name -> keyword of x509.KeyUsage.
_KEY_USAGE_NAMES = {
    "digitalsignature": "digital_signature",
    "nonrepudiation": "content_commitment",
    "contentcommitment": "content_commitment",
    "keyencipherment": "key_encipherment",
    "dataencipherment": "data_encipherment",
    "keyagreement": "key_agreement",
    "encipheronly": "encipher_only",
    "decipheronly": "decipher_only",
}
_CA_KEY_USAGES = {"keycertsign", "crlsign"}


_KEYS = (
    "validity_days",
    "key_usage",
    "extended_key_usage",
    "subject_mode",
    "subject_pattern",
    "subject_required",
    "subject_forbidden",
    "subject_patterns",
    "san_types",
    "san_patterns",
    "max_sans",
    "san_required",
    "key_types",
    "min_rsa_bits",
    "signature_hash",
)


def parse_template(
    table: Mapping[str, Any], where: str, defaults: CertTemplate = DEFAULT_TEMPLATE
) -> CertTemplate:
    """A template from its TOML table; missing keys keep `defaults`.

    `where` is the table's dotted name (e.g. "profiles.wifi.template"): every ConfigError
    names the full key.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    for key in table:
        if key not in _KEYS:
            raise ConfigError(
                f"{where}.{key}: unknown key (known: {', '.join(_KEYS)})"
                + did_you_mean(key, _KEYS, f"{where}.{{}}")
            )
    reader = TableReader(table, where)
    t = defaults

    days = reader.integer("validity_days", 1, MAX_VALIDITY_DAYS)
    if days is not None:
        t = replace(t, validity=timedelta(days=days))
    key_usage = reader.names("key_usage")
    if key_usage is not None:
        t = replace(t, key_usage=_key_usage(key_usage, reader.key("key_usage")))
    eku = reader.names("extended_key_usage")
    if eku is not None:
        t = replace(t, extended_key_usage=_eku(eku, reader.key("extended_key_usage")))
    t = replace(t, subject_rewrite=_subject_rewrite(reader, t.subject_rewrite))

    required = reader.names("subject_required")
    if required is not None:
        t = replace(t, subject_required=attribute_set(required, reader.key("subject_required")))
    forbidden = reader.names("subject_forbidden")
    if forbidden is not None:
        key = reader.key("subject_forbidden")
        t = replace(t, subject_forbidden=attribute_set(forbidden, key))
    both = t.subject_required & t.subject_forbidden
    if both:
        names = ", ".join(sorted(attribute_name(oid) for oid in both))
        raise ConfigError(f"{reader.key('subject_forbidden')}: {names} also required")
    patterns = reader.regexes("subject_patterns")
    if patterns is not None:
        key = reader.key("subject_patterns")
        t = replace(
            t,
            subject_patterns=tuple(
                (attribute_oid(name, f"{key}.{name}"), regex) for name, regex in patterns
            ),
        )
        oids = [oid for oid, _ in t.subject_patterns]
        if len(set(oids)) != len(oids):
            raise ConfigError(f"{key}: an attribute has two patterns")
    if t.subject_rewrite is not None:
        clash = sorted(
            attribute_name(o) for o in placeholders(t.subject_rewrite) & t.subject_forbidden
        )
        if clash:
            raise ConfigError(
                f"{reader.key('subject_pattern')}: uses {', '.join(clash)},"
                f" which subject_forbidden refuses"
            )

    san_types = reader.names("san_types")
    if san_types is not None:
        t = replace(
            t, san_types=_choices(san_types, SAN_TYPES, reader.key("san_types"), "SAN type")
        )
    san_patterns = reader.regexes("san_patterns")
    if san_patterns is not None:
        key = reader.key("san_patterns")
        for kind, _ in san_patterns:
            if kind not in PATTERN_SAN_TYPES:
                raise ConfigError(
                    f"{key}.{kind}: patterns are for {', '.join(PATTERN_SAN_TYPES)} only"
                )
        t = replace(t, san_patterns=tuple(san_patterns))
    if t.san_types is not None:
        for kind, _ in t.san_patterns:
            if kind not in t.san_types:
                raise ConfigError(
                    f"{reader.key('san_patterns')}.{kind}: {kind} is not in san_types"
                )
    max_sans = reader.integer("max_sans", 0, MAX_SANS)
    if max_sans is not None:
        t = replace(t, max_sans=max_sans)
    san_required = reader.boolean("san_required")
    if san_required is not None:
        t = replace(t, san_required=san_required)
    if t.san_required and (t.max_sans == 0 or t.san_types == frozenset()):
        raise ConfigError(f"{reader.key('san_required')}: no SAN is allowed")

    key_types = reader.names("key_types")
    if key_types is not None:
        key = reader.key("key_types")
        chosen = _choices(key_types, KEY_TYPES, key, "key type")
        if not chosen:
            raise ConfigError(f"{key} must name at least one key type")
        t = replace(t, key_types=chosen)
    min_rsa_bits = reader.integer("min_rsa_bits", 2048, MAX_RSA_BITS)
    if min_rsa_bits is not None:
        t = replace(t, min_rsa_bits=min_rsa_bits)
    signature_hash = reader.string("signature_hash")
    if signature_hash is not None:
        if signature_hash not in _SIGNATURE_HASHES:
            raise ConfigError(
                f"{reader.key('signature_hash')}: unknown hash {signature_hash!r}"
                f" (one of {', '.join(_SIGNATURE_HASHES)})"
            )
        t = replace(t, signature_hash=_SIGNATURE_HASHES[signature_hash])
    return t


def _choices(values: Sequence[str], known: Sequence[str], key: str, what: str) -> frozenset[str]:
    chosen: set[str] = set()
    for value in values:
        folded = value.casefold()
        if folded not in known:
            raise ConfigError(f"{key}: unknown {what} {value!r} (one of {', '.join(known)})")
        if folded in chosen:
            raise ConfigError(f"{key}: {value!r} listed twice")
        chosen.add(folded)
    return frozenset(chosen)


def _key_usage(names: Sequence[str], key: str) -> x509.KeyUsage:
    if not names:
        raise ConfigError(f"{key} must name at least one key usage")
    flags = dict.fromkeys(_KEY_USAGE_NAMES.values(), False)
    for name in names:
        folded = name.casefold()
        if folded in _CA_KEY_USAGES:
            raise ConfigError(f"{key}: {name} is for CA certificates, which SCEP never issues")
        usage = _KEY_USAGE_NAMES.get(folded)
        if usage is None:
            raise ConfigError(f"{key}: unknown key usage {name!r}")
        flags[usage] = True
    if (flags["encipher_only"] or flags["decipher_only"]) and not flags["key_agreement"]:
        raise ConfigError(f"{key}: encipherOnly and decipherOnly need keyAgreement")
    return x509.KeyUsage(key_cert_sign=False, crl_sign=False, **flags)


def _eku(names: Sequence[str], key: str) -> x509.ExtendedKeyUsage:
    if not names:
        raise ConfigError(f"{key} must name at least one extended key usage")
    oids: list[x509.ObjectIdentifier] = []
    for name in names:
        oid = _EKU_NAMES.get(name.casefold()) or parse_oid(name, key)
        if oid in oids:
            raise ConfigError(f"{key}: {name!r} listed twice")
        oids.append(oid)
    return x509.ExtendedKeyUsage(oids)


def _subject_rewrite(
    reader: TableReader, inherited: SubjectPattern | None
) -> SubjectPattern | None:
    mode = reader.string("subject_mode")
    text = reader.string("subject_pattern")
    if mode is not None and mode not in ("keep", "rewrite"):
        raise ConfigError(f'{reader.key("subject_mode")} must be "keep" or "rewrite"')
    if mode == "keep":
        if text is not None:
            raise ConfigError(f'{reader.key("subject_pattern")} needs subject_mode = "rewrite"')
        return None
    if mode == "rewrite":
        if text is None:
            if inherited is None:
                raise ConfigError(f'{reader.key("subject_pattern")} is required for "rewrite"')
            return inherited
        return parse_subject_pattern(text, reader.key("subject_pattern"))
    if text is not None:
        if inherited is None:
            raise ConfigError(f'{reader.key("subject_pattern")} needs subject_mode = "rewrite"')
        return parse_subject_pattern(text, reader.key("subject_pattern"))
    return inherited
