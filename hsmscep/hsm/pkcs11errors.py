"""The one conversion of python-pkcs11's errors: every PKCS11Error leaves hsm/ as HsmError.

Decryption failures are the exception and are sorted where the decrypt runs (keyops): a bad
ciphertext is the client's fault and becomes a MessageError there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pkcs11

from hsmscep.errors import HsmError


@contextmanager
def hsm_errors(what: str) -> Iterator[None]:
    """Raise any PKCS11Error inside as HsmError naming `what` (the cause is kept)."""
    try:
        yield
    except pkcs11.PKCS11Error as exc:
        raise HsmError(f"PKCS#11 error while {what}: {type(exc).__name__} {exc}".strip()) from exc
