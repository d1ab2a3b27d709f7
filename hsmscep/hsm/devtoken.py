"""A project-local SoftHSM2 token for development and tests (never the system token dir).

Creates `<dir>/softhsm2.conf` pointing at `<dir>/tokens`, initialises a token through the
PKCS#11 API itself (so no PIN ever appears on a command line), and keeps the user PIN in a
file readable only by its owner. Only `hsmscep dev` and the test fixtures use this.
"""

from __future__ import annotations

import ctypes
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from hsmscep.errors import HsmError
from hsmscep.hsm.library import open_library

SOFTHSM_MODULES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_TOKEN_INITIALIZED = 0x400


@dataclass(frozen=True, slots=True)
class DevToken:
    module: str
    label: str
    conf: Path
    pin_file: Path


def find_softhsm() -> str:
    for path in SOFTHSM_MODULES:
        if os.path.exists(path):
            return path
    raise HsmError("SoftHSM2 is not installed (apt-get install softhsm2)")


def write_conf(directory: Path) -> Path:
    """Write a SoftHSM2 config for `directory` and point this process at it."""
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = directory / "softhsm2.conf"
    if not conf.exists():
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    return conf


def _secret_file(path: Path, nbytes: int) -> str:
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(nbytes) + "\n")
    return path.read_text().strip()


def ensure_token(directory: Path, label: str = "hsmscep-dev") -> DevToken:
    """Create (or reuse) a token called `label` under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    conf = write_conf(directory)
    pin_file = directory / "pin"
    pin = _secret_file(pin_file, 8)
    module = find_softhsm()
    lib = open_library(module)
    if not any(t.label == label for t in lib.get_tokens()):
        _init_token(module, lib, label, pin)
    return DevToken(module, label, conf, pin_file)


def _init_token(module: str, lib: object, label: str, pin: str) -> None:
    slots = [s for s in lib.get_slots() if not s.get_token().flags & _TOKEN_INITIALIZED]  # type: ignore[attr-defined]
    if not slots:
        raise HsmError("SoftHSM2 offers no free slot for a new token")
    so_pin = secrets.token_hex(16).encode()  # nobody needs the SO PIN of a dev token again
    dll = ctypes.CDLL(module)
    rv = dll.C_InitToken(
        ctypes.c_ulong(slots[0].slot_id),
        ctypes.c_char_p(so_pin),
        ctypes.c_ulong(len(so_pin)),
        ctypes.c_char_p(label.encode().ljust(32)[:32]),
    )
    if rv != 0:
        raise HsmError(f"C_InitToken failed: 0x{rv:x}")
    token = next(t for t in lib.get_tokens() if t.label == label)  # type: ignore[attr-defined]
    with token.open(rw=True, so_pin=so_pin.decode()) as session:
        session.init_pin(pin)
