"""Loading a PKCS#11 module once per process, initialised with CKF_OS_LOCKING_OK, and
re-initialising it when the HSM went away (C_Finalize + C_Initialize, production-hsm.md).

python-pkcs11 0.10 calls C_Initialize(NULL), which promises single-threaded use: SoftHSM2 then
switches its locking off and two worker threads with their own sessions corrupt memory
(architecture.md). So C_Initialize is called here, with CKF_OS_LOCKING_OK, on the very function
list python-pkcs11 calls through: proxy modules (p11-kit-client.so) hand out a new list on each
C_GetFunctionList, and initialising another one leaves python-pkcs11's uninitialised.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pkcs11
from pkcs11 import _pkcs11

from hsmscep.errors import HsmError, HsmUnavailable

_CKF_OS_LOCKING_OK = 0x00000002
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x00000190
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x00000191
_POINTER = ctypes.sizeof(ctypes.c_void_p)
# How long a re-initialisation waits for calls still inside the module (a hung network call).
QUIESCE_SECONDS = 10.0


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


def _own_function_list(lib: Any) -> Any:
    """The CK_FUNCTION_LIST python-pkcs11 loaded for `lib` (its cdef `funclist` member).

    python-pkcs11 does not expose the pointer; its `HasFuncList` base holds it right after the
    object header. The layout is checked, so another python-pkcs11 build fails loudly here
    instead of calling through a wrong pointer.
    """
    base: Any = _pkcs11.HasFuncList  # type: ignore[attr-defined]  # not in the stubs
    if base.__basicsize__ != object.__basicsize__ + 3 * _POINTER or not isinstance(lib, base):
        raise HsmError("unsupported python-pkcs11 build: cannot find its PKCS#11 function list")
    address = ctypes.c_void_p.from_address(id(lib) + object.__basicsize__).value
    if not address:
        raise HsmError(f"{lib.so}: python-pkcs11 holds no function list")
    head = ctypes.cast(address, ctypes.POINTER(_CkFunctionListHead)).contents
    if head.version.major not in (2, 3):
        raise HsmError(f"{lib.so}: function list has PKCS#11 version {head.version.major}")
    return head


class _LockingLib(_pkcs11.lib):
    """python-pkcs11's lib, but C_Initialize gets CKF_OS_LOCKING_OK instead of NULL."""

    def initialize(self) -> None:  # a cpdef override: python-pkcs11's __init__ calls it
        args = _CkInitializeArgs(flags=_CKF_OS_LOCKING_OK)
        rv = _own_function_list(self).C_Initialize(ctypes.cast(ctypes.byref(args), ctypes.c_void_p))
        if rv not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise HsmUnavailable(f"C_Initialize of {self.so} failed: 0x{rv:x}")

    def finalize_locked(self) -> None:
        _own_function_list(self).C_Finalize(None)


class Module:
    """One PKCS#11 module in this process: its python-pkcs11 lib and a gate.

    Every call that uses a session runs inside `in_use()`; `restart()` closes the gate, waits
    for those calls, then C_Finalize + C_Initialize. `generation` counts restarts: a session
    opened before one is dead (and its handle may now name another thread's session).
    """

    def __init__(self, so: str) -> None:
        self.so = so
        try:
            self.lib: Any = _LockingLib(so)
        except pkcs11.PKCS11Error as exc:  # a wrong path is not transient: no retries
            raise HsmError(f"cannot load the PKCS#11 module {so}: {exc}") from exc
        self.generation = 0
        self.initialised = True
        self._lock = threading.Lock()  # held for a counter update only: the hot path
        self._users = 0
        self._closed = False
        self._drained = threading.Event()
        self._restarting = threading.Lock()

    def enter(self, generation: int) -> None:
        """Count one call on a session opened in `generation` (leave() when it returns)."""
        with self._lock:
            if self._closed or generation != self.generation or not self.initialised:
                raise HsmUnavailable(f"{self.so} was re-initialised: the session is gone")
            self._users += 1

    def leave(self) -> None:
        with self._lock:
            self._users -= 1
            if self._closed and not self._users:
                self._drained.set()

    @contextmanager
    def in_use(self, generation: int) -> Iterator[None]:
        """Hold the module for one call on a session opened in `generation`."""
        self.enter(generation)
        try:
            yield
        finally:
            self.leave()

    def restart(self) -> None:
        """C_Finalize (every session dies) and C_Initialize again, once no call is inside."""
        with self._restarting:
            with self._lock:
                self._closed = True  # new calls fail fast instead of queueing behind us
                if self._users:
                    self._drained.clear()
                else:
                    self._drained.set()
            try:
                if not self._drained.wait(QUIESCE_SECONDS):
                    raise HsmUnavailable(f"{self.so}: calls still in flight, not re-initialised")
                if self.initialised:
                    self.lib.finalize_locked()
                self.generation += 1
                self.initialised = False
                self.lib.initialize()
                self.initialised = True
            finally:
                with self._lock:
                    self._closed = False


_modules: dict[str, Module] = {}
_modules_lock = threading.Lock()


def open_module(so: str) -> Module:
    """Load and initialise a PKCS#11 module once per process."""
    with _modules_lock:
        module = _modules.get(so)
        if module is None:
            module = _modules[so] = Module(so)
        return module


def open_library(so: str) -> Any:
    """python-pkcs11's lib of a module loaded with open_module."""
    return open_module(so).lib


def close_library(so: str) -> None:
    """C_Finalize a module opened with open_library (sessions become invalid)."""
    with _modules_lock:
        module = _modules.pop(so, None)
    if module is not None and module.initialised:
        module.lib.finalize_locked()
