"""Certificate templates: what a profile accepts and what its certificates look like. No I/O.

A template only narrows what `issuance.check_csr` accepts (RSA >= 2048 bits, EC P-256/P-384,
no CA, at most MAX_SANS SANs, a sane subject): `apply_template` runs on a request that
already passed those baseline checks, so no template can let an RSA 1024 key through.
The TOML table a template is read from, and what each key means, is in
hsmscep.config.template; DEFAULT_TEMPLATE issues what hsmscep always issued.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Literal

from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from hsmscep.errors import Rejected
from hsmscep.policy.names import SAN_TYPES, attribute_name, describe_name, san_text, san_type
from hsmscep.policy.request import CertRequest
from hsmscep.protocol import asn1
from hsmscep.protocol.codes import FailInfo

MAX_SANS = 64  # hard cap of every request, template and webhook override
MAX_SUBJECT_BYTES = 2048
MAX_VALIDITY_DAYS = 36500
MAX_RSA_BITS = 16384
KEY_TYPES = ("rsa", "p256", "p384")

SignatureHash = Literal["sha256", "sha384", "sha512"]
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


_CURVE_KEY_TYPES = {"secp256r1": "p256", "secp384r1": "p384"}


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
        text = san_text(name)
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
