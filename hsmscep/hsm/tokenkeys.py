"""Key objects on a token: find, generate (sensitive, never extractable), destroy, read the
public half and the protection attributes. Used by bootstrap and by keyops.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from hsmscep.errors import HsmError
from hsmscep.hsm.pkcs11errors import hsm_errors
from hsmscep.hsm.refs import KeyRef, KeySpec

_CURVES = {"p256": "secp256r1", "p384": "secp384r1"}


def _template(ref: KeyRef, object_class: ObjectClass) -> dict[Attribute, Any]:
    attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if ref.label is not None:
        attrs[Attribute.LABEL] = ref.label
    if ref.id is not None:
        attrs[Attribute.ID] = ref.id
    return attrs


def find_private_key(session: Any, ref: KeyRef) -> Any:
    with hsm_errors(f"looking up key {ref.describe()}"):
        found = list(session.get_objects(_template(ref, ObjectClass.PRIVATE_KEY)))
    if len(found) != 1:
        raise HsmError(f"expected one private key with {ref.describe()}, found {len(found)}")
    return found[0]


def private_key_exists(session: Any, ref: KeyRef) -> bool:
    try:
        find_private_key(session, ref)
    except HsmError:
        return False
    return True


def public_key_of(session: Any, ref: KeyRef) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    with hsm_errors(f"reading public key {ref.describe()}"):
        found = list(session.get_objects(_template(ref, ObjectClass.PUBLIC_KEY)))
        if len(found) != 1:
            raise HsmError(f"expected one public key with {ref.describe()}, found {len(found)}")
        pub = found[0]
        if pub.key_type == KeyType.RSA:
            der = encode_rsa_public_key(pub)
        else:
            der = encode_ec_public_key(pub)
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise HsmError(f"unsupported key type for {ref.describe()}")
    return key


def generate_key(session: Any, ref: KeyRef, spec: KeySpec, *, usage: str) -> None:
    """Generate a token key pair: sensitive, never extractable; usage sign/decrypt/both."""
    sign, decrypt = usage in ("sign", "both"), usage in ("decrypt", "both")
    private_template = {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: sign,
        Attribute.DECRYPT: decrypt,
        Attribute.UNWRAP: False,
    }
    public_template = {
        Attribute.TOKEN: True,
        Attribute.VERIFY: sign,
        Attribute.ENCRYPT: decrypt,
    }
    common: dict[str, Any] = {"store": True, "label": ref.label}
    if ref.id is not None:
        common["id"] = ref.id
    with hsm_errors(f"generating key {ref.describe()}"):
        if spec.startswith("rsa"):
            session.generate_keypair(
                KeyType.RSA,
                int(spec[3:]),
                public_template=public_template,
                private_template=private_template,
                **common,
            )
        else:
            params = session.create_domain_parameters(
                KeyType.EC,
                {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[spec])},
                local=True,
            )
            params.generate_keypair(
                public_template=public_template, private_template=private_template, **common
            )


def destroy_key(session: Any, ref: KeyRef) -> None:
    for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
        with hsm_errors(f"deleting key {ref.describe()}"):
            for obj in list(session.get_objects(_template(ref, cls))):
                obj.destroy()


def key_protection(session: Any, ref: KeyRef) -> tuple[bool, bool]:
    """(CKA_SENSITIVE, CKA_EXTRACTABLE) of a private key."""
    key = find_private_key(session, ref)
    with hsm_errors("reading key attributes"):
        return bool(key[Attribute.SENSITIVE]), bool(key[Attribute.EXTRACTABLE])
