"""Certificate templates: parsing, every rule accepted and refused, subject rewrite, the MS
template name, webhook overrides, and sign_certificate honouring the template. Pure: software
keys, no HSM, no server."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any

import pytest
from asn1crypto import core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from hsmscep.config.template import parse_template
from hsmscep.errors import ConfigError, Rejected
from hsmscep.policy.issuance import (
    IssuancePolicy,
    Issuer,
    check_csr,
    describe_sans,
    sign_certificate,
)
from hsmscep.policy.names import UPN_OID
from hsmscep.policy.request import CertRequest
from hsmscep.policy.template import (
    DEFAULT_TEMPLATE,
    MAX_SANS,
    CertTemplate,
    apply_template,
    check_key,
    ms_template_name,
    with_overrides,
)
from hsmscep.protocol.codes import FailInfo
from tests.conftest import software_root

WHERE = "profiles.wifi.template"
NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
MS_TEMPLATE_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2")


# ---- keys, names and requests -------------------------------------------------------------


@cache
def rsa_key(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


@cache
def ec_key(curve: str) -> ec.EllipticCurvePrivateKey:
    curves: dict[str, ec.EllipticCurve] = {
        "p256": ec.SECP256R1(),
        "p384": ec.SECP384R1(),
        "p521": ec.SECP521R1(),
    }
    return ec.generate_private_key(curves[curve])


@cache
def software_ca() -> tuple[Issuer, rsa.RSAPrivateKey]:
    key = rsa_key(2048)
    name = x509.Name.from_rfc4514_string("CN=Template Test CA")
    return Issuer.of(software_root(key, name, NOW)), key


def name(rfc4514: str) -> x509.Name:
    overrides = {"emailAddress": NameOID.EMAIL_ADDRESS, "serialNumber": NameOID.SERIAL_NUMBER}
    return x509.Name.from_rfc4514_string(rfc4514, overrides)


def upn(value: str) -> x509.OtherName:
    return x509.OtherName(UPN_OID, core.UTF8String(value).dump())


def request(
    subject: str = "CN=device-1,O=Example",
    sans: Sequence[x509.GeneralName] | None = None,
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey | None = None,
) -> CertRequest:
    return CertRequest(
        name(subject),
        key or rsa_key(2048).public_key(),
        x509.SubjectAlternativeName(sans) if sans is not None else None,
    )


def refused(req: CertRequest, template: CertTemplate) -> str:
    with pytest.raises(Rejected) as caught:
        apply_template(req, template)
    assert caught.value.fail_info == FailInfo.BAD_REQUEST
    return caught.value.reason


def template(**table: Any) -> CertTemplate:
    return parse_template(table, WHERE)


def config_error(table: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_template(table, WHERE)
    return str(caught.value)


# ---- parsing --------------------------------------------------------------------------------


def test_empty_table_is_the_default_and_defaults_are_inherited() -> None:
    assert parse_template({}, WHERE) == DEFAULT_TEMPLATE == CertTemplate()
    server_wide = CertTemplate(validity=timedelta(days=90), signature_hash="sha384")
    inherited = parse_template({"max_sans": 3}, WHERE, defaults=server_wide)
    assert inherited.validity == timedelta(days=90) and inherited.signature_hash == "sha384"
    assert inherited.max_sans == 3
    assert parse_template({"validity_days": 7}, WHERE, server_wide).validity == timedelta(days=7)


def test_full_table() -> None:
    t = template(
        validity_days=30,
        key_usage=["digitalSignature", "keyAgreement", "encipherOnly"],
        extended_key_usage=["serverAuth", "clientAuth", "smartcardLogon", "1.3.6.1.5.5.7.3.21"],
        subject_mode="rewrite",
        subject_pattern="CN={CN},O=Example Corp",
        subject_required=["CN", "ou"],
        subject_forbidden=["emailAddress", "2.5.4.5"],
        subject_patterns={"CN": "[a-z0-9-]+"},
        san_types=["DNS", "ip", "upn"],
        san_patterns={"dns": r"[a-z0-9-]+\.example\.com"},
        max_sans=4,
        san_required=True,
        key_types=["rsa", "p384"],
        min_rsa_bits=3072,
        signature_hash="sha512",
    )
    assert t.validity == timedelta(days=30)
    assert t.key_usage is not None
    assert t.key_usage.digital_signature and t.key_usage.key_agreement
    assert t.key_usage.encipher_only and not t.key_usage.key_encipherment
    assert list(t.extended_key_usage) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
        x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.2"),
        x509.ObjectIdentifier("1.3.6.1.5.5.7.3.21"),
    ]
    assert t.subject_rewrite is not None and t.subject_rewrite.text == "CN={CN},O=Example Corp"
    assert t.subject_required == {NameOID.COMMON_NAME, NameOID.ORGANIZATIONAL_UNIT_NAME}
    assert t.subject_forbidden == {NameOID.EMAIL_ADDRESS, NameOID.SERIAL_NUMBER}
    assert [oid for oid, _ in t.subject_patterns] == [NameOID.COMMON_NAME]
    assert t.san_types == frozenset({"dns", "ip", "upn"})
    assert [kind for kind, _ in t.san_patterns] == ["dns"]
    assert (t.max_sans, t.san_required) == (4, True)
    assert t.key_types == {"rsa", "p384"} and t.min_rsa_bits == 3072
    assert t.signature_hash == "sha512"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"colour": "red"}, f"{WHERE}.colour: unknown key"),
        ({"validity_days": 0}, f"{WHERE}.validity_days must be between 1 and 36500, got 0"),
        ({"validity_days": "30"}, f"{WHERE}.validity_days must be an integer"),
        ({"validity_days": True}, f"{WHERE}.validity_days must be an integer"),
        ({"validity_days": 1.5}, f"{WHERE}.validity_days must be an integer"),
        ({"key_usage": "digitalSignature"}, f"{WHERE}.key_usage must be a list of strings"),
        ({"key_usage": []}, f"{WHERE}.key_usage must name at least one"),
        ({"key_usage": ["signing"]}, f"{WHERE}.key_usage: unknown key usage 'signing'"),
        ({"key_usage": ["keyCertSign"]}, f"{WHERE}.key_usage: keyCertSign is for CA"),
        ({"key_usage": ["cRLSign"]}, f"{WHERE}.key_usage: cRLSign is for CA"),
        ({"key_usage": ["decipherOnly"]}, f"{WHERE}.key_usage: encipherOnly and decipherOnly"),
        ({"extended_key_usage": []}, f"{WHERE}.extended_key_usage must name at least one"),
        ({"extended_key_usage": ["wifi"]}, f"{WHERE}.extended_key_usage: 'wifi' is neither"),
        ({"extended_key_usage": ["1.3.6.1.5.5.7.3.x"]}, f"{WHERE}.extended_key_usage: '1.3."),
        ({"extended_key_usage": ["3.1.2"]}, f"{WHERE}.extended_key_usage: '3.1.2' is neither"),
        (
            {"extended_key_usage": ["clientAuth", "1.3.6.1.5.5.7.3.2"]},
            f"{WHERE}.extended_key_usage: '1.3.6.1.5.5.7.3.2' listed twice",
        ),
        ({"extended_key_usage": [1]}, f"{WHERE}.extended_key_usage must be a list of strings"),
        ({"subject_mode": "replace"}, f'{WHERE}.subject_mode must be "keep" or "rewrite"'),
        ({"subject_mode": "rewrite"}, f"{WHERE}.subject_pattern is required"),
        (
            {"subject_mode": "keep", "subject_pattern": "CN={CN}"},
            f'{WHERE}.subject_pattern needs subject_mode = "rewrite"',
        ),
        ({"subject_pattern": "CN={CN}"}, f'{WHERE}.subject_pattern needs subject_mode = "rewrite"'),
        ({"subject_mode": "rewrite", "subject_pattern": " "}, f"{WHERE}.subject_pattern is empty"),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN},Example"},
            f"{WHERE}.subject_pattern: 'Example' is not TYPE=value",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN"},
            f"{WHERE}.subject_pattern: bad placeholder",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={Common Name}"},
            f"{WHERE}.subject_pattern: bad placeholder",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN}}"},
            f"{WHERE}.subject_pattern: unmatched '}}'",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={XYZ}"},
            f"{WHERE}.subject_pattern: unknown subject attribute 'XYZ'",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "FOO=x,CN={CN}"},
            f"{WHERE}.subject_pattern: unknown subject attribute 'FOO'",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN},C=USA"},
            f"{WHERE}.subject_pattern: C='USA'",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN},O="},
            f"{WHERE}.subject_pattern: an attribute has an empty value",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN}\\"},
            f"{WHERE}.subject_pattern: ends in a lone backslash",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN},O=\\ff"},
            f"{WHERE}.subject_pattern: hex escapes are not UTF-8",
        ),
        (
            {"subject_mode": "rewrite", "subject_pattern": "CN={CN},O=a\\0ab"},
            f"{WHERE}.subject_pattern: control characters",
        ),
        (
            {
                "subject_mode": "rewrite",
                "subject_pattern": "CN={CN},OU={OU}",
                "subject_forbidden": ["OU"],
            },
            f"{WHERE}.subject_pattern: uses OU, which subject_forbidden refuses",
        ),
        ({"subject_required": ["CN", "colour"]}, f"{WHERE}.subject_required: unknown subject"),
        ({"subject_forbidden": "O"}, f"{WHERE}.subject_forbidden must be a list of strings"),
        (
            {"subject_required": ["CN"], "subject_forbidden": ["cn"]},
            f"{WHERE}.subject_forbidden: CN also required",
        ),
        ({"subject_patterns": ["CN"]}, f"{WHERE}.subject_patterns must be a table"),
        ({"subject_patterns": {"CN": 5}}, f"{WHERE}.subject_patterns.CN must be a string"),
        ({"subject_patterns": {"CN": "[a-"}}, f"{WHERE}.subject_patterns.CN: bad regular"),
        ({"subject_patterns": {"Colour": "x"}}, f"{WHERE}.subject_patterns.Colour: unknown"),
        (
            {"subject_patterns": {"CN": "a", "2.5.4.3": "b"}},
            f"{WHERE}.subject_patterns: an attribute has two patterns",
        ),
        ({"san_types": ["dns", "foo"]}, f"{WHERE}.san_types: unknown SAN type 'foo'"),
        ({"san_types": ["dns", "DNS"]}, f"{WHERE}.san_types: 'DNS' listed twice"),
        ({"san_patterns": {"dns": "(x"}}, f"{WHERE}.san_patterns.dns: bad regular expression"),
        ({"san_patterns": {"dirname": "x"}}, f"{WHERE}.san_patterns.dirname: patterns are for"),
        (
            {"san_types": ["dns"], "san_patterns": {"email": ".*"}},
            f"{WHERE}.san_patterns.email: email is not in san_types",
        ),
        ({"max_sans": 65}, f"{WHERE}.max_sans must be between 0 and 64, got 65"),
        ({"max_sans": -1}, f"{WHERE}.max_sans must be between 0 and 64"),
        ({"san_required": "yes"}, f"{WHERE}.san_required must be true or false"),
        ({"san_required": True, "max_sans": 0}, f"{WHERE}.san_required: no SAN is allowed"),
        ({"san_required": True, "san_types": []}, f"{WHERE}.san_required: no SAN is allowed"),
        ({"key_types": []}, f"{WHERE}.key_types must name at least one key type"),
        ({"key_types": ["rsa1024"]}, f"{WHERE}.key_types: unknown key type 'rsa1024'"),
        ({"key_types": ["p521"]}, f"{WHERE}.key_types: unknown key type 'p521'"),
        ({"min_rsa_bits": 1024}, f"{WHERE}.min_rsa_bits must be between 2048 and 16384"),
        ({"signature_hash": "sha1"}, f"{WHERE}.signature_hash: unknown hash 'sha1'"),
        ({"signature_hash": 256}, f"{WHERE}.signature_hash must be a string"),
    ],
)
def test_config_errors_name_the_key(table: dict[str, Any], message: str) -> None:
    assert config_error(table).startswith(message)


def test_not_a_table() -> None:
    with pytest.raises(ConfigError, match=f"^{WHERE} must be a table"):
        parse_template(["validity_days"], WHERE)  # type: ignore[arg-type]


def test_inherited_rewrite_can_be_turned_off() -> None:
    rewriting = template(subject_mode="rewrite", subject_pattern="CN={CN}")
    assert parse_template({}, WHERE, rewriting).subject_rewrite == rewriting.subject_rewrite
    assert parse_template({"subject_mode": "keep"}, WHERE, rewriting).subject_rewrite is None
    other = parse_template({"subject_pattern": "CN=x-{CN}"}, WHERE, rewriting)
    assert other.subject_rewrite is not None and other.subject_rewrite.text == "CN=x-{CN}"


# ---- key rules ------------------------------------------------------------------------------


def test_key_types_and_rsa_size() -> None:
    strong = template(min_rsa_bits=3072)
    assert (
        refused(request(key=rsa_key(2048).public_key()), strong)
        == "RSA key of 2048 bits; this profile requires at least 3072"
    )
    apply_template(request(key=rsa_key(3072).public_key()), strong)
    apply_template(request(key=ec_key("p256").public_key()), strong)

    ec_only = template(key_types=["p384"])
    assert refused(request(), ec_only) == "RSA key; this profile accepts only p384"
    assert (
        refused(request(key=ec_key("p256").public_key()), ec_only)
        == "EC key on secp256r1; this profile accepts only p384"
    )
    apply_template(request(key=ec_key("p384").public_key()), ec_only)
    rsa_only = template(key_types=["RSA"])
    assert "accepts only rsa" in refused(request(key=ec_key("p384").public_key()), rsa_only)
    with pytest.raises(Rejected, match="secp521r1"):
        check_key(ec_key("p521").public_key(), DEFAULT_TEMPLATE)


def test_the_baseline_still_refuses_what_no_template_allows() -> None:
    """check_csr runs before any template: RSA 1024 never gets as far as a template."""
    weak = rsa.generate_private_key(65537, 1024)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name("CN=weak"))
        .sign(weak, hashes.SHA256())
    )
    with pytest.raises(Rejected, match="RSA key of 1024 bits"):
        check_csr(csr, IssuancePolicy(challenge=None))
    assert "2048 and 16384" in config_error({"min_rsa_bits": 1024})


# ---- subject rules --------------------------------------------------------------------------


def test_required_forbidden_and_patterns() -> None:
    t = template(
        subject_required=["CN", "OU"],
        subject_forbidden=["emailAddress"],
        subject_patterns={"CN": r"dev-[0-9]+", "OU": "(?i)wifi|lan"},
    )
    apply_template(request("CN=dev-1,OU=WiFi,OU=lan,O=Example"), t)
    assert (
        refused(request("CN=dev-1,O=Example"), t) == "subject has no OU; this profile requires it"
    )
    assert refused(request("O=Example"), t) == "subject has no CN, OU; this profile requires it"
    assert (
        refused(request("CN=dev-1,OU=lan,emailAddress=a@b.test"), t)
        == "subject has emailAddress; this profile forbids it"
    )
    assert (
        refused(request("CN=laptop-1,OU=lan"), t)
        == "subject CN='laptop-1' does not match this profile's CN pattern"
    )
    # Every value of the attribute must match, and the match is over the whole value.
    assert "OU='dmz'" in refused(request("CN=dev-1,OU=lan,OU=dmz"), t)
    assert "CN='dev-1x'" in refused(request("CN=dev-1x,OU=lan"), t)
    by_oid = template(subject_forbidden=["2.5.4.10"])
    assert refused(request(), by_oid) == "subject has O; this profile forbids it"


# ---- SAN rules ------------------------------------------------------------------------------


def test_default_template_accepts_any_san_type() -> None:
    sans: list[x509.GeneralName] = [
        x509.DNSName("a.example.com"),
        x509.DirectoryName(name("CN=dir")),
        x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
        x509.RegisteredID(x509.ObjectIdentifier("1.2.3.5")),
    ]
    assert apply_template(request(sans=sans), DEFAULT_TEMPLATE) == request(sans=sans)


def test_san_types() -> None:
    t = template(san_types=["dns", "ip", "email", "uri", "upn"])
    apply_template(
        request(
            sans=[
                x509.DNSName("a.example.com"),
                x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
                x509.RFC822Name("a@example.com"),
                x509.UniformResourceIdentifier("https://example.com/a"),
                upn("a@corp.example"),
            ]
        ),
        t,
    )
    assert (
        refused(request(sans=[x509.DirectoryName(name("CN=dir"))]), t)
        == "SAN dirName:CN=dir is of type dirname; this profile allows dns, ip, email, uri, upn"
    )
    other = x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00")
    assert "is of type othername" in refused(request(sans=[other]), t)
    rid = x509.RegisteredID(x509.ObjectIdentifier("1.2.3.5"))
    assert "SAN RID:1.2.3.5 is of type rid" in refused(request(sans=[rid]), t)
    dns_only = template(san_types=["dns"])
    assert "SAN UPN:a@corp.example is of type upn" in refused(
        request(sans=[upn("a@corp.example")]), dns_only
    )
    apply_template(request(sans=[other, rid]), template(san_types=["othername", "rid"]))
    assert "this profile allows none" in refused(
        request(sans=[x509.DNSName("a.example.com")]), template(san_types=[])
    )
    apply_template(request(), template(san_types=[]))


def test_san_patterns() -> None:
    t = template(
        san_patterns={
            "dns": r"[a-z0-9-]+\.example\.com",
            "ip": r"10\.1\.[0-9.]+|2001:db8::[0-9a-f:]+",
            "email": r"[a-z.]+@example\.com",
            "uri": r"https://example\.com/.*",
            "upn": r"[a-z]+@corp\.example",
        }
    )
    good: list[x509.GeneralName] = [
        x509.DNSName("host-1.example.com"),
        x509.IPAddress(ipaddress.ip_address("10.1.2.3")),
        x509.IPAddress(ipaddress.ip_address("2001:db8::1")),
        x509.RFC822Name("jane.doe@example.com"),
        x509.UniformResourceIdentifier("https://example.com/device/1"),
        upn("jane@corp.example"),
        x509.DirectoryName(name("CN=no pattern for dirName")),
    ]
    apply_template(request(sans=good), t)
    bad: list[tuple[x509.GeneralName, str]] = [
        (x509.DNSName("evil.com"), "SAN DNS:evil.com does not match this profile's dns pattern"),
        (x509.DNSName("a.example.com.evil.com"), "DNS:a.example.com.evil.com does not match"),
        (x509.DNSName("HOST.example.com"), "DNS:HOST.example.com does not match"),
        (x509.IPAddress(ipaddress.ip_address("10.2.0.1")), "SAN IP:10.2.0.1 does not match"),
        (x509.RFC822Name("x@evil.com"), "SAN email:x@evil.com does not match this profile's"),
        (x509.UniformResourceIdentifier("http://example.com/"), "SAN URI:http://example.com/"),
        (upn("jane@evil.example"), "SAN UPN:jane@evil.example does not match this profile's upn"),
        (x509.OtherName(UPN_OID, b"\x02\x01\x05"), "SAN UPN:020105 does not match"),
    ]
    for san, reason in bad:
        assert reason in refused(request(sans=[*good[:1], san]), t)


def test_san_count_and_required() -> None:
    t = template(max_sans=2, san_required=True)
    two = [x509.DNSName("a.example.com"), x509.DNSName("b.example.com")]
    apply_template(request(sans=two), t)
    assert (
        refused(request(sans=[*two, x509.DNSName("c.example.com")]), t)
        == "3 subject alternative names; this profile allows at most 2"
    )
    assert refused(request(), t) == "no subject alternative name; this profile requires one"
    assert "allows at most 0" in refused(request(sans=two[:1]), template(max_sans=0))


# ---- subject rewrite ------------------------------------------------------------------------


def test_rewrite_builds_the_subject_from_the_csr() -> None:
    t = template(subject_mode="rewrite", subject_pattern="CN={CN},OU={OU},O=Example Corp")
    req = request("CN=device-7,OU=wifi,O=Whatever The Client Says,C=XX")
    rewritten = apply_template(req, t)
    assert rewritten.subject == name("CN=device-7,OU=wifi,O=Example Corp")
    assert rewritten.subject.rfc4514_string() == "CN=device-7,OU=wifi,O=Example Corp"
    # In DER the most specific RDN comes last, as from_rfc4514_string and OpenSSL have it.
    assert list(rewritten.subject)[-1].oid == NameOID.COMMON_NAME
    assert (rewritten.public_key, rewritten.sans) == (req.public_key, req.sans)
    assert (
        refused(request("CN=device-7,O=Example"), t)
        == "subject has no OU, which this profile's subject pattern uses"
    )
    assert (
        refused(request("CN=device-7,OU=a,OU=b"), t)
        == "subject has 2 OU values; this profile's subject pattern takes one"
    )


def test_rewrite_literals_escapes_and_multivalued_rdns() -> None:
    t = template(
        subject_mode="rewrite",
        subject_pattern=(
            r"CN=dev-{CN}.{DC}+UID={serialNumber},O=Example\, Inc.,OU=\7Bliteral\7D \2B \{x\},"
            "emailAddress={emailAddress},2.5.4.97=VAT{C}"
        ),
    )
    rewritten = apply_template(
        request("CN=7,DC=corp,serialNumber=SN123,emailAddress=a@b.test,C=DE"), t
    ).subject
    rdns = list(rewritten.rdns)
    assert len(rdns) == 5
    assert {(a.oid, a.value) for a in rdns[-1]} == {
        (NameOID.COMMON_NAME, "dev-7.corp"),
        (NameOID.USER_ID, "SN123"),
    }
    assert rewritten.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "Example, Inc."
    ou = rewritten.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value
    assert ou == "{literal} + {x}"
    assert rewritten.get_attributes_for_oid(NameOID.EMAIL_ADDRESS)[0].value == "a@b.test"
    vat = rewritten.get_attributes_for_oid(x509.ObjectIdentifier("2.5.4.97"))
    assert vat[0].value == "VATDE"


def test_rewrite_refuses_values_the_attribute_cannot_take() -> None:
    t = template(subject_mode="rewrite", subject_pattern="CN={CN},C={O}")
    assert "rewritten subject: C='Example' is invalid" in refused(request(), t)
    apply_template(request("CN=a,O=DE"), t)
    literal_only = template(subject_mode="rewrite", subject_pattern="CN=fixed")
    assert apply_template(request(), literal_only).subject == name("CN=fixed")
    long = template(subject_mode="rewrite", subject_pattern="CN={CN}" + ",OU={O}" * 40)
    assert refused(request("CN=a,O=" + "x" * 60), long) == "rewritten subject too long"


def test_subject_rules_see_the_subject_the_client_asked_for() -> None:
    t = template(
        subject_mode="rewrite",
        subject_pattern="CN={CN},O=Example Corp",
        subject_forbidden=["O"],
    )
    assert refused(request("CN=a,O=Example Corp"), t) == "subject has O; this profile forbids it"
    assert apply_template(request("CN=a"), t).subject == name("CN=a,O=Example Corp")


# ---- Microsoft certificate template name ----------------------------------------------------


def csr_with(*extensions: x509.ExtensionType) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(name("CN=ndes"))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(ec_key("p256"), hashes.SHA256())


def ms_template(der: bytes) -> x509.UnrecognizedExtension:
    return x509.UnrecognizedExtension(MS_TEMPLATE_OID, der)


@pytest.mark.parametrize(
    ("der", "expected"),
    [
        (core.BMPString("IPSECIntermediateOffline").dump(), "IPSECIntermediateOffline"),
        (core.BMPString("Wi-Fi Käfer").dump(), "Wi-Fi Käfer"),
        (core.UTF8String("Machine").dump(), "Machine"),
        (core.PrintableString("User").dump(), "User"),
        (core.IA5String("WebServer").dump(), "WebServer"),
        (core.BMPString(" Router ").dump(), "Router"),
        (b"\x1e\x03\x00A\x00", None),  # odd BMPString length
        (core.UTF8String("x").dump() + b"\x00", None),  # trailing bytes
        (b"\x1e\x10\x00A", None),  # length past the end
        (core.Integer(5).dump(), None),
        (core.OctetString(b"Machine").dump(), None),
        (core.BMPString("").dump(), None),
        (core.UTF8String("a\nb").dump(), None),
        (b"", None),
    ],
)
def test_ms_template_name(der: bytes, expected: str | None) -> None:
    assert ms_template_name(csr_with(ms_template(der))) == expected


def test_ms_template_name_absent() -> None:
    assert ms_template_name(csr_with()) is None
    other = x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.311.21.7"), b"\x05\x00")
    assert ms_template_name(csr_with(other)) is None


def test_ms_template_name_next_to_other_extensions() -> None:
    csr = csr_with(
        x509.SubjectAlternativeName([x509.DNSName("ndes.example.com")]),
        ms_template(core.BMPString("IPSECIntermediateOffline").dump()),
    )
    assert ms_template_name(csr) == "IPSECIntermediateOffline"
    # The baseline checks accept the extension, critical or not.
    check_csr(csr, IssuancePolicy(challenge=None))


# ---- webhook overrides ----------------------------------------------------------------------


def test_with_overrides() -> None:
    req = request(sans=[x509.DNSName("asked.example.com")])
    assert with_overrides(req) == req
    sans = x509.SubjectAlternativeName([x509.DNSName("granted.example.com"), upn("a@b")])
    overridden = with_overrides(req, sans=sans, validity=timedelta(days=3))
    assert overridden.sans == sans and overridden.validity == timedelta(days=3)
    assert (overridden.subject, overridden.public_key) == (req.subject, req.public_key)
    assert with_overrides(req, validity=timedelta(hours=1)).sans == req.sans

    too_many = x509.SubjectAlternativeName(
        [x509.DNSName(f"h{i}.example.com") for i in range(MAX_SANS + 1)]
    )
    refused: list[dict[str, Any]] = [
        {"sans": too_many},
        {"validity": timedelta(0)},
        {"validity": timedelta(days=-1)},
    ]
    try:  # cryptography 51 refuses to build an empty SAN extension at all
        refused.append({"sans": x509.SubjectAlternativeName([])})
    except ValueError:
        pass
    for kwargs in refused:
        with pytest.raises(Rejected) as caught:
            with_overrides(req, **kwargs)
        assert caught.value.fail_info == FailInfo.BAD_REQUEST
    exactly = x509.SubjectAlternativeName(list(too_many)[:MAX_SANS])
    assert with_overrides(req, sans=exactly).sans == exactly


# ---- sign_certificate -----------------------------------------------------------------------


def build(req: CertRequest, t: CertTemplate = DEFAULT_TEMPLATE) -> x509.Certificate:
    issuer, key = software_ca()
    signed = sign_certificate(
        req,
        issuer=issuer,
        issuer_key=key,  # type: ignore[arg-type]  # a software key signs as the HSM's does
        serial=0x1234,
        now=NOW,
        policy=IssuancePolicy(challenge=None),
        template=t,
    )
    return x509.load_der_x509_certificate(signed.der)


def extension(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> x509.Extension[Any]:
    return cert.extensions.get_extension_for_oid(oid)


def test_sign_certificate_honours_the_template() -> None:
    t = template(
        validity_days=30,
        key_usage=["digitalSignature", "nonRepudiation"],
        extended_key_usage=["serverAuth", "1.3.6.1.5.5.7.3.21"],
        signature_hash="sha384",
    )
    cert = build(request(key=ec_key("p384").public_key()), t)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(days=30, minutes=5)
    key_usage = extension(cert, ExtensionOID.KEY_USAGE)
    assert key_usage.critical
    assert key_usage.value.digital_signature and key_usage.value.content_commitment
    assert not key_usage.value.key_encipherment
    assert list(extension(cert, ExtensionOID.EXTENDED_KEY_USAGE).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.ObjectIdentifier("1.3.6.1.5.5.7.3.21"),
    ]
    assert isinstance(cert.signature_hash_algorithm, hashes.SHA384)
    issuer, _ = software_ca()
    cert.verify_directly_issued_by(issuer.certificate)
    assert isinstance(
        build(request(), template(signature_hash="sha512")).signature_hash_algorithm, hashes.SHA512
    )


def test_request_eku_and_validity_win_over_the_template() -> None:
    t = template(validity_days=30, extended_key_usage=["serverAuth"])
    renewal_eku = x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION]
    )
    renewal = CertRequest(name("CN=old"), rsa_key(2048).public_key(), None, renewal_eku)
    assert extension(build(renewal, t), ExtensionOID.EXTENDED_KEY_USAGE).value == renewal_eku
    webhook = with_overrides(request(), validity=timedelta(days=2))
    cert = build(webhook, t)
    assert cert.not_valid_after_utc == NOW + timedelta(days=2)
    # The CA's notAfter bounds every validity.
    forever = build(with_overrides(request(), validity=timedelta(days=100000)), t)
    issuer, _ = software_ca()
    assert forever.not_valid_after_utc == issuer.certificate.not_valid_after_utc


def old_build_certificate(req: CertRequest) -> x509.Certificate:
    """What the certificate builder made before templates existed, spelled out."""
    issuer, key = software_ca()
    usage = dict(
        content_commitment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    rsa_key_ = isinstance(req.public_key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        .subject_name(req.subject)
        .issuer_name(issuer.certificate.subject)
        .public_key(req.public_key)
        .serial_number(0x1234)
        .not_valid_before(NOW - timedelta(minutes=5))
        .not_valid_after(NOW + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_encipherment=rsa_key_, **usage),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(req.public_key), False)
        .add_extension(issuer.authority_key_id, critical=False)
    )
    if req.sans is not None:
        builder = builder.add_extension(req.sans, critical=not len(req.subject))
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize("key_type", ["rsa", "p256"])
@pytest.mark.parametrize("subject", ["CN=device-1,O=Example", ""])
def test_default_template_builds_what_issuance_always_built(key_type: str, subject: str) -> None:
    public_key = rsa_key(2048).public_key() if key_type == "rsa" else ec_key("p256").public_key()
    req = request(subject, sans=[x509.DNSName("device-1.example.com")], key=public_key)
    cert = build(req)
    # The CA key is RSA and PKCS#1 v1.5 is deterministic: the very same bytes.
    assert cert.public_bytes(Encoding.DER) == old_build_certificate(req).public_bytes(Encoding.DER)
    assert extension(cert, ExtensionOID.SUBJECT_ALTERNATIVE_NAME).critical == (not subject)


def test_describe_sans_unchanged() -> None:
    sans = x509.SubjectAlternativeName(
        [
            x509.DNSName("a.example.com"),
            x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
            x509.RFC822Name("a@example.com"),
            x509.UniformResourceIdentifier("https://example.com/"),
            upn("a@corp"),
            x509.OtherName(UPN_OID, b"\x02\x01\x05"),
            x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
            x509.DirectoryName(name("CN=dir")),
        ]
    )
    assert describe_sans(sans) == (
        "DNS:a.example.com",
        "IP:10.0.0.1",
        "email:a@example.com",
        "URI:https://example.com/",
        "UPN:a@corp",
        "UPN:020105",
        "otherName:1.2.3.4",
        "dirName:CN=dir",
    )
    assert describe_sans(None) == ()
