"""The PKCS#11 adapter: the only module that imports python-pkcs11.

Facts that shape it (see shared/design/architecture.md): the module must be initialised with
CKF_OS_LOCKING_OK or multi-threaded SoftHSM2 corrupts memory; login belongs to the process
and token, so one login session per token stays open for the life of the process and every
other session opens without a PIN; a session serialises its operations, so each worker
thread owns its own. Every PKCS11Error is converted here.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, _pkcs11
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from hsmscep.errors import HsmError, MessageError, UnsupportedAlgorithm
from hsmscep.hsm.refs import KeyRef, KeySpec, TokenRef
from hsmscep.protocol.keys import ExternalEcKey, ExternalRsaKey, SigningKey

log = logging.getLogger(__name__)
T = TypeVar("T")

_CURVES = {"p256": "secp256r1", "p384": "secp384r1"}


# ---- module initialisation with CKF_OS_LOCKING_OK --------------------------------------

_CKF_OS_LOCKING_OK = 0x00000002
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x00000191


class _CkVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)]


class _CkInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_CkInitFn = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


class _CkFunctionListHead(ctypes.Structure):
    # Only the first members of CK_FUNCTION_LIST: version, C_Initialize, C_Finalize.
    _fields_ = [("version", _CkVersion), ("C_Initialize", _CkInitFn), ("C_Finalize", _CkInitFn)]


def _function_list(so: str) -> Any:
    dll = ctypes.CDLL(so)  # same handle python-pkcs11 opened: dlopen is reference counted
    get_list = dll.C_GetFunctionList
    get_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_CkFunctionListHead))]
    get_list.restype = ctypes.c_ulong
    head = ctypes.POINTER(_CkFunctionListHead)()
    rv = get_list(ctypes.byref(head))
    if rv != 0:
        raise HsmError(f"C_GetFunctionList failed in {so}: 0x{rv:x}")
    return head.contents


class _LockingLib(_pkcs11.lib):
    """python-pkcs11's lib, but C_Initialize gets CKF_OS_LOCKING_OK instead of NULL."""

    def initialize(self) -> None:  # a cpdef override: python-pkcs11's __init__ calls it
        head = _function_list(self.so)
        args = _CkInitializeArgs(flags=_CKF_OS_LOCKING_OK)
        rv = head.C_Initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
        if rv not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmError(f"C_Initialize failed: 0x{rv:x}")

    def finalize_locked(self) -> None:
        _function_list(self.so).C_Finalize(None)


_libraries: dict[str, _LockingLib] = {}
_libraries_lock = threading.Lock()


def open_library(so: str) -> Any:
    """Load and initialise a PKCS#11 module once per process."""
    with _libraries_lock:
        lib = _libraries.get(so)
        if lib is None:
            with hsm_errors(f"loading {so}"):
                lib = _LockingLib(so)
            _libraries[so] = lib
        return lib


def close_library(so: str) -> None:
    """C_Finalize a module opened with open_library (sessions become invalid)."""
    with _libraries_lock:
        lib = _libraries.pop(so, None)
        if lib is not None:
            lib.finalize_locked()


# ---- error conversion -------------------------------------------------------------------

# SoftHSM answers bad PKCS#1 padding with CKR_GENERAL_ERROR, others with
# CKR_ENCRYPTED_DATA_INVALID: all of them are one answer to the client (no padding oracle).
_CLIENT_DECRYPT_ERRORS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.EncryptedDataInvalid,
    pkcs11.exceptions.EncryptedDataLenRange,
    pkcs11.exceptions.GeneralError,
    pkcs11.exceptions.DataInvalid,
    pkcs11.exceptions.DataLenRange,
)


_OAEP_REFUSALS: tuple[type[Exception], ...] = (
    pkcs11.exceptions.ArgumentsBad,
    pkcs11.exceptions.MechanismInvalid,
    pkcs11.exceptions.MechanismParamInvalid,
)


@contextmanager
def hsm_errors(what: str) -> Iterator[None]:
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"PKCS#11 error while {what}: {type(exc).__name__} {exc}".strip()) from exc


# ---- tokens and sessions ----------------------------------------------------------------


def find_token(ref: TokenRef) -> Any:
    lib = open_library(ref.module)
    with hsm_errors("looking up the token"):
        tokens = [
            t
            for t in lib.get_tokens()
            if (ref.label is None or t.label == ref.label)
            and (ref.serial is None or t.serial.decode(errors="replace").strip() == ref.serial)
        ]
    if len(tokens) != 1:
        what = f"label={ref.label!r}" if ref.label else f"serial={ref.serial!r}"
        found = "no token" if not tokens else f"{len(tokens)} tokens"
        raise HsmError(f"{found} with {what} in {ref.module}")
    return tokens[0]


