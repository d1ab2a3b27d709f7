"""Names of keys and tokens as configured: which module, which token, which key.

Pure values (no python-pkcs11 import), so configuration and the CLI can hold them without
loading a PKCS#11 module. Tokens are found by label or serial and keys by CKA_LABEL and/or
CKA_ID, never by slot number: slot numbers change when an HSM is reconfigured.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

KeySpec = Literal["rsa2048", "rsa3072", "rsa4096", "p256", "p384"]
KEY_SPECS: tuple[KeySpec, ...] = ("rsa2048", "rsa3072", "rsa4096", "p256", "p384")


@dataclass(frozen=True, slots=True)
class TokenRef:
    """Where keys live: a module and a token found by label or serial (slot ids move)."""

    module: str
    label: str | None = None
    serial: str | None = None
    pin: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class KeyRef:
    """A private key on a token, by CKA_LABEL and/or CKA_ID."""

    token: TokenRef
    label: str | None = None
    id: bytes | None = None

    def describe(self) -> str:
        parts = [f"label={self.label!r}"] if self.label else []
        if self.id:
            parts.append(f"id={self.id.hex()}")
        return " ".join(parts) or "<unnamed>"
