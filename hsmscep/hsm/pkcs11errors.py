"""PKCS11Error -> HsmError at the edge, by kind: a refused PIN is final (PinRefused), a lost
device, link or session is transient (HsmUnavailable), anything else is an HsmError.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11
from pkcs11 import exceptions as ck

from hsmscep.errors import HsmError, HsmUnavailable, PinRefused

# python-pkcs11 raises one class per CK_RV; the names operators look up in vendor manuals.
CKR_NAMES: dict[type[BaseException], str] = {
    ck.PinIncorrect: "CKR_PIN_INCORRECT (0xa0)",
    ck.PinInvalid: "CKR_PIN_INVALID (0xa1)",
    ck.PinLenRange: "CKR_PIN_LEN_RANGE (0xa2)",
    ck.PinExpired: "CKR_PIN_EXPIRED (0xa3)",
    ck.PinLocked: "CKR_PIN_LOCKED (0xa4)",
    ck.DeviceError: "CKR_DEVICE_ERROR (0x30)",
    ck.DeviceMemory: "CKR_DEVICE_MEMORY (0x31)",
    ck.DeviceRemoved: "CKR_DEVICE_REMOVED (0x32)",
    ck.TokenNotPresent: "CKR_TOKEN_NOT_PRESENT (0xe0)",
    ck.SessionClosed: "CKR_SESSION_CLOSED (0xb0)",
    ck.SessionHandleInvalid: "CKR_SESSION_HANDLE_INVALID (0xb3)",
    ck.UserNotLoggedIn: "CKR_USER_NOT_LOGGED_IN (0x101)",
    ck.GeneralError: "CKR_GENERAL_ERROR (0x5)",
    ck.FunctionFailed: "CKR_FUNCTION_FAILED (0x6)",
}
PIN_ERRORS = (ck.PinIncorrect, ck.PinInvalid, ck.PinLenRange, ck.PinExpired, ck.PinLocked)
# Lost device, link or login: a fresh session, or C_Finalize + C_Initialize, may cure them.
# Vendor codes for link loss have no class of their own (plain PKCS11Error): transient too.
TRANSIENT_ERRORS = (
    ck.DeviceError,
    ck.DeviceMemory,
    ck.DeviceRemoved,
    ck.TokenNotPresent,
    ck.SessionClosed,
    ck.SessionHandleInvalid,
    ck.UserNotLoggedIn,
    ck.GeneralError,
    ck.FunctionFailed,
)


def ckr_name(exc: BaseException) -> str:
    """The PKCS#11 return code of a python-pkcs11 error, as the spec names it."""
    name = CKR_NAMES.get(type(exc))
    if name is not None:
        return name
    return f"{type(exc).__name__} {exc}".strip()


def is_transient(exc: pkcs11.PKCS11Error) -> bool:
    return isinstance(exc, TRANSIENT_ERRORS) or type(exc) is pkcs11.PKCS11Error


def hsm_error(exc: pkcs11.PKCS11Error, what: str) -> HsmError:
    """The HsmError of its kind for a PKCS11Error raised while doing `what`."""
    if isinstance(exc, PIN_ERRORS):
        return PinRefused(f"the token refused the PIN while {what}: {ckr_name(exc)}")
    kind = HsmUnavailable if is_transient(exc) else HsmError
    return kind(f"PKCS#11 error while {what}: {ckr_name(exc)}")


@contextmanager
def hsm_errors(what: str) -> Iterator[None]:
    """Raise any PKCS11Error inside as HsmError naming `what` (the cause is kept)."""
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise hsm_error(exc, what) from exc
