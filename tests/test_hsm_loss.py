"""Network HSM behaviour against real modules: one C_Login for a wrong PIN (counted by the
pass-through module bench/p11shim.c), a server on p11-kit-client.so, the remote token killed
and started again under load, and each transient CK_RV injected into a live signing pool.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.hashes import SHA256

from hsmscep.errors import HsmError, PinRefused
from hsmscep.hsm import library
from hsmscep.hsm.keyring import Keyring
from hsmscep.hsm.login import TokenLogin
from hsmscep.hsm.pool import SigningPool
from hsmscep.hsm.refs import KeyRef
from tests.conftest import DevCa, free_port, key_source, start_server
from tests.hsmfaults import (
    P11KIT_CLIENT,
    Load,
    RemoteToken,
    build_shim,
    copy_ca,
    login_lines,
    private_module,
    stored_serials,
)

pytestmark = pytest.mark.hsm


@pytest.fixture(scope="session")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory)


def test_a_wrong_pin_is_presented_once_by_serve(dev_ca: DevCa, shim: Path, tmp_path: Path) -> None:
    logins = tmp_path / "logins"
    ca = copy_ca(dev_ca, tmp_path / "ca", str(shim), pin="0000wrong")
    env = dict(os.environ, P11SHIM_MODULE=dev_ca.token.module, P11SHIM_LOG=str(logins))
    command = [sys.executable, "-m", "hsmscep", "serve", "--config", str(ca.config)]
    result = subprocess.run(
        [*command, "--port", str(free_port()), "--workers", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "CKR_PIN_INCORRECT" in line]
    assert len(lines) == 1 and "hsmscep-test" in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert login_lines(logins) == ["C_Login 0xa0"]


def test_a_wrong_pin_is_presented_once_by_init(dev_ca: DevCa, shim: Path, tmp_path: Path) -> None:
    logins = tmp_path / "logins"
    ca = copy_ca(dev_ca, tmp_path / "ca", str(shim), pin="0000wrong")
    env = dict(os.environ, P11SHIM_MODULE=dev_ca.token.module, P11SHIM_LOG=str(logins))
    result = subprocess.run(
        [sys.executable, "-m", "hsmscep", "init", "--config", str(ca.config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0 and "CKR_PIN_INCORRECT" in result.stderr, result.stderr
    assert login_lines(logins) == ["C_Login 0xa0"]


def test_a_refused_pin_is_never_presented_again_in_a_process(
    dev_ca: DevCa, shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "logins"
    module = private_module(shim, tmp_path, "shim-pin.so")
    monkeypatch.setenv("P11SHIM_MODULE", dev_ca.token.module)
    monkeypatch.setenv("P11SHIM_LOG", str(log))
    ref = dev_ca.settings.ca.key.token
    wrong = type(ref)(module=module, label=ref.label, pin="0000wrong")
    logins = TokenLogin()
    try:
        for _ in range(3):
            with pytest.raises(PinRefused, match="CKR_PIN_INCORRECT"):
                logins.open_session(wrong)
        assert logins.state(wrong) == (False, str(logins._tokens[wrong].refused))
    finally:
        logins.close()
    assert login_lines(log) == ["C_Login 0xa0"]


@pytest.fixture
def remote(dev_ca: DevCa, shim: Path, tmp_path: Path) -> RemoteToken:
    if shutil.which("p11-kit") is None or P11KIT_CLIENT is None:
        pytest.skip("p11-kit server and p11-kit-client.so are not installed")
    env = dict(os.environ, P11SHIM_MODULE=dev_ca.token.module, P11SHIM_LOG=str(tmp_path / "logins"))
    token = RemoteToken(tmp_path / "p11kit.sock", str(shim), "hsmscep-test", env)
    token.start()
    yield token
    token.kill()


def test_server_survives_the_remote_token_going_away_and_coming_back(
    dev_ca: DevCa, remote: RemoteToken, tmp_path: Path
) -> None:
    assert P11KIT_CLIENT is not None
    ca = copy_ca(dev_ca, tmp_path / "ca", P11KIT_CLIENT)
    env = {"P11_KIT_SERVER_ADDRESS": remote.address}
    server = start_server(ca, env, args=("--workers", "1"))
    logins = tmp_path / "logins"
    load = Load(server.url, ca.challenge, threads=4)
    try:
        load.start()
        assert load.wait_for(lambda: load.successes_since(0) >= 5, 60), server.output()
        before_loss = len(login_lines(logins))
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        remote.kill()
        lost_at = time.monotonic()
        assert load.wait_for(lambda: readyz(server.url).status_code == 503, 10)
        not_ready = readyz(server.url)
        assert not_ready.headers["retry-after"]
        hsm = not_ready.json()["checks"]["hsm"]
        token = hsm["tokens"][0]
        assert hsm["ready"] is False, hsm
        assert token["ready"] is False and "hsmscep-test" in token["token"], token
        time.sleep(2)
        remote.start()
        back_at = time.monotonic()
        assert load.wait_for(lambda: load.successes_since(back_at) >= 5, 20), server.output()
        recovered = min(o.at for o in load.outcomes if o.at >= back_at and o.pki_status == "0")
        assert load.wait_for(lambda: readyz(server.url).status_code == 200, 10)
        assert readyz(server.url).json()["checks"]["hsm"]["ready"] is True
    finally:
        load.stop()
        server.stop()
    during = [o for o in load.outcomes if lost_at <= o.at < back_at]
    assert during, "no request was made while the token was away"
    assert {o.status for o in load.outcomes} <= {200, 503}, server.output()
    assert all(o.retry_after for o in load.outcomes if o.status == 503)
    assert max(o.seconds for o in load.outcomes) < 15  # never a hang
    assert recovered - back_at < 10
    # Every certificate a client received is in the store.
    issued = {o.serial for o in load.outcomes if o.serial is not None}
    assert issued and issued <= stored_serials(ca.directory / "hsmscep.db")
    # One login on the fresh remote token, however many workers and requests there were.
    assert login_lines(logins)[before_loss:] == ["C_Login 0x0"]
    output = server.output()
    assert output.count("is unavailable") == 1 and output.count("is back after") == 1, output
    assert "Traceback" not in output


def readyz(url: str) -> httpx.Response:
    return httpx.get(f"{url}/readyz", timeout=10)


TRANSIENT = {
    "CKR_SESSION_HANDLE_INVALID": 0xB3,
    "CKR_SESSION_CLOSED": 0xB0,
    "CKR_DEVICE_REMOVED": 0x32,
    "CKR_TOKEN_NOT_PRESENT": 0xE0,
    "CKR_DEVICE_ERROR": 0x30,
    "CKR_USER_NOT_LOGGED_IN": 0x101,
}


def test_each_transient_return_code_fails_fast_and_recovers(
    dev_ca: DevCa, shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault = tmp_path / "fault"
    log = tmp_path / "logins"
    softhsm = private_module(dev_ca.token.module, tmp_path, "softhsm-private.so")
    module = private_module(shim, tmp_path, "shim-faults.so")
    monkeypatch.setenv("P11SHIM_MODULE", softhsm)
    monkeypatch.setenv("P11SHIM_FAULT", str(fault))
    monkeypatch.setenv("P11SHIM_LOG", str(log))
    source = key_source(dev_ca)
    token = type(source.ca_key.token)(
        module=module, label=source.ca_key.token.label, pin=source.ca_key.token.pin
    )

    def moved(ref: KeyRef) -> KeyRef:
        return KeyRef(token, ref.label, ref.id)

    source = type(source)(
        moved(source.ca_key),
        source.ca_cert,
        moved(source.ra_sign_key),
        source.ra_sign_cert,
        [(moved(k), c) for k, c in source.decrypt],
    )
    ca_public = source.ca_cert.public_key()

    def sign(keys: Keyring) -> bytes:
        return keys.ca_key.sign(b"probe", padding.PKCS1v15(), SHA256())

    async def run() -> dict[str, float]:
        logins = TokenLogin()
        pool: SigningPool[Keyring] = SigningPool(
            lambda: Keyring.open(source, logins),
            size=3,
            max_pending=100,
            close_context=Keyring.close,
            stale=Keyring.stale,
        )
        await pool.start()
        recovery: dict[str, float] = {}
        try:
            for name, rv in TRANSIENT.items():
                fault.write_text(f"{rv:x}\n")
                started = time.monotonic()
                results = await asyncio.gather(
                    *(pool.run(sign) for _ in range(6)), return_exceptions=True
                )
                assert all(isinstance(r, HsmError) for r in results), (name, results)
                assert time.monotonic() - started < 10, name  # failed fast
                fault.unlink()
                back = time.monotonic()
                for _ in range(200):  # bounded: about 10 s
                    try:
                        signature = await pool.run(sign)
                        break
                    except HsmError:
                        await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"no recovery after {name}")
                ca_public.verify(signature, b"probe", padding.PKCS1v15(), SHA256())  # type: ignore[union-attr, call-arg, arg-type]
                recovery[name] = time.monotonic() - back
        finally:
            await pool.aclose()
            logins.close()
        return recovery

    recovery = asyncio.run(run())
    assert set(recovery) == set(TRANSIENT)
    assert max(recovery.values()) < 10
    # Every login attempt was either refused by the injected fault or the one that worked.
    assert all(line.startswith("C_Login 0x") for line in login_lines(log))


def test_a_pin_refused_after_a_loss_is_not_presented_again(
    dev_ca: DevCa, shim: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fault, login_fault, log = tmp_path / "fault", tmp_path / "login-fault", tmp_path / "logins"
    monkeypatch.setenv("P11SHIM_MODULE", private_module(dev_ca.token.module, tmp_path, "s.so"))
    monkeypatch.setenv("P11SHIM_FAULT", str(fault))
    monkeypatch.setenv("P11SHIM_LOGIN_FAULT", str(login_fault))
    monkeypatch.setenv("P11SHIM_LOG", str(log))
    ref = dev_ca.settings.ca.key.token
    token = type(ref)(private_module(shim, tmp_path, "shim-relogin.so"), ref.label, pin=ref.pin)
    source = key_source(dev_ca)
    moved = [KeyRef(token, k.label, k.id) for k in (source.ca_key, source.ra_sign_key)]
    source = type(source)(
        moved[0], source.ca_cert, moved[1], source.ra_sign_cert, [(moved[1], source.ra_sign_cert)]
    )
    logins = TokenLogin()
    try:
        keys = Keyring.open(source, logins)
        keys.ca_key.sign(b"probe", padding.PKCS1v15(), SHA256())  # type: ignore[call-arg, arg-type]
        fault.write_text("e0\n")  # CKR_TOKEN_NOT_PRESENT: the HSM goes away ...
        login_fault.write_text("a0\n")  # ... and comes back with another PIN
        with pytest.raises(HsmError):
            keys.ca_key.sign(b"probe", padding.PKCS1v15(), SHA256())  # type: ignore[call-arg, arg-type]
        fault.unlink()
        deadline = time.monotonic() + 3  # several probe rounds and reopen attempts
        while time.monotonic() < deadline:
            with pytest.raises(HsmError):
                Keyring.open(source, logins)
            time.sleep(0.1)
        assert logins.state(token)[0] is False
        assert "CKR_PIN_INCORRECT" in logins.state(token)[1]
    finally:
        logins.close()
    assert login_lines(log).count("C_Login 0xa0") == 1, login_lines(log)


def test_locking_initialises_the_function_list_python_pkcs11_calls(dev_ca: DevCa) -> None:
    """SoftHSM2 returns one list on every C_GetFunctionList: the pointer read from
    python-pkcs11's lib object must be that list (p11-kit-client, which returns a new list per
    call, is covered by the server test above)."""
    so = dev_ca.token.module
    lib = library.open_library(so)
    get_list = ctypes.CDLL(so).C_GetFunctionList
    get_list.argtypes = [ctypes.POINTER(ctypes.c_void_p)]
    address = ctypes.c_void_p()
    assert get_list(ctypes.byref(address)) == 0
    own = library._own_function_list(lib)
    assert ctypes.addressof(own) == address.value
