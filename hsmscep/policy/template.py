r"""Certificate templates: what a profile accepts and what its certificates look like. No I/O.

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
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Literal

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hsmscep.errors import ConfigError, Rejected
from hsmscep.policy.request import CertRequest
from hsmscep.protocol import asn1
from hsmscep.protocol.codes import FailInfo

MAX_SANS = 64  # hard cap of every request, template and webhook override
MAX_SUBJECT_BYTES = 2048
MAX_VALIDITY_DAYS = 36500
MAX_RSA_BITS = 16384
KEY_TYPES = ("rsa", "p256", "p384")
SAN_TYPES = ("dns", "ip", "email", "uri", "upn", "othername", "dirname", "rid")
# The SAN types whose value is text a regex can match.
PATTERN_SAN_TYPES = ("dns", "ip", "email", "uri", "upn")
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

SignatureHash = Literal["sha256", "sha384", "sha512"]
_SIGNATURE_HASHES: dict[str, SignatureHash] = {
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
}
# A piece of a subject pattern value: literal text, or the attribute a placeholder names.
PatternPart = str | x509.ObjectIdentifier


@dataclass(frozen=True, slots=True)
class SubjectPattern:
    """A parsed `subject_pattern`: RDNs in DER order, each a tuple of (type, value parts)."""

    text: str
    rdns: tuple[tuple[tuple[x509.ObjectIdentifier, tuple[PatternPart, ...]], ...], ...]


@dataclass(frozen=True, slots=True)
class CertTemplate:
    """A profile's certificate template; the defaults are DEFAULT_TEMPLATE.

    Key types are `key_types` (a subset of KEY_TYPES) plus `min_rsa_bits` for "rsa": the
    curve is the EC key's whole strength, an RSA key's is its size.
    """

    validity: timedelta = timedelta(days=365)
    key_usage: x509.KeyUsage | None = None  # None: by key type, as issuance always did
    extended_key_usage: x509.ExtendedKeyUsage = field(
        default_factory=lambda: x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
    )
    subject_rewrite: SubjectPattern | None = None  # None: keep the CSR's subject
    subject_required: frozenset[x509.ObjectIdentifier] = frozenset()
    subject_forbidden: frozenset[x509.ObjectIdentifier] = frozenset()
    subject_patterns: tuple[tuple[x509.ObjectIdentifier, re.Pattern[str]], ...] = ()
    san_types: frozenset[str] | None = None  # None: any type
    san_patterns: tuple[tuple[str, re.Pattern[str]], ...] = ()
    max_sans: int = MAX_SANS
    san_required: bool = False
    key_types: frozenset[str] = frozenset(KEY_TYPES)
    min_rsa_bits: int = 2048
    signature_hash: SignatureHash = "sha256"


DEFAULT_TEMPLATE = CertTemplate()


# ---- names ------------------------------------------------------------------------------

# The first name of an OID is the one refusal reasons use.
_ATTRIBUTE_NAMES: tuple[tuple[str, x509.ObjectIdentifier], ...] = (
    ("CN", NameOID.COMMON_NAME),
    ("C", NameOID.COUNTRY_NAME),
    ("L", NameOID.LOCALITY_NAME),
    ("ST", NameOID.STATE_OR_PROVINCE_NAME),
    ("O", NameOID.ORGANIZATION_NAME),
    ("OU", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("STREET", NameOID.STREET_ADDRESS),
    ("DC", NameOID.DOMAIN_COMPONENT),
    ("UID", NameOID.USER_ID),
    ("emailAddress", NameOID.EMAIL_ADDRESS),
    ("serialNumber", NameOID.SERIAL_NUMBER),
    ("SN", NameOID.SURNAME),
    ("surname", NameOID.SURNAME),
    ("GN", NameOID.GIVEN_NAME),
    ("givenName", NameOID.GIVEN_NAME),
    ("title", NameOID.TITLE),
    ("initials", NameOID.INITIALS),
    ("pseudonym", NameOID.PSEUDONYM),
    ("dnQualifier", NameOID.DN_QUALIFIER),
    ("postalCode", NameOID.POSTAL_CODE),
    ("businessCategory", NameOID.BUSINESS_CATEGORY),
    ("generationQualifier", NameOID.GENERATION_QUALIFIER),
)
_ATTRIBUTES = {name.casefold(): oid for name, oid in _ATTRIBUTE_NAMES}
_ATTRIBUTE_DISPLAY: dict[x509.ObjectIdentifier, str] = {}
for _attribute_name, _attribute_oid in _ATTRIBUTE_NAMES:
    _ATTRIBUTE_DISPLAY.setdefault(_attribute_oid, _attribute_name)

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
_CURVE_KEY_TYPES = {"secp256r1": "p256", "secp384r1": "p384"}
_DOTTED_OID = re.compile(r"[0-2](\.(0|[1-9][0-9]*))+")
_PLACEHOLDER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9]*|[0-2](\.(0|[1-9][0-9]*))+")
_HEX = "0123456789abcdefABCDEF"


def attribute_name(oid: x509.ObjectIdentifier) -> str:
    """The short name of a subject attribute (CN, OU, ...), else its dotted OID."""
    return _ATTRIBUTE_DISPLAY.get(oid, oid.dotted_string)


def upn_value(der: bytes) -> str | None:
    """The UPN of an otherName value (the DER of its [0] content, a UTF8String), or None."""
    try:
        value = core.UTF8String.load(der, strict=True).native
    except Exception:  # asn1crypto's failures on hostile input are no documented set
        return None
    return value if isinstance(value, str) else None


def san_type(name: x509.GeneralName) -> str:
    """The `san_types` name of a SAN: dns, ip, email, uri, upn, othername, dirname, rid."""
    if isinstance(name, x509.DNSName):
        return "dns"
    if isinstance(name, x509.IPAddress):
        return "ip"
    if isinstance(name, x509.RFC822Name):
        return "email"
    if isinstance(name, x509.UniformResourceIdentifier):
        return "uri"
    if isinstance(name, x509.OtherName):
        return "upn" if name.type_id == UPN_OID else "othername"
    if isinstance(name, x509.DirectoryName):
        return "dirname"
    return "rid"


def describe_name(name: x509.GeneralName) -> str:
    """A SAN as 'TYPE:value' for the store and logs (DNS:, IP:, email:, URI:, UPN:, ...)."""
    if isinstance(name, x509.DNSName):
        return f"DNS:{name.value}"
    if isinstance(name, x509.IPAddress):
        return f"IP:{name.value}"
    if isinstance(name, x509.RFC822Name):
        return f"email:{name.value}"
    if isinstance(name, x509.UniformResourceIdentifier):
        return f"URI:{name.value}"
    if isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
        upn = upn_value(name.value)
        return f"UPN:{upn if upn is not None else name.value.hex()}"
    if isinstance(name, x509.OtherName):
        return f"otherName:{name.type_id.dotted_string}"
    if isinstance(name, x509.DirectoryName):
        return f"dirName:{name.value.rfc4514_string()}"
    if isinstance(name, x509.RegisteredID):
        return f"RID:{name.value.dotted_string}"
    return f"other:{type(name).__name__}"


def _san_text(name: x509.GeneralName) -> str | None:
    """The text a SAN pattern matches, for the PATTERN_SAN_TYPES; None if it has none."""
    if isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
        return name.value
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
        return upn_value(name.value)
    return None


# ---- applying a template ------------------------------------------------------------------


def _refuse(reason: str) -> Rejected:
    return Rejected(FailInfo.BAD_REQUEST, reason)


def check_key(
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, template: CertTemplate
) -> None:
    """Refuse a client key the template does not accept (badRequest)."""
    accepted = ", ".join(t for t in KEY_TYPES if t in template.key_types)
    if isinstance(public_key, rsa.RSAPublicKey):
        if "rsa" not in template.key_types:
            raise _refuse(f"RSA key; this profile accepts only {accepted}")
        if public_key.key_size < template.min_rsa_bits:
            raise _refuse(
                f"RSA key of {public_key.key_size} bits;"
                f" this profile requires at least {template.min_rsa_bits}"
            )
        return
    key_type = _CURVE_KEY_TYPES.get(public_key.curve.name)
    if key_type is None or key_type not in template.key_types:
        raise _refuse(f"EC key on {public_key.curve.name}; this profile accepts only {accepted}")


def apply_template(request: CertRequest, template: CertTemplate) -> CertRequest:
    """Enforce the template on a baseline-checked request; the subject rewritten if asked.

    Raises Rejected(badRequest) with a reason naming the rule. For a renewal, whose subject
    and SANs come from the replaced certificate, call `check_key` alone.
    """
    check_key(request.public_key, template)
    _check_subject(request.subject, template)
    _check_sans(request.sans, template)
    if template.subject_rewrite is None:
        return request
    return replace(request, subject=rewrite_subject(template.subject_rewrite, request.subject))


def _check_subject(subject: x509.Name, template: CertTemplate) -> None:
    present = {attribute.oid for attribute in subject}
    missing = sorted(attribute_name(oid) for oid in template.subject_required - present)
    if missing:
        raise _refuse(f"subject has no {', '.join(missing)}; this profile requires it")
    refused = sorted(attribute_name(oid) for oid in template.subject_forbidden & present)
    if refused:
        raise _refuse(f"subject has {', '.join(refused)}; this profile forbids it")
    for oid, pattern in template.subject_patterns:
        for attribute in subject.get_attributes_for_oid(oid):
            name = attribute_name(oid)
            value = attribute.value
            if not isinstance(value, str) or not pattern.fullmatch(value):
                raise _refuse(
                    f"subject {name}={value!r} does not match this profile's {name} pattern"
                )


def _check_sans(sans: x509.SubjectAlternativeName | None, template: CertTemplate) -> None:
    names = list(sans) if sans is not None else []
    if not names and template.san_required:
        raise _refuse("no subject alternative name; this profile requires one")
    if len(names) > template.max_sans:
        raise _refuse(
            f"{len(names)} subject alternative names; this profile allows at most"
            f" {template.max_sans}"
        )
    patterns = dict(template.san_patterns)
    for name in names:
        kind = san_type(name)
        if template.san_types is not None and kind not in template.san_types:
            allowed = ", ".join(t for t in SAN_TYPES if t in template.san_types) or "none"
            raise _refuse(
                f"SAN {describe_name(name)} is of type {kind}; this profile allows {allowed}"
            )
        pattern = patterns.get(kind)
        if pattern is None:
            continue
        text = _san_text(name)
        if text is None or not pattern.fullmatch(text):
            raise _refuse(f"SAN {describe_name(name)} does not match this profile's {kind} pattern")


def rewrite_subject(pattern: SubjectPattern, subject: x509.Name) -> x509.Name:
    """The subject the pattern builds from the CSR's subject; Rejected(badRequest) if it can't."""
    rdns: list[x509.RelativeDistinguishedName] = []
    for rdn in pattern.rdns:
        attributes: list[x509.NameAttribute[str]] = []
        for oid, parts in rdn:
            value = "".join(
                part if isinstance(part, str) else _placeholder_value(subject, part)
                for part in parts
            )
            try:
                attributes.append(x509.NameAttribute(oid, value))
            except ValueError as exc:
                raise _refuse(
                    f"rewritten subject: {attribute_name(oid)}={value!r} is invalid: {exc}"
                ) from None
        try:
            rdns.append(x509.RelativeDistinguishedName(attributes))
        except ValueError as exc:
            raise _refuse(f"rewritten subject: {exc}") from None
    name = x509.Name(rdns)
    if len(name.public_bytes()) > MAX_SUBJECT_BYTES:
        raise _refuse("rewritten subject too long")
    return name


def _placeholder_value(subject: x509.Name, oid: x509.ObjectIdentifier) -> str:
    values = [attribute.value for attribute in subject.get_attributes_for_oid(oid)]
    name = attribute_name(oid)
    if not values:
        raise _refuse(f"subject has no {name}, which this profile's subject pattern uses")
    if len(values) > 1:
        raise _refuse(
            f"subject has {len(values)} {name} values; this profile's subject pattern takes one"
        )
    [value] = values
    if not isinstance(value, str):
        raise _refuse(f"subject {name} is not a string; this profile's subject pattern uses it")
    return value


def with_overrides(
    request: CertRequest,
    *,
    sans: x509.SubjectAlternativeName | None = None,
    validity: timedelta | None = None,
) -> CertRequest:
    """The request with an authorization webhook's SANs and validity (None: unchanged).

    The webhook is trusted: its SANs replace the request's as given, not held to the
    template's SAN rules, only to the MAX_SANS hard cap; its validity replaces the
    template's (the CA's notAfter still bounds it).
    """
    if sans is not None:
        if not len(sans):
            raise _refuse("the webhook's SAN override is empty")
        if len(sans) > MAX_SANS:
            raise _refuse(f"the webhook's SAN override has more than {MAX_SANS} names")
        request = replace(request, sans=sans)
    if validity is not None:
        if validity <= timedelta(0):
            raise _refuse("the webhook's validity override is not positive")
        request = replace(request, validity=validity)
    return request


def ms_template_name(csr: x509.CertificateSigningRequest) -> str | None:
    """The Microsoft certificate template name (1.3.6.1.4.1.311.20.2) a CSR asks for, or None.

    NDES clients send a BMPString; UTF8String, PrintableString and IA5String are read too.
    Anything malformed gives None.
    """
    try:
        extension = csr.extensions.get_extension_for_oid(
            x509.ObjectIdentifier(asn1.OID_MS_CERT_TEMPLATE_NAME)
        )
    except (
        ValueError,
        x509.ExtensionNotFound,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ):
        return None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        return None
    try:
        parsed = core.load(value.value, strict=True)
        if not isinstance(
            parsed, core.BMPString | core.UTF8String | core.PrintableString | core.IA5String
        ):
            return None
        name = parsed.native
    except Exception:  # asn1crypto's failures on hostile input are no documented set
        return None
    if not isinstance(name, str):
        return None
    name = name.strip()
    if not name or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    return name


# ---- parsing [profiles.<name>.template] ---------------------------------------------------

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
            raise ConfigError(f"{where}.{key}: unknown key (known: {', '.join(_KEYS)})")
    reader = _Reader(table, where)
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
        t = replace(t, subject_required=_attribute_set(required, reader.key("subject_required")))
    forbidden = reader.names("subject_forbidden")
    if forbidden is not None:
        key = reader.key("subject_forbidden")
        t = replace(t, subject_forbidden=_attribute_set(forbidden, key))
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
                (_attribute(name, f"{key}.{name}"), regex) for name, regex in patterns
            ),
        )
        oids = [oid for oid, _ in t.subject_patterns]
        if len(set(oids)) != len(oids):
            raise ConfigError(f"{key}: an attribute has two patterns")
    if t.subject_rewrite is not None:
        clash = sorted(
            attribute_name(o) for o in _placeholders(t.subject_rewrite) & t.subject_forbidden
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


class _Reader:
    """Typed access to one template table; errors name the full key."""

    def __init__(self, table: Mapping[str, Any], where: str) -> None:
        self.table, self.where = table, where

    def key(self, key: str) -> str:
        return f"{self.where}.{key}"

    def integer(self, key: str, minimum: int, maximum: int) -> int | None:
        value = self.table.get(key)
        if value is None:
            return None
        # TOML booleans are Python ints; `true` is no number of days.
        if type(value) is not int:
            raise ConfigError(f"{self.key(key)} must be an integer, got {value!r}")
        if not minimum <= value <= maximum:
            raise ConfigError(
                f"{self.key(key)} must be between {minimum} and {maximum}, got {value}"
            )
        return value

    def boolean(self, key: str) -> bool | None:
        value = self.table.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"{self.key(key)} must be true or false, got {value!r}")
        return value

    def string(self, key: str) -> str | None:
        value = self.table.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{self.key(key)} must be a string, got {value!r}")
        return value

    def names(self, key: str) -> list[str] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(key)} must be a list of strings, got {value!r}")
        return value

    def regexes(self, key: str) -> list[tuple[str, re.Pattern[str]]] | None:
        value = self.table.get(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.key(key)} must be a table of regular expressions")
        out: list[tuple[str, re.Pattern[str]]] = []
        for name, text in value.items():
            if not isinstance(text, str):
                raise ConfigError(f"{self.key(key)}.{name} must be a string, got {text!r}")
            try:
                out.append((name, re.compile(text)))
            except re.error as exc:
                raise ConfigError(
                    f"{self.key(key)}.{name}: bad regular expression: {exc}"
                ) from None
        return out


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


def _oid(text: str, key: str) -> x509.ObjectIdentifier:
    if not _DOTTED_OID.fullmatch(text):
        raise ConfigError(f"{key}: {text!r} is neither a known name nor a dotted OID")
    try:
        return x509.ObjectIdentifier(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: bad OID {text!r}: {exc}") from None


def _eku(names: Sequence[str], key: str) -> x509.ExtendedKeyUsage:
    if not names:
        raise ConfigError(f"{key} must name at least one extended key usage")
    oids: list[x509.ObjectIdentifier] = []
    for name in names:
        oid = _EKU_NAMES.get(name.casefold()) or _oid(name, key)
        if oid in oids:
            raise ConfigError(f"{key}: {name!r} listed twice")
        oids.append(oid)
    return x509.ExtendedKeyUsage(oids)


def _attribute(name: str, key: str) -> x509.ObjectIdentifier:
    oid = _ATTRIBUTES.get(name.casefold())
    if oid is not None:
        return oid
    if not _DOTTED_OID.fullmatch(name):
        raise ConfigError(f"{key}: unknown subject attribute {name!r}")
    return _oid(name, key)


def _attribute_set(names: Sequence[str], key: str) -> frozenset[x509.ObjectIdentifier]:
    return frozenset(_attribute(name, key) for name in names)


def _subject_rewrite(reader: _Reader, inherited: SubjectPattern | None) -> SubjectPattern | None:
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
            oid = _attribute(type_text.strip(), key)
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
            parts.append(_attribute(name, key))
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


def _placeholders(pattern: SubjectPattern) -> set[x509.ObjectIdentifier]:
    return {
        part
        for rdn in pattern.rdns
        for _, parts in rdn
        for part in parts
        if isinstance(part, x509.ObjectIdentifier)
    }
