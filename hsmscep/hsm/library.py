"""Loading a PKCS#11 module once per process, initialised with CKF_OS_LOCKING_OK.

python-pkcs11 0.10 calls C_Initialize(NULL), which promises single-threaded use: SoftHSM2 then
switches its locking off and two worker threads with their own sessions corrupt memory
(architecture.md). So C_Initialize is called here through the module's function list.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any

from pkcs11 import _pkcs11

from hsmscep.errors import HsmError
from hsmscep.hsm.pkcs11errors import hsm_errors

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
