"""Names in certificates: subject attribute names, SAN types and how SANs are written out.

Shared by templates, issuance, the webhook wire format and the config reader. No I/O.
"""

from __future__ import annotations

from asn1crypto import core
from cryptography import x509
from cryptography.x509.oid import NameOID

SAN_TYPES = ("dns", "ip", "email", "uri", "upn", "othername", "dirname", "rid")
# The SAN types whose value is text a regex can match.
PATTERN_SAN_TYPES = ("dns", "ip", "email", "uri", "upn")
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

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
# Every name (case-folded) of an attribute -> its OID, for parsing names in the config.
ATTRIBUTE_OIDS = {name.casefold(): oid for name, oid in _ATTRIBUTE_NAMES}
_ATTRIBUTE_DISPLAY: dict[x509.ObjectIdentifier, str] = {}
for _attribute_name, _attribute_oid in _ATTRIBUTE_NAMES:
    _ATTRIBUTE_DISPLAY.setdefault(_attribute_oid, _attribute_name)


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


def san_text(name: x509.GeneralName) -> str | None:
    """The text a SAN pattern matches, for the PATTERN_SAN_TYPES; None if it has none."""
    if isinstance(name, x509.DNSName | x509.RFC822Name | x509.UniformResourceIdentifier):
        return name.value
    if isinstance(name, x509.IPAddress):
        return str(name.value)
    if isinstance(name, x509.OtherName) and name.type_id == UPN_OID:
        return upn_value(name.value)
    return None