class TokenLogin:
    """Holds the one logged-in session a process keeps per token; opens further sessions."""

    def __init__(self) -> None:
        self._logins: dict[TokenRef, Any] = {}
        self._lock = threading.Lock()

    def open_session(self, ref: TokenRef, *, rw: bool = False) -> Any:
        """A new read-only session, or (rw=True) the shared logged-in read-write one."""
        with self._lock:
            login = self._logins.get(ref)
            if login is None:
                # No session of this process uses the module yet: a retry may start it afresh.
                fresh = all(other.module != ref.module for other in self._logins)
                login = self._logins[ref] = _with_retries(
                    lambda: _log_in(ref), reinitialise=ref.module if fresh else None
                )
            if rw:
                return login
            return _with_retries(lambda: _open(ref))

    def close(self) -> None:
        with self._lock:
            for session in self._logins.values():
                try:
                    session.close()
                except pkcs11.PKCS11Error:
                    pass
            self._logins.clear()


def _template(ref: KeyRef, object_class: ObjectClass) -> dict[Attribute, Any]:
    attrs: dict[Attribute, Any] = {Attribute.CLASS: object_class}
    if ref.label is not None:
        attrs[Attribute.LABEL] = ref.label
    if ref.id is not None:
        attrs[Attribute.ID] = ref.id
    return attrs


def _log_in(ref: TokenRef) -> Any:
    token = find_token(ref)
    with hsm_errors("logging in"):
        try:
            return token.open(user_pin=ref.pin, rw=True)
        except pkcs11.exceptions.UserAlreadyLoggedIn:
            return token.open(rw=True)


def _open(ref: TokenRef) -> Any:
    token = find_token(ref)
    with hsm_errors("opening a session"):
        return token.open()


def _with_retries(action: Callable[[], T], attempts: int = 6, reinitialise: str | None = None) -> T:
    # SoftHSM2 (and network HSMs during fail-over) sometimes answer NoSuchToken or
    # GeneralError when several processes log in at the same moment, as uvicorn's workers do.
    # SoftHSM2 reads its token directory at C_Initialize: a process that initialised while
    # another was rewriting the token files may not see the token at all until it initialises
    # again, so `reinitialise` (a module no session of ours uses yet) is finalised between tries.
    for attempt in range(attempts):
        try:
            return action()
        except HsmError as exc:
            if attempt == attempts - 1:
                raise
            log.warning("HSM not ready (%s); retrying", exc)
            if reinitialise is not None:
                close_library(reinitialise)
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


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


# ---- raw operations bound into cryptography key objects ---------------------------------

_OAEP_HASH = {
    "sha1": (Mechanism.SHA_1, pkcs11.MGF.SHA1),
    "sha224": (Mechanism.SHA224, pkcs11.MGF.SHA224),
    "sha256": (Mechanism.SHA256, pkcs11.MGF.SHA256),
    "sha384": (Mechanism.SHA384, pkcs11.MGF.SHA384),
    "sha512": (Mechanism.SHA512, pkcs11.MGF.SHA512),
}


def signing_key(session: Any, ref: KeyRef, public_key: Any) -> SigningKey:
    """A cryptography key object whose sign() runs in this session (CKM_RSA_PKCS/CKM_ECDSA)."""
    handle = find_private_key(session, ref)
    if isinstance(public_key, rsa.RSAPublicKey):

        def rsa_sign(digest_info: bytes) -> bytes:
            with hsm_errors("signing"):
                return bytes(handle.sign(digest_info, mechanism=Mechanism.RSA_PKCS))

        return ExternalRsaKey(public_key, raw_sign=rsa_sign)

    def ecdsa_sign(digest: bytes) -> bytes:
        with hsm_errors("signing"):
            return bytes(handle.sign(digest, mechanism=Mechanism.ECDSA))

    return ExternalEcKey(public_key, ecdsa_sign)


def decryption_key(session: Any, ref: KeyRef, public_key: rsa.RSAPublicKey) -> ExternalRsaKey:
    """A cryptography RSA key object whose decrypt() runs in this session."""
    handle = find_private_key(session, ref)

    def rsa_decrypt(ciphertext: bytes, oaep: padding.OAEP | None) -> bytes:
        if oaep is None:
            mechanism, param = Mechanism.RSA_PKCS, None
        else:
            hash_mech, mgf = _OAEP_HASH[oaep._algorithm.name]
            mgf_hash = oaep._mgf._algorithm.name
            if mgf_hash != oaep._algorithm.name:
                mgf = _OAEP_HASH[mgf_hash][1]
            mechanism, param = Mechanism.RSA_PKCS_OAEP, (hash_mech, mgf, oaep._label or None)
        try:
            return bytes(handle.decrypt(ciphertext, mechanism=mechanism, mechanism_param=param))
        except _OAEP_REFUSALS:
            if oaep is None:
                raise HsmError("the HSM refused CKM_RSA_PKCS decryption") from None
            # SoftHSM2 only does OAEP with SHA-1; others refuse some parameter sets.
            raise UnsupportedAlgorithm("the HSM does not support these OAEP parameters") from None
        except _CLIENT_DECRYPT_ERRORS:
            raise MessageError("content-encryption key does not decrypt") from None
        except pkcs11.PKCS11Error as exc:
            raise HsmError(f"PKCS#11 error while decrypting: {type(exc).__name__}") from exc

    return ExternalRsaKey(public_key, raw_decrypt=rsa_decrypt)
