"""[store] url selects PostgreSQL; its password comes from a file or the environment only."""

from __future__ import annotations

from pathlib import Path

import pytest

from hsmscep.cli.dev import dev_config
from hsmscep.config.settings import load_settings
from hsmscep.errors import ConfigError


def config(tmp_path: Path, store: str) -> Path:
    (tmp_path / "pin").write_text("1234\n")
    (tmp_path / "challenge").write_text("secret\n")
    text = dev_config("/nonexistent/libpkcs11.so", "t", "pin", "challenge")
    path = tmp_path / "hsmscep.toml"
    path.write_text(text.replace('[store]\npath = "hsmscep.db"\n', f"[store]\n{store}\n"))
    return path


def test_sqlite_stays_the_default(tmp_path: Path) -> None:
    settings = load_settings(config(tmp_path, ""), {})
    assert settings.store.url is None
    assert settings.store.location == tmp_path / "hsmscep.db"


def test_url_with_password_file(tmp_path: Path) -> None:
    (tmp_path / "dbpass").write_text("s3cret\n")
    url = "postgresql://hsmscep@db.example:5432/pki"
    path = config(tmp_path, f'url = "{url}"\npassword_file = "dbpass"')
    settings = load_settings(path, {})
    assert settings.store.location == url and settings.store.password == "s3cret"
    assert "s3cret" not in repr(settings.store)


def test_password_from_env_and_url_override(tmp_path: Path) -> None:
    env = {
        "HSMSCEP_STORE_URL": "postgres://node@127.0.0.1/pki",
        "HSMSCEP_STORE_PASSWORD": "from-env",
    }
    settings = load_settings(config(tmp_path, ""), env)
    assert settings.store.url == "postgres://node@127.0.0.1/pki"
    assert settings.store.password == "from-env"


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ('url = "postgresql://u:inline@h/db"', "must not carry the password"),
        ('url = "mysql://u@h/db"', "postgresql:// URL"),
        ('url = "postgresql://u@h/db"\npassword = "x"', "must not be written in the config"),
    ],
)
def test_bad_store_settings_refused(tmp_path: Path, store: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(config(tmp_path, store), {})
