"""The PKCS#11 adapter's public names in one namespace, for callers outside these modules.

The adapter lives in library (module initialisation with CKF_OS_LOCKING_OK), pkcs11errors
(PKCS11Error -> HsmError), login (tokens, the one login per token, sessions, retries),
tokenkeys (key objects on a token) and keyops (signing and decryption keys).
"""

from __future__ import annotations

from hsmscep.hsm.keyops import decryption_key, signing_key
from hsmscep.hsm.library import close_library, open_library
from hsmscep.hsm.login import TokenLogin, find_token
from hsmscep.hsm.pkcs11errors import hsm_errors
from hsmscep.hsm.tokenkeys import (
    destroy_key,
    find_private_key,
    generate_key,
    key_protection,
    private_key_exists,
    public_key_of,
)

__all__ = [
    "TokenLogin",
    "close_library",
    "decryption_key",
    "destroy_key",
    "find_private_key",
    "find_token",
    "generate_key",
    "hsm_errors",
    "key_protection",
    "open_library",
    "private_key_exists",
    "public_key_of",
    "signing_key",
]
