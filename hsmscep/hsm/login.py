"""Tokens and sessions: find a token by label or serial, log in once per process and token,
open further sessions without a PIN, and recover when the HSM goes away and comes back.

Login belongs to the process and token: one login session per token stays open for the life
of the process (architecture.md). A PIN the token refuses is final: it is never presented
again by this process (network HSMs lock the role after a few failures, production-hsm.md).
Transient trouble (no token yet, device error, session lost) is retried, bounded and logged
once: first on a fresh session, then by C_Finalize + C_Initialize of the module.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pkcs11

from hsmscep.errors import HsmError, HsmUnavailable, PinRefused
from hsmscep.hsm.library import Module, close_library, open_module
from hsmscep.hsm.pkcs11errors import hsm_errors
from hsmscep.hsm.refs import TokenRef

log = logging.getLogger(__name__)

START_ATTEMPTS = 6  # the first login of a process: SoftHSM2's start-up races (below)
MAX_BACKOFF = 5.0  # seconds between probes of a token that is gone


def describe(ref: TokenRef) -> str:
    what = f"label={ref.label!r}" if ref.label else f"serial={ref.serial!r}"
    return f"token {what} in {ref.module}"


def find_token(ref: TokenRef) -> Any:
    lib = open_module(ref.module).lib
    with hsm_errors("looking up the token"):
        tokens = [
            t
            for t in lib.get_tokens()
            if (ref.label is None or t.label == ref.label)
            and (ref.serial is None or t.serial.decode(errors="replace").strip() == ref.serial)
        ]
    if len(tokens) != 1:
        found = "no token" if not tokens else f"{len(tokens)} tokens"
        raise HsmUnavailable(f"{found} with {describe(ref).removeprefix('token ')}")
    return tokens[0]


@dataclass(frozen=True, slots=True)
class Guarded:
    """A session and the module generation it was opened in (see Module.in_use)."""

    session: Any
    module: Module
    generation: int

    def in_use(self) -> Any:
        return self.module.in_use(self.generation)


@dataclass(slots=True)
class _TokenState:
    login: Any = None  # the logged-in read-write session
    generation: int = -1  # the module generation it belongs to
    refused: PinRefused | None = None
    down_since: float | None = None
    retry_at: float = 0.0
    backoff: float = 0.25
    reason: str = ""
    started: bool = False  # logged in once in this process


class TokenLogin:
    """Holds the one logged-in session a process keeps per token; opens further sessions."""

    def __init__(self) -> None:
        self._tokens: dict[TokenRef, _TokenState] = {}
        # One login or recovery at a time per process: never two C_Login for one token.
        self._lock = threading.RLock()
        # Counts tokens going and coming back: keyrings opened before a change rebalance.
        self.epoch = 0
        self._prober: threading.Thread | None = None
        self._closing = threading.Event()

    def open_session(self, ref: TokenRef, *, rw: bool = False) -> Any:
        """A new read-only session, or (rw=True) the shared logged-in read-write one."""
        return self.open_guarded(ref, rw=rw).session

    def open_guarded(self, ref: TokenRef, *, rw: bool = False) -> Guarded:
        with self._lock:
            module, state = self._logged_in(ref)
            # Taken under the lock: lost() may drop the login once we let go.
            login, generation = state.login, state.generation
        if rw:
            return Guarded(login, module, generation)
        try:
            with module.in_use(generation), hsm_errors("opening a session"):
                return Guarded(login.token.open(), module, generation)
        except HsmUnavailable as exc:
            self.lost(ref, generation, exc)
            raise

    def is_down(self, ref: TokenRef) -> bool:
        st = self._tokens.get(ref)
        return st is not None and (st.refused is not None or st.down_since is not None)

    def state(self, ref: TokenRef) -> tuple[bool, str]:
        """(usable, why not) for readiness: no HSM call, the last thing this process saw."""
        st = self._tokens.get(ref)
        if st is None:
            return False, "not logged in yet"
        if st.refused is not None:
            return False, str(st.refused)
        if st.down_since is not None:
            return False, st.reason
        return st.login is not None, ""

    def lost(self, ref: TokenRef, generation: int, exc: BaseException) -> None:
        """A call on a session of `ref` failed transiently: log the token in again on a fresh
        session, else re-initialise the module; until that works, callers fail fast."""
        with self._lock:
            st = self._tokens.setdefault(ref, _TokenState())
            module = open_module(ref.module)
            if st.generation != generation or st.login is None:
                return  # another thread already recovered or gave up
            old, st.login = st.login, None
            self._went_down(ref, st, exc)
            try:
                # A fresh session first: the login usually survives a lost session.
                self._log_in(ref, module, st)
                _close(old)
            except PinRefused as refused:
                self._went_down(ref, st, refused)  # logged once; never presented again
            except HsmError:
                if not self._others_healthy(ref):
                    _restart_quietly(module)
                st.retry_at = 0.0  # the next caller logs in on the fresh module

    def close(self) -> None:
        self._closing.set()
        if self._prober is not None:
            self._prober.join(timeout=MAX_BACKOFF + 1)
        with self._lock:
            for st in self._tokens.values():
                _close(st.login)
                st.login = None
            self._tokens.clear()

    def _logged_in(self, ref: TokenRef) -> tuple[Module, _TokenState]:
        st = self._tokens.setdefault(ref, _TokenState())
        if st.refused is not None:
            raise st.refused  # never present a refused PIN again
        if not st.started:
            return self._first_login(ref, st)
        module = open_module(ref.module)
        if st.login is not None and st.generation == module.generation and module.initialised:
            return module, st
        if st.down_since is not None and time.monotonic() < st.retry_at:
            raise HsmUnavailable(f"{describe(ref)} is unavailable: {st.reason}")
        try:
            # Probing a token that went away: a proxy module only reconnects when initialised
            # again, unless another token of the module still works (HA partitions).
            if not module.initialised or (
                st.down_since is not None and not self._others_healthy(ref)
            ):
                module.restart()
            self._log_in(ref, module, st)
        except HsmError as exc:
            self._went_down(ref, st, exc)
            raise
        return module, st

    def _first_login(self, ref: TokenRef, st: _TokenState) -> tuple[Module, _TokenState]:
        # SoftHSM2 (and network HSMs during fail-over) sometimes answer "no token" or
        # CKR_GENERAL_ERROR while several processes start at once, as uvicorn's workers do;
        # SoftHSM2 reads its token directory at C_Initialize, so a retry re-initialises.
        for attempt in range(START_ATTEMPTS):
            try:
                module = open_module(ref.module)
                self._log_in(ref, module, st)
                st.started = True
                return module, st
            except PinRefused as exc:
                st.refused = exc  # the caller reports it: one line, not one per layer
                raise
            except HsmError as exc:
                if attempt == START_ATTEMPTS - 1 or not isinstance(exc, HsmUnavailable):
                    # From now on it is a token that is away: fail fast, probe on a backoff.
                    st.started = True
                    self._went_down(ref, st, exc, quiet=True)  # the caller reports it
                    raise
                if attempt == 0:
                    log.warning("%s not ready (%s); retrying", describe(ref), exc)
                if not self._others_healthy(ref):
                    _restart_quietly(open_module(ref.module))
                time.sleep(0.05 * 2**attempt)
        raise AssertionError("unreachable")

    def _others_healthy(self, ref: TokenRef) -> bool:
        return any(
            r != ref and r.module == ref.module and s.login is not None and s.down_since is None
            for r, s in self._tokens.items()
        )

    def _log_in(self, ref: TokenRef, module: Module, st: _TokenState) -> None:
        """One C_Login on a fresh read-write session (at most one per call)."""
        generation = module.generation
        with module.in_use(generation):
            token = find_token(ref)
            with hsm_errors(f"logging in to {describe(ref)}"):
                try:
                    session = token.open(user_pin=ref.pin, rw=True)
                except pkcs11.exceptions.UserAlreadyLoggedIn:
                    session = token.open(rw=True)
        st.login, st.generation = session, generation
        if st.down_since is not None:
            log.warning("%s is back after %.1f s", describe(ref), time.monotonic() - st.down_since)
        if st.down_since is not None:
            self.epoch += 1
        st.down_since, st.reason, st.backoff = None, "", 0.25

    def _went_down(
        self, ref: TokenRef, st: _TokenState, exc: BaseException, *, quiet: bool = False
    ) -> None:
        if isinstance(exc, PinRefused):
            st.refused = exc
            log.error("%s: %s; not trying that PIN again", describe(ref), exc)
            return
        now = time.monotonic()
        if st.down_since is None:
            st.down_since, st.backoff = now, 0.25
            self.epoch += 1
            log.log(
                logging.DEBUG if quiet else logging.ERROR,
                "%s is unavailable: %s",
                describe(ref),
                exc,
            )
        else:
            st.backoff = min(MAX_BACKOFF, st.backoff * 2)
        st.reason = str(exc)
        st.retry_at = now + st.backoff
        if self._prober is None or not self._prober.is_alive():
            self._prober = threading.Thread(target=self._probe, name="hsm-probe", daemon=True)
            self._prober.start()

    def _probe(self) -> None:
        """Log in again to tokens that went away, on their backoff, until none is down (a
        replica nobody is using would otherwise never be tried again)."""
        while not self._closing.wait(0.25):
            with self._lock:
                down = [(r, s) for r, s in self._tokens.items() if s.down_since is not None]
                if not down or self._closing.is_set():
                    return
                for ref, st in down:
                    if st.refused is None and time.monotonic() >= st.retry_at:
                        try:
                            self._logged_in(ref)
                        except HsmError:
                            pass  # _went_down logged it once and set the next probe


def _restart_quietly(module: Module) -> None:
    try:
        module.restart()
    except HsmError as exc:
        log.debug("re-initialising %s failed: %s", module.so, exc)


def _close(session: Any) -> None:
    if session is None:
        return
    try:
        session.close()
    except pkcs11.PKCS11Error:
        pass  # a dead session has nothing left to close


def check_logins(tokens: list[TokenRef], replicas: Sequence[TokenRef] = ()) -> None:
    """Log in to each token once and let go again (C_Finalize): the pre-flight a server's
    parent runs before any worker exists, so a refused PIN stops it after one C_Login. A
    replica may be away (the server starts on the others); a replica refusing its PIN may not."""
    logins = TokenLogin()
    try:
        for ref in dict.fromkeys([*tokens, *replicas]):
            try:
                logins.open_session(ref, rw=True)
            except PinRefused:
                raise
            except HsmError as exc:
                if ref not in replicas or ref in tokens:
                    raise
                log.warning("%s: %s; starting without it", describe(ref), exc)
    finally:
        logins.close()
        for module in dict.fromkeys(ref.module for ref in [*tokens, *replicas]):
            close_library(module)
