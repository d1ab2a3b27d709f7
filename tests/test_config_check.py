"""Unknown keys and HSMSCEP_* variables are refused with the closest known name, and
`hsmscep config check` validates everything and prints the configuration without secrets."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hsmscep.config.settings import RUNTIME_VARIABLES, SECTION_KEYS, load_settings
from hsmscep.errors import ConfigError
from hsmscep.web import affinity, balance
from tests.conftest import DevCa

BASE = {
    "server": 'port = 8080\nhost = "127.0.0.1"',
    "pkcs11": 'module = "/nonexistent/lib.so"\ntoken_label = "t"\npin_env = "TEST_PIN"',
    "ca": 'key_label = "ca"\ncert = "ca.pem"',
    "ra": 'key_label = "ra"\ncert = "ra.pem"',
    "ra_decrypt": 'key_label = "ra-dec"\ncert = "ra-dec.pem"',
    "enroll": 'challenge_mode = "none"\nvalidity_days = 30',
    "store": 'path = "x.db"',
    "log": 'level = "INFO"',
    "crl": "next_update_hours = 24",
    "renewal": "enabled = true",
    "admin": 'token_env = "HSMSCEP_TEST_ADMIN_TOKEN"',
    "rollover": 'state = "rollover.json"',
    "metrics": "enabled = true",
    "profiles.wifi": 'challenge_mode = "none"',
    "cas.second": 'key_label = "ca2"\nra_key_label = "ra2"',
    "profiles.wifi.template": "validity_days = 10",
    "enroll.notify": 'url = "http://127.0.0.1:9/hook"\nsecret_env = "HOOK_SECRET"',
}
ENV = {"TEST_PIN": "1234", "HOOK_SECRET": "s" * 20, "HSMSCEP_TEST_ADMIN_TOKEN": "a" * 20}

# A misspelling per section, and the key the error must suggest.
TYPOS = {
    "server": ("prot", "port"),
    "pkcs11": ("token_lable", "token_label"),
    "ca": ("chian", "chain"),
    "ra": ("key_lable", "key_label"),
    "ra_decrypt": ("crt", "cert"),
    "enroll": ("validity_day", "validity_days"),
    "store": ("pth", "path"),
    "log": ("levle", "level"),
    "crl": ("base_ur", "base_url"),
    "renewal": ("enable", "enabled"),
    "admin": ("token_fil", "token_file"),
    "rollover": ("stat", "state"),
    "metrics": ("requre_admin_token", "require_admin_token"),
    "profiles.wifi": ("aproval", "approval"),
    "cas.second": ("ra_crt", "ra_cert"),
    "profiles.wifi.template": ("validity_day", "validity_days"),
    "enroll.notify": ("timeout_second", "timeout_seconds"),
}


def write_config(directory: Path, extra: dict[str, str] | None = None) -> Path:
    extra = extra or {}
    tables = {section: body + "\n" + extra.get(section, "") for section, body in BASE.items()}
    path = directory / "hsmscep.toml"
    path.write_text("".join(f"[{section}]\n{body}\n" for section, body in tables.items()))
    return path


def test_the_base_config_loads(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path), ENV)
    assert settings.store.path == tmp_path / "x.db"
    assert settings.profiles.get("wifi") is not None


def test_every_plain_section_has_a_typo_case() -> None:
    assert set(SECTION_KEYS) | {"enroll"} <= set(TYPOS)


@pytest.mark.parametrize("section", sorted(TYPOS))
def test_an_unknown_key_names_key_file_and_closest_key(tmp_path: Path, section: str) -> None:
    typo, meant = TYPOS[section]
    config = write_config(tmp_path, {section: f"{typo} = 1"})
    with pytest.raises(ConfigError) as info:
        load_settings(config, ENV)
    message = str(info.value)
    assert f"{section}.{typo}" in message
    assert f"did you mean {section}.{meant}?" in message
    if "." not in section or section.split(".")[0] in ("profiles", "cas"):
        assert str(config) in message  # the file (sub-tables name their full dotted key)


def test_an_unknown_section_is_refused_with_the_closest(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    config.write_text(config.read_text() + "[sever]\nport = 1\n")
    expected = r"unknown section \[sever\] in .*did you mean \[server\]"
    with pytest.raises(ConfigError, match=expected):
        load_settings(config, ENV)


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("HSMSCEP_SERVER_PROT", "HSMSCEP_SERVER_PORT"),
        ("HSMSCEP_STORE_PTH", "HSMSCEP_STORE_PATH"),
        ("HSMSCEP_RENEWAL_ENABLE", "HSMSCEP_RENEWAL_ENABLED"),
        ("HSMSCEP_CRL_BASE_UR", "HSMSCEP_CRL_BASE_URL"),
        ("HSMSCEP_SEVER_PORT", "HSMSCEP_SERVER_PORT"),
        ("HSMSCEP_PROFILES_WIFI_APROVAL", "HSMSCEP_PROFILES_WIFI_APPROVAL"),
    ],
)
def test_an_unknown_variable_is_refused(tmp_path: Path, variable: str, meant: str) -> None:
    config = write_config(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_settings(config, ENV | {variable: "x"})
    message = str(info.value)
    assert variable in message and f"did you mean {meant}?" in message and str(config) in message


def test_known_variables_pass(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    env = ENV | {
        "HSMSCEP_SERVER_PORT": "9000",
        "HSMSCEP_STORE_PATH": "y.db",
        "HSMSCEP_PROFILES_WIFI_APPROVAL": "manual",
        "HSMSCEP_CAS_SECOND_RA_CERT": "r2.pem",
        **{name: "x" for name in RUNTIME_VARIABLES},
    }
    settings = load_settings(config, env)
    assert settings.server.port == 9000 and settings.store.path == tmp_path / "y.db"
    assert settings.profiles.get("wifi").manual_approval
    # A PIN variable named by the file may be called anything, HSMSCEP_ included.
    config.write_text(config.read_text().replace('"TEST_PIN"', '"HSMSCEP_MY_PIN"'))
    load_settings(config, env | {"HSMSCEP_MY_PIN": "1234"})


def test_the_command_own_variables_are_runtime_variables() -> None:
    assert {balance.TABLE_ENV, affinity.ENV, "HSMSCEP_CONFIG"} <= RUNTIME_VARIABLES


def test_a_bad_log_level_is_a_config_error(tmp_path: Path) -> None:
    config = write_config(tmp_path, {"log": ""})
    config.write_text(config.read_text().replace('level = "INFO"', 'level = "INFOO"'))
    with pytest.raises(ConfigError, match=r"log.level has value 'INFOO'.*did you mean INFO\?"):
        load_settings(config, ENV)


def check(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hsmscep", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_config_check_prints_the_effective_configuration_without_secrets(dev_ca: DevCa) -> None:
    result = check(dev_ca.config)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "ca.key.label = 'hsmscep-ca'" in out
    assert f"store.path = {dev_ca.directory / 'hsmscep.db'}" in out
    assert "# ok: token label 'hsmscep-test'" in out and "CA key label='hsmscep-ca': found" in out
    assert "pkcs11.token.pin = (set)" in out and "enroll.challenge = (set)" in out
    pin = (dev_ca.directory / "pin").read_text().strip()
    assert pin not in out and dev_ca.challenge not in out


def test_config_check_fails_on_a_missing_key(dev_ca: DevCa, tmp_path: Path) -> None:
    config = tmp_path / "hsmscep.toml"
    for name in ("pin", "challenge", "ca.pem", "ra.pem"):
        (tmp_path / name).write_bytes((dev_ca.directory / name).read_bytes())
    config.write_text(dev_ca.config.read_text().replace('"hsmscep-ra"', '"no-such-ra"', 1))
    result = check(config)
    assert result.returncode == 3
    assert (
        result.stderr.strip().splitlines() == [result.stderr.strip()]
        and "RA key label='no-such-ra'" in result.stderr
    )
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("section", "key"), [("pkcs11", "pin"), ("admin", "token")])
def test_an_inline_secret_says_where_it_goes(tmp_path: Path, section: str, key: str) -> None:
    config = write_config(tmp_path, {section: f'{key} = "12345678901234567890"'})
    with pytest.raises(ConfigError, match=rf"{section}.{key} must not be written.*{key}_env"):
        load_settings(config, ENV)


def test_config_check_covers_every_ca(dev_ca: DevCa, tmp_path: Path) -> None:
    for name in ("pin", "challenge", "ca.pem", "ra.pem"):
        (tmp_path / name).write_bytes((dev_ca.directory / name).read_bytes())
    config = tmp_path / "hsmscep.toml"
    extra = '\n[cas.second]\nkey_label = "second-ca"\nra_key_label = "second-ra"\n'
    config.write_text(dev_ca.config.read_text() + extra)
    result = check(config)
    assert result.returncode == 2
    assert "cas.second.cert" in result.stderr and "second-ca.pem does not exist" in result.stderr
