"""Tokens and sessions: find a token by label or serial, log in once per process and token,
open further sessions without a PIN, and retry while the HSM is not ready.

Login belongs to the process and token: a second C_Login fails and closing the session that
logged in logs every session out, so one login session per token stays open for the life of
the process (architecture.md). A session serialises its operations: each worker owns its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pkcs11

from hsmscep.errors import HsmError
from hsmscep.hsm.library import close_library, open_library
from hsmscep.hsm.pkcs11errors import hsm_errors
from hsmscep.hsm.refs import TokenRef

log = logging.getLogger(__name__)
T = TypeVar("T")


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
