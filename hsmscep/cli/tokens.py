"""Checking tokens and keys before anything starts: one login per token, one line per mistake.

The server's own login (hsm.login.TokenLogin) retries what may be transient; here nothing is
retried, so a wrong PIN costs exactly one failed C_Login. The operator gets what they need to
fix it: the tokens the module sees, SOFTHSM2_CONF for SoftHSM2, the PKCS#11 return code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import TracebackType
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from hsmscep.errors import ConfigError, HsmError
from hsmscep.hsm.keyops import signing_key
from hsmscep.hsm.library import close_library, open_library
from hsmscep.hsm.login import find_token
from hsmscep.hsm.pkcs11errors import hsm_errors
from hsmscep.hsm.refs import KeyRef, TokenRef
from hsmscep.hsm.tokenkeys import find_private_key, public_key_of


def return_code(exc: BaseException) -> str:
    """CKR_PIN_INCORRECT for python-pkcs11's PinIncorrect (its classes mirror CKR_ names)."""
    cause = exc.__cause__ or exc
    return "CKR_" + re.sub(r"(?<!^)(?=[A-Z])", "_", type(cause).__name__).upper()


def _spki(key: Any) -> bytes:
    return bytes(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo))


class TokenCheck:
    """Logged-in sessions for the checks; every session and module is closed on exit."""

    def __init__(self) -> None:
        self._sessions: list[Any] = []
        self._modules: set[str] = set()

    def __enter__(self) -> TokenCheck:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for session in self._sessions:
            try:
                session.close()
            except Exception:  # noqa: BLE001 - closing after a failure must not hide it
                pass
        for module in self._modules:
            close_library(module)

    @staticmethod
    def describe(token: TokenRef) -> str:
        name = f"label {token.label!r}" if token.label else f"serial {token.serial!r}"
        return f"{name} ({token.module})"

    def log_in(self, token: TokenRef) -> Any:
        """A read-only session logged in as the user: one C_Login, never retried."""
        lib = self._library(token.module)
        try:
            found = find_token(token)
        except HsmError as exc:
            if not str(exc).startswith("no token"):
                raise  # several tokens match, or the module failed: its own message says so
            raise HsmError(self._no_token(lib, token)) from None
        try:
            with hsm_errors("logging in"):
                session = found.open(user_pin=token.pin)
        except HsmError as exc:
            raise HsmError(
                f"cannot log in to token {self.describe(token)}: {return_code(exc)}"
                " (check the PIN; it was tried once)"
            ) from exc
        self._sessions.append(session)
        return session

    def find_key(self, session: Any, token: TokenRef, role: str, ref: KeyRef, cert: Path) -> None:
        """HsmError unless the key is there; ConfigError unless `cert` certifies it."""
        try:
            find_private_key(session, ref)
        except HsmError as exc:
            raise HsmError(
                f"{role} key {ref.describe()} on token {self.describe(token)}: {exc}"
                " (run `hsmscep init` to create the keys)"
            ) from exc
        certified = x509.load_pem_x509_certificates(cert.read_bytes())[0].public_key()
        mismatch = ConfigError(
            f"{cert} does not certify the {role} key {ref.describe()} on token"
            f" {self.describe(token)} (a certificate of another CA or key?)"
        )
        try:
            public = public_key_of(session, ref)
        except HsmError:
            # Imported keys (HA replicas, migrated partitions) often come without a public key
            # object: then the private key proves the match by a signature the certificate
            # verifies.
            if not _signs_for(session, ref, certified):
                raise mismatch from None
            return
        if _spki(public) != _spki(certified):
            raise mismatch

    def _library(self, module: str) -> Any:
        if "/" in module and not Path(module).is_file():
            raise HsmError(f"PKCS#11 module {module} does not exist (check pkcs11.module)")
        try:
            lib = open_library(module)
        except HsmError as exc:
            raise HsmError(f"cannot load the PKCS#11 module {module}: {exc.__cause__}") from exc
        self._modules.add(module)
        return lib

    @staticmethod
    def _no_token(lib: Any, token: TokenRef) -> str:
        try:
            with hsm_errors("listing tokens"):
                seen = [
                    f"{t.label!r} (serial {t.serial.decode(errors='replace').strip()})"
                    for t in lib.get_tokens()
                    if t.label or t.serial.strip()  # SoftHSM2's free slot has neither
                ]
        except HsmError:
            seen = []
        wanted = f"label {token.label!r}" if token.label else f"serial {token.serial!r}"
        if token.label and token.serial:
            wanted += f" and serial {token.serial!r}"
        text = f"no token with {wanted} in {token.module}; it sees: {', '.join(seen) or 'none'}"
        if "softhsm" in token.module.lower():
            conf = os.environ.get("SOFTHSM2_CONF", "unset, so /etc/softhsm/softhsm2.conf")
            text += f" (SoftHSM2 reads the token directory from SOFTHSM2_CONF: {conf})"
        return text


def _signs_for(session: Any, ref: KeyRef, certified: Any) -> bool:
    """Whether the token's private key signs what `certified` (a public key) verifies."""
    if not isinstance(certified, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        return False
    probe = os.urandom(32)
    try:
        key = signing_key(session, ref, certified)
        if isinstance(certified, rsa.RSAPublicKey) and isinstance(key, rsa.RSAPrivateKey):
            signature = key.sign(probe, padding.PKCS1v15(), hashes.SHA256())
            certified.verify(signature, probe, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(certified, ec.EllipticCurvePublicKey) and isinstance(
            key, ec.EllipticCurvePrivateKey
        ):
            signature = key.sign(probe, ec.ECDSA(hashes.SHA256()))
            certified.verify(signature, probe, ec.ECDSA(hashes.SHA256()))
        else:
            return False
    except (HsmError, InvalidSignature, TypeError, ValueError):
        return False
    return True
